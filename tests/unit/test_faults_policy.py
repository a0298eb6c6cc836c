"""The retry policy of the channels between services, replica targets, the restart backoff of
`inferline up`, and --replicas parsing (docs/reliability-faults.md)."""

from __future__ import annotations

import json

import pytest

from inferline.common.channels import INFERLINE_SERVICES, channel_target, client_options, service_config
from inferline.common.errors import ConfigError
from inferline.common.settings import Settings
from inferline.services.stack import Backoff, parse_replicas


def test_service_config_retries_only_unavailable_on_every_inferline_service():
    config = service_config(Settings())
    (method,) = config["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert {name["service"] for name in method["name"]} == set(INFERLINE_SERVICES)
    assert "waitForReady" not in method, "waiting is the caller's choice per call"


def test_service_config_takes_attempts_backoff_and_budget_from_settings():
    settings = Settings(retry_max_attempts=3, retry_initial_backoff_s=0.05, retry_max_backoff_s=1.5,
                        retry_budget_tokens=20)
    config = service_config(settings)
    policy = config["methodConfig"][0]["retryPolicy"]
    assert (policy["maxAttempts"], policy["initialBackoff"], policy["maxBackoff"]) == (3, "0.05s", "1.5s")
    assert config["retryThrottling"] == {"maxTokens": 20, "tokenRatio": 0.1}


def test_service_config_balances_round_robin_over_replicas_that_report_serving():
    config = service_config(Settings())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    assert service_config(Settings(), health_service="inferline.v1.ControllerService")["healthCheckConfig"] == {
        "serviceName": "inferline.v1.ControllerService"
    }
    assert "healthCheckConfig" not in service_config(Settings(), health_service=None)


def test_client_options_buffer_a_whole_request_for_retries():
    settings = Settings(max_message_mb=8)
    options = dict(client_options(settings))
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.per_rpc_retry_buffer_size"] == 8 * 1024 * 1024
    assert json.loads(options["grpc.service_config"]) == service_config(settings)


@pytest.mark.parametrize(
    ("setting", "uri"),
    [
        ("localhost:50053", "localhost:50053"),
        ("dns:///inference.default.svc:50053", "dns:///inference.default.svc:50053"),
        ("127.0.0.1:50053,127.0.0.1:50063", "ipv4:127.0.0.1:50053,127.0.0.1:50063"),
        ("localhost:1, 10.0.0.2:2", "ipv4:127.0.0.1:1,10.0.0.2:2"),
        ("[::1]:1,[fe80::1]:2", "ipv6:[::1]:1,[fe80::1]:2"),
    ],
)
def test_a_target_setting_becomes_one_grpc_uri(setting, uri):
    assert channel_target(setting) == uri


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("inference-a:1,inference-b:2", "by IP address"),
        ("127.0.0.1:1,[::1]:2", "mix IPv4 and IPv6"),
        ("127.0.0.1,127.0.0.2:2", "needs a port"),
    ],
)
def test_a_replica_list_that_cannot_be_one_uri_is_a_config_error(setting, complaint):
    with pytest.raises(ConfigError, match=complaint):
        channel_target(setting)


def test_restart_backoff_doubles_up_to_its_maximum():
    backoff = Backoff(initial=0.5, maximum=3.0, reset_after=30.0)
    delays, restarts = [], 0
    for _ in range(5):
        delay, restarts = backoff.delay(restarts, uptime=1.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert restarts == 5


def test_restart_backoff_starts_over_after_the_process_stayed_up():
    backoff = Backoff(initial=0.5, maximum=30.0, reset_after=10.0)
    assert backoff.delay(4, uptime=9.9) == (8.0, 5)
    assert backoff.delay(4, uptime=10.0) == (0.5, 1)


def test_restart_backoff_comes_from_settings():
    settings = Settings(restart_backoff_s=0.2, restart_max_backoff_s=5.0, restart_reset_after_s=12.0)
    assert Backoff.from_settings(settings) == Backoff(0.2, 5.0, 12.0)


def test_replicas_parse_stage_counts():
    assert parse_replicas(["inference=2", "postprocess=3"]) == {"inference": 2, "postprocess": 3}
    assert parse_replicas([]) == {}


@pytest.mark.parametrize("spec", ["inference", "inference=0", "inference=two", "gateway=2", "nope=2"])
def test_replicas_refuse_what_is_not_stage_equals_a_positive_count(spec):
    with pytest.raises(ConfigError, match="STAGE=N"):
        parse_replicas([spec])
