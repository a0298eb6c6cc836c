"""KServe Python model server: JPEG bytes in (POST /v1/models/yolov8n:predict, Content-Type
image/jpeg, which KServe hands to the model unparsed), detections JSON out; N uvicorn worker
processes. KServe's own server has no dynamic batching (that is its sidecar agent's, on
Kubernetes), so each request is one forward, as its docs' custom-model example runs.

    PEER_PORT=24100 PEER_WEIGHTS=yolov8n.onnx .cache/peers/kserve/bin/python bench/peers/servers/kserve_server.py

KServe binds its HTTP port on 0.0.0.0 (not configurable); the driver only talks to 127.0.0.1,
and its gRPC server is off.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import kserve  # type: ignore[import-not-found]  # the peer's own venv
from kserve.errors import InvalidInput  # type: ignore[import-not-found]  # the peer's own venv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detector import PeerConfig, load  # type: ignore[import-not-found]  # bench/peers/

NAME = "yolov8n"


class Detect(kserve.Model):
    def __init__(self, config: PeerConfig) -> None:
        super().__init__(NAME)
        self.config = config
        self.detector: Any = None

    def load(self) -> bool:
        self.detector = load(self.config)
        self.ready = True
        return self.ready

    # KServe spawns its worker processes and pickles the model into each: an ONNX Runtime session
    # does not pickle, so every worker builds its own at unpickling (still at load, not per call).
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "detector": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.detector = load(self.config)

    def predict(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        if not isinstance(payload, bytes) or not payload:
            raise InvalidInput("send the JPEG bytes as the body with Content-Type: image/jpeg")
        return self.detector([payload])[0]


def main() -> None:
    config = PeerConfig.from_env()
    model = Detect(config)
    model.load()
    kserve.ModelServer(http_port=config.port, workers=config.workers, enable_grpc=False).start([model])


if __name__ == "__main__":
    main()
