"""The controller's pipelines as Open Inference Protocol models: what each takes and gives, and
the conversions between OIP's numpy tensors and the operations' domain values.

A pipeline is one served model seen from outside, as a Triton ensemble for YOLO looks to its
users: encoded images (or UTF-8 texts) in, the final answer out, the stages hidden.

- detect and segment models: ``IMAGE`` (BYTES, one encoded image per batch item) in; the
  detections out in TensorRT EfficientNMS's convention, as Triton's YOLO ensembles give them:
  ``num_detections`` INT32 [1], ``detection_boxes`` FP32 [-1, 4] (x1, y1, x2, y2 in the
  original image's pixels), ``detection_scores`` FP32 [-1], ``detection_classes`` INT32 [-1],
  padded with zeros to the batch's largest count. A segment model's masks are not sent (OIP
  has no ragged masks; the public Detect call has them).
- embed models with a text tower (CLIP's image tower): ``IMAGE`` in, ``embedding`` FP32 [D]
  (L2-normalised, as Embed gives it) out; the text tower they name: ``TEXT`` (BYTES, UTF-8) in,
  ``embedding`` out, computed by Embed on the image tower (Embed embeds texts through it).

Everything is derived from the controller's model list (``Controller.list_models``): a new
model of a known task is a new pipeline with no code. Nothing here imports ``grpc``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from inferline.common.api import DetectRequest, DetectResult, EmbedRequest, EmbedResult, ImageInput
from inferline.common.detections import DetectOptions
from inferline.common.errors import (
    DeadlineExceeded,
    InferlineError,
    InvalidInput,
    ModelNotFound,
    StageUnavailable,
    quoted,
)
from inferline.common.model_info import ModelInfo
from inferline.common.oip_bytes import BYTES
from inferline.common.status import error_for, status_for
from inferline.common.tasks import tasks_for
from inferline.services.controller.ports import Deadline

if TYPE_CHECKING:
    from inferline.common.server import Service
    from inferline.services.controller.stages import StageWatcher
    from inferline.services.inference.service import Inference

log = logging.getLogger(__name__)

IMAGE = "IMAGE"
TEXT = "TEXT"
NUM_DETECTIONS = "num_detections"
DETECTION_BOXES = "detection_boxes"
DETECTION_SCORES = "detection_scores"
DETECTION_CLASSES = "detection_classes"
EMBEDDING = "embedding"
# ModelInfer parameters that become DetectOptions (int, double or a string of a number).
DETECT_PARAMETERS = ("conf", "iou", "max_det")
# The model list is asked again after this long (it changes only when the inference stage
# reloads), or sooner when a request names a model not in it.
CATALOG_TTL_S = 10.0
CATALOG_MISS_RETRY_S = 1.0


@dataclass(frozen=True)
class TensorSpec:
    """One input or output, its dims without the batch dimension (as in a Triton config)."""

    name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Pipeline:
    name: str
    version: str
    task: str
    # The public operation that runs it ("Detect" or "Embed") and the model it is called with
    # (a text tower's texts are embedded through its image tower).
    operation: str
    operation_model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # The served models it needs: it is ready when all are.
    models: tuple[str, ...]

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]


DETECTION_OUTPUTS = (
    TensorSpec(NUM_DETECTIONS, "INT32", (1,)),
    TensorSpec(DETECTION_BOXES, "FP32", (-1, 4)),
    TensorSpec(DETECTION_SCORES, "FP32", (-1,)),
    TensorSpec(DETECTION_CLASSES, "INT32", (-1,)),
)


def _embedding_dims(model: ModelInfo) -> tuple[int, ...]:
    return tuple(model.outputs[0].shape) if model.outputs else (-1,)


def pipelines_from(models: Sequence[ModelInfo]) -> dict[str, Pipeline]:
    """The pipelines of the served models, by name. An embed model that is neither an image
    tower with a text tower nor the text tower of a served one has no Embed path of its own
    and is left out."""
    detect_tasks = set(tasks_for("Detect"))
    by_name = {m.name: m for m in models}
    towers = {
        str(m.postprocess.params.get("text_model") or ""): m.name
        for m in models
        if m.task == "embed"
    }
    towers.pop("", None)
    pipelines: dict[str, Pipeline] = {}
    for m in models:
        version = m.version
        if m.task in detect_tasks:
            pipelines[m.name] = Pipeline(
                m.name, version, m.task, "Detect", m.name, (TensorSpec(IMAGE, BYTES, (1,)),), DETECTION_OUTPUTS,
                (m.name,),
            )
        elif m.name in towers and towers[m.name] in by_name:
            image_tower = towers[m.name]
            pipelines[m.name] = Pipeline(
                m.name, version, m.task, "Embed", image_tower, (TensorSpec(TEXT, BYTES, (1,)),),
                (TensorSpec(EMBEDDING, "FP32", _embedding_dims(m)),), (image_tower, m.name),
            )
        elif m.task == "embed" and m.name in towers.values():
            text_tower = next(text for text, image in towers.items() if image == m.name)
            pipelines[m.name] = Pipeline(
                m.name, version, m.task, "Embed", m.name, (TensorSpec(IMAGE, BYTES, (1,)),),
                (TensorSpec(EMBEDDING, "FP32", _embedding_dims(m)),), (m.name, text_tower),
            )
    return pipelines


class PipelineCatalog:
    """The pipelines, from the controller's model list, cached for ``CATALOG_TTL_S``.

    While the inference stage cannot be asked, the last list stands (its pipelines then read
    not ready), so the repository index and ModelReady say what is missing instead of failing;
    before any list, the stage's error is the answer.
    """

    def __init__(self, list_models: Callable[[Deadline], Awaitable[list[ModelInfo]]]):
        self._list_models = list_models
        self._fetched = float("-inf")
        self._pipelines: dict[str, Pipeline] | None = None

    def forget(self, model: str = "") -> None:
        """The next call lists the models again (a model was loaded, reloaded or unloaded)."""
        self._fetched = float("-inf")

    async def all(self, deadline: Deadline) -> dict[str, Pipeline]:
        if self._pipelines is not None and time.monotonic() - self._fetched < CATALOG_TTL_S:
            return self._pipelines
        try:
            return await self._refresh(deadline)
        except (StageUnavailable, DeadlineExceeded) as exc:
            if self._pipelines is None:
                raise
            self._fetched = time.monotonic()  # asked again after the TTL, not at every call
            log.warning("listing the models failed (%s); the pipelines of the last list stand", exc)
            return self._pipelines

    async def get(self, name: str, version: str, deadline: Deadline) -> Pipeline:
        pipelines = await self.all(deadline)
        if name not in pipelines and time.monotonic() - self._fetched >= CATALOG_MISS_RETRY_S:
            pipelines = await self._refresh(deadline)
        pipeline = pipelines.get(name)
        if pipeline is None:
            raise ModelNotFound(f"no pipeline {quoted(name)}; served: {', '.join(sorted(pipelines)) or 'none'}")
        if version and version != pipeline.version:
            raise ModelNotFound(f"pipeline {quoted(name)} has version {pipeline.version!r}, not {quoted(version)}")
        return pipeline

    async def _refresh(self, deadline: Deadline) -> dict[str, Pipeline]:
        self._pipelines = pipelines_from(await self._list_models(deadline))
        self._fetched = time.monotonic()
        return self._pipelines


# ---- requests and results --------------------------------------------------------------


def item_error(error: BaseException, tensor: str, index: int) -> InferlineError:
    """One failed item as the whole request's error (OIP has no per-item status), its message
    naming the item and its status code unchanged."""
    code, message = status_for(error)
    failed = error_for(code, f"{tensor}[{index}]: {message}")
    failed.retry_after_s = getattr(error, "retry_after_s", None)
    return failed


def number_parameter(name: str, kind: str | None, value: Any) -> float:
    """A request parameter as a number: tritonclient sends only bool, int and str parameters,
    so a string of a number counts too."""
    if kind in ("double_param", "int64_param"):
        return float(value)
    if kind == "string_param":
        try:
            return float(value)
        except ValueError:
            pass
    raise InvalidInput(f"parameter {name!r} must be a number (double_param, int64_param or a string of one)")


def detect_options(parameters: Mapping[str, tuple[str | None, Any]]) -> DetectOptions:
    """``conf``, ``iou`` and ``max_det`` from the request's parameters ((kind, value) by name)."""
    values = {k: number_parameter(k, *parameters[k]) for k in DETECT_PARAMETERS if k in parameters}
    max_det = values.get("max_det")
    if max_det is not None and not max_det.is_integer():
        raise InvalidInput(f"parameter 'max_det' must be a whole number, got {max_det}")
    return DetectOptions(
        conf=values.get("conf"), iou=values.get("iou"), max_det=None if max_det is None else int(max_det)
    ).validate()


