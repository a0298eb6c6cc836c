"""Model repository: one folder per model, validated at load with messages that say where."""

from pathlib import Path

import pytest
import yaml

from inferline.common.errors import ConfigError
from inferline.common.recipes import Recipe
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config, load_repository

BASE = yaml.safe_load((BUILTIN_REPOSITORY / "yolov8n" / "config.yaml").read_text())


def _write(root: Path, folder_name: str, **changes) -> Path:
    config = {**BASE, "name": folder_name, **changes}
    folder = root / folder_name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    return folder / "config.yaml"


def test_builtin_repository_serves_yolov8n_with_ultralytics_defaults():
    config = load_repository(BUILTIN_REPOSITORY)["yolov8n"]
    assert (config.task, config.backend, config.loader) == ("detect", "onnxruntime", "ultralytics")
    assert config.preprocess.name == "letterbox" and config.preprocess.params["auto"] is True
    assert dict(config.postprocess.params) == {"conf": 0.25, "iou": 0.7, "max_det": 300}
    assert config.weights.file == "yolov8n.pt" and config.weights.source == "ultralytics"


def test_builtin_repository_serves_yolov8n_seg_as_a_segment_model_of_the_same_family():
    configs = load_repository(BUILTIN_REPOSITORY)
    seg, detect = configs["yolov8n-seg"], configs["yolov8n"]
    assert (seg.task, seg.loader, seg.postprocess.name) == ("segment", "ultralytics", "yolo_segment")
    assert seg.preprocess == detect.preprocess and seg.postprocess.params == detect.postprocess.params
    assert [o.name for o in seg.outputs] == ["output0", "output1"]
    # Its filter compares the 80 class rows only, not the 32 mask coefficients after them.
    assert seg.candidate_filter == Recipe("yolo", {"output": "output0", "classes": 80})
    assert detect.candidate_filter == Recipe("yolo", {"output": "output0"})


def test_the_candidate_filter_is_declared_in_config_and_its_name_checked_at_load(tmp_path):
    assert load_config(_write(tmp_path, "unfiltered", candidate_filter=None)).candidate_filter is None
    path = _write(tmp_path, "typo", candidate_filter={"name": "yollo"})
    with pytest.raises(ConfigError, match="'yollo' is not one of yolo") as raised:
        load_config(path)
    assert str(path) in str(raised.value)


def test_adding_a_model_is_adding_a_folder(tmp_path):
    _write(tmp_path, "yolov8n")
    _write(tmp_path, "yolov8n-strict", postprocess={"name": "yolo_detect", "params": {"conf": 0.5}})
    configs = load_repository(tmp_path)
    assert sorted(configs) == ["yolov8n", "yolov8n-strict"]
    assert configs["yolov8n-strict"].postprocess.params == {"conf": 0.5}


def test_only_loads_the_named_models_and_refuses_unknown_names(tmp_path):
    _write(tmp_path, "yolov8n")
    _write(tmp_path, "other")
    assert list(load_repository(tmp_path, ("other",))) == ["other"]
    with pytest.raises(ConfigError, match="missing"):
        load_repository(tmp_path, ("missing",))


def test_explicit_weights_path_is_relative_to_the_model_folder(tmp_path):
    path = _write(tmp_path, "yolov8n", weights={"file": "yolov8n.pt", "path": "weights/best.pt", "verify": "warn"})
    assert load_config(path).weights.path == tmp_path / "yolov8n" / "weights" / "best.pt"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "pose"}, "task 'pose'"),
        ({"backend": None}, "'backend' must be a non-empty string"),
        ({"weights": "yolov8n.pt"}, "'weights' must be a mapping"),
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": [{"name": "images", "dtype": "uint7", "shape": [3]}]}, "dtype 'uint7'"),
        ({"preprocess": {"params": {}}}, "preprocess: expected a mapping with a 'name'"),
        ({"max_batch_size": 0}, "'max_batch_size' must be a positive integer"),
        ({"dynamic_batching": {"max_queue_delay_ms": -1}}, "'max_queue_delay_ms' must be a number >= 0"),
        ({"dynamic_batching": {"max_queue_size": 0}}, "'max_queue_size' must be a positive integer"),
        ({"dynamic_batching": {"preferred_batch_sizes": [0]}}, "'preferred_batch_sizes' must be a list of positive"),
        ({"instance_count": 0}, "'instance_count' must be a positive integer"),
        ({"precision": "fp8"}, "precision 'fp8' is not one of fp32, fp16, bf16"),
        ({"weights": {"file": "best.pt"}},
         "no official sha256 to check the file against, so 'verify' must say what to trust"),
        ({"weights": {"file": "best.pt", "verify": "official"}}, "verify: official needs the release's 'sha256'"),
        ({"weights": {"file": "best.pt", "verify": "trust-me"}},
         "verify 'trust-me' is not one of official, sha256:<64 hex digits>, warn"),
        ({"weights": {"file": "best.pt", "verify": "sha256:abc"}}, "'sha256:abc' is not a sha256 pin"),
    ],
)
def test_invalid_configs_name_the_file_and_field(tmp_path, changes, message):
    path = _write(tmp_path, "yolov8n", **changes)
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(path)
    assert str(path) in str(raised.value)


def test_name_must_match_its_folder(tmp_path):
    path = _write(tmp_path, "renamed", name="yolov8n")
    with pytest.raises(ConfigError, match="must equal its folder"):
        load_config(path)


def test_empty_or_missing_repository_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no"):
        load_repository(tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        load_repository(tmp_path / "nope")


def test_dynamic_batching_is_declared_in_config(tmp_path):
    path = _write(tmp_path, "yolov8n",
                  dynamic_batching={"max_queue_delay_ms": 5, "max_queue_size": 64, "preferred_batch_sizes": [4, 8]})
    config = load_config(path)
    assert (config.max_queue_delay_ms, config.max_queue_size, config.preferred_batch_sizes) == (5.0, 64, (4, 8))


def test_instances_and_precision_are_declared_in_config(tmp_path):
    config = load_config(_write(tmp_path, "yolov8n", instance_count=2, precision="bf16"))
    assert (config.instance_count, config.precision) == (2, "bf16")
    default = load_config(_write(tmp_path, "undeclared", instance_count=None))
    assert (default.instance_count, default.precision) == (1, "fp32")
    # The built-in yolov8n declares the fast CPU layout (issue 17): two instances, ONNX Runtime.
    builtin = load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml")
    assert (builtin.instance_count, builtin.backend, builtin.precision) == (2, "onnxruntime", "fp32")


def test_weights_policy_is_official_by_default_where_the_config_names_a_release():
    for name, config in load_repository(BUILTIN_REPOSITORY).items():
        assert config.weights.sha256 and str(config.weights.verify) == "official", name


def test_a_custom_file_pins_its_digest_or_says_warn(tmp_path):
    pin = "AB" * 32
    pinned = load_config(_write(tmp_path, "pinned", weights={"file": "best.pt", "verify": f"sha256:{pin}"}))
    assert (pinned.weights.verify.mode, pinned.weights.verify.pin) == ("sha256", pin.lower())
    assert str(load_config(_write(tmp_path, "loose",
                                  weights={"file": "best.pt", "verify": "warn"})).weights.verify) == "warn"
