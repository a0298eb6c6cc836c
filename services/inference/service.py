"""The inference stage's domain service: named models, input tensors in, output tensors out.

It knows no gRPC: the servicer (``oip_servicer.py``) converts its protos, and the controller's local
ports call it directly. A request-level problem (unknown model, bad ``min_score``, no items, too
many) raises before any item runs; a bad item fails alone, its exception returned in its place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np

from inferline.common.errors import InvalidInput, at_most
from inferline.common.model_info import ModelInfo, TensorInfo, WeightsInfo
from inferline.common.settings import Settings
from inferline.common.shm import SharedMemoryRegistry
from inferline.services.inference.cpu_threads import on_passing_thread
from inferline.services.inference.cuda_shared_memory import CudaShmRegistry
from inferline.services.inference.filters import shrink_for
from inferline.services.inference.models import LoadedModel, ModelManager, ModelStatus


class Inference:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.manager = ModelManager(settings)
        self._poller: asyncio.Task | None = None
        # Client-created regions inputs are read from and outputs written into (OIP's extension).
        self.shared_memory = SharedMemoryRegistry(settings.shm_max_regions, settings.shm_max_bytes)
        # Client-allocated device memory, by CUDA IPC handle (issue 16; one namespace with the above).
        self.cuda_shared_memory = CudaShmRegistry(
            settings.cuda_shm_max_regions,
            settings.cuda_shm_max_bytes,
            taken=lambda name: any(r.name == name for r in self.shared_memory.status()),
        )

    @property
    def ready(self) -> bool:
        """Every model this stage should serve is loaded (Triton's strict readiness)."""
        return self.manager.ready

    def model(self, name: str, version: str = "") -> LoadedModel:
        """The loaded model; ModelNotFound when it is not served here, ModelNotReady while loading."""
        return self.manager.get(name, version)

    def models(self) -> list[LoadedModel]:
        return self.manager.all()

    def info(self, name: str, version: str = "") -> ModelInfo:
        """The model's description, as a caller plans with it (``model`` says when it cannot)."""
        return model_info(self.model(name, version))

    def infos(self) -> list[ModelInfo]:
        return [model_info(m) for m in self.models()]

    async def infer(
        self,
        name: str,
        version: str,
        items: Sequence[Mapping[str, np.ndarray] | Exception],
        min_score: float = 0.0,
        timeout: float | None = None,
    ) -> list[dict[str, np.ndarray] | Exception]:
        """Each item's outputs, through the model's dynamic batcher within ``timeout`` seconds.

        ``min_score`` > 0 drops the candidates that the model's postprocess would drop below that
        score, when the model has a candidate filter: the same detections in a fraction of the bytes.
        """
        model = self.manager.get(name, version)
        if not 0.0 <= min_score <= 1.0:
            raise InvalidInput(f"min_score must be within [0, 1], got {min_score}")
        if not items:
            raise InvalidInput("no items in the request: give each item's input tensors")
        at_most(len(items), self.settings.max_regions, "items", "INFERLINE_MAX_REGIONS")
        # The filter runs in the forward pass, per item: on the model's device when the backend
        # can (only the candidates are copied to the host), else on the host right after it.
        shrink = shrink_for(model.config.candidate_filter, min_score)
        return await self.manager.infer(
            name, version, list(items), timeout, shrink
        )  # read once: a LazySequence converts at each read

    async def load(self) -> None:
        # On a thread that ends with the loads, as every load (cpu_threads.py).
        await on_passing_thread(self.manager.load_all)
        if self.manager.mode == "poll":
            self._poller = asyncio.create_task(self.manager.poll(), name="model-repository-poll")

    # Model control (models.py ModelManager; docs/model-control.md).
    def repository_index(self, ready_only: bool = False) -> list[ModelStatus]:
        return self.manager.index(ready_only)

    async def load_model(self, name: str, config_json: str | None = None) -> None:
        await self.manager.load(name, config_json)

    async def unload_model(self, name: str) -> None:
        await self.manager.unload(name)

    def statistics(self, name: str = "", version: str = "") -> list[LoadedModel]:
        return self.manager.statistics(name, version)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.manager.aclose()
        await asyncio.to_thread(self.manager.close)
        self.shared_memory.close()
        self.cuda_shared_memory.close()


def model_info(model: LoadedModel) -> ModelInfo:
    """A loaded model's description. The postprocess recipe is the loaded one (with what the
    weights fix, e.g. CLIP's logit scale); the weights are named by file only: the server's
    folder layout is no caller's business (the load log names the full path)."""
    config = model.config

    def tensors(specs) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(s.name, s.dtype, tuple(s.shape)) for s in specs)

    return ModelInfo(
        name=config.name,
        version=config.version,
        platform=config.backend,
        task=config.task,
        max_batch_size=config.max_batch_size,
        inputs=tensors(config.inputs),
        outputs=tensors(config.outputs),
        preprocess=config.preprocess,
        postprocess=model.postprocess,
        candidate_filter=config.candidate_filter,
        labels=tuple(model.labels),
        weights=WeightsInfo(model.weights.path.name, model.weights.sha256, bool(model.weights.official)),
        precision=config.precision,
    )
