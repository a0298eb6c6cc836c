"""The committed generated code is exactly what the protos generate today."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "common" / "generated"


def _generator():
    spec = importlib.util.spec_from_file_location("protos_generate", REPO / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_not_stale(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a dev dependency")
    fresh = {p.name: p.read_text() for p in _generator().generate(tmp_path)}
    committed = {p.name: p.read_text() for p in COMMITTED.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"}}
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def test_generated_modules_import_each_other_relatively():
    for path in COMMITTED.glob("*.py"):
        assert "from inferline.v1" not in path.read_text(), path.name
