"""Fusion methods as schedules: each says, per denoising step, the weight of every LoRA at every layer for every
pass of the UNet, and how the passes' outputs combine. The runtime (`fusion.runtime`) runs any schedule.

The interface (`Schedule`):

- ``bind(binding)``: called by `LoRARuntime.activate` with the active LoRA names (order = the N axis), their
  canonical `LoRA`s and the adapted layer names (UNet and text encoders: the L axes). Precompute tables here.
- ``weights(step, n_steps) -> Tensor[R, N, L_unet]``: R weight rows for the UNet (one row: every sample alike).
- ``passes(step, n_steps, cfg) -> list[Pass]``: which UNet passes to run; ``Pass(branch, row, key, reuse)``.
  The default is diffusers' own layout: ``[uncond, cond]`` (or ``[cond]`` without CFG) on the batch as the
  pipeline built it. Anything else (Composite's per-LoRA passes, a cache hit) makes the runtime rebuild the
  batch: one chunk per computed pass, all in ONE UNet call; a pass with ``reuse=True`` whose ``key`` is cached
  is not computed, and every computed pass with a key is cached.
- ``combine(passes, outputs) -> {"uncond": Tensor, "cond": Tensor}``: the default averages the passes of each
  branch, so the pipeline's CFG gives ``uncond + g * (mean_i cond_i - uncond)``.
- ``text_weights() -> Tensor[N, L_text]``: the text encoders run once per prompt, with these weights.
- ``prepare(loras, base_weight, layers_per_block)``: may replace the LoRAs before binding (Merge's ties/dare/svd/cat options).
- ``static``: True when the weights never change with the step or the branch, so `LoRARuntime.fuse()` may fold
  them into the base weights.

Steps are 0-indexed in the API; A1111's ``start``/``stop`` are 1-indexed: the LoRA acts on step ``i`` when
``start <= i + 1 < stop`` (a value in (0, 1) is a fraction of the run, as in LBW).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .blockweights import layer_rule
from .plan import LoRARef, Plan


@dataclass(frozen=True)
class Pass:
    """One UNet pass: its CFG branch, its weight row, and an optional cache key (reuse: take it from the cache)."""

    branch: str
    row: int = 0
    key: str | None = None
    reuse: bool = False

    def __post_init__(self):
        if self.branch not in ("uncond", "cond"):
            raise ValueError(f"a pass's branch is 'uncond' or 'cond', got {self.branch!r}")


@dataclass
class Binding:
    """What a schedule is bound to: the active LoRAs (N axis) and the adapted layers (L axes)."""

    names: list[str]
    loras: Mapping[str, object]
    unet_layers: list[str]
    text_layers: list[str]
    layers_per_block: int = 2

    def presence(self, layers: Sequence[str]) -> torch.Tensor:
        """``[N, L]`` bool: whether LoRA n has a module at layer l."""
        return torch.tensor([[layer in self.loras[n].modules for layer in layers] for n in self.names],
                            dtype=torch.bool).reshape(len(self.names), len(layers))


def resolve_step(value: int | float | None, n_steps: int) -> int | None:
    """LBW's resolve_step: a value in (0, 1) is a fraction of the run (at least step 1); else a step number."""
    if value is None:
        return None
    if 0 < value < 1:
        return max(1, round(value * n_steps)) if n_steps else 1
    return int(value)


def _refs(loras) -> list[LoRARef]:
    if isinstance(loras, Mapping):
        return [LoRARef(name=n, weight=float(w)) for n, w in loras.items()]
    out = []
    for r in loras:
        out.append(LoRARef(name=r) if isinstance(r, str) else r)
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"a LoRA appears twice in {names}")
    return out


