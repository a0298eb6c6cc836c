"""OIP ``BYTES`` tensors <-> numpy object arrays of ``bytes``.

A BYTES tensor has no fixed item size, so Triton serialises it as each element's length (uint32,
little-endian) followed by the element, in row-major order; that is what ``raw_input_contents``
and ``raw_output_contents`` carry for BYTES, and what ``tritonclient`` and ``perf_analyzer``
send (``tritonclient.utils.serialize_byte_tensor``). A request may also give the elements as
typed ``contents.bytes_contents``. Used by the controller's pipelines, whose input is encoded
images or UTF-8 texts (services/controller/oip_servicer.py).

Kept apart from ``oip.py`` (fixed-size numeric tensors): the two decode different layouts.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from inferline.common.errors import InvalidInput, quoted
from inferline.common.generated import grpc_service_pb2

BYTES = "BYTES"
_LENGTH = struct.Struct("<I")

InputTensor = grpc_service_pb2.ModelInferRequest.InferInputTensor
OutputTensor = grpc_service_pb2.ModelInferResponse.InferOutputTensor


def serialize(array: np.ndarray) -> bytes:
    """Triton's serialisation of a BYTES tensor: a length prefix before each element, row-major.
    ``str`` elements are sent as UTF-8, as tritonclient does."""
    parts: list[bytes] = []
    for element in np.asarray(array, dtype=object).ravel(order="C"):
        data = element.encode("utf-8") if isinstance(element, str) else bytes(element)
        parts += (_LENGTH.pack(len(data)), data)
    return b"".join(parts)


def deserialize(raw: bytes, shape: tuple[int, ...], tensor: str = "") -> np.ndarray:
    """The elements of a serialised BYTES tensor as an object array of ``shape``; a buffer that
    does not hold exactly that many length-prefixed elements is the caller's mistake."""
    count = math.prod(shape)
    elements: list[bytes] = []
    view, offset = memoryview(raw), 0
    while offset < len(raw):
        if len(elements) == count:
            raise InvalidInput(
                f"input {quoted(tensor)}: shape {list(shape)} holds {count} BYTES elements, "
                f"but raw_input_contents has {len(raw) - offset} bytes after them"
            )
        if offset + _LENGTH.size > len(raw):
            raise InvalidInput(f"input {quoted(tensor)}: element {len(elements)} is cut inside its 4-byte length")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + size > len(raw):
            raise InvalidInput(
                f"input {quoted(tensor)}: element {len(elements)} says {size} bytes, "
                f"only {len(raw) - offset} follow (each BYTES element is a uint32 little-endian length, then the bytes)"
            )
        elements.append(bytes(view[offset : offset + size]))
        offset += size
    if len(elements) != count:
        raise InvalidInput(
            f"input {quoted(tensor)}: shape {list(shape)} needs {count} BYTES elements, "
            f"got {len(elements)} in raw_input_contents"
        )
    return _object_array(elements, shape)


def decode_tensor(tensor: InputTensor, raw: bytes | None) -> np.ndarray:
    """One BYTES input as an object array of ``bytes``, from its raw or its typed contents."""
    if tensor.datatype != BYTES:
        raise InvalidInput(f"input {quoted(tensor.name)} is {tensor.datatype}, not {BYTES}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {quoted(tensor.name)} has a negative dimension in shape {list(shape)}")
    if raw is not None:
        return deserialize(raw, shape, tensor.name)
    values = tensor.contents.bytes_contents
    if len(values) != math.prod(shape):
        raise InvalidInput(
            f"input {quoted(tensor.name)}: shape {list(shape)} needs {math.prod(shape)} elements, "
            f"got {len(values)} in contents.bytes_contents"
        )
    return _object_array(list(values), shape)


def output_tensor(name: str, array: np.ndarray) -> tuple[OutputTensor, bytes]:
    """A BYTES output's metadata and its serialised elements (for ``raw_output_contents``)."""
    return OutputTensor(name=name, datatype=BYTES, shape=array.shape), serialize(array)


def _object_array(elements: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)
