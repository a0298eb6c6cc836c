"""Client channels between services, configured once.

Every call between inferline services is idempotent (a stage call computes a pure function of its
request), so a channel retries UNAVAILABLE through gRPC's own retry policy, declared in the
channel's service config: a stage that restarts, drains or loses a replica then costs latency,
not errors. A retry budget (``retryThrottling``) stops retries from multiplying the load when a
stage is failing rather than restarting. Nothing else is retried: RESOURCE_EXHAUSTED means "less
load, please" and DEADLINE_EXCEEDED means the caller has gone.

A target names one replica or several: a DNS name with one record per replica
(``dns:///inference.ns.svc.cluster.local:50053``, what a headless Service resolves to), or a
static list (``127.0.0.1:50053,127.0.0.1:50063`` or the same as ``ipv4:...``). The channel
spreads calls over them round-robin (``loadBalancingConfig``) and, through client-side health
checking, sends no new call to a replica whose health says NOT_SERVING (loading or draining).
A retried attempt is picked again, so a call that met a dead replica goes to a live one.

Keepalive pings find a replica that vanished without closing its connections; the servers' own
``max_connection_age`` (common/server.py) makes the channel re-resolve a DNS name, so replicas
added behind it get calls; a listed address that does not answer yet is retried at most every
``reconnect_max_backoff_s``, so a copy started there gets calls too (docs/deployment.md).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

import grpc

from inferline.common.errors import ConfigError
from inferline.common.settings import Settings
from inferline.common.telemetry.interceptors import TelemetryClientInterceptor
from inferline.common.tls import channel_credentials

# The inferline services whose methods are retried (all of them: every method is idempotent).
INFERLINE_SERVICES = (
    "inferline.v1.ControllerService",
    "inferline.v1.PreprocessService",
    # The inference stage speaks the Open Inference Protocol; the controller's calls of it are
    # idempotent too (ModelInfer on a stateless model, the metadata reads).
    "inference.GRPCInferenceService",
    "inferline.v1.PostprocessService",
)


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    """Message limits, shared by servers and clients."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]


def service_config(settings: Settings, *, health_service: str | None = "") -> dict:
    """The gRPC service config of a channel between inferline services.

    ``health_service`` is the name whose health a replica must report SERVING to get new calls
    (client-side health checking); None turns health checking off.
    """
    config: dict = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": name} for name in INFERLINE_SERVICES],
                "retryPolicy": {
                    "maxAttempts": settings.retry_max_attempts,
                    "initialBackoff": f"{settings.retry_initial_backoff_s:g}s",
                    "maxBackoff": f"{settings.retry_max_backoff_s:g}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        # Each failed attempt takes a token, each success gives back tokenRatio; below half of
        # maxTokens the channel stops retrying until successes refill it.
        "retryThrottling": {"maxTokens": settings.retry_budget_tokens, "tokenRatio": 0.1},
    }
    if health_service is not None:
        config["healthCheckConfig"] = {"serviceName": health_service}
    return config


def client_options(settings: Settings, *, health_service: str | None = "") -> list[tuple[str, int | str]]:
    """Channel options of a client: message limits, the service config and a retry buffer that
    holds a whole request (gRPC commits, and stops retrying, a call whose request outgrows the
    buffer; the default 256 KiB is smaller than one 640x640 image tensor)."""
    return [
        *channel_options(settings),
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        # Pings on a connection without calls, however many (gRPC's default stops after two).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_reconnect_backoff_ms", _ms(settings.reconnect_max_backoff_s)),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", settings.max_message_bytes),
        ("grpc.service_config", json.dumps(service_config(settings, health_service=health_service))),
    ]


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


# Target schemes given as they are: gRPC's resolvers read them.
_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def channel_target(target: str) -> str:
    """A gRPC target URI from a setting: one address or URI as it is (``host:port``,
    ``dns:///...``, ``ipv4:...``), or comma-separated replicas as one ``ipv4:``/``ipv6:`` URI (IP
    addresses; ``localhost`` means 127.0.0.1), which round-robin then spreads calls over."""
    target = target.strip()
    if target.startswith(_URI_SCHEMES):
        return target
    parts = [part.strip() for part in target.split(",") if part.strip()]
    if len(parts) <= 1:
        return target
    addresses = [_ip_address(part, target) for part in parts]
    families = {version for version, _ in addresses}
    if len(families) > 1:
        raise ConfigError(f"replica addresses {target!r} mix IPv4 and IPv6; list one family")
    scheme = "ipv4" if families == {4} else "ipv6"
    return f"{scheme}:{','.join(address for _, address in addresses)}"


def replica_addresses(target: str) -> list[str]:
    """Each replica's own address in a target setting (one for a single address or DNS name,
    each of an ``ipv4:``/``ipv6:`` list)."""
    scheme, sep, rest = target.strip().partition(":")
    listed = rest if sep and scheme in ("ipv4", "ipv6") else target
    return [part.strip() for part in listed.split(",") if part.strip()] or [target]


def _ip_address(part: str, target: str) -> tuple[int, str]:
    host, sep, port = part.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"replica address {part!r} in {target!r} needs a port (HOST:PORT)")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"replica address {part!r} in {target!r}: several replicas are listed by IP address "
            "(for a DNS name with several records, give it alone as dns:///NAME:PORT)"
        ) from None
    return ip.version, f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def create_channel(
    target: str, settings: Settings, *, health_service: str | None = "", interceptors: Sequence = ()
) -> grpc.aio.Channel:
    """A channel to another inferline service (``target`` as in :func:`channel_target`)."""
    credentials = channel_credentials(settings)
    chain = [TelemetryClientInterceptor(), *interceptors]  # trace context first
    uri, options = channel_target(target), client_options(settings, health_service=health_service)
    if credentials is not None:
        return grpc.aio.secure_channel(uri, credentials, options=options, interceptors=chain)
    return grpc.aio.insecure_channel(uri, options=options, interceptors=chain)


def create_blocking_channel(target: str, settings: Settings, *, health_service: str | None = "") -> grpc.Channel:
    """The synchronous twin of :func:`create_channel` (same address forms, limits, retries and
    TLS), for callers without an event loop: the CLI, scripts, a stack waiting for its stages.
    It carries no telemetry interceptor: those are grpc.aio's, and a caller without a loop has
    no trace to continue."""
    credentials = channel_credentials(settings)
    uri, options = channel_target(target), client_options(settings, health_service=health_service)
    if credentials is not None:
        return grpc.secure_channel(uri, credentials, options=options)
    return grpc.insecure_channel(uri, options=options)
