"""The stage ports over gRPC: the stage services' clients, proto <-> domain in one place.

One channel per stage, made once and reused by every request; it retries UNAVAILABLE and spreads
calls over the stage's replicas (common/channels.py). A stage's status becomes a domain error
with the stage named in the message, so a caller sees "inference stage at localhost:50053 is
unavailable" rather than a bare UNAVAILABLE; an item's status becomes that item's domain error
through the same status table the stage used to make it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
import numpy as np

from inferline.common import oip, tensors
from inferline.common.api import (
    ENUM_BY_FORMAT,
    NO_CLUSTERING,
    ClusterOptions,
    Embeddings,
    Ranking,
    Rendering,
    error_from_status,
)
from inferline.common.channels import create_channel
from inferline.common.detections import Detection, DetectOptions, detections_from_proto
from inferline.common.errors import (
    DeadlineExceeded,
    InferlineError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    StageFailed,
    StageUnavailable,
)
from inferline.common.generated import (
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    postprocess_pb2,
    postprocess_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
    types_pb2,
)
from inferline.common.model_info import ModelInfo
from inferline.common.recipes import Recipe
from inferline.common.settings import PIPELINE_STAGES, Settings
from inferline.common.status import error_for
from inferline.common.transform import ImageTransform, Region
from inferline.services.controller.ports import Deadline, Outcome, Outputs, Preprocessed, RenderItem
from inferline.services.controller.stages import StageWatcher

Response = TypeVar("Response")


class _Caller:
    """One stage's calls: the caller's deadline as the timeout, wait-for-ready while the stage
    is expected back, and its failures as domain errors naming the stage."""

    def __init__(self, stage: str, target: str, watcher: StageWatcher):
        self.stage, self.target, self.watcher = stage, target, watcher

    async def __call__(
        self, method: Callable[..., Awaitable[Response]], request: object, deadline: Deadline
    ) -> Response:
        try:
            return await method(
                request, timeout=deadline.remaining(self.stage), wait_for_ready=self.watcher.expected(self.stage)
            )
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code is grpc.StatusCode.UNAVAILABLE:
                raise StageUnavailable(f"{self.stage} stage at {self.target} is unavailable: {details}") from None
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"deadline exceeded in the {self.stage} stage") from None
            # The caller's own mistakes read best unprefixed; anything else names the stage.
            caller_error = code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            raise error_for(code, details if caller_error else f"{self.stage} stage: {details}") from None


def expect(got: int, wanted: int, stage: str) -> None:
    """A stage answers one item per item asked; anything else is its bug, not the caller's."""
    if got != wanted:
        raise StageFailed(f"{stage} stage answered {got} items for {wanted}")


def _transform(message: types_pb2.ImageTransform) -> ImageTransform:
    return ImageTransform(
        message.orig_width, message.orig_height, message.input_width, message.input_height,
        message.scale_x, message.scale_y, message.pad_x, message.pad_y,
    )


def _transform_proto(transform: ImageTransform) -> types_pb2.ImageTransform:
    return types_pb2.ImageTransform(**dataclasses.asdict(transform))


def _box(box: Sequence[float]) -> types_pb2.Box:
    x1, y1, x2, y2 = box
    return types_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2)


class GrpcPreprocess:
    def __init__(self, channel: grpc.aio.Channel, call: _Caller):
        self._stub = preprocess_pb2_grpc.PreprocessServiceStub(channel)
        self._call = call

    async def images(
        self, recipe: Recipe, images: Sequence[bytes], regions: Sequence[Region], deadline: Deadline
    ) -> list[Outcome[Preprocessed]]:
        request = preprocess_pb2.PreprocessRequest(
            recipe=recipe.to_proto(),
            images=[types_pb2.Image(data=data) for data in images],
            regions=[types_pb2.Region(image=r.image, box=_box(r.box)) for r in regions],
        )
        response = await self._call(self._stub.Preprocess, request, deadline)
        expect(len(response.images), len(regions) or len(images), "preprocess")
        return [
            error_from_status(item.status) or Preprocessed(tensors.from_proto(item.tensor), _transform(item.transform))
            for item in response.images
        ]

    async def texts(self, recipe: Recipe, texts: Sequence[str], deadline: Deadline) -> list[Outcome[np.ndarray]]:
        request = preprocess_pb2.PreprocessRequest(recipe=recipe.to_proto(), texts=texts)
        response = await self._call(self._stub.Preprocess, request, deadline)
        expect(len(response.texts), len(texts), "preprocess")
        return [error_from_status(item.status) or tensors.from_proto(item.tensor) for item in response.texts]


