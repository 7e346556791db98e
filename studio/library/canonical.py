"""The canonical LoRA: per target module its factors and scale, plus the base family and metadata.

Every reader produces a `LoRA`, every writer and consumer takes one. Module names are diffusers module paths
prefixed by the component, e.g. ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``.

Factor names per kind (shapes for a target weight of shape ``(out, in, *k)``; ``r`` the rank):

- ``lora`` (linear): ``down (r, in)``, ``up (out, r)``.
- ``locon`` (conv): ``down (r, in, *k)``, ``up (out, r, 1, 1)``; Tucker form ``down (r, in, 1, 1)``,
  ``mid (r, r, *k)``, ``up (out, r, 1, 1)``.
- ``loha``: ``w1a (out, r)``, ``w1b (r, in*prod(k))``, ``w2a``, ``w2b`` likewise; Tucker form
  ``t1/t2 (r, r, *k)``, ``w1a/w2a (r, out)``, ``w1b/w2b (r, in)``.
- ``lokr``: ``w1 (a, c)`` or ``w1a (a, r)`` @ ``w1b (r, c)``; ``w2 (b, d, *k)`` or ``w2a (b, r)`` @
  ``w2b (r, d, *k)``, or Tucker ``t2 (r, r, *k)``, ``w2a (r, b)``, ``w2b (r, d)``; ΔW = w1 ⊗ w2.

The scale is ``alpha / rank`` (kohya/LyCORIS); a missing or zero alpha means scale 1, and a LoKr with both
Kronecker factors stored in full has scale 1 whatever its alpha.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

import torch

KINDS = ("lora", "locon", "loha", "lokr")
FAMILIES = ("sd15", "sdxl", "tinyworld", "unknown")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

_FACTORS = {
    "lora": ({"down", "up"}, set()),
    "locon": ({"down", "up"}, {"mid"}),
    "loha": ({"w1a", "w1b", "w2a", "w2b"}, {"t1", "t2"}),
    "lokr": (set(), {"w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"}),
}


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def delta_shape(kind: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of ΔW implied by the factor shapes of one module; ValueError when they do not fit together."""
    return _delta_shape(kind, tuple(sorted((k, tuple(v)) for k, v in shapes.items())))


@functools.lru_cache(maxsize=1 << 14)   # pure; the same factor shapes recur in every module and file of a library
def _delta_shape(kind: str, items: tuple) -> tuple[int, ...]:
    _need(kind in _FACTORS, f"unknown adapter kind {kind!r}")
    required, optional = _FACTORS[kind]
    names = {k for k, _ in items}
    _need(required <= names, f"{kind} module lacks factor(s) {sorted(required - names)}")
    _need(names <= required | optional, f"{kind} module has unexpected factor(s) {sorted(names - required - optional)}")
    s = {k: tuple(int(d) for d in v) for k, v in items}
    _need(all(d > 0 for v in s.values() for d in v), "a factor has a zero-sized dimension")
    return {"lora": _lora_shape, "locon": _locon_shape, "loha": _loha_shape, "lokr": _lokr_shape}[kind](s)


def _lora_shape(s):
    down, up = s["down"], s["up"]
    _need(len(down) == 2 and len(up) == 2, f"linear LoRA factors must be 2-D, got down {down}, up {up}")
    _need(up[1] == down[0], f"rank mismatch: down {down}, up {up}")
    return (up[0], down[1])


def _locon_shape(s):
    down, up = s["down"], s["up"]
    _need(len(down) >= 3 and len(up) == len(down), f"conv LoRA factors must be N-D convs, got down {down}, up {up}")
    _need(all(d == 1 for d in up[2:]) and up[1] == down[0], f"conv LoRA up {up} does not fit down {down}")
    if "mid" not in s:
        return (up[0], down[1], *down[2:])
    mid = s["mid"]
    _need(all(d == 1 for d in down[2:]), f"Tucker LoCon down must be 1x1, got {down}")
    _need(len(mid) == len(down) and mid[0] == up[1] and mid[1] == down[0], f"LoCon mid {mid} does not fit {down}/{up}")
    return (up[0], down[1], *mid[2:])


