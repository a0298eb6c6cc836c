"""Mosec: JPEG bytes in (POST /inference), detections JSON out; N worker processes, dynamic batching.

    PEER_PORT=24100 PEER_WEIGHTS=yolov8n.onnx .cache/peers/mosec/bin/python bench/peers/servers/mosec_server.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mosec import Server, Worker  # type: ignore[import-not-found]  # the peer's own venv
from mosec.errors import DecodingError  # type: ignore[import-not-found]  # the peer's own venv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detector import PeerConfig, load  # type: ignore[import-not-found]  # bench/peers/


class Detect(Worker):
    """Mosec batches requests' bodies into one ``forward`` call (Mosec's ``max_batch_size``)."""

    def __init__(self) -> None:
        super().__init__()
        self.detector = load(PeerConfig.from_env())

    def deserialize(self, data: bytes) -> bytes:
        if not data:
            raise DecodingError("send the JPEG bytes as the request body")
        return data

    def serialize(self, data: Any) -> bytes:
        return json.dumps(data).encode()

    def forward(self, data: list[bytes]) -> list[dict[str, Any]]:
        return self.detector(data)


def main() -> None:
    config = PeerConfig.from_env()
    # Mosec reads its own CLI flags: address, port and a generous timeout for c=32 queues.
    sys.argv[1:] = ["--address", "127.0.0.1", "--port", str(config.port), "--timeout", "120000"]
    server = Server()
    server.append_worker(Detect, num=config.workers, max_batch_size=config.max_batch,
                         max_wait_time=max(1, round(config.batch_wait_ms)))
    server.run()


if __name__ == "__main__":
    main()
