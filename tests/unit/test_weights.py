"""Weights: explicit path, then $INFERLINE_MODEL_DIR, then the official download; sha256 checked
against the model's policy before anything loads the file."""

import hashlib
import logging
import pickle
from pathlib import Path

import pytest

from inferline.common.errors import ConfigError, WeightsError
from inferline.services.inference import weights as weights_module
from inferline.services.inference.repository import Verify, WeightsSpec
from inferline.services.inference.weights import DOWNLOADERS, resolve_weights

# Specs without an official checksum say what they trust, as a custom model's config must.
WARN = Verify("warn")


def _file(path: Path, content: bytes = b"weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_explicit_path_wins_over_the_model_dir(tmp_path):
    explicit = _file(tmp_path / "explicit" / "best.pt", b"a")
    _file(tmp_path / "models" / "m.pt", b"b")
    spec = WeightsSpec(file="m.pt", path=explicit, verify=WARN)
    found = resolve_weights(spec, model="m", model_dir=[tmp_path / "models"], allow_download=False,
                            cache_dir=tmp_path / "c")
    assert found.path == explicit


def test_missing_explicit_path_is_an_error_not_a_fallback(tmp_path):
    _file(tmp_path / "models" / "m.pt")
    spec = WeightsSpec(file="m.pt", path=tmp_path / "nope.pt", verify=WARN)
    with pytest.raises(WeightsError, match="weights.path .*nope.pt"):
        resolve_weights(spec, model="m", model_dir=[tmp_path / "models"], allow_download=False,
                        cache_dir=tmp_path / "c")


def test_model_dir_is_used_when_no_explicit_path(tmp_path):
    expected = _file(tmp_path / "models" / "m.pt")
    found = resolve_weights(WeightsSpec(file="m.pt", verify=WARN), model="m", model_dir=[tmp_path / "models"],
                            allow_download=False, cache_dir=tmp_path / "c")
    assert found.path == expected


def test_official_checksum_marks_the_file_official(tmp_path):
    content = b"the official release"
    _file(tmp_path / "m.pt", content)
    spec = WeightsSpec(file="m.pt", sha256=hashlib.sha256(content).hexdigest())
    found = resolve_weights(spec, model="m", model_dir=[tmp_path], allow_download=False, cache_dir=tmp_path / "c")
    assert found.official and found.sha256 == spec.sha256


def test_with_verify_warn_other_weights_are_served_with_one_warning_naming_their_checksum(tmp_path, caplog):
    _file(tmp_path / "m.pt", b"a stand-in")
    spec = WeightsSpec(file="m.pt", sha256="0" * 64, verify=WARN)
    with caplog.at_level(logging.WARNING):
        found = resolve_weights(spec, model="m", model_dir=[tmp_path], allow_download=False, cache_dir=tmp_path / "c")
    assert not found.official
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert (
        "unverified" in warnings[0].getMessage()
        and hashlib.sha256(b"a stand-in").hexdigest() in warnings[0].getMessage()
    )
    assert found.trusted_by == "unverified (verify: warn)"


def test_missing_offline_names_the_file_and_where_to_put_it(tmp_path):
    spec = WeightsSpec(file="yolov8n.pt", source="ultralytics", verify=WARN)
    with pytest.raises(WeightsError) as raised:
        resolve_weights(spec, model="yolov8n", model_dir=[tmp_path / "models"], allow_download=False,
                        cache_dir=tmp_path / "c")
    message = str(raised.value)
    assert "yolov8n.pt" in message and str(tmp_path / "models") in message and "INFERLINE_MODEL_DIR" in message


def test_failed_download_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    def offline(file: str, dest: Path) -> None:
        raise ConnectionError("network is unreachable")

    monkeypatch.setitem(DOWNLOADERS._items, "test-offline", offline)
    spec = WeightsSpec(file="m.pt", source="test-offline", verify=WARN)
    with pytest.raises(
        WeightsError,
        match=r"m.pt not found .*official download failed \(ConnectionError: network is unreachable\).*put m.pt in",
    ):
        resolve_weights(spec, model="m", model_dir=[], allow_download=True, cache_dir=tmp_path / "c")


def test_successful_download_lands_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setitem(DOWNLOADERS._items, "test-online", lambda file, dest: _file(dest, b"downloaded"))
    found = resolve_weights(WeightsSpec(file="m.pt", source="test-online", verify=WARN), model="m", model_dir=[],
                            allow_download=True, cache_dir=tmp_path / "c")
    assert found.path == tmp_path / "c" / "m.pt"


def test_each_family_has_a_registered_download_source():
    assert {"ultralytics", "torchvision", "open_clip"} <= set(DOWNLOADERS)
    assert weights_module.DEFAULT_CACHE.name == "models"


def test_model_dir_is_a_search_path(tmp_path):
    expected = _file(tmp_path / "second" / "m.pt")
    found = resolve_weights(
        WeightsSpec(file="m.pt", verify=WARN), model="m", model_dir=[tmp_path / "first", tmp_path / "second"],
        allow_download=False, cache_dir=tmp_path / "c",
    )
    assert found.path == expected


def test_a_short_checksum_is_a_prefix_as_in_torchvision_file_names(tmp_path):
    content = b"torchvision weights"
    _file(tmp_path / "m-abc.pth", content)
    spec = WeightsSpec(file="m-abc.pth", sha256=hashlib.sha256(content).hexdigest()[:8])
    assert resolve_weights(spec, model="m", model_dir=[tmp_path], allow_download=False,
                           cache_dir=tmp_path / "c").official


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_by_default_a_file_that_is_not_the_official_release_is_refused_naming_both_digests_and_the_ways_out(tmp_path):
    _file(tmp_path / "m.pt", b"a stand-in")
    spec = WeightsSpec(file="m.pt", sha256="0" * 64)
    with pytest.raises(WeightsError) as raised:
        resolve_weights(spec, model="m", model_dir=[tmp_path], allow_download=False, cache_dir=tmp_path / "c")
    message = str(raised.value)
    assert str(tmp_path / "m.pt") in message and "0" * 64 in message and _digest(b"a stand-in") in message
    assert "put the official m.pt there" in message
    assert (
        f"verify: sha256:{_digest(b'a stand-in')}" in message
        and f"INFERLINE_TRUSTED_WEIGHTS=sha256:{_digest(b'a stand-in')}" in message
    )


def test_the_check_runs_before_any_loader_so_a_refused_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("code in the pickle ran",))

    _file(tmp_path / "m.pt", pickle.dumps(Payload()))
    with pytest.raises(WeightsError, match="the file was not loaded"):
        resolve_weights(WeightsSpec(file="m.pt", sha256="0" * 64), model="m", model_dir=[tmp_path],
                        allow_download=False, cache_dir=tmp_path / "c")
    assert not marker.exists()


