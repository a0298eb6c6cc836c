"""Typed domain errors.

Domain code raises these and knows nothing about gRPC; ``inferline.common.status`` holds the one
table that turns them into status codes, for whole calls and for single items of a batch alike.
"""

from __future__ import annotations


class InferlineError(Exception):
    """Base of every error a user can act on; its message is shown to the caller verbatim.

    ``retry_after_s``, when set, is the server's estimate of when a retry could succeed: the
    status table sends it along with any error (gRPC ``RetryInfo``), and the client package
    sets it on the error it raises for a status that carried one.
    """

    retry_after_s: float | None = None


class InvalidInput(InferlineError):
    """The request itself is wrong: undecodable image, bad threshold, empty batch."""


class ModelNotFound(InferlineError):
    """The model repository holds no model by that name (or version)."""


class ModelNotReady(InferlineError):
    """The model exists but cannot serve yet (still loading, or failed to load)."""


class WrongTask(InvalidInput):
    """The model exists but does another task than the one asked for."""


class Overloaded(InferlineError):
    """A bounded resource is full; retrying later with backoff is the right reaction.

    ``retry_after_s`` is the server's estimate of when a retry could be taken (the time the
    work ahead needs to drain). It travels as gRPC ``RetryInfo`` and HTTP ``Retry-After``, so
    well-behaved clients back off by what the server knows instead of a guess.
    """

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


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


# Longest client-supplied string quoted back in a message or a log line.
QUOTE_LIMIT = 80


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a client-supplied value, cut to ``limit`` characters.

    A 100 kB model name must not come back in a 100 kB error (nor fill the logs): messages name
    what the client sent only as far as a person needs to recognise it.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}…[{len(text)} chars]"


def at_most(count: int, limit: int, what: str, setting: str) -> None:
    """Refuses a request carrying more than ``limit`` of something, naming the setting to raise."""
    if count > limit:
        raise InvalidInput(f"{count} {what} in one request is over the limit of {limit} ({setting}); split the request")
