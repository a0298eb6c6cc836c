"""The stage ports in the controller's own process: the stages' domain services, called directly.

``inferline serve controller --inprocess`` (``INFERLINE_INPROCESS=true``) runs the three stages'
domain services inside the controller. Requests still arrive over gRPC at the controller, but a
stage call is a plain await on the stage's domain service with domain values: no protos, no
serialisation, no sockets, no second process. Comparing it with the four services measures what
the service boundaries cost (bench/compare.py), on the very code that serves.

The stages are built by their own ``build_service`` (so the same settings, pools, model loading
and shutdown apply), and their domain errors arrive as raised, which the controller's own
interceptor maps to statuses with the same table.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from inferline.common.api import NO_CLUSTERING, ClusterOptions, Embeddings, Rendering
from inferline.common.detections import Detection, DetectOptions
from inferline.common.model_info import ModelInfo
from inferline.common.recipes import Recipe
from inferline.common.server import Service
from inferline.common.settings import PIPELINE_STAGES, Settings
from inferline.common.transform import ImageTransform, Region
from inferline.services.controller.ports import Deadline, Inputs, Outcome, Outputs, Preprocessed, RenderItem
from inferline.services.presentation.renderers import RenderInput


class LocalPreprocess:
    def __init__(self, service: Any):
        self._service = service

    async def images(
        self, recipe: Recipe, images: Sequence[bytes], regions: Sequence[Region], deadline: Deadline
    ) -> list[Outcome[Preprocessed]]:
        deadline.remaining("preprocess")
        outcomes = await self._service.images(recipe, images, regions)
        return [o if isinstance(o, Exception) else Preprocessed(*o) for o in outcomes]

    async def texts(self, recipe: Recipe, texts: Sequence[str], deadline: Deadline) -> list[Outcome[np.ndarray]]:
        deadline.remaining("preprocess")
        return await self._service.texts(recipe, texts)


class LocalInference:
    def __init__(self, service: Any):
        self._service = service

    async def model(self, name: str, deadline: Deadline) -> ModelInfo:
        return self._service.info(name)

    async def models(self, deadline: Deadline) -> list[ModelInfo]:
        return self._service.infos()

    async def infer(
        self, model: ModelInfo, items: Sequence[Inputs], min_score: float, deadline: Deadline
    ) -> list[Outcome[Outputs]]:
        # In this process the preprocessed tensors are host arrays (no device pool between
        # stages); a device tensor, should one come, is read to the host.
        host = [
            item if all(isinstance(a, np.ndarray) for a in item.values())
            else {name: np.asarray(array) for name, array in item.items()}
            for item in items
        ]
        return await self._service.infer(
            model.name, model.version, host, min_score, deadline.remaining("inference")
        )


class LocalPostprocess:
    def __init__(self, service: Any):
        self._service = service

    async def detections(
        self,
        recipe: Recipe,
        options: DetectOptions,
        labels: Sequence[str],
        items: Sequence[tuple[Outputs, ImageTransform]],
        deadline: Deadline,
    ) -> list[Outcome[list[Detection]]]:
        deadline.remaining("postprocess")
        return await self._service.detections(recipe, options, labels, items)

    async def render(self, format: str, items: Sequence[RenderItem], deadline: Deadline) -> list[Rendering]:
        deadline.remaining("postprocess")
        rendered = await self._service.render(
            format, [RenderInput(i.name, i.width, i.height, i.detections, i.image) for i in items]
        )
        return [Rendering(format, r.content_type, r.content) for r in rendered]

    async def embeddings(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[np.ndarray],
        deadline: Deadline,
        *,
        logit_scale: float = 0.0,
        top_k: int = 0,
        cluster: ClusterOptions = NO_CLUSTERING,
    ) -> Embeddings:
        deadline.remaining("postprocess")
        return await self._service.embeddings(images, texts, logit_scale=logit_scale, top_k=top_k, cluster=cluster)


def domain_service(service: Service) -> Any:
    """The stage's domain service inside what its ``build_service`` built."""
    return service.domain


class LocalStages:
    """The three ports on the stages' domain services, built and loaded in this process."""

    def __init__(self, settings: Settings):
        self.targets = {stage: "in-process" for stage in PIPELINE_STAGES}
        self.services: dict[str, Service] = {
            stage: importlib.import_module(f"inferline.services.{stage}.servicer").build_service(settings)
            for stage in PIPELINE_STAGES
        }
        self.preprocess = LocalPreprocess(domain_service(self.services["preprocess"]))
        self.inference = LocalInference(domain_service(self.services["inference"]))
        self.postprocess = LocalPostprocess(domain_service(self.services["postprocess"]))

    async def load(self) -> None:
        for service in self.services.values():
            if service.load is not None:
                await service.load()

    async def close(self) -> None:
        for service in self.services.values():
            if service.close is not None:
                await service.close()
