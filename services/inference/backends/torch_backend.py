"""The PyTorch backend and its loaders (how each model library's weights become a module)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferline.common.errors import ConfigError, WeightsError
from inferline.common.registry import Registry
from inferline.common.settings import Settings
from inferline.common.telemetry.metrics import INTRA_OP_THREADS
from inferline.services.inference.backends import BACKENDS
from inferline.services.inference.backends.cuda_graphs import GraphedForward
from inferline.services.inference.filters import Shrink
from inferline.services.inference.repository import ModelConfig
from inferline.services.inference.weights import ResolvedWeights

log = logging.getLogger(__name__)

# Batch-first inputs in, one dict of outputs per item out.
Forward = Callable[[Mapping[str, torch.Tensor]], list[dict[str, torch.Tensor]]]


@dataclass
class TorchModel:
    forward: Forward
    labels: tuple[str, ...] = ()
    recipe_params: dict[str, float] = field(default_factory=dict)
    # The underlying nn.Module, for export (None where a loader wraps several).
    module: torch.nn.Module | None = None


# (weights path, device, the model's config) -> the module wrapped for serving.
Loader = Callable[[Path, torch.device, ModelConfig], TorchModel]
LOADERS: Registry[Loader] = Registry("torch loader")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend:
    # Inputs may come as torch tensors already on a device (read from a CUDA region by handle).
    takes_device_tensors = True
    # ``run`` applies the items' candidate filters itself, before the outputs leave the device.
    shrinks_outputs = True

    def __init__(self, model: TorchModel, device: torch.device, precision: str = "fp32", name: str = ""):
        self._model = model
        self.device = device
        # torch's intra-op threads for this model's passes on the CPU (0 on a GPU), fixed at load:
        # torch keeps a count per thread, taken from the process's at the thread's first op, so a
        # long-lived pass thread would keep whatever count was current then. With more than one,
        # the passes run on the process's one torch thread (services/inference/cpu_threads.py).
        self.cpu_threads = torch.get_num_threads() if device.type == "cpu" else 0
        self._threads_gauge = INTRA_OP_THREADS.labels(name) if name and self.cpu_threads else None
        self.labels = model.labels
        self.precision = precision
        self._autocast = _AUTOCAST.get(precision)

    def run(
        self, inputs: Mapping[str, np.ndarray | torch.Tensor], shrink: Sequence[Shrink | None] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """One forward pass; ``shrink``: each item's candidate filter, applied on the model's
        device so that only the kept candidates are copied to the host."""
        if self.cpu_threads and torch.get_num_threads() != self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)  # this thread's count, as loaded
        if self._threads_gauge is not None:
            self._threads_gauge.set(self.cpu_threads)
        with torch.inference_mode(), self._precision():
            tensors = {name: self._to_device(a) for name, a in inputs.items()}
            items = self._model.forward(tensors)
            if shrink is not None:
                items = [
                    item if keep is None else keep({name: _float32(t) for name, t in item.items()})
                    for item, keep in zip(items, shrink, strict=True)
                ]
            return [{name: _to_numpy(t) for name, t in item.items()} for item in items]

    def _precision(self) -> contextlib.AbstractContextManager:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast)

    def _to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            # A batch stacked on its device from CUDA regions: no host trip (none at all when
            # it is this model's device).
            return array.to(self.device, non_blocking=True)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            # Page-locked staging lets the copy run asynchronously (DMA) on the current stream;
            # the forward pass queued after it on the same stream waits for it by itself.
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def recipe_params(self) -> dict[str, float]:
        return dict(self._model.recipe_params)

    def close(self) -> None:
        self._model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (autocast) as float32, as the config declares them: what the wire
    carries, and what a candidate filter compares, on the device or on the host alike."""
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return _float32(tensor).to("cpu").numpy()


@BACKENDS.register("torch")
def load_torch_backend(config: ModelConfig, weights: ResolvedWeights, settings: Settings) -> TorchBackend:
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"{config.name}: precision fp16 needs a CUDA device (this one is {device}); use bf16 on CPU, or fp32"
        )
    params = dict(config.parameters or {})
    if params.get("cuda_graphs") and device.type != "cuda":
        raise ConfigError(
            f"{config.name}: parameters.cuda_graphs needs a CUDA device (this one is {device}); "
            "remove it or serve on cuda"
        )
    model = LOADERS.get(config.loader)(weights.path, device, config)
    if params.get("cuda_graphs"):  # issue 16: backends/cuda_graphs.py
        graphed = GraphedForward(model.forward, config.name, int(params.get("cuda_graph_shapes", 8)))
        model = dataclasses.replace(model, forward=graphed)
    return TorchBackend(model, device, config.precision, config.name)


# Pickled checkpoints (ultralytics' .pt) hold whole modules. They are loaded with
# weights_only=True, allowing only nn.Module classes from these packages, so a tampered file
# cannot run code: anything else in the pickle is refused before it is touched.
_MODULE_PREFIXES = ("torch.nn.modules.", "ultralytics.nn.")
_DATA_CLASSES = {"ultralytics.utils.IterableSimpleNamespace", "types.SimpleNamespace"}


def safe_load_checkpoint(path: Path) -> Any:
    allowed: list[Any] = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
        module_name, _, attr = name.rpartition(".")
        if not (module_name.startswith(_MODULE_PREFIXES) or name in _DATA_CLASSES):
            raise WeightsError(f"{path}: refusing to load, the pickle references {name}")
        obj = getattr(importlib.import_module(module_name), attr, None)
        is_module = isinstance(obj, type) and issubclass(obj, torch.nn.Module)
        if not (is_module or name in _DATA_CLASSES):
            raise WeightsError(f"{path}: refusing to load, {name} is not a known module class")
        allowed.append(obj)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files fail in many ways
        raise WeightsError(f"{path}: cannot load checkpoint: {exc}") from None
