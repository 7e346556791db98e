"""One small wrapper per adapted module (like PEFT's tuner layers): base output + the active LoRAs' outputs.

`AdaptedLayer` wraps an ``nn.Linear`` or ``nn.Conv2d`` and holds its active LoRAs in two forms:

- fast (plain LoRA / LoCon): every LoRA's down factor concatenated into one ``(Σr, in[, kh, kw])`` and up
  factor into one ``(out, Σr)`` with each LoRA's ``alpha/rank`` folded in, so N LoRAs cost two matmuls (convs);
  the per-sample weights are a ``[batch, Σr]`` scale on the rank axis (each LoRA's weight repeated over its ranks),
  so CFG branches and Composite's per-LoRA passes carry different weights in one batched call;
- dense (LoHa, LoKr, Tucker LoCon, DoRA): each LoRA's ΔW, scaled by its per-sample weight.

A layer is in one of three modes, which the runtime sets before each forward of its model:
``off`` (base only), ``lowrank`` (base + LoRA outputs) or ``patched`` (the current weights folded into the base
weight, ``W = W0 + Σ w_i ΔW_i``, used when every sample shares the weights: one dense layer, no extra op). The
original weight ``W0`` is kept, so restoring is a copy: bit-exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OFF, LOWRANK, PATCHED = "off", "lowrank", "patched"
ADAPTABLE = (nn.Linear, nn.Conv2d)


class AdaptedLayer(nn.Module):
    """A Linear or Conv2d plus its active LoRAs; attributes it lacks are read from the wrapped module."""

    OP_COST = 100_000  # multiply-adds that one small op's dispatch costs (CPU); for `lowrank_cost`

    def __init__(self, base: nn.Module, name: str):
        super().__init__()
        if not isinstance(base, ADAPTABLE):
            raise TypeError(f"{name}: cannot adapt a {type(base).__name__}; only Linear and Conv2d")
        self.base = base
        self.__dict__["_base"] = base  # the same module, read without nn.Module.__getattr__ on the hot path
        self.name = name
        self.is_conv = isinstance(base, nn.Conv2d)
        self.mode = OFF
        self.fast_ids: list[int] = []  # LoRA index (in the binding) of each fast LoRA
        self.fast_ranks: list[int] = []
        self.dense_ids: list[int] = []
        # plain attributes (fast to read in forward); `_apply` below moves/casts them with the module
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None  # [n_dense, *weight.shape]
        self.original: torch.Tensor | None = None  # the weight before any patch
        self.patched = False
        self.s_fast: torch.Tensor | None = None  # [batch or 1, Σr]
        self.s_dense: torch.Tensor | None = None  # [batch or 1, n_dense]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for key in ("down", "up", "dense", "original"):
            t = self.__dict__.get(key)
            if t is not None:
                self.__dict__[key] = fn(t)
        return self

    # ---------------------------------------------------------------- setup

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def fast_compatible(self) -> bool:
        """Whether factor products can run as convs with this conv's geometry (always true for Linear)."""
        b = self.base
        return not self.is_conv or (b.groups == 1 and b.padding_mode == "zeros")

    def set_loras(self, fast: list[tuple[int, torch.Tensor, torch.Tensor]],
                  dense: list[tuple[int, torch.Tensor]]) -> None:
        """Install the active LoRAs: fast ``(index, down (r, in[, k, k]), up (out, r) incl. scale)``, dense ``(index, ΔW)``."""
        self.restore()
        w = self.base.weight
        kw = dict(device=w.device, dtype=w.dtype)
        self.fast_ids = [i for i, _, _ in fast]
        self.fast_ranks = [int(d.shape[0]) for _, d, _ in fast]
        if fast:
            down = torch.cat([d.detach().reshape(d.shape[0], *w.shape[1:]) for _, d, _ in fast]).to(**kw)
            up = torch.cat([u.detach().reshape(w.shape[0], -1) for _, _, u in fast], dim=1).to(**kw)
            self.down = down.contiguous()
            self.up = up.contiguous()
        else:
            self.down = self.up = None
        self.dense_ids = [i for i, _ in dense]
        self.dense = torch.stack([d.detach().reshape(w.shape) for _, d in dense]).to(**kw) if dense else None
        self.mode = OFF
        self.s_fast = self.s_dense = None

    def clear(self) -> None:
        self.restore()
        self.fast_ids, self.fast_ranks, self.dense_ids = [], [], []
        self.down = self.up = self.dense = None
        self.mode = OFF
        self.s_fast = self.s_dense = None

    @property
    def has_loras(self) -> bool:
        return self.down is not None or self.dense is not None

    # ---------------------------------------------------------------- forward

    def forward(self, x, *args, **kwargs):
        base = self._base
        if args or kwargs or base._forward_pre_hooks or base._forward_hooks or "forward" in base.__dict__:
            y = base(x, *args, **kwargs)  # hooked (e.g. offloading) or unusual call: through the module
        elif self.is_conv:
            y = base._conv_forward(x, base.weight, base.bias)
        else:
            y = F.linear(x, base.weight, base.bias)
        # rows the layer processes (tokens, or output positions of a conv), for the runtime's cost model
        self.__dict__["tokens"] = x.numel() // x.shape[1] if self.is_conv else x.numel() // x.shape[-1]
        if self.mode != LOWRANK:
            return y
        return y + self.lora_output(x)

    def lowrank_cost(self) -> tuple[float, float] | None:
        """Estimated multiply-adds of ``(re-folding the weights once, one low-rank forward)``; None if unknown.

        Each small op also costs `OP_COST` (dispatch overhead): folding is 2 ops, the low-rank path 4.
        """
        tokens = self.__dict__.get("tokens")
        if tokens is None or self.down is None or self.dense is not None:
            return None
        w = self.base.weight
        r, out, inp = self.down.shape[0], w.shape[0], w[0].numel()
        return out * inp * r + 2 * self.OP_COST, tokens * (inp + out) * r + 4 * self.OP_COST

    def lowrank_cheaper(self) -> bool:
        cost = self.lowrank_cost()
        return cost is not None and cost[1] < cost[0]

    def _per_sample(self, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Reshape a ``[batch or 1, k]`` scale to broadcast against an activation with k channels."""
        if s.shape[0] != 1 and s.shape[0] != h.shape[0]:
            raise RuntimeError(f"{self.name}: the runtime prepared weights for a batch of {s.shape[0]}, but the "
                               f"layer sees a batch of {h.shape[0]}")
        if self.is_conv:
            return s.reshape(s.shape[0], s.shape[1], *[1] * (h.dim() - 2))
        return s.reshape(s.shape[0], *[1] * (h.dim() - 2), s.shape[1]) if s.shape[0] != 1 else s[0]

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base op (without bias) with another weight."""
        if self.is_conv:
            b = self.base
            return F.conv2d(x, weight, None, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, weight)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if self.down is not None:
            h = self._op(x, self.down)
            h = h * self._per_sample(self.s_fast.to(h.dtype), h)
            out = F.conv2d(h, self.up[:, :, None, None]) if self.is_conv else F.linear(h, self.up)
        if self.dense is not None:
            s = self.s_dense.to(self.dense.dtype)
            if s.shape[0] == 1:
                combined = torch.tensordot(s[0], self.dense, dims=1)
                d = self._op(x, combined)
            else:
                d = None
                for i in range(self.dense.shape[0]):
                    term = self._op(x, self.dense[i])
                    if s.shape[0] != term.shape[0]:
                        raise RuntimeError(f"{self.name}: the runtime prepared weights for a batch of {s.shape[0]}, "
                                           f"but the layer sees a batch of {term.shape[0]}")
                    term = term * s[:, i].reshape((-1,) + (1,) * (term.dim() - 1))
                    d = term if d is None else d + term
            out = d if out is None else out + d
        return out

    # ---------------------------------------------------------------- patching

    def patch(self, w_fast: torch.Tensor | None, w_dense: torch.Tensor | None) -> None:
        """Fold the weights (per rank for fast LoRAs, per LoRA for dense ones) into the base weight."""
        weight = self.base.weight
        if self.original is None:
            self.original = weight.detach().clone()
        # everything below writes through .data and uses factors that need no grad: no autograd graph
        flat = (weight.shape[0], -1)
        if self.down is not None and w_fast is not None and bool(w_fast.any()):
            scaled = self.up * w_fast.to(device=self.up.device, dtype=self.up.dtype)
            if weight.dtype == torch.float32:
                torch.addmm(self.original.view(flat), scaled, self.down.view(self.down.shape[0], -1),
                            out=weight.data.view(flat))
            else:  # half precision: sum in float32, round once
                delta = scaled.float() @ self.down.view(self.down.shape[0], -1).float()
                weight.data.copy_((self.original.float().view(flat) + delta).view(weight.shape))
        else:
            weight.data.copy_(self.original)
        if self.dense is not None and w_dense is not None and bool(w_dense.any()):
            w = w_dense.to(device=self.dense.device, dtype=torch.float32)
            delta = torch.tensordot(w, self.dense.float(), dims=1)
            weight.data.copy_((weight.data.float() + delta).to(weight.dtype))
        self.__dict__["patched"] = True  # plain attribute: skip nn.Module.__setattr__ on this hot path

    def restore(self) -> None:
        """Put the original weight back (bit-exact) if the layer is patched."""
        if self.patched:
            self.base.weight.data.copy_(self.original)
            self.__dict__["patched"] = False

    def release(self) -> None:
        """Restore and forget the saved original weight."""
        self.restore()
        self.original = None

    def extra_repr(self) -> str:
        return f"{self.name}, fast={len(self.fast_ids)} (Σr={sum(self.fast_ranks)}), dense={len(self.dense_ids)}, mode={self.mode}"
