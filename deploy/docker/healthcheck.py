"""Container health check: asks the stage's own grpc.health.v1 service, exits 0 only on SERVING.

Used by the images' HEALTHCHECK (Docker, Compose, podman), so a stage that runs but cannot serve
(the inference stage while its models load) is reported unhealthy rather than merely running.
The stage, port and TLS files come from the same INFERLINE_* variables the stage itself reads;
with TLS it dials localhost, a name the certificate must carry (the Helm chart's does).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORTS = {"controller": 50051, "preprocess": 50052, "inference": 50053, "postprocess": 50054}


def main() -> int:
    stage = os.environ.get("INFERLINE_STAGE", "controller")
    port = os.environ.get(f"INFERLINE_{stage.upper()}_PORT") or str(DEFAULT_PORTS.get(stage, 50051))
    tls = _tls_credentials()
    target = sys.argv[1] if len(sys.argv) > 1 else f"{'localhost' if tls else '127.0.0.1'}:{port}"
    channel = grpc.secure_channel(target, tls) if tls else grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "3")))
        except grpc.RpcError as exc:
            print(f"{stage} at {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{stage} at {target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _tls_credentials() -> grpc.ChannelCredentials | None:
    """Mirrors common/tls.py: the listener is TLS when a certificate is set and tls_serve is not off."""
    env = os.environ
    if not env.get("INFERLINE_TLS_CERT_FILE") or env.get("INFERLINE_TLS_SERVE", "true").lower() in {"0", "false", "no", "off"}:
        return None
    read = lambda var: open(env[var], "rb").read() if env.get(var) else None  # noqa: E731
    return grpc.ssl_channel_credentials(read("INFERLINE_TLS_CA_FILE"), read("INFERLINE_TLS_KEY_FILE"), read("INFERLINE_TLS_CERT_FILE"))


if __name__ == "__main__":
    sys.exit(main())
