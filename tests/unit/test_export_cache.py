"""Serving a .pt with ONNX Runtime (issue 17): the export is made once, checked against the
source weights, recorded, and made again when the cached file no longer matches its record."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import inferline.services.inference.backends.onnxruntime_backend as ortb  # noqa: E402 - after the skips
import inferline.services.inference.export as export  # noqa: E402
import inferline.services.inference.export_cache as export_cache  # noqa: E402
from inferline.common.errors import WeightsError  # noqa: E402
from inferline.common.settings import Settings  # noqa: E402
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config  # noqa: E402
from inferline.services.inference.weights import ResolvedWeights, sha256_of  # noqa: E402


@pytest.fixture(scope="module")
def yolo_config():
    return dataclasses.replace(
        load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml"), backend="onnxruntime", parameters={}
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory, yolo_config, yolo_weights) -> tuple[Path, Path]:
    """(cache dir, the export made into it), made once for the module: exports take seconds."""
    root = tmp_path_factory.mktemp("exports")
    made = export_cache.cached_export(yolo_config, yolo_weights, sha256_of(yolo_weights), root)
    return root, made


def _copying_export(source: Path, calls: list[Path]):
    """Stands in for export_onnx: copies a known-good export (the check still runs for real)."""

    def fake(config, weights_path, out, **kwargs):
        calls.append(Path(out))
        shutil.copyfile(source, out)
        return Path(out)

    return fake


def test_an_export_is_recorded_with_its_sha256_and_its_difference_to_the_source(cache, yolo_weights):
    root, made = cache
    record = json.loads(made.with_suffix(".json").read_text())
    assert record["onnx_sha256"] == sha256_of(made)
    assert record["source_sha256"] == sha256_of(yolo_weights)
    assert 0 <= record["max_abs_diff"] <= export.CHECK_ATOL
    assert [p.name for p in root.glob("*.onnx")] == [made.name]


def test_a_cached_export_is_reused_without_exporting_again(cache, yolo_config, yolo_weights, monkeypatch):
    root, made = cache
    calls: list[Path] = []
    monkeypatch.setattr(export, "export_onnx", _copying_export(made, calls))
    assert export_cache.cached_export(yolo_config, yolo_weights, sha256_of(yolo_weights), root) == made
    assert calls == []


def test_a_corrupt_cached_export_is_made_again(cache, yolo_config, yolo_weights, tmp_path, monkeypatch):
    root, made = cache
    pristine = shutil.copyfile(made, tmp_path / "good.onnx")
    calls: list[Path] = []
    monkeypatch.setattr(export, "export_onnx", _copying_export(pristine, calls))
    made.write_bytes(made.read_bytes()[:1000])
    again = export_cache.cached_export(yolo_config, yolo_weights, sha256_of(yolo_weights), root)
    assert again == made and len(calls) == 1
    assert sha256_of(made) == sha256_of(pristine)


def test_a_new_source_makes_a_new_export_and_drops_the_stale_one(cache, yolo_config, yolo_weights, tmp_path,
                                                                 monkeypatch):
    root, made = cache
    pristine = shutil.copyfile(made, tmp_path / "good.onnx")
    calls: list[Path] = []
    monkeypatch.setattr(export, "export_onnx", _copying_export(pristine, calls))
    # Another model whose name starts with this one's keeps its export.
    neighbour = root / "yolov8n-seg-0123456789abcdef.onnx"
    neighbour.write_bytes(b"not ours")
    other = export_cache.cached_export(yolo_config, yolo_weights, "0" * 64, root)
    assert other != made and len(calls) == 1
    assert sorted(p.name for p in root.glob("*.onnx")) == sorted([other.name, neighbour.name])
    # Back to the real source: made again (by the stand-in), the other one dropped.
    assert export_cache.cached_export(yolo_config, yolo_weights, sha256_of(yolo_weights), root) == made
    assert sorted(p.name for p in root.glob("*.onnx")) == sorted([made.name, neighbour.name])
    neighbour.unlink()


def test_an_export_that_differs_from_its_source_is_refused(cache, yolo_config, yolo_weights, tmp_path):
    _, made = cache
    model = onnx.load(str(made))
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(weight) * 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), weight.name))
    altered = tmp_path / "altered.onnx"
    onnx.save(model, str(altered))
    with pytest.raises(WeightsError, match="beyond float32 rounding"):
        export.verify_export(yolo_config, yolo_weights, altered)


def test_the_onnxruntime_backend_serves_a_pt_through_the_cache(cache, yolo_config, yolo_weights, monkeypatch):
    root, made = cache
    monkeypatch.setattr(ortb, "_torch_sees_cuda", lambda: False)
    weights = ResolvedWeights(path=yolo_weights, sha256=sha256_of(yolo_weights), official=False)
    backend = ortb.load_onnxruntime_backend(yolo_config, weights, Settings(device="auto", export_cache_dir=root))
    assert isinstance(backend, ortb.OnnxRuntimeBackend)
    out = backend.run({"images": np.full((1, 3, 640, 480), 114, np.uint8)})
    assert out[0]["output0"].shape[0] == 84


def test_with_a_gpu_that_onnxruntime_cannot_use_the_torch_backend_serves(yolo_config, yolo_weights, tmp_path,
                                                                         monkeypatch):
    from inferline.services.inference.backends.torch_backend import TorchBackend  # noqa: PLC0415 - torch-only test

    monkeypatch.setattr(ortb, "_torch_sees_cuda", lambda: True)
    weights = ResolvedWeights(path=yolo_weights, sha256=sha256_of(yolo_weights), official=False)
    backend = ortb.load_onnxruntime_backend(yolo_config, weights, Settings(device="auto", export_cache_dir=tmp_path))
    assert isinstance(backend, TorchBackend)
    assert list(tmp_path.iterdir()) == []  # nothing exported


def test_without_the_exporter_a_pt_is_served_by_torch_or_refused_with_advice(yolo_config, yolo_weights, tmp_path,
                                                                             monkeypatch):
    from inferline.services.inference.backends.torch_backend import TorchBackend  # noqa: PLC0415 - torch-only test

    def no_onnx(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'onnx'", name="onnx")

    monkeypatch.setattr(ortb, "_torch_sees_cuda", lambda: False)
    monkeypatch.setattr(export, "export_onnx", no_onnx)
    weights = ResolvedWeights(path=yolo_weights, sha256=sha256_of(yolo_weights), official=False)
    settings = Settings(device="cpu", export_cache_dir=tmp_path)
    assert isinstance(ortb.load_onnxruntime_backend(yolo_config, weights, settings), TorchBackend)
    monkeypatch.setattr(ortb, "_torch_importable", lambda: False)
    with pytest.raises(WeightsError, match=r"onnx is missing.*inferline\[torch,onnx\].*inferline export"):
        ortb.load_onnxruntime_backend(yolo_config, weights, settings)


def test_an_unwritable_cache_falls_back_to_the_temporary_folder(cache, yolo_config, yolo_weights, tmp_path,
                                                                monkeypatch):
    _, made = cache
    calls: list[Path] = []
    monkeypatch.setattr(export, "export_onnx", _copying_export(made, calls))
    monkeypatch.setattr(ortb, "_torch_sees_cuda", lambda: False)
    monkeypatch.setattr(ortb.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    # A folder that cannot be made (under a file) stands for a read-only root file system.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    weights = ResolvedWeights(path=yolo_weights, sha256=sha256_of(yolo_weights), official=False)
    settings = Settings(device="cpu", export_cache_dir=blocked / "exports")
    backend = ortb.load_onnxruntime_backend(yolo_config, weights, settings)
    assert isinstance(backend, ortb.OnnxRuntimeBackend)
    assert [p.parent for p in calls] == [tmp_path / "tmp" / "inferline-exports"]


@pytest.mark.gpu
def test_on_a_cuda_machine_the_default_yolov8n_runs_on_the_gpu(yolo_weights, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from inferline.services.inference.backends.torch_backend import TorchBackend  # noqa: PLC0415 - torch-only test

    config = load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml")
    weights = ResolvedWeights(path=yolo_weights, sha256=sha256_of(yolo_weights), official=False)
    backend = ortb.load_onnxruntime_backend(config, weights, Settings(device="auto", export_cache_dir=tmp_path))
    if isinstance(backend, ortb.OnnxRuntimeBackend):
        assert backend.on_cuda, backend.providers
    else:
        assert isinstance(backend, TorchBackend) and backend.device.type == "cuda"