def _loha_shape(s):
    tucker = {"t1", "t2"} & set(s)
    _need(len(tucker) in (0, 2), "LoHa needs both hada_t1 and hada_t2 or neither")
    if not tucker:
        shapes = []
        for a, b in (("w1a", "w1b"), ("w2a", "w2b")):
            wa, wb = s[a], s[b]
            _need(len(wa) == 2 and len(wb) >= 2 and wa[1] == wb[0], f"LoHa {a} {wa} does not fit {b} {wb}")
            shapes.append((wa[0], *wb[1:]))
        _need(shapes[0] == shapes[1], f"LoHa halves disagree: {shapes[0]} vs {shapes[1]}")
        return shapes[0]
    shapes = []
    for t, a, b in (("t1", "w1a", "w1b"), ("t2", "w2a", "w2b")):
        tt, wa, wb = s[t], s[a], s[b]
        _need(len(wa) == 2 and len(wb) == 2 and len(tt) >= 3, f"LoHa Tucker factors have wrong ranks: {tt} {wa} {wb}")
        _need(tt[0] == wa[0] and tt[1] == wb[0], f"LoHa {t} {tt} does not fit {a} {wa} / {b} {wb}")
        shapes.append((wa[1], wb[1], *tt[2:]))
    _need(shapes[0] == shapes[1], f"LoHa halves disagree: {shapes[0]} vs {shapes[1]}")
    return shapes[0]


