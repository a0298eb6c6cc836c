"""The Open Inference Protocol's REST form (KServe v2, as Triton serves it), translated to its gRPC
form (``inference.GRPCInferenceService``) and back, so ``tritonclient.http`` works beside ``/v1``.

The router knows no model and no pipeline: a JSON or binary request becomes a
``ModelInferRequest``, a ``ModelInferResponse`` becomes JSON (or JSON plus binary tensors), for
any datatype, so any OIP server can stand behind it. Which server is the app's choice (the
controller, or ``INFERLINE_GATEWAY_OIP_TARGET``): the router gets a function that returns the
channel, because the channel is made on the server's loop at start-up, after the router exists.

Tensors in JSON: ``{"name", "shape", "datatype", "data"}``, ``data`` row-major, flat or nested;
BYTES elements as UTF-8 strings. Triton's binary tensor data extension, which tritonclient.http
uses by default: the ``Inference-Header-Content-Length`` header says how long the JSON is; the
body's rest is the inputs' raw bytes, in the order of the inputs that declare
``parameters.binary_data_size``. An output asked for with ``parameters.binary_data: true`` (or
every output not asked for by name, under the request parameter ``binary_data_output: true``)
comes back the same way. Errors: ``{"error": "..."}``, the HTTP code from the one status table.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format

from inferline.common.errors import InvalidInput
from inferline.common.generated import grpc_service_pb2 as pb
from inferline.common.generated import grpc_service_pb2_grpc as pb_grpc
from inferline.common.oip_bytes import deserialize, serialize
from inferline.services.client.calls import metadata
from inferline.services.gateway.inputs import timeout_from
from inferline.services.gateway.problems import oip_error_response

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
OCTET_STREAM = "application/octet-stream"

# OIP datatype -> numpy dtype (little-endian, as the binary extension and raw contents are).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# The typed ``contents`` field each datatype travels in, when a server answers without raw bytes.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# Parameters of the binary extension: the gateway's own business, never sent upstream.
REQUEST_ONLY = {"binary_data_output"}
INPUT_ONLY = {"binary_data_size"}
OUTPUT_ONLY = {"binary_data"}


class BadRequest(ValueError):
    """A request the gateway cannot translate: 400, with what to change."""


def create_oip_router(channel: Callable[[], grpc.aio.Channel], default_timeout_s: float) -> APIRouter:
    """The v2 routes, calling ``inference.GRPCInferenceService`` on ``channel()``."""
    router = APIRouter(prefix="/v2", include_in_schema=False)

    def stub() -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(channel())

    async def call(request: Request, method: str, message: Any) -> Any:
        """One upstream call; its failure raises as an HTTP error of its status."""
        rpc = getattr(stub(), method)
        return await rpc(
            message,
            timeout=timeout_from(request, default_timeout_s),
            metadata=metadata(getattr(request.state, "request_id", "")),
        )

    @router.get("")
    async def server_metadata(request: Request) -> Response:
        async def ask(request: Request) -> Response:
            reply = await call(request, "ServerMetadata", pb.ServerMetadataRequest())
            return JSONResponse({"name": reply.name, "version": reply.version, "extensions": list(reply.extensions)})

        return await _answer(request, ask)

    @router.get("/health/live")
    async def live(request: Request) -> Response:
        async def ask(request: Request) -> Response:
            reply = await call(request, "ServerLive", pb.ServerLiveRequest())
            return _flag(reply.live, "the server is not live")

        return await _answer(request, ask)

    @router.get("/health/ready")
    async def ready(request: Request) -> Response:
        async def ask(request: Request) -> Response:
            reply = await call(request, "ServerReady", pb.ServerReadyRequest())
            return _flag(reply.ready, "the server is not ready")

        return await _answer(request, ask)

    @router.get("/models/{model}")
    @router.get("/models/{model}/versions/{version}")
    async def model_metadata(request: Request, model: str, version: str = "") -> Response:
        async def ask(request: Request) -> Response:
            reply = await call(request, "ModelMetadata", pb.ModelMetadataRequest(name=model, version=version))
            return JSONResponse(
                {
                    "name": reply.name,
                    "versions": list(reply.versions),
                    "platform": reply.platform,
                    "inputs": [_tensor_metadata(t) for t in reply.inputs],
                    "outputs": [_tensor_metadata(t) for t in reply.outputs],
                }
            )

        return await _answer(request, ask)

    @router.get("/models/{model}/ready")
    @router.get("/models/{model}/versions/{version}/ready")
    async def model_ready(request: Request, model: str, version: str = "") -> Response:
        async def ask(request: Request) -> Response:
            reply = await call(request, "ModelReady", pb.ModelReadyRequest(name=model, version=version))
            return _flag(reply.ready, f"model {model!r} is not ready")

        return await _answer(request, ask)

    @router.get("/models/{model}/config")
    @router.get("/models/{model}/versions/{version}/config")
    async def model_config(request: Request, model: str, version: str = "") -> Response:
        async def ask(request: Request) -> Response:
            reply = await call(request, "ModelConfig", pb.ModelConfigRequest(name=model, version=version))
            return JSONResponse(json_format.MessageToDict(reply.config, preserving_proto_field_name=True))

        return await _answer(request, ask)

    @router.post("/models/{model}/infer")
    @router.post("/models/{model}/versions/{version}/infer")
    async def infer(request: Request, model: str, version: str = "") -> Response:
        async def ask(request: Request) -> Response:
            header, binary = _split_body(await _body(request), request.headers.get(HEADER_LENGTH))
            message, binary_outputs = infer_request(model, version, header, binary)
            reply = await call(request, "ModelInfer", message)
            return infer_response(reply, binary_outputs)

        return await _answer(request, ask)

    return router


async def _answer(request: Request, handler: Callable[[Request], Awaitable[Response]]) -> Response:
    """The handler's response, or the v2 error body: a bad request is 400, an upstream failure
    answers with its gRPC status through the gateway's status table."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return oip_error_response(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or exc.code().name
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            details = f"the inference server behind the gateway is unavailable: {details}"
        log.info("%s %s -> upstream %s: %s", request.method, request.url.path, exc.code().name, details)
        return oip_error_response(exc.code(), details)


