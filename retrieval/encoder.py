"""Learned LoRA encoder (after AutoLoRA): LoRA weights -> a vector in the base model's text-embedding space.

One token per layer (module slot of the family's layout), from the module's truncated SVD ``ΔW_k = U·S·Vᵀ`` (so
every token depends on ΔW only: invariant to rank and to ``B·R, R⁻¹·A``):

- learned probe vectors ``P_t`` (in × p) passed through the LoRA and read out by learned ``Q_t`` (q × out):
  ``Q_t·ΔW·P_t = (Q_t·U·S)·(Vᵀ·P_t)`` (AutoLoRA);
- a learned output-side readout ``G_t·ΔW·ΔWᵀ·G_tᵀ``, blind to the random ``A`` that LoRA training starts from
  (two trainings of one concept differ mostly there);
- the fixed sketches of the training-free descriptor (`retrieval.descriptor`) for that layer.

``t`` is the layer type (role and shape): layers of one type share probes, readouts and one projection to the
model width. Tokens get a slot embedding and the layer's relative log-norm; missing layers are zero-filled and
masked. A small transformer (with a CLS token) mixes them, mean pooling and a linear head give the output,
L2-normalised. When the LoRA has metadata, its text embedding (through a small MLP) joins the pooled vector
before the head; it is dropped at random during training, so weights alone still work, and one transformer
pass gives both the weights-only and the with-metadata vector. Inference (`LoRAEncoder.encode`) runs a bf16 copy
on CPUs with native bf16 (`retrieval.cpu_bf16`) through the attention's SDPA path (its transformer 3x faster per
batch than float32 through PyTorch's fused encoder-layer kernel, which gains nothing from bf16 here).

Training (`train_encoder`) is contrastive (symmetric InfoNCE with a learned temperature) against a frozen text
embedder — by default the base model's own text encoder — on (LoRA, caption) pairs whose captions come from the
library's metadata (`retrieval.text.captions`); LoRAs without metadata are not trained on. LoRAs that share a
caption group (e.g. two ranks of one concept) are positives of each other, not negatives.
"""
from __future__ import annotations

import json
import math
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cpu_bf16 import inference_copy
from .descriptor import (ModuleSVD, PackedSVDs, SVDGroup, module_role, pack_dicts, packed_blocks,
                         random_projection)


@dataclass
class EncoderConfig:
    layout: list[str]                     # module names, one token slot each
    shapes: list[tuple[int, int]]         # (out, in·prod(kernel)) per slot
    out_dim: int                          # the text embedder's dimension
    family: str = "unknown"
    text_embedder: str = ""               # fingerprint of the text embedder it was trained against
    top_k: int = 4
    probes: int = 8
    readouts: int = 8
    max_dim: int = 128                    # wider sides are first reduced by a fixed random projection
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    meta_dim: int = 0                     # > 0: a metadata-text token of this size
    gram: int = 8                         # learned output-side readout of ΔW·ΔWᵀ (0: off)
    sketch: int = 8                       # fixed descriptor sketches per layer (`retrieval.descriptor`; 0: off)
    seed: int = 0

    def __post_init__(self):
        self.shapes = [tuple(int(d) for d in s) for s in self.shapes]

    def slot_types(self) -> list[str]:
        return [f"{module_role(n)}:{o}x{i}" for n, (o, i) in zip(self.layout, self.shapes)]

    def reduced(self, n: int) -> int:
        return min(n, self.max_dim)

    def descriptor_config(self):
        from .descriptor import DescriptorConfig

        return DescriptorConfig(sketch=self.sketch, top_k=self.top_k, seed=self.seed, content_sketch=0)

    def encodes(self, family: str) -> bool:
        """Whether LoRAs of this base-model family are this encoder's to encode."""
        return self.family in ("unknown", family)

    def takes_blocks_of(self, cfg) -> bool:
        """Whether descriptor blocks made with `cfg` (as a catalog stores them) are this encoder's fixed sketches."""
        mine = self.descriptor_config()
        return bool(self.sketch) and all(getattr(cfg, f) == getattr(mine, f) for f in
                                         ("sketch", "top_k", "seed", "spectrum_weight", "norm_weight"))


