"""Gated fusion (after AutoLoRA's gate over LoRA outputs): a gate per LoRA, per layer and per timestep gives the
weights ``weights(step) -> [1, N, L]``; one UNet row per CFG branch, like Merge, but the weights move with the
layer and the step.

The gate of LoRA n at layer l and run progress p (0 = first step, 1 = last)::

    g[n, l, p] = w_n · lbw_n(l) · 2σ( a_t[c] (0.5 − p) + a_s[c] (0.5 − stage_l) + γ log ρ[n, l] + θ[c, block_l, p] )

- c: the LoRA's category (`LoRARef.category`, else its metadata, else ``unknown``); ``stage_l`` in [0, 1] is where
  the layer sits in the UNet (0: first down block, 0.5: mid block, 1: last up block).
- category priors (``a_t``, ``a_s`` in `PRIORS`): characters stronger early and in the down/mid blocks, styles late
  and in the up blocks, backgrounds early; 2σ(0) = 1, so a LoRA without prior or training keeps its weight.
- ``ρ[n, l]``: the LoRA's ΔW norm at layer l over its mean ΔW norm (where a LoRA concentrates its change it gets
  more of the layer), exponent γ.
- θ: trained offsets per category × block × timestep bucket (linear between bucket centres); 0 without training.

Then a budget per layer keeps the total from exploding as N grows (merging 3+ LoRAs at weight 1 collapses the
image): ``Σ_n |g[n, l]| <= 1 + β_block · (N − 1)``; above it the layer's gates are scaled down together. The
training-free β is 1 (the cap only trims what the priors add above the LoRAs' own weights): on TinyComposLoRA
(60 sets per N, `bench/compose.py`) β = 0.5 / 0.75 / 1.0 gave all concepts present at N = 2 in 0.15 / 0.25 / 0.33
of images and the same within noise at N = 3-5 (0.05 / 0.03 / 0.03 at N = 3); β = 1 keeps each concept more
often at every N (background 0.42 -> 0.75 at N = 5) and the asked colour less often (0.62 -> 0.47 at N = 5).

Two gates:

- training-free (``gate="default"``): θ = 0, β = `DEFAULT_BUDGET`;
- trained (``gate="trained"`` / a path; ``"auto"`` takes the committed `TRAINED_GATE` file when it exists): θ and
  β learned by `train_gate` from what a library offers: the LoRAs, their metadata and images each LoRA generated
  ALONE (never rendered compositions). Distillation: a single-LoRA image of LoRA i, noised at a random t, with
  its own prompt; the UNet with i plus 1–4 co-active LoRAs of other categories, gated, must predict the noise
  that LoRA i alone predicts. ``python -m fusion.gated --out assets/gates/tinyworld.safetensors`` trains it on
  TinyWorld's library (2 CPU threads, a few minutes).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .blockweights import block_id
from .schedules import Schedule

CATEGORIES = ("character", "clothing", "style", "background", "object", "unknown")
# (a_t: early(+) / late(-), a_s: down-mid(+) / up(-)) per category, in logit units of 2σ(·)
PRIORS = {
    "character": (1.0, 0.6),
    "clothing": (0.2, 0.2),
    "style": (-1.0, -0.6),
    "background": (0.6, 0.0),
    "object": (0.2, 0.0),
    "unknown": (0.0, 0.0),
}
N_BUCKETS = 4
DEFAULT_BUDGET = 1.0
DEFAULT_GAMMA = 0.5
TRAINED_GATE = Path(__file__).resolve().parents[1] / "assets" / "gates" / "tinyworld.safetensors"


# ---------------------------------------------------------------- layer and LoRA features


def stage_of(layer: str, layers_per_block: int = 2) -> float:
    """Where a UNet layer sits: 0 (first down block) .. 0.5 (mid) .. 1 (last up block); 0.5 outside blocks."""
    b = block_id(layer, layers_per_block)
    if b is None or b == "BASE":
        return 0.5
    if b == "M00":
        return 0.5
    index = int(b[-2:])
    per = layers_per_block + 1
    if b.startswith("IN"):
        return 0.45 * index / (4 * per)
    return 0.55 + 0.45 * index / (4 * per - 1)


def category_of(ref, lora) -> str:
    """The LoRA's category: the plan's, else a known category named in its metadata, else ``unknown``."""
    if getattr(ref, "category", None):
        return ref.category if ref.category in CATEGORIES else "unknown"
    meta = getattr(lora, "metadata", None) or {}
    for key in ("category", "ss_category", "modelspec.category", "modelspec.tags", "tags"):
        value = str(meta.get(key, "")).lower()
        for cat in CATEGORIES[:-1]:
            if cat in value:
                return cat
    return "unknown"


def layer_norms(lora, layers: Sequence[str]) -> torch.Tensor:
    """``[L]``: Frobenius norm of the LoRA's ΔW at each layer (0 where it has none)."""
    out = torch.zeros(len(layers))
    for j, layer in enumerate(layers):
        m = lora.modules.get(layer)
        if m is not None:
            out[j] = m.lowrank_delta().norm()
    return out


