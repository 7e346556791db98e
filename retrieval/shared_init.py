"""LoRAs trained from one initialisation: their fingerprints, their groups, and taking out what they share.

A LoRA trainer with a fixed seed and rank starts every run from the same random down matrices ``A``, and training
barely moves them. Such LoRAs share ΔW's row space, and with it a large part of every weight feature: on
TinyWorld they resemble each other more than LoRAs of one concept or one style trained from other seeds
(`bench/cluster.py`, "init_groups"). Both style clustering and weights-only retrieval take that shared part out:

- `init_fingerprints`: per LoRA, a fixed-size unit vector whose inner products estimate how much two LoRAs' row
  spaces overlap (≈1 for one initialisation, ≈ r/d for independent ones). Each attention module's row space V
  (the down matrix's, orthonormalised) is sketched as the off-diagonal entries of R·V·Vᵀ·Rᵀ for a fixed random R
  (`INIT_SKETCH` rows), and the modules' sketches are feature-hashed into `INIT_DIM` values with buckets and
  signs seeded by the module's name. So a fingerprint depends on its own file only: the catalog scan stores it,
  and fingerprints of different libraries compare.
- `shared_init_groups`: connected components of the LoRAs whose fingerprints overlap above `INIT_OVERLAP`.
- `centre_groups`: what each group shares taken out of its members, as far as the group shows it (groups of
  `MIN_GROUP` or more; a lone LoRA, or two copies of one file, are left as they are): each member minus λ times
  the mean of the other members, λ from how much more the members resemble each other than the library's LoRAs
  do (`group_shrinkage`).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from studio.library.canonical import LoRA, ModuleLoRA

from .descriptor import ModuleSVD, PackedSVDs, attention_part, random_projection

INIT_SKETCH = 16     # rows of the random sketch of each module's row space (120 off-diagonal entries)
INIT_DIM = 512       # size of a fingerprint (the modules' sketches are feature-hashed into it)
INIT_OVERLAP = 0.5   # fingerprint cosine above which two LoRAs share an initialisation
MIN_GROUP = 3        # shared-initialisation groups at least this large are centred


@lru_cache(maxsize=65536)
def init_module(name: str) -> bool:
    """Whether a module's row space enters the fingerprint: UNet attention projections and text-encoder
    self-attention (the layers every LoRA trainer adapts)."""
    return attention_part(name) is not None or (name.startswith("text_encoder") and ".self_attn." in name)


@lru_cache(maxsize=4096)
def _hashing(name: str, width: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket, sign) per entry of a module's sketch: where feature hashing adds it in the fingerprint."""
    tag = int.from_bytes(hashlib.sha256(f"{seed}:init-hash:{name}:{width}:{dim}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(tag)
    return rng.integers(0, dim, width), rng.choice(np.array([-1.0, 1.0], dtype=np.float32), width)


def init_fingerprint(modules: Mapping[str, ModuleLoRA | tuple], svds: Mapping[str, ModuleSVD] | None = None,
                     seed: int = 0) -> np.ndarray:
    """One LoRA's fingerprint: (`INIT_DIM`,) float32, unit norm (zeros without attention modules)."""
    return init_fingerprints([modules], [svds], seed)[0]


def _down(module: ModuleLoRA | tuple) -> torch.Tensor | None:
    """The down matrix (r, in') of a plain LoRA/LoCon module (or a ``(B, A, scale)`` triple), else None."""
    if isinstance(module, tuple):
        return module[1].flatten(1)
    if module.kind in ("lora", "locon") and "mid" not in module.factors:
        return module.factors["down"].flatten(1)
    return None


def _sketches(V: torch.Tensor, live: torch.Tensor, seed: int) -> np.ndarray:
    """(m, t(t-1)/2) row-space sketches R·V·Vᵀ·Rᵀ of m orthonormal bases V (m, in, r) whose `live` columns (m, r)
    count, divided by √(live columns)."""
    t = INIT_SKETCH
    iu = torch.triu_indices(t, t, 1)
    RV = (random_projection(V.shape[1], t, seed, "init") @ V) * live[:, None, :]   # (m, t, r)
    G = RV @ RV.transpose(1, 2)
    return (G[:, iu[0], iu[1]] / live.sum(1, keepdim=True).clamp_min(1).sqrt()).numpy()


def init_fingerprints(loras: Sequence[LoRA | Mapping[str, ModuleLoRA | tuple]] | PackedSVDs,
                      svds: Sequence[Mapping[str, ModuleSVD] | None] | None = None, seed: int = 0) -> np.ndarray:
    """(n, `INIT_DIM`) fingerprints of `loras` (LoRAs, or {module name: `ModuleLoRA` or ``(B, A, scale)``} maps),
    batched over every module of the same shape (one QR and one projection per shape); or of the LoRAs of a
    `PackedSVDs` (`pack_svds`), reusing its row bases (no QR at all)."""
    owners, rows = [], []
    if isinstance(loras, PackedSVDs):
        n = len(loras)
        for g in loras.groups:
            keep = [j for j, (_, name) in enumerate(g.owners) if init_module(name)]
            if not keep:
                continue
            idx = torch.tensor(keep)
            if g.row_basis is not None:
                Q, live = g.row_basis
                rows.append(_sketches(Q[idx], live[idx], seed))
            else:   # LoHa / LoKr: the kept right singular vectors
                S = g.S[idx]
                rows.append(_sketches(g.V[idx], (S > S[:, :1].clamp_min(1e-12) * 1e-3).float(), seed))
            owners += [g.owners[j] for j in keep]
        return _hashed(owners, rows, n, seed)
    n = len(loras)
    svds = svds if svds is not None else [None] * n
    by_shape: dict[tuple, list] = {}       # (in, r) -> [(lora index, name, down)]
    other: list = []                       # (lora index, name, V (in, r) or None)
    for li, (lo, sv) in enumerate(zip(loras, svds)):
        modules = lo.modules if isinstance(lo, LoRA) else lo
        for name in sorted(modules):
            if not init_module(name):
                continue
            down = _down(modules[name])
            if down is not None and down.shape[0] > 0:
                by_shape.setdefault(tuple(down.shape), []).append((li, name, down))
            elif sv and name in sv:
                svd = sv[name]
                other.append((li, name, svd.V[:, svd.S > svd.S[:1].clamp_min(1e-12) * 1e-3]))
    for items in by_shape.values():
        downs = torch.stack([d for _, _, d in items]).float()            # (m, r, in)
        q, r = torch.linalg.qr(downs.transpose(1, 2))                     # q (m, in, r): the row space
        diag = r.diagonal(dim1=1, dim2=2).abs()
        live = (diag > diag.max(1, keepdim=True).values.clamp_min(1e-12) * 1e-3).float()
        rows.append(_sketches(q, live, seed))
        owners += [(li, name) for li, name, _ in items]
    for li, name, V in other:
        if V.shape[1]:
            rows.append(_sketches(V[None].float(), torch.ones(1, V.shape[1]), seed))
            owners.append((li, name))
    return _hashed(owners, rows, n, seed)


def _hashed(owners: list[tuple[int, str]], rows: list[np.ndarray], n: int, seed: int) -> np.ndarray:
    """Per LoRA, its modules' sketches feature-hashed into one unit vector (zeros for a LoRA without any)."""
    out = np.zeros((n, INIT_DIM))
    if owners:
        sketches = np.concatenate(rows)
        width = sketches.shape[1]
        ids: dict[str, int] = {}
        which = np.array([ids.setdefault(name, len(ids)) for _, name in owners])   # few distinct names, many owners
        tables = [_hashing(name, width, INIT_DIM, seed) for name in ids]
        buckets, signs = np.stack([t[0] for t in tables]), np.stack([t[1] for t in tables])
        index = buckets[which] + INIT_DIM * np.array([li for li, _ in owners])[:, None]
        signed = sketches * signs[which]
        out = np.bincount(index.ravel(), weights=signed.ravel(), minlength=n * INIT_DIM).reshape(n, INIT_DIM)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.where(norm > 1e-12, norm, 1.0)).astype(np.float32)


def shared_init_groups(fingerprints: np.ndarray, overlap: float = INIT_OVERLAP, chunk: int = 2048) -> np.ndarray:
    """Group id per LoRA: connected components of the LoRAs linked by a fingerprint cosine above `overlap`."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    fingerprints = np.asarray(fingerprints, dtype=np.float32)
    n = len(fingerprints)
    rows, cols = [], []
    for start in range(0, n, chunk):
        r, c = np.nonzero(fingerprints[start:start + chunk] @ fingerprints.T > overlap)
        rows.append(r + start)
        cols.append(c)
    rows, cols = np.concatenate(rows or [np.zeros(0, int)]), np.concatenate(cols or [np.zeros(0, int)])
    links = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return connected_components(links, directed=False)[1]


def group_shrinkage(X: np.ndarray | Iterable[np.ndarray], groups: np.ndarray, min_size: int = MIN_GROUP
                    ) -> dict[int, float]:
    """{group: λ} for the groups of at least `min_size` rows: how much of the other members' mean to take out of
    each member (`centre_groups`). With rows centred on the library's mean, a member is x_i = s + e_i (s: what the
    group shares, e_i: its own signal); the mean of the *other* members estimates s with the noise of n − 1 own
    signals, and λ = ‖s‖² / (‖s‖² + (E‖x‖² − ‖s‖²) / (n − 1)) is the least-squares weight of that estimate, ‖s‖²
    read as the members' mean pairwise inner product. A group whose members share nothing beyond what any LoRAs
    share gets λ ≈ 0 and is left alone; a batch dominated by its initialisation gets λ ≈ 1.

    `X`: the rows, or consecutive chunks of them (`groups` covers them all in order), so a library too large to
    hold whole is read once; only per-group sums are kept."""
    ids, counts = np.unique(groups, return_counts=True)
    big = {int(g): int(c) for g, c in zip(ids, counts) if c >= min_size}
    total, n_rows = 0.0, 0
    sums, energy = {}, dict.fromkeys(big, 0.0)
    for part in ([X] if isinstance(X, np.ndarray) else X):
        part = np.asarray(part, dtype=np.float64)
        where = groups[n_rows:n_rows + len(part)]
        total = total + part.sum(axis=0)
        n_rows += len(part)
        for g in big:
            mine = part[where == g]
            sums[g] = sums.get(g, 0.0) + mine.sum(axis=0)
            energy[g] += float(np.einsum("ij,ij->", mine, mine))
    mean = total / max(n_rows, 1)
    out = {}
    for g, n in big.items():   # the group's sum and energy on rows centred on the mean
        t = sums[g] - n * mean
        e = energy[g] - 2 * float(mean @ sums[g]) + n * float(mean @ mean)
        shared = max(0.0, (float(t @ t) - e) / (n * (n - 1)))
        own = max(e / n - shared, 0.0)
        out[g] = shared / (shared + own / (n - 1)) if shared > 0 else 0.0
    return out


def centre_groups(X: np.ndarray, groups: np.ndarray | None, min_size: int = MIN_GROUP, copy: bool = True,
                  lambdas: dict[int, float] | None = None) -> np.ndarray:
    """`X` with what each shared-initialisation group shares taken out of its members (groups of at least
    `min_size`): each member minus λ times the mean of the group's other members, both centred on the mean of
    `X`'s rows, λ from `group_shrinkage` (or `lambdas`, fixed: then this is a linear map of `X`, and followed by
    centring on the mean it is symmetric, C = P − P·B·P). A member's own signal is never subtracted from itself,
    and a group that shares little is barely touched: subtracting the plain group mean from TinyWorld's small
    groups of LoRAs that share an initialisation but little else cost style clustering ARI 0.59 -> 0.44 and
    weights-only retrieval R@3 ~0.08 (docs/MEASURED.md). `copy=False` changes `X` itself."""
    if groups is None:
        return X
    X = X.copy() if copy else X
    lambdas = group_shrinkage(X, groups, min_size) if lambdas is None else lambdas
    mean = X.mean(axis=0)
    for g, lam in lambdas.items():
        member = groups == g
        n = int(member.sum())
        if lam and n >= 2:
            rows = X[member] - mean
            X[member] -= lam * (rows.sum(axis=0) - rows) / (n - 1)
    return X
