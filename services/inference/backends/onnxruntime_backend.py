"""The ONNX Runtime backend: serves a file written by ``inferline.services.inference.export``.

Config ``parameters``: ``providers`` (list, default CUDA then CPU when the device is cuda/auto
and CUDA is available, else CPU), ``graph_optimization_level`` (disable|basic|extended|all,
default all), ``intra_op_threads`` / ``inter_op_threads`` (default ``settings.torch_threads``
when > 0, else ORT's own), ``allow_spinning`` (default false; ``alone_allow_spinning``, default
true, for the lone-pass session below), ``force_spinning_stop`` (default false, ORT's own: a
spinning session's threads spin on for a while after its last ``run`` returns; true stops them at
once. Measured on the 2-core AMD VM, stopping them made a lone YOLOv8n request slower, 91 against
84 ms p50 at one client, and changed nothing at eight: the spinners keep the vCPUs from halting,
so the stages that come next wake faster; bench/results/compare-cpu-2026-12-02-spinstop.md),
``cpu_mem_arena`` (default false: ORT's CPU arena keeps
each session's largest batch's buffers for good, 580 MiB idle after batches up to 16 against
101 MiB without it, at the same speed), ``cpu_max_batch_size`` (none by default: on the CPU
provider, the most items one pass takes; one ORT thread's cost per YOLOv8n image grows with the
batch, 51.6 ms at 1, 60.0 at 4, 65.7 at 16, so two instances of single-image passes beat batches
there). A session serves concurrent ``run`` calls, so
``instance_count: 2`` with ``intra_op_threads: 1`` runs two batches at once.
Labels and recipe params come from the file's metadata_props.

Weights that are not an ``.onnx`` file (the loader family's own checkpoint, say ``yolov8n.pt``,
checked against the config's integrity policy first) are exported once into
``INFERLINE_EXPORT_CACHE_DIR`` and checked against the source (``export_cache.cached_export``); on a
machine where this onnxruntime has no CUDA provider but torch sees a GPU, such a model is
served by the torch backend instead: the GPU path beats ONNX Runtime on the CPU.

Threads follow the load (issue 17): with ``alone_intra_op_threads`` (0: every core this process
may use) a second session of the same file, with that many threads, runs the passes that have
nothing beside them (``run_alone``, chosen by the batcher): one request gets all the cores, a deep
queue gets parallel single-thread passes. The outputs are the one-session path's bit for bit
(ORT's CPU kernels split work by outputs, so the sums keep their order; tests/unit/test_ort_threads.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from inferline.common.errors import WeightsError
from inferline.common.settings import Settings
from inferline.common.telemetry.metrics import INTRA_OP_THREADS
from inferline.services.inference.backends import BACKENDS, Backend, load_backend
from inferline.services.inference.backends.providers import with_tensorrt
from inferline.services.inference.filters import Shrink
from inferline.services.inference.repository import ModelConfig
from inferline.services.inference.weights import ResolvedWeights

log = logging.getLogger(__name__)

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CUDA = "CUDAExecutionProvider"
DEFAULT_EXPORT_CACHE = Path.home() / ".cache" / "inferline" / "exports"
CPU = "CPUExecutionProvider"


def choose_providers(requested: list[str] | None, device: str, available: list[str]) -> list[str]:
    """The providers to use, in order, keeping only available ones (one warning for the rest)."""
    if requested:
        wanted = [str(p) for p in requested]
    elif device.startswith("cuda") or device == "auto":
        wanted = [CUDA, CPU] if CUDA in available else [CPU]
    else:
        wanted = [CPU]
    chosen = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if not chosen:
        chosen = [CPU]
    if missing:
        log.warning("onnxruntime: providers %s are not available here (available: %s); using %s",
                    ", ".join(missing), ", ".join(available), ", ".join(chosen))
    return chosen


def usable_cores() -> int:
    """Cores this process may run on (its affinity, as a container's cpuset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OnnxRuntimeBackend:
    # Inputs may come as torch tensors on a device (read from a CUDA region by handle): bound
    # by their device pointer on the CUDA provider, read in place on the CPU one.
    takes_device_tensors = True
    # ``run`` applies the items' candidate filters itself: on the device with the CUDA provider.
    shrinks_outputs = True

    def __init__(
        self,
        session: ort.InferenceSession,
        config: ModelConfig,
        threads: int = 0,
        alone: ort.InferenceSession | None = None,
        alone_threads: int = 0,
        cpu_max_batch: int | None = None,
    ):
        self._session = session
        # The lone-pass session and its threads (0 and None: every pass runs on ``session``).
        self._alone = alone
        self.threads = threads
        self.alone_threads = alone_threads if alone is not None else 0
        self._threads_gauge = INTRA_OP_THREADS.labels(config.name)
        self._output_names = [spec.name for spec in config.outputs]
        self.providers = tuple(session.get_providers())
        self.on_cuda = self.providers[:1] == (CUDA,)
        # Where IO binding puts the pass's inputs and outputs (the CUDA provider's device); None:
        # a plain ``run`` on host arrays.
        self._bound: tuple[str, int] | None = ("cuda", 0) if self.on_cuda else None
        self.one_at_a_time = session.get_inputs()[0].shape[:1] == [1]
        # The batcher takes at most this many items a pass (None: the config's max_batch_size).
        self.max_useful_batch: int | None = None if self.on_cuda else cpu_max_batch
        meta = session.get_modelmeta().custom_metadata_map
        try:
            self.labels = tuple(json.loads(meta.get("labels", "[]")))
            self._recipe_params = {k: float(v) for k, v in json.loads(meta.get("recipe_params", "{}")).items()}
        except (ValueError, TypeError) as exc:
            raise WeightsError(f"bad inferline metadata in the ONNX file: {exc}") from None

    def run(self, inputs: Mapping[str, Any], shrink: Sequence[Shrink | None] | None = None) -> list[dict[str, Any]]:
        """One pass; ``shrink``: each item's candidate filter, applied on the device (CUDA
        provider) so that only the kept candidates are copied to the host."""
        self._threads_gauge.set(self.threads)
        return self._run(self._session, inputs, shrink)

    def run_alone(
        self, inputs: Mapping[str, Any], shrink: Sequence[Shrink | None] | None = None
    ) -> list[dict[str, Any]]:
        """A pass with no other beside it: on the session with every core, when there is one."""
        if self._alone is None:
            return self.run(inputs, shrink)
        self._threads_gauge.set(self.alone_threads)
        return self._run(self._alone, inputs, shrink)

    def _run(
        self, session: ort.InferenceSession, inputs: Mapping[str, Any], shrink: Sequence[Shrink | None] | None
    ) -> list[dict[str, Any]]:
        batch = len(next(iter(inputs.values())))
        keep: list[Shrink | None] = list(shrink) if shrink is not None else [None] * batch
        if self.one_at_a_time and batch > 1:
            # A graph exported for one item per run (torchvision detectors): run the items in turn.
            return [
                self._run(session, {name: a[i : i + 1] for name, a in inputs.items()}, keep[i : i + 1])[0]
                for i in range(batch)
            ]
        if self._bound is None:
            outputs = session.run(self._output_names, {name: _host(a) for name, a in inputs.items()})
        else:
            binding = self._run_io_binding(session, inputs, *self._bound)
            if any(keep):
                return self._shrunk_on_device(binding, batch, keep)
            outputs = binding.copy_outputs_to_cpu()
        items = [{name: out[i] for name, out in zip(self._output_names, outputs, strict=True)} for i in range(batch)]
        return [item if k is None else k(item) for item, k in zip(items, keep, strict=True)]

    def _run_io_binding(
        self, session: ort.InferenceSession, inputs: Mapping[str, Any], device: str, index: int
    ) -> ort.IOBinding:
        """The pass with its inputs and outputs bound on ``device`` ``index``: host inputs copied
        there once, device inputs (torch tensors) bound where they lie, outputs left there."""
        binding = session.io_binding()
        device_inputs = False
        for name, array in inputs.items():
            if _is_torch(array):
                tensor = array.to(_torch_device(device, index)).contiguous()
                binding.bind_input(name, device, index, _numpy_dtype(tensor), tuple(tensor.shape), tensor.data_ptr())
                device_inputs = True
            else:
                host = np.ascontiguousarray(array)
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(host, device, index))
        if device_inputs and device == "cuda":
            # The stack was queued on torch's stream; ORT runs on its own, which does not wait for it.
            import torch  # noqa: PLC0415 - a device tensor came, so torch is loaded

            torch.cuda.current_stream(torch.device(device, index)).synchronize()
        for name in self._output_names:
            binding.bind_output(name, device, index)
        session.run_with_iobinding(binding)
        return binding

    def _shrunk_on_device(self, binding: ort.IOBinding, batch: int, keep: list[Shrink | None]) -> list[dict[str, Any]]:
        """Each item's outputs filtered where ORT left them (torch views of its values, by
        DLPack), then only what is kept copied to the host."""
        import torch  # noqa: PLC0415 - only for a filter on the device

        values = [torch.from_dlpack(v) for v in binding.get_outputs()]
        shrunk = []
        for i, k in enumerate(keep):
            item = {name: out[i] for name, out in zip(self._output_names, values, strict=True)}
            kept = item if k is None else k(item)
            shrunk.append({name: t.cpu().numpy() for name, t in kept.items()})
        return shrunk

    def recipe_params(self) -> dict[str, float]:
        return dict(self._recipe_params)

    def close(self) -> None:
        self._session = None
        self._alone = None


