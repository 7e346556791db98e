"""Weights-only text vectors by neighbour transfer: a LoRA's weights place it among the library's LoRAs, and the
metadata texts of its nearest neighbours (those that have metadata), weighted by similarity, give its vector in
the text embedder's space. It needs no training and no metadata of the LoRA itself, so it finds LoRAs that have
none (a bare file off a hard disk) from a prompt, and it is the studio's weights-only channel (``neighbours`` in
`retrieval.library`).

Where LoRAs are near each other: per attention module, the output-side Gram ``L·Lᵀ`` of ΔW from the content
factor stored with the descriptor's blocks (what training pushed, blind to the random down matrix;
`retrieval.descriptor`, 32 rows: exact for modules of up to 32 outputs), each module's Gram normalised, laid out
over the family's attention modules (`ContentRows`, built chunk by chunk: explicit they would take gigabytes at
10 000 LoRAs; at most `CONTENT_MODULES` modules, evenly spread: on TinyWorld half of its 128 modules scored
within 0.01 of all of them, a quarter 0.05 lower; 2 000 SDXL-shaped LoRAs, 560 modules, take 4 s instead of
41 s). Within the library, what LoRAs trained from one initialisation share is taken out
(`retrieval.shared_init`: on TinyWorld it outweighs the concept), then PCA to `CONTENT_PCA` and cosine kNN. The
layout is exact on purpose: feature-hashing it into a few hundred values (so it could be stored per file) drowned
the concept in collision noise (R@3 below 0.45 at 256 values, as against 0.79).

Measured on TinyWorld (`bench/retrieval.py`, "weights_only_unseen"): LoRAs of a concept the metadata of other
LoRAs describes, ranked weights-only against prompts in other words, R@3 0.25 with the learned encoder
(`retrieval.encoder`), and far higher by neighbour transfer. The Gram at 32 rows instead of the descriptor's 8
raised the mean R@3 over 8 random splits from 0.738 to 0.769 (0.651 to 0.671 on the second prompt set) with the
committed projections; averaged over 4 draws of the projections, from 0.71 (draws 0.69-0.74, measured by swapping
the 8-row projection by hand) to 0.78 (0.75-0.80, "projection_draws" in the benchmark's JSON). Those figures are
from a library where most LoRAs shared an initialisation with others; rebuilt with one seed per file (as different
trainers' files are) the mean over 8 splits is 0.66 (0.65 over 4 draws): LoRAs of one concept trained from
different seeds have nearly unrelated ΔW (`bench/lora_overlap.py`), and the Gram does not fully undo that. Taking
out of the one shared-seed batch only what its groups show (`centre_groups`' shrunk leave-one-out mean, instead of
each group's plain mean) raised that to 0.748 (0.755 over 4 draws; second prompt set 0.575 -> 0.650).
"""
from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import Sequence

import numpy as np

from .descriptor import DescriptorConfig, attention_part
from .shared_init import centre_groups, group_shrinkage, shared_init_groups

CONTENT_PCA = 32     # PCA size of the library's centred content rows, where neighbours are found
NEIGHBOURS = 5       # neighbours with metadata that give a LoRA its vector ...
TEMPERATURE = 0.05   # ... weighted by softmax(cosine / TEMPERATURE)
PCA_FIT_ROWS = 1024  # PCA is fitted on at most this many LoRAs (a fixed random sample)
CONTENT_MODULES = 128   # attention modules the content rows use at most (TinyWorld and SD1.5 have 128)
THREADS = min(4, os.cpu_count() or 1)   # threads that build content rows (10 000 LoRAs: 3.7 s on one, 2.6 on two)


def attention_factors(names: Sequence[str], blocks: np.ndarray, cfg: DescriptorConfig
                      ) -> tuple[list[str], np.ndarray]:
    """(attention module names, their output-side content factors (n, k·c) float16) from one LoRA's stored
    descriptor blocks (`retrieval.descriptor`: the columns after the descriptor block)."""
    if not cfg.content_sketch:
        raise ValueError("the neighbours channel needs descriptor blocks stored with a content factor "
                         "(DescriptorConfig.content_sketch > 0)")
    rows = _attention_rows(tuple(names))
    blocks = np.asarray(blocks)
    if rows and blocks.shape[1] < cfg.stored_block:
        raise ValueError(f"stored blocks are {blocks.shape[1]} wide, not {cfg.stored_block}: made with another "
                         "descriptor configuration")
    factors = blocks[rows][:, cfg.block:cfg.stored_block] if rows else np.zeros((0, cfg.content_width))
    return [names[k] for k in rows], factors.astype(np.float16)