@dataclass
class EncoderInputs:
    """A batch, grouped by layer type: ``US[t]`` (b, n_t, out', k), ``V[t]`` (b, n_t, in', k)."""

    US: dict[str, torch.Tensor]
    V: dict[str, torch.Tensor]
    present: torch.Tensor                 # (b, n_slots) bool
    lognorm: torch.Tensor                 # (b, n_slots)
    meta: torch.Tensor | None = None      # (b, meta_dim)
    meta_present: torch.Tensor | None = None  # (b,) bool
    blocks: torch.Tensor | None = None    # (b, n_slots, block) fixed descriptor sketches

    def __len__(self) -> int:
        return self.present.shape[0]

    def to(self, dtype: torch.dtype) -> EncoderInputs:
        """The batch with its floating-point tensors in `dtype` (masks unchanged)."""
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return EncoderInputs({t: v.to(dtype) for t, v in self.US.items()},
                             {t: v.to(dtype) for t, v in self.V.items()}, self.present, self.lognorm.to(dtype),
                             cast(self.meta), self.meta_present, cast(self.blocks))

    def select(self, idx) -> EncoderInputs:
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return EncoderInputs({t: v[idx] for t, v in self.US.items()}, {t: v[idx] for t, v in self.V.items()},
                             self.present[idx], self.lognorm[idx], pick(self.meta), pick(self.meta_present),
                             pick(self.blocks))


def prepare_inputs(config: EncoderConfig, items: Sequence[Mapping[str, ModuleSVD]] | PackedSVDs,
                   meta: np.ndarray | None = None, meta_present: Sequence[bool] | None = None,
                   stored: Sequence[tuple[Sequence[str], np.ndarray]] | None = None) -> EncoderInputs:
    """Encoder inputs for LoRAs given as {module name: ModuleSVD} maps or a `PackedSVDs` (batched, no loop per
    module); modules outside the layout, or of another shape, are ignored.

    The fixed descriptor sketches are the descriptor blocks of the layout's modules (relative log-norms against
    their median), in float16 as a catalog stores them (`retrieval.descriptor.stored_blocks`). `stored`: per LoRA,
    the (names, rows) a catalog stored (made with settings `config.takes_blocks_of`): used when every module of the
    batch's LoRAs is in the layout (then they are these blocks), instead of computing them again."""
    packed = pack_dicts(items)
    n_modules = np.bincount([li for g in packed.groups for li, _ in g.owners], minlength=len(packed))
    types = config.slot_types()
    slot_of = {n: i for i, n in enumerate(config.layout)}
    slots_of: dict[str, list[int]] = {}
    for s, t in enumerate(types):
        slots_of.setdefault(t, []).append(s)
    pos_in_type = {s: j for slots in slots_of.values() for j, s in enumerate(slots)}
    b, k = len(packed), config.top_k
    US, V, proj = {}, {}, {}
    for t, slots in slots_of.items():
        n_out, n_in = config.shapes[slots[0]]
        ro, ri = config.reduced(n_out), config.reduced(n_in)
        US[t] = torch.zeros(b, len(slots), ro, k)
        V[t] = torch.zeros(b, len(slots), ri, k)
        proj[t] = (random_projection(n_out, ro, config.seed, "enc-out") if ro < n_out else None,
                   random_projection(n_in, ri, config.seed, "enc-in") if ri < n_in else None)
    present = torch.zeros(b, len(types), dtype=torch.bool)
    lognorm = torch.zeros(b, len(types))
    # keep the modules of the layout (with the layout's shape) only
    groups = []
    for g in packed.groups:
        shape = (g.U.shape[1], g.V.shape[1])
        keep = [r for r, (_, name) in enumerate(g.owners) if name in slot_of and config.shapes[slot_of[name]] == shape]
        if keep:
            idx = torch.tensor(keep)
            groups.append(SVDGroup(g.U[idx], g.S[idx], g.V[idx], [g.owners[r] for r in keep]))
    packed = PackedSVDs(groups, [[n for n in names if n in slot_of] for names in packed.names])
    bw = config.descriptor_config().block
    kept = np.bincount([li for g in packed.groups for li, _ in g.owners], minlength=b)
    if config.sketch and stored is not None and (kept == n_modules).all():
        rows = {(li, n): r[:bw] for li, (names, block) in enumerate(stored) for n, r in zip(names, block)}
        group_blocks = [np.stack([rows[owner] for owner in g.owners]) for g in packed.groups]
    elif config.sketch:
        group_blocks = [gb.astype(np.float16) for gb in packed_blocks(packed, config.descriptor_config())]
    else:
        group_blocks = [None] * len(packed.groups)
    blocks = torch.zeros(b, len(types), bw) if config.sketch else None
    for g, gb in zip(packed.groups, group_blocks):
        sel = [(r, li, slot_of[name]) for r, (li, name) in enumerate(g.owners)]
        lis = torch.tensor([li for _, li, _ in sel])
        slots = torch.tensor([s for _, _, s in sel])
        kk = min(k, g.S.shape[1])
        S = g.S
        u = g.U[:, :, :kk] * S[:, None, :kk]
        v = g.V[:, :, :kk]
        for t in {types[s] for _, _, s in sel}:
            m = torch.tensor([types[s] == t for _, _, s in sel])
            pos = torch.tensor([pos_in_type[s] for (_, _, s), keep in zip(sel, m.tolist()) if keep])
            po, pi = proj[t]
            US[t][lis[m], pos, :, :kk] = torch.einsum("do,nok->ndk", po, u[m]) if po is not None else u[m]
            V[t][lis[m], pos, :, :kk] = torch.einsum("di,nik->ndk", pi, v[m]) if pi is not None else v[m]
        nrm = S.norm(dim=1)
        present[lis, slots] = nrm > 1e-12
        lognorm[lis, slots] = nrm.clamp_min(1e-12).log()
        if blocks is not None:
            blocks[lis, slots] = torch.from_numpy(gb.astype(np.float32))
    # relative log-norm: each LoRA's modules against its own median, so α and learning rate do not matter
    for i in range(b):
        live = present[i]
        if live.any():
            lognorm[i, live] -= lognorm[i, live].median()
    lognorm[~present] = 0.0
    meta_t = None if meta is None else torch.as_tensor(np.asarray(meta), dtype=torch.float32)
    mp = None
    if meta_t is not None:
        mp = torch.as_tensor(list(meta_present) if meta_present is not None else [True] * b, dtype=torch.bool)
    return EncoderInputs(US, V, present, lognorm.clamp(-6, 6), meta_t, mp, blocks)