class GrpcInference:
    """The inference stage over the Open Inference Protocol (``inference.GRPCInferenceService``):
    any OIP server whose ModelConfig carries the parameters of ``ModelInfo`` can be the stage.

    OIP has no per-item status, so a request is one batch that succeeds or fails whole. Items are
    therefore sent in groups of one input shape (the batch a model takes), each chunked at the
    model's ``max_batch_size``, all groups at once; a failed group fails its own items only.
    """

    def __init__(self, channel: grpc.aio.Channel, call: _Caller):
        self._stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._call = call

    async def model(self, name: str, deadline: Deadline) -> ModelInfo:
        # ModelConfig has no version: ModelMetadata names the one served.
        metadata, config = await asyncio.gather(
            self._call(self._stub.ModelMetadata, grpc_service_pb2.ModelMetadataRequest(name=name), deadline),
            self._call(self._stub.ModelConfig, grpc_service_pb2.ModelConfigRequest(name=name), deadline),
        )
        return ModelInfo.from_config(config.config, metadata.versions[0] if metadata.versions else "")

    async def models(self, deadline: Deadline) -> list[ModelInfo]:
        index = await self._call(
            self._stub.RepositoryIndex, grpc_service_pb2.RepositoryIndexRequest(ready=True), deadline
        )
        ready = [m for m in index.models if m.state == "READY"]

        async def config(entry: grpc_service_pb2.RepositoryIndexResponse.ModelIndex) -> ModelInfo | None:
            request = grpc_service_pb2.ModelConfigRequest(name=entry.name, version=entry.version)
            try:
                reply = await self._call(self._stub.ModelConfig, request, deadline)
            except ModelNotFound:  # unloaded since the index was read
                return None
            return ModelInfo.from_config(reply.config, entry.version)

        return [info for info in await asyncio.gather(*(config(m) for m in ready)) if info is not None]

    async def infer(
        self, model: ModelInfo, items: Sequence[Outputs], min_score: float, deadline: Deadline
    ) -> list[Outcome[Outputs]]:
        groups = _groups(model, items)
        answers = await asyncio.gather(
            *(self._infer_group(model, [items[k] for k in group], min_score, deadline) for group in groups)
        )
        outcomes: dict[int, Outcome[Outputs]] = {}
        for group, results in zip(groups, answers, strict=True):
            outcomes.update(zip(group, results, strict=True))
        return [outcomes[k] for k in range(len(items))]

    async def _infer_group(
        self, model: ModelInfo, items: Sequence[Outputs], min_score: float, deadline: Deadline
    ) -> list[Outcome[Outputs]]:
        batched = model.max_batch_size > 0
        request = grpc_service_pb2.ModelInferRequest(model_name=model.name, model_version=model.version)
        try:
            for name in items[0]:
                array = np.stack([item[name] for item in items]) if batched else items[0][name]
                tensor, data = oip.input_tensor(name, array)
                request.inputs.append(tensor)
                request.raw_input_contents.append(data)
            if min_score > 0:
                request.parameters[oip.MIN_SCORE].double_param = min_score
            response = await self._call(self._stub.ModelInfer, request, deadline)
        except (StageUnavailable, DeadlineExceeded, Overloaded):
            raise  # the stage's state, not these items': the whole call fails, as before OIP
        except InferlineError as exc:
            return [exc] * len(items)
        try:
            outputs = oip.decode_outputs(response)
        except InvalidInput as exc:
            raise StageFailed(f"inference stage answered a malformed output: {exc}") from None
        if not batched:
            return [outputs]
        try:
            results: list[Outcome[Outputs]] = list(oip.unstack_items(outputs))
        except ValueError as exc:
            raise StageFailed(f"inference stage: {exc}") from None
        expect(len(results), len(items), "inference")
        return results


