"""Container health check: asks the stage's own grpc.health.v1 service, exits 0 only on SERVING.

Used by the images' HEALTHCHECK (Docker, Compose, podman), so a stage that runs but cannot serve
(the inference stage while its models load) is reported unhealthy rather than merely running.
The stage, port and TLS files come from the same INFERLINE_* variables the stage itself reads;
with TLS it dials localhost, a name the certificate must carry (the Helm chart's does).

The HTTP gateway (INFERLINE_STAGE=gateway) has no gRPC listener: for it the check is an HTTP GET
of its liveness route, /healthz, with the standard library only (the image has no curl).
"""

from __future__ import annotations

import os
import sys

from inferline.common.settings import CONTROLLER, GATEWAY, Settings


def main() -> int:
    stage = os.environ.get("INFERLINE_STAGE", CONTROLLER)
    port = str(Settings.from_env().port(stage))  # the port the stage itself listens on
    timeout = float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "3"))
    if stage == GATEWAY:
        url = sys.argv[1] if len(sys.argv) > 1 else f"http://127.0.0.1:{port}/healthz"
        return check_http(stage, url, timeout)
    return check_grpc(stage, port, timeout)


def check_http(stage: str, url: str, timeout: float) -> int:
    """0 when the URL answers 200; any other status, a refused connection or a timeout is 1."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 (a fixed local http URL)
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:  # refused, unreachable, timed out
        print(f"{stage} at {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{stage} at {url}: HTTP {status}")
    return 0 if status == 200 else 1


def check_grpc(stage: str, port: str, timeout: float) -> int:
    """0 only when the stage's grpc.health.v1 service answers SERVING."""
    import grpc  # noqa: PLC0415
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    tls = _tls_credentials()
    # The health name asked: "" (ready) by default; a liveness probe names the stage's service
    # (the controller's "" follows its stages, its service name only its own process).
    service = os.environ.get("HEALTHCHECK_SERVICE", "")
    target = sys.argv[1] if len(sys.argv) > 1 else f"{'localhost' if tls else '127.0.0.1'}:{port}"
    channel = grpc.secure_channel(target, tls) if tls else grpc.insecure_channel(target)
    with channel:
        try:
            # types-grpcio-health-checking's HealthStub declares no methods.
            reply = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"{stage} at {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{stage} at {target}{f' ({service})' if service else ''}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _tls_credentials():  # -> grpc.ChannelCredentials | None (grpc is imported only for gRPC checks)
    """Mirrors common/tls.py: the listener is TLS when a certificate is set and tls_serve is not off."""
    import grpc  # noqa: PLC0415

    env = os.environ
    serve_tls = env.get("INFERLINE_TLS_SERVE", "true").lower() not in {"0", "false", "no", "off"}
    if not env.get("INFERLINE_TLS_CERT_FILE") or not serve_tls:
        return None
    read = lambda var: open(env[var], "rb").read() if env.get(var) else None  # noqa: E731
    return grpc.ssl_channel_credentials(read("INFERLINE_TLS_CA_FILE"), read("INFERLINE_TLS_KEY_FILE"),
                                        read("INFERLINE_TLS_CERT_FILE"))


if __name__ == "__main__":
    sys.exit(main())
