"""LitServe: a JPEG in (POST /predict, JSON ``{"image": "<base64>"}``, LitServe's request body),
detections JSON out; N workers, LitAPI batching (``max_batch_size``, ``batch_timeout``), as its
docs' batching example runs. JSON because LitServe hands the worker processes a parsed body
through a queue: a multipart upload's file object does not cross it.

    cd bench/peers/servers  # run.py starts every peer from here
    PEER_PORT=24100 PEER_WEIGHTS=yolov8n.onnx ../../../.cache/peers/litserve/bin/python litserve_server.py
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import litserve as ls  # type: ignore[import-not-found]  # the peer's own venv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detector import PeerConfig, load  # type: ignore[import-not-found]  # bench/peers/


class Detect(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.detector = load(PeerConfig.from_env())

    # No annotation on ``request``: LitServe picks how to read the body from it (none: JSON).
    def decode_request(self, request) -> bytes:
        return base64.b64decode(request["image"])

    def predict(self, jpegs: list[bytes]) -> list[dict[str, Any]]:
        return self.detector(jpegs)

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def main() -> None:
    config = PeerConfig.from_env()
    api = Detect(max_batch_size=config.max_batch, batch_timeout=config.batch_wait_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=config.workers, timeout=120, fast_queue=True)
    server.run(host="127.0.0.1", port=config.port, generate_client_file=False)


if __name__ == "__main__":
    main()