def _groups(model: ModelInfo, items: Sequence[Outputs]) -> list[list[int]]:
    """Indices of the items that can share one ModelInfer: one input shape and dtype (a model
    without a batch dimension takes one item a request), at most ``max_batch_size`` each."""
    if model.max_batch_size == 0:
        return [[k] for k in range(len(items))]
    by_shape: dict[tuple, list[int]] = {}
    for k, item in enumerate(items):
        key = tuple((name, array.shape, array.dtype.str) for name, array in item.items())
        by_shape.setdefault(key, []).append(k)
    size = model.max_batch_size
    return [group[i : i + size] for group in by_shape.values() for i in range(0, len(group), size)]


class GrpcPostprocess:
    def __init__(self, channel: grpc.aio.Channel, call: _Caller):
        self._stub = postprocess_pb2_grpc.PostprocessServiceStub(channel)
        self._call = call

    async def detections(
        self,
        recipe: Recipe,
        options: DetectOptions,
        labels: Sequence[str],
        items: Sequence[tuple[Outputs, ImageTransform]],
        deadline: Deadline,
    ) -> list[Outcome[list[Detection]]]:
        request = postprocess_pb2.PostprocessRequest(
            recipe=recipe.to_proto(),
            options=options.to_proto(),
            labels=labels,
            items=[
                postprocess_pb2.PostprocessItem(
                    outputs=[tensors.to_proto(array, name) for name, array in outputs.items()],
                    transform=_transform_proto(transform),
                )
                for outputs, transform in items
            ],
        )
        response = await self._call(self._stub.Postprocess, request, deadline)
        expect(len(response.results), len(items), "postprocess")
        return [error_from_status(r.status) or detections_from_proto(r.detections) for r in response.results]

    async def render(self, format: str, items: Sequence[RenderItem], deadline: Deadline) -> list[Rendering]:
        request = postprocess_pb2.RenderRequest(
            format=ENUM_BY_FORMAT[format],
            items=[
                postprocess_pb2.RenderItem(
                    name=item.name, width=item.width, height=item.height,
                    detections=[d.to_proto() for d in item.detections], image=item.image,
                )
                for item in items
            ],
        )
        response = await self._call(self._stub.Render, request, deadline)
        expect(len(response.renderings), len(items), "postprocess")
        return [Rendering.from_proto(r) for r in response.renderings]

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
        request = postprocess_pb2.EmbeddingsRequest(
            images=[tensors.to_proto(v, "embedding") for v in images],
            texts=[tensors.to_proto(v, "embedding") for v in texts],
            logit_scale=logit_scale,
            top_k=top_k,
            cluster=cluster.to_proto(),
        )
        response = await self._call(self._stub.Embeddings, request, deadline)
        expect(len(response.images), len(images), "postprocess")
        expect(len(response.texts), len(texts), "postprocess")
        return Embeddings(
            images=_rows(response.images),
            texts=_rows(response.texts),
            zero_shot=[Ranking.from_proto(r) for r in response.zero_shot],
            text_to_images=[Ranking.from_proto(r) for r in response.text_to_images],
            clusters=list(response.clusters),
        )


def _rows(messages: Sequence[types_pb2.Tensor]) -> np.ndarray:
    return np.stack([tensors.from_proto(t) for t in messages]) if messages else np.zeros((0, 0), np.float32)


class GrpcStages:
    """The three ports over gRPC, with the watch on the stages that makes the controller's
    readiness (``stages.StageWatcher``)."""

    def __init__(self, settings: Settings):
        self.targets = {stage: settings.target(stage) for stage in PIPELINE_STAGES}
        self._channels = {stage: create_channel(target, settings) for stage, target in self.targets.items()}
        self.watcher = StageWatcher(settings, self.targets)
        callers = {stage: _Caller(stage, target, self.watcher) for stage, target in self.targets.items()}
        self.preprocess = GrpcPreprocess(self._channels["preprocess"], callers["preprocess"])
        self.inference = GrpcInference(self._channels["inference"], callers["inference"])
        self.postprocess = GrpcPostprocess(self._channels["postprocess"], callers["postprocess"])

    async def load(self) -> None:
        """One check of every stage before the controller takes a call."""
        await self.watcher.poll()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        await self.watcher.close()
