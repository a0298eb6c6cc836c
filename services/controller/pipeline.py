"""The public operations, planned from model metadata and run through the three stages.

The controller hard-codes no model: the inference stage's ModelMetadata says which preprocess
and postprocess recipes a model needs, its labels, its task, and (for CLIP) which model is its
text tower. Items that fail in one stage carry their status to the end and skip the later
stages; the rest of the batch goes on. Work that does not depend on each other (an image tower
and a text tower) runs concurrently.

Admission (``admission.py``) takes or refuses each request after its cheap checks (counts,
options, the cached model metadata) and before any stage call that does work, so a refusal costs
no decode. Concurrent parts of one request run with ``_together``: the first failure cancels the
rest, and a caller who goes away (gRPC cancels the handler) cancels every stage call in flight,
which frees the work they had queued downstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.rpc import code_pb2

from inferline.common.detections import DetectOptions
from inferline.common.errors import InvalidInput, StageFailed, WrongTask, quoted
from inferline.common.generated import (
    controller_pb2,
    inference_pb2,
    postprocess_pb2,
    preprocess_pb2,
    types_pb2,
)
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.common.tensors import from_proto
from inferline.services.controller.admission import Admission, AdmissionConfig
from inferline.services.controller.stages import Deadline, StageClients

METADATA_TTL_S = 10.0
# Model names are folder names in the model repository: a longer name cannot exist, so it is
# refused before it travels to the inference stage.
MAX_MODEL_NAME_BYTES = 255
# Item statuses that say the stack took more than it could finish: admission backs off.
OVERLOAD_CODES = (code_pb2.DEADLINE_EXCEEDED, code_pb2.RESOURCE_EXHAUSTED)
RENDER_FORMATS = (types_pb2.RENDER_FORMAT_JSON, types_pb2.RENDER_FORMAT_CSV, types_pb2.RENDER_FORMAT_PNG)


@dataclass
class Item:
    """One image, region or text on its way through preprocess and inference."""

    status: types_pb2.Status | None = None  # set once the item failed
    transform: types_pb2.ImageTransform | None = None
    outputs: Sequence[types_pb2.Tensor] = ()

    @property
    def ok(self) -> bool:
        return self.status is None


@dataclass
class Timings:
    ms: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, started: float) -> None:
        self.ms[key] = self.ms.get(key, 0.0) + (time.perf_counter() - started) * 1000


class Controller:
    def __init__(self, settings: Settings, stages: StageClients):
        self.settings = settings
        self.stages = stages
        self._metadata: dict[str, tuple[float, inference_pb2.ModelMetadataResponse]] = {}
        self._refreshing: dict[str, asyncio.Future] = {}
        self.admission = Admission(admission_config(settings))

    # ---- models -------------------------------------------------------------------------

    async def model_metadata(self, name: str, deadline: Deadline) -> inference_pb2.ModelMetadataResponse:
        """Cached briefly: metadata changes only when the inference stage reloads.

        Stale metadata is served while one background call refreshes it, so admission never
        waits on the inference stage: under overload its event loop is the busiest, and every
        request arriving as the entry expired would otherwise wait on it before being refused.
        """
        self._validate_model_name(name)
        cached = self._metadata.get(name)
        if cached is None:
            return await self._fetch_metadata(name, deadline)
        if time.monotonic() - cached[0] >= METADATA_TTL_S and name not in self._refreshing:
            refresh = asyncio.ensure_future(self._refresh_metadata(name))
            self._refreshing[name] = refresh
            refresh.add_done_callback(lambda _: self._refreshing.pop(name, None))
        return cached[1]

    async def _fetch_metadata(self, name: str, deadline: Deadline) -> inference_pb2.ModelMetadataResponse:
        metadata = await self.stages.call(
            "inference", self.stages.inference.ModelMetadata, inference_pb2.ModelMetadataRequest(name=name), deadline
        )
        self._metadata[name] = (time.monotonic(), metadata)
        return metadata

    async def _refresh_metadata(self, name: str) -> None:
        """A failed refresh forgets the entry: the next request asks the stage and gets its error."""
        try:
            await self._fetch_metadata(name, Deadline(METADATA_TTL_S))
        except Exception:  # noqa: BLE001 - the next request's own call reports it
            self._metadata.pop(name, None)

    async def list_models(self, deadline: Deadline) -> inference_pb2.ListModelsResponse:
        return await self.stages.call(
            "inference", self.stages.inference.ListModels, inference_pb2.ListModelsRequest(), deadline
        )

    async def _model_for(self, name: str, task: str, operation: str, deadline: Deadline) -> inference_pb2.ModelMetadataResponse:
        metadata = await self.model_metadata(name, deadline)
        if metadata.task != task:
            raise WrongTask(f"model {quoted(name)} is a {metadata.task} model; {operation} needs a {task} model")
        return metadata

    async def _text_tower(self, image_model: inference_pb2.ModelMetadataResponse, operation: str, deadline: Deadline) -> inference_pb2.ModelMetadataResponse:
        text_model = Recipe.from_proto(image_model.postprocess).params.get("text_model")
        if not text_model:
            raise WrongTask(f"model {image_model.name!r} has no text tower; {operation} needs a model such as clip-vit-b-32")
        return await self.model_metadata(str(text_model), deadline)

    # ---- stage plumbing -----------------------------------------------------------------

    async def _call(self, timings: Timings, key: str, stage: str, method, request, deadline: Deadline):
        started = time.perf_counter()
        try:
            return await self.stages.call(stage, method, request, deadline)
        finally:
            timings.add(key, started)

    async def _encode(
        self,
        model: inference_pb2.ModelMetadataResponse,
        request: preprocess_pb2.PreprocessRequest,
        deadline: Deadline,
        timings: Timings,
        prefix: str = "",
        min_score: float = 0.0,
    ) -> list[Item]:
        """Preprocess (images, regions or texts) and run the model on what survived."""
        request.recipe.CopyFrom(model.preprocess)
        pre = await self._call(timings, f"{prefix}preprocess", "preprocess", self.stages.preprocess.Preprocess, request, deadline)
        produced = pre.texts if request.texts else pre.images
        wanted = len(request.texts) or len(request.regions) or len(request.images)
        _expect(len(produced), wanted, "preprocess")
        items = [
            Item(status=None if p.status.code == 0 else p.status, transform=getattr(p, "transform", None))
            for p in produced
        ]
        alive = [i for i, item in enumerate(items) if item.ok]
        if not alive:
            return items
        infer = await self._call(
            timings, f"{prefix}inference", "inference", self.stages.inference.ModelInfer,
            inference_pb2.ModelInferRequest(
                model_name=model.name,
                model_version=model.versions[0] if model.versions else "",
                items=[inference_pb2.InferItem(inputs=[produced[i].tensor]) for i in alive],
                min_score=min_score,
            ),
            deadline,
        )
        _expect(len(infer.results), len(alive), "inference")
        for i, result in zip(alive, infer.results):
            if result.status.code == 0:
                items[i].outputs = result.outputs
            else:
                items[i].status = result.status
        return items

    async def _embeddings(self, timings: Timings, request: postprocess_pb2.EmbeddingsRequest, deadline: Deadline) -> postprocess_pb2.EmbeddingsResponse:
        return await self._call(timings, "postprocess", "postprocess", self.stages.postprocess.Embeddings, request, deadline)

    async def _label_embeddings(
        self, image_model: inference_pb2.ModelMetadataResponse, labels: Sequence[str], deadline: Deadline, timings: Timings
    ) -> tuple[list[types_pb2.Tensor], float]:
        """The text tower's outputs for the caller's labels (all must succeed) and the logit scale."""
        self._validate_labels(labels)
        text_model = await self._text_tower(image_model, "zero-shot classification", deadline)
        scale = Recipe.from_proto(image_model.postprocess).params.get("logit_scale")
        if scale is None:
            raise StageFailed(f"model {image_model.name!r} reports no logit_scale in its metadata")
        items = await self._encode(text_model, preprocess_pb2.PreprocessRequest(texts=labels), deadline, timings, "text_")
        for label, item in zip(labels, items):
            if not item.ok:
                raise InvalidInput(f"label {quoted(label)}: {item.status.message}")
        return [item.outputs[0] for item in items], float(scale)

    def _validate_labels(self, labels: Sequence[str]) -> None:
        if not labels:
            raise InvalidInput("labels are required: give at least one candidate label or prompt")
        self._validate_texts(labels, "labels")
        if any(not label.strip() for label in labels):
            raise InvalidInput("labels must not be empty strings")

    def _validate_texts(self, texts: Sequence[str], what: str) -> None:
        """Counts and sizes before anything is tokenised: a label of 100 KB would be refused by
        the tokenizer only after cleaning and encoding all of it (and 255 more like it)."""
        if len(texts) > self.settings.max_labels:
            raise InvalidInput(f"{len(texts)} {what} is over the limit of {self.settings.max_labels} (INFERLINE_MAX_LABELS)")
        limit = self.settings.max_text_bytes
        for index, text in enumerate(texts):
            size = len(text.encode("utf-8"))
            if size > limit:
                raise InvalidInput(
                    f"{what}[{index}] ({quoted(text, 40)}) is {size} bytes, over the limit of {limit} "
                    "(INFERLINE_MAX_TEXT_BYTES); the model's context holds far less: shorten it"
                )

    def _validate_model_name(self, name: str, field: str = "model") -> None:
        if not name:
            raise InvalidInput(f"{field} is required; ListModels shows what is served")
        if len(name.encode("utf-8")) > MAX_MODEL_NAME_BYTES:
            raise InvalidInput(
                f"{field} {quoted(name)} is {len(name.encode('utf-8'))} bytes long; model names are at most "
                f"{MAX_MODEL_NAME_BYTES} (ListModels shows what is served)"
            )

    def _validate_images(self, images: Sequence[types_pb2.Image], required: bool = True) -> None:
        if required and not images:
            raise InvalidInput("no images in the request")
        if len(images) > self.settings.max_batch_images:
            raise InvalidInput(
                f"{len(images)} images in one request is over the limit of "
                f"{self.settings.max_batch_images} (INFERLINE_MAX_BATCH_IMAGES); split the batch"
            )

    # ---- Detect -------------------------------------------------------------------------

    async def detect(self, request: controller_pb2.DetectRequest, deadline: Deadline) -> controller_pb2.DetectResponse:
        started = time.perf_counter()
        self._validate_images(request.images)
        for render_format in request.render:
            if render_format not in RENDER_FORMATS:
                raise InvalidInput(f"render format {render_format} is not one of RENDER_FORMAT_JSON, _CSV, _PNG")
        options = DetectOptions.from_proto(request.options)
        if request.classify_with:
            self._validate_labels(request.labels)
        elif request.labels:
            raise InvalidInput("labels are for re-labelling boxes: set classify_with to a zero-shot model too")
        metadata = await self._model_for(request.model, "detect", "Detect", deadline)
        classifier = await self._model_for(request.classify_with, "embed", "classify_with", deadline) if request.classify_with else None
        admission = self.admission.model(metadata.name)
        with admission.admit(len(request.images), _left(deadline)):
            response = await self._detect(request, options, metadata, classifier, deadline, started)
        if any(result.status.code in OVERLOAD_CODES for result in response.results):
            admission.dropped()
        return response

    async def _detect(
        self,
        request: controller_pb2.DetectRequest,
        options: DetectOptions,
        metadata: inference_pb2.ModelMetadataResponse,
        classifier: inference_pb2.ModelMetadataResponse | None,
        deadline: Deadline,
        started: float,
    ) -> controller_pb2.DetectResponse:
        timings = Timings()
        results = [controller_pb2.ImageResult(name=image.name) for image in request.images]

        # The inference stage drops the candidates the NMS would drop first at this confidence.
        conf = options.resolved(Recipe.from_proto(metadata.postprocess).params)[0]
        # A client batch goes through the stages in slices, concurrently: the first slice's
        # inference overlaps the next one's decoding, and the inference stage's batcher joins
        # the slices (with other requests' images) into its own batches again.
        size = max(1, self.settings.pipeline_slice)
        slices = [range(start, min(start + size, len(results))) for start in range(0, len(results), size)]
        await _together(*(
            self._detect_slice(metadata, request, results, list(part), conf, deadline, timings) for part in slices
        ))
        alive = [i for i, result in enumerate(results) if result.status.code == 0]

        if classifier is not None and alive:
            await self._relabel(classifier, request, results, alive, deadline, timings)

        for render_format in request.render if alive else ():
            with_image = render_format == types_pb2.RENDER_FORMAT_PNG
            rendered = await self._call(
                timings, "render", "postprocess", self.stages.postprocess.Render,
                postprocess_pb2.RenderRequest(
                    format=render_format,
                    items=[
                        postprocess_pb2.RenderItem(
                            name=results[i].name, width=results[i].width, height=results[i].height,
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

        timings.add("total", started)
        return controller_pb2.DetectResponse(
            model=metadata.name, model_version=metadata.versions[0] if metadata.versions else "",
            results=results, timings_ms=timings.ms,
        )

    async def _detect_slice(
        self,
        metadata: inference_pb2.ModelMetadataResponse,
        request: controller_pb2.DetectRequest,
        results: list[controller_pb2.ImageResult],
        indices: list[int],
        conf: float,
        deadline: Deadline,
        timings: Timings,
    ) -> None:
        """Preprocess, inference and postprocess for the images at ``indices``, into ``results``."""
        images = [request.images[i] for i in indices]
        items = await self._encode(
            metadata, preprocess_pb2.PreprocessRequest(images=images), deadline, timings, min_score=conf
        )
        mine = [results[i] for i in indices]
        for result, item in zip(mine, items):
            if item.transform is not None and item.ok:
                result.width, result.height = item.transform.orig_width, item.transform.orig_height
        alive = _settle(mine, items)
        if not alive:
            return
        post = await self._call(
            timings, "postprocess", "postprocess", self.stages.postprocess.Postprocess,
            postprocess_pb2.PostprocessRequest(
                recipe=metadata.postprocess,
                options=request.options,
                labels=metadata.labels,
                items=[postprocess_pb2.PostprocessItem(outputs=items[k].outputs, transform=items[k].transform) for k in alive],
            ),
            deadline,
        )
        _expect(len(post.results), len(alive), "postprocess")
        for k, result in zip(alive, post.results):
            if result.status.code == 0:
                mine[k].detections.extend(result.detections)
            else:
                mine[k].status.CopyFrom(result.status)

    async def _relabel(
        self,
        classifier: inference_pb2.ModelMetadataResponse,
        request: controller_pb2.DetectRequest,
        results: list[controller_pb2.ImageResult],
        alive: Sequence[int],
        deadline: Deadline,
        timings: Timings,
    ) -> None:
        """Crops every box (one preprocess call for all of them) and labels each crop zero-shot."""
        boxes = [(i, d) for i in alive for d in results[i].detections]
        if not boxes:
            return
        regions = [types_pb2.Region(image=i, box=d.box) for i, d in boxes]
        crops, (texts, scale) = await _together(
            self._encode(classifier, preprocess_pb2.PreprocessRequest(images=request.images, regions=regions), deadline, timings, "crop_"),
            self._label_embeddings(classifier, request.labels, deadline, timings),
        )
        cropped = [k for k, crop in enumerate(crops) if crop.ok]
        if not cropped:
            return
        scored = await self._embeddings(
            timings,
            postprocess_pb2.EmbeddingsRequest(images=[crops[k].outputs[0] for k in cropped], texts=texts, logit_scale=scale, top_k=1),
            deadline,
        )
        for k, ranking in zip(cropped, scored.zero_shot):
            detection = boxes[k][1]
            detection.zero_shot.label = request.labels[ranking.indices[0]]
            detection.zero_shot.score = ranking.scores[0]

    # ---- Classify and Embed -------------------------------------------------------------

    async def classify(self, request: controller_pb2.ClassifyRequest, deadline: Deadline) -> controller_pb2.ClassifyResponse:
        started = time.perf_counter()
        self._validate_images(request.images)
        self._validate_labels(request.labels)
        if request.top_k < 0:
            raise InvalidInput(f"top_k must be 0 (all labels) or more, got {request.top_k}")
        model = await self._model_for(request.model, "embed", "Classify", deadline)
        with self.admission.model(model.name).admit(len(request.images), _left(deadline)):
            return await self._classify(request, model, deadline, started)

    async def _classify(
        self, request: controller_pb2.ClassifyRequest, model: inference_pb2.ModelMetadataResponse, deadline: Deadline, started: float
    ) -> controller_pb2.ClassifyResponse:
        timings = Timings()
        items, (texts, scale) = await _together(
            self._encode(model, preprocess_pb2.PreprocessRequest(images=request.images), deadline, timings),
            self._label_embeddings(model, request.labels, deadline, timings),
        )
        results = [controller_pb2.ClassifyResult(name=image.name) for image in request.images]
        alive = _settle(results, items)
        if alive:
            scored = await self._embeddings(
                timings,
                postprocess_pb2.EmbeddingsRequest(
                    images=[items[i].outputs[0] for i in alive], texts=texts, logit_scale=scale,
                    top_k=request.top_k or len(request.labels),
                ),
                deadline,
            )
            _expect(len(scored.zero_shot), len(alive), "postprocess")
            for i, ranking in zip(alive, scored.zero_shot):
                results[i].labels.extend(
                    types_pb2.LabelScore(label=request.labels[j], score=s) for j, s in zip(ranking.indices, ranking.scores)
                )
        timings.add("total", started)
        return controller_pb2.ClassifyResponse(model=model.name, results=results, timings_ms=timings.ms)

    async def embed(self, request: controller_pb2.EmbedRequest, deadline: Deadline) -> controller_pb2.EmbedResponse:
        started = time.perf_counter()
        if not request.images and not request.texts:
            raise InvalidInput("nothing to embed: give images, texts or both")
        self._validate_images(request.images, required=False)
        self._validate_texts(request.texts, "texts")
        if request.cluster.k < 0 or not 0 <= request.cluster.threshold <= 1:
            raise InvalidInput("cluster.k must be >= 0 and cluster.threshold within [0, 1]")
        model = await self._model_for(request.model, "embed", "Embed", deadline)
        with self.admission.model(model.name).admit(len(request.images) + len(request.texts), _left(deadline)):
            return await self._embed(request, model, deadline, started)

    async def _embed(
        self, request: controller_pb2.EmbedRequest, model: inference_pb2.ModelMetadataResponse, deadline: Deadline, started: float
    ) -> controller_pb2.EmbedResponse:
        timings = Timings()
        image_job = self._encode(model, preprocess_pb2.PreprocessRequest(images=request.images), deadline, timings) if request.images else _nothing()
        text_job = self._embed_texts(model, request.texts, deadline, timings) if request.texts else _nothing()
        image_items, text_items = await _together(image_job, text_job)
        response = controller_pb2.EmbedResponse(
            model=model.name,
            images=[controller_pb2.EmbeddedImage(name=image.name) for image in request.images],
            texts=[controller_pb2.EmbeddedText(text=text) for text in request.texts],
        )
        images_ok = _settle(response.images, image_items)
        texts_ok = _settle(response.texts, text_items)
        if images_ok or texts_ok:
            total = len(images_ok) + len(texts_ok)
            if request.cluster.k > total:
                raise InvalidInput(f"cluster.k={request.cluster.k} is more than the {total} embedded items")
            out = await self._embeddings(
                timings,
                postprocess_pb2.EmbeddingsRequest(
                    images=[image_items[i].outputs[0] for i in images_ok],
                    texts=[text_items[i].outputs[0] for i in texts_ok],
                    cluster=request.cluster,
                ),
                deadline,
            )
            for i, tensor in zip(images_ok, out.images):
                response.images[i].embedding.extend(_floats(tensor))
            for i, tensor in zip(texts_ok, out.texts):
                response.texts[i].embedding.extend(_floats(tensor))
            for t, ranking in zip(texts_ok, out.text_to_images):
                response.rankings.add(
                    text=request.texts[t],
                    images=[images_ok[k] for k in ranking.indices],
                    scores=list(ranking.scores),
                )
            if out.clusters:
                assigned = dict(zip([("i", i) for i in images_ok] + [("t", i) for i in texts_ok], out.clusters))
                response.clusters.extend(
                    [assigned.get(("i", i), -1) for i in range(len(request.images))]
                    + [assigned.get(("t", i), -1) for i in range(len(request.texts))]
                )
        timings.add("total", started)
        response.timings_ms.update(timings.ms)
        return response

    async def _embed_texts(self, model: inference_pb2.ModelMetadataResponse, texts: Sequence[str], deadline: Deadline, timings: Timings) -> list[Item]:
        text_model = await self._text_tower(model, "embedding texts", deadline)
        return await self._encode(text_model, preprocess_pb2.PreprocessRequest(texts=texts), deadline, timings, "text_")


async def _nothing() -> list[Item]:
    return []


async def _together(*jobs: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather``, except that the first failure cancels the other jobs (plain gather
    lets them run on, doing stage work for a request whose caller already has its error)."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _left(deadline: Deadline) -> float:
    return deadline.expires - time.monotonic()


def admission_config(settings: Settings) -> AdmissionConfig:
    return AdmissionConfig(
        enabled=settings.admission,
        initial_limit=settings.admission_initial_limit,
        min_limit=settings.admission_min_limit,
        max_limit=settings.admission_max_limit,
        deadline_margin=settings.admission_deadline_margin,
        max_retry_s=settings.admission_max_retry_s,
    )


def _floats(tensor: types_pb2.Tensor) -> list[float]:
    return from_proto(tensor).astype(float).ravel().tolist()


def _expect(got: int, wanted: int, stage: str) -> None:
    if got != wanted:
        raise StageFailed(f"{stage} stage answered {got} items for {wanted}")


def _settle(results: Sequence, items: Sequence[Item]) -> list[int]:
    """Copies each failed item's status into its result; returns the indices still going."""
    alive = []
    for i, (result, item) in enumerate(zip(results, items)):
        if item.ok:
            alive.append(i)
        else:
            result.status.CopyFrom(item.status)
    return alive
