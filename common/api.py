"""The public API's requests and results as domain values, and their one proto form each.

The controller's operations take and return these; its servicer converts at the edge
(``from_proto`` in, ``to_proto`` out), as KServe's ``InferRequest.from_grpc`` / ``to_grpc`` do,
and the client package converts the other way, so a caller of either side works with the same
typed values. A failed item carries the domain error it failed with (``InvalidInput``,
``DeadlineExceeded``, ...): the one status table (``common/status.py``) turns it into a status
on the wire and back, so an item's code survives every hop unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from inferline.common.detections import Detection, DetectOptions, detections_from_proto
from inferline.common.errors import InferlineError, InvalidInput
from inferline.common.generated import controller_pb2, postprocess_pb2, types_pb2
from inferline.common.status import code_from_status, error_for, status_for

# The output formats a renderer can produce, by their public names, read from the proto enum
# (RENDER_FORMAT_PNG is "png"): a new format is one enum value and one registered renderer
# (services/presentation), with no table to keep in step.
FORMAT_BY_ENUM: Mapping[int, str] = {
    number: name.removeprefix("RENDER_FORMAT_").lower()
    for name, number in types_pb2.RenderFormat.items()
    if number != types_pb2.RENDER_FORMAT_UNSPECIFIED
}
ENUM_BY_FORMAT: Mapping[str, types_pb2.RenderFormat] = {
    name: cast("types_pb2.RenderFormat", number) for number, name in FORMAT_BY_ENUM.items()
}


def format_from_proto(number: int) -> str:
    try:
        return FORMAT_BY_ENUM[number]
    except KeyError:
        known = ", ".join(f"RENDER_FORMAT_{name.upper()}" for name in FORMAT_BY_ENUM.values())
        raise InvalidInput(f"render format {number} is not one of {known}") from None


def error_from_status(status: types_pb2.Status) -> InferlineError | None:
    """The domain error an item's status stands for; None for OK."""
    if status.code == 0:
        return None
    return error_for(code_from_status(status), status.message)


def status_from_error(error: BaseException | None) -> types_pb2.Status:
    """The wire form of an item's outcome. The stage that failed the item counted and logged
    it already (``status.item_status``); this only converts."""
    if error is None:
        return types_pb2.Status()
    code, message = status_for(error)
    return types_pb2.Status(code=code.value[0], message=message)


@dataclass(frozen=True)
class ImageInput:
    """An encoded image exactly as the caller has it; ``name`` is for logs and outputs only."""

    data: bytes
    name: str = ""

    def to_proto(self) -> types_pb2.Image:
        return types_pb2.Image(data=self.data, name=self.name)

    @classmethod
    def from_proto(cls, message: types_pb2.Image) -> ImageInput:
        return cls(message.data, message.name)


@dataclass(frozen=True)
class Rendering:
    format: str
    content_type: str
    content: bytes

    def to_proto(self) -> types_pb2.Rendering:
        return types_pb2.Rendering(
            format=ENUM_BY_FORMAT[self.format], content_type=self.content_type, content=self.content
        )

    @classmethod
    def from_proto(cls, message: types_pb2.Rendering) -> Rendering:
        return cls(FORMAT_BY_ENUM.get(message.format, ""), message.content_type, message.content)


@dataclass(frozen=True)
class ClusterOptions:
    """k > 0: k-means into k clusters; else threshold > 0: groups of cosine >= threshold."""

    k: int = 0
    threshold: float = 0.0

    @property
    def wanted(self) -> bool:
        return self.k > 0 or self.threshold > 0

    def to_proto(self) -> types_pb2.ClusterOptions:
        return types_pb2.ClusterOptions(k=self.k, threshold=self.threshold)

    @classmethod
    def from_proto(cls, message: types_pb2.ClusterOptions) -> ClusterOptions:
        return cls(message.k, message.threshold)


# The default of every call that may cluster: no clustering.
NO_CLUSTERING = ClusterOptions()


