"""The task registry: what kind of answer a model gives, and everything that follows from it.

A model's config names its task; the task decides which public operation serves the model, what
its result is, which postprocess entry point makes it and which output formats can render it.
The model repository refuses a task that is not registered here, so every model it loads has a
path through the controller. A new task is one entry here, its result's place in the public
proto, one postprocessor family and one operation (docs/architecture.md, "where changes go").
"""

from __future__ import annotations

from dataclasses import dataclass

from inferline.common.errors import ConfigError, quoted


@dataclass(frozen=True)
class Task:
    name: str
    # The controller operations that accept a model of this task (controller.proto methods).
    operations: tuple[str, ...]
    # The result each input gets, as the public API names it (common/api.py).
    result: str
    # The postprocess stage's entry point for the model's outputs: "detections" (recipes in
    # POSTPROCESSORS, returning list[Detection]) or "embeddings" (L2 normalisation and the
    # similarity work of the Embeddings call).
    postprocessor: str
    # Output formats a Render of this task's result supports (services/presentation.py).
    formats: tuple[str, ...] = ()
    description: str = ""


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "detect", ("Detect",), "ImageDetections", "detections", ("json", "csv", "png"),
            "boxes with a class label and score each",
        ),
        Task(
            "segment", ("Detect",), "ImageDetections", "detections", ("json", "csv", "png"),
            "boxes with a label, a score and an instance mask (COCO RLE) each",
        ),
        Task(
            "embed", ("Classify", "Embed", "Detect.classify_with"), "ImageLabels | Embedded", "embeddings",
            description="L2-normalised embeddings; zero-shot classification against the caller's labels",
        ),
    )
}


def task_named(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"task {quoted(name)} is not one of {', '.join(TASKS)}") from None


def serves(task: Task, operation: str) -> bool:
    return operation in task.operations


def tasks_for(operation: str) -> tuple[str, ...]:
    return tuple(name for name, task in TASKS.items() if operation in task.operations)
