"""What the benchmark scripts share: where the weights are, the environment a contender starts
in, how a library's own loop is run, and what a report records so that a reader can rerun it.

Kept in one place so that ``compare.py`` (CPU, side by side) and ``gpu.py`` (the device) cannot
drift apart on how they find weights or start the references they are measured against.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def model_dirs() -> list[str]:
    """INFERLINE_MODEL_DIR's folders, else the shared stand-ins beside the checkout."""
    raw = os.environ.get("INFERLINE_MODEL_DIR") or str(SHARED / "models")
    return [part for part in raw.split(os.pathsep) if part]


def clean_env() -> dict[str, str]:
    """This process's environment without thread pins, so each contender gets its own defaults."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def reference(
    library: str, images: list[str], *, batch: int, duration: float, warmup: float, device: str, half: bool = False
) -> dict:
    """One library's own loop (``bench/reference.py``) in a fresh process: its report."""
    return references_at_once(library, images, 1, batch=batch, duration=duration, warmup=warmup,
                              device=device, half=half)[0]


def references_at_once(
    library: str, images: list[str], processes: int, *, batch: int, duration: float, warmup: float,
    device: str, half: bool = False,
) -> list[dict]:
    """``processes`` copies of one library's loop started together, each in its own process: their
    reports. For what the machine gives to N loops that share nothing but its cores and caches
    (the forward ceiling that the model-forward limit's arithmetic assumes)."""
    command = [
        sys.executable, str(REPO / "bench" / "reference.py"), library, "--images", *images,
        "--model-dir", *model_dirs(), "--batch", str(batch),
        "--duration", str(duration), "--warmup", str(warmup),
        "--device", device, *(["--half"] if half else []),
    ]
    running = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
        for _ in range(processes)
    ]
    reports = []
    for process in running:
        out, err = process.communicate()
        if process.returncode:
            raise SystemExit(f"bench/reference.py {library} failed ({process.returncode}):\n{err[-4000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """The installed version of each of ``packages`` that is installed."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def commit() -> str:
    """The checkout's short commit, marked when the working tree differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    dirty = " (with uncommitted changes)" if git("status", "--porcelain") else ""
    return git("rev-parse", "--short", "HEAD") + dirty
