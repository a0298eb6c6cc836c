"""TLS between the services (common/tls.py), as the Helm chart's `tls.enabled` sets it up: the
stages listen with mutual TLS, the controller dials them with its certificate and keeps its own
listener plaintext (INFERLINE_TLS_SERVE=false), the image's health check speaks TLS too."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.common.errors import ConfigError, StageUnavailable
from inferline.common.settings import PIPELINE_STAGES, Settings
from inferline.common.tls import channel_credentials, server_credentials
from inferline.services.client import Client
from tests.deploy.tools import REPO, assert_detects_shapes, detect
from tests.support.pki import make_pki
from tests.support.servers import LoopThread, start_stage
from tests.support.standins import STANDIN_PINS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_settings(pki, model_dir) -> Settings:
    return Settings(model_dir=(model_dir,), models=("yolov8n",), tls_cert_file=pki["cert"],
                    tls_key_file=pki["key"], tls_ca_file=pki["ca"], trusted_weights=STANDIN_PINS)


@pytest.fixture(scope="module")
def tls_stack(tls_settings):
    loop = LoopThread()
    servers = {stage: start_stage(loop, stage, tls_settings) for stage in ("preprocess", "inference", "postprocess")}
    controller_settings = dataclasses.replace(
        tls_settings, tls_serve=False, **{f"{s}_target": servers[s].address for s in servers})
    servers["controller"] = start_stage(loop, "controller", controller_settings)
    yield servers
    for server in reversed(list(servers.values())):
        server.stop()
    loop.close()


def _health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_detect_through_a_controller_that_dials_its_stages_over_mutual_tls(tls_stack, shapes_image):
    assert_detects_shapes(detect(tls_stack["controller"].address, shapes_image, timeout=30))


def test_a_stage_refuses_plaintext_and_clients_without_a_certificate(tls_stack, pki):
    address = tls_stack["inference"].address
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as plaintext:
        _health(channel)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    no_client_cert = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
    with grpc.secure_channel(address, no_client_cert) as channel, pytest.raises(grpc.RpcError) as anonymous:
        _health(channel)
    assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
    trusting_other_ca = grpc.ssl_channel_credentials(pki["other_ca"].read_bytes(), pki["key"].read_bytes(),
                                                     pki["cert"].read_bytes())
    with grpc.secure_channel(address, trusting_other_ca) as channel, pytest.raises(grpc.RpcError) as untrusted:
        _health(channel)
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(address, channel_credentials(Settings(tls_cert_file=pki["cert"], tls_key_file=pki["key"],
                                                                    tls_ca_file=pki["ca"]))) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_the_image_health_check_speaks_tls_when_the_stage_does(tls_stack, pki):
    port = tls_stack["postprocess"].address.rsplit(":", 1)[1]
    script = str(REPO / "deploy" / "docker" / "healthcheck.py")
    env = dict(os.environ, INFERLINE_STAGE="postprocess", INFERLINE_POSTPROCESS_PORT=port,
               INFERLINE_TLS_CERT_FILE=str(pki["cert"]), INFERLINE_TLS_KEY_FILE=str(pki["key"]),
               INFERLINE_TLS_CA_FILE=str(pki["ca"]))
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr
    plain = {k: v for k, v in env.items() if not k.startswith("INFERLINE_TLS_")}
    done = subprocess.run([sys.executable, script], env=plain, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1


def test_the_client_speaks_mutual_tls_from_the_same_settings_as_the_services(tls_stack, tls_settings):
    """A controller that serves TLS too (no ingress in front of it): the client's channel comes
    from the services' factory, so the INFERLINE_TLS_* files that let a stage dial another let
    the CLI dial the controller; without them the call fails as unavailable."""
    loop = LoopThread()
    stages = {f"{stage}_target": tls_stack[stage].address for stage in PIPELINE_STAGES}
    controller = start_stage(loop, "controller", dataclasses.replace(tls_settings, **stages))
    try:
        with Client(controller.address, tls_settings, timeout=30) as client:
            assert "yolov8n" in [m.name for m in client.models()]
        with Client(controller.address, Settings(), timeout=5) as plaintext, pytest.raises(StageUnavailable):
            plaintext.models()
    finally:
        controller.stop()
        loop.close()


def test_half_configured_or_unreadable_tls_is_refused_naming_the_variable(pki, tmp_path):
    with pytest.raises(ConfigError, match="INFERLINE_TLS_CERT_FILE and INFERLINE_TLS_KEY_FILE go together"):
        server_credentials(Settings(tls_cert_file=pki["cert"]))
    with pytest.raises(ConfigError, match="INFERLINE_TLS_CA_FILE=.*missing.crt: cannot read it"):
        channel_credentials(Settings(tls_ca_file=tmp_path / "missing.crt"))
    assert server_credentials(Settings()) is None and channel_credentials(Settings()) is None
    assert server_credentials(Settings(tls_cert_file=pki["cert"], tls_key_file=pki["key"], tls_serve=False)) is None
    assert Settings.from_env({"INFERLINE_TLS_SERVE": "false",
                              "INFERLINE_TLS_CA_FILE": "/x/ca.crt"}).tls_ca_file == Path("/x/ca.crt")
