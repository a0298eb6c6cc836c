"""The model repository: one folder per model, one ``config.yaml`` in each.

As in Triton, the repository is the unit of deployment: adding a model of a known family is
adding a folder with a config file, and the config is validated here, at load, with messages
that name the file and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from inferline.common.errors import ConfigError
from inferline.common.recipes import Recipe
from inferline.common.tasks import TASKS
from inferline.common.tensors import DTYPE_NAMES
from inferline.services.inference.filters import FILTERS

BUILTIN_REPOSITORY = Path(__file__).resolve().parent / "model_repository"
CONFIG_FILE = "config.yaml"
# Compute precision of the torch backend: fp16 (CUDA) and bf16 (CUDA or CPU) run the forward pass
# under torch.autocast; inputs and outputs on the wire stay as declared (outputs float32).
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


SHA256_HEX = frozenset("0123456789abcdef")


def parse_sha256(text: str, where: str) -> str:
    """A full sha256 pin, written ``sha256:<64 hex digits>``, as lower-case hex."""
    prefix, _, digest = text.strip().partition(":")
    digest = digest.lower()
    if prefix != "sha256" or len(digest) != 64 or not set(digest) <= SHA256_HEX:
        raise ConfigError(f"{where}: {text!r} is not a sha256 pin; write sha256:<64 hex digits>")
    return digest


@dataclass(frozen=True)
class Verify:
    """What a weights file must be before it is loaded (a pickle runs code when it is loaded).

    ``official``: the release checksum in ``weights.sha256``; ``sha256:<hex>``: exactly this
    file (a custom model pins what it trusts); ``warn``: any file, with a warning at load.
    """

    mode: str = "official"
    pin: str | None = None

    @classmethod
    def parse(cls, text: str, where: str) -> Verify:
        if text in ("official", "warn"):
            return cls(text)
        if text.startswith("sha256:"):
            return cls("sha256", parse_sha256(text, where))
        raise ConfigError(f"{where}: verify {text!r} is not one of official, sha256:<64 hex digits>, warn")

    def __str__(self) -> str:
        return f"sha256:{self.pin}" if self.mode == "sha256" else self.mode


@dataclass(frozen=True)
class WeightsSpec:
    file: str
    # Official release checksum (a prefix, as torchvision's file names carry, is enough).
    sha256: str | None = None
    # Where the official file comes from when it is not on disk ("ultralytics", ...).
    source: str | None = None
    # An explicit location, absolute or relative to the model's folder; wins over the rest.
    path: Path | None = None
    # The integrity policy: strict (``official``) unless the config says what else it trusts.
    verify: Verify = Verify()


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str
    task: str
    backend: str
    loader: str
    weights: WeightsSpec
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocess: Recipe
    postprocess: Recipe
    # What the inference stage may drop from the outputs before they leave it, at the request's
    # min_score (services/inference/filters.py); None sends everything.
    candidate_filter: Recipe | None = None
    max_batch_size: int = 32
    labels: tuple[str, ...] = ()
    # Loader-specific settings (an architecture name, a class count, ...).
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # Triton's dynamic_batching: how long the first queued item waits for company, how many
    # items may wait, and batch sizes worth running at once.
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1024
    preferred_batch_sizes: tuple[int, ...] = ()
    # Triton's instance_group count: forward passes of this model that may run at once, each on
    # its own thread (on CPU, two single-threaded instances keep two cores busier than one
    # two-threaded pass of a small model).
    instance_count: int = 1
    precision: str = "fp32"
    folder: Path = field(default=Path("."), compare=False)


def load_repository(root: Path, only: tuple[str, ...] = ()) -> dict[str, ModelConfig]:
    """Every model config under ``root`` (or just those named in ``only``), by model name."""
    if not root.is_dir():
        raise ConfigError(f"model repository {root} is not a directory")
    configs: dict[str, ModelConfig] = {}
    for config_path in sorted(root.glob(f"*/{CONFIG_FILE}")):
        config = load_config(config_path)
        if config.name in configs:
            raise ConfigError(f"{config_path}: model name {config.name!r} is used twice")
        configs[config.name] = config
    missing = [name for name in only if name not in configs]
    if missing:
        known = ", ".join(sorted(configs)) or "none"
        raise ConfigError(f"models {missing} are not in repository {root} (it has: {known})")
    if only:
        configs = {name: configs[name] for name in only}
    if not configs:
        raise ConfigError(f"model repository {root} holds no */{CONFIG_FILE}")
    return configs


def load_config(path: Path) -> ModelConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read model config: {exc}") from None
    return parse_config(raw, path)


def parse_config(raw: Any, path: Path) -> ModelConfig:
    """A model config from its fields as ``config.yaml`` holds them (or their JSON form, as a
    RepositoryModelLoad's ``config`` parameter carries them); ``path`` is the config file it
    stands for: errors name it, and relative weights paths resolve beside it."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    reader = _Reader(raw, str(path))
    task = reader.text("task")
    # Only a registered task has a path through the controller (common/tasks.py).
    if task not in TASKS:
        raise ConfigError(f"{path}: task {task!r} is not one of {', '.join(TASKS)}")
    weights = reader.mapping("weights")
    weights_reader = _Reader(weights, f"{path}: weights")
    explicit = weights_reader.optional_text("path")
    official_sha256 = weights_reader.optional_text("sha256")
    verify = _verify(weights_reader.optional_text("verify"), official_sha256, f"{path}: weights")
    config = ModelConfig(
        name=reader.text("name"),
        version=str(raw.get("version", "1")),
        task=task,
        backend=reader.text("backend"),
        loader=reader.text("loader"),
        weights=WeightsSpec(
            file=weights_reader.text("file"),
            sha256=official_sha256,
            source=weights_reader.optional_text("source"),
            path=(path.parent / explicit) if explicit else None,
            verify=verify,
        ),
        inputs=reader.tensors("inputs"),
        outputs=reader.tensors("outputs"),
        preprocess=Recipe.from_config(raw.get("preprocess"), f"{path}: preprocess"),
        postprocess=Recipe.from_config(raw.get("postprocess"), f"{path}: postprocess"),
        candidate_filter=_candidate_filter(raw.get("candidate_filter"), f"{path}: candidate_filter"),
        max_batch_size=reader.positive_int("max_batch_size", 32),
        instance_count=reader.positive_int("instance_count", 1),
        precision=str(raw.get("precision", "fp32")),
        labels=tuple(str(label) for label in raw.get("labels") or ()),
        parameters=dict(raw.get("parameters") or {}),
        **_dynamic_batching(raw.get("dynamic_batching"), f"{path}: dynamic_batching"),
        folder=path.parent,
    )
    if config.precision not in PRECISIONS:
        raise ConfigError(f"{path}: precision {config.precision!r} is not one of {', '.join(PRECISIONS)}")
    if config.name != path.parent.name:
        raise ConfigError(f"{path}: name {config.name!r} must equal its folder's name")
    return config


def _candidate_filter(raw: Any, where: str) -> Recipe | None:
    """A filter's name is checked at load: a misspelt one would otherwise send every candidate."""
    if raw is None:
        return None
    recipe = Recipe.from_config(raw, where)
    if recipe.name not in FILTERS:
        raise ConfigError(f"{where}: {recipe.name!r} is not one of {', '.join(sorted(FILTERS))}")
    return recipe


def _verify(raw: str | None, official_sha256: str | None, where: str) -> Verify:
    """Strict by default where the config names an official release; a file with no official
    checksum (a custom model, an export) must say what it trusts, so nothing is trusted by omission."""
    if raw is None:
        if official_sha256 is None:
            raise ConfigError(
                f"{where}: no official sha256 to check the file against, so 'verify' must say what to trust: "
                "sha256:<64 hex digits> (this exact file) or warn (any file, with a warning)"
            )
        return Verify()
    verify = Verify.parse(raw, where)
    if verify.mode == "official" and official_sha256 is None:
        raise ConfigError(f"{where}: verify: official needs the release's 'sha256' in the config")
    return verify


def _dynamic_batching(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    delay = raw.get("max_queue_delay_ms", 0.0)
    if not isinstance(delay, (int, float)) or delay < 0:
        raise ConfigError(f"{where}: 'max_queue_delay_ms' must be a number >= 0")
    reader = _Reader(raw, where)
    preferred = raw.get("preferred_batch_sizes") or []
    if not isinstance(preferred, list) or not all(isinstance(n, int) and n > 0 for n in preferred):
        raise ConfigError(f"{where}: 'preferred_batch_sizes' must be a list of positive integers")
    return {
        "max_queue_delay_ms": float(delay),
        "max_queue_size": reader.positive_int("max_queue_size", 1024),
        "preferred_batch_sizes": tuple(preferred),
    }


class _Reader:
    """Typed access to one YAML mapping, with errors that say where."""

    def __init__(self, raw: Mapping[str, Any], where: str):
        self.raw = raw
        self.where = where

    def text(self, key: str) -> str:
        value = self.raw.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.where}: '{key}' must be a non-empty string")
        return value

    def optional_text(self, key: str) -> str | None:
        return self.text(key) if self.raw.get(key) is not None else None

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.raw.get(key)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.where}: '{key}' must be a mapping")
        return value

    def positive_int(self, key: str, default: int) -> int:
        value = self.raw.get(key, default)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{self.where}: '{key}' must be a positive integer")
        return value

    def tensors(self, key: str) -> tuple[TensorSpec, ...]:
        value = self.raw.get(key)
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{self.where}: '{key}' must be a non-empty list")
        specs = []
        for i, item in enumerate(value):
            item_reader = _Reader(item if isinstance(item, Mapping) else {}, f"{self.where}: {key}[{i}]")
            dtype = item_reader.text("dtype")
            if dtype not in DTYPE_NAMES:
                raise ConfigError(f"{item_reader.where}: dtype {dtype!r} is not one of {sorted(DTYPE_NAMES)}")
            shape = item.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
                raise ConfigError(f"{item_reader.where}: 'shape' must be a list of integers")
            specs.append(TensorSpec(item_reader.text("name"), dtype, tuple(shape)))
        return tuple(specs)
