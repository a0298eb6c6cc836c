"""A served model's description, as the controller plans with it: ``ModelInfo``.

The inference stage describes each model it serves with one ``ModelInfo`` (built from its loaded
model, services/inference/service.py) and sends it as Triton's ``ModelConfig``; the controller
reads it back from any Open Inference Protocol server's ``ModelConfig`` and shows it to its own
callers as ``inferline.v1.ModelMetadataResponse``. Each conversion lives here, once:

- ``ModelInfo.to_config()`` / ``ModelInfo.from_config()``: Triton's ``ModelConfig``. What OIP has
  no field for (task, recipes, labels, candidate filter, weights provenance, precision) travels
  in ``ModelConfig.parameters`` as strings, JSON where structured (``PARAMETER_KEYS``), as a
  Triton user would write them in ``config.pbtxt``. A ragged output (a ``-1`` in its declared
  shape, on a batched model) is declared beside its ``<name>__shape`` output (common/oip.py).
- ``ModelInfo.to_metadata()``: the controller's public ``inferline.v1.ModelMetadataResponse``.

Shapes are per item, as a model repository declares them: without the batch dimension, which a
model with ``max_batch_size`` > 0 adds in front of every tensor (Triton's convention).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from inferline.common import oip, tensors
from inferline.common.errors import StageFailed, quoted
from inferline.common.generated import inference_pb2, model_config_pb2
from inferline.common.recipes import Recipe

# ModelConfig.parameters keys, each a string (JSON where the value is structured).
PARAMETER_KEYS = (
    "task", "preprocess", "postprocess", "labels", "candidate_filter",
    "weights_file", "weights_sha256", "weights_official", "precision",
)
# The parameters a controller cannot plan without; the others have a neutral default.
_REQUIRED = ("task", "preprocess", "postprocess")


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: its name, dtype as a model config names it ("float32", "uint8"),
    and per-item shape (-1 for a dimension that varies per item, e.g. image height)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def ragged(self) -> bool:
        """Items of one batch may differ in this tensor's shape."""
        return -1 in self.shape


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights come from: the file's name (never the server's folder), its
    SHA-256, and whether it is byte for byte the official release."""

    file: str = ""
    sha256: str = ""
    official: bool = False


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    # The backend that runs it, e.g. "torch" (OIP's "platform", Triton's "backend").
    platform: str
    # "detect", "classify", "embed", ... (common/tasks.py)
    task: str
    # Most items one ModelInfer may carry; 0: the model takes no batch dimension.
    max_batch_size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    preprocess: Recipe
    postprocess: Recipe
    # Which candidates the stage may drop for a ``min_score`` (services/inference/filters.py).
    candidate_filter: Recipe | None = None
    # Class names, index = class id.
    labels: tuple[str, ...] = ()
    weights: WeightsInfo = field(default_factory=WeightsInfo)
    precision: str = "fp32"

    @property
    def ragged_outputs(self) -> frozenset[str]:
        """The outputs that travel padded beside ``<name>__shape`` in a batch (common/oip.py)."""
        if self.max_batch_size == 0:
            return frozenset()
        return frozenset(o.name for o in self.outputs if o.ragged)

    @property
    def served_outputs(self) -> tuple[TensorInfo, ...]:
        """Every output a ModelInfer answers: the model's, and each ragged one's ``__shape``
        (INT64, one entry per dimension of the item)."""
        ragged = self.ragged_outputs
        shapes = tuple(
            TensorInfo(oip.shape_output(o.name), "int64", (len(o.shape),)) for o in self.outputs if o.name in ragged
        )
        return self.outputs + shapes

    # ---- Triton's ModelConfig --------------------------------------------------------------

    def to_config(self) -> model_config_pb2.ModelConfig:
        """Triton's ModelConfig, with what OIP has no field for in ``parameters``."""
        strings = {
            "task": self.task,
            "preprocess": _recipe_json(self.preprocess),
            "postprocess": _recipe_json(self.postprocess),
            "labels": json.dumps(list(self.labels)),
            "weights_file": self.weights.file,
            "weights_sha256": self.weights.sha256,
            "weights_official": json.dumps(bool(self.weights.official)),
            "precision": self.precision,
        }
        if self.candidate_filter is not None:
            strings["candidate_filter"] = _recipe_json(self.candidate_filter)
        return model_config_pb2.ModelConfig(
            name=self.name,
            backend=self.platform,
            max_batch_size=self.max_batch_size,
            input=[
                model_config_pb2.ModelInput(name=t.name, data_type=_data_type(t.dtype), dims=t.shape)
                for t in self.inputs
            ],
            output=[
                model_config_pb2.ModelOutput(name=t.name, data_type=_data_type(t.dtype), dims=t.shape)
                for t in self.served_outputs
            ],
            parameters={key: model_config_pb2.ModelParameter(string_value=value) for key, value in strings.items()},
        )

    @classmethod
    def from_config(cls, config: model_config_pb2.ModelConfig, version: str = "") -> ModelInfo:
        """The model a ModelConfig describes; ``version`` is the one served (ModelConfig has no
        version field). StageFailed when the server's config lacks what a controller plans with:
        the server is not (configured as) an inferline inference stage."""
        params = {key: value.string_value for key, value in config.parameters.items()}
        missing = [key for key in _REQUIRED if not params.get(key)]
        if missing:
            raise StageFailed(
                f"model {quoted(config.name)}: the inference stage's ModelConfig has no parameters "
                f"{', '.join(missing)}; an inference stage describes task and recipes there"
            )
        where = f"model {config.name!r}"
        ragged_shapes = {oip.shape_output(o.name) for o in config.output if -1 in o.dims}
        return cls(
            name=config.name,
            version=version,
            platform=config.backend or config.platform,
            task=params["task"],
            max_batch_size=config.max_batch_size,
            inputs=tuple(_tensor(t) for t in config.input),
            # The ``__shape`` outputs describe a batch, not the model: ``served_outputs`` adds them back.
            outputs=tuple(
                _tensor(t) for t in config.output if not (config.max_batch_size and t.name in ragged_shapes)
            ),
            preprocess=_recipe(params["preprocess"], f"{where} preprocess"),
            postprocess=_recipe(params["postprocess"], f"{where} postprocess"),
            candidate_filter=(
                _recipe(params["candidate_filter"], f"{where} candidate_filter")
                if params.get("candidate_filter")
                else None
            ),
            labels=tuple(_json(params.get("labels") or "[]", f"{where} labels")),
            weights=WeightsInfo(
                file=params.get("weights_file", ""),
                sha256=params.get("weights_sha256", ""),
                official=bool(_json(params.get("weights_official") or "false", f"{where} weights_official")),
            ),
            precision=params.get("precision") or "fp32",
        )

    # ---- the controller's public API --------------------------------------------------------

    def to_metadata(self) -> inference_pb2.ModelMetadataResponse:
        """The controller's ``inferline.v1.ModelMetadataResponse`` (ListModels, ModelInfo)."""

        def specs(items: tuple[TensorInfo, ...]) -> list[inference_pb2.TensorMetadata]:
            return [
                inference_pb2.TensorMetadata(name=t.name, datatype=tensors.DTYPE_NAMES[t.dtype], shape=t.shape)
                for t in items
            ]

        return inference_pb2.ModelMetadataResponse(
            name=self.name,
            versions=[self.version],
            platform=self.platform,
            task=self.task,
            inputs=specs(self.inputs),
            outputs=specs(self.outputs),
            preprocess=self.preprocess.to_proto(),
            postprocess=self.postprocess.to_proto(),
            labels=self.labels,
            weights=inference_pb2.WeightsInfo(
                path=self.weights.file, sha256=self.weights.sha256, official=self.weights.official
            ),
            max_batch_size=self.max_batch_size,
        )


def _data_type(dtype: str) -> str:
    return f"TYPE_{oip.FROM_CONFIG[dtype]}"  # Triton's DataType enum, by name


def _tensor(message: model_config_pb2.ModelInput | model_config_pb2.ModelOutput) -> TensorInfo:
    name = model_config_pb2.DataType.Name(message.data_type).removeprefix("TYPE_")
    dtype = oip.TO_CONFIG.get(name)
    if dtype is None:
        raise StageFailed(f"tensor {quoted(message.name)} has datatype {name}, which no inferline model uses")
    return TensorInfo(message.name, dtype, tuple(message.dims))


def _recipe_json(recipe: Recipe) -> str:
    return json.dumps({"name": recipe.name, "params": dict(recipe.params)}, sort_keys=True)


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise StageFailed(f"{where}: the inference stage sent {text[:80]!r}, which is not JSON") from None


def _recipe(text: str, where: str) -> Recipe:
    raw = _json(text, where)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not isinstance(
        raw.get("params", {}), Mapping
    ):
        raise StageFailed(f"{where}: expected {{name, params}}, the inference stage sent {text[:80]!r}")
    return Recipe(raw["name"], dict(raw.get("params") or {}))