def test_a_pinned_custom_file_is_served_and_any_other_refused(tmp_path):
    _file(tmp_path / "m.pt", b"my fine-tune")
    pinned = WeightsSpec(file="m.pt", verify=Verify("sha256", _digest(b"my fine-tune")))
    found = resolve_weights(pinned, model="m", model_dir=[tmp_path], allow_download=False, cache_dir=tmp_path / "c")
    assert found.trusted_by == "pinned in the model config" and not found.official
    _file(tmp_path / "m.pt", b"someone else's file")
    with pytest.raises(WeightsError, match=f"trusts only the file pinned by verify: sha256:{_digest(b'my fine-tune')}"):
        resolve_weights(pinned, model="m", model_dir=[tmp_path], allow_download=False, cache_dir=tmp_path / "c")


def test_an_operator_pin_serves_a_file_the_config_does_not_trust_with_a_warning(tmp_path, caplog):
    _file(tmp_path / "m.pt", b"a stand-in")
    spec = WeightsSpec(file="m.pt", sha256="0" * 64)
    with caplog.at_level(logging.WARNING):
        found = resolve_weights(spec, model="m", model_dir=[tmp_path], allow_download=False, cache_dir=tmp_path / "c",
                                trusted=[f"sha256:{_digest(b'a stand-in').upper()}"])
    assert found.trusted_by == "pinned by INFERLINE_TRUSTED_WEIGHTS" and not found.official
    assert any("INFERLINE_TRUSTED_WEIGHTS pins it" in r.getMessage() for r in caplog.records)


def test_a_malformed_operator_pin_is_a_configuration_error_not_ignored(tmp_path):
    _file(tmp_path / "m.pt", b"a stand-in")
    with pytest.raises(ConfigError, match="INFERLINE_TRUSTED_WEIGHTS: 'abc' is not a sha256 pin"):
        resolve_weights(WeightsSpec(file="m.pt", sha256="0" * 64), model="m", model_dir=[tmp_path],
                        allow_download=False,
                        cache_dir=tmp_path / "c", trusted=["abc"])


def test_a_download_that_is_not_the_official_release_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(DOWNLOADERS._items, "test-tampered", lambda file, dest: _file(dest, b"tampered"))
    spec = WeightsSpec(file="m.pt", sha256=_digest(b"the release"), source="test-tampered")
    with pytest.raises(WeightsError, match=_digest(b"tampered")):
        resolve_weights(spec, model="m", model_dir=[], allow_download=True, cache_dir=tmp_path / "c")
