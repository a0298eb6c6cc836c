"""numpy <-> Open Inference Protocol tensors (KServe v2 / Triton's ``inference`` protos).

OIP names datatypes with strings ("UINT8", "FP32") and carries a tensor's data either in the
request's ``raw_input_contents`` (little-endian bytes, one entry per input, in input order) or
in the tensor's typed ``contents``. Both are accepted here; outputs are always sent raw, as
Triton does. Used by the inference stage's OIP servicer (services/inference/oip_servicer.py)
and by the controller's client of it (services/controller/grpc_ports.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from inferline.common.errors import InvalidInput, quoted
from inferline.common.generated import grpc_service_pb2

# OIP datatype name -> numpy dtype, for the datatypes our models can declare.
TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
FROM_NUMPY: dict[np.dtype, str] = {dtype: name for name, dtype in TO_NUMPY.items()}
# The model config's dtype names (repository.py) -> OIP's.
FROM_CONFIG: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
TO_CONFIG: dict[str, str] = {name: dtype for dtype, name in FROM_CONFIG.items()}
# Which typed-contents field carries which datatype (FP16 has none: it travels raw only).
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
# The request parameter that asks for the candidate filter (the inference stage's min_score):
# a double_param within [0, 1] (or a string of one: tritonclient sends no doubles).
MIN_SCORE = "min_score"
_MAX_TENSOR_BYTES = 2**31
_MAX_DIMS = 32

InputTensor = grpc_service_pb2.ModelInferRequest.InferInputTensor


def numpy_dtype(datatype: str, tensor: str) -> np.dtype:
    dtype = TO_NUMPY.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {quoted(tensor)} has datatype {quoted(datatype)}; supported: {', '.join(TO_NUMPY)}"
        )
    return dtype


def decode_inputs(
    request: grpc_service_pb2.ModelInferRequest, shared: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The request's input tensors by name, from raw contents when the request has them.

    As the protocol says, raw contents are all or nothing: one entry per input, in order, the
    inputs in ``shared`` (read from a shared-memory region, common/shm.py)
    excepted: those are views of their buffer, and have no raw entry. A shared input that is
    not bytes is a tensor already typed and shaped (a CUDA region's, common/cuda_regions.py),
    kept as it is: it stays on its device.
    """
    shared = shared or {}
    raw = request.raw_input_contents
    carried = [t for t in request.inputs if t.name not in shared]
    if raw and len(raw) != len(carried):
        raise InvalidInput(
            f"the request has {len(carried)} inputs outside shared memory but {len(raw)} raw_input_contents; "
            "give one raw content per such input, or none and typed contents"
        )
    arrays: dict[str, np.ndarray] = {}
    index = 0
    for tensor in request.inputs:
        if tensor.name in arrays:
            raise InvalidInput(f"input {quoted(tensor.name)} is given twice")
        if tensor.name in shared:
            value = shared[tensor.name]
            if isinstance(value, (bytes, memoryview)):
                value = decode_tensor(tensor, value)
            elif len(tensor.shape) > _MAX_DIMS:
                raise InvalidInput(
                    f"input {quoted(tensor.name)} has {len(tensor.shape)} dimensions; at most {_MAX_DIMS} are supported"
                )
            arrays[tensor.name] = value
            continue
        arrays[tensor.name] = decode_tensor(tensor, raw[index] if raw else None)
        index += 1
    return arrays


def decode_tensor(tensor: InputTensor, raw: bytes | memoryview | None) -> np.ndarray:
    """One input as numpy: a read-only view on raw bytes, or an array of its typed contents."""
    name = quoted(tensor.name)
    dtype = numpy_dtype(tensor.datatype, tensor.name)
    shape = tuple(tensor.shape)
    if len(shape) > _MAX_DIMS:
        raise InvalidInput(f"input {name} has {len(shape)} dimensions; at most {_MAX_DIMS} are supported")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name} has a negative dimension in shape {quoted(list(shape))}")
    count = math.prod(shape)
    if count * dtype.itemsize > _MAX_TENSOR_BYTES:
        raise InvalidInput(f"input {name}: shape {quoted(list(shape))} is larger than any message can carry")
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {name}: shape {quoted(list(shape))} of {tensor.datatype} needs "
                f"{count * dtype.itemsize} bytes, got {len(raw)} in raw_input_contents"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"input {name}: {tensor.datatype} has no typed contents; send it in raw_input_contents")
    values: Sequence = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input {name}: shape {quoted(list(shape))} needs {count} values, got {len(values)} in contents.{field}"
        )
    array = np.asarray(values)
    if array.size and dtype.kind in "iu" and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise InvalidInput(f"input {name}: a value in contents.{field} is out of range for {tensor.datatype}")
    return array.astype(dtype).reshape(shape)


