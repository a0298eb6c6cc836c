"""Every `curl` line of the README's gateway section works as written against a live gateway.

The only substitutions: the gateway's port (the test's own, not 8080) and where the shared
images are; each curl also gets --fail-with-body, so an HTTP error fails the line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## HTTP gateway and demo page"


def readme_curl_lines() -> list[str]:
    text = README.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if "curl " in line and not line.startswith("#")]


def test_the_readme_has_a_curl_line_for_every_endpoint():
    lines = " ".join(readme_curl_lines())
    for endpoint in ("/v1/detect", "/v1/classify", "/v1/embed", "/v1/models", "/v1/models/yolov8n", "/healthz",
                     "/readyz", "/metrics", "/v1/stats"):
        assert f"localhost:8080{endpoint}" in lines, endpoint


def test_every_readme_curl_line_works_as_written(gateway, data_dir, tmp_path):
    assert shutil.which("curl"), "curl is not installed"
    outputs = []
    for line in readme_curl_lines():
        command = line.replace("localhost:8080", f"127.0.0.1:{gateway.port}").replace("../shared/data/", f"{data_dir}/")
        command = re.sub(r"(^|\| )curl ", r"\1curl --fail-with-body -sS ", command)
        done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        outputs.append(done.stdout)
    first = json.loads(outputs[0])["results"][0]
    assert first["image"] == "shapes_05.jpg" and {d["label"] for d in first["detections"]} == {"kite", "frisbee"}
    assert (tmp_path / "shapes_05.png").read_bytes().startswith(b"\x89PNG")
    assert "x-request-id: my-request-1" in outputs[-1].lower()