def _flag(ok: bool, why: str) -> Response:
    """Health answers as Triton's: 200 and no body when true, 400 with the reason when not."""
    if ok:
        return Response(status_code=200)
    return JSONResponse({"error": why}, status_code=400)


def _tensor_metadata(tensor: pb.ModelMetadataResponse.TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": [int(d) for d in tensor.shape]}


async def _body(request: Request) -> bytes:
    body = await request.body()
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported: send gzip, deflate or none")
    try:
        return zlib.decompress(body, wbits=31 if encoding == "gzip" else 15)
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid {encoding} data: {exc}") from None


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        length = len(body)
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be a whole number of bytes, got {header_length!r}") from None
        if not 0 <= length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    try:
        header = json.loads(body[:length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("the request must be a JSON object with an `inputs` array")
    return header, body[length:]


def infer_request(
    model: str, version: str, header: dict[str, Any], binary: bytes
) -> tuple[pb.ModelInferRequest, set[str]]:
    """A v2 JSON request (and its binary section) as a ``ModelInferRequest``, every input as raw
    bytes; and which outputs to answer in binary: their names, ``"*"`` for every output without
    its own ``binary_data`` (``binary_data_output: true``), ``"-NAME"`` for one that asked for JSON."""
    message = pb.ModelInferRequest(model_name=model, model_version=version, id=str(header.get("id", "")))
    params = _object(header.get("parameters", {}), "parameters")
    _set_parameters(message.parameters, params, REQUEST_ONLY, "parameters")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("the request needs `inputs`: a non-empty array of {name, shape, datatype, data}")
    offset = 0
    for index, tensor in enumerate(inputs):
        where = f"inputs[{index}]"
        tensor = _object(tensor, where)
        name, datatype, shape = _tensor_head(tensor, where)
        where = f"input {name!r}"
        tensor_params = _object(tensor.get("parameters", {}), f"{where}: parameters")
        entry = message.inputs.add(name=name, datatype=datatype, shape=shape)
        _set_parameters(entry.parameters, tensor_params, INPUT_ONLY, f"{where}: parameters")
        if "binary_data_size" in tensor_params:
            size = tensor_params["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"{where}: binary_data_size must be a whole number of bytes, got {size!r}")
            if offset + size > len(binary):
                raise BadRequest(
                    f"{where}: binary_data_size {size} runs past the binary data ({len(binary) - offset} bytes "
                    f"left after {HEADER_LENGTH}); the body is truncated or a size is wrong"
                )
            raw = binary[offset : offset + size]
            offset += size
            _check_raw(raw, datatype, shape, where)
        elif "data" in tensor:
            raw = _raw_from_json(tensor["data"], datatype, shape, where)
        else:
            raise BadRequest(f"{where} has neither `data` nor parameters.binary_data_size")
        message.raw_input_contents.append(raw)
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data are left over: the inputs' binary_data_size "
            f"add up to {offset}, the body after {HEADER_LENGTH} has {len(binary)}"
        )
    binary_outputs = {"*"} if params.get("binary_data_output") is True else set()
    for index, item in enumerate(_list(header.get("outputs", []), "outputs")):
        wanted = _object(item, f"outputs[{index}]")
        output_name = wanted.get("name")
        if not isinstance(output_name, str) or not output_name:
            raise BadRequest(f"outputs[{index}] needs a `name`")
        out_params = _object(wanted.get("parameters", {}), f"output {output_name!r}: parameters")
        output = message.outputs.add(name=output_name)
        _set_parameters(output.parameters, out_params, OUTPUT_ONLY, f"output {output_name!r}: parameters")
        # An output's own binary_data wins over the request's binary_data_output, as in Triton.
        if "binary_data" in out_params:
            binary_outputs.add(output_name if out_params["binary_data"] is True else f"-{output_name}")
    return message, binary_outputs


def _binary(name: str, binary_outputs: set[str]) -> bool:
    if name in binary_outputs:
        return True
    return "*" in binary_outputs and f"-{name}" not in binary_outputs


def infer_response(reply: pb.ModelInferResponse, binary_outputs: set[str]) -> Response:
    """The v2 JSON response; with binary outputs, JSON then their bytes, octet-stream."""
    document: dict[str, Any] = {"model_name": reply.model_name, "model_version": reply.model_version}
    if reply.id:
        document["id"] = reply.id
    if reply.parameters:
        document["parameters"] = _parameters_json(reply.parameters)
    outputs, chunks = [], []
    for index, tensor in enumerate(reply.outputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = _parameters_json(tensor.parameters)
        raw = reply.raw_output_contents[index] if index < len(reply.raw_output_contents) else None
        if _binary(tensor.name, binary_outputs):
            data = raw if raw is not None else _raw_from_contents(tensor)
            params["binary_data_size"] = len(data)
            chunks.append(data)
        else:
            entry["data"] = _json_data(tensor, raw)
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    document["outputs"] = outputs
    text = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(chunks), media_type=OCTET_STREAM, headers={HEADER_LENGTH: str(len(text))})


def _tensor_head(tensor: dict[str, Any], where: str) -> tuple[str, str, list[int]]:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where} needs a `name`")
    if datatype not in DTYPES and datatype not in ("BYTES", "BF16"):
        known = ", ".join([*DTYPES, "BF16", "BYTES"])
        raise BadRequest(f"input {name!r}: datatype {datatype!r} is not an OIP datatype (one of {known})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: `shape` must be an array of non-negative integers, got {shape!r}")
    return name, str(datatype), shape


def _check_raw(raw: bytes, datatype: str, shape: list[int], where: str) -> None:
    count = math.prod(shape)
    if datatype == "BYTES":
        try:
            deserialize(raw, tuple(shape), where)
        except InvalidInput as exc:
            raise BadRequest(str(exc)) from None
        return
    itemsize = 2 if datatype == "BF16" else DTYPES[datatype].itemsize
    if len(raw) != count * itemsize:
        raise BadRequest(
            f"{where}: shape {shape} of {datatype} needs {count * itemsize} bytes, binary_data_size is {len(raw)}"
        )


def _flatten(data: Any) -> Iterator[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _raw_from_json(data: Any, datatype: str, shape: list[int], where: str) -> bytes:
    """JSON ``data`` (flat or nested, row-major) as the raw bytes of the tensor."""
    flat = list(_flatten(data))
    count = math.prod(shape)
    if len(flat) != count:
        raise BadRequest(f"{where}: shape {shape} holds {count} elements, `data` has {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in flat):
            raise BadRequest(f"{where}: BYTES data in JSON must be strings (UTF-8); send binary data for other bytes")
        array = np.empty(len(flat), dtype=object)
        array[:] = [item.encode("utf-8") for item in flat]
        return serialize(array)
    if datatype == "BF16":
        raise BadRequest(f"{where}: BF16 has no JSON form; send it as binary data")
    if datatype == "BOOL" and not all(isinstance(item, bool) for item in flat):
        raise BadRequest(f"{where}: BOOL data must be true or false")
    if datatype != "BOOL" and not all(isinstance(item, int | float) and not isinstance(item, bool) for item in flat):
        raise BadRequest(f"{where}: {datatype} data must be numbers")
    dtype = DTYPES[datatype]
    if dtype.kind in "iu" and not all(float(item).is_integer() for item in flat):
        raise BadRequest(f"{where}: {datatype} data must be whole numbers")
    try:
        array = np.array(flat, dtype=dtype) if dtype.kind not in "iu" else _integers(flat, dtype)
    except (OverflowError, ValueError) as exc:
        raise BadRequest(f"{where}: data does not fit {datatype}: {exc}") from None
    return array.tobytes()


def _integers(flat: list[Any], dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    values = [int(item) for item in flat]
    if values and (min(values) < info.min or max(values) > info.max):
        raise OverflowError(f"values must lie in [{info.min}, {info.max}]")
    return np.array(values, dtype=dtype)


def _raw_from_contents(tensor: pb.ModelInferResponse.InferOutputTensor) -> bytes:
    """The raw bytes of an output a server sent in typed ``contents``."""
    values = list(getattr(tensor.contents, CONTENTS_FIELD.get(tensor.datatype, "bytes_contents")))
    if tensor.datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return serialize(array)
    return np.array(values, dtype=DTYPES[tensor.datatype]).tobytes()


def _json_data(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes | None) -> list[Any]:
    """An output's elements, row-major and flat, as JSON values."""
    if tensor.datatype == "BYTES":
        elements = (
            list(deserialize(raw, tuple(tensor.shape), tensor.name).ravel()) if raw is not None
            else list(tensor.contents.bytes_contents)
        )
        try:
            return [element.decode("utf-8") for element in elements]
        except UnicodeDecodeError:
            raise BadRequest(
                f"output {tensor.name!r} holds bytes that are not UTF-8: ask for it with parameters.binary_data true"
            ) from None
    if tensor.datatype not in DTYPES:
        raise BadRequest(f"output {tensor.name!r} is {tensor.datatype}, which has no JSON form: ask for binary_data")
    if raw is None:
        return list(getattr(tensor.contents, CONTENTS_FIELD[tensor.datatype]))
    return np.frombuffer(raw, dtype=DTYPES[tensor.datatype]).tolist()


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a JSON array")
    return value


def _set_parameters(target: Any, params: dict[str, Any], skip: set[str], where: str) -> None:
    """JSON parameters as ``InferParameter``s: bool, int64, double or string, by the JSON type."""
    for key, value in params.items():
        if key in skip:
            continue
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise BadRequest(f"{where}: {key!r} does not fit a 64-bit integer")
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise BadRequest(f"{where}: {key!r} must be a boolean, number or string, got {json.dumps(value)}")


def _parameters_json(params: Any) -> dict[str, Any]:
    result = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is not None:
            result[key] = getattr(value, kind)
    return result
