"""Embedding math for CLIP-style models: normalisation, zero-shot, ranking, clustering, dedup.

Numpy only: the postprocess stage runs without torch. The model hands over raw (unnormalised)
tower outputs; everything CLIP does with them is cosine similarity, i.e. dot products of
L2-normalised vectors, so every function here works on normalised rows. Products are taken in
float64: the results are then within float32 rounding of torch's float32 reference and, more
important for users, ties and orders do not flip between runs or machines.
"""

from __future__ import annotations

import numpy as np

# torch.nn.functional.normalize's default eps: a zero vector stays zero instead of becoming NaN.
_EPS = 1e-12
# Rows of the similarity matrix computed at once by threshold_groups (bounds memory at N x 1024).
_CHUNK = 1024


def _matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32: ``x / max(||x||, 1e-12)``, as
    ``torch.nn.functional.normalize(x, dim=-1)`` (what ``encode_*(normalize=True)`` does).

    CLIP compares embeddings by angle only; the tower outputs' lengths carry no meaning. The
    norm is computed in float64, so the result is the correctly rounded float32 of the exact
    quotient (torch's float32 norm is within an ulp of it).
    """
    return _normalized64(x).astype(np.float32)


def _normalized64(x: np.ndarray) -> np.ndarray:
    """Unit rows in float64, for the functions that normalise their input themselves (a
    threshold then compares exact-as-can-be cosines, not float32-rounded ones)."""
    x64 = _matrix(x, "x").astype(np.float64, copy=False)
    norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))[:, None]
    return x64 / np.maximum(norms, _EPS)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def _best_first(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Indices by score, highest first; equal scores keep index order (stable), so an answer
    never depends on the sort algorithm. top_k <= 0 means all."""
    order = np.argsort(-scores, kind="stable")
    return order if top_k <= 0 else order[:top_k]


def zero_shot(
    images_normed: np.ndarray, texts_normed: np.ndarray, logit_scale: float, top_k: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """CLIP zero-shot classification: for each image, the probability of each text (prompt).

    Exactly CLIP's ``(logit_scale * image_features @ text_features.T).softmax(dim=-1)`` on
    normalised features, where ``logit_scale`` is the trained temperature ``exp(t)`` the weights
    carry (100.0 for OpenAI's CLIP, which is why the paper's snippet hard-codes 100). The softmax
    is over all texts: the probabilities of the ``top_k`` returned texts are not renormalised, so
    they mean the same whatever top_k is asked.

    Returns one ``(text indices int64, probabilities float32)`` per image, best first, ties in
    text order; ``top_k <= 0`` returns all texts.
    """
    images = _matrix(images_normed, "images_normed").astype(np.float64, copy=False)
    texts = _matrix(texts_normed, "texts_normed").astype(np.float64, copy=False)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"image and text embeddings differ in width: {images.shape[1]} vs {texts.shape[1]}")
    if texts.shape[0] == 0:
        raise ValueError("zero-shot needs at least one text")
    if not np.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a positive number, got {logit_scale!r}")
    probs = _softmax(float(logit_scale) * (images @ texts.T))
    results = []
    for row in probs:
        order = _best_first(row, int(top_k))
        results.append((order.astype(np.int64), row[order].astype(np.float32)))
    return results


def rank(
    queries_normed: np.ndarray, items_normed: np.ndarray, top_k: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Retrieval: for each query, the items by cosine similarity, most similar first.

    Text-to-image search and image-to-image search alike: the embedding space is shared, so one
    dot product ranks either way. Returns one ``(item indices int64, cosine float32)`` per query;
    equal scores keep item order; ``top_k <= 0`` returns all items.
    """
    queries = _matrix(queries_normed, "queries_normed").astype(np.float64, copy=False)
    items = _matrix(items_normed, "items_normed").astype(np.float64, copy=False)
    if queries.shape[1] != items.shape[1]:
        raise ValueError(f"queries and items differ in width: {queries.shape[1]} vs {items.shape[1]}")
    scores = queries @ items.T
    results = []
    for row in scores:
        order = _best_first(row, int(top_k))
        results.append((order.astype(np.int64), row[order].astype(np.float32)))
    return results


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0, 1, 2, ... in the order they first occur: the same partition then
    has the same labels whatever internal ids (centroid slots, union roots) produced it."""
    _, first = np.unique(labels, return_index=True)
    mapping = np.empty(labels.max() + 1, dtype=np.int64)
    mapping[labels[np.sort(first)]] = np.arange(len(first))
    return mapping[labels]


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 100, n_init: int = 4) -> np.ndarray:
    """Spherical k-means: ``k`` groups of embeddings by cosine similarity; one label per row.

    Rows are L2-normalised first (CLIP embeddings are compared by angle); each point joins the
    centroid with the highest cosine, and a centroid is its members' mean, renormalised (Lloyd's
    iterations on the sphere; they stop when no label changes, or after ``max_iter`` rounds).

    Lloyd's iterations only find a local optimum: a start with two centres in one cluster ends
    with that cluster split and two others merged. So the start is greedy k-means++ (as
    scikit-learn: each next centre is the best of ``2 + log k`` candidates drawn with
    probability proportional to their squared distance ``2 - 2 cos`` to the nearest chosen
    centre), and ``n_init`` starts are run, keeping the one with the highest total cosine to
    its centroids (the first on ties). All draws come from ``numpy.random.default_rng(seed)``:
    one input and seed give one answer, on any machine.

    A centroid left without members keeps its place. If the data holds fewer than ``k``
    distinct points, fewer than ``k`` labels come back. Labels are renumbered in order of first
    appearance (row 0 is in group 0, the first row not in group 0 is in group 1, ...), so equal
    partitions read the same.
    """
    data = _normalized64(x)
    n = data.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k = {k} clusters asked of {n} embeddings; k must be at most the number of rows")
    if max_iter < 1 or n_init < 1:
        raise ValueError(f"max_iter and n_init must be at least 1, got {max_iter} and {n_init}")
    rng = np.random.default_rng(seed)
    best_labels, best_score = None, -np.inf
    for _ in range(n_init):
        labels, score = _lloyd(data, _kmeans_plus_plus(data, k, rng), max_iter)
        if score > best_score + 1e-9 * n:
            best_labels, best_score = labels, score
    assert best_labels is not None  # n_init >= 1 runs set it
    return _first_appearance(best_labels)


def _kmeans_plus_plus(data: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = data.shape[0]
    trials = 2 + int(np.log(k))
    chosen = [int(rng.integers(n))]
    closest = np.maximum(2.0 - 2.0 * (data @ data[chosen[0]]), 0.0)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # every point coincides with a centre: take the first unused row
            chosen.append(int(np.setdiff1d(np.arange(n), chosen)[0]))
            continue
        draws = rng.random(trials) * total
        candidates = np.minimum(np.searchsorted(np.cumsum(closest), draws, side="right"), n - 1)
        distances = np.maximum(2.0 - 2.0 * (data[candidates] @ data.T), 0.0)  # (trials, n)
        potentials = np.minimum(closest, distances).sum(axis=1)
        best = int(np.argmin(potentials))
        chosen.append(int(candidates[best]))
        closest = np.minimum(closest, distances[best])
    return data[chosen].copy()


def _lloyd(data: np.ndarray, centroids: np.ndarray, max_iter: int) -> tuple[np.ndarray, float]:
    """Spherical Lloyd iterations; the labels and their total cosine to their centroids."""
    labels = np.full(data.shape[0], -1, dtype=np.int64)
    for _ in range(max_iter):
        new_labels = np.argmax(data @ centroids.T, axis=1)  # ties: the lowest centroid index
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for c in range(centroids.shape[0]):
            members = data[labels == c]
            if len(members):
                mean = members.sum(axis=0)
                norm = np.linalg.norm(mean)
                if norm > _EPS:
                    centroids[c] = mean / norm
    score = float(np.einsum("ij,ij->", data, centroids[labels]))
    return labels, score


def threshold_groups(x: np.ndarray, threshold: float) -> np.ndarray:
    """Near-duplicate groups: single-linkage clustering cut at a cosine ``threshold``.

    Two rows whose cosine similarity is >= threshold are in one group, and so, transitively,
    are their partners (A~B and B~C put A, B and C together even when A and C are further
    apart): the connected components of the "similar enough" graph. Unlike k-means, no group
    count is needed, and every singleton stays its own group. Group ids are in order of first
    appearance. The similarity matrix is built 1024 rows at a time, so memory stays O(N * 1024).
    """
    data = _normalized64(x)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite cosine similarity, got {threshold!r}")
    n = data.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Union-find, vectorised: every root only ever points to a smaller index, so there are no
    # cycles; each round hooks the larger root of every still-split pair under the smaller one.
    parent = np.arange(n)
    for start in range(0, n, _CHUNK):
        block = data[start : start + _CHUNK] @ data.T
        rows, cols = np.nonzero(block >= threshold)
        rows += start
        upper = cols > rows  # each pair once, no self-pairs
        rows, cols = rows[upper], cols[upper]
        while rows.size:
            root_r, root_c = _roots(parent, rows), _roots(parent, cols)
            split = root_r != root_c
            rows, cols, root_r, root_c = rows[split], cols[split], root_r[split], root_c[split]
            parent[np.maximum(root_r, root_c)] = np.minimum(root_r, root_c)
    return _first_appearance(_roots(parent, np.arange(n)))


def _roots(parent: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Each item's root, compressing the paths on the way (pointer jumping)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent[items]
        parent[:] = grand