@dataclass(frozen=True)
class Ranking:
    """Indices into a list (labels for an image, images for a text), best first, with scores."""

    indices: tuple[int, ...]
    scores: tuple[float, ...]

    def to_proto(self) -> postprocess_pb2.Ranking:
        return postprocess_pb2.Ranking(indices=self.indices, scores=self.scores)

    @classmethod
    def from_proto(cls, message: postprocess_pb2.Ranking) -> Ranking:
        return cls(tuple(message.indices), tuple(message.scores))


@dataclass
class Embeddings:
    """The postprocess stage's embedding work on one batch (its ``Embeddings`` call)."""

    # L2-normalised rows, in request order: (images, dim) and (texts, dim).
    images: np.ndarray
    texts: np.ndarray
    # Per image (when top_k > 0 and there are texts): texts by probability.
    zero_shot: list[Ranking] = field(default_factory=list)
    # Per text (when there are images): all images by cosine similarity.
    text_to_images: list[Ranking] = field(default_factory=list)
    # Cluster id per embedding, images then texts (when clustering was asked for).
    clusters: list[int] = field(default_factory=list)


# ---- Detect (and segment: the same operation; a segment model's detections carry masks) -----


@dataclass(frozen=True)
class DetectRequest:
    model: str
    images: tuple[ImageInput, ...]
    options: DetectOptions = field(default_factory=DetectOptions)
    # Renderings to attach to each result, by format name ("json", "csv", "png").
    render: tuple[str, ...] = ()
    # Open-vocabulary re-labelling of every box with this zero-shot model against `labels`.
    classify_with: str = ""
    labels: tuple[str, ...] = ()

    def to_proto(self) -> controller_pb2.DetectRequest:
        return controller_pb2.DetectRequest(
            model=self.model,
            images=[image.to_proto() for image in self.images],
            options=self.options.to_proto(),
            render=[ENUM_BY_FORMAT[name] for name in self.render],
            classify_with=self.classify_with,
            labels=self.labels,
        )

    @classmethod
    def from_proto(cls, message: controller_pb2.DetectRequest) -> DetectRequest:
        return cls(
            model=message.model,
            images=tuple(ImageInput.from_proto(image) for image in message.images),
            options=DetectOptions.from_proto(message.options),
            render=tuple(format_from_proto(number) for number in message.render),
            classify_with=message.classify_with,
            labels=tuple(message.labels),
        )


@dataclass
class ImageDetections:
    """One image's outcome: its size, its detections (with masks for a segment model) and the
    renderings asked for; or the error that failed it alone."""

    name: str
    width: int = 0
    height: int = 0
    detections: list[Detection] = field(default_factory=list)
    renderings: list[Rendering] = field(default_factory=list)
    error: Exception | None = None

    def to_proto(self) -> controller_pb2.ImageResult:
        return controller_pb2.ImageResult(
            name=self.name, width=self.width, height=self.height,
            detections=[d.to_proto() for d in self.detections],
            status=status_from_error(self.error),
            renderings=[r.to_proto() for r in self.renderings],
        )

    @classmethod
    def from_proto(cls, message: controller_pb2.ImageResult) -> ImageDetections:
        return cls(
            name=message.name, width=message.width, height=message.height,
            detections=detections_from_proto(message.detections),
            renderings=[Rendering.from_proto(r) for r in message.renderings],
            error=error_from_status(message.status),
        )


@dataclass
class DetectResult:
    model: str
    model_version: str
    # One per request image, in request order.
    images: list[ImageDetections]
    # Each stage's share of this request's wall time, and "total", in milliseconds.
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_proto(self) -> controller_pb2.DetectResponse:
        return controller_pb2.DetectResponse(
            model=self.model, model_version=self.model_version,
            results=[image.to_proto() for image in self.images], timings_ms=self.timings_ms,
        )

    @classmethod
    def from_proto(cls, message: controller_pb2.DetectResponse) -> DetectResult:
        return cls(
            message.model, message.model_version,
            [ImageDetections.from_proto(result) for result in message.results], dict(message.timings_ms),
        )


# ---- Classify (zero-shot, against the caller's labels) -------------------------------------


