from pathlib import Path

import pytest

from inferline.common.errors import ConfigError
from inferline.common.settings import Settings


def test_defaults_are_the_documented_ports():
    settings = Settings.from_env({})
    ports = [settings.port(s) for s in ("controller", "preprocess", "inference", "postprocess")]
    assert ports == [50051, 50052, 50053, 50054]
    assert settings.max_message_bytes >= 64 * 1024 * 1024


def test_environment_overrides_typed_fields():
    settings = Settings.from_env(
        {
            "INFERLINE_CONTROLLER_PORT": "6000",
            "INFERLINE_MODELS": "yolov8n, other",
            "INFERLINE_ALLOW_DOWNLOAD": "false",
            "INFERLINE_MODEL_DIR": "/models:/more/models",
            "INFERLINE_GRACE_PERIOD_S": "2.5",
        }
    )
    assert settings.controller_port == 6000
    assert settings.models == ("yolov8n", "other")
    assert settings.allow_download is False
    assert settings.model_dir == (Path("/models"), Path("/more/models"))
    assert settings.grace_period_s == 2.5


def test_invalid_values_name_the_variable():
    with pytest.raises(ConfigError, match="INFERLINE_CONTROLLER_PORT"):
        Settings.from_env({"INFERLINE_CONTROLLER_PORT": "fifty"})
    with pytest.raises(ConfigError, match="INFERLINE_ALLOW_DOWNLOAD"):
        Settings.from_env({"INFERLINE_ALLOW_DOWNLOAD": "maybe"})


def test_unknown_stage_is_refused():
    with pytest.raises(ConfigError, match="unknown stage"):
        Settings().port("nope")
    with pytest.raises(ConfigError, match="unknown stage"):
        Settings().target("gateway")  # the HTTP gateway has a port but is no stage's target


def test_the_gateway_has_a_port_of_its_own():
    assert Settings().port("gateway") == 8080
    assert Settings.from_env({"INFERLINE_GATEWAY_PORT": "9000"}).port("gateway") == 9000
