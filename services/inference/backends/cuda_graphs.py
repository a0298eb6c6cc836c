"""CUDA graphs for the torch backend's fixed batch shapes (issue 16), per model config.

``parameters: {cuda_graphs: true}`` (optionally ``cuda_graph_shapes: N``, default 8) records a
model's forward pass once per input shape as a CUDA graph and replays it afterwards: at small
batches a GPU spends longer launching YOLOv8n's hundreds of kernels than running them, and a
replay launches them all at once. Only the first N shapes are recorded (a letterboxed YOLO input
varies with the image's aspect ratio; each graph holds its own memory); other shapes, and a
forward pass that cannot be recorded (one that syncs with the host, say), run eagerly as before.

Replays share the recorded input and output buffers, so one runs at a time per shape (a lock),
and outputs are cloned before the lock is let go.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

Forward = Callable[[Mapping[str, torch.Tensor]], list[dict[str, torch.Tensor]]]
Key = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
WARMUP_PASSES = 3  # eager passes on a side stream before recording (cuDNN picks its algorithms)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: list[dict[str, torch.Tensor]]
    lock: threading.Lock


class GraphedForward:
    """``forward`` with CUDA graph replay for up to ``max_shapes`` input shapes."""

    def __init__(self, forward: Forward, name: str, max_shapes: int = 8):
        self._forward = forward
        self.name = name
        self.max_shapes = max_shapes
        self._graphs: dict[Key, _Graph | None] = {}  # None: this shape runs eagerly
        self._lock = threading.Lock()

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        key: Key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(tensors.items()))
        with self._lock:
            if key not in self._graphs:
                self._graphs[key] = self._record(tensors) if len(self._graphs) < self.max_shapes else None
            entry = self._graphs[key]
        if entry is None:
            return self._forward(tensors)
        with entry.lock:
            for name, tensor in tensors.items():
                entry.inputs[name].copy_(tensor, non_blocking=True)
            entry.graph.replay()
            return [{name: t.clone() for name, t in item.items()} for item in entry.outputs]

    def _record(self, tensors: Mapping[str, torch.Tensor]) -> _Graph | None:
        inputs = {name: t.clone() for name, t in tensors.items()}
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_PASSES):
                    self._forward(inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self._forward(inputs)
        except RuntimeError as exc:
            log.warning(
                "%s: shapes %s run eagerly, their forward pass cannot be recorded as a CUDA graph: %s",
                self.name,
                [tuple(t.shape) for t in tensors.values()],
                exc,
            )
            return None
        return _Graph(graph, inputs, outputs, threading.Lock())
