"""Typed domain errors.

Domain code raises these and knows nothing about gRPC; ``inferline.common.status`` holds the one
table that turns them into status codes, for whole calls and for single items of a batch alike.
"""

from __future__ import annotations


class InferlineError(Exception):
    """Base of every error a user can act on; its message is shown to the caller verbatim."""


class InvalidInput(InferlineError):
    """The request itself is wrong: undecodable image, bad threshold, empty batch."""


class ModelNotFound(InferlineError):
    """The model repository holds no model by that name (or version)."""


class ModelNotReady(InferlineError):
    """The model exists but cannot serve yet (still loading, or failed to load)."""


class WrongTask(InvalidInput):
    """The model exists but does another task than the one asked for."""


class Overloaded(InferlineError):
    """A bounded resource is full; retrying later with backoff is the right reaction."""


class StageUnavailable(InferlineError):
    """A downstream stage could not be reached."""


class StageFailed(InferlineError):
    """A downstream stage answered with an error that is not the caller's to fix."""


class DeadlineExceeded(InferlineError):
    """The caller's deadline passed before the work was done."""


class WeightsError(InferlineError):
    """Weights are missing, unreadable or not what the model config says they are."""


class ConfigError(InferlineError):
    """A model config file or a setting is invalid."""
