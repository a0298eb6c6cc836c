"""BentoML: JPEG files in (POST /detect, multipart field ``images``), detections JSON out; N
workers, a batchable API (BentoML's adaptive batching), as its docs' image-model examples run.

    cd bench/peers/servers  # run.py starts every peer from here
    PEER_PORT=24100 PEER_WEIGHTS=yolov8n.onnx ../../../.cache/peers/bentoml/bin/python bentoml_server.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import bentoml  # type: ignore[import-not-found]  # the peer's own venv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detector import PeerConfig, load  # type: ignore[import-not-found]  # bench/peers/

CONFIG = PeerConfig.from_env()


@bentoml.service(workers=CONFIG.workers, traffic={"timeout": 300, "max_concurrency": 256})
class Detect:
    def __init__(self) -> None:
        self.detector = load(CONFIG)

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch, max_latency_ms=60000)
    def detect(self, images: list[Path]) -> list[dict[str, Any]]:
        return self.detector([path.read_bytes() for path in images])


if __name__ == "__main__":
    service: Any = Detect  # what @bentoml.service made of the class (untyped outside its venv)
    service.serve_http(host="127.0.0.1", port=CONFIG.port)  # as `bentoml serve bentoml_server:Detect`
