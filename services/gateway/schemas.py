"""Request parameters and response bodies as Pydantic models: validation, and the OpenAPI schema.

Bounds mirror the proto fields (int32 ids, thresholds in [0, 1]) so a value the controller
could not even carry is refused here with a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from inferline.services.client import defaults
from inferline.services.presentation.documents import DETECT_FORMATS, TABLE_FORMATS

INT32_MAX = 2**31 - 1


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (no lone surrogates)") from None
    return text


def _split_commas(value: Any) -> Any:
    """``labels`` entries may each hold several comma-separated labels, as the CLI's --labels does."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        return value
    split: list[Any] = []
    for item in items:
        if isinstance(item, str):
            split.extend(part.strip() for part in item.split(",") if part.strip())
        else:
            split.append(item)  # left for the type check to refuse by name
    return split


Text = Annotated[str, AfterValidator(_utf8)]
ModelName = Annotated[str, AfterValidator(_utf8), Field(max_length=256)]
Labels = Annotated[list[Text], BeforeValidator(_split_commas)]
Threshold = Annotated[float | None, Field(ge=0.0, le=1.0)]


class DetectParams(BaseModel):
    """Options of /v1/detect, as query parameters, form fields or JSON members."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName = Field(defaults.DETECT_MODEL, description="a detection model from /v1/models")
    conf: Threshold = Field(None, description="confidence threshold (model default: 0.25)")
    iou: Threshold = Field(None, description="NMS IoU threshold (model default: 0.7)")
    max_det: int | None = Field(None, ge=1, le=INT32_MAX, description="most detections per image (model default: 300)")
    classes: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] = Field([], description="keep only these class ids")
    classify_with: ModelName = Field(
        "", description=f"re-label each box with this zero-shot model, e.g. {defaults.EMBED_MODEL}"
    )
    labels: Labels = Field([], description='labels for classify_with; repeated, or comma-separated: "a car,a dog"')
    format: Literal[DETECT_FORMATS] | None = Field(  # type: ignore[valid-type]
        None,
        description="json, csv or png (the annotated image, one image only); default: what the Accept header "
        "prefers (application/json, text/csv, image/png), JSON when it allows any",
    )


class ClassifyParams(BaseModel):
    """Options of /v1/classify."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName = Field(defaults.EMBED_MODEL, description="a zero-shot model from /v1/models")
    labels: Labels = Field([], description='candidate labels or prompts; repeated, or comma-separated: "a bus,a dog"')
    top_k: int = Field(0, ge=0, le=INT32_MAX, description="labels per image, best first (0: all)")
    format: Literal[TABLE_FORMATS] | None = Field(  # type: ignore[valid-type]
        None, description="json or csv; default: what the Accept header prefers, JSON when it allows any"
    )


class EmbedParams(BaseModel):
    """Options of /v1/embed."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName = Field(defaults.EMBED_MODEL, description="an embedding model from /v1/models")
    texts: list[Text] = Field(
        [], description="texts to embed (repeated); images and texts are ranked against each other"
    )
    cluster: int = Field(0, ge=0, le=INT32_MAX, description="k-means the images and texts into this many clusters")
    threshold: float = Field(0.0, ge=0.0, le=1.0, description="group items with cosine similarity >= this")
    format: Literal[TABLE_FORMATS] | None = Field(  # type: ignore[valid-type]
        None, description="json or csv; default: what the Accept header prefers, JSON when it allows any"
    )


class Base64Image(BaseModel):
    name: Text = Field("", description="shown back in the results (default: image<N>)")
    data: str = Field(description="the encoded image file (JPEG, PNG, WEBP, BMP), base64")


class JsonImages(BaseModel):
    """A JSON body: the images in base64, and any of the endpoint's options as members."""

    model_config = ConfigDict(extra="allow")

    images: list[Base64Image] = Field(
        [], description="the images, base64 in JSON; no URLs (the gateway fetches nothing)"
    )


class ItemError(BaseModel):
    code: str = Field(description="gRPC status name", examples=["INVALID_ARGUMENT"])
    message: str


class LabelScore(BaseModel):
    label: str
    score: float


class Mask(BaseModel):
    """A binary mask as COCO's uncompressed RLE (what pycocotools' frPyObjects reads)."""

    size: list[int] = Field(min_length=2, max_length=2, description="[height, width] of the image, in pixels")
    counts: list[int] = Field(
        description="run lengths over the pixels in column-major order, alternating 0s and 1s, "
        "starting with a run of 0s (which may be empty)"
    )


class Detection(BaseModel):
    label: str
    class_id: int
    score: float
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in image pixels")
    zero_shot: LabelScore | None = Field(None, description="the best of `labels` for this box (with classify_with)")
    mask: Mask | None = Field(None, description="the object's pixels, from a segmentation model (absent otherwise)")


class DetectResult(BaseModel):
    image: str
    width: int
    height: int
    detections: list[Detection]
    timings_ms: dict[str, float] = Field(description="wall time of each stage for the request, and total")
    error: ItemError | None = Field(None, description="present when this image failed; the others are unaffected")


class DetectResponse(BaseModel):
    results: list[DetectResult]


class ClassifyResult(BaseModel):
    image: str
    labels: list[LabelScore] = Field(description="best first; softmax probabilities over all labels")
    error: ItemError | None = None


class ClassifyResponse(BaseModel):
    results: list[ClassifyResult]


class EmbeddedImage(BaseModel):
    image: str
    embedding: list[float] = Field(description="L2-normalised")
    error: ItemError | None = None


class EmbeddedText(BaseModel):
    text: str
    embedding: list[float]
    error: ItemError | None = None


class Ranking(BaseModel):
    text: str
    images: list[str] = Field(description="image names by cosine similarity to the text, best first")
    scores: list[float]


class EmbedResponse(BaseModel):
    model: str
    images: list[EmbeddedImage]
    texts: list[EmbeddedText]
    clusters: list[int] | None = Field(None, description="cluster id per item, images then texts; -1 for failed items")
    rankings: list[Ranking] | None = None


class ModelsResponse(BaseModel):
    models: list[dict[str, Any]] = Field(description="each model's metadata, as `inferline models --json` prints it")


class Health(BaseModel):
    status: Literal["ok", "ready"]


class Stats(BaseModel):
    """The gateway's own inference calls (/v1/detect, classify, embed, models) of the last minute."""

    window_s: float
    requests: int
    rate_per_s: float
    p95_ms: float | None = Field(description="95th percentile latency, milliseconds; null without requests")
    errors: int
