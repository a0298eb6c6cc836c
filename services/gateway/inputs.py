"""Reading a request: images from multipart uploads or base64 JSON, options from query and body.

Options may come as query parameters, form fields or JSON members (the body wins); they are
validated by the endpoint's Pydantic model, so every mistake is a 400 that names the field.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from inferline.common.api import ImageInput
from inferline.common.errors import quoted
from inferline.services.gateway.problems import ApiError, describe_errors, invalid
from inferline.services.gateway.schemas import Base64Image, JsonImages

P = TypeVar("P", bound=BaseModel)

TIMEOUT_HEADER = "x-request-timeout"
MAX_TIMEOUT_S = 3600.0


@dataclass
class Body:
    images: list[ImageInput] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)


def validated(model: type[P], raw: dict[str, Any]) -> P:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid(describe_errors(exc.errors())) from None


def merged_params(model: type[P], query: BaseModel, body: Body) -> P:
    """The endpoint's options: query parameters, overridden by the body's fields."""
    return validated(model, {**query.model_dump(exclude_unset=True), **body.fields})


async def read_body(request: Request, list_fields: frozenset[str], max_images: int) -> Body:
    """Images and option fields of a multipart, form or JSON body; an empty body has neither."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=max_images, max_fields=1000)
        except UnicodeDecodeError:
            raise invalid("form fields must be UTF-8 text") from None
        except HTTPException as exc:  # Starlette's multipart parser stopped: too many files or fields
            raise invalid(
                f"the form was refused: {quoted(exc.detail)}; at most {max_images} images per request "
                "(INFERLINE_MAX_BATCH_IMAGES): split the batch"
            ) from None
        return await _from_form(form, list_fields)
    if content_type == "application/json":
        return _from_json(await _json(request))
    if not await request.body():
        return Body()
    raise ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"unsupported Content-Type {quoted(content_type) if content_type else '(none)'}: send multipart/form-data "
        "(field `images`, repeatable) or application/json ({\"images\": [{\"data\": \"<base64>\"}]})",
        415,
    )


async def _json(request: Request) -> Any:
    body = await request.body()
    if not body:
        return {}
    try:
        return await request.json()
    except ValueError as exc:
        raise invalid(f"the JSON body does not parse: {quoted(str(exc))}") from None


async def _from_form(form: FormData, list_fields: frozenset[str]) -> Body:
    images = []
    for index, upload in enumerate(form.getlist("images")):
        if not isinstance(upload, UploadFile):
            raise invalid("`images` must be file uploads (multipart/form-data); send base64 in a JSON body instead")
        images.append(ImageInput(await upload.read(), upload.filename or f"image{index}"))
    fields: dict[str, Any] = {}
    for key in form.keys():
        if key == "images":
            continue
        values = form.getlist(key)
        if any(isinstance(v, UploadFile) for v in values):
            raise invalid(f"form field {quoted(key)} must be text, not a file")
        fields[key] = list(values) if key in list_fields else values[-1]
    return Body(images=images, fields=fields)


def _from_json(data: Any) -> Body:
    if not isinstance(data, dict):
        raise invalid('the JSON body must be an object: {"images": [{"name": "a.jpg", "data": "<base64>"}], ...}')
    parsed = validated(JsonImages, {"images": data.get("images", [])})
    images = [_decoded(image, index) for index, image in enumerate(parsed.images)]
    return Body(images=images, fields={k: v for k, v in data.items() if k != "images"})


def _decoded(image: Base64Image, index: int) -> ImageInput:
    try:
        data = base64.b64decode(image.data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"images.{index}.data is not valid base64") from None
    return ImageInput(data, image.name or f"image{index}")


def timeout_from(request: Request, default_s: float) -> float:
    """The call's deadline in seconds: the X-Request-Timeout header, else the configured default."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default_s
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= MAX_TIMEOUT_S:
        raise invalid(f"X-Request-Timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {quoted(raw)}")
    return value
