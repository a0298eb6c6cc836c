"""Detection results and options as domain values, and their proto and JSON forms."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferline.common.errors import InvalidInput, quoted
from inferline.common.generated import types_pb2
from inferline.common.masks import Mask


@dataclass(frozen=True)
class Detection:
    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels
    # The best of the caller's labels for this box, from a zero-shot model, when asked for.
    zero_shot: tuple[str, float] | None = None
    # The instance's pixels in the original image, from a segmentation model.
    mask: Mask | None = None

    def to_proto(self) -> types_pb2.Detection:
        x1, y1, x2, y2 = self.box
        message = types_pb2.Detection(
            label=self.label, class_id=self.class_id, score=self.score, box=types_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2)
        )
        if self.zero_shot is not None:
            message.zero_shot.label, message.zero_shot.score = self.zero_shot
        if self.mask is not None:
            message.mask.CopyFrom(self.mask.to_proto())
        return message

    @classmethod
    def from_proto(cls, message: types_pb2.Detection) -> Detection:
        b = message.box
        zero_shot = (message.zero_shot.label, message.zero_shot.score) if message.HasField("zero_shot") else None
        mask = Mask.from_proto(message.mask) if message.HasField("mask") else None
        return cls(message.label, message.class_id, message.score, (b.x1, b.y1, b.x2, b.y2), zero_shot, mask)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "label": self.label,
            "class_id": self.class_id,
            "score": round(float(self.score), 5),
            "box": [round(float(v), 2) for v in self.box],
        }
        if self.zero_shot is not None:
            data["zero_shot"] = {"label": self.zero_shot[0], "score": round(float(self.zero_shot[1]), 5)}
        if self.mask is not None:
            data["mask"] = self.mask.to_dict()
        return data


@dataclass(frozen=True)
class DetectOptions:
    """Thresholds for one request; ``None`` takes the model's default from its recipe."""

    conf: float | None = None
    iou: float | None = None
    max_det: int | None = None
    classes: tuple[int, ...] = field(default=())
    agnostic: bool = False

    def validate(self) -> DetectOptions:
        for name in ("conf", "iou"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{name} must be between 0 and 1, got {value}")
        if self.max_det is not None and self.max_det < 1:
            raise InvalidInput(f"max_det must be at least 1, got {self.max_det}")
        if any(c < 0 for c in self.classes):
            raise InvalidInput(f"class ids must be non-negative, got {quoted(list(self.classes))}")
        return self

    def resolved(self, defaults: Mapping[str, Any]) -> tuple[float, float, int]:
        """conf, iou and max_det with the model's defaults filled in."""
        conf = self.conf if self.conf is not None else float(defaults.get("conf", 0.25))
        iou = self.iou if self.iou is not None else float(defaults.get("iou", 0.7))
        max_det = self.max_det if self.max_det is not None else int(defaults.get("max_det", 300))
        return conf, iou, max_det

    def to_proto(self) -> types_pb2.DetectOptions:
        return types_pb2.DetectOptions(
            conf=self.conf, iou=self.iou, max_det=self.max_det, classes=self.classes, agnostic_nms=self.agnostic
        )

    @classmethod
    def from_proto(cls, message: types_pb2.DetectOptions) -> DetectOptions:
        return cls(
            conf=message.conf if message.HasField("conf") else None,
            iou=message.iou if message.HasField("iou") else None,
            max_det=message.max_det if message.HasField("max_det") else None,
            classes=tuple(message.classes),
            agnostic=message.agnostic_nms,
        ).validate()


def detections_from_proto(messages: Iterable[types_pb2.Detection]) -> list[Detection]:
    return [Detection.from_proto(m) for m in messages]


def detections_to_proto(detections: Sequence[Detection]) -> list[types_pb2.Detection]:
    return [d.to_proto() for d in detections]
