"""Embedding math (numpy) against torch's reference operations, and clustering on clear cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inferline.services.postprocess import embeddings
from inferline.services.postprocess.embeddings import kmeans, l2_normalize, rank, threshold_groups, zero_shot


def _random(n: int, d: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) * 3


def _clusters(
    centres: int, per: int, d: int = 64, spread: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Points around well-separated directions, shuffled; returns the points and true labels."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(d, centres)))[0].T  # orthonormal: cosine 0 apart
    truth = rng.permutation(np.repeat(np.arange(centres), per))
    points = directions[truth] + spread * rng.normal(size=(len(truth), d))
    return (points * rng.uniform(0.5, 5, size=(len(truth), 1))).astype(np.float32), truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :]))


def test_l2_normalize_equals_torch():
    x = _random(50)
    x[3] = 0  # a zero row stays zero (torch's eps), no NaN
    ours = l2_normalize(x)
    expected = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).numpy()
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ours[3], 0)
    norms = np.linalg.norm(np.delete(ours, 3, axis=0).astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1, atol=1e-6)
    np.testing.assert_allclose(l2_normalize(x.astype(np.float64) * 1e-3), ours, atol=1e-7)  # scale-free
    np.testing.assert_allclose(l2_normalize(ours), ours, atol=1e-7)  # idempotent
    assert l2_normalize(np.zeros((0, 8), np.float32)).shape == (0, 8)


@pytest.mark.parametrize("bad", [np.zeros(4), np.zeros((2, 2, 2)), np.array([[1.0, np.nan]]), np.array([["a"]])])
def test_l2_normalize_refuses_non_matrices(bad):
    with pytest.raises(ValueError):
        l2_normalize(bad)


@pytest.mark.parametrize("logit_scale", [100.0, 14.285714149475098, 1.0])
def test_zero_shot_equals_clip_softmax(logit_scale):
    images, texts = l2_normalize(_random(7, seed=1)), l2_normalize(_random(11, seed=2))
    reference = (logit_scale * torch.from_numpy(images) @ torch.from_numpy(texts).T).softmax(dim=-1).numpy()
    results = zero_shot(images, texts, logit_scale, top_k=0)
    assert len(results) == 7
    for (indices, probs), expected in zip(results, reference, strict=True):
        assert indices.dtype == np.int64 and probs.dtype == np.float32 and len(indices) == 11
        np.testing.assert_allclose(probs, expected[indices], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(indices, np.argsort(-expected, kind="stable"))
        assert np.all(np.diff(probs) <= 0)
        assert probs.sum() == pytest.approx(1, abs=1e-5)


def test_zero_shot_top_k_keeps_the_full_softmax():
    images, texts = l2_normalize(_random(3, seed=3)), l2_normalize(_random(20, seed=4))
    full = zero_shot(images, texts, 100.0)
    for k in (1, 5, 20, 50):
        for (indices, probs), (all_indices, all_probs) in zip(
            zero_shot(images, texts, 100.0, top_k=k), full, strict=True
        ):
            assert len(indices) == min(k, 20)
            np.testing.assert_array_equal(indices, all_indices[:k])
            np.testing.assert_array_equal(probs, all_probs[:k])  # not renormalised over the k
    assert len(zero_shot(images, texts, 100.0, top_k=-1)[0][0]) == 20


def test_zero_shot_picks_the_matching_text_and_breaks_ties_by_order():
    texts = l2_normalize(np.eye(4, dtype=np.float32))
    images = l2_normalize(np.array([[0.1, 0.2, 3.0, 0.0], [1.0, 1.0, 0.0, 0.0]], np.float32))
    (first, first_probs), (tie, tie_probs) = zero_shot(images, texts, 100.0)
    assert first[0] == 2 and first_probs[0] > 0.99
    np.testing.assert_array_equal(tie, [0, 1, 2, 3])  # texts 0 and 1 tie, and so do 2 and 3
    assert tie_probs[0] == tie_probs[1]


def test_zero_shot_refuses_bad_arguments():
    images, texts = l2_normalize(_random(2, 8)), l2_normalize(_random(3, 8))
    with pytest.raises(ValueError, match="width"):
        zero_shot(images, l2_normalize(_random(3, 9)), 100.0)
    with pytest.raises(ValueError, match="at least one text"):
        zero_shot(images, texts[:0], 100.0)
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="logit_scale"):
            zero_shot(images, texts, scale)


def test_rank_orders_items_by_cosine():
    queries, items = l2_normalize(_random(4, seed=5)), l2_normalize(_random(30, seed=6))
    expected = torch.from_numpy(queries) @ torch.from_numpy(items).T
    for (indices, scores), row in zip(rank(queries, items), expected.numpy(), strict=True):
        np.testing.assert_array_equal(indices, np.argsort(-row, kind="stable"))
        np.testing.assert_allclose(scores, row[indices], atol=1e-6)
        assert np.all(np.diff(scores) <= 0)
    top = rank(queries, items, top_k=3)
    assert all(len(indices) == 3 for indices, _ in top)
    # An item equal to the query ranks first with cosine 1; duplicates keep their order.
    dup = np.concatenate([items[:5], items[2:3], items[5:]])
    indices, scores = rank(dup[2:3], dup)[0]
    assert list(indices[:2]) == [2, 5] and scores[0] == pytest.approx(1, abs=1e-6)
    with pytest.raises(ValueError, match="width"):
        rank(queries, items[:, :10])


def test_kmeans_finds_obvious_clusters_deterministically():
    points, truth = _clusters(centres=5, per=20)
    labels = kmeans(points, 5, seed=0)
    assert labels.dtype.kind == "i" and labels.shape == (100,)
    assert _same_partition(labels, truth)
    assert labels[0] == 0 and set(labels.tolist()) == set(range(5))
    firsts = [int(np.argmax(labels == c)) for c in range(5)]
    assert firsts == sorted(firsts)  # numbered in order of first appearance
    np.testing.assert_array_equal(kmeans(points, 5, seed=0), labels)  # deterministic
    for seed in range(1, 6):
        np.testing.assert_array_equal(kmeans(points, 5, seed=seed), labels)  # clear clusters: any seed
    np.testing.assert_array_equal(kmeans(points * 7.0, 5), labels)  # cosine: scale-free


def test_kmeans_edge_cases():
    points, _ = _clusters(centres=3, per=4)
    np.testing.assert_array_equal(kmeans(points, 1), np.zeros(12))
    np.testing.assert_array_equal(np.sort(kmeans(points, 12)), np.arange(12))  # k = N: one each
    with pytest.raises(ValueError, match="k = 13"):
        kmeans(points, 13)
    for bad_k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            kmeans(points, bad_k)
    # Fewer distinct points than k: no crash, fewer labels.
    same = np.tile(points[:1], (5, 1))
    labels = kmeans(same, 3)
    assert labels.shape == (5,) and labels.max() < 3
    assert len(set(kmeans(np.concatenate([same, points[4:5]]), 3).tolist())) == 2


def test_threshold_groups_is_transitive_single_linkage():
    # A ~ B (cos 0.95), B ~ C (cos 0.95), but A vs C is cos ~0.81: single linkage joins all three.
    angle = np.arccos(0.95)
    chain = np.array([[np.cos(k * angle), np.sin(k * angle), 0.0] for k in range(3)])
    other = np.array([[0.0, 0.0, 1.0]])
    x = np.concatenate([other, chain, other * 2]).astype(np.float32)
    labels = threshold_groups(x, 0.94)
    np.testing.assert_array_equal(labels, [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(threshold_groups(x, 0.96), [0, 1, 2, 3, 0])  # only the duplicates
    np.testing.assert_array_equal(threshold_groups(x, -1.0), [0, 0, 0, 0, 0])
    assert threshold_groups(x[:0], 0.9).shape == (0,)


def test_threshold_groups_finds_near_duplicates():
    base = l2_normalize(_random(40, 64, seed=8))
    rng = np.random.default_rng(9)
    copies = rng.choice(40, 15, replace=False)
    noisy = base[copies] + 0.01 * rng.normal(size=(15, 64)).astype(np.float32)
    x = np.concatenate([base, noisy])
    labels = threshold_groups(x, 0.98)
    truth = np.concatenate([np.arange(40), copies])
    assert _same_partition(labels, truth)
    np.testing.assert_array_equal(labels[:40], np.arange(40))  # ids in order of first appearance
    np.testing.assert_array_equal(labels[40:], copies)


def test_threshold_groups_matches_brute_force_across_chunks(monkeypatch):
    monkeypatch.setattr(embeddings, "_CHUNK", 7)  # many chunks, pairs spanning them
    x = l2_normalize(_random(60, 3, seed=10))
    for threshold in (0.5, 0.9, 0.99):
        labels = threshold_groups(x, threshold)
        # Brute force: the transitive closure of the adjacency matrix.
        reach = (x.astype(np.float64) @ x.T.astype(np.float64)) >= threshold
        for _ in range(8):
            reach = (reach.astype(np.int64) @ reach.astype(np.int64)) > 0
        assert _same_partition(labels, np.argmax(reach, axis=1)), threshold


def test_threshold_groups_joins_a_long_chain(monkeypatch):
    monkeypatch.setattr(embeddings, "_CHUNK", 64)
    angles = np.linspace(0, np.pi / 2, 500)  # neighbours close, the ends orthogonal
    chain = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    step = np.cos(angles[1] - angles[0])
    np.testing.assert_array_equal(threshold_groups(chain, step - 1e-9), np.zeros(500))
    np.testing.assert_array_equal(threshold_groups(chain, step + 1e-9), np.arange(500))
