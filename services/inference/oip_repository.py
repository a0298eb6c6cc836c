"""The inference stage's OIP model-repository extension: the index of models and their states.

Transport only, as ``oip_servicer.py``: it converts Triton's repository messages to calls on
``Inference`` (service.py). A mixin of ``OipInferenceServicer``, kept apart because model control
(load, unload, statistics) is its own concern.
"""

from __future__ import annotations

from inferline.common.generated import grpc_service_pb2
from inferline.services.inference.service import Inference


class RepositoryServicer:
    service: Inference

    async def RepositoryIndex(self, request, context):  # noqa: N802 - gRPC's method name
        # Every model listed is loaded (the stage starts only when all are): READY.
        index = grpc_service_pb2.RepositoryIndexResponse.ModelIndex
        return grpc_service_pb2.RepositoryIndexResponse(
            models=[index(name=m.config.name, version=m.config.version, state="READY") for m in self.service.models()]
        )
