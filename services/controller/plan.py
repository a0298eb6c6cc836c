"""A model's plan: everything the controller needs to run it, resolved once from its description.

The inference stage's ``ModelInfo`` (common/model_info.py, from its ModelConfig) names a model's
task, its recipes, labels and tensors; the plan turns them into typed values once per model
(and again only when the description changes), so
a request parses nothing. This module is the one place in the controller that reads a recipe's
parameters: a detector's default thresholds, a CLIP image tower's text tower and logit scale.

Plans are cached briefly (``PlanCache``): metadata changes only when the inference stage
reloads. A stale plan is served while one background call refreshes it, so admission never
waits on the inference stage: under overload its event loop is the busiest, and every request
arriving as the entry expired would otherwise wait on it before being refused.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from inferline.common.detections import DetectOptions
from inferline.common.errors import ConfigError, InvalidInput, StageFailed, WrongTask, quoted
from inferline.common.model_info import ModelInfo
from inferline.common.recipes import Recipe
from inferline.common.tasks import Task, task_named, tasks_for
from inferline.services.controller.ports import Deadline

METADATA_TTL_S = 10.0
# Model names are folder names in the model repository: a longer name cannot exist, so it is
# refused before it travels to the inference stage.
MAX_MODEL_NAME_BYTES = 255


@dataclass(frozen=True)
class ModelPlan:
    name: str
    version: str
    task: Task
    preprocess: Recipe
    postprocess: Recipe
    # The model's one input, as the inference stage names it ("images", "tokens").
    input_name: str
    labels: tuple[str, ...]
    # A detector's thresholds when the request leaves them unset (its config's, else YOLO's).
    defaults: DetectOptions
    # The description it was planned from (what ModelInfo shows; how the port batches).
    info: ModelInfo
    # A zero-shot image tower: the model that embeds texts for it, and CLIP's logit scale.
    text_model: str = ""
    logit_scale: float | None = None

    @classmethod
    def from_info(cls, info: ModelInfo) -> ModelPlan:
        try:
            task = task_named(info.task)
        except ConfigError:
            raise StageFailed(
                f"model {quoted(info.name)} has task {quoted(info.task)}, which this controller does not serve"
            ) from None
        # Through the proto, as a recipe travels to the other stages: one kind of number (float)
        # whichever transport brought the description, and the parsed params cached once.
        postprocess = Recipe.from_proto(info.postprocess.to_proto())
        params = postprocess.params
        scale = params.get("logit_scale")
        conf, iou, max_det = DetectOptions().resolved(params)
        return cls(
            name=info.name,
            version=info.version,
            task=task,
            preprocess=Recipe.from_proto(info.preprocess.to_proto()),
            postprocess=postprocess,
            input_name=info.inputs[0].name if info.inputs else "images",
            labels=tuple(info.labels),
            defaults=DetectOptions(conf=conf, iou=iou, max_det=max_det),
            text_model=str(params.get("text_model") or ""),
            logit_scale=float(scale) if isinstance(scale, (int, float)) and math.isfinite(scale) else None,
            info=info,
        )

    def resolved(self, options: DetectOptions) -> DetectOptions:
        """The request's options with this model's defaults filled in: what the postprocess
        stage runs, and the confidence the inference stage may filter candidates at."""
        conf, iou, max_det = options.resolved(
            {"conf": self.defaults.conf, "iou": self.defaults.iou, "max_det": self.defaults.max_det}
        )
        return DetectOptions(conf=conf, iou=iou, max_det=max_det, classes=options.classes, agnostic=options.agnostic)

    def check_serves(self, operation: str, what: str | None = None) -> None:
        if operation not in self.task.operations:
            first, *others = tasks_for(operation) or ("another",)
            also = f" (or a {' or '.join(others)} model)" if others else ""
            raise WrongTask(
                f"model {quoted(self.name)} is a {self.task.name} model; "
                f"{what or operation} needs a {first} model{also}"
            )


def validate_model_name(name: str, field: str = "model") -> None:
    if not name:
        raise InvalidInput(f"{field} is required; ListModels shows what is served")
    size = len(name.encode("utf-8"))
    if size > MAX_MODEL_NAME_BYTES:
        raise InvalidInput(
            f"{field} {quoted(name)} is {size} bytes long; model names are at most "
            f"{MAX_MODEL_NAME_BYTES} (ListModels shows what is served)"
        )


class PlanCache:
    """Plans by model name, from the inference stage's descriptions, refreshed in the background."""

    def __init__(self, fetch: Callable[[str, Deadline], Awaitable[ModelInfo]]):
        self._fetch_info = fetch
        self._entries: dict[str, tuple[float, ModelPlan]] = {}
        self._refreshing: dict[str, asyncio.Future[None]] = {}

    async def get(self, name: str, deadline: Deadline) -> ModelPlan:
        validate_model_name(name)
        cached = self._entries.get(name)
        if cached is None:
            return await self._fetch(name, deadline)
        if time.monotonic() - cached[0] >= METADATA_TTL_S and name not in self._refreshing:
            refresh = asyncio.ensure_future(self._refresh(name))
            self._refreshing[name] = refresh
            refresh.add_done_callback(lambda _: self._refreshing.pop(name, None))
        return cached[1]

    def forget(self, name: str) -> None:
        """Drops the cached plan of ``name``: the stage watcher calls it when the model is loaded,
        reloaded or unloaded (its metadata may have changed); the next request asks the stage."""
        self._entries.pop(name, None)

    async def _fetch(self, name: str, deadline: Deadline) -> ModelPlan:
        plan = ModelPlan.from_info(await self._fetch_info(name, deadline))
        self._entries[name] = (time.monotonic(), plan)
        return plan

    async def _refresh(self, name: str) -> None:
        """A failed refresh forgets the entry: the next request asks the stage and gets its error."""
        try:
            await self._fetch(name, Deadline(METADATA_TTL_S))
        except Exception:  # noqa: BLE001 - the next request's own call reports it
            self._entries.pop(name, None)
