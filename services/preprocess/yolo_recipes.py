"""YOLO (ultralytics) preprocessing: ``letterbox``, ultralytics' LetterBox bit for bit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferline.common.transform import ImageTransform
from inferline.services.preprocess.letterbox import letterbox
from inferline.services.preprocess.recipes import (
    PARAM_CHECKS,
    PREPROCESSORS,
    RecipeLimits,
    bool_param,
    check_size,
    int_param,
    size_param,
)


@dataclass(frozen=True)
class LetterboxParams:
    size: tuple[int, int]
    stride: int
    auto: bool
    scaleup: bool
    pad_value: int

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> LetterboxParams:
        size = size_param(params, "letterbox", 640)
        return cls(
            size=size,
            stride=int_param(params, "stride", "letterbox", 32, 1, max(size)),
            auto=bool_param(params, "auto", "letterbox", False),
            scaleup=bool_param(params, "scaleup", "letterbox", True),
            pad_value=int_param(params, "pad_value", "letterbox", 114, 0, 255),
        )


@PARAM_CHECKS.register("letterbox")
def check_letterbox(params: Mapping[str, Any], limits: RecipeLimits) -> None:
    check_size(LetterboxParams.parse(params).size, "letterbox", limits)


@PREPROCESSORS.register("letterbox")
def letterbox_recipe(image: np.ndarray, params: Mapping[str, Any]) -> tuple[np.ndarray, ImageTransform]:
    p = LetterboxParams.parse(params)
    return letterbox(image, p.size, stride=p.stride, auto=p.auto, scaleup=p.scaleup, pad_value=p.pad_value)