def detect_request(pipeline: Pipeline, items: Sequence[bytes], options: DetectOptions) -> DetectRequest:
    images = tuple(ImageInput(data, f"{IMAGE}[{i}]") for i, data in enumerate(items))
    return DetectRequest(pipeline.operation_model, images, options)


def detect_outputs(result: DetectResult) -> dict[str, np.ndarray]:
    """The detections of every image, padded to the batch's largest count (EfficientNMS's
    layout); an image that failed fails the request."""
    for index, image in enumerate(result.images):
        if image.error is not None:
            raise item_error(image.error, IMAGE, index)
    size, largest = len(result.images), max((len(i.detections) for i in result.images), default=0)
    counts = np.zeros((size, 1), np.int32)
    boxes = np.zeros((size, largest, 4), np.float32)
    scores = np.zeros((size, largest), np.float32)
    classes = np.zeros((size, largest), np.int32)
    for index, image in enumerate(result.images):
        found = image.detections
        counts[index, 0] = len(found)
        if found:
            boxes[index, : len(found)] = [d.box for d in found]
            scores[index, : len(found)] = [d.score for d in found]
            classes[index, : len(found)] = [d.class_id for d in found]
    return {NUM_DETECTIONS: counts, DETECTION_BOXES: boxes, DETECTION_SCORES: scores, DETECTION_CLASSES: classes}