@lru_cache(maxsize=256)
def _attention_rows(names: tuple[str, ...]) -> list[int]:
    """Positions of the UNet attention projections in a module list (memoised: LoRAs of a library share a few
    layouts, and matching 10 000 × 128 names one by one took seconds)."""
    return [k for k, n in enumerate(names) if attention_part(n) is not None]


class ContentRows:
    """A library's content rows, built on demand: per LoRA, each attention module's output Gram
    ``L·Lᵀ`` (upper triangle, from its `attention_factors`; each module normalised, a LoRA's modules together of
    unit norm) laid out over the union of the LoRAs' module names (a missing module is zeros). Explicit, they
    would take gigabytes at 10 000 LoRAs, so `rows` builds any subset, in batches of LoRAs with one module list."""

    def __init__(self, items: Sequence[tuple[Sequence[str], np.ndarray]], cfg: DescriptorConfig,
                 max_modules: int = CONTENT_MODULES):
        self.items, self.cfg = items, cfg
        names = sorted({n for ns, _ in items for n in ns})
        if len(names) > max_modules:   # evenly spread over the sorted layout (SDXL's 560+ modules)
            names = [names[i] for i in np.unique(np.linspace(0, len(names) - 1, max_modules).round().astype(int))]
        self.names = names
        self.pos = {n: i for i, n in enumerate(self.names)}
        c = cfg.content_sketch
        self.w = c * (c + 1) // 2
        self.dim = max(1, len(self.names) * self.w)
        i, j = np.triu_indices(c)
        self._triu = i * c + j
        self._local = threading.local()   # per thread: rows() may run on several threads at once

    def _buffers(self, b: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Gram and upper-triangle buffers for `b` LoRAs of `m` modules, kept (per thread): fresh memory is what
        costs here."""
        bufs = self._local.__dict__.setdefault("bufs", {})
        if (b, m) not in bufs:
            c = self.cfg.content_sketch
            bufs[(b, m)] = (np.empty((b, m, c, c), np.float32), np.empty((b, m, self.w), np.float32))
        return bufs[(b, m)]

    def projected(self, spans: Sequence[Sequence[int]], M: np.ndarray, threads: int = THREADS) -> np.ndarray:
        """``concatenate([rows(span) @ M for span in spans])``, the spans shared out over `threads` threads (each
        with its own buffer, BLAS on one thread: building rows is most of the work and numpy does it on one)."""
        if not spans:
            return np.zeros((0, M.shape[1]), np.float32)
        longest, local = max(len(s) for s in spans), threading.local()

        def one(span):
            if not hasattr(local, "buf"):
                local.buf = np.empty((longest, self.dim), dtype=np.float32)
            return self.rows(span, local.buf) @ M

        if threads <= 1 or len(spans) < 2:
            return np.concatenate([one(s) for s in spans])
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(min(threads, len(spans))) as pool:
            return np.concatenate(list(pool.map(one, spans)))

    def __len__(self) -> int:
        return len(self.items)

    def rows(self, which: Sequence[int], out: np.ndarray | None = None, chunk: int = 32) -> np.ndarray:
        """(len(which), dim) float32 (written into `out[:len(which)]` when given: a buffer reused over calls).
        Small chunks keep every temporary below the allocator's reuse threshold (fresh memory is what costs)."""
        X = np.zeros((len(which), self.dim), dtype=np.float32) if out is None else out[:len(which)]
        if out is not None:
            X.fill(0.0)
        batches: dict[tuple, list[int]] = {}
        for r, i in enumerate(which):
            ns = self.items[i][0]
            if len(ns):
                batches.setdefault(tuple(ns), []).append(r)
        for ns, rows in batches.items():
            kept = [k for k, n in enumerate(ns) if n in self.pos]
            if not kept:
                continue
            m = len(kept)
            cols = (np.array([self.pos[ns[k]] for k in kept])[:, None] * self.w + np.arange(self.w)).ravel()
            whole = len(cols) == self.dim and bool((np.diff(cols) == 1).all())   # the LoRA has every module
            sel = slice(None) if m == len(ns) else np.array(kept)
            c, k = self.cfg.content_sketch, self.cfg.top_k
            G, T = self._buffers(min(chunk, len(rows)), m)
            for start in range(0, len(rows), chunk):
                part = np.array(rows[start:start + chunk])
                b = len(part)
                L = np.stack([self.items[which[r]][1][sel] for r in part]).astype(np.float32).reshape(b, m, k, c)
                np.matmul(np.swapaxes(L, -1, -2), L, out=G[:b])                       # (b, m, c, c)
                g = np.take(G[:b].reshape(b, m, c * c), self._triu, axis=2, out=T[:b])   # (b, m, w)
                norms = np.sqrt(np.einsum("bmw,bmw->bm", g, g))
                live = norms > 1e-12
                g *= (np.where(live, 1.0 / np.where(live, norms, 1.0), 0.0)
                      / np.sqrt(live.sum(1, keepdims=True).clip(1)))[:, :, None].astype(np.float32)
                g = g.reshape(len(part), -1)
                if whole:
                    X[part] = g
                else:
                    block = np.zeros((len(part), self.dim), dtype=np.float32)
                    block[:, cols] = g
                    X[part] = block
        return X


def _centre(M: np.ndarray, groups: np.ndarray, lambdas: dict[int, float]) -> np.ndarray:
    """C·M: rows centred within shared-initialisation groups (`centre_groups` with fixed `lambdas`), then on their
    mean (in place: `M` is changed). C is linear and symmetric, so it is also its own transpose."""
    M = centre_groups(M, groups, copy=False, lambdas=lambdas)
    M -= M.mean(axis=0)
    return M


def content_space(rows: ContentRows, init_prints: np.ndarray, dim: int = CONTENT_PCA,
                  fit_rows: int = PCA_FIT_ROWS, chunk: int = 512, explicit_floats: int = 72_000_000) -> np.ndarray:
    """(n, ≤dim) unit rows: a library's `ContentRows`, centred within shared-initialisation groups and on their
    mean, projected on their top principal components (fitted on at most `fit_rows` LoRAs, a fixed random
    sample, centred among themselves). Centring is linear, so the rows are projected first and centred after."""
    n = len(rows)
    groups = shared_init_groups(init_prints)
    k = min(dim, max(1, n - 1), rows.dim)
    if n <= 2:
        X = _centre(rows.rows(range(n)), groups, {})
        return (X / np.linalg.norm(X, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)
    fit = np.arange(n) if n <= fit_rows else np.sort(np.random.default_rng(0).choice(n, fit_rows, False))
    if len(fit) * rows.dim <= explicit_floats:
        F = rows.rows(fit)
        lambdas = group_shrinkage(F, groups[fit])
        comps = _top_components(_centre(F, groups[fit], lambdas), k)
        del F
    else:
        buf = np.empty((min(chunk, len(fit)), rows.dim), dtype=np.float32)
        lambdas = group_shrinkage((rows.rows(fit[s:s + chunk], buf) for s in range(0, len(fit), chunk)), groups[fit])
        comps = _chunked_components(rows, fit, groups[fit], k, chunk, lambdas)
    Y = _centre(rows.projected([range(s, min(n, s + chunk)) for s in range(0, n, chunk)], comps.T), groups, lambdas)
    return (Y / np.linalg.norm(Y, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def _chunked_components(rows: ContentRows, fit: np.ndarray, groups: np.ndarray, k: int, chunk: int,
                        lambdas: dict[int, float], oversample: int = 32, power: int = 2) -> np.ndarray:
    """(k, dim) top right singular vectors of C·X (X: the `fit` rows, built chunk by chunk, never whole; C:
    `_centre`): a seeded randomised SVD (Halko et al. 2011)."""
    spans = [fit[s:s + chunk] for s in range(0, len(fit), chunk)]
    buf = np.empty((min(chunk, len(fit)), rows.dim), dtype=np.float32)

    def times(M):        # C·X·M
        return _centre(rows.projected(spans, M), groups, lambdas)

    def t_times(Q):      # (C·X)ᵀ·Q = Xᵀ·C·Q (C is symmetric)
        Qc, acc, at = _centre(Q.copy(), groups, lambdas), np.zeros((rows.dim, Q.shape[1]), dtype=np.float32), 0
        for sp in spans:
            acc += rows.rows(sp, buf).T @ Qc[at:at + len(sp)]
            at += len(sp)
        return acc

    rng = np.random.default_rng(0)
    Q = np.linalg.qr(times(rng.standard_normal((rows.dim, k + oversample)).astype(np.float32)))[0]
    for _ in range(power):
        Q = np.linalg.qr(times(np.linalg.qr(t_times(Q))[0]))[0]
    return np.linalg.svd(t_times(Q).T, full_matrices=False)[2][:k]


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