def concentration(norms: torch.Tensor) -> torch.Tensor:
    """``ρ``: each layer's norm over the LoRA's mean norm (1 where the LoRA has no module)."""
    present = norms > 0
    mean = norms[present].mean() if present.any() else torch.tensor(1.0)
    rho = torch.where(present, norms / mean.clamp(min=1e-12), torch.ones_like(norms))
    return rho.clamp(0.25, 4.0)


# ---------------------------------------------------------------- the gate (differentiable)


class GateParams(nn.Module):
    """Trainable part of the gate: θ ``[C, K, T]`` (category × block × timestep bucket) and the per-block budget
    slope β = exp(log_budget) ``[K]``. ``blocks`` names the K blocks (LBW ids; layers outside them use θ = 0)."""

    def __init__(self, blocks: Sequence[str], budget: float = DEFAULT_BUDGET, gamma: float = DEFAULT_GAMMA,
                 n_buckets: int = N_BUCKETS):
        super().__init__()
        self.blocks = list(blocks)
        self.gamma = float(gamma)
        self.theta = nn.Parameter(torch.zeros(len(CATEGORIES), len(self.blocks), n_buckets))
        self.log_budget = nn.Parameter(torch.full((len(self.blocks),), math.log(budget)))

    @property
    def n_buckets(self) -> int:
        return self.theta.shape[2]

    def save(self, path: str | Path, meta: Mapping[str, object] | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"blocks": json.dumps(self.blocks), "categories": json.dumps(list(CATEGORIES)),
                "gamma": str(self.gamma), "format": "lora-studio-gate/1"}
        info.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in (meta or {}).items()})
        save_file({"theta": self.theta.detach().contiguous(), "log_budget": self.log_budget.detach().contiguous()},
                  str(path), metadata=info)

    @classmethod
    def load(cls, path: str | Path) -> "GateParams":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            theta, log_budget = f.get_tensor("theta"), f.get_tensor("log_budget")
        if meta.get("format") != "lora-studio-gate/1":
            raise ValueError(f"{path} is not a LoRA Studio gate file (format {meta.get('format')!r})")
        cats = json.loads(meta["categories"])
        if cats != list(CATEGORIES):
            raise ValueError(f"{path}: gate categories {cats} differ from {list(CATEGORIES)}")
        blocks = json.loads(meta["blocks"])
        g = cls(blocks, gamma=float(meta.get("gamma", DEFAULT_GAMMA)), n_buckets=theta.shape[2])
        with torch.no_grad():
            g.theta.copy_(theta)
            g.log_budget.copy_(log_budget)
        g.meta = meta
        return g


