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
- `centre_groups`: each group's mean feature subtracted from its members (groups of `MIN_GROUP` or more; a lone
  LoRA, or two copies of one file, are left as they are).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import torch

from studio.library.canonical import LoRA, ModuleLoRA

from .descriptor import ModuleSVD, attention_part, random_projection

INIT_SKETCH = 16     # rows of the random sketch of each module's row space (120 off-diagonal entries)
INIT_DIM = 512       # size of a fingerprint (the modules' sketches are feature-hashed into it)
INIT_OVERLAP = 0.5   # fingerprint cosine above which two LoRAs share an initialisation
MIN_GROUP = 3        # shared-initialisation groups at least this large are centred


def init_module(name: str) -> bool:
    """Whether a module's row space enters the fingerprint: UNet attention projections and text-encoder
    self-attention (the layers every LoRA trainer adapts)."""
    return attention_part(name) is not None or (name.startswith("text_encoder") and ".self_attn." in name)


def _row_space(module: ModuleLoRA | tuple, svd: ModuleSVD | None) -> torch.Tensor | None:
    """Orthonormal basis (in, r) of ΔW's row space: the down matrix's rows for LoRA/LoCon (the whole space, not
    just the top singular directions), else the kept right singular vectors. `module`: a `ModuleLoRA` or a
    ``(B, A, scale)`` triple (`retrieval.loading.read_factors`)."""
    down = None
    if isinstance(module, tuple):
        down = module[1]
    elif module.kind in ("lora", "locon") and "mid" not in module.factors:
        down = module.factors["down"]
    if down is not None:
        down = down.float().flatten(1)
        q, r = torch.linalg.qr(down.T)
        live = r.diagonal().abs() > r.diagonal().abs().max().clamp_min(1e-12) * 1e-3
        return q[:, live]
    if svd is None:
        return None
    return svd.V[:, svd.S > svd.S[:1].clamp_min(1e-12) * 1e-3]


@lru_cache(maxsize=4096)
def _hashing(name: str, width: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket, sign) per entry of a module's sketch: where feature hashing adds it in the fingerprint."""
    tag = int.from_bytes(hashlib.sha256(f"{seed}:init-hash:{name}:{width}:{dim}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(tag)
    return rng.integers(0, dim, width), rng.choice(np.array([-1.0, 1.0], dtype=np.float32), width)


def init_fingerprint(modules: Mapping[str, ModuleLoRA | tuple], svds: Mapping[str, ModuleSVD] | None = None,
                     seed: int = 0) -> np.ndarray:
    """One LoRA's fingerprint: (`INIT_DIM`,) float32, unit norm (zeros without attention modules)."""
    t = INIT_SKETCH
    iu = np.triu_indices(t, 1)
    out = np.zeros(INIT_DIM, dtype=np.float64)
    for name in sorted(modules):
        if not init_module(name):
            continue
        V = _row_space(modules[name], (svds or {}).get(name))       # (in, r) orthonormal columns
        if V is None or V.shape[1] == 0:
            continue
        RV = random_projection(V.shape[0], t, seed, "init") @ V    # (t, r)
        sketch = (RV @ RV.T).numpy()[iu] / np.sqrt(V.shape[1])
        bucket, sign = _hashing(name, len(sketch), INIT_DIM, seed)
        out += np.bincount(bucket, weights=sketch * sign, minlength=INIT_DIM)
    norm = np.linalg.norm(out)
    return (out / norm if norm > 1e-12 else out).astype(np.float32)


def init_fingerprints(loras: Sequence[LoRA | Mapping[str, ModuleLoRA | tuple]],
                      svds: Sequence[Mapping[str, ModuleSVD]] | None = None, seed: int = 0) -> np.ndarray:
    """(n, `INIT_DIM`) fingerprints of `loras` (LoRAs, or {module name: module} maps as `init_fingerprint` takes)."""
    svds = svds if svds is not None else [None] * len(loras)
    rows = [init_fingerprint(lo.modules if isinstance(lo, LoRA) else lo, s, seed) for lo, s in zip(loras, svds)]
    return np.stack(rows) if rows else np.zeros((0, INIT_DIM), dtype=np.float32)


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


def centre_groups(X: np.ndarray, groups: np.ndarray | None, min_size: int = MIN_GROUP,
                  copy: bool = True) -> np.ndarray:
    """`X` with each group's mean row subtracted from its members (groups of at least `min_size`); `copy=False`
    changes `X` itself."""
    if groups is None:
        return X
    X = X.copy() if copy else X
    ids, counts = np.unique(groups, return_counts=True)
    for g in ids[counts >= min_size]:
        member = groups == g
        X[member] -= X[member].mean(axis=0)
    return X
