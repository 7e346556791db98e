"""Training-free weight descriptor of a LoRA: what its ΔW does, as one fixed-size vector.

Per module, ΔW = (α/r)·B·A is reduced to its exact top-k SVD without forming ΔW: thin QR of B and Aᵀ gives
ΔW = Q_B · (s·R_B·R_Aᵀ) · Q_Aᵀ, and the SVD of the small core gives the singular values and vectors in
O((in + out)·r²). Singular pairs are sign-fixed (the largest-|.| entry of each left vector is positive). Each
module then becomes a small block of features, computed from the truncated SVD through random projections
that are fixed and shared (seeded by the dimension they act on), so every LoRA of a family lands in the same
coordinates:

- ``R_out·ΔW_k·R_inᵀ``: a d×d bilinear sketch of ΔW itself (⟨sketch(X), sketch(Y)⟩ ≈ ⟨X, Y⟩_F);
- ``R_out·ΔW_k·ΔW_kᵀ·R_outᵀ`` and ``R_in·ΔW_kᵀ·ΔW_k·R_inᵀ``: sketches of the output- and input-side
  Gram matrices (upper triangles): they survive a change of the random ``A`` that LoRA training starts from;
- the normalised spectrum ``S/‖S‖`` and the module's log-norm relative to the LoRA's other modules.

Stored after those (not part of the descriptor vector): the output-side factor ``L = R_c·U_k·S_k/‖S‖`` of a
wider fixed projection R_c (`content_sketch` rows, orthonormal: `content_projection`), sign-fixed per column.
``L·Lᵀ`` is the output Gram at that width, from which `retrieval.neighbours` places a LoRA among the library's (its
weights-only channel): at 32 rows instead of 8 that channel finds more LoRAs (`bench/retrieval.py`,
``weights_only_unseen``), and the factor costs 32·k values per module where the Gram's upper triangle would cost
528.

Every block is normalised on its own (so α, learning rate and rank do not matter), modules are laid out in a
fixed order per base family (missing modules are zeros), and PCA (fitted on the library) reduces the whole to
`dim` values, L2-normalised. All of it is a function of ΔW alone: ``B·R, R⁻¹·A`` gives the same descriptor, and
a rank-4 and a rank-16 LoRA with the same dominant ΔW land close.

Plain LoRA and LoCon (also Tucker LoCon, flattened to ``(out, in·k·k)``) never densify ΔW; LoHa and LoKr use
the dense ΔW (their modules are small), via a randomised SVD when it is large. A DoRA magnitude is ignored.
"""
from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.linalg
import torch

from studio.library.canonical import LoRA, ModuleLoRA

_EPS = 1e-12
_DIGITS = re.compile(r"^\d+$")


@dataclass
class ModuleSVD:
    """Top-k singular triplets of one module's ΔW (float32, sign-fixed): ΔW_k = U·diag(S)·Vᵀ."""

    U: torch.Tensor  # (out, k)
    S: torch.Tensor  # (k,)
    V: torch.Tensor  # (in·prod(kernel), k)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[0])

    @property
    def norm(self) -> float:
        return float(self.S.norm())


def module_role(name: str) -> str:
    """What a module is, without its position: ``unet.down_blocks.0...attn2.to_k`` -> ``unet:attn2.to_k``."""
    parts = name.split(".")
    leaf = [p for p in parts[1:] if not _DIGITS.match(p)]
    return f"{parts[0]}:{'.'.join(leaf[-2:])}"


def attention_part(name: str) -> str | None:
    """``attn1.to_q`` ... ``attn2.to_out.0`` for a UNet attention projection, else None."""
    m = re.search(r"\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$", name)
    return f"{m.group(1)}.{m.group(2)}" if m else None


