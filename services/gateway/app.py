"""The gateway's FastAPI app: REST endpoints mirroring the controller, health, metrics, docs, demo page.

``create_app(settings)`` builds it; the controller's client (``inferline.services.client``'s
``AsyncClient``) is made on the server's event loop at start-up (lifespan) and closed at
shutdown. Routes stay thin: read the request into the API's domain values, make one call, and
answer with the presentation module's documents, the very shapes the CLI prints
(``inferline.services.presentation``).
"""

from __future__ import annotations

import html
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import grpc
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from google.protobuf import json_format
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferline.common.api import ClassifyRequest, ClusterOptions, DetectRequest, EmbedRequest
from inferline.common.channels import create_channel
from inferline.common.detections import DetectOptions
from inferline.common.errors import InferlineError, quoted
from inferline.common.settings import Settings
from inferline.common.status import status_for
from inferline.services.client import AsyncClient
from inferline.services.controller.stages import MODEL_HEALTH_PREFIX
from inferline.services.gateway import problems
from inferline.services.gateway.auth import API_KEY, BEARER, SECURITY_SCHEMES, ApiKeys, RequireApiKey
from inferline.services.gateway.inputs import Body, merged_params, read_body, timeout_from
from inferline.services.gateway.metrics import GatewayMetrics
from inferline.services.gateway.middleware import BodyLimit, RequestContext, add_tracing, traced_lifespan
from inferline.services.gateway.negotiation import MEDIA_TYPES, choose
from inferline.services.gateway.oip_rest import create_oip_router
from inferline.services.gateway.prefix import ForwardedPrefix, root_of
from inferline.services.gateway.problems import ApiError, Problem, invalid
from inferline.services.gateway.schemas import (
    ClassifyParams,
    ClassifyResponse,
    DetectParams,
    DetectResponse,
    EmbedParams,
    EmbedResponse,
    Health,
    JsonImages,
    ModelsResponse,
    Stats,
)
from inferline.services.presentation import documents
from inferline.services.presentation.documents import DETECT_FORMATS, TABLE_FORMATS

STATIC = Path(str(resources.files("inferline.services.gateway") / "static"))
# Swagger UI 5 (it renders OpenAPI 3.1), as shipped inside the fastapi-offline wheel.
SWAGGER_UI = Path(str(resources.files("fastapi_offline") / "static"))
VERSION = "1"

DESCRIPTION = """
REST/JSON front door of the inferline pipeline: every call becomes one gRPC call to the controller.

* Images: multipart uploads in the repeatable field `images`, or base64 in a JSON body
  (`{"images": [{"name": "a.jpg", "data": "<base64>"}]}`). The gateway never fetches URLs.
* Options: query parameters, form fields or JSON members (the body wins).
* Deadline: header `X-Request-Timeout` in seconds (default `INFERLINE_GATEWAY_TIMEOUT_S`, 60).
* Errors: `application/problem+json` with the gRPC status name in `code`. A request whose images
  *all* failed answers with the first failure's status; when only some failed, the answer is 200
  and each failed result carries its `error`.
* The Open Inference Protocol's REST form (KServe v2, Triton's, with its binary tensor data
  extension) is served under `/v2` (`tritonclient.http` works); its spec documents it, not this page.
* Every response has an `X-Request-ID` header (yours, when you send a plausible one), also logged;
  detect, classify and embed answers have a `Server-Timing` header with the time of each stage.
"""

# A 64x64 PNG of a filled circle: the example body of the inference endpoints, so Swagger UI's
# "Try it out" and schemathesis's example phase send a decodable image.
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAA7UlEQVRo3u2Z0Q3DIAxEU4sRMgRzdPBOlCESqVI/KlUp4AMjHp9RcvbDZ5mIR855m3nZNvkCA"
    "AAAAAAAAAAAAEC4Xvsu1U8dMv568jyOiAD/7/TnTRcSG+gTF3elsRZ/f95SCovQoC06Njz7RjWLkH2L5pKDTDebKpQtTvZ1+pyF5gJQ+6ciChYCAIBgHVwaqw"
    "DA90/KKxY9AAAAmt7q08FYaEYAtYtK9a1DDKnyqj2gKEKdpnWO565mQ6I66iSX2NUn7fYtsIFb6FLA5G7i22oEvaH5ld/FI5198jmgntwc5gAAAAAAAAAAgJU"
    "BTh4OTwQqjcHWAAAAAElFTkSuQmCC"
)
EXAMPLE_IMAGES = [{"name": "circle.png", "data": EXAMPLE_PNG_BASE64}]