class LoRAEncoder(nn.Module):
    """See the module docstring; ``encode`` for vectors, ``save``/``load`` for files (safetensors + config)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        g = torch.Generator().manual_seed(config.seed)
        types = config.slot_types()
        self.types = sorted(set(types))
        self._key = {t: f"t{i}" for i, t in enumerate(self.types)}
        self.slot_index = {t: [s for s, tt in enumerate(types) if tt == t] for t in self.types}
        p, q, h = config.probes, config.readouts, config.hidden
        self.probes = nn.ParameterDict()
        self.readouts = nn.ParameterDict()
        self.proj = nn.ModuleDict()
        self.gram_readouts = nn.ParameterDict()
        self.gram_proj = nn.ModuleDict()
        self.sketch_proj = nn.ModuleDict()
        for t in self.types:
            n_out, n_in = config.shapes[self.slot_index[t][0]]
            ro, ri = config.reduced(n_out), config.reduced(n_in)
            key = self._key[t]
            self.probes[key] = nn.Parameter(torch.randn(ri, p, generator=g) / math.sqrt(ri))
            self.readouts[key] = nn.Parameter(torch.randn(q, ro, generator=g) / math.sqrt(ro))
            self.proj[key] = nn.Sequential(nn.LayerNorm(q * p), nn.Linear(q * p, h))
            if config.gram:
                gg = config.gram
                self.gram_readouts[key] = nn.Parameter(torch.randn(gg, ro, generator=g) / math.sqrt(ro))
                self.gram_proj[key] = nn.Sequential(nn.LayerNorm(gg * (gg + 1) // 2), nn.Linear(gg * (gg + 1) // 2, h))
            if config.sketch:
                self.sketch_proj[key] = nn.Linear(config.descriptor_config().block, h)
        n_slots = len(types)
        self.slot_emb = nn.Parameter(torch.randn(n_slots, h, generator=g) * 0.02)
        self.norm_emb = nn.Parameter(torch.randn(h, generator=g) * 0.02)
        self.cls = nn.Parameter(torch.randn(h, generator=g) * 0.02)
        self.meta_proj = nn.Sequential(nn.Linear(config.meta_dim, h), nn.GELU(), nn.Linear(h, h)) \
            if config.meta_dim else None
        layer = nn.TransformerEncoderLayer(h, config.heads, dim_feedforward=2 * h, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, config.out_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def temperature(self) -> float:
        return 1.0 / self.log_scale.detach().exp().item()

    def forward(self, x: EncoderInputs, use_meta: bool = True, both: bool = False):
        """(b, out_dim) unit vectors; with `use_meta` the metadata token joins where present. `both`: the pair
        (weights only, with metadata) from one pass."""
        b = len(x)
        h = self.config.hidden
        tokens = torch.zeros(b, len(self.config.layout), h, dtype=self.cls.dtype)
        for t in self.types:
            key = self._key[t]
            us, v = x.US[t], x.V[t]                                     # (b, n, o, k), (b, n, i, k)
            z = torch.einsum("qo,bnok->bnqk", self.readouts[key], us)
            w = torch.einsum("bnik,ip->bnkp", v, self.probes[key])
            feat = (z @ w).flatten(2)                                  # (b, n, q·p) = Q·ΔW·P
            tok = self.proj[key](feat)
            if self.config.gram:                                       # G·ΔW·ΔWᵀ·Gᵀ: blind to A's random init
                gz = torch.einsum("go,bnok->bngk", self.gram_readouts[key], us)
                gram = gz @ gz.transpose(-1, -2)
                i, j = torch.triu_indices(gram.shape[-1], gram.shape[-1])
                tok = tok + self.gram_proj[key](gram[..., i, j])
            if self.config.sketch and x.blocks is not None:
                tok = tok + self.sketch_proj[key](x.blocks[:, self.slot_index[t]])
            tokens[:, self.slot_index[t]] = tok
        tokens = tokens + self.slot_emb + x.lognorm.unsqueeze(-1) * self.norm_emb
        tokens = tokens * x.present.unsqueeze(-1)
        seq = torch.cat([self.cls.expand(b, 1, h), tokens], dim=1)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool), x.present], dim=1)
        live = keep.any(0)
        if not bool(live.all()):   # slots no LoRA of the batch has are masked in every row: the same output
            seq, keep = seq[:, live], keep[:, live]   # without them (an attention-only LoRA skips ff/resnet slots)
        with _mha_fastpath(False):
            out = self.transformer(seq, src_key_padding_mask=~keep)
        pooled = (out * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True)
        weights_only = F.normalize(self.head(pooled), dim=-1)
        if self.meta_proj is None or not (use_meta or both):
            return (weights_only, weights_only) if both else weights_only
        # the metadata text, when present, joins after pooling (one transformer pass serves both outputs)
        meta = x.meta if x.meta is not None else torch.zeros(b, self.config.meta_dim, dtype=self.cls.dtype)
        mp = x.meta_present if x.meta_present is not None else torch.zeros(b, dtype=torch.bool)
        joint = F.normalize(self.head(pooled + self.meta_proj(meta) * mp.unsqueeze(-1)), dim=-1)
        if both:
            return weights_only, joint
        return joint if use_meta else weights_only

    # convenience ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, items: Sequence[Mapping[str, ModuleSVD]] | PackedSVDs, meta: np.ndarray | None = None,
               meta_present: Sequence[bool] | None = None, batch_size: int = 128, both: bool = False,
               stored: Sequence[tuple[Sequence[str], np.ndarray]] | None = None):
        """(n, out_dim) float32 vectors of LoRAs given as svds maps (`retrieval.descriptor.lora_svds`) or packed;
        with `meta` the metadata joins where `meta_present`. `both`: (weights only, with metadata). `stored`: their
        descriptor blocks as a catalog stores them (see `prepare_inputs`)."""
        self.eval()
        model = self._inference_model()
        dtype = model.cls.dtype
        if isinstance(items, PackedSVDs) and len(items) > batch_size:
            items = items.per_lora()
        rows_w, rows_j = [], []
        for start in range(0, len(items), batch_size):
            sl = slice(start, start + batch_size)
            part = items if isinstance(items, PackedSVDs) else items[sl]
            m = None if meta is None or self.meta_proj is None else np.asarray(meta)[sl]
            mp = None if m is None else (list(meta_present)[sl] if meta_present is not None else None)
            st = None if stored is None else list(stored)[sl]
            w, j = model(prepare_inputs(self.config, part, m, mp, st).to(dtype), use_meta=m is not None, both=True)
            rows_w.append(F.normalize(w.float(), dim=-1).numpy())
            rows_j.append(F.normalize(j.float(), dim=-1).numpy())
        empty = np.zeros((0, self.config.out_dim), dtype=np.float32)
        w = np.concatenate(rows_w) if rows_w else empty
        j = np.concatenate(rows_j) if rows_j else empty
        if both:
            return w, j
        return j if meta is not None else w

    def _inference_model(self) -> LoRAEncoder:
        """The model `encode` runs (`retrieval.cpu_bf16.inference_copy`), made again when a weight changed."""
        version = tuple((id(p), p._version) for p in self.parameters())   # in-place updates and new tensors
        cached = self.__dict__.get("_inference")
        if cached is None or cached[0] != version:
            self.__dict__.pop("_inference", None)   # (not copied into the new copy)
            cached = (version, inference_copy(self))
            self.__dict__["_inference"] = cached   # not a submodule: not in state_dict, not copied with the model
        return cached[1]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"config": json.dumps(asdict(self.config)),
                                              "kind": "lora-studio-retrieval-encoder"})
        return path

    @classmethod
    def load(cls, path: str | Path) -> LoRAEncoder:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") != "lora-studio-retrieval-encoder":
            raise ValueError(f"{path} is not a LoRA Studio retrieval encoder")
        model = cls(EncoderConfig(**json.loads(meta["config"])))
        model.load_state_dict(load_file(str(path)))
        return model.eval()

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().numpy().tobytes())
        return h.hexdigest()[:16]


@contextmanager
def _mha_fastpath(enabled: bool):
    """Within: PyTorch's fused transformer-layer inference kernel on or off (process-wide; restored after)."""
    mha = torch.backends.mha
    if not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    old = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(old)