@dataclass(frozen=True)
class ClassifyRequest:
    model: str
    images: tuple[ImageInput, ...]
    labels: tuple[str, ...]
    # How many labels to return per image (0: all).
    top_k: int = 0

    def to_proto(self) -> controller_pb2.ClassifyRequest:
        return controller_pb2.ClassifyRequest(
            model=self.model, images=[image.to_proto() for image in self.images], labels=self.labels, top_k=self.top_k
        )

    @classmethod
    def from_proto(cls, message: controller_pb2.ClassifyRequest) -> ClassifyRequest:
        return cls(
            message.model, tuple(ImageInput.from_proto(i) for i in message.images), tuple(message.labels), message.top_k
        )


@dataclass
class ImageLabels:
    name: str
    # Best first; softmax probabilities over all the request's labels.
    labels: list[tuple[str, float]] = field(default_factory=list)
    error: Exception | None = None

    def to_proto(self) -> controller_pb2.ClassifyResult:
        return controller_pb2.ClassifyResult(
            name=self.name,
            labels=[types_pb2.LabelScore(label=label, score=score) for label, score in self.labels],
            status=status_from_error(self.error),
        )

    @classmethod
    def from_proto(cls, message: controller_pb2.ClassifyResult) -> ImageLabels:
        return cls(message.name, [(s.label, s.score) for s in message.labels], error_from_status(message.status))


@dataclass
class ClassifyResult:
    model: str
    images: list[ImageLabels]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_proto(self) -> controller_pb2.ClassifyResponse:
        return controller_pb2.ClassifyResponse(
            model=self.model, results=[image.to_proto() for image in self.images], timings_ms=self.timings_ms
        )

    @classmethod
    def from_proto(cls, message: controller_pb2.ClassifyResponse) -> ClassifyResult:
        return cls(message.model, [ImageLabels.from_proto(r) for r in message.results], dict(message.timings_ms))


# ---- Embed ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedRequest:
    model: str
    images: tuple[ImageInput, ...] = ()
    texts: tuple[str, ...] = ()
    cluster: ClusterOptions = field(default_factory=ClusterOptions)

    def to_proto(self) -> controller_pb2.EmbedRequest:
        return controller_pb2.EmbedRequest(
            model=self.model, images=[image.to_proto() for image in self.images], texts=self.texts,
            cluster=self.cluster.to_proto(),
        )

    @classmethod
    def from_proto(cls, message: controller_pb2.EmbedRequest) -> EmbedRequest:
        return cls(
            message.model, tuple(ImageInput.from_proto(i) for i in message.images), tuple(message.texts),
            ClusterOptions.from_proto(message.cluster),
        )


@dataclass
class Embedded:
    """One image's or text's L2-normalised embedding (``key`` is the image name or the text)."""

    key: str
    embedding: list[float] = field(default_factory=list)
    error: Exception | None = None


@dataclass
class TextRanking:
    text: str
    # Indices into the request's images, by cosine similarity, best first.
    images: list[int]
    scores: list[float]


@dataclass
class EmbedResult:
    model: str
    images: list[Embedded]
    texts: list[Embedded]
    # Cluster id per item, images then texts; -1 for failed items; empty when not asked for.
    clusters: list[int] = field(default_factory=list)
    rankings: list[TextRanking] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_proto(self) -> controller_pb2.EmbedResponse:
        return controller_pb2.EmbedResponse(
            model=self.model,
            images=[
                controller_pb2.EmbeddedImage(name=e.key, embedding=e.embedding, status=status_from_error(e.error))
                for e in self.images
            ],
            texts=[
                controller_pb2.EmbeddedText(text=e.key, embedding=e.embedding, status=status_from_error(e.error))
                for e in self.texts
            ],
            clusters=self.clusters,
            timings_ms=self.timings_ms,
            rankings=[controller_pb2.TextRanking(text=r.text, images=r.images, scores=r.scores) for r in self.rankings],
        )

    @classmethod
    def from_proto(cls, message: controller_pb2.EmbedResponse) -> EmbedResult:
        return cls(
            model=message.model,
            images=[Embedded(e.name, list(e.embedding), error_from_status(e.status)) for e in message.images],
            texts=[Embedded(e.text, list(e.embedding), error_from_status(e.status)) for e in message.texts],
            clusters=list(message.clusters),
            rankings=[TextRanking(r.text, list(r.images), list(r.scores)) for r in message.rankings],
            timings_ms=dict(message.timings_ms),
        )

