"""Detect, planned from model metadata and run through the three stages.

The controller hard-codes no model: the inference stage's ModelMetadata says which preprocess
and postprocess recipes a model needs, its labels and its task. Items that fail in one stage
carry their status to the end and skip the later stages; the rest of the batch goes on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from inferline.common.detections import DetectOptions
from inferline.common.errors import InvalidInput, StageFailed, WrongTask
from inferline.common.generated import (
    controller_pb2,
    inference_pb2,
    postprocess_pb2,
    preprocess_pb2,
    types_pb2,
)
from inferline.common.settings import Settings
from inferline.services.controller.stages import Deadline, StageClients

METADATA_TTL_S = 10.0


class Controller:
    def __init__(self, settings: Settings, stages: StageClients):
        self.settings = settings
        self.stages = stages
        self._metadata: dict[str, tuple[float, inference_pb2.ModelMetadataResponse]] = {}

    async def model_metadata(self, name: str, deadline: Deadline) -> inference_pb2.ModelMetadataResponse:
        """Cached briefly: metadata changes only when the inference stage reloads."""
        cached = self._metadata.get(name)
        if cached is not None and time.monotonic() - cached[0] < METADATA_TTL_S:
            return cached[1]
        metadata = await self.stages.call(
            "inference", self.stages.inference.ModelMetadata, inference_pb2.ModelMetadataRequest(name=name), deadline
        )
        self._metadata[name] = (time.monotonic(), metadata)
        return metadata

    async def list_models(self, deadline: Deadline) -> inference_pb2.ListModelsResponse:
        return await self.stages.call(
            "inference", self.stages.inference.ListModels, inference_pb2.ListModelsRequest(), deadline
        )

    async def detect(self, request: controller_pb2.DetectRequest, deadline: Deadline) -> controller_pb2.DetectResponse:
        started = time.perf_counter()
        self._validate(request)
        metadata = await self.model_metadata(request.model, deadline)
        if metadata.task != "detect":
            raise WrongTask(f"model {request.model!r} is a {metadata.task} model; Detect needs a detect model")
        version = metadata.versions[0] if metadata.versions else ""
        timings: dict[str, float] = {}
        results = [controller_pb2.ImageResult(name=image.name) for image in request.images]
        alive = list(range(len(results)))

        pre = await self._timed(
            timings, "preprocess", "preprocess", self.stages.preprocess.Preprocess,
            preprocess_pb2.PreprocessRequest(recipe=metadata.preprocess, images=request.images), deadline,
        )
        alive = _settle(results, alive, pre.images, "preprocess")
        for i in alive:
            transform = pre.images[i].transform
            results[i].width, results[i].height = transform.orig_width, transform.orig_height

        if alive:
            infer = await self._timed(
                timings, "inference", "inference", self.stages.inference.ModelInfer,
                inference_pb2.ModelInferRequest(
                    model_name=metadata.name,
                    model_version=version,
                    items=[inference_pb2.InferItem(inputs=[pre.images[i].tensor]) for i in alive],
                ),
                deadline,
            )
            outputs = {i: result.outputs for i, result in zip(alive, infer.results)}
            alive = _settle(results, alive, infer.results, "inference")

        if alive:
            post = await self._timed(
                timings, "postprocess", "postprocess", self.stages.postprocess.Postprocess,
                postprocess_pb2.PostprocessRequest(
                    recipe=metadata.postprocess,
                    options=request.options,
                    labels=metadata.labels,
                    items=[
                        postprocess_pb2.PostprocessItem(outputs=outputs[i], transform=pre.images[i].transform)
                        for i in alive
                    ],
                ),
                deadline,
            )
            for i, result in zip(alive, post.results):
                results[i].detections.extend(result.detections)
            alive = _settle(results, alive, post.results, "postprocess")

        for render_format in request.render if alive else ():
            with_image = render_format == types_pb2.RENDER_FORMAT_PNG
            rendered = await self._timed(
                timings, "render", "postprocess", self.stages.postprocess.Render,
                postprocess_pb2.RenderRequest(
                    format=render_format,
                    items=[
                        postprocess_pb2.RenderItem(
                            name=results[i].name,
                            width=results[i].width,
                            height=results[i].height,
                            detections=results[i].detections,
                            image=request.images[i].data if with_image else b"",
                        )
                        for i in alive
                    ],
                ),
                deadline,
            )
            _expect(len(rendered.renderings), len(alive), "postprocess")
            for i, rendering in zip(alive, rendered.renderings):
                results[i].renderings.append(rendering)

        timings["total"] = (time.perf_counter() - started) * 1000
        return controller_pb2.DetectResponse(model=metadata.name, model_version=version, results=results, timings_ms=timings)

    def _validate(self, request: controller_pb2.DetectRequest) -> None:
        if not request.model:
            raise InvalidInput("model is required; ListModels shows what is served")
        if not request.images:
            raise InvalidInput("no images in the request")
        if len(request.images) > self.settings.max_batch_images:
            raise InvalidInput(
                f"{len(request.images)} images in one request is over the limit of "
                f"{self.settings.max_batch_images} (INFERLINE_MAX_BATCH_IMAGES); split the batch"
            )
        for render_format in request.render:
            if render_format not in (types_pb2.RENDER_FORMAT_JSON, types_pb2.RENDER_FORMAT_CSV, types_pb2.RENDER_FORMAT_PNG):
                raise InvalidInput(f"render format {render_format} is not one of RENDER_FORMAT_JSON, _CSV, _PNG")
        DetectOptions.from_proto(request.options)

    async def _timed(self, timings: dict[str, float], key: str, stage: str, method, request, deadline: Deadline):
        started = time.perf_counter()
        try:
            return await self.stages.call(stage, method, request, deadline)
        finally:
            timings[key] = timings.get(key, 0.0) + (time.perf_counter() - started) * 1000


def _expect(got: int, wanted: int, stage: str) -> None:
    if got != wanted:
        raise StageFailed(f"{stage} stage answered {got} items for {wanted}")


def _settle(results: Sequence[controller_pb2.ImageResult], alive: Sequence[int], items: Sequence, stage: str) -> list[int]:
    """Copies each failed item's status into its result; returns the indices still going."""
    _expect(len(items), len(alive), stage)
    going = []
    for i, item in zip(alive, items):
        if item.status.code == 0:
            going.append(i)
        else:
            results[i].status.CopyFrom(item.status)
    return going
