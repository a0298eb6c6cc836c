"""Content negotiation: the answer's format from ``format=`` and the ``Accept`` header (RFC 9110 12.5.1).

REST clients ask for CSV with ``Accept: text/csv`` rather than a query parameter, and a client
that accepts only what the gateway cannot give should hear so (406), not receive JSON it will
fail to parse. ``format=`` stays, for browsers and curl one-liners, and wins when given, but it
must be a type the client accepts. Errors are always ``application/problem+json`` (RFC 9457),
whatever ``Accept`` says, as RFC 9110 allows: a client must be able to read why it failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from inferline.services.gateway.problems import ApiError

# In the order a tie goes: JSON (the API's own document), then the table, then the picture.
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv", "png": "image/png"}
HTTP_NOT_ACCEPTABLE = 406


@dataclass(frozen=True)
class _Range:
    kind: str
    subtype: str
    q: float

    def matches(self, media_type: str) -> bool:
        kind, _, subtype = media_type.partition("/")
        return self.kind in ("*", kind) and self.subtype in ("*", subtype)

    @property
    def specificity(self) -> int:
        return (self.kind != "*") + (self.subtype != "*")


def _ranges(accept: str) -> list[_Range]:
    ranges = []
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        kind, slash, subtype = media.lower().partition("/")
        if not slash or not kind or not subtype:
            continue  # not a media range: ignored, as browsers' odd entries are
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        ranges.append(_Range(kind, subtype, q))
    return ranges


def quality(accept: str | None, media_type: str) -> float:
    """How much the client wants ``media_type``: the q of the most specific range that matches."""
    if not accept or not accept.strip():
        return 1.0
    matching = [r for r in _ranges(accept) if r.matches(media_type)]
    if not matching:
        return 0.0
    return max(matching, key=lambda r: r.specificity).q


def choose(requested: str | None, accept: str | None, formats: Sequence[str]) -> str:
    """The format to answer in: ``requested`` (``format=``) when the client accepts it, else the
    most wanted of ``formats`` (ties go to the earlier, so JSON first); 406 when none is acceptable."""
    offered = [f for f in MEDIA_TYPES if f in formats]  # JSON, then CSV, then PNG on a tie
    if requested is not None:
        if quality(accept, MEDIA_TYPES[requested]) > 0:
            return requested
        raise _not_acceptable(accept, [requested], f"format={requested} answers {MEDIA_TYPES[requested]}, ")
    best = max(offered, key=lambda f: (quality(accept, MEDIA_TYPES[f]), -offered.index(f)))
    if quality(accept, MEDIA_TYPES[best]) > 0:
        return best
    raise _not_acceptable(accept, offered, "")


def _not_acceptable(accept: str | None, formats: Sequence[str], why: str) -> ApiError:
    types = ", ".join(MEDIA_TYPES[f] for f in formats)
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{why}which the Accept header ({accept!r}) refuses; this endpoint answers {types}: "
        "accept one of them, or send Accept: */*",
        http=HTTP_NOT_ACCEPTABLE,
    )
