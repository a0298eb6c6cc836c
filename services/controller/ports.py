"""What the controller needs of each stage, as typed ports on domain values.

Two implementations sit behind each port: gRPC clients of the stage services
(``grpc_ports.py``: proto <-> domain in one place) and local ones that call the stages' domain
services in the controller's own process (``local_ports.py``, ``--inprocess``). The operations
(``operations.py``) see only these signatures, so a new transport between the controller and a
stage is one new module, and nothing in an operation knows whether a stage is a process away.

Per-item outcomes are the value or the domain error that failed that item alone; a port raises
only for the whole call (the stage is unavailable, the deadline passed, the request is bad).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias, TypeVar, Union

import numpy as np

from inferline.common.api import NO_CLUSTERING, ClusterOptions, Embeddings, Rendering
from inferline.common.detections import Detection, DetectOptions
from inferline.common.device_pool import DeviceTensor
from inferline.common.errors import DeadlineExceeded
from inferline.common.model_info import ModelInfo
from inferline.common.recipes import Recipe
from inferline.common.transform import ImageTransform, Region

T = TypeVar("T")
# One item's outcome: its value, or the error that failed it (and only it).
Outcome: TypeAlias = Union[T, Exception]  # noqa: UP007 - a generic alias needs Union
Outputs = Mapping[str, np.ndarray]
# A model's inputs: host arrays, or tensors the preprocess stage left in the controller's device
# pool (common/device_pool.py: only their place travels to the inference stage).
Inputs = Mapping[str, np.ndarray | DeviceTensor]


class Deadline:
    """The caller's deadline, shared by every stage call of one request."""

    def __init__(self, seconds: float):
        self.expires = time.monotonic() + seconds

    def remaining(self, stage: str) -> float:
        left = self.expires - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"deadline exceeded before the {stage} stage")
        return left

    @property
    def left(self) -> float:
        return self.expires - time.monotonic()


@dataclass(frozen=True)
class Preprocessed:
    """One image (or region) as the model takes it, and how it maps back to the original."""

    tensor: np.ndarray | DeviceTensor
    transform: ImageTransform


@dataclass(frozen=True)
class RenderItem:
    """One image's detections to render; ``image`` (the encoded original) only for PNG."""

    name: str
    width: int
    height: int
    detections: Sequence[Detection]
    image: bytes = b""


class PreprocessPort(Protocol):
    async def images(
        self, recipe: Recipe, images: Sequence[bytes], regions: Sequence[Region], deadline: Deadline
    ) -> list[Outcome[Preprocessed]]:
        """One outcome per image, or per region when regions are given."""
        ...

    async def texts(self, recipe: Recipe, texts: Sequence[str], deadline: Deadline) -> list[Outcome[np.ndarray]]: ...


class InferencePort(Protocol):
    async def model(self, name: str, deadline: Deadline) -> ModelInfo:
        """The served model's description; ModelNotFound when the stage does not serve it."""
        ...

    async def models(self, deadline: Deadline) -> list[ModelInfo]:
        """Every model the stage serves and is ready to run."""
        ...

    async def infer(
        self, model: ModelInfo, items: Sequence[Inputs], min_score: float, deadline: Deadline
    ) -> list[Outcome[Outputs]]:
        """Runs ``model`` (its served version) on each item's inputs. ``min_score`` > 0 lets the
        stage drop the candidates that cannot survive that confidence (the model's declared
        candidate filter). A failure that concerns only some items' call (a bad input shape)
        is those items' outcome; the stage's unavailability, overload or the deadline raise."""
        ...


class PostprocessPort(Protocol):
    async def detections(
        self,
        recipe: Recipe,
        options: DetectOptions,
        labels: Sequence[str],
        items: Sequence[tuple[Outputs, ImageTransform]],
        deadline: Deadline,
    ) -> list[Outcome[list[Detection]]]: ...

    async def render(self, format: str, items: Sequence[RenderItem], deadline: Deadline) -> list[Rendering]: ...

    async def embeddings(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[np.ndarray],
        deadline: Deadline,
        *,
        logit_scale: float = 0.0,
        top_k: int = 0,
        cluster: ClusterOptions = NO_CLUSTERING,
    ) -> Embeddings: ...


class Stages(Protocol):
    """The three ports, and where they lead (for messages and logs)."""

    @property
    def preprocess(self) -> PreprocessPort: ...

    @property
    def inference(self) -> InferencePort: ...

    @property
    def postprocess(self) -> PostprocessPort: ...

    @property
    def targets(self) -> Mapping[str, str]: ...

    async def load(self) -> None: ...

    async def close(self) -> None: ...
