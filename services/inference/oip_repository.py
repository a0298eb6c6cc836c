"""The inference stage's OIP model-repository and statistics extensions.

Transport only, as ``oip_servicer.py``: it converts Triton's repository and statistics messages
to calls on ``Inference`` (service.py) and back; model control itself is ``models.py``'s
``ModelManager`` (docs/model-control.md). A mixin of ``OipInferenceServicer``, kept apart
because model control (load, unload, statistics) is its own concern.
"""

from __future__ import annotations

from inferline.common.errors import InvalidInput
from inferline.common.generated import grpc_service_pb2
from inferline.services.inference.models import LoadedModel
from inferline.services.inference.service import Inference
from inferline.services.inference.statistics import Duration


class RepositoryServicer:
    service: Inference

    async def RepositoryIndex(self, request, context):  # noqa: N802 - gRPC's method name
        index = grpc_service_pb2.RepositoryIndexResponse.ModelIndex
        return grpc_service_pb2.RepositoryIndexResponse(
            models=[
                index(name=s.name, version=s.version, state=s.state, reason=s.reason)
                for s in self.service.repository_index(ready_only=request.ready)
            ]
        )

    async def RepositoryModelLoad(self, request, context):  # noqa: N802 - gRPC's method name
        await self.service.load_model(request.model_name, _config_parameter(request))
        return grpc_service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):  # noqa: N802 - gRPC's method name
        await self.service.unload_model(request.model_name)
        return grpc_service_pb2.RepositoryModelUnloadResponse()

    async def ModelStatistics(self, request, context):  # noqa: N802 - gRPC's method name
        return grpc_service_pb2.ModelStatisticsResponse(
            model_stats=[_statistics(m) for m in self.service.statistics(request.name, request.version)]
        )


def _config_parameter(request: grpc_service_pb2.RepositoryModelLoadRequest) -> str | None:
    """Triton's ``parameters["config"]``: the model's config as JSON (here: config.yaml's fields)."""
    if "config" not in request.parameters:
        return None
    parameter = request.parameters["config"]
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "string_param":
        return parameter.string_param
    if kind == "bytes_param":
        return parameter.bytes_param.decode("utf-8", errors="replace")
    raise InvalidInput("parameter 'config' must be a string: the model config as JSON")


def _duration(d: Duration) -> grpc_service_pb2.StatisticDuration:
    return grpc_service_pb2.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(model: LoadedModel) -> grpc_service_pb2.ModelStatistics:
    s = model.stats
    with s.lock:
        return grpc_service_pb2.ModelStatistics(
            name=model.config.name,
            version=model.config.version,
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
            inference_stats=grpc_service_pb2.InferStatistics(
                success=_duration(s.success),
                fail=_duration(s.fail),
                queue=_duration(s.queue),
                compute_input=_duration(s.compute_input),
                compute_infer=_duration(s.compute_infer),
                compute_output=_duration(s.compute_output),
            ),
            batch_stats=[
                grpc_service_pb2.InferBatchStatistics(
                    batch_size=size,
                    compute_input=_duration(b.compute_input),
                    compute_infer=_duration(b.compute_infer),
                    compute_output=_duration(b.compute_output),
                )
                for size, b in sorted(s.batches.items())
            ],
        )
