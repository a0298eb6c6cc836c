"""ONNX Runtime's TensorRT execution provider, put first when asked for and present (issue 16).

TensorRT builds an engine per input shape on first use (minutes for a big model), so engines are
cached on disk (``trt_engine_cache_path``) and a restart reuses them; fp16 is on by default, as
the GPU figures are meant fp16. The wheel decides what is available: the onnxruntime-gpu wheels
list ``TensorrtExecutionProvider`` only with TensorRT's libraries beside them, and without them
the CUDA and CPU providers that ``choose_providers`` picked serve, with one warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from inferline.common.settings import Settings
from inferline.services.inference.weights import DEFAULT_CACHE

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
Provider = str | tuple[str, dict[str, Any]]


def engine_cache_dir(settings: Settings, model: str) -> Path:
    """Where a model's TensorRT engines are kept: one folder per model, beside the weights cache."""
    root = settings.ort_tensorrt_cache_dir or DEFAULT_CACHE.parent / "tensorrt"
    return root / model


def with_tensorrt(chosen: list[str], available: list[str], settings: Settings, model: str) -> list[Provider]:
    """``chosen`` with TensorRT (and its options) in front when INFERLINE_ORT_TENSORRT asks for it,
    the wheel has it and the CUDA provider was chosen (TensorRT falls back to CUDA per node)."""
    if not settings.ort_tensorrt:
        return list(chosen)
    if TENSORRT not in available or "CUDAExecutionProvider" not in chosen:
        log.warning(
            "onnxruntime: INFERLINE_ORT_TENSORRT is set but %s; %s serves %s",
            "this wheel has no TensorRT EP" if TENSORRT not in available else "the CUDA EP was not chosen",
            ", ".join(chosen),
            model,
        )
        return list(chosen)
    cache = engine_cache_dir(settings, model)
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    options = {
        "trt_fp16_enable": settings.ort_tensorrt_fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }
    return [(TENSORRT, options), *chosen]