# ----------------------------------------------------------------------------------------------- training
@dataclass
class TrainingPair:
    """One LoRA with its caption variants (from its metadata) and its positives group."""

    svds: Mapping[str, ModuleSVD]
    captions: list[str]
    group: str
    meta_text: str | None = None
    family: str = "unknown"


@dataclass
class TrainingReport:
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    n_pairs: int = 0


def contrastive_loss(w: torch.Tensor, t: torch.Tensor, groups: Sequence, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between weight vectors `w` and text vectors `t` (rows paired); rows of one group are
    positives of each other."""
    logits = scale * w @ t.T
    same = torch.tensor([[a == b for b in groups] for a in groups], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    loss_w = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(target.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (loss_w + loss_t)


def build_config(pairs: Sequence[TrainingPair], out_dim: int, **kw) -> EncoderConfig:
    """Layout = every module name seen in the pairs (sorted) with its shape."""
    shapes: dict[str, tuple[int, int]] = {}
    families = {p.family for p in pairs}
    for p in pairs:
        for name, m in p.svds.items():
            shapes.setdefault(name, m.shape)
    layout = sorted(shapes)
    return EncoderConfig(layout=layout, shapes=[shapes[n] for n in layout], out_dim=out_dim,
                         family=families.pop() if len(families) == 1 else "unknown", **kw)


def train_encoder(pairs: Sequence[TrainingPair], text_embedder, *, steps: int = 300, batch_size: int = 32,
                  lr: float = 2e-3, weight_decay: float = 0.01, meta_dropout: float = 0.5, use_meta: bool = True,
                  seed: int = 0, encoder: LoRAEncoder | None = None, log: Callable[[str], None] | None = None,
                  **config_kw) -> tuple[LoRAEncoder, TrainingReport]:
    """Train (or go on training) a `LoRAEncoder` contrastively against the frozen `text_embedder`."""
    import time

    pairs = [p for p in pairs if p.captions]
    if len(pairs) < 2:
        raise ValueError("need at least two LoRAs with metadata to train the encoder")
    started = time.monotonic()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    meta_dim = text_embedder.dim if use_meta else 0
    if encoder is None:
        config = build_config(pairs, text_embedder.dim, meta_dim=meta_dim, seed=seed,
                              text_embedder=text_embedder.fingerprint(), **config_kw)
        encoder = LoRAEncoder(config)
    config = encoder.config
    # every caption variant embedded once (the text tower is frozen)
    texts = sorted({c for p in pairs for c in p.captions})
    emb = dict(zip(texts, torch.from_numpy(text_embedder.encode(texts))))
    meta = None
    if config.meta_dim:
        meta = text_embedder.encode([p.meta_text or "" for p in pairs])
    inputs = prepare_inputs(config, [p.svds for p in pairs], meta, [bool(p.meta_text) for p in pairs])
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)
    report = TrainingReport(n_pairs=len(pairs))
    n = len(pairs)
    bs = min(batch_size, n)
    encoder.train()
    for step in range(steps):
        idx = rng.sample(range(n), bs)
        batch = inputs.select(idx)
        if batch.meta_present is not None:
            drop = torch.rand(bs) < meta_dropout
            batch.meta_present = batch.meta_present & ~drop
        t = torch.stack([emb[rng.choice(pairs[i].captions)] for i in idx])
        w = encoder(batch)
        scale = encoder.log_scale.clamp(0, math.log(100)).exp()
        loss = contrastive_loss(w, t, [pairs[i].group for i in idx], scale)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        report.losses.append(loss.item())
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step}: loss {loss.item():.4f} temperature {encoder.temperature:.3f}")
    report.steps = steps
    report.seconds = time.monotonic() - started
    return encoder.eval(), report
