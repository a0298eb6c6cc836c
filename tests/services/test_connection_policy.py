"""The connection policy of channels and servers (issue 18): target URIs as the balancer needs
them, keepalive pings the servers accept, and max_connection_age rotating a client's connection
(so it re-resolves its target) without costing a call."""

from __future__ import annotations

import time

import grpc
import pytest

from inferline.common.channels import channel_target, client_options, create_blocking_channel, replica_addresses
from inferline.common.server import Service, server_options
from inferline.common.settings import Settings
from tests.support.servers import LoopThread, start_service

# A stand-in stage on the preprocess service's name and method (the channels' retry policy
# names inferline's services); it answers raw bytes.
PEER_SERVICE, PEER_CALL = "inferline.v1.PreprocessService", "Preprocess"
PEER_METHOD = f"/{PEER_SERVICE}/{PEER_CALL}"


@pytest.mark.parametrize(
    "uri",
    ["dns:///t-inferline-inference.default.svc.cluster.local:50053", "ipv4:127.0.0.1:25001,127.0.0.2:25001",
     "ipv6:[::1]:25001,[::1]:25002"],
)
def test_a_target_given_as_a_grpc_uri_is_kept_as_it_is(uri):
    assert channel_target(uri) == uri


def test_each_address_of_an_ipv4_list_is_a_replica():
    assert replica_addresses("ipv4:127.0.0.1:25001,127.0.0.2:25002") == ["127.0.0.1:25001", "127.0.0.2:25002"]
    assert replica_addresses("dns:///inference:50053") == ["dns:///inference:50053"]


def test_clients_ping_no_faster_than_the_servers_accept():
    settings = Settings(keepalive_time_s=7, keepalive_timeout_s=3)
    client, server = dict(client_options(settings)), dict(server_options(settings))
    assert client["grpc.keepalive_time_ms"] == 7000 and client["grpc.keepalive_timeout_ms"] == 3000
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_permit_without_calls"] == server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0


def test_servers_close_connections_after_their_max_age_with_a_grace():
    options = dict(server_options(Settings(max_connection_age_s=30, max_connection_age_grace_s=10)))
    assert (options["grpc.max_connection_age_ms"], options["grpc.max_connection_age_grace_ms"]) == (30000, 10000)
    assert "grpc.max_connection_age_ms" not in dict(server_options(Settings(max_connection_age_s=0)))


def _peer_service(settings: Settings, *, broken: list[str] | None = None) -> Service:
    """A stage that answers each call with the caller's address as the server sees it (a
    ``broken`` one, SERVING by its health, fails every call with UNAVAILABLE and notes it)."""

    async def show(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if broken is not None:
            broken.append(context.peer())
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this replica is broken")
        return context.peer().encode()

    def register(server: grpc.aio.Server) -> list[str]:
        handler = grpc.unary_unary_rpc_method_handler(show)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PEER_SERVICE, {PEER_CALL: handler}),))
        return [PEER_SERVICE]

    return Service("peer", register)


def test_max_connection_age_moves_a_busy_client_to_new_connections_without_failing_a_call():
    settings = Settings(max_connection_age_s=0.5, max_connection_age_grace_s=0.5)
    loop = LoopThread()
    server = start_service(loop, _peer_service, settings)
    try:
        with create_blocking_channel(server.address, settings, health_service=None) as channel:
            show = channel.unary_unary(PEER_METHOD)
            peers, failures, until = set(), [], time.monotonic() + 3
            while time.monotonic() < until:
                try:
                    peers.add(show(b"", timeout=5, wait_for_ready=True))
                except grpc.RpcError as exc:
                    failures.append(exc.code())
    finally:
        server.stop()
        loop.close()
    assert failures == []
    # Each new connection comes from a new client port: the channel reconnected (and re-resolved).
    assert len(peers) >= 3, peers


def test_a_call_that_fails_unavailable_on_one_replica_is_retried_on_another():
    """round_robin picks again for the retry: with one of two replicas failing every call, every
    call succeeds (while the retry budget lasts: a few calls here)."""
    settings = Settings()
    loop = LoopThread()
    good = start_service(loop, _peer_service, settings)
    failed: list[str] = []
    bad = start_service(loop, lambda s: _peer_service(s, broken=failed), settings)
    target = f"127.0.0.1:{bad.app.port},127.0.0.1:{good.app.port}"  # the broken one first
    try:
        with create_blocking_channel(target, settings) as channel:
            show = channel.unary_unary(PEER_METHOD)
            answers = {show(b"", timeout=10, wait_for_ready=True) for _ in range(10)}
    finally:
        good.stop()
        bad.stop()
        loop.close()
    assert len(answers) == 1  # every answer from the good replica, over its one connection
    assert len(failed) >= 4  # the broken one had its turns, and each call moved on


def test_idle_connections_keep_alive_with_pings_the_server_accepts():
    """Pings every 0.5 s for 3 s without a call: the server takes them (no GOAWAY for
    too_many_pings), so the next call comes over the same connection."""
    settings = Settings(keepalive_time_s=0.5, keepalive_timeout_s=1.0)
    loop = LoopThread()
    server = start_service(loop, _peer_service, settings)
    try:
        with create_blocking_channel(server.address, settings, health_service=None) as channel:
            show = channel.unary_unary(PEER_METHOD)
            first = show(b"", timeout=5, wait_for_ready=True)
            time.sleep(3)  # the idle time under test, during which the channel pings
            second = show(b"", timeout=5, wait_for_ready=True)
    finally:
        server.stop()
        loop.close()
    assert second == first