# ----------------------------------------------------------------------------------------------- low-rank SVD
def _lowrank_factors(m: ModuleLoRA) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B (out, r), A (r, in')) with ΔW = scale·B·A flattened to 2-D, or None when the kind has no such form."""
    if m.kind not in ("lora", "locon"):
        return None
    f = m.factors
    up = f["up"]
    if up.dim() != 2:
        up = up.flatten(1)
    if "mid" in f:  # Tucker LoCon: ΔW[p, c, h, w] = Σ up[p,i]·mid[i,j,h,w]·down[j,c]
        down = f["down"].float().flatten(1)  # (r, in)
        a = torch.einsum("ij...,jc->ic...", f["mid"].float(), down).reshape(up.shape[1], -1)
    else:
        a = f["down"]
        if a.dim() != 2:
            a = a.flatten(1)
    return up, a


def _scale(m: ModuleLoRA) -> float:
    """`m.scale` of a plain LoRA / LoCon module (its rank: the rows of ``down``), without building its shape map."""
    rank = int(m.factors["down"].shape[0])
    return m.alpha / rank if m.alpha and rank else 1.0


def _sign_fix(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so that the largest-|.| entry of its left vector is positive (batched)."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(U, -2, idx))
    sign[sign == 0] = 1.0
    return U * sign, V * sign


def _batched_lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor, k: int, signs: bool = True,
                         row_basis: bool = False):
    """Exact top-k SVD of scale·B·A for a batch: B (n, out, r), A (n, r, in), scale (n,); sign-fixed if `signs`.
    `row_basis`: also (Q (n, in, r), live (n, r)): an orthonormal basis of A's rows from the thin QR of Aᵀ, and
    which of its columns count (R's diagonal above 1e-3 of its largest)."""
    Qb, Rb = torch.linalg.qr(B)                       # (n, out, m1), (n, m1, r)
    Qa, Ra = torch.linalg.qr(A.transpose(1, 2))       # (n, in, m2), (n, m2, r)
    core = scale[:, None, None] * (Rb @ Ra.transpose(1, 2))  # (n, m1, m2)
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    k = min(k, S.shape[-1])
    U = Qb @ Uc[..., :k]
    V = Qa @ Vch.transpose(1, 2)[..., :k]
    if signs:
        U, V = _sign_fix(U, V)
    if row_basis:
        diag = Ra.diagonal(dim1=1, dim2=2).abs()
        live = (diag > diag.max(1, keepdim=True).values.clamp_min(1e-12) * 1e-3).float()
        return U, S[..., :k], V, (Qa, live)
    return U, S[..., :k], V


def _dense_svd(delta: torch.Tensor, k: int) -> ModuleSVD:
    d = delta.flatten(1).float()
    if min(d.shape) <= 768:
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        V = Vh.T
    else:  # a big LoHa/LoKr conv: randomised SVD is plenty for the top few directions
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(d, q=min(k + 10, min(d.shape)), niter=3)
    k = min(k, S.shape[0])
    U, V = _sign_fix(U[:, :k], V[:, :k])
    return ModuleSVD(U.contiguous(), S[:k].contiguous(), V.contiguous())


def module_svd(m: ModuleLoRA, k: int = 8) -> ModuleSVD:
    """Top-k singular triplets of one module's ΔW (plain LoRA / LoCon without forming ΔW)."""
    factors = _lowrank_factors(m)
    if factors is None:
        return _dense_svd(m.lowrank_delta(), k)
    B, A = factors
    U, S, V = _batched_lowrank_svd(B[None].float(), A[None].float(), torch.tensor([m.scale], dtype=torch.float32), k)
    return ModuleSVD(U[0], S[0], V[0])


@dataclass
class SVDGroup:
    """Same-shape modules of several LoRAs, stacked: row i belongs to ``owners[i] = (lora index, name)``."""

    U: torch.Tensor  # (n, out, k)
    S: torch.Tensor  # (n, k)
    V: torch.Tensor  # (n, in', k)
    owners: list[tuple[int, str]]
    row_basis: tuple[torch.Tensor, torch.Tensor] | None = None   # plain LoRA/LoCon: (Q (n, in', r), live (n, r))


@dataclass
class PackedSVDs:
    """Top-k SVDs of the modules of several LoRAs, grouped by shape (what batched consumers want)."""

    groups: list[SVDGroup]
    names: list[list[str]]  # module names of each LoRA, in its order

    def __len__(self) -> int:
        return len(self.names)

    def per_lora(self) -> list[dict[str, ModuleSVD]]:
        out: list[dict[str, ModuleSVD]] = [{} for _ in self.names]
        for g in self.groups:
            for (li, name), u, s, v in zip(g.owners, g.U.unbind(0), g.S.unbind(0), g.V.unbind(0)):
                out[li][name] = ModuleSVD(u, s, v)
        return [{n: o[n] for n in names if n in o} for o, names in zip(out, self.names)]


def _regroup(rows: Sequence[tuple[int, str, ModuleSVD]]) -> list[SVDGroup]:
    by: dict[tuple, list] = {}
    for li, name, m in rows:
        by.setdefault((m.U.shape[0], m.V.shape[0], m.S.shape[0]), []).append((li, name, m))
    return [SVDGroup(torch.stack([m.U for _, _, m in g]), torch.stack([m.S for _, _, m in g]),
                     torch.stack([m.V for _, _, m in g]), [(li, n) for li, n, _ in g]) for g in by.values()]


def pack_svds(loras: Sequence[LoRA | Mapping], k: int = 8, signs: bool = True) -> PackedSVDs:
    """Top-k SVD of every module of every LoRA; same-shape modules of all of them share each batched QR/SVD.

    A LoRA may be a `LoRA`, {name: ModuleLoRA}, or {name: (B, A, scale)}.
    ``signs=False`` skips the sign fix of plain LoRA / LoCon modules, for consumers that flipping a singular pair
    does not change: the raw blocks (every feature is a product of a pair with itself) are the same to the bit.
    """
    mods = [l.modules if isinstance(l, LoRA) else l for l in loras]
    groups: dict[tuple, list[tuple[int, str, torch.Tensor, torch.Tensor, float]]] = {}
    dense: list[tuple[int, str, ModuleSVD]] = []
    for li, modules in enumerate(mods):
        for name, m in modules.items():
            if type(m) is tuple:  # (B, A, scale)
                B, A, scale = m
            else:
                factors = _lowrank_factors(m)
                if factors is None:
                    dense.append((li, name, _dense_svd(m.lowrank_delta(), k)))
                    continue
                (B, A), scale = factors, _scale(m)
            key = (B.shape, A.shape, B.dtype, A.dtype)
            group = groups.get(key)
            if group is None:
                group = groups[key] = []
            group.append((li, name, B, A, scale))
    out = []
    for items in groups.values():
        for start in range(0, len(items), 4096):
            chunk = items[start:start + 4096]
            B = torch.stack([it[2] for it in chunk]).float()
            A = torch.stack([it[3] for it in chunk]).float()
            scale = torch.tensor([it[4] for it in chunk], dtype=torch.float32)
            U, S, V, basis = _batched_lowrank_svd(B, A, scale, k, signs, row_basis=True)
            out.append(SVDGroup(U, S, V, [(it[0], it[1]) for it in chunk], basis))
    out += _regroup(dense)
    return PackedSVDs(out, [list(m) for m in mods])


def pack_dicts(items: Sequence[Mapping[str, ModuleSVD]] | PackedSVDs) -> PackedSVDs:
    """{name: ModuleSVD} maps (one per LoRA) as a `PackedSVDs` (a PackedSVDs is returned as it is)."""
    if isinstance(items, PackedSVDs):
        return items
    rows = [(li, name, m) for li, svds in enumerate(items) for name, m in svds.items()]
    return PackedSVDs(_regroup(rows), [list(svds) for svds in items])


def lora_svds_many(loras: Sequence[LoRA | Mapping], k: int = 8) -> list[dict[str, ModuleSVD]]:
    """`lora_svds` of many LoRAs at once (see `pack_svds`)."""
    return pack_svds(loras, k).per_lora()


def lora_svds(lora: LoRA | Mapping[str, ModuleLoRA], k: int = 8) -> dict[str, ModuleSVD]:
    """Top-k SVD of every module of one LoRA, {name: ModuleSVD}."""
    return lora_svds_many([lora], k)[0]


# ----------------------------------------------------------------------------------------------- projections
@lru_cache(maxsize=256)
def random_projection(n: int, d: int, seed: int, side: str) -> torch.Tensor:
    """The shared Gaussian projection (d, n) for vectors of length n, the same in every process."""
    tag = int.from_bytes(hashlib.sha256(f"{seed}:{side}:{n}:{d}".encode()).digest()[:8], "little") % (2**63)
    g = torch.Generator().manual_seed(tag)
    return torch.randn(d, n, generator=g) / np.sqrt(d)


def _triu(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d)
    return x[..., i, j]


@dataclass(frozen=True)
class DescriptorConfig:
    sketch: int = 8        # d: sketch size per side
    top_k: int = 4         # singular triplets kept per module
    dim: int = 128         # output size after PCA
    seed: int = 0
    spectrum_weight: float = 0.5
    norm_weight: float = 0.5
    max_fit: int = 2048    # PCA is fitted on at most this many LoRAs ...
    fit_floats: int = 64_000_000  # ... and on at most this many raw values in all (SDXL-sized layouts)
    content_sketch: int = 32   # rows of the output-side factor stored after each block (0: none)

    @property
    def block(self) -> int:
        """Width of a module's descriptor block (what the descriptor vector is made of)."""
        d = self.sketch
        return d * d + d * (d + 1) + self.top_k + 1

    @property
    def content_width(self) -> int:
        return self.content_sketch * self.top_k

    @property
    def stored_block(self) -> int:
        """Width of a module's stored row: the descriptor block, then the output-side factor."""
        return self.block + self.content_width

    def fit_size(self, n_modules: int) -> int:
        """How many LoRAs PCA is fitted on for a layout of `n_modules` modules."""
        return int(max(16, min(self.max_fit, self.fit_floats // max(1, n_modules * self.block))))


def module_block(svd: ModuleSVD, cfg: DescriptorConfig, rel_lognorm: float = 0.0) -> np.ndarray:
    """The feature block of one module (see the module docstring); zeros for a zero ΔW."""
    g = SVDGroup(svd.U[None], svd.S[None], svd.V[None], [(0, "")])
    return _group_blocks(g, cfg, np.array([rel_lognorm]))


def _group_blocks(g: SVDGroup, cfg: DescriptorConfig, rel: np.ndarray) -> np.ndarray:
    """Feature blocks (n, block) of one group of same-shape modules."""
    d, k = cfg.sketch, cfg.top_k
    kk = min(k, g.S.shape[1])
    U, S, V = g.U[..., :kk], g.S[:, :kk], g.V[..., :kk]
    n_out, n_in = U.shape[1], V.shape[1]
    norm = S.norm(dim=1, keepdim=True).clamp_min(_EPS)
    Sn = S / norm
    L = random_projection(n_out, d, cfg.seed, "out") @ U * Sn[:, None, :]  # (b, d, kk)
    R = random_projection(n_in, d, cfg.seed, "in") @ V                     # (b, d, kk)
    R2 = R * Sn[:, None, :]
    feats = []
    for block in ((L @ R.transpose(1, 2)).flatten(1), _triu(L @ L.transpose(1, 2)), _triu(R2 @ R2.transpose(1, 2))):
        feats.append(block / block.norm(dim=1, keepdim=True).clamp_min(_EPS))
    spec = torch.zeros(len(S), k)
    spec[:, :kk] = Sn
    feats.append(cfg.spectrum_weight * spec)
    live = (S.norm(dim=1) > _EPS).float()
    feats.append(cfg.norm_weight * torch.tanh(torch.as_tensor(rel, dtype=torch.float32) / 2.0)[:, None])
    if cfg.content_sketch:
        feats.append(_content_factor(U, Sn, cfg))
    return (torch.cat(feats, dim=1) * live[:, None]).numpy()


@lru_cache(maxsize=256)
def content_projection(n_out: int, cfg: DescriptorConfig) -> torch.Tensor:
    """(c, n_out): the fixed projection of the content factor. Orthonormal columns when the module has at most
    c outputs (then ``L·Lᵀ`` keeps the Gram's inner products exactly, whatever the seed), else orthonormal rows
    scaled by √(n_out/c) (a norm-preserving sketch; better conditioned than a Gaussian one). Cached: a catalog
    scan asks for it once per module shape and batch."""
    c = cfg.content_sketch
    R = random_projection(n_out, c, cfg.seed, "content")
    if n_out <= c:
        return torch.linalg.qr(R)[0]
    return torch.linalg.qr(R.T)[0].T * (n_out / c) ** 0.5


def _content_factor(U: torch.Tensor, Sn: torch.Tensor, cfg: DescriptorConfig) -> torch.Tensor:
    """(b, k·content_sketch): per module the columns of ``R_c·U·S/‖S‖`` (zero-padded to k), each column's
    largest-|.| entry made positive (so the factor does not depend on the SVD's signs)."""
    b, n_out, kk = U.shape
    L = content_projection(n_out, cfg) @ U * Sn[:, None, :]   # (b, c, kk)
    peak = L.abs().argmax(dim=1, keepdim=True)
    L = L * torch.where(L.gather(1, peak) < 0, -1.0, 1.0)
    out = torch.zeros(b, cfg.top_k, cfg.content_sketch)
    out[:, :kk] = L.transpose(1, 2)
    return out.flatten(1)


def packed_blocks(packed: PackedSVDs, cfg: DescriptorConfig) -> list[np.ndarray]:
    """Feature blocks of every module, one (n_rows, block) array per group of `packed`."""
    lognorms = [g.S.norm(dim=1).clamp_min(_EPS).log().numpy() for g in packed.groups]
    per_lora: list[list[float]] = [[] for _ in packed.names]
    for g, ln in zip(packed.groups, lognorms):
        for (li, _), v in zip(g.owners, ln):
            per_lora[li].append(v)
    floor = np.log(_EPS) + 1
    medians = [float(np.median([v for v in vals if v > floor])) if any(v > floor for v in vals) else 0.0
               for vals in per_lora]
    out = []
    for g, ln in zip(packed.groups, lognorms):
        med = np.array([medians[li] for li, _ in g.owners])
        out.append(_group_blocks(g, cfg, ln - med))
    return out


def raw_blocks(svds: Mapping[str, ModuleSVD], cfg: DescriptorConfig) -> dict[str, np.ndarray]:
    """Feature block per module name (before layout, PCA and normalisation)."""
    return raw_blocks_many([svds], cfg)[0]


def raw_blocks_many(items: Sequence[Mapping[str, ModuleSVD]] | PackedSVDs,
                    cfg: DescriptorConfig) -> list[dict[str, np.ndarray]]:
    """`raw_blocks` of many LoRAs, batched over all their modules."""
    packed = pack_dicts(items)
    found: list[dict[str, np.ndarray]] = [{} for _ in packed.names]
    for g, blocks in zip(packed.groups, packed_blocks(packed, cfg)):
        for (li, name), block in zip(g.owners, blocks):
            found[li][name] = block
    return [{n: f[n] for n in names if n in f} for f, names in zip(found, packed.names)]


# ----------------------------------------------------------------------------------------------- the model
Blocks = Mapping[str, np.ndarray]  # module name -> feature block


class WeightDescriptor:
    """Training-free LoRA descriptor: per-family module layout + PCA, fitted on a library.

    >>> desc = WeightDescriptor().fit(loras)        # LoRAs, or (blocks, family) pairs from `blocks()`
    >>> vecs = desc.transform(loras)                # (n, 128), L2-normalised
    Before `fit` (or for a family it has not seen) it still works: the layout is then the LoRA's own module
    names and a fixed random projection replaces PCA, so one LoRA can be described alone.
    """

    def __init__(self, config: DescriptorConfig | None = None):
        self.config = config or DescriptorConfig()
        self.layouts: dict[str, list[str]] = {}         # family -> module names
        self.means: dict[str, np.ndarray] = {}
        self.components: dict[str, np.ndarray] = {}     # family -> (dim', raw)
        self.fitted_on: dict[str, int] = {}             # family -> LoRAs seen by fit

    @property
    def dim(self) -> int:
        return self.config.dim

    # per-module blocks ------------------------------------------------------------------------------------
    def blocks(self, item) -> tuple[dict[str, np.ndarray], str]:
        """(feature block per module, family) of a LoRA, an svds map, an (svds|blocks, family) pair or a
        (module names, (n, block) array, family) triple."""
        if isinstance(item, LoRA):
            return raw_blocks(lora_svds(item, max(self.config.top_k, 1)), self.config), item.family
        if _is_stacked(item):
            return dict(zip(item[0], item[1])), item[2]
        family = "unknown"
        if isinstance(item, tuple):
            item, family = item
        if item and isinstance(next(iter(item.values())), ModuleSVD):
            return raw_blocks(item, self.config), family
        return dict(item), family

    def raw(self, blocks: Blocks, layout: Sequence[str]) -> np.ndarray:
        """The raw descriptor row of one LoRA over `layout` (the descriptor part of each stored block)."""
        b = self.config.block
        if layout and len(blocks) == len(layout) and all(a == n for a, n in zip(blocks, layout)):   # its order
            values = list(blocks.values())
            if all(v.shape[0] >= b for v in values):
                return _unit(np.concatenate([v[:b] for v in values]).astype(np.float32, copy=False))
        out = np.zeros(len(layout) * b, dtype=np.float32)
        for i, name in enumerate(layout):
            block = blocks.get(name)
            if block is not None:
                out[i * b:(i + 1) * b] = block[:b]
        return _unit(out)

    def _raw_rows(self, group: Sequence, layout: list[str]) -> np.ndarray:
        """`raw` of many LoRAs, (n, len(layout)·block): blocks maps, or (names, array) pairs (stacked at once when
        their names are the layout)."""
        b = self.config.block
        X = np.zeros((len(group), len(layout) * b), dtype=np.float32)
        fast = [i for i, s in enumerate(group)
                if layout and isinstance(s, tuple) and s[0] == layout and s[1].shape[0] == len(layout)
                and s[1].shape[1] >= b]
        if fast:
            F = np.stack([group[i][1][:, :b] for i in fast]).reshape(len(fast), -1).astype(np.float32)
            X[fast] = F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), _EPS)
        if len(fast) < len(group):
            done = set(fast)
            for i, s in enumerate(group):
                if i not in done:
                    X[i] = self.raw(dict(zip(*s)) if isinstance(s, tuple) else s, layout)
        return X

    # fitting ----------------------------------------------------------------------------------------------
    def fit(self, items: Iterable, max_layout: int | None = None) -> WeightDescriptor:
        """Fix each family's layout (union of module names, sorted) and fit its PCA (on <= max_fit LoRAs)."""
        by_family: dict[str, list] = {}
        for item in items:
            if _is_stacked(item):   # kept stacked: (names, array)
                by_family.setdefault(item[2], []).append((item[0], item[1]))
                continue
            blocks, family = self.blocks(item)
            by_family.setdefault(family, []).append(blocks)
        for family, group in by_family.items():
            names = sorted({n for s in group for n in (s[0] if isinstance(s, tuple) else s)})
            if max_layout and len(names) > max_layout:  # keep the most common modules
                sets = [set(s[0] if isinstance(s, tuple) else s) for s in group]
                counts = {n: sum(n in s for s in sets) for n in names}
                names = sorted(sorted(names, key=lambda n: -counts[n])[:max_layout])
            self.layouts[family] = names
            rng = np.random.default_rng(self.config.seed)
            n_fit = self.config.fit_size(len(names))
            pick = group if len(group) <= n_fit else [group[i] for i in rng.choice(len(group), n_fit, replace=False)]
            self._fit_pca(family, self._raw_rows(pick, names))
            self.fitted_on[family] = len(group)
        return self

    def _fit_pca(self, family: str, X: np.ndarray) -> None:
        n = X.shape[0]
        if n < 3:
            self.means[family] = np.zeros(X.shape[1], dtype=np.float32)
            self.components[family] = self._random_basis(X.shape[1])
            return
        mean = X.mean(axis=0)
        Xc = (X - mean).astype(np.float64)
        k = min(self.dim, n - 1, X.shape[1])
        # PCA through the n×n Gram matrix (n <= max_fit), exact and cheap for wide raw vectors
        G = Xc @ Xc.T
        with _one_blas_thread():   # only the top k eigenpairs: half the time of all of them (0.7 s at n = 2048)
            w, vecs = scipy.linalg.eigh(G, subset_by_index=[n - k, n - 1], driver="evr")
        order = np.argsort(w)[::-1]
        w, vecs = np.clip(w[order], 0, None), vecs[:, order]
        keep = w > max(w[0], 1e-30) * 1e-9
        comps = (vecs[:, keep].T @ Xc) / np.sqrt(w[keep])[:, None]
        self.means[family] = mean.astype(np.float32)
        self.components[family] = comps.astype(np.float32)

    def _random_basis(self, n: int) -> np.ndarray:
        return random_projection(n, self.dim, self.config.seed, "pca").numpy()

    # transforming -----------------------------------------------------------------------------------------
    def vector(self, item) -> np.ndarray:
        """Descriptor of one LoRA (see `blocks` for what `item` may be): shape (dim,), L2-normalised."""
        blocks, family = self.blocks(item)
        layout = self.layouts.get(family) or sorted(blocks)
        x = self.raw(blocks, layout)
        if family in self.components:
            mean, comps = self.means[family], self.components[family]
        else:
            mean, comps = np.zeros_like(x), self._random_basis(x.shape[0])
        with _one_blas_thread():
            y = comps @ (x - mean)
        out = np.zeros(self.dim, dtype=np.float32)
        out[: y.shape[0]] = y
        return _unit(out)

    def vectors(self, items: Sequence) -> np.ndarray:
        """`vector` of many LoRAs, (n, dim): the LoRAs of a fitted family share one matrix product."""
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        by_family: dict[str, list[tuple[int, object]]] = {}
        for i, item in enumerate(items):
            if _is_stacked(item):
                blocks, family = (item[0], item[1]), item[2]
            else:
                blocks, family = self.blocks(item)
            if family in self.components and self.layouts.get(family):
                by_family.setdefault(family, []).append((i, blocks))
            else:
                out[i] = self.vector((dict(zip(*blocks)) if isinstance(blocks, tuple) else blocks, family))
        for family, rows in by_family.items():
            layout = self.layouts[family]
            X = self._raw_rows([blocks for _, blocks in rows], layout)
            with _one_blas_thread():
                Y = (X - self.means[family]) @ self.components[family].T
            V = np.zeros((len(rows), self.dim), dtype=np.float32)
            V[:, :Y.shape[1]] = Y
            V /= np.maximum(np.linalg.norm(V, axis=1, keepdims=True), _EPS)
            out[[i for i, _ in rows]] = V
        return out

    def transform(self, items: Iterable) -> np.ndarray:
        return self.vectors(list(items))

    def fit_transform(self, items: Sequence) -> np.ndarray:
        items = [self.blocks(i) for i in items]
        return self.fit(items).transform(items)

    # persistence ------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.config.__dict__, sort_keys=True).encode())
        for family in sorted(self.layouts):
            h.update(family.encode())
            h.update("\n".join(self.layouts[family]).encode())
            h.update(self.means[family].tobytes())
            h.update(self.components[family].tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        arrays = {"config": np.frombuffer(json.dumps(self.config.__dict__).encode(), dtype=np.uint8),
                  "layouts": np.frombuffer(json.dumps(self.layouts).encode(), dtype=np.uint8),
                  "fitted_on": np.frombuffer(json.dumps(self.fitted_on).encode(), dtype=np.uint8)}
        for i, family in enumerate(sorted(self.layouts)):
            arrays[f"mean{i}"] = self.means[family]
            arrays[f"comp{i}"] = self.components[family]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> WeightDescriptor:
        with np.load(Path(path)) as z:
            self = cls(DescriptorConfig(**json.loads(z["config"].tobytes().decode())))
            self.layouts = json.loads(z["layouts"].tobytes().decode())
            self.fitted_on = json.loads(z["fitted_on"].tobytes().decode())
            for i, family in enumerate(sorted(self.layouts)):
                self.means[family] = z[f"mean{i}"]
                self.components[family] = z[f"comp{i}"]
        return self


_BLAS = []   # [threadpoolctl controller or None], made on first use


@contextmanager
def _one_blas_thread():
    """BLAS on one thread, for the calls that synchronise their threads often relative to their work (eigh, at every
    column; products of a few hundred rows): on a 2-core machine that is busy with other work, two BLAS threads made
    them 20 to 40 times slower than one (eigh at n = 2000: 21 s against 1.3 s, 0.65 s with two free cores; the
    (128 × 18048)·(18048 × 128) products of a 2000-LoRA rebuild: 5.2 s against 0.15 s)."""
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController())
        except ImportError:
            _BLAS.append(None)
    if _BLAS[0] is None:
        yield
        return
    with _BLAS[0].limit(limits=1, user_api="blas"):
        yield


def _is_stacked(item) -> bool:
    """Whether `item` is a (module names, (n, block) array, family) triple."""
    return isinstance(item, tuple) and len(item) == 3 and isinstance(item[1], np.ndarray) and isinstance(item[2], str)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / max(float(np.linalg.norm(x)), _EPS)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- catalog hook
# raise whenever `raw_blocks_many` would give other blocks for the same LoRA, or stored features change
# (2: stored with an init fingerprint, `retrieval.catalog_features`; 3: the output-side content factor)
BLOCKS_VERSION = 3


def blocks_fingerprint(cfg: DescriptorConfig) -> str:
    """What raw blocks depend on: the settings that shape them (not PCA's) and `BLOCKS_VERSION`. Blocks stored with
    another fingerprint are not used."""
    shaping = {"version": BLOCKS_VERSION, "sketch": cfg.sketch, "top_k": cfg.top_k, "seed": cfg.seed,
               "spectrum_weight": cfg.spectrum_weight, "norm_weight": cfg.norm_weight,
               "content_sketch": cfg.content_sketch}
    return "blocks:" + hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def stored_blocks(blocks: Mapping[str, np.ndarray], cfg: DescriptorConfig) -> tuple[list[str], np.ndarray]:
    """(names, (n, block) float16): raw blocks as the catalog stores them and the index uses them, whether read
    back from the catalog or computed from the file (so both give the same vectors)."""
    names = list(blocks)
    if not names:
        return names, np.zeros((0, cfg.stored_block), np.float16)
    return names, np.stack([blocks[n] for n in names]).astype(np.float16)

