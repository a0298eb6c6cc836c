"""Backends run a model's forward pass; they are registered by name (``backend:`` in config).

A backend sees batch-first arrays whose items already share one shape; grouping, validation
and per-item errors are the model runner's job, so a new backend (ONNX Runtime, say) only has
to load weights and run a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from inferline.common.plugins import import_family_modules
from inferline.common.registry import Registry
from inferline.common.settings import Settings
from inferline.services.inference.repository import ModelConfig
from inferline.services.inference.weights import ResolvedWeights


class Backend(Protocol):
    # Class names the weights carry, index = class id; empty when they carry none.
    labels: tuple[str, ...]

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """One forward pass over a batch (inputs batch-first); one dict of outputs per item,
        since some models (detectors) give each item a different number of rows."""
        ...

    def recipe_params(self) -> dict[str, float]:
        """Values the weights fix that a later stage needs (CLIP's logit scale, say); they are
        merged into the model's postprocess recipe."""
        ...

    def close(self) -> None: ...


BackendFactory = Callable[[ModelConfig, ResolvedWeights, Settings], Backend]
BACKENDS: Registry[BackendFactory] = Registry("backend")


def load_backend(config: ModelConfig, weights: ResolvedWeights, settings: Settings) -> Backend:
    # Importing here registers the built-in backends without making torch a hard import of
    # this module (an ONNX-only image has no torch).
    if config.backend == "torch":
        import_family_modules(__name__, __file__, "_loader")
    elif config.backend == "onnxruntime":
        from inferline.services.inference.backends import onnxruntime_backend  # noqa: F401, PLC0415 - registers "onnxruntime" (an optional extra)
    return BACKENDS.get(config.backend)(config, weights, settings)
