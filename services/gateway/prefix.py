"""Serving under a sub-path: the prefix a proxy strips, so links and the docs point back through it.

An Ingress that routes ``https://host/inferline/...`` to the gateway usually strips
``/inferline`` and says so in ``X-Forwarded-Prefix`` (ingress-nginx, Traefik, Envoy); one that
does not strip is configured with ``INFERLINE_GATEWAY_ROOT_PATH``. Either way the prefix becomes
the ASGI ``root_path`` (and part of ``path``, as the ASGI spec has it), which Starlette routes
with, and which the demo page (its ``<base href>``), Swagger UI (the spec's URL) and the
OpenAPI document (``servers``) use to build their URLs. A header value that is not a plain path
(``/a/b``: letters, digits, ``-._~``) is ignored, so a client cannot inject markup or a host.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

HEADER = b"x-forwarded-prefix"
_PLAIN_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+")
MAX_PREFIX = 256


def clean_prefix(value: str) -> str | None:
    """``value`` without a trailing slash when it is a plain absolute path; None otherwise."""
    value = value.strip().rstrip("/")
    if not value:
        return ""
    if len(value) > MAX_PREFIX or not _PLAIN_PATH.fullmatch(value) or "/../" in value + "/" or "/./" in value + "/":
        return None
    return value


class ForwardedPrefix:
    """Sets ``root_path`` from ``X-Forwarded-Prefix`` (after the configured root path, if any)."""

    def __init__(self, app: ASGIApp, root_path: str = ""):
        self.app = app
        self.root_path = clean_prefix(root_path) or ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            forwarded = next((v.decode("latin-1") for k, v in scope["headers"] if k == HEADER), "")
            prefix = clean_prefix(forwarded) if forwarded else ""
            root = (prefix or "") + self.root_path if prefix is not None else self.root_path
            if root:
                scope = _under(scope, root)
        await self.app(scope, receive, send)


def _under(scope: Scope, root: str) -> Scope:
    """``scope`` with ``root_path`` = ``root`` and, as the ASGI spec has it, a ``path`` that
    includes it (Starlette's mounts, the static files among them, route on that): a path a
    proxy stripped gets the prefix back; one that still carries it is left alone."""
    path: str = scope["path"]
    if path == root or path.startswith(root + "/"):
        return {**scope, "root_path": root}
    raw = scope.get("raw_path") or path.encode("latin-1")
    return {**scope, "root_path": root, "path": root + path, "raw_path": root.encode("latin-1") + raw}


def root_of(scope: Scope) -> str:
    return str(scope.get("root_path", "")).rstrip("/")