def _is_torch(array: Any) -> bool:
    """A torch tensor (from CUDA regions), told apart without importing torch in a stage that
    never sees one."""
    return type(array).__module__.startswith("torch")


def _host(array: Any) -> np.ndarray:
    """An input as a contiguous host array: a torch tensor on the CPU read in place, one on a
    device copied over (the CPU provider reads only host memory)."""
    if _is_torch(array):
        return np.ascontiguousarray(array.cpu().numpy())
    return np.ascontiguousarray(array)


def _torch_device(device: str, index: int) -> str:
    return "cpu" if device == "cpu" else f"{device}:{index}"


def _numpy_dtype(tensor: Any) -> type:
    """The numpy type of a torch tensor's elements, which ORT's ``bind_input`` takes."""
    return tensor[:0].cpu().numpy().dtype.type


@BACKENDS.register("onnxruntime")
def load_onnxruntime_backend(config: ModelConfig, weights: ResolvedWeights, settings: Settings) -> Backend:
    params = dict(config.parameters or {})
    level = str(params.get("graph_optimization_level", "all")).lower()
    if level not in _LEVELS:
        raise WeightsError(
            f"{config.name}: graph_optimization_level must be one of {', '.join(_LEVELS)}, got {level!r}"
        )
    intra = int(params.get("intra_op_threads", settings.torch_threads if settings.torch_threads > 0 else 0))
    inter = int(params.get("inter_op_threads", settings.torch_threads if settings.torch_threads > 0 else 0))
    available = ort.get_available_providers()
    chosen = choose_providers(params.get("providers"), settings.device, available)
    providers = with_tensorrt(chosen, available, settings, config.name)  # issue 16: backends/providers.py
    if CUDA in providers and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu wheels find the CUDA/cuDNN libraries that torch or nvidia-* wheels ship
        # only once told to load them; without it the CUDA EP silently falls back to CPU.
        ort.preload_dlls()
    # Spinning intra-op threads take the other stages' CPU while they wait for work: off unless asked.
    spinning = bool(params.get("allow_spinning", False))
    # Without the arena a pass's buffers go back to malloc, which the idle trimmer returns to the
    # kernel (common/memory.py): idle RSS does not keep each overload's peak.
    arena = bool(params.get("cpu_mem_arena", False))
    # Off by default: spinning on after a pass costs a core for a while, but measured it helps the
    # next stage's wake-up more than it takes from it (see the docstring).
    stop_spinning = bool(params.get("force_spinning_stop", False))
    path = weights.path
    if path.suffix != ".onnx":
        if CUDA not in providers and settings.device != "cpu" and _torch_sees_cuda():
            log.info("%s: onnxruntime has no CUDA provider here and torch sees a GPU: serving with torch", config.name)
            return load_backend(dataclasses.replace(config, backend="torch"), weights, settings)
        from inferline.services.inference.export_cache import cached_export  # noqa: PLC0415 - only for a .pt

        cache = settings.export_cache_dir or DEFAULT_EXPORT_CACHE
        try:
            try:
                path = cached_export(config, path, weights.sha256, cache)
            except OSError as exc:
                # A read-only root file system (the Helm chart's, compose's): /tmp is writable there.
                fallback = Path(tempfile.gettempdir()) / "inferline-exports"
                log.warning("%s: export cache %s is not writable (%s): exporting into %s instead; set "
                            "INFERLINE_EXPORT_CACHE_DIR to a writable volume to keep it across restarts",
                            config.name, cache, exc.strerror or exc, fallback)
                try:
                    path = cached_export(config, path, weights.sha256, fallback)
                except OSError as again:
                    raise WeightsError(f"{config.name}: cannot write its ONNX export to {cache} nor {fallback}: "
                                       f"{again}; set INFERLINE_EXPORT_CACHE_DIR to a writable folder") from None
        except ImportError as exc:  # an image without the exporter: torch and onnx (the torch and onnx extras)
            if not _torch_importable():
                raise WeightsError(
                    f"{config.name}: {path.name} must be exported to ONNX first and this install cannot "
                    f"({exc.name or exc} is missing): install inferline[torch,onnx], or serve an .onnx "
                    "file (inferline export)"
                ) from None
            log.warning("%s: cannot export %s here (%s is missing): serving with torch", config.name, path.name,
                        exc.name or exc)
            return load_backend(dataclasses.replace(config, backend="torch"), weights, settings)
    session = _session(path, level, intra, inter, spinning, providers, arena, stop_spinning)
    alone, alone_threads = None, 0
    wanted = params.get("alone_intra_op_threads")
    if wanted is not None and CUDA not in providers:
        alone_threads = int(wanted) or (settings.torch_threads if settings.torch_threads > 0 else usable_cores())
        if alone_threads > max(intra, 1):
            # A lone pass has the stage to itself: its threads spin between the graph's parallel
            # sections instead of sleeping and waking (33.5 against 37.3 ms a YOLOv8n pass on
            # two cores); the parallel single-thread sessions stay asleep when idle.
            alone_spinning = bool(params.get("alone_allow_spinning", True))
            alone = _session(path, level, alone_threads, inter, alone_spinning, providers, arena,
                             stop_spinning)
    cpu_max_batch = params.get("cpu_max_batch_size")
    return OnnxRuntimeBackend(session, config, intra if intra > 0 else usable_cores(), alone, alone_threads,
                              int(cpu_max_batch) if cpu_max_batch is not None else None)


def _torch_importable() -> bool:
    return importlib.util.find_spec("torch") is not None


def _torch_sees_cuda() -> bool:
    """Whether torch can use a GPU here; torch is imported only on a machine with an NVIDIA
    driver, so a CPU start on a warm export cache does not pay torch's import."""
    if not Path("/proc/driver/nvidia/version").exists() or not _torch_importable():
        return False
    import torch  # noqa: PLC0415 - optional here: an ONNX-only image has no torch

    return bool(torch.cuda.is_available())


def _session(
    path: object,
    level: str,
    intra: int,
    inter: int,
    spinning: bool,
    providers: Sequence[str | tuple[str, dict[str, Any]]],
    arena: bool = False,
    stop_spinning: bool = False,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = _LEVELS[level]
    if intra > 0:
        options.intra_op_num_threads = intra
    if inter > 0:
        options.inter_op_num_threads = inter
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    if spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1" if stop_spinning else "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad files
        raise WeightsError(f"{path}: cannot load ONNX model: {exc}") from None
