"""Ragged batches over OIP: items whose outputs differ in shape travel as one padded batch tensor
beside ``<name>__shape``, and come back exactly as they went."""

import numpy as np
import pytest

from inferline.common.oip import shape_output, stack_items, unstack_items


def test_items_with_different_detection_counts_come_back_as_they_went():
    items = [
        {"boxes": np.arange(12, dtype=np.float32).reshape(3, 4), "label": np.array([7], np.int64)},
        {"boxes": np.zeros((0, 4), np.float32), "label": np.array([8], np.int64)},
        {"boxes": np.ones((1, 4), np.float32), "label": np.array([9], np.int64)},
    ]
    batch = stack_items(items, ragged={"boxes"})
    assert batch["boxes"].shape == (3, 3, 4)
    assert batch[shape_output("boxes")].tolist() == [[3, 4], [0, 4], [1, 4]]
    assert shape_output("label") not in batch
    back = unstack_items(batch)
    assert len(back) == 3
    for sent, got in zip(items, back, strict=True):
        assert set(got) == set(sent)
        for name in sent:
            assert got[name].dtype == sent[name].dtype
            np.testing.assert_array_equal(got[name], sent[name])


def test_ragged_along_any_dimension_pads_with_zeros():
    items = [{"output0": np.full((84, 2), 1.5, np.float32)}, {"output0": np.full((84, 5), 2.5, np.float32)}]
    batch = stack_items(items, ragged={"output0"})
    assert batch["output0"].shape == (2, 84, 5)
    assert (batch["output0"][0, :, 2:] == 0).all()
    assert [a.shape for a in (i["output0"] for i in unstack_items(batch))] == [(84, 2), (84, 5)]


def test_a_fixed_output_whose_items_differ_is_a_bug_named_by_its_output():
    items = [{"embedding": np.zeros(4, np.float32)}, {"embedding": np.zeros(5, np.float32)}]
    with pytest.raises(ValueError, match="embedding"):
        stack_items(items, ragged=())