PROBLEM_CONTENT = {problems.PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    reasons = {
        400: "invalid request (INVALID_ARGUMENT): a bad option, an undecodable image, no images",
        404: "unknown model (NOT_FOUND)",
        413: "request body over the upload limit",
        401: "no API key, or one the gateway does not accept (only when the gateway requires keys)",
        406: "the Accept header allows none of the formats this endpoint answers",
        415: "unsupported Content-Type",
        429: "the model's queue is full (RESOURCE_EXHAUSTED); retry with backoff",
        500: "internal error (the gateway's log has the details, under the request id)",
        503: "the controller or a stage is unavailable, or a model is still loading",
        504: "the deadline passed (DEADLINE_EXCEEDED)",
    }
    return {code: {"description": reasons[code], "content": PROBLEM_CONTENT} for code in codes}


API_ERRORS = (400, 404, 406, 413, 415, 429, 500, 503, 504)


def _body_spec(form_fields: dict[str, Any], required: bool, example: dict[str, Any]) -> dict[str, Any]:
    """The request body in OpenAPI: multipart with files, or JSON with base64 (FastAPI cannot
    declare two content types for one body, so the route reads the body itself)."""
    form_schema = {
        "type": "object",
        "properties": {
            "images": {
                "type": "array",
                "items": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"},
                "description": "image files (JPEG, PNG, WEBP, BMP); repeat the field for several",
            },
            **form_fields,
        },
    }
    json_schema = {"allOf": [{"$ref": "#/components/schemas/JsonImages"}], "properties": form_fields}
    return {
        "requestBody": {
            "required": required,
            "content": {
                "multipart/form-data": {"schema": form_schema},
                "application/json": {"schema": json_schema, "example": example},
            },
        }
    }


def _option_fields(model: type[Any]) -> dict[str, Any]:
    """The endpoint's options as body properties, from the same model the query uses."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema["properties"]


def _results_content(model: type[Any], *others: str) -> dict[int | str, dict[str, Any]]:
    """200 with the JSON model, and the other formats (`Accept: text/csv` or `format=csv`, ...)."""
    content = {media: {"schema": {"type": "string"}} for media in others}
    if "image/png" in content:
        content["image/png"]["schema"]["contentMediaType"] = "image/png"
    description = "results in the format `format` names, else the one the Accept header prefers (JSON first)"
    return {200: {"model": model, "description": description, "content": content}}


def create_app(settings: Settings) -> FastAPI:
    metrics = GatewayMetrics()
    state: dict[str, AsyncClient] = {}
    oip_channels: dict[str, grpc.aio.Channel] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["controller"] = AsyncClient(settings.controller_target, settings)
        oip_target = settings.gateway_oip_target
        if oip_target and oip_target != settings.controller_target:
            # Any OIP server: no inferline health name to check, so no client-side health checking.
            oip_channels["own"] = create_channel(oip_target, settings, health_service=None)
        try:
            yield
        finally:
            if "own" in oip_channels:
                await oip_channels.pop("own").close()
            await state.pop("controller").close()

    def oip_channel() -> grpc.aio.Channel:
        return oip_channels.get("own") or state["controller"].channel

    app = FastAPI(
        title="inferline gateway",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=traced_lifespan(lifespan, settings.grace_period_s),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, with the sub-path the request came through in `servers`
    )
    keys = ApiKeys.from_settings(settings)
    if keys.enabled:
        app.add_middleware(RequireApiKey, keys=keys)
    app.add_middleware(BodyLimit, max_bytes=settings.gateway_max_upload_bytes)
    app.add_middleware(RequestContext, metrics=metrics)
    app.add_middleware(ForwardedPrefix, root_path=settings.gateway_root_path)
    add_tracing(app)  # outermost: its span covers the rest, and it sees the path a proxy stripped
    app.add_exception_handler(ApiError, problems.api_error_handler)
    app.add_exception_handler(InferlineError, problems.domain_error_handler)
    app.add_exception_handler(RequestValidationError, problems.validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, problems.http_error_handler)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/swagger-ui", StaticFiles(directory=SWAGGER_UI), name="swagger-ui")

    def controller() -> AsyncClient:
        return state["controller"]

    def call(request: Request) -> dict[str, Any]:
        return {"timeout": timeout_from(request, settings.gateway_timeout_s), "request_id": request.state.request_id}

    async def body(request: Request, list_fields: set[str]) -> Body:
        return await read_body(request, frozenset(list_fields), settings.max_batch_images)

    @app.post(
        "/v1/detect",
        operation_id="detect",
        summary="Detect objects in images",
        responses={**_results_content(DetectResponse, "text/csv", "image/png"), **_errors(*API_ERRORS)},
        openapi_extra=_body_spec(_option_fields(DetectParams), True, {"images": EXAMPLE_IMAGES, "conf": 0.25}),
        tags=["inference"],
    )
    async def detect(request: Request, query: Annotated[DetectParams, Query()]) -> Response:
        """The CLI's `inferline detect`: JSON (the same document), CSV (one row per detection), or an annotated PNG."""
        received = await body(request, {"classes", "labels"})
        params = merged_params(DetectParams, query, received)
        answer = choose(params.format, request.headers.get("accept"), DETECT_FORMATS)
        if answer == "png" and len(received.images) != 1:
            count = len(received.images)
            raise invalid(f"format=png answers one annotated image: send exactly one image (got {count})")
        result = await controller().detect(
            DetectRequest(
                model=params.model,
                images=tuple(received.images),
                options=DetectOptions(
                    conf=params.conf, iou=params.iou, max_det=params.max_det, classes=tuple(params.classes)
                ),
                render=("png",) if answer == "png" else (),
                classify_with=params.classify_with,
                labels=tuple(params.labels),
            ),
            **call(request),
        )
        _unless_all_failed([image.error for image in result.images])
        headers = _server_timing(result.timings_ms)
        if answer == "png":
            return Response(documents.png_of(result.images[0]), media_type=MEDIA_TYPES["png"], headers=headers)
        if answer == "csv":
            return Response(documents.detect_csv([result]), media_type=MEDIA_TYPES["csv"], headers=headers)
        return JSONResponse({"results": documents.detect_results([result])}, headers=headers)

    @app.post(
        "/v1/classify",
        operation_id="classify",
        summary="Zero-shot classify images against your labels",
        responses={**_results_content(ClassifyResponse, "text/csv"), **_errors(*API_ERRORS)},
        openapi_extra=_body_spec(
            _option_fields(ClassifyParams), True, {"images": EXAMPLE_IMAGES, "labels": ["a circle", "a square"]}
        ),
        tags=["inference"],
    )
    async def classify(request: Request, query: Annotated[ClassifyParams, Query()]) -> Response:
        """The CLI's `inferline classify`: each image's labels, best first, as softmax probabilities."""
        received = await body(request, {"labels"})
        params = merged_params(ClassifyParams, query, received)
        answer = choose(params.format, request.headers.get("accept"), TABLE_FORMATS)
        result = await controller().classify(
            ClassifyRequest(params.model, tuple(received.images), tuple(params.labels), top_k=params.top_k),
            **call(request),
        )
        _unless_all_failed([image.error for image in result.images])
        headers = _server_timing(result.timings_ms)
        if answer == "csv":
            return Response(documents.classify_csv([result]), media_type=MEDIA_TYPES["csv"], headers=headers)
        return JSONResponse({"results": documents.classify_results([result])}, headers=headers)

    @app.post(
        "/v1/embed",
        operation_id="embed",
        summary="L2-normalised embeddings of images and texts",
        responses={**_results_content(EmbedResponse, "text/csv"), **_errors(*API_ERRORS)},
        openapi_extra=_body_spec(
            _option_fields(EmbedParams), False, {"images": EXAMPLE_IMAGES, "texts": ["a circle"], "cluster": 2}
        ),
        tags=["inference"],
    )
    async def embed(request: Request, query: Annotated[EmbedParams, Query()]) -> Response:
        """The CLI's `inferline embed`: images (uploads or base64) and/or `texts`, optionally clustered."""
        received = await body(request, {"texts"})
        params = merged_params(EmbedParams, query, received)
        answer = choose(params.format, request.headers.get("accept"), TABLE_FORMATS)
        if not received.images and not params.texts:
            raise invalid("give images (field `images`) and/or texts (`texts`)")
        result = await controller().embed(
            EmbedRequest(
                params.model, tuple(received.images), tuple(params.texts),
                ClusterOptions(params.cluster, params.threshold),
            ),
            **call(request),
        )
        _unless_all_failed([item.error for item in result.images + result.texts])
        headers = _server_timing(result.timings_ms)
        if answer == "csv":
            return Response(documents.embed_csv(result), media_type=MEDIA_TYPES["csv"], headers=headers)
        return JSONResponse(documents.embed_document(result), headers=headers)

    @app.get(
        "/v1/models",
        operation_id="listModels",
        summary="The served models and their metadata",
        response_model=ModelsResponse,
        responses=_errors(400, 500, 503, 504),
        tags=["models"],
    )
    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"models": [_metadata(m) for m in await controller().models(**call(request))]})

    @app.get(
        "/v1/models/{name}",
        operation_id="getModel",
        summary="One model's metadata",
        responses={
            200: {
                "description": "the model's metadata",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            **_errors(400, 404, 500, 503, 504),
        },
        tags=["models"],
    )
    async def model_info(request: Request, name: str) -> JSONResponse:
        return JSONResponse(_metadata(await controller().model(name, **call(request))))

    @app.get(
        "/v1/stats",
        operation_id="getStats",
        summary="Request rate and p95 latency of the last minute",
        response_model=Stats,
        tags=["ops"],
    )
    async def stats() -> Stats:
        return Stats(**asdict(metrics.recent.stats()))

    @app.get(
        "/healthz",
        operation_id="liveness",
        summary="Liveness: the gateway process answers",
        response_model=Health,
        tags=["ops"],
    )
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        operation_id="readiness",
        summary="Readiness: the controller is reachable and SERVING (with ?model=NAME: that model answers)",
        response_model=Health,
        responses=_errors(404, 503),
        tags=["ops"],
    )
    async def readyz(
        model: Annotated[str, Query(description="a model name: ready only while this model answers")] = "",
    ) -> Health:
        status = await controller().health(MODEL_HEALTH_PREFIX + model if model else "")
        where = f"the controller at {settings.controller_target}"
        if status == "NOT_FOUND":
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"model {quoted(model)} is not served by {where}")
        if status != "SERVING":
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE,
                f"model {quoted(model)} is not ready at {where}" if model
                else f"{where} is not reachable or not SERVING",
            )
        return Health(status="ready")

    @app.get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus metrics of the gateway (inferline_gateway_*)",
        responses={
            200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
        },
        response_class=Response,
        tags=["ops"],
    )
    async def prometheus_metrics() -> Response:
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    @app.get("/", include_in_schema=False)
    async def demo_page(request: Request) -> HTMLResponse:
        # The page's URLs are relative to <base>, so it works under whatever sub-path it came through.
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        base = html.escape(root_of(request.scope) + "/", quote=True)
        return HTMLResponse(page.replace("<head>", f'<head>\n  <base href="{base}">', 1))

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = root_of(request.scope)
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title="inferline gateway - API docs",
            swagger_js_url=f"{root}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{root}/swagger-ui/favicon.png",
        )

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(request: Request) -> JSONResponse:
        schema = app.openapi()
        root = root_of(request.scope)
        return JSONResponse({**schema, "servers": [{"url": root}]} if root else schema)

    app.include_router(create_oip_router(oip_channel, settings.gateway_timeout_s))
    _document_extras(app, keys.enabled)
    return app


