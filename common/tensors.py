"""numpy <-> ``inferline.v1.Tensor``: raw little-endian bytes plus dtype and shape."""

from __future__ import annotations

import math

import numpy as np

from inferline.common.errors import InvalidInput, quoted
from inferline.common.generated import types_pb2

_TO_NUMPY: dict[types_pb2.DataType, np.dtype] = {
    types_pb2.DATA_TYPE_BOOL: np.dtype("?"),
    types_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
    types_pb2.DATA_TYPE_INT8: np.dtype("i1"),
    types_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    types_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    types_pb2.DATA_TYPE_FP16: np.dtype("<f2"),
    types_pb2.DATA_TYPE_FP32: np.dtype("<f4"),
    types_pb2.DATA_TYPE_FP64: np.dtype("<f8"),
}
_FROM_NUMPY: dict[np.dtype, types_pb2.DataType] = {dt.newbyteorder("<"): code for code, dt in _TO_NUMPY.items()}

# No message is larger than 2 GiB (protobuf's own limit), so neither is a tensor in one: a shape
# that claims more is refused before numpy sees it.
_MAX_TENSOR_BYTES = 2**31
# numpy's own limit on the number of dimensions (NPY_MAXDIMS is 32 before numpy 2, 64 after).
_MAX_DIMS = 32

# Config files and metadata name dtypes the short way.
DTYPE_NAMES: dict[str, types_pb2.DataType] = {
    "bool": types_pb2.DATA_TYPE_BOOL,
    "uint8": types_pb2.DATA_TYPE_UINT8,
    "int8": types_pb2.DATA_TYPE_INT8,
    "int32": types_pb2.DATA_TYPE_INT32,
    "int64": types_pb2.DATA_TYPE_INT64,
    "float16": types_pb2.DATA_TYPE_FP16,
    "float32": types_pb2.DATA_TYPE_FP32,
    "float64": types_pb2.DATA_TYPE_FP64,
}


def to_proto(array: np.ndarray, name: str = "") -> types_pb2.Tensor:
    dtype = array.dtype.newbyteorder("<")
    code = _FROM_NUMPY.get(dtype)
    if code is None:
        raise TypeError(f"no tensor datatype for numpy dtype {array.dtype}")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return types_pb2.Tensor(name=name, datatype=code, shape=array.shape, data=data)


def dtype_of(datatype: types_pb2.DataType) -> np.dtype:
    """The numpy dtype of a tensor datatype; InvalidInput for one this project does not know."""
    dtype = _TO_NUMPY.get(datatype)
    if dtype is None:
        raise InvalidInput(f"unknown tensor datatype {datatype}")
    return dtype


def from_proto(tensor: types_pb2.Tensor) -> np.ndarray:
    """A read-only view on the message's bytes: no copy, so callers copy only if they write.

    Everything a sender can get wrong is an ``InvalidInput`` naming the tensor: an unknown
    datatype, a negative dimension, a shape whose element count overflows int64 (computed with
    Python integers, so it cannot wrap round to a small or negative number), or bytes that do
    not match shape x dtype.
    """
    name = quoted(tensor.name)
    dtype = _TO_NUMPY.get(tensor.datatype)
    if dtype is None:
        known = ", ".join(types_pb2.DataType.Name(code) for code in _TO_NUMPY)
        raise InvalidInput(f"tensor {name} has unsupported datatype {tensor.datatype} (supported: {known})")
    shape = tuple(tensor.shape)
    if len(shape) > _MAX_DIMS:
        raise InvalidInput(f"tensor {name} has {len(shape)} dimensions; at most {_MAX_DIMS} are supported")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"tensor {name} has a negative dimension in shape {_shape_text(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if expected > _MAX_TENSOR_BYTES:
        raise InvalidInput(
            f"tensor {name}: shape {_shape_text(shape)} of {dtype.name} would need {expected} bytes, "
            "more than any message can carry"
        )
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"tensor {name}: shape {_shape_text(shape)} of {dtype.name} needs {expected} bytes, "
            f"got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def _shape_text(shape: tuple[int, ...]) -> str:
    """The shape for a message, cut like any client-supplied value (a shape can have 10^6 dims)."""
    return quoted(list(shape))


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a config-file dtype name ("uint8", "float32", ...)."""
    return _TO_NUMPY[DTYPE_NAMES[name]]
