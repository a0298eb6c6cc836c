"""The public operations on domain values, planned per model and run through the stage ports.

Each operation takes a request from common/api.py and returns its result there; the servicer
converts protos at the edge, and the stages are ports (``ports.py``) that may be a process away
or in this one. A model's plan (``plan.py``) says what to run; the task registry
(common/tasks.py) says which operation serves which model. Items that fail in one stage carry
their error to the end and skip the later stages; the rest of the batch goes on. Work that does
not depend on each other (an image tower and a text tower) runs concurrently.

Admission (``admission.py``) takes or refuses each request after its cheap checks (counts,
options, the cached plan) and before any stage call that does work, so a refusal costs no
decode. Concurrent parts of one request run with ``together``: the first failure cancels the
rest, and a caller who goes away (gRPC cancels the handler) cancels every stage call in flight,
which frees the work they had queued downstream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from inferline.common.api import (
    FORMAT_BY_ENUM,
    ClassifyRequest,
    ClassifyResult,
    DetectRequest,
    DetectResult,
    Embedded,
    EmbedRequest,
    EmbedResult,
    ImageDetections,
    ImageInput,
    ImageLabels,
    TextRanking,
)
from inferline.common.detections import DetectOptions
from inferline.common.errors import DeadlineExceeded, InvalidInput, Overloaded, StageFailed, WrongTask, quoted
from inferline.common.model_info import ModelInfo
from inferline.common.settings import Settings
from inferline.common.transform import ImageTransform, Region
from inferline.services.controller.admission import Admission, AdmissionConfig
from inferline.services.controller.plan import ModelPlan, PlanCache
from inferline.services.controller.ports import Deadline, Inputs, Outcome, Outputs, RenderItem, Stages

T = TypeVar("T")
# Item errors that say the stack took more than it could finish: admission backs off.
OVERLOAD_ERRORS = (DeadlineExceeded, Overloaded)
FORMATS = tuple(FORMAT_BY_ENUM.values())


@dataclass(frozen=True)
class Encoded:
    """One image, region or text after preprocess and inference: the model's outputs."""

    outputs: Outputs
    transform: ImageTransform | None = None