def _lokr_shape(s):
    names = set(s)
    if "w1" in names:
        _need(not {"w1a", "w1b"} & names, "LoKr has both lokr_w1 and lokr_w1_a/b")
        w1 = s["w1"]
        _need(len(w1) == 2, f"LoKr w1 must be 2-D, got {w1}")
    else:
        _need({"w1a", "w1b"} <= names, "LoKr lacks lokr_w1 (or lokr_w1_a and lokr_w1_b)")
        a, b = s["w1a"], s["w1b"]
        _need(len(a) == 2 and len(b) == 2 and a[1] == b[0], f"LoKr w1a {a} does not fit w1b {b}")
        w1 = (a[0], b[1])
    if "w2" in names:
        _need(not {"w2a", "w2b", "t2"} & names, "LoKr has both lokr_w2 and lokr_w2_a/b")
        w2 = s["w2"]
        _need(len(w2) >= 2, f"LoKr w2 must be at least 2-D, got {w2}")
    else:
        _need({"w2a", "w2b"} <= names, "LoKr lacks lokr_w2 (or lokr_w2_a and lokr_w2_b)")
        a, b = s["w2a"], s["w2b"]
        if "t2" in names:
            t = s["t2"]
            _need(len(a) == 2 and len(b) == 2 and len(t) >= 3, f"LoKr Tucker factors have wrong ranks: {t} {a} {b}")
            _need(t[0] == a[0] and t[1] == b[0], f"LoKr t2 {t} does not fit w2a {a} / w2b {b}")
            w2 = (a[1], b[1], *t[2:])
        else:
            _need(len(a) == 2 and len(b) >= 2 and a[1] == b[0], f"LoKr w2a {a} does not fit w2b {b}")
            w2 = (a[0], *b[1:])
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def module_rank(kind: str, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The rank that divides alpha; None for a LoKr whose two factors are stored in full."""
    if kind in ("lora", "locon"):
        return int(shapes["down"][0])
    if kind == "loha":
        return int(shapes["w1b"][0])
    for name in ("w1b", "w2b"):
        if name in shapes:
            return int(shapes[name][0])
    return None


@dataclass(eq=False)
class ModuleLoRA:
    """One adapted module: its kind, factor tensors, alpha and optional DoRA magnitude.

    `dora_scale` keeps the file's layout; its axis follows from its shape: ``(out, 1, ...)`` (or ``(out,)``)
    normalises each output row, ``(1, in, ...)`` each input column (LyCORIS' default).
    """

    kind: str
    factors: dict[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    def __post_init__(self):
        for name, t in self.factors.items():
            is_float = isinstance(t, torch.Tensor) and t.is_floating_point()
            _need(is_float, f"factor {name} is not a floating-point tensor")
        shape = self.shape  # validates the factor shapes
        if self.dora_scale is not None:
            d = self.dora_scale
            _need(isinstance(d, torch.Tensor) and d.is_floating_point(), "dora_scale is not a floating-point tensor")
            n = d.numel()
            fits = n == shape[0] or (n > 0 and shape[1] % n == 0)  # a flattened LoHa conv has in*k*k columns
            _need(fits, f"dora_scale {tuple(d.shape)} fits neither side of ΔW {shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ΔW as the factors define it (a flattened LoHa conv gives ``(out, in*k*k)``)."""
        return delta_shape(self.kind, {k: tuple(v.shape) for k, v in self.factors.items()})

    @property
    def rank(self) -> int | None:
        return module_rank(self.kind, {k: tuple(v.shape) for k, v in self.factors.items()})

    @property
    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if self.alpha and rank else 1.0

    @property
    def dora_on_output(self) -> bool:
        """Whether the DoRA magnitude normalises output rows (PEFT) rather than input columns (LyCORIS)."""
        d = self.dora_scale
        return d is not None and d.numel() == self.shape[0] and (d.dim() == 1 or d.shape[0] == self.shape[0])

    def lowrank_delta(self) -> torch.Tensor:
        """``scale * product of the factors`` in float32: ΔW without the DoRA renormalisation."""
        f = {k: v.float() for k, v in self.factors.items()}
        if self.kind in ("lora", "locon"):
            up, down = f["up"].flatten(1), f["down"].flatten(1)
            if "mid" in f:
                delta = torch.einsum("i j ..., p i, j r -> p r ...", f["mid"], up, down)
            else:
                delta = up @ down
        elif self.kind == "loha":
            if "t1" in f:
                h1 = torch.einsum("i j ..., j r, i p -> p r ...", f["t1"], f["w1b"], f["w1a"])
                h2 = torch.einsum("i j ..., j r, i p -> p r ...", f["t2"], f["w2b"], f["w2a"])
            else:
                h1 = f["w1a"] @ f["w1b"].flatten(1)
                h2 = f["w2a"] @ f["w2b"].flatten(1)
            delta = h1 * h2
        else:
            w1 = f["w1"] if "w1" in f else f["w1a"] @ f["w1b"]
            if "w2" in f:
                w2 = f["w2"]
            elif "t2" in f:
                w2 = torch.einsum("i j ..., i p, j r -> p r ...", f["t2"], f["w2a"], f["w2b"])
            else:
                w2b = f["w2b"]
                w2 = (f["w2a"] @ w2b.flatten(1)).reshape(-1, *w2b.shape[1:])
            w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
            delta = torch.kron(w1.contiguous(), w2.contiguous())
        return delta.reshape(self.shape) * self.scale

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ΔW (float32) so that the adapted weight is ``W + ΔW``.

        Given `base_weight`, ΔW takes its shape; a DoRA module needs it, since its magnitude rescales
        ``W + lowrank_delta`` per output row or input column.
        """
        delta = self.lowrank_delta()
        if base_weight is not None:
            delta = delta.reshape(base_weight.shape)
        if self.dora_scale is None:
            return delta
        if base_weight is None:
            raise ValueError("a DoRA module needs base_weight to compute its ΔW")
        w = base_weight.float()
        v = w + delta
        if self.dora_on_output:
            norm = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
        else:
            norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (v.dim() - 2))
        return self.dora_scale.float().reshape(norm.shape) * v / norm - w


@dataclass(eq=False)
class LoRA:
    """A LoRA file in memory: modules keyed by ``component.module.path``, the base family and metadata."""

    modules: dict[str, ModuleLoRA]
    family: str = "unknown"
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "unknown"

    def components(self) -> dict[str, int]:
        """Number of adapted modules per component, e.g. ``{"unet": 64, "text_encoder": 24}``."""
        return dict(Counter(name.split(".", 1)[0] for name in self.modules))

    def kinds(self) -> list[str]:
        return sorted({m.kind for m in self.modules.values()})

    def ranks(self) -> list[int]:
        return sorted({r for m in self.modules.values() if (r := m.rank) is not None})

    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules.values() if m.alpha is not None})

    @property
    def has_dora(self) -> bool:
        return any(m.dora_scale is not None for m in self.modules.values())


def _canonical_name(component: str, model: torch.nn.Module, name: str) -> str:
    """Module name as LoRA files spell it: CLIP paths keep ``text_model.``, which transformers 5 dropped."""
    if component.startswith("text_encoder") and not hasattr(model, "text_model") and hasattr(model, "encoder"):
        return f"{component}.text_model.{name}"
    return f"{component}.{name}"


def module_shapes(components: Mapping[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Weight shapes of the Linear/Conv modules of a base model, keyed like `LoRA.modules`.

    ``module_shapes({"unet": pipe.unet, "text_encoder": pipe.text_encoder})`` gives the map that
    `read_lora(..., base_shapes=...)` checks a file against.
    """
    shapes = {}
    for component, model in components.items():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                shapes[_canonical_name(component, model, name)] = tuple(module.weight.shape)
    return shapes


def resolve_module(components: Mapping[str, torch.nn.Module], name: str) -> torch.nn.Module:
    """The module a canonical name denotes, e.g. ``resolve_module({"unet": unet}, "unet.conv_in")``.

    Canonical text-encoder names keep ``text_model.``; a transformers 5 ``CLIPTextModel`` has no such level,
    so it is skipped there (as diffusers does when loading LoRAs).
    """
    component, path = name.split(".", 1)
    model = components[component]
    if path.startswith("text_model.") and not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")
    return model.get_submodule(path)
