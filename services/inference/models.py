"""Loaded models, how items run through one, and model control (load, unload, reload, poll).

Heavy objects (weights, modules) are built once at load, never per request. Each model runs
its forward passes on its own worker threads, one per instance (``instance_count``, default 1),
fed by its dynamic batcher: one pass per instance keeps intra-op threads from fighting each
other, and keeps the event loop free while the model runs. torch on the CPU is the exception:
every such model's passes share one thread, and loads run on threads that end
(``cpu_threads.py``: OpenMP's teams are per thread).

Model control follows Triton's (docs/model-control.md): ``none`` loads the repository at start,
``explicit`` loads and unloads on request, ``poll`` follows the repository folder. A model that
fails to load is UNAVAILABLE with its reason while the others serve. A reload builds the new
version beside the old one, which serves until the swap; an unload (or the old version after a
swap) stops taking requests, then finishes those it holds before it is closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inferline.common.cuda_regions import stack_on_device
from inferline.common.errors import ConfigError, InferlineError, InvalidInput, ModelNotFound, ModelNotReady, quoted
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.common.telemetry.metrics import (
    INTRA_OP_THREADS,
    MODEL_BUSY_RATIO,
    MODEL_BUSY_SECONDS,
    MODEL_INSTANCES_BUSY,
    MODEL_LOAD_SECONDS,
    QUEUE_CAPACITY,
    QUEUE_DEPTH,
)
from inferline.common.tensors import numpy_dtype
from inferline.services.inference.backends import Backend, load_backend
from inferline.services.inference.batching import BatchingConfig, DynamicBatcher
from inferline.services.inference.cpu_threads import on_passing_thread, shared_cpu_executor, starts_openmp_team
from inferline.services.inference.filters import Shrink
from inferline.services.inference.repository import (
    BUILTIN_REPOSITORY,
    CONFIG_FILE,
    ModelConfig,
    TensorSpec,
    load_config,
    load_repository,
    parse_config,
)
from inferline.services.inference.statistics import ModelStats
from inferline.services.inference.weights import ResolvedWeights, resolve_weights

log = logging.getLogger(__name__)

Item = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]


class Filtered(dict):
    """An item's inputs and the candidate filter its outputs go through (its request's
    ``min_score`` bound): what carries a request's filter through the batcher into the pass,
    where items of several requests share one batch."""

    def __init__(self, inputs: Item, shrink: Shrink):
        super().__init__(inputs)
        self.shrink = shrink


MODES = ("none", "explicit", "poll")
# Model states in RepositoryIndex, Triton's words.
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


def batch_limit(max_batch_size: int, useful: int | None) -> int:
    """The most items one pass takes: the config's ``max_batch_size``, lowered to what the
    backend says is useful (ONNX Runtime's ``cpu_max_batch_size``: on a CPU a bigger batch costs
    more per item). A model without batching (0) keeps its one item a pass."""
    if useful is None or useful <= 0 or max_batch_size <= 0:
        return max_batch_size
    return min(max_batch_size, useful)


def runs_on_gpu(backend: Backend) -> bool:
    """Whether the backend's passes run on a GPU: ONNX Runtime's CUDA provider, or a torch model
    on a CUDA device (the passes' wall time is then the requests' GPU time)."""
    if getattr(backend, "on_cuda", False):
        return True
    device = getattr(backend, "device", None)
    return getattr(device, "type", None) == "cuda"


@dataclass
class LoadedModel:
    config: ModelConfig
    backend: Backend
    weights: ResolvedWeights
    load_seconds: float
    busy_window_s: float = 10.0
    shares_thread: bool = field(init=False)
    executor: ThreadPoolExecutor = field(init=False)
    batcher: DynamicBatcher = field(init=False)
    stats: ModelStats = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.stats = ModelStats()
        # torch on the CPU: every model's passes on the process's one torch thread (one OpenMP
        # team; cpu_threads.py says why), so one pass at a time, whatever instance_count says.
        self.shares_thread = starts_openmp_team(self.backend)
        instances = config.instance_count
        if self.shares_thread:
            if instances > 1:
                log.warning("%s: instance_count %d runs as 1: torch on the CPU runs one pass at a time with "
                            "its %d intra-op threads; for parallel instances set INFERLINE_TORCH_THREADS=1",
                            config.name, instances, self.backend.cpu_threads)  # type: ignore[attr-defined]
            instances = 1
            self.executor = shared_cpu_executor()
        else:
            self.executor = ThreadPoolExecutor(instances, thread_name_prefix=f"model-{config.name}")
        self.batcher = DynamicBatcher(
            config.name,
            self.run_batch,
            self.executor,
            BatchingConfig(
                max_batch_size=batch_limit(config.max_batch_size, getattr(self.backend, "max_useful_batch", None)),
                max_queue_delay_s=config.max_queue_delay_ms / 1000,
                max_queue_size=config.max_queue_size,
                preferred_batch_sizes=config.preferred_batch_sizes,
                instances=instances,
                busy_window_s=self.busy_window_s,
            ),
            self.stats,
            run_alone=self.run_batch_alone if getattr(self.backend, "alone_threads", 0) > 0 else None,
            on_gpu=runs_on_gpu(self.backend),
        )

    def run_batch(self, items: list[Item]) -> list[Outputs]:
        """Items of one shape, stacked into one forward pass (on the model's thread)."""
        return self._pass(items, self.backend.run)

    def run_batch_alone(self, items: list[Item]) -> list[Outputs]:
        """As ``run_batch``, for a pass with no other beside it: a backend with ``run_alone``
        (ONNX Runtime) gives it every core, where parallel passes get one thread each."""
        return self._pass(items, self.backend.run_alone)  # type: ignore[attr-defined]  # only given when it has one

    def _pass(self, items: list[Item], forward: Callable[..., list[Outputs]]) -> list[Outputs]:
        started = time.perf_counter()
        batch = {spec.name: self._stack([item[spec.name] for item in items]) for spec in self.config.inputs}
        stacked = time.perf_counter()
        shrinks = [getattr(item, "shrink", None) for item in items]
        if not any(shrinks):
            outputs = forward(batch)
        elif getattr(self.backend, "shrinks_outputs", False):
            # Filtered where the outputs lie (on a GPU: before the copy to the host).
            outputs = forward(batch, shrinks)
        else:
            outputs = [out if s is None else s(out) for out, s in zip(forward(batch), shrinks, strict=True)]
        self.stats.pass_ran(len(items), stacked - started, time.perf_counter() - stacked)
        return outputs

    def _stack(self, arrays: list[Any]) -> Any:
        """The items' tensors as one batch: on their device when they lie in CUDA regions and the
        backend takes device tensors (``takes_device_tensors``), so they never visit the host;
        else a host array (``np.stack`` copies a region's tensor out)."""
        if getattr(self.backend, "takes_device_tensors", False):
            on_device = stack_on_device(arrays)
            if on_device is not None:
                return on_device
        return np.stack(arrays)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.labels or self.backend.labels

    @property
    def postprocess(self) -> Recipe:
        """The config's recipe, with what the weights fix (CLIP's logit scale) filled in."""
        recipe = self.config.postprocess
        return Recipe(recipe.name, {**recipe.params, **self.backend.recipe_params()})

    async def retire(self) -> None:
        """Finishes the requests it holds (callers stopped reaching it), then frees it."""
        await self.batcher.drain()
        await self.batcher.close()
        await asyncio.to_thread(self._free)

    def _free(self) -> None:
        if not self.shares_thread:  # the shared torch thread stays for the other models
            self.executor.shutdown(wait=True)
        self.backend.close()


@dataclass(frozen=True)
class ModelStatus:
    """One repository entry as RepositoryIndex shows it."""

    name: str
    version: str
    state: str
    reason: str = ""


class ModelManager:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.mode = settings.model_control_mode
        if self.mode not in MODES:
            raise ConfigError(
                f"INFERLINE_MODEL_CONTROL_MODE={self.mode!r} is not one of {', '.join(MODES)}"
            )
        self.root: Path = settings.model_repository or BUILTIN_REPOSITORY
        # The models this stage should serve (its readiness waits for them); the others in the
        # repository are listed, UNAVAILABLE until loaded.
        self.configs = load_repository(self.root, settings.models) if self.mode == "none" else {}
        self._models: dict[str, LoadedModel] = {}
        # Not-READY states and their reasons (LOADING, UNLOADING, UNAVAILABLE); READY is _models.
        self._states: dict[str, tuple[str, str]] = {}
        self._versions: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Poll mode: each model folder's fingerprint when it was last (re)loaded.
        self._seen: dict[str, str] = {}
        self._wanted: set[str] = set(self.configs)
        if self.mode != "none":
            self._wanted = self._initial_models()

    def _initial_models(self) -> set[str]:
        folders = self._folders()
        if self.mode == "poll" or "*" in self.settings.load_models:
            return set(folders) if not self.settings.models else set(self.settings.models)
        missing = [name for name in self.settings.load_models if name not in folders]
        if missing:
            known = ", ".join(sorted(folders)) or "none"
            raise ConfigError(f"INFERLINE_LOAD_MODELS names {missing}, not in repository {self.root} (it has: {known})")
        return set(self.settings.load_models)

    def _folders(self) -> dict[str, Path]:
        """Model folders of the repository (those holding a config file), by folder name."""
        if not self.root.is_dir():
            raise ConfigError(f"model repository {self.root} is not a directory")
        only = set(self.settings.models)
        return {
            path.parent.name: path
            for path in sorted(self.root.glob(f"*/{CONFIG_FILE}"))
            if not only or path.parent.name in only
        }

    @property
    def ready(self) -> bool:
        """Triton's strict readiness: every model this stage should serve is loaded."""
        return all(name in self._models for name in self._wanted)

    # -- start-up -------------------------------------------------------------------------------

    def load_all(self) -> None:
        """The models to serve at start; one that fails is UNAVAILABLE with its reason, unless
        ``exit_on_error`` (then its error stops the stage)."""
        for name in sorted(self._wanted):
            try:
                config = self.configs.get(name) or load_config(self.root / name / CONFIG_FILE)
                if self.mode == "poll":
                    self._seen[name] = self._fingerprint(self.root / name / CONFIG_FILE)
                self._states[name] = (LOADING, "")
                self._install(self._build(config))
            except InferlineError as exc:
                if self.settings.exit_on_error:
                    raise
                self._failed(name, exc)

    def _build(self, config: ModelConfig) -> LoadedModel:
        """Loads weights and backend (blocking: on a worker thread once the stage runs)."""
        name = config.name
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
        log.info(
            "loaded %s v%s (%s/%s) from %s in %.2f s%s",
            name, config.version, config.backend, config.loader, weights.path, elapsed,
            "" if weights.official else " [NOT the official release weights]",
        )
        return LoadedModel(config, backend, weights, elapsed, self.settings.model_busy_window_s)

    def _install(self, model: LoadedModel) -> LoadedModel | None:
        """Makes ``model`` the one requests reach (one assignment: no request sees neither);
        returns the version it replaced."""
        name = model.config.name
        MODEL_LOAD_SECONDS.labels(name).set(model.load_seconds)
        previous = self._models.get(name)
        self._models[name] = model
        self.configs[name] = model.config
        self._versions[name] = model.config.version
        self._states.pop(name, None)
        return previous

    def _failed(self, name: str, exc: Exception) -> None:
        log.error("model %s failed to load: %s", name, exc)
        self._states[name] = (UNAVAILABLE, str(exc))

    # -- serving ----------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> LoadedModel:
        model = self._models.get(name)
        if model is not None and (not version or version == model.config.version):
            return model
        state = self._states.get(name)
        if model is None and state is not None:
            what, reason = state
            if what == LOADING:
                raise ModelNotReady(f"model {quoted(name)} is still loading")
            raise ModelNotReady(f"model {quoted(name)} is unavailable: {reason or what.lower()}")
        known = ", ".join(sorted(self._models)) or "none"
        wanted = quoted(name) + (f" version {quoted(version)}" if version else "")
        raise ModelNotFound(f"model {wanted} is not served here (models: {known})")

    def all(self) -> list[LoadedModel]:
        return [self._models[name] for name in sorted(self._models)]

    async def infer(
        self,
        name: str,
        version: str,
        items: Sequence[Item | Exception],
        timeout: float | None = None,
        shrink: Shrink | None = None,
    ) -> list[Outputs | Exception]:
        """Runs every valid item through the model's dynamic batcher, with the caller's deadline.

        Items of one input shape batch together, also with other requests' items. ``shrink``:
        the request's candidate filter, which each of its items' outputs go through in the pass.
        """
        model = self.get(name, version)
        started = time.perf_counter()
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
            valid[index] = item if shrink is None else Filtered(item, shrink)
        try:
            if valid:
                keyed = [(tuple((k, item[k].shape) for k in sorted(item)), item) for item in valid.values()]
                results.update(zip(valid, await model.batcher.submit(keyed, timeout), strict=True))
        except BaseException:
            model.stats.request(time.perf_counter() - started, ok=False)
            raise
        ordered = [results[index] for index in range(len(items))]
        ok = not any(isinstance(result, Exception) for result in ordered)
        model.stats.request(time.perf_counter() - started, ok=ok)
        return ordered

    def statistics(self, name: str = "", version: str = "") -> list[LoadedModel]:
        """The loaded models whose statistics are asked for (all when ``name`` is empty)."""
        return [self.get(name, version)] if name else self.all()

    # -- model control ----------------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[ModelStatus]:
        """Every model of the repository folder, with its state (READY, LOADING, UNLOADING,
        UNAVAILABLE) and, when not READY, why."""
        try:
            folders = set(self._folders())
        except ConfigError:
            folders = set()
        statuses = []
        for name in sorted(folders | set(self._models) | set(self._states)):
            model = self._models.get(name)
            version = model.config.version if model is not None else self._versions.get(name, "")
            if model is not None and name not in self._states:
                statuses.append(ModelStatus(name, version, READY))
            elif name in self._states:
                state, reason = self._states[name]
                statuses.append(ModelStatus(name, version, state, reason))
            else:
                statuses.append(ModelStatus(name, version, UNAVAILABLE, "not loaded"))
        return [s for s in statuses if s.state == READY] if ready_only else statuses

    async def load(self, name: str, config_json: str | None = None) -> None:
        """RepositoryModelLoad: loads (or reloads) ``name`` from its folder, or from the config
        given as JSON (config.yaml's fields); the previous version serves until the new one is
        in place. A config or weights problem raises and leaves the serving version as it was."""
        self._controllable()
        await self._load(name, config_json)

    async def _load(self, name: str, config_json: str | None = None) -> None:
        async with self._lock(name):
            path = self.root / name / CONFIG_FILE
            if config_json is not None:
                try:  # the caller's config: its mistake is the caller's to fix (INVALID_ARGUMENT)
                    config = parse_config(_json_config(config_json, path), path)
                except ConfigError as exc:
                    raise InvalidInput(str(exc)) from None
            elif path.is_file():
                config = load_config(path)
            else:
                raise ModelNotFound(f"model {quoted(name)} is not in repository {self.root}")
            if config.name != name:
                raise ConfigError(f"{path}: name {config.name!r} must equal the model loaded ({name!r})")
            self._wanted.add(name)
            serving = name in self._models
            if not serving:
                self._states[name] = (LOADING, "")
            try:
                # On a thread that ends with the load: the OpenMP team that torch may start
                # there goes with it (cpu_threads.py).
                model = await on_passing_thread(self._build, config)
            except InferlineError as exc:
                if not serving:
                    self._failed(name, exc)
                raise
            previous = self._install(model)
        if previous is not None:
            await previous.retire()

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: new requests get UNAVAILABLE at once; the requests it already
        holds finish before it is freed."""
        self._controllable()
        await self._unload(name)

    async def _unload(self, name: str) -> None:
        async with self._lock(name):
            model = self._models.pop(name, None)
            self._wanted.discard(name)
            if model is None:
                if name in self._states or (self.root / name / CONFIG_FILE).is_file():
                    self._states[name] = (UNAVAILABLE, "unloaded")
                    return
                raise ModelNotFound(f"model {quoted(name)} is not in repository {self.root}")
            self._states[name] = (UNLOADING, "finishing its requests in flight")
            await model.retire()
            self._states[name] = (UNAVAILABLE, "unloaded")
            self.configs.pop(name, None)
            for gauge in (MODEL_LOAD_SECONDS, QUEUE_DEPTH, QUEUE_CAPACITY, MODEL_BUSY_RATIO, MODEL_INSTANCES_BUSY,
                          INTRA_OP_THREADS):
                try:
                    gauge.remove(name)
                except KeyError:
                    pass
            for instance in range(model.config.instance_count):
                try:
                    MODEL_BUSY_SECONDS.remove(name, str(instance))
                except KeyError:
                    pass

    def _controllable(self) -> None:
        if self.mode != "explicit":
            raise ConfigError(
                f"explicit model load / unload is not allowed in model control mode {self.mode!r}: "
                "set INFERLINE_MODEL_CONTROL_MODE=explicit"
            )

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- poll mode ----------------------------------------------------------------------------------

    @staticmethod
    def _fingerprint(config_path: Path) -> str:
        """What a reload follows: the config file's bytes (the weights pin is one of its fields)."""
        try:
            return hashlib.sha256(config_path.read_bytes()).hexdigest()
        except OSError:
            return ""

    async def poll_once(self) -> None:
        """One rescan: new folders load, removed ones unload, a changed config reloads."""
        folders = await asyncio.to_thread(self._folders)
        for name in sorted(set(self._seen) - set(folders)):
            log.info("model %s left the repository: unloading it", name)
            self._seen.pop(name)
            await self._unload(name)
            self._states.pop(name, None)
        for name, path in folders.items():
            fingerprint = await asyncio.to_thread(self._fingerprint, path)
            if self._seen.get(name) == fingerprint:
                continue
            log.info("model %s %s the repository: loading it", name, "changed in" if name in self._seen else "joined")
            self._seen[name] = fingerprint
            try:
                await self._load(name)
            except InferlineError as exc:
                if name in self._models:
                    log.error("model %s: the changed config did not load (the previous version serves): %s", name, exc)
                else:
                    self._failed(name, exc)

    async def poll(self) -> None:
        """Poll mode's background task: rescans every ``repository_poll_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("rescanning model repository %s failed", self.root)

    async def aclose(self) -> None:
        for model in self._models.values():
            await model.batcher.close()

    def close(self) -> None:
        for model in self._models.values():
            model._free()
        self._models.clear()


def _json_config(text: str, path: Path) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: the 'config' parameter is not JSON: {exc}") from None


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