class Timings:
    """Wall time per stage for one request. Slices of a request run concurrently, so a stage's
    time is the union of its calls' intervals, never their sum: "preprocess" never exceeds
    "total"."""

    def __init__(self) -> None:
        self._spans: dict[str, list[tuple[float, float]]] = {}

    async def timed(self, key: str, job: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await job
        finally:
            self.add(key, started)

    def add(self, key: str, started: float) -> None:
        self._spans.setdefault(key, []).append((started, time.perf_counter()))

    @property
    def ms(self) -> dict[str, float]:
        return {key: _union(spans) * 1000 for key, spans in self._spans.items()}


def _union(spans: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class Controller:
    def __init__(self, settings: Settings, stages: Stages):
        self.settings = settings
        self.stages = stages
        self.plans = PlanCache(stages.inference.model)
        self.admission = Admission(admission_config(settings))

    # ---- models -------------------------------------------------------------------------

    async def model_info(self, name: str, deadline: Deadline) -> ModelInfo:
        return (await self.plans.get(name, deadline)).info

    async def list_models(self, deadline: Deadline) -> list[ModelInfo]:
        return await self.stages.inference.models(deadline)

    async def _plan_for(self, name: str, operation: str, deadline: Deadline, what: str | None = None) -> ModelPlan:
        plan = await self.plans.get(name, deadline)
        plan.check_serves(operation, what)
        return plan

    async def _text_tower(self, image_model: ModelPlan, operation: str, deadline: Deadline) -> ModelPlan:
        if not image_model.text_model:
            raise WrongTask(
                f"model {image_model.name!r} has no text tower; {operation} needs a model such as clip-vit-b-32"
            )
        return await self.plans.get(image_model.text_model, deadline)

    # ---- stage plumbing -----------------------------------------------------------------

    async def _encode_images(
        self,
        plan: ModelPlan,
        images: Sequence[ImageInput],
        deadline: Deadline,
        timings: Timings,
        *,
        regions: Sequence[Region] = (),
        prefix: str = "",
        min_score: float = 0.0,
    ) -> list[Outcome[Encoded]]:
        """Preprocess images (or regions of them) and run the model on what survived."""
        pre = await timings.timed(
            f"{prefix}preprocess",
            self.stages.preprocess.images(plan.preprocess, [image.data for image in images], regions, deadline),
        )
        return await self._infer(
            plan, [p if isinstance(p, Exception) else ({plan.input_name: p.tensor}, p.transform) for p in pre],
            deadline, timings, prefix, min_score,
        )

    async def _encode_texts(
        self, plan: ModelPlan, texts: Sequence[str], deadline: Deadline, timings: Timings, prefix: str = "text_"
    ) -> list[Outcome[Encoded]]:
        pre = await timings.timed(f"{prefix}preprocess", self.stages.preprocess.texts(plan.preprocess, texts, deadline))
        return await self._infer(
            plan, [t if isinstance(t, Exception) else ({plan.input_name: t}, None) for t in pre],
            deadline, timings, prefix, 0.0,
        )

    async def _infer(
        self,
        plan: ModelPlan,
        inputs: Sequence[Outcome[tuple[Inputs, ImageTransform | None]]],
        deadline: Deadline,
        timings: Timings,
        prefix: str,
        min_score: float,
    ) -> list[Outcome[Encoded]]:
        items: list[Outcome[Encoded]] = [i if isinstance(i, Exception) else Encoded({}, i[1]) for i in inputs]
        alive = [k for k, item in enumerate(inputs) if not isinstance(item, Exception)]
        if not alive:
            return items
        outputs = await timings.timed(
            f"{prefix}inference",
            self.stages.inference.infer(plan.info, [_ok(inputs[k])[0] for k in alive], min_score, deadline),
        )
        for k, result in zip(alive, outputs, strict=True):
            items[k] = result if isinstance(result, Exception) else Encoded(result, _ok(items[k]).transform)
        return items

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
            raise InvalidInput(
                f"{len(texts)} {what} is over the limit of {self.settings.max_labels} (INFERLINE_MAX_LABELS)"
            )
        limit = self.settings.max_text_bytes
        for index, text in enumerate(texts):
            size = len(text.encode("utf-8"))
            if size > limit:
                raise InvalidInput(
                    f"{what}[{index}] ({quoted(text, 40)}) is {size} bytes, over the limit of {limit} "
                    "(INFERLINE_MAX_TEXT_BYTES); the model's context holds far less: shorten it"
                )

    def _validate_images(self, images: Sequence[ImageInput], required: bool = True) -> None:
        if required and not images:
            raise InvalidInput("no images in the request")
        if len(images) > self.settings.max_batch_images:
            raise InvalidInput(
                f"{len(images)} images in one request is over the limit of "
                f"{self.settings.max_batch_images} (INFERLINE_MAX_BATCH_IMAGES); split the batch"
            )

    async def _label_embeddings(
        self, image_model: ModelPlan, labels: Sequence[str], deadline: Deadline, timings: Timings
    ) -> tuple[list[np.ndarray], float]:
        """The text tower's outputs for the caller's labels (all must succeed) and the logit scale."""
        self._validate_labels(labels)
        text_model = await self._text_tower(image_model, "zero-shot classification", deadline)
        if image_model.logit_scale is None:
            raise StageFailed(f"model {image_model.name!r} reports no logit_scale in its metadata")
        items = await self._encode_texts(text_model, labels, deadline, timings)
        embeddings = []
        for label, item in zip(labels, items, strict=True):
            if isinstance(item, Exception):
                raise InvalidInput(f"label {quoted(label)}: {item}")
            embeddings.append(_first(item))
        return embeddings, image_model.logit_scale

    # ---- Detect (and segment) -----------------------------------------------------------

    async def detect(self, request: DetectRequest, deadline: Deadline) -> DetectResult:
        started = time.perf_counter()
        self._validate_images(request.images)
        for name in request.render:
            if name not in FORMATS:
                raise InvalidInput(f"render format {quoted(name)} is not one of {', '.join(FORMATS)}")
        options = request.options.validate()
        if request.classify_with:
            self._validate_labels(request.labels)
        elif request.labels:
            raise InvalidInput("labels are for re-labelling boxes: set classify_with to a zero-shot model too")
        plan = await self._plan_for(request.model, "Detect", deadline)
        classifier = (
            await self._plan_for(request.classify_with, "Detect.classify_with", deadline, "classify_with")
            if request.classify_with else None
        )
        admission = self.admission.model(plan.name)
        async with admission.admitted(len(request.images), deadline.left):
            result = await self._detect(request, plan.resolved(options), plan, classifier, deadline, started)
        if any(isinstance(image.error, OVERLOAD_ERRORS) for image in result.images):
            admission.dropped()
        return result

    async def _detect(
        self,
        request: DetectRequest,
        options: DetectOptions,
        plan: ModelPlan,
        classifier: ModelPlan | None,
        deadline: Deadline,
        started: float,
    ) -> DetectResult:
        timings = Timings()
        results = [ImageDetections(name=image.name) for image in request.images]
        # A client batch goes through the stages in slices, concurrently: the first slice's
        # inference overlaps the next one's decoding, and the inference stage's batcher joins
        # the slices (with other requests' images) into its own batches again.
        size = max(1, self.settings.pipeline_slice)
        slices = [range(start, min(start + size, len(results))) for start in range(0, len(results), size)]
        await together(
            *(self._detect_slice(plan, request, options, results, list(part), deadline, timings) for part in slices)
        )
        alive = [i for i, result in enumerate(results) if result.error is None]

        if classifier is not None and alive:
            await self._relabel(classifier, request, results, alive, deadline, timings)

        for name in request.render if alive else ():
            items = [
                RenderItem(
                    results[i].name, results[i].width, results[i].height, results[i].detections,
                    request.images[i].data if name == "png" else b"",
                )
                for i in alive
            ]
            rendered = await timings.timed("render", self.stages.postprocess.render(name, items, deadline))
            for i, rendering in zip(alive, rendered, strict=True):
                results[i].renderings.append(rendering)

        timings.add("total", started)
        return DetectResult(plan.name, plan.version, results, timings.ms)

    async def _detect_slice(
        self,
        plan: ModelPlan,
        request: DetectRequest,
        options: DetectOptions,
        results: list[ImageDetections],
        indices: list[int],
        deadline: Deadline,
        timings: Timings,
    ) -> None:
        """Preprocess, inference and postprocess for the images at ``indices``, into ``results``."""
        # The inference stage may drop the candidates the NMS would drop first at this
        # confidence (a model declares such a candidate filter in its config).
        items = await self._encode_images(
            plan, [request.images[i] for i in indices], deadline, timings, min_score=options.conf or 0.0
        )
        mine = [results[i] for i in indices]
        for result, item in zip(mine, items, strict=True):
            if not isinstance(item, Exception) and item.transform is not None:
                result.width, result.height = item.transform.orig_width, item.transform.orig_height
        alive = _settle(mine, items)
        if not alive:
            return
        detected = await timings.timed(
            "postprocess",
            self.stages.postprocess.detections(
                plan.postprocess, options, plan.labels,
                [_with_transform(items[k]) for k in alive],
                deadline,
            ),
        )
        for k, outcome in zip(alive, detected, strict=True):
            if isinstance(outcome, Exception):
                mine[k].error = outcome
            else:
                mine[k].detections.extend(outcome)

    async def _relabel(
        self,
        classifier: ModelPlan,
        request: DetectRequest,
        results: list[ImageDetections],
        alive: Sequence[int],
        deadline: Deadline,
        timings: Timings,
    ) -> None:
        """Crops every box (one preprocess call for all of them) and labels each crop zero-shot."""
        boxes = [(i, k) for i in alive for k in range(len(results[i].detections))]
        if not boxes:
            return
        regions = [Region(i, results[i].detections[k].box) for i, k in boxes]
        crops, (texts, scale) = await together(
            self._encode_images(classifier, request.images, deadline, timings, regions=regions, prefix="crop_"),
            self._label_embeddings(classifier, request.labels, deadline, timings),
        )
        cropped = [k for k, crop in enumerate(crops) if not isinstance(crop, Exception)]
        if not cropped:
            return
        scored = await timings.timed(
            "postprocess",
            self.stages.postprocess.embeddings(
                [_first(crops[k]) for k in cropped], texts, deadline, logit_scale=scale, top_k=1
            ),
        )
        for k, ranking in zip(cropped, scored.zero_shot, strict=True):
            i, d = boxes[k]
            results[i].detections[d] = dataclasses.replace(
                results[i].detections[d], zero_shot=(request.labels[ranking.indices[0]], ranking.scores[0])
            )

    # ---- Classify and Embed -------------------------------------------------------------

    async def classify(self, request: ClassifyRequest, deadline: Deadline) -> ClassifyResult:
        started = time.perf_counter()
        self._validate_images(request.images)
        self._validate_labels(request.labels)
        if request.top_k < 0:
            raise InvalidInput(f"top_k must be 0 (all labels) or more, got {request.top_k}")
        plan = await self._plan_for(request.model, "Classify", deadline)
        async with self.admission.model(plan.name).admitted(len(request.images), deadline.left):
            return await self._classify(request, plan, deadline, started)

    async def _classify(
        self, request: ClassifyRequest, plan: ModelPlan, deadline: Deadline, started: float
    ) -> ClassifyResult:
        timings = Timings()
        items, (texts, scale) = await together(
            self._encode_images(plan, request.images, deadline, timings),
            self._label_embeddings(plan, request.labels, deadline, timings),
        )
        results = [ImageLabels(name=image.name) for image in request.images]
        alive = _settle(results, items)
        if alive:
            scored = await timings.timed(
                "postprocess",
                self.stages.postprocess.embeddings(
                    [_first(items[i]) for i in alive], texts, deadline,
                    logit_scale=scale, top_k=request.top_k or len(request.labels),
                ),
            )
            _expect(len(scored.zero_shot), len(alive), "postprocess")
            for i, ranking in zip(alive, scored.zero_shot, strict=True):
                results[i].labels = [
                    (request.labels[j], s) for j, s in zip(ranking.indices, ranking.scores, strict=True)
                ]
        timings.add("total", started)
        return ClassifyResult(plan.name, results, timings.ms)

    async def embed(self, request: EmbedRequest, deadline: Deadline) -> EmbedResult:
        started = time.perf_counter()
        if not request.images and not request.texts:
            raise InvalidInput("nothing to embed: give images, texts or both")
        self._validate_images(request.images, required=False)
        self._validate_texts(request.texts, "texts")
        if request.cluster.k < 0 or not 0 <= request.cluster.threshold <= 1:
            raise InvalidInput("cluster.k must be >= 0 and cluster.threshold within [0, 1]")
        plan = await self._plan_for(request.model, "Embed", deadline)
        async with self.admission.model(plan.name).admitted(len(request.images) + len(request.texts), deadline.left):
            return await self._embed(request, plan, deadline, started)

    async def _embed(self, request: EmbedRequest, plan: ModelPlan, deadline: Deadline, started: float) -> EmbedResult:
        timings = Timings()
        image_job = self._encode_images(plan, request.images, deadline, timings) if request.images else _nothing()
        text_job = self._embed_texts(plan, request.texts, deadline, timings) if request.texts else _nothing()
        image_items, text_items = await together(image_job, text_job)
        result = EmbedResult(
            model=plan.name,
            images=[Embedded(image.name) for image in request.images],
            texts=[Embedded(text) for text in request.texts],
        )
        images_ok = _settle(result.images, image_items)
        texts_ok = _settle(result.texts, text_items)
        if images_ok or texts_ok:
            total = len(images_ok) + len(texts_ok)
            if request.cluster.k > total:
                raise InvalidInput(f"cluster.k={request.cluster.k} is more than the {total} embedded items")
            out = await timings.timed(
                "postprocess",
                self.stages.postprocess.embeddings(
                    [_first(image_items[i]) for i in images_ok],
                    [_first(text_items[i]) for i in texts_ok],
                    deadline,
                    cluster=request.cluster,
                ),
            )
            for i, row in zip(images_ok, out.images, strict=True):
                result.images[i].embedding = _floats(row)
            for i, row in zip(texts_ok, out.texts, strict=True):
                result.texts[i].embedding = _floats(row)
            # Rankings exist only when some image was embedded too.
            for t, ranking in zip(texts_ok, out.text_to_images, strict=False):
                result.rankings.append(
                    TextRanking(request.texts[t], [images_ok[k] for k in ranking.indices], list(ranking.scores))
                )
            if out.clusters:
                assigned = dict(
                    zip([("i", i) for i in images_ok] + [("t", i) for i in texts_ok], out.clusters, strict=True)
                )
                result.clusters = [assigned.get(("i", i), -1) for i in range(len(request.images))] + [
                    assigned.get(("t", i), -1) for i in range(len(request.texts))
                ]
        timings.add("total", started)
        result.timings_ms = timings.ms
        return result

    async def _embed_texts(
        self, plan: ModelPlan, texts: Sequence[str], deadline: Deadline, timings: Timings
    ) -> list[Outcome[Encoded]]:
        text_model = await self._text_tower(plan, "embedding texts", deadline)
        return await self._encode_texts(text_model, texts, deadline, timings)


async def _nothing() -> list[Outcome[Encoded]]:
    return []


async def together(*jobs: Awaitable[Any]) -> list[Any]:
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


def admission_config(settings: Settings) -> AdmissionConfig:
    return AdmissionConfig(
        enabled=settings.admission,
        initial_limit=settings.admission_initial_limit,
        min_limit=settings.admission_min_limit,
        max_limit=settings.admission_max_limit,
        deadline_margin=settings.admission_deadline_margin,
        queue_s=settings.admission_queue_s,
        wait_s=settings.admission_wait_s,
        max_retry_s=settings.admission_max_retry_s,
    )


def _ok(item: Outcome[T]) -> T:
    """An item ``_settle`` (or an ``alive`` list) kept: never an error."""
    if isinstance(item, Exception):
        raise StageFailed("a failed item reached a later stage") from item
    return item


def _first(item: Outcome[Encoded]) -> np.ndarray:
    """A one-output model's output (an embedding tower's vector)."""
    return next(iter(_ok(item).outputs.values()))


def _with_transform(item: Outcome[Encoded]) -> tuple[Outputs, ImageTransform]:
    """An image's outputs and the transform postprocess maps them back with."""
    encoded = _ok(item)
    if encoded.transform is None:
        raise StageFailed("preprocess answered an image without its transform")
    return encoded.outputs, encoded.transform


def _floats(row: np.ndarray) -> list[float]:
    return np.asarray(row, dtype=float).ravel().tolist()


def _expect(got: int, wanted: int, stage: str) -> None:
    if got != wanted:
        raise StageFailed(f"{stage} stage answered {got} items for {wanted}")


def _settle(results: Sequence[Any], items: Sequence[Outcome[Encoded]]) -> list[int]:
    """Sets each failed item's error on its result; returns the indices still going."""
    alive = []
    for i, (result, item) in enumerate(zip(results, items, strict=True)):
        if isinstance(item, Exception):
            result.error = item
        else:
            alive.append(i)
    return alive