def decode_outputs(response: grpc_service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    """A response's output tensors by name (the client's side of ``output_tensor``): from raw
    contents when the server sent them, as Triton does, else from typed contents. A malformed
    tensor is an ``InvalidInput`` naming it (the caller decides whose fault that is)."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise InvalidInput(
            f"the response has {len(response.outputs)} outputs but {len(raw)} raw_output_contents"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(response.outputs):
        # An output tensor has the fields of an input tensor that decoding reads.
        arrays[tensor.name] = decode_tensor(tensor, raw[index] if raw else None)  # type: ignore[arg-type]
    return arrays


def input_tensor(name: str, array: np.ndarray) -> tuple[InputTensor, bytes]:
    """An input's metadata and its raw little-endian bytes (for ``raw_input_contents``)."""
    dtype = array.dtype.newbyteorder("<")
    datatype = FROM_NUMPY.get(dtype)
    if datatype is None:
        raise InvalidInput(f"input {quoted(name)}: numpy dtype {array.dtype} has no OIP datatype")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return InputTensor(name=name, datatype=datatype, shape=array.shape), data


def output_metadata(name: str, array: np.ndarray) -> grpc_service_pb2.ModelInferResponse.InferOutputTensor:
    """An output's name, OIP datatype and shape."""
    datatype = FROM_NUMPY.get(array.dtype.newbyteorder("<"))
    if datatype is None:
        raise TypeError(f"no OIP datatype for numpy dtype {array.dtype}")
    return grpc_service_pb2.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=array.shape)


def output_tensor(
    name: str, array: np.ndarray
) -> tuple[grpc_service_pb2.ModelInferResponse.InferOutputTensor, bytes]:
    """An output's metadata and its raw little-endian bytes (for ``raw_output_contents``)."""
    tensor = output_metadata(name, array)
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return tensor, data



# Ragged batches. A Triton batch tensor has one shape, but a detector's items do not: Faster
# R-CNN finds a different number of boxes in each image, and a candidate filter keeps a
# different number of YOLO anchors. An output whose declared shape has a variable dimension (-1)
# is therefore sent padded with zeros to the batch's largest extent along every dimension, beside
# ``<name>__shape`` (INT64, [batch, rank]): each item's real shape. A client cuts each item back
# with ``unstack_items``; one that ignores ``__shape`` outputs sees Triton's usual padded batch.
SHAPE_SUFFIX = "__shape"


def shape_output(name: str) -> str:
    """The name of the output carrying the real per-item shapes of ragged output ``name``."""
    return name + SHAPE_SUFFIX


def stack_items(items: Sequence[Mapping[str, np.ndarray]], ragged: Collection[str]) -> dict[str, np.ndarray]:
    """The items' outputs as one batch: a leading batch dimension on every output, the outputs
    named in ``ragged`` padded and described by their ``__shape`` output, the others stacked as
    they are (their shapes must agree: a model that declares a fixed shape keeps it)."""
    stacked: dict[str, np.ndarray] = {}
    for name in items[0]:
        arrays = [item[name] for item in items]
        if name not in ragged:
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise ValueError(f"output {name!r} is declared with a fixed shape but its items have {sorted(shapes)}")
            stacked[name] = np.stack(arrays)
            continue
        real = np.array([a.shape for a in arrays], dtype=np.int64).reshape(len(arrays), arrays[0].ndim)
        largest = tuple(int(n) for n in real.max(axis=0)) if len(arrays) else ()
        batch = np.zeros((len(arrays), *largest), dtype=arrays[0].dtype)
        for index, array in enumerate(arrays):
            region: tuple[int | slice, ...] = (index, *(slice(0, n) for n in array.shape))
            batch[region] = array
        stacked[name] = batch
        stacked[shape_output(name)] = real
    return stacked


def unstack_items(outputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Per-item outputs of one batched response, each ragged output cut to its item's real shape
    (its ``__shape`` output consumed); the inverse of ``stack_items``."""
    names = [name for name in outputs if not name.endswith(SHAPE_SUFFIX)]
    if not names:
        return []
    size = len(outputs[names[0]])
    items: list[dict[str, np.ndarray]] = [{} for _ in range(size)]
    for name in names:
        batch = outputs[name]
        shapes = outputs.get(shape_output(name))
        if len(batch) != size or (shapes is not None and shapes.shape[:1] != (size,)):
            raise ValueError(f"output {name!r} has {len(batch)} items where the response has {size}")
        for index in range(size):
            item = batch[index]
            if shapes is not None:
                item = item[tuple(slice(0, int(n)) for n in shapes[index])]
            items[index][name] = item
    return items


def infer_response(
    request: grpc_service_pb2.ModelInferRequest,
    name: str,
    version: str,
    outputs: Mapping[str, np.ndarray],
    placed: Callable[[str, np.ndarray], bool] | None = None,
) -> grpc_service_pb2.ModelInferResponse:
    """The answer to ``request``: the outputs it asks for, or all of ``outputs`` in their order
    when it names none, each sent raw; an output the model lacks is the caller's mistake.

    ``placed(name, array)`` is True when it has put the output elsewhere (a shared-memory region
    the request named): its tensor then carries name, datatype and shape, and its raw entry is
    empty, so that raw entries keep the outputs' order (tritonclient finds them by position)."""
    wanted = [o.name for o in request.outputs] or list(outputs)
    response = grpc_service_pb2.ModelInferResponse(model_name=name, model_version=version, id=request.id)
    for output in wanted:
        if output not in outputs:
            raise InvalidInput(f"model {quoted(name)} has no output {quoted(output)} (it has: {', '.join(outputs)})")
        if placed is not None and placed(output, outputs[output]):
            tensor, data = output_metadata(output, outputs[output]), b""
        else:
            tensor, data = output_tensor(output, outputs[output])
        response.outputs.append(tensor)
        response.raw_output_contents.append(data)
    return response