class Schedule:
    """Base schedule: each LoRA at its weight × block weight, gated by its start/stop steps, both branches alike."""

    static = False
    method = "schedule"

    def __init__(self, loras: Sequence[LoRARef | str] | Mapping[str, float]):
        self.refs = _refs(loras)
        self.binding: Binding | None = None

    # ---------------------------------------------------------------- binding

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.refs]

    def ref(self, name: str) -> LoRARef:
        for r in self.refs:
            if r.name == name:
                return r
        return LoRARef(name=name)

    def prepare(self, loras: Mapping[str, object], base_weight: Callable[[str], torch.Tensor],
                layers_per_block: int = 2) -> dict[str, object]:
        return dict(loras)

    def bind(self, binding: Binding) -> None:
        self.binding = binding
        lpb = binding.layers_per_block
        unet, text = [], []
        for name in binding.names:
            ref = self.ref(name)
            rule = layer_rule(ref.lbw, lpb)
            unet.append([ref.weight * rule(layer) for layer in binding.unet_layers])
            text.append([ref.text_weight * rule(layer) for layer in binding.text_layers])
        n = len(binding.names)
        self.unet_table = torch.tensor(unet, dtype=torch.float32).reshape(n, len(binding.unet_layers))
        self.text_table = torch.tensor(text, dtype=torch.float32).reshape(n, len(binding.text_layers))

    def _check_bound(self):
        if self.binding is None:
            raise RuntimeError(f"{type(self).__name__} is not bound: pass it to LoRARuntime.activate first")

    # ---------------------------------------------------------------- weights

    def gate(self, step: int, n_steps: int) -> torch.Tensor:
        """``[N]``: 1 where the LoRA acts at 0-indexed `step` (A1111 start/stop), else 0."""
        self._check_bound()
        out = []
        for name in self.binding.names:
            ref = self.ref(name)
            start, stop = resolve_step(ref.start, n_steps), resolve_step(ref.stop, n_steps)
            on = (start is None or start <= step + 1) and (stop is None or step + 1 < stop)
            out.append(1.0 if on else 0.0)
        return torch.tensor(out, dtype=torch.float32)

    def table(self, step: int, n_steps: int) -> torch.Tensor:
        """``[N, L_unet]``: the gated weights of every LoRA at every UNet layer."""
        self._check_bound()
        return self.unet_table * self.gate(step, n_steps)[:, None]

    def weights(self, step: int, n_steps: int) -> torch.Tensor:
        return self.table(step, n_steps)[None]

    def text_weights(self) -> torch.Tensor:
        self._check_bound()
        return self.text_table

    # ---------------------------------------------------------------- passes

    def passes(self, step: int, n_steps: int, cfg: bool) -> list[Pass]:
        return [Pass("uncond", 0), Pass("cond", 0)] if cfg else [Pass("cond", 0)]

    def combine(self, passes: Sequence[Pass], outputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for branch in ("uncond", "cond"):
            chunks = [o for p, o in zip(passes, outputs) if p.branch == branch]
            if chunks:
                out[branch] = chunks[0] if len(chunks) == 1 else torch.stack(chunks).mean(0)
        return out

    def describe(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{r.name}:{r.weight:g}' for r in self.refs)})"


class BlockWise(Schedule):
    """A1111 LoRA Block Weight: weight × per-block weights (`LoRARef.lbw`), active between start and stop.

    `uncond_scale` (not in A1111) multiplies the LoRAs' weights in the unconditional branch (0: the LoRAs act on
    the conditional prediction only); None keeps both branches alike.
    """

    method = "blockwise"

    def __init__(self, loras, uncond_scale: float | None = None):
        super().__init__(loras)
        self.uncond_scale = uncond_scale

    @property
    def static(self) -> bool:
        return self.uncond_scale is None and all(r.start is None and r.stop is None for r in self.refs)

    def weights(self, step, n_steps):
        table = self.table(step, n_steps)
        if self.uncond_scale is None:
            return table[None]
        return torch.stack([table * self.uncond_scale, table])

    def passes(self, step, n_steps, cfg):
        if self.uncond_scale is None:
            return super().passes(step, n_steps, cfg)
        return [Pass("uncond", 0), Pass("cond", 1)] if cfg else [Pass("cond", 1)]


COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


@dataclass(frozen=True)
class MergeOptions:
    """How `Merge` combines its LoRAs: ``linear`` (the runtime's weighted sum) or a PEFT-style merge into one LoRA.

    `density` (ties / dare / magnitude_prune: fraction kept), `majority_sign_method` (``total`` / ``frequency``),
    `rank` (svd forms; default the largest input rank), `seed` (DARE's random drop).
    """

    combination: str = "linear"
    density: float | None = None
    majority_sign_method: str = "total"
    rank: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.combination not in COMBINATIONS:
            raise ValueError(f"unknown merge combination {self.combination!r}; use one of {COMBINATIONS}")
        needs_density = self.combination.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
        if needs_density and not (self.density is not None and 0 < self.density <= 1):
            raise ValueError(f"merge combination {self.combination!r} needs a density in (0, 1], got {self.density}")
        if self.majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"majority_sign_method={self.majority_sign_method!r}: use 'total' or 'frequency'")
        if self.rank is not None and int(self.rank) < 1:
            raise ValueError(f"merge rank {self.rank} must be >= 1")


class Merge(Schedule):
    """Static weighted sum ``W + Σ_i w_i · lbw_i(layer) · ΔW_i``; fusable.

    A `MergeOptions` (or its fields as keywords) other than ``linear`` first merges the LoRAs into one, PEFT-style
    (``cat``, ``svd``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and their ``*_svd`` forms;
    see `fusion.merging`).
    """

    method = "merge"
    static = True

    def __init__(self, loras, options: MergeOptions | None = None, **option_fields):
        super().__init__(loras)
        if options is not None and option_fields:
            raise ValueError("give Merge either options=MergeOptions(...) or its fields as keywords, not both")
        self.options = options if options is not None else MergeOptions(**option_fields)
        timed = [r.name for r in self.refs if r.start is not None or r.stop is not None]
        if timed:
            raise ValueError(f"merge is static, but {timed} have start/stop steps: use the 'blockwise' method")
        self.merged_name: str | None = None

    @property
    def combination(self) -> str:
        return self.options.combination

    def prepare(self, loras, base_weight, layers_per_block=2):
        if self.combination == "linear":
            self.merged_name = None
            return dict(loras)
        from .merging import merge_loras

        names = list(loras)
        rules = {n: layer_rule(self.ref(n).lbw, layers_per_block) for n in names}

        def weight(name: str, module: str) -> float:
            ref = self.ref(name)
            w = ref.text_weight if module.startswith("text_encoder") else ref.weight
            return w * rules[name](module)

        o = self.options
        merged = merge_loras([loras[n] for n in names], names, weight, o.combination, density=o.density,
                             majority_sign_method=o.majority_sign_method, rank=o.rank, seed=o.seed,
                             base_weight=base_weight)
        self.merged_name = f"{self.combination}({'+'.join(names)})"
        return {self.merged_name: merged}

    def ref(self, name):
        if name == self.merged_name:
            return LoRARef(name=name)
        return super().ref(name)


class Switch(Schedule):
    """LoRA Switch (Zhong et al. 2024): one LoRA at a time, the next every `tau` steps, cycling through `order`.

    The default order puts LoRAs of category ``character`` first, then the plan's order. The text encoders see
    the first LoRA of the order (as the reference implementation sets it before the run); ``text="all"`` or
    ``"none"`` change that. ``reference_timing=True`` reproduces the reference callback exactly: it switches after
    step ``k·tau`` (0-indexed), so the first LoRA runs ``tau + 1`` steps.
    """

    method = "switch"

    def __init__(self, loras, tau: int = 5, order: Sequence[str] | None = None, text: str = "first",
                 reference_timing: bool = False):
        super().__init__(loras)
        if int(tau) < 1:
            raise ValueError(f"switch interval tau={tau} must be >= 1")
        if text not in ("first", "all", "none"):
            raise ValueError(f"text={text!r}: use 'first', 'all' or 'none'")
        self.tau, self.text, self.reference_timing = int(tau), text, reference_timing
        if order is None:
            order = [r.name for r in self.refs if r.category == "character"]
            order += [r.name for r in self.refs if r.category != "character"]
        self.order = list(order)
        unknown = set(self.order) - set(self.names)
        if unknown or len(set(self.order)) != len(self.order):
            raise ValueError(f"switch order {self.order} must list distinct LoRAs of {self.names}")

    def active(self, step: int) -> str:
        """The LoRA acting at 0-indexed `step`."""
        k = max(step - 1, 0) // self.tau if self.reference_timing else step // self.tau
        return self.order[k % len(self.order)]

    def weights(self, step, n_steps):
        table = self.table(step, n_steps)
        mask = torch.tensor([n == self.active(step) for n in self.binding.names], dtype=torch.float32)
        return (table * mask[:, None])[None]

    def text_weights(self):
        self._check_bound()
        if self.text == "all":
            return self.text_table
        mask = torch.tensor([self.text == "first" and n == self.order[0] for n in self.binding.names],
                            dtype=torch.float32)
        return self.text_table * mask[:, None]


class Composite(Schedule):
    """LoRA Composite (Zhong et al. 2024): per step, one conditional pass per LoRA (that LoRA alone), averaged.

    With CFG the pipeline then gives ``uncond + g · mean_i(cond_i − uncond)``. `uncond` picks the unconditional
    pass: ``"base"`` (one shared pass without LoRAs, default), ``"merge"`` (one shared pass with all LoRAs) or
    ``"per_lora"`` (one per LoRA, averaged: the reference implementation, N more rows). All passes run batched
    in one UNet call. The text encoders see every LoRA (``text="all"``) or none.
    """

    method = "composite"

    def __init__(self, loras, uncond: str = "base", text: str = "all"):
        super().__init__(loras)
        if uncond not in ("base", "merge", "per_lora"):
            raise ValueError(f"uncond={uncond!r}: use 'base', 'merge' or 'per_lora'")
        if text not in ("all", "none"):
            raise ValueError(f"text={text!r}: use 'all' or 'none'")
        self.uncond, self.text = uncond, text

    def weights(self, step, n_steps):
        table = self.table(step, n_steps)
        n = table.shape[0]
        eye = torch.eye(n, dtype=table.dtype)
        per_lora = eye[:, :, None] * table[None]  # row i: LoRA i only
        first = table if self.uncond == "merge" else torch.zeros_like(table)
        return torch.cat([first[None], per_lora])

    def passes(self, step, n_steps, cfg):
        n = len(self.binding.names)
        cond = [Pass("cond", 1 + i) for i in range(n)]
        if not cfg:
            return cond
        if self.uncond == "per_lora":
            return [Pass("uncond", 1 + i) for i in range(n)] + cond
        return [Pass("uncond", 0)] + cond

    def text_weights(self):
        self._check_bound()
        return self.text_table if self.text == "all" else torch.zeros_like(self.text_table)


SCHEDULES = {"merge": Merge, "blockwise": BlockWise, "switch": Switch, "composite": Composite}

# methods in their own modules (they import this one, so they register after the classes above exist)
from .cmlora import CMLoRA  # noqa: E402
from .gated import Gated  # noqa: E402
from .klora import KLoRA  # noqa: E402

SCHEDULES.update({"cmlora": CMLoRA, "gated": Gated, "klora": KLoRA})


def build_schedule(plan: Plan) -> Schedule:
    """The schedule a plan describes: ``SCHEDULES[plan.method](plan.loras, **plan.params)``."""
    cls = SCHEDULES[plan.method]
    try:
        return cls(plan.loras, **plan.params)
    except TypeError as e:
        raise ValueError(f"bad parameters {plan.params} for method {plan.method!r}: {e}") from None