def bucket_weights(progress: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """``[B, T]``: linear interpolation weights between bucket centres for progress values in [0, 1]."""
    pos = progress.clamp(0, 1) * n_buckets - 0.5
    lo = pos.floor().clamp(0, n_buckets - 1)
    frac = (pos - lo).clamp(0, 1)
    hi = (lo + 1).clamp(max=n_buckets - 1)
    w = torch.zeros(progress.shape[0], n_buckets)
    w.scatter_add_(1, lo.long()[:, None], (1 - frac)[:, None])
    w.scatter_add_(1, hi.long()[:, None], frac[:, None])
    return w


class GateFeatures:
    """What the gate needs of N LoRAs on L layers, computed once at bind time."""

    def __init__(self, categories: Sequence[str], layers: Sequence[str], base: torch.Tensor,
                 rho: torch.Tensor, blocks: Sequence[str], layers_per_block: int = 2):
        self.cat = torch.tensor([CATEGORIES.index(c) for c in categories], dtype=torch.long)  # [N]
        self.base = base.float()  # [N, L]: plan weight × block weight
        self.log_rho = rho.float().log()  # [N, L]
        self.stage = torch.tensor([stage_of(x, layers_per_block) for x in layers])  # [L]
        ids = [block_id(x, layers_per_block) for x in layers]
        self.block = torch.tensor([blocks.index(b) if b in blocks else -1 for b in ids], dtype=torch.long)  # [L]
        a = torch.tensor([PRIORS[CATEGORIES[int(c)]] for c in self.cat]).reshape(-1, 2)
        self.a_t, self.a_s = a[:, 0], a[:, 1]  # [N]


def gate_weights(params: GateParams | None, f: GateFeatures, progress: torch.Tensor, active: torch.Tensor,
                 budget: float = DEFAULT_BUDGET, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """``[B, N, L]`` gated weights for B (progress, active-set) pairs; `active` ``[B, N]`` (bool or 0/1)."""
    progress = progress.float().reshape(-1)
    act = active.float().reshape(progress.shape[0], -1)
    logit = (f.a_t[None, :, None] * (0.5 - progress)[:, None, None]
             + f.a_s[None, :, None] * (0.5 - f.stage)[None, None, :])
    gamma_ = params.gamma if params is not None else gamma
    logit = logit + gamma_ * f.log_rho[None]
    known = f.block >= 0
    if params is not None:
        bw = bucket_weights(progress, params.n_buckets)  # [B, T]
        theta = params.theta[f.cat][:, f.block.clamp(min=0)]  # [N, L, T]
        offset = torch.einsum("nlt,bt->bnl", theta, bw) * known[None, None, :]
        logit = logit + offset
        beta = torch.where(known, params.log_budget[f.block.clamp(min=0)].exp(), torch.tensor(budget))  # [L]
    else:
        beta = torch.full((f.block.shape[0],), float(budget))
    g = f.base[None] * 2 * torch.sigmoid(logit) * act[:, :, None]
    n_active = act.sum(1)  # [B]
    cap = 1 + beta[None, :] * (n_active[:, None] - 1).clamp(min=0)  # [B, L]
    total = g.abs().sum(1)  # [B, L]
    scale = torch.where(total > cap, cap / total.clamp(min=1e-12), torch.ones_like(total))
    return g * scale[:, None, :]


# ---------------------------------------------------------------- the schedule


def _resolve_gate(gate) -> GateParams | None:
    if gate is None or gate == "default":
        return None
    if isinstance(gate, GateParams):
        return gate
    if gate in ("auto", "trained"):
        if TRAINED_GATE.exists():
            return GateParams.load(TRAINED_GATE)
        if gate == "trained":
            raise FileNotFoundError(f"no trained gate at {TRAINED_GATE}: run python -m fusion.gated, or use "
                                    "gate='default' (training-free)")
        return None
    path = Path(gate)
    if not path.exists():
        raise FileNotFoundError(f"gate file {path} not found")
    return GateParams.load(path)


class Gated(Schedule):
    """Gated fusion: weights per LoRA × layer × step from category priors, ΔW norms, a per-layer budget and
    (optionally) a trained gate file. ``gate``: ``"auto"`` (trained file if present, else training-free),
    ``"default"`` (training-free), ``"trained"`` or a path. ``budget`` / ``gamma`` set the training-free gate."""

    method = "gated"

    def __init__(self, loras, gate: str | GateParams | None = "auto", budget: float = DEFAULT_BUDGET,
                 gamma: float = DEFAULT_GAMMA):
        super().__init__(loras)
        if float(budget) < 0:
            raise ValueError(f"budget={budget} must be >= 0")
        self.gate_spec = gate if isinstance(gate, (str, type(None))) else "custom"
        self.params = _resolve_gate(gate)
        self.budget, self.gamma = float(budget), float(gamma)
        self._memo: dict[tuple[int, int], torch.Tensor] = {}

    def bind(self, binding):
        super().bind(binding)
        layers = binding.unet_layers
        cats = [category_of(self.ref(n), binding.loras[n]) for n in binding.names]
        rho = torch.stack([concentration(layer_norms(binding.loras[n], layers)) for n in binding.names]) \
            if binding.names else torch.zeros(0, len(layers))
        blocks = self.params.blocks if self.params is not None else []
        self.categories = cats
        self.features = GateFeatures(cats, layers, self.unet_table, rho, blocks, binding.layers_per_block)
        self._memo.clear()

    def weights(self, step, n_steps):
        key = (step, n_steps)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        self._check_bound()
        active = self.gate(step, n_steps)[None]
        progress = torch.tensor([step / max(n_steps - 1, 1)])
        with torch.no_grad():
            w = gate_weights(self.params, self.features, progress, active, self.budget, self.gamma)
        self._memo[key] = w
        return w

    def describe(self):
        return f"Gated({', '.join(f'{r.name}:{r.weight:g}' for r in self.refs)}; gate={self.gate_spec})"


# ---------------------------------------------------------------- training (distillation from single-LoRA images)


def _encode_text(pipe, prompts: Sequence[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def _encode_images(pipe, images) -> torch.Tensor:
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.float32) / 127.5 - 1
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    with torch.no_grad():
        z = pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean
    return z.float() * pipe.vae.config.scaling_factor


def co_active_sets(categories: Sequence[str], i: int, rng: random.Random, n_max: int = 5) -> list[int]:
    """LoRA i plus 1..n_max-1 LoRAs of other categories (at most one per category, a character when one exists)."""
    by_cat: dict[str, list[int]] = {}
    for j, c in enumerate(categories):
        by_cat.setdefault(c, []).append(j)
    mine = categories[i]
    others = [c for c in by_cat if c != mine or c == "unknown"]
    n = rng.randint(2, n_max)
    chosen = [i]
    if mine != "character" and "character" in by_cat:
        chosen.append(rng.choice(by_cat["character"]))
        others = [c for c in others if c != "character"]
    rng.shuffle(others)
    for c in others:
        if len(chosen) >= n:
            break
        pool = [j for j in by_cat[c] if j not in chosen]
        if pool:
            chosen.append(rng.choice(pool))
    return chosen


def train_gate(pipe, loras: Mapping[str, object], categories: Mapping[str, str],
               samples: Mapping[str, tuple[Sequence[object], Sequence[str]]], steps: int = 300, batch: int = 8,
               lr: float = 0.05, seed: int = 0, budget: float = DEFAULT_BUDGET, gamma: float = DEFAULT_GAMMA,
               log=print) -> tuple[GateParams, dict]:
    """Learn θ and β by distillation from single-LoRA images.

    - `loras`: ``{name: canonical LoRA}`` (all of them are loaded in one runtime);
    - `categories`: ``{name: category}`` (from metadata);
    - `samples`: ``{name: (images generated by that LoRA alone, their prompts)}``.

    Each step draws `batch` (LoRA i, image, t): the noised latent and i's prompt go through the UNet twice: with
    LoRA i alone at weight 1 (teacher, no grad) and with i plus 1–4 co-active LoRAs of other categories under the
    gate (student). Loss: MSE between the two noise predictions. Only the gate's θ and β train.
    """
    from diffusers import DDPMScheduler

    from .runtime import LoRARuntime

    torch.manual_seed(seed)
    rng = random.Random(seed)
    names = list(loras)
    cats = [categories.get(n, "unknown") for n in names]
    unet = pipe.unet
    unet.requires_grad_(False)
    rt = LoRARuntime(unet=unet, strategy="lowrank", cfg=False)
    t0 = time.time()
    try:
        for n in names:
            rt.load(n, loras[n])
        sched = rt.activate(names, Schedule({n: 1.0 for n in names}))
        layers = sched.binding.unet_layers
        blocks = sorted({b for b in (block_id(x, rt.layers_per_block) for x in layers) if b is not None})
        params = GateParams(blocks, budget=budget, gamma=gamma)
        rho = torch.stack([concentration(layer_norms(loras[n], layers)) for n in names])
        feats = GateFeatures(cats, layers, sched.unet_table, rho, blocks, rt.layers_per_block)
        group = rt.groups["unet"]

        data = []  # (lora index, latent, text embedding)
        for i, n in enumerate(names):
            images, prompts = samples[n]
            z = _encode_images(pipe, images)
            e = _encode_text(pipe, prompts)
            data += [(i, z[k], e[k]) for k in range(len(z))]
        noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear")
        opt = torch.optim.Adam(params.parameters(), lr=lr)
        teacher_rows = torch.eye(len(names))[:, :, None] * sched.unet_table[None]  # [N, N, L]: row i = LoRA i alone
        history = []
        for step in range(steps):
            picks = [data[rng.randrange(len(data))] for _ in range(batch)]
            idx = [p[0] for p in picks]
            z0 = torch.stack([p[1] for p in picks])
            ehs = torch.stack([p[2] for p in picks])
            t = torch.randint(20, 980, (batch,))
            noise = torch.randn_like(z0)
            zt = noise_sched.add_noise(z0, noise, t)
            active = torch.zeros(batch, len(names))
            for b, i in enumerate(idx):
                active[b, co_active_sets(cats, i, rng)] = 1
            segments = [(b, 1) for b in range(batch)]
            with torch.no_grad():
                group.configure(teacher_rows[torch.tensor(idx)], segments, False)
                target = type(unet).forward(unet, zt, t, encoder_hidden_states=ehs).sample
            progress = 1 - t.float() / 1000
            w = gate_weights(params, feats, progress, active)
            group.configure(w, segments, False)
            pred = type(unet).forward(unet, zt, t, encoder_hidden_states=ehs).sample
            loss = torch.nn.functional.mse_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                params.theta.clamp_(-4, 4)
                params.log_budget.clamp_(math.log(0.05), math.log(2.0))
            history.append(float(loss.detach()))
            if log and (step % 50 == 0 or step == steps - 1):
                log(f"gate step {step}: loss {sum(history[-50:]) / len(history[-50:]):.5f} "
                    f"budget {params.log_budget.exp().mean():.3f} ({time.time() - t0:.0f} s)")
        info = {"steps": steps, "batch": batch, "lr": lr, "seconds": round(time.time() - t0, 1),
                "loss_first50": sum(history[:50]) / max(1, len(history[:50])),
                "loss_last50": sum(history[-50:]) / max(1, len(history[-50:])), "loras": len(names),
                "images": len(data)}
        return params, info
    finally:
        rt.remove()


def main(argv=None):
    """Train the gate on TinyWorld's headline LoRAs from images each LoRA generates alone."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", default=str(Path(__file__).resolve().parents[1] / "assets" / "loras"))
    ap.add_argument("--out", default=str(TRAINED_GATE))
    ap.add_argument("--images", type=int, default=8, help="single-LoRA images per LoRA")
    ap.add_argument("--gen-steps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from studio.api import Studio
    from studio.tinyworld.catalog import CONCEPTS, caption, sample_base
    from studio.tinyworld.train_lora import with_concept

    studio = Studio(library=args.library)
    loras, categories, samples = {}, {}, {}
    t0 = time.time()
    for c in CONCEPTS:
        name = c.name
        try:
            entry = studio.catalog.get(name)
        except KeyError:
            print(f"skip {name}: not in the library")
            continue
        loras[name] = studio._lora(name)
        categories[name] = next((t for t in entry.tags if t in CATEGORIES), "unknown")  # metadata (tags)
        rng = random.Random(f"gate-{name}-{args.seed}")
        prompts = [caption(with_concept(sample_base(rng), name), rng) for _ in range(args.images)]
        seeds = [90_000 + 97 * k + len(loras) for k in range(args.images)]
        images = [r.image for r in studio.generate_many(prompts, seeds, steps=args.gen_steps, cfg=7.0,
                                                          loras=[(name, 1.0)], method="merge", progress=False)]
        samples[name] = (images, prompts)
    gen_seconds = time.time() - t0
    print(f"{sum(len(v[0]) for v in samples.values())} single-LoRA images in {gen_seconds:.0f} s")
    if studio._runtime is not None:
        studio._runtime.remove()
        studio._runtime = None
    params, info = train_gate(studio.pipe, loras, categories, samples, steps=args.steps, batch=args.batch,
                              lr=args.lr, seed=args.seed)
    info["generation_seconds"] = round(gen_seconds, 1)
    info["data"] = "single-LoRA images (each LoRA alone, its own prompt); no compositions"
    params.save(args.out, meta={"train": info})
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes): {info}")


if __name__ == "__main__":
    main()
