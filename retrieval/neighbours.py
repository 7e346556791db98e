"""Weights-only text vectors by neighbour transfer: a LoRA's weights place it among the library's LoRAs, and the
metadata texts of its nearest neighbours (those that have metadata), weighted by similarity, give its vector in
the text embedder's space. It needs no training and no metadata of the LoRA itself, so it finds LoRAs that have
none (a bare file off a hard disk) from a prompt, and it is the studio's weights-only channel (``neighbours`` in
`retrieval.library`).

Where LoRAs are near each other: per attention module, the output-side Gram sketch of ΔW from the weight
descriptor's blocks (what training pushed, blind to the random down matrix; `retrieval.descriptor`), each module's
sketch normalised, laid out over the family's attention modules. Within the library, what LoRAs trained from one
initialisation share is taken out (`retrieval.shared_init`: on TinyWorld it outweighs the concept), then PCA to
`CONTENT_PCA` and cosine kNN. The layout is exact on purpose: feature-hashing it into a few hundred values (so it
could be stored per file) drowned the concept in collision noise (R@3 below 0.45 at 256 values, as against 0.79).

Measured on TinyWorld (`bench/retrieval.py`): LoRAs of a concept the metadata of other LoRAs describes, ranked
weights-only against prompts in other words, R@3 0.25 with the learned encoder (`retrieval.encoder`), and far
higher by neighbour transfer (the figure is in ``bench/results/retrieval.json``, "weights_only_unseen").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .descriptor import DescriptorConfig, attention_part
from .shared_init import centre_groups, shared_init_groups

CONTENT_PCA = 32     # PCA size of the library's centred content rows, where neighbours are found
NEIGHBOURS = 5       # neighbours with metadata that give a LoRA its vector ...
TEMPERATURE = 0.05   # ... weighted by softmax(cosine / TEMPERATURE)
PCA_FIT_ROWS = 2048  # PCA is fitted on at most this many LoRAs (a fixed random sample)


def _gram_slice(cfg: DescriptorConfig) -> slice:
    d = cfg.sketch
    return slice(d * d, d * d + d * (d + 1) // 2)


def attention_grams(names: Sequence[str], blocks: np.ndarray, cfg: DescriptorConfig
                    ) -> tuple[list[str], np.ndarray]:
    """(attention module names, their output-Gram sketches (n, w) float16) from one LoRA's raw descriptor blocks."""
    rows = [k for k, n in enumerate(names) if attention_part(n) is not None]
    grams = np.asarray(blocks)[rows][:, _gram_slice(cfg)] if rows else np.zeros((0, 0))
    return [names[k] for k in rows], grams.astype(np.float16)


def content_rows(items: Sequence[tuple[Sequence[str], np.ndarray]], chunk: int = 1024) -> np.ndarray:
    """(n, modules·w) float32 unit rows: each LoRA's `attention_grams` (each module's normalised) laid out over the
    union of their module names (a missing module is zeros). LoRAs with the same module list go in batches of
    `chunk` (no temporary the size of the whole matrix: on these VMs touching fresh memory is what costs)."""
    names = sorted({n for ns, _ in items for n in ns})
    pos = {n: i for i, n in enumerate(names)}
    w = next((g.shape[1] for _, g in items if g.size), 1)
    X = np.zeros((len(items), len(names) * w), dtype=np.float32)
    batches: dict[tuple, list[int]] = {}
    for r, (ns, _) in enumerate(items):
        if len(ns):
            batches.setdefault(tuple(ns), []).append(r)
    for ns, rows in batches.items():
        cols = (np.array([pos[n] for n in ns])[:, None] * w + np.arange(w)).ravel()
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            g = np.stack([items[r][1] for r in part]).astype(np.float32)      # (b, m, w)
            norms = np.sqrt(np.einsum("bmw,bmw->bm", g, g))
            live = norms > 1e-12
            g *= (np.where(live, 1.0 / np.where(live, norms, 1.0), 0.0)
                  / np.sqrt(live.sum(1, keepdims=True).clip(1)))[:, :, None].astype(np.float32)
            X[np.array(part)[:, None], cols[None, :]] = g.reshape(len(part), -1)
    return X


def content_space(rows: np.ndarray, init_prints: np.ndarray, dim: int = CONTENT_PCA,
                  fit_rows: int = PCA_FIT_ROWS) -> np.ndarray:
    """(n, ≤dim) unit rows: a library's `content_rows`, centred within shared-initialisation groups (in place:
    `rows` is overwritten when it is float32), PCA'd (fitted on at most `fit_rows` of them)."""
    X = centre_groups(np.asarray(rows, dtype=np.float32), shared_init_groups(init_prints), copy=False)
    X -= X.mean(axis=0)
    k = min(dim, max(1, len(X) - 1), X.shape[1])
    if len(X) > 2:
        fit = X if len(X) <= fit_rows else X[np.sort(np.random.default_rng(0).choice(len(X), fit_rows, False))]
        X = X @ _top_components(fit, k).T
    return (X / np.linalg.norm(X, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def _top_components(A: np.ndarray, k: int, oversample: int = 32, power: int = 3,
                    exact_flops: float = 2e9) -> np.ndarray:
    """(k, d) top right singular vectors of A (n, d): exact while that costs under `exact_flops` (a library of a
    few hundred LoRAs), else a seeded randomised SVD (range finder with `power` power iterations; Halko et al.
    2011)."""
    n, d = A.shape
    if min(n, d) <= k + oversample or n * d * min(n, d) <= exact_flops:
        return np.linalg.svd(A, full_matrices=False)[2][:k]
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(A @ rng.standard_normal((A.shape[1], k + oversample)).astype(A.dtype))[0]
    for _ in range(power):
        Q = np.linalg.qr(A @ np.linalg.qr(A.T @ Q)[0])[0]
    return np.linalg.svd(Q.T @ A, full_matrices=False)[2][:k]


def neighbour_vectors(X: np.ndarray, sources: np.ndarray, texts: np.ndarray, k: int = NEIGHBOURS,
                      temperature: float = TEMPERATURE) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """(vectors (n, d) unit rows, has (n,) bool, used): per LoRA (rows of `X`, from `content_space`), the
    softmax-weighted mean of the text vectors (`texts`, one row per True of the `sources` mask) of its `k` nearest
    sources, itself excluded; `used[i]`: the rows of `X` whose text it took, heaviest first. LoRAs with no other
    source get no vector."""
    import faiss

    sources = np.asarray(sources, dtype=bool)
    src_rows = np.flatnonzero(sources)
    n, d = len(X), texts.shape[1]
    out, has = np.zeros((n, d), dtype=np.float32), np.zeros(n, dtype=bool)
    used: list[list[int]] = [[] for _ in range(n)]
    if len(src_rows) == 0 or n == 0:
        return out, has, used
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(np.ascontiguousarray(X[src_rows], dtype=np.float32))
    kk = min(k + 1, len(src_rows))
    D, I = index.search(np.ascontiguousarray(X, dtype=np.float32), kk)
    for row in range(n):
        keep = (I[row] >= 0) & (src_rows[I[row].clip(0)] != row)
        sims, picks = D[row][keep][:k], I[row][keep][:k]
        if len(picks) == 0:
            continue
        w = np.exp((sims - sims.max()) / temperature)
        v = (w / w.sum()) @ texts[picks]
        norm = np.linalg.norm(v)
        if norm > 1e-12:
            out[row], has[row] = v / norm, True
            used[row] = [int(src_rows[p]) for p in picks[np.argsort(-w, kind="stable")]]
    return out, has, used