def embed_request(pipeline: Pipeline, items: Sequence[bytes]) -> EmbedRequest:
    if pipeline.input.name == IMAGE:
        return EmbedRequest(pipeline.operation_model, images=tuple(
            ImageInput(data, f"{IMAGE}[{i}]") for i, data in enumerate(items)
        ))
    texts = []
    for index, data in enumerate(items):
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{TEXT}[{index}] is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return EmbedRequest(pipeline.operation_model, texts=tuple(texts))


def embed_outputs(pipeline: Pipeline, result: EmbedResult) -> dict[str, np.ndarray]:
    tensor = pipeline.input.name
    embedded = result.images if tensor == IMAGE else result.texts
    for index, item in enumerate(embedded):
        if item.error is not None:
            raise item_error(item.error, tensor, index)
    return {EMBEDDING: np.asarray([item.embedding for item in embedded], dtype=np.float32)}


# ---- readiness -------------------------------------------------------------------------


# Whether the controller can serve: "" for the whole of it, else one model of the stages.
Readiness = Callable[[str], bool]


def watched(watcher: StageWatcher) -> Readiness:
    """Readiness as the controller's stage watcher (stages.StageWatcher) sees it: its health
    ``""`` and ``model/<name>``."""

    def ready(model: str) -> bool:
        return watcher.serving and (not model or model in watcher.health["inference"].models)

    return ready


def loaded(stage: Service) -> Readiness:
    """Readiness of a controller with the stages in its process (local_ports.LocalStages): the
    inference stage (its ``Service``, whose domain is ``Inference``) has every model loaded, and
    loads no others later."""
    inference = cast("Inference", stage.domain)
    return lambda model: inference.ready


def pipeline_ready(pipeline: Pipeline, ready: Readiness) -> bool:
    return ready("") and all(ready(model) for model in pipeline.models)
