"""Optional API keys for the gateway: a bearer token or an ``X-API-Key`` header.

Off by default (a gateway behind an authenticating Ingress or mesh needs none). With keys set
(``INFERLINE_GATEWAY_API_KEYS``, comma-separated, or ``INFERLINE_GATEWAY_API_KEYS_FILE``, one
per line: a Kubernetes Secret mounted as a file, so keys rotate without a restart of the spec),
every inference and model call (``/v1/...`` and ``/v2/...``) needs one of them, either as
``Authorization: Bearer <key>`` (what OpenAPI generators and ``grpcurl``-minded users send) or
as ``X-API-Key: <key>`` (what API gateways forward). Liveness, readiness, metrics, the docs and
the demo page stay open: probes and scrapers carry no keys, and they reveal nothing a key
protects. Keys are kept as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

import grpc
from starlette.requests import Request
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from inferline.common.settings import Settings
from inferline.services.gateway.problems import ApiError, problem_response

HTTP_UNAUTHORIZED = 401
BEARER = "bearerAuth"
API_KEY = "apiKeyAuth"
API_KEY_HEADER = "X-API-Key"
# OIP's own health routes stay open, as Triton's do: load balancers probe them without keys.
OPEN_PREFIXES = ("/v2/health/",)
PROTECTED_PREFIXES = ("/v1/", "/v2")

SECURITY_SCHEMES = {
    BEARER: {"type": "http", "scheme": "bearer", "description": "an API key as a bearer token"},
    API_KEY: {"type": "apiKey", "in": "header", "name": API_KEY_HEADER, "description": "an API key"},
}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The accepted keys, as digests; ``enabled`` is false when none is configured."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(k) for k in (key.strip() for key in keys) if k]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        keys = settings.gateway_api_keys.split(",")
        if settings.gateway_api_keys_file:
            keys += Path(settings.gateway_api_keys_file).read_text(encoding="utf-8").splitlines()
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, key: str) -> bool:
        digest = _digest(key)
        # Every digest is compared, so the time taken says nothing about which key nearly matched.
        return any([hmac.compare_digest(digest, known) for known in self._digests])


def protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES) and not path.startswith(OPEN_PREFIXES)


def presented_key(headers: dict[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get(API_KEY_HEADER.lower()) or None


class RequireApiKey:
    """ASGI middleware: 401 (a problem document, ``WWW-Authenticate: Bearer``) for a protected
    path without an accepted key; everything else passes untouched."""

    def __init__(self, app: ASGIApp, keys: ApiKeys):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The path below the sub-path the gateway is served under (prefix.py puts it in both).
        if scope["type"] != "http" or not protected(get_route_path(scope)):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        key = presented_key(headers)
        if key is not None and self.keys.accepts(key):
            await self.app(scope, receive, send)
            return
        detail = (
            "this gateway requires an API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
            if key is None
            else "the API key is not accepted: check it against the gateway's INFERLINE_GATEWAY_API_KEYS"
        )
        error = ApiError(grpc.StatusCode.UNAUTHENTICATED, detail, http=HTTP_UNAUTHORIZED)
        response = problem_response(Request(scope), error, headers={"WWW-Authenticate": 'Bearer realm="inferline"'})
        await response(scope, receive, send)
