"""Triton's binary form of a BYTES tensor: each element as a uint32 little-endian length and then
its bytes, elements in row-major order, nothing between them.

It is how BYTES travel in gRPC ``raw_input_contents``/``raw_output_contents`` and in the HTTP
binary tensor data extension, so one pair of functions serves the gateway's REST translation and
the controller's OIP service alike. Shapes are the caller's business: the form carries none, so
``deserialize_bytes`` answers a flat array that the caller reshapes.
"""

from __future__ import annotations

import struct

import numpy as np


def serialize_bytes(array: np.ndarray) -> bytes:
    """The elements of ``array`` (bytes, or str as UTF-8), row-major, each after its length."""
    parts: list[bytes] = []
    for element in np.asarray(array, dtype=object).ravel(order="C"):
        data = element.encode("utf-8") if isinstance(element, str) else bytes(element)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(data: bytes) -> np.ndarray:
    """A flat object array of the bytes elements in ``data``; a length that runs past the end is
    a ValueError naming where (a truncated or mis-sized tensor)."""
    elements: list[bytes] = []
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 4:
            raise ValueError(f"BYTES data ends inside the length of element {len(elements)} (offset {offset})")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > end:
            raise ValueError(f"BYTES element {len(elements)} says {length} bytes but only {end - offset} remain")
        elements.append(bytes(data[offset : offset + length]))
        offset += length
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array