def _document_extras(app: FastAPI, keys_required: bool) -> None:
    """Adds what routes that read their own body cannot declare (the Problem and JsonImages
    schemas, the API-key schemes) and drops what they never answer (FastAPI's 422: validation
    errors are 400 here). The key schemes are always declared; operations require them (and
    document 401) only when this gateway has keys, so the committed document is the default's."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            # FastAPI documents a 422 for every route with parameters; ours answer 400 instead.
            for item in schema["paths"].values():
                for operation in item.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            schema["components"]["securitySchemes"] = SECURITY_SCHEMES
            if keys_required:
                for path, item in schema["paths"].items():
                    if path.startswith("/v1/"):
                        for operation in item.values():
                            operation["security"] = [{BEARER: []}, {API_KEY: []}]
                            operation["responses"]["401"] = _errors(401)[401]
            for model in (Problem, JsonImages):
                spec = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(spec.pop("$defs", {}))
                components[model.__name__] = spec
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _server_timing(timings_ms: dict[str, float]) -> dict[str, str]:
    """The controller's per-stage times as a Server-Timing header: browsers' dev tools show it, the
    demo page reads it, and the JSON body stays exactly the CLI's (which has them on detect only)."""
    return {"Server-Timing": ", ".join(f"{stage};dur={ms:.2f}" for stage, ms in sorted(timings_ms.items()))}


def _metadata(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _unless_all_failed(errors: list[Exception | None]) -> None:
    """A request whose every item failed failed as a whole: its first item's status, as HTTP."""
    if errors and errors[0] is not None and all(e is not None for e in errors):
        code, message = status_for(errors[0])
        raise ApiError(code, message if len(errors) == 1 else f"every image failed; the first: {message}")


def openapi_document(settings: Settings | None = None) -> str:
    """The spec as committed in docs/openapi.json (sorted keys, so diffs read)."""
    return json.dumps(create_app(settings or Settings()).openapi(), indent=2, sort_keys=True) + "\n"
