"""Preprocessors by recipe name.

Image recipes: decoded BGR pixels + recipe params -> model input tensor and its transform.
Text recipes: one text + recipe params -> model input tensor (token ids).
Model families beyond YOLO register theirs in ``*_recipes.py`` modules of this package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from inferline.common.errors import InvalidInput
from inferline.common.plugins import import_family_modules
from inferline.common.registry import Registry
from inferline.common.transform import ImageTransform
from inferline.services.preprocess.letterbox import letterbox

Preprocessor = Callable[[np.ndarray, Mapping[str, Any]], tuple[np.ndarray, ImageTransform]]
PREPROCESSORS: Registry[Preprocessor] = Registry("preprocess recipe")
TextPreprocessor = Callable[[str, Mapping[str, Any]], np.ndarray]
TEXT_PREPROCESSORS: Registry[TextPreprocessor] = Registry("text preprocess recipe")


def load_families() -> list[str]:
    return import_family_modules(__package__, __file__, "_recipes")


def size_param(params: Mapping[str, Any], recipe: str, default: int) -> tuple[int, int]:
    """``size`` is one number (square) or [height, width], as ultralytics' imgsz and open_clip's
    ``PreprocessCfg.size``."""
    size = params.get("size", default)
    values = size if isinstance(size, (list, tuple)) else [size, size]
    if len(values) != 2 or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or v < 1 for v in values
    ):
        raise InvalidInput(f"{recipe} size must be a positive integer or [height, width], got {size!r}")
    return int(values[0]), int(values[1])


@PREPROCESSORS.register("letterbox")
def letterbox_recipe(image: np.ndarray, params: Mapping[str, Any]) -> tuple[np.ndarray, ImageTransform]:
    return letterbox(
        image,
        size_param(params, "letterbox", 640),
        stride=int(params.get("stride", 32)),
        auto=bool(params.get("auto", False)),
        scaleup=bool(params.get("scaleup", True)),
        pad_value=int(params.get("pad_value", 114)),
    )
