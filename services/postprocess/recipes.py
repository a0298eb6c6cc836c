"""Postprocessors by recipe name: raw model outputs of one image -> detections.

Each model family registers its own in a ``*_recipes.py`` module of this package
(``yolo_recipes.py``, ``torchvision_recipes.py``); ``load_families`` imports them all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from inferline.common.detections import Detection, DetectOptions
from inferline.common.plugins import import_family_modules
from inferline.common.registry import Registry
from inferline.common.transform import ImageTransform

Postprocessor = Callable[
    [Mapping[str, np.ndarray], ImageTransform, DetectOptions, Mapping[str, Any], Sequence[str]], list[Detection]
]
POSTPROCESSORS: Registry[Postprocessor] = Registry("postprocess recipe")


def load_families() -> list[str]:
    return import_family_modules(__package__, __file__, "_recipes")


def label_for(class_id: int, labels: Sequence[str]) -> str:
    return labels[class_id] if 0 <= class_id < len(labels) else str(class_id)
