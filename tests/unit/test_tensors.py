import numpy as np
import pytest

from inferline.common import tensors
from inferline.common.errors import InvalidInput
from inferline.common.generated import types_pb2


@pytest.mark.parametrize("dtype", ["uint8", "int32", "int64", "float16", "float32", "float64", "bool"])
def test_round_trip_keeps_dtype_shape_and_values(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    restored = tensors.from_proto(tensors.to_proto(array, "x"))
    assert restored.dtype == array.dtype and restored.shape == array.shape
    np.testing.assert_array_equal(restored, array)


def test_bytes_are_little_endian_raw_data():
    message = tensors.to_proto(np.array([1, 256], dtype=">i4"))
    assert message.datatype == types_pb2.DATA_TYPE_INT32
    assert message.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_decoding_is_zero_copy_and_read_only():
    restored = tensors.from_proto(tensors.to_proto(np.zeros((4, 4), np.float32)))
    assert not restored.flags.writeable


def test_size_mismatch_is_invalid_input():
    message = types_pb2.Tensor(name="t", datatype=types_pb2.DATA_TYPE_FP32, shape=[2, 2], data=b"\x00" * 12)
    with pytest.raises(InvalidInput, match="needs 16 bytes, got 12"):
        tensors.from_proto(message)


def test_unspecified_datatype_is_invalid_input():
    with pytest.raises(InvalidInput, match="unsupported datatype"):
        tensors.from_proto(types_pb2.Tensor(name="t", shape=[1], data=b"\x00"))
