"""The inference stage's server: the Open Inference Protocol (``inference.GRPCInferenceService``,
oip_servicer.py) on ``Inference`` (service.py), and only that protocol, so that any OIP server
can stand in for this stage and any OIP client (tritonclient, perf_analyzer) can call it."""

from __future__ import annotations

import grpc

from inferline.common.generated import grpc_service_pb2, grpc_service_pb2_grpc
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.common.telemetry.profiler import profile_route
from inferline.services.inference.oip_servicer import OipInferenceServicer
from inferline.services.inference.service import Inference


def build_service(settings: Settings) -> Service:
    """The stage's server; ``.domain`` is its ``Inference``, for callers in this process."""
    inference = Inference(settings)
    servicer = OipInferenceServicer(inference)

    def register(server: grpc.aio.Server) -> list[str]:
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        return [grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]

    routes = profile_route(settings.profile_dir, enabled=settings.profiling)
    return Service(
        "inference", register, inference.load, inference.close,
        servicer=servicer, domain=inference, routes=routes, gpu_metrics=True, nice=settings.inference_nice,
    )
