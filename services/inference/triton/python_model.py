"""The Python backend model (``TritonPythonModel``) that serves an inferline model from Triton.

Runs inside Triton's Python backend stub, and nowhere else: ``triton_python_backend_utils``
exists only there. It loads the model as our inference stage does (ModelManager: the model
repository, INFERLINE_MODEL_DIR, sha256-verified weights, INFERLINE_TRUSTED_WEIGHTS) and runs a
request's batch as our stage runs one (``split_batch`` checks, one forward pass, the candidate
filter for ``min_score``), so its outputs are our stage's, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from inferline.common import oip
from inferline.common.errors import InferlineError, InvalidInput
from inferline.common.settings import Settings
from inferline.services.inference.filters import candidate_filter
from inferline.services.inference.models import ModelManager
from inferline.services.inference.oip_servicer import MIN_SCORE, model_config, split_batch
from inferline.services.inference.service import model_info
from inferline.services.inference.triton import ragged_outputs


def _pb_utils() -> Any:
    import triton_python_backend_utils  # type: ignore[import-not-found]  # noqa: PLC0415 - only inside the stub

    return triton_python_backend_utils


def parse_min_score(parameters: str) -> float:
    """The request's ``min_score`` (a number, or a string of one), from the parameters' JSON."""
    value = json.loads(parameters or "{}").get(MIN_SCORE, 0.0)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"parameter {MIN_SCORE!r} must be a number within [0, 1], got {value!r}") from None
    if not 0.0 <= score <= 1.0:
        raise InvalidInput(f"min_score must be within [0, 1], got {score}")
    return score


def _tensor(pb_utils: Any, name: str, array: np.ndarray) -> Any:
    """An output tensor. Through DLPack, not ``Tensor(name, array)``: the stub (built against
    numpy 1) sends numpy 2's arrays empty (byte size 0). An empty array is sent as one (DLPack
    gives it zero strides, which the stub refuses as not contiguous)."""
    if array.size == 0:
        return pb_utils.Tensor(name, array)
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        name = args["model_name"]
        declared = json.loads(args["model_config"])
        settings = dataclasses.replace(Settings.from_env(), models=(name,))
        self.manager = ModelManager(settings)
        self.manager.load_all()
        self.model = self.manager.get(name)
        # config.pbtxt pins the weights (sha256) and recipes it was written for: serving other
        # ones under its name would answer with another model's numbers.
        served = {k: v.string_value for k, v in model_config(self.model).parameters.items()}
        pinned = {k: v["string_value"] for k, v in declared.get("parameters", {}).items()}
        differ = sorted(k for k in served.keys() | pinned.keys() if served.get(k) != pinned.get(k))
        if differ:
            raise RuntimeError(
                f"model {name!r} as loaded here differs from its config.pbtxt in {', '.join(differ)}: "
                "rewrite the repository with `inferline triton-repository` against these weights"
            )
        self.ragged = ragged_outputs(self.model)
        self.info = model_info(self.model)
        self.filter = candidate_filter(self.model.config.candidate_filter)

    def execute(self, requests: list[Any]) -> list[Any]:
        pb_utils = _pb_utils()
        responses = []
        for request in requests:
            try:
                outputs = self._run(request, pb_utils)
            except (InferlineError, ValueError) as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            tensors = [_tensor(pb_utils, name, array) for name, array in outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def _run(self, request: Any, pb_utils: Any) -> dict[str, np.ndarray]:
        min_score = parse_min_score(request.parameters())
        inputs = {}
        for spec in self.model.config.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise InvalidInput(f"missing input {spec.name!r}")
            # Through DLPack, not as_numpy(), which reads numpy 2 arrays with numpy 1's ABI
            # (a uint8 input comes out zeros). A copy: the buffer is the request's.
            inputs[spec.name] = np.array(np.from_dlpack(tensor))
        items: list[Mapping[str, np.ndarray]] = list(split_batch(self.info, inputs))
        results = self.model.run_batch(items)
        if min_score > 0 and self.filter is not None:
            results = [self.filter(r, min_score) for r in results]
        return oip.stack_items(results, self.ragged)

    def finalize(self) -> None:
        self.manager.close()
