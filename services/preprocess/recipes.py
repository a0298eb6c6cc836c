"""Preprocessors by recipe name.

Image recipes: decoded BGR pixels + recipe params -> model input tensor and its transform.
Text recipes: one text + recipe params -> model input tensor (token ids).
Each model family registers its recipes in a ``*_recipes.py`` module of this package
(``yolo_recipes.py``, ``clip_recipes.py``, ``torchvision_recipes.py``); this module holds the
registries and the parameter helpers they share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferline.common.errors import InvalidInput, quoted
from inferline.common.plugins import import_family_modules
from inferline.common.registry import Registry
from inferline.common.settings import Settings
from inferline.common.transform import ImageTransform

Preprocessor = Callable[[np.ndarray, Mapping[str, Any]], tuple[np.ndarray, ImageTransform]]
PREPROCESSORS: Registry[Preprocessor] = Registry("preprocess recipe")
TextPreprocessor = Callable[[str, Mapping[str, Any]], np.ndarray]
TEXT_PREPROCESSORS: Registry[TextPreprocessor] = Registry("text preprocess recipe")


@dataclass(frozen=True)
class RecipeLimits:
    """The bounds a request's recipe parameters must stay within (from Settings)."""

    max_side: int
    max_text_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RecipeLimits:
        return cls(max_side=settings.max_input_side, max_text_bytes=settings.max_text_bytes)


# Each recipe's parameter check, run once per request before anything is decoded, so that a
# recipe asking for a 12000-pixel letterbox is refused in microseconds, not after decoding and
# resizing every image of the batch to 432 MB each. Raises InvalidInput.
ParamCheck = Callable[[Mapping[str, Any], RecipeLimits], None]
PARAM_CHECKS: Registry[ParamCheck] = Registry("preprocess recipe")


def load_families() -> list[str]:
    return import_family_modules(__package__, __file__, "_recipes")


def check_params(name: str, params: Mapping[str, Any], limits: RecipeLimits) -> None:
    """The named recipe's parameters against ``limits``; a recipe without a check takes none."""
    if name in PARAM_CHECKS:
        PARAM_CHECKS.get(name)(params, limits)
    elif params:
        raise InvalidInput(f"recipe {quoted(name)} takes no parameters, got {quoted(sorted(params))}")


def size_param(params: Mapping[str, Any], recipe: str, default: int) -> tuple[int, int]:
    """``size`` is one number (square) or [height, width], as ultralytics' imgsz and open_clip's
    ``PreprocessCfg.size``."""
    size = params.get("size", default)
    values = size if isinstance(size, (list, tuple)) else [size, size]
    if len(values) != 2 or any(not _is_integer(v) or v < 1 for v in values):
        raise InvalidInput(f"{recipe} size must be a positive integer or [height, width], got {quoted(size)}")
    return int(values[0]), int(values[1])


def check_size(size: tuple[int, int], recipe: str, limits: RecipeLimits) -> None:
    if max(size) > limits.max_side:
        raise InvalidInput(
            f"{recipe} size {size[0]}x{size[1]} is over the limit of {limits.max_side} pixels a side "
            "(INFERLINE_MAX_INPUT_SIDE); use the size from the model's metadata"
        )


def int_param(params: Mapping[str, Any], key: str, recipe: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if not _is_integer(value) or not low <= value <= high:
        raise InvalidInput(f"{recipe} {key} must be an integer in [{low}, {high}], got {quoted(value)}")
    return int(value)


def bool_param(params: Mapping[str, Any], key: str, recipe: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{recipe} {key} must be true or false, got {quoted(value)}")
    return value


def _is_integer(value: Any) -> bool:
    """An int, or a float holding one (protobuf's Struct carries every number as a double)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())
