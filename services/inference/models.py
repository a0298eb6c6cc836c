"""Loaded models and how items run through one.

Heavy objects (weights, modules) are built once at load, never per request. Each model runs
its forward passes on its own worker threads, one per instance (``instance_count``, default 1),
fed by its dynamic batcher: one pass per instance keeps intra-op threads from fighting each
other, and keeps the event loop free while the model runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inferline.common.errors import InvalidInput, ModelNotFound, ModelNotReady, quoted
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.common.telemetry.metrics import MODEL_LOAD_SECONDS
from inferline.common.tensors import numpy_dtype
from inferline.services.inference.backends import Backend, load_backend
from inferline.services.inference.batching import BatchingConfig, DynamicBatcher
from inferline.services.inference.repository import BUILTIN_REPOSITORY, ModelConfig, TensorSpec, load_repository
from inferline.services.inference.weights import ResolvedWeights, resolve_weights

log = logging.getLogger(__name__)

Item = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]


@dataclass
class LoadedModel:
    config: ModelConfig
    backend: Backend
    weights: ResolvedWeights
    load_seconds: float
    executor: ThreadPoolExecutor = field(init=False)
    batcher: DynamicBatcher = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.executor = ThreadPoolExecutor(config.instance_count, thread_name_prefix=f"model-{config.name}")
        self.batcher = DynamicBatcher(
            config.name,
            self.run_batch,
            self.executor,
            BatchingConfig(
                max_batch_size=config.max_batch_size,
                max_queue_delay_s=config.max_queue_delay_ms / 1000,
                max_queue_size=config.max_queue_size,
                preferred_batch_sizes=config.preferred_batch_sizes,
                instances=config.instance_count,
            ),
        )

    def run_batch(self, items: list[Item]) -> list[Outputs]:
        """Items of one shape, stacked into one forward pass (on the model's thread)."""
        batch = {spec.name: np.stack([item[spec.name] for item in items]) for spec in self.config.inputs}
        return self.backend.run(batch)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.labels or self.backend.labels

    @property
    def postprocess(self) -> Recipe:
        """The config's recipe, with what the weights fix (CLIP's logit scale) filled in."""
        recipe = self.config.postprocess
        return Recipe(recipe.name, {**recipe.params, **self.backend.recipe_params()})


class ModelManager:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root: Path = settings.model_repository or BUILTIN_REPOSITORY
        self.configs = load_repository(self.root, settings.models)
        self._models: dict[str, LoadedModel] = {}

    @property
    def ready(self) -> bool:
        return len(self._models) == len(self.configs)

    def load_all(self) -> None:
        for name, config in self.configs.items():
            started = time.perf_counter()
            weights = resolve_weights(
                config.weights,
                model=name,
                model_dir=self.settings.model_dir,
                allow_download=self.settings.allow_download,
                trusted=self.settings.trusted_weights,
            )
            backend = load_backend(config, weights, self.settings)
            elapsed = time.perf_counter() - started
            MODEL_LOAD_SECONDS.labels(name).set(elapsed)
            self._models[name] = LoadedModel(config, backend, weights, elapsed)
            log.info(
                "loaded %s v%s (%s/%s) from %s in %.2f s%s",
                name, config.version, config.backend, config.loader, weights.path, elapsed,
                "" if weights.official else " [NOT the official release weights]",
            )

    def get(self, name: str, version: str = "") -> LoadedModel:
        config = self.configs.get(name)
        if config is None or (version and version != config.version):
            known = ", ".join(sorted(self.configs)) or "none"
            wanted = quoted(name) + (f" version {quoted(version)}" if version else "")
            raise ModelNotFound(f"model {wanted} is not served here (models: {known})")
        model = self._models.get(name)
        if model is None:
            raise ModelNotReady(f"model {quoted(name)} is still loading")
        return model

    def all(self) -> list[LoadedModel]:
        return [self._models[name] for name in self.configs if name in self._models]

    async def infer(
        self, name: str, version: str, items: Sequence[Item | Exception], timeout: float | None = None
    ) -> list[Outputs | Exception]:
        """Runs every valid item through the model's dynamic batcher, with the caller's deadline.

        Items of one input shape batch together, also with other requests' items.
        """
        model = self.get(name, version)
        results: dict[int, Outputs | Exception] = {}
        valid: dict[int, Item] = {}
        for index, item in enumerate(items):
            if isinstance(item, Exception):
                results[index] = item
                continue
            try:
                _check_inputs(item, model.config.inputs)
            except InvalidInput as exc:
                results[index] = exc
                continue
            valid[index] = item
        if valid:
            keyed = [(tuple((k, item[k].shape) for k in sorted(item)), item) for item in valid.values()]
            results.update(zip(valid, await model.batcher.submit(keyed, timeout), strict=True))
        return [results[index] for index in range(len(items))]

    async def aclose(self) -> None:
        for model in self._models.values():
            await model.batcher.close()

    def close(self) -> None:
        for model in self._models.values():
            model.executor.shutdown(wait=True)
            model.backend.close()
        self._models.clear()


def _check_inputs(item: Item, specs: Sequence[TensorSpec]) -> None:
    expected = {spec.name for spec in specs}
    if set(item) != expected:
        raise InvalidInput(f"inputs {sorted(item)} do not match the model's inputs {sorted(expected)}")
    for spec in specs:
        array = item[spec.name]
        dtype = numpy_dtype(spec.dtype)
        if array.dtype != dtype:
            raise InvalidInput(f"input {spec.name!r} must be {spec.dtype}, got {array.dtype}")
        if len(array.shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
        ):
            raise InvalidInput(f"input {spec.name!r} has shape {array.shape}, the model takes {spec.shape} (-1: any)")
        if 0 in array.shape:
            raise InvalidInput(f"input {spec.name!r} is empty (shape {array.shape})")
