"""One small wrapper per adapted module (like PEFT's tuner layers): base output + the active LoRAs' outputs.

`AdaptedLayer` wraps an ``nn.Linear`` or ``nn.Conv2d`` and holds its active LoRAs in two forms:

- fast (plain LoRA / LoCon): every LoRA's down factor concatenated into one ``(Σr, in[, kh, kw])`` and up
  factor into one ``(out, Σr)`` with each LoRA's ``alpha/rank`` folded in, so N LoRAs cost two matmuls (convs);
- dense (LoHa, LoKr, Tucker LoCon, DoRA): each LoRA's ΔW, scaled by its weight.

A layer is in one of three modes, which the runtime sets before each forward of its model:
``off`` (base only), ``lowrank`` (base + LoRA outputs) or ``patched`` (the current weights folded into the base
weight, ``W = W0 + Σ w_i ΔW_i``: one dense layer, no extra op). The original weight ``W0`` is kept, so restoring
is a copy: bit-exact. A ``lowrank`` layer runs one of three plans:

- ``shared``: every sample has the same weights; they are folded into the factors once (``up · diag(w)``, and
  the dense ΔWs summed), so the forward is ``y += (x · downᵀ) · up_wᵀ`` (an in-place ``addmm`` without grad),
  over the contiguous range of ranks whose weights are non-zero (Switch's one LoRA, a top-K subset);
- ``segments`` (no grad): consecutive samples share weights (CFG halves, Composite's passes); each segment runs
  only the ranks of its non-zero LoRAs on its own rows, with its weights folded into ``up``;
- ``per_sample``: a ``[batch, Σr]`` scale on the rank axis (each LoRA's weight repeated over its ranks), so the
  whole batch runs in one call with different weights per sample; differentiable in the weights (gate training).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OFF, LOWRANK, PATCHED = "off", "lowrank", "patched"
SHARED, SEGMENTS, PER_SAMPLE = "shared", "segments", "per_sample"
ADAPTABLE = (nn.Linear, nn.Conv2d)


class AdaptedLayer(nn.Module):
    """A Linear or Conv2d plus its active LoRAs; attributes it lacks are read from the wrapped module."""

    # Cost model (CPU-ish units: one multiply-add = 1): one small op's dispatch, and one float read or written.
    OP_COST = 100_000
    MEM_COST = 4

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
        self.tokens: int | None = None  # rows (tokens / conv output positions) of the last forward, all samples
        self.batch: int | None = None  # samples of the last forward
        self._reset_plan()

    def _reset_plan(self) -> None:
        state = self.__dict__
        state["plan"] = None
        state["up_w"] = None  # shared: [out, k1 - k0], the weights folded in
        state["shared_k"] = None  # shared: the rank range (k0, k1) that runs
        state["dense_w"] = None  # shared: Σ w_i ΔW_i
        state["segments"] = []  # segments: [(b0, b1, k0, k1, up[:, k0:k1] · w)]
        state["s_fast"] = None  # per_sample: [batch or 1, Σr]
        state["s_dense"] = None  # per_sample / segments: [batch or 1, n_dense]
        state["seg_batch"] = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        state = self.__dict__
        for key in ("down", "up", "dense", "original", "up_w", "dense_w", "s_fast", "s_dense"):
            t = state.get(key)
            if t is not None:
                state[key] = fn(t)
        state["segments"] = [(b0, b1, k0, k1, fn(u)) for b0, b1, k0, k1, u in state.get("segments", [])]
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
        self._reset_plan()

    def clear(self) -> None:
        self.restore()
        self.fast_ids, self.fast_ranks, self.dense_ids = [], [], []
        self.down = self.up = self.dense = None
        self.mode = OFF
        self._reset_plan()

    @property
    def has_loras(self) -> bool:
        return self.down is not None or self.dense is not None

    # ---------------------------------------------------------------- plans (set by the runtime)

    def set_off(self) -> None:
        self._reset_plan()
        self.__dict__["mode"] = OFF

    def _ranks(self, ranks: tuple[int, int] | None) -> tuple[int, int]:
        return (0, self.down.shape[0]) if ranks is None else (int(ranks[0]), int(ranks[1]))

    def set_shared(self, w_fast: torch.Tensor | None, w_dense: torch.Tensor | None,
                   ranks: tuple[int, int] | None = None) -> None:
        """Every sample has these weights (per rank for fast LoRAs, per LoRA for dense ones; None: all 0).

        `ranks`: ``(k0, k1)``, the fast ranks that run (the weights outside are 0; default: all)."""
        self._reset_plan()
        state = self.__dict__
        if w_fast is not None and self.down is not None:
            k0, k1 = self._ranks(ranks)
            state["up_w"] = self.up[:, k0:k1] * w_fast[k0:k1].to(self.up.dtype)
            state["shared_k"] = (k0, k1)
        if w_dense is not None and self.dense is not None:
            state["dense_w"] = torch.tensordot(w_dense.to(self.dense.dtype), self.dense, dims=1)
        state["plan"] = SHARED
        state["mode"] = LOWRANK if state["up_w"] is not None or state["dense_w"] is not None else OFF

    def set_segments(self, segments: list[tuple[int, int, int, int, torch.Tensor]],
                     s_dense: torch.Tensor | None, batch: int) -> None:
        """Rows ``b0:b1`` (of `batch`) run ranks ``k0:k1`` with weights ``w [k1 - k0]`` folded into ``up``; dense
        LoRAs per sample (``s_dense [batch, n_dense]``)."""
        self._reset_plan()
        state = self.__dict__
        state["seg_batch"] = batch
        state["segments"] = [(b0, b1, k0, k1, self.up[:, k0:k1] * w.to(self.up.dtype)) for b0, b1, k0, k1, w in segments]
        state["s_dense"] = s_dense if self.dense is not None else None
        state["plan"] = SEGMENTS
        state["mode"] = LOWRANK if segments or state["s_dense"] is not None else OFF

    def set_per_sample(self, s_fast: torch.Tensor | None, s_dense: torch.Tensor | None) -> None:
        """Per-sample scales ``[batch or 1, Σr]`` / ``[batch or 1, n_dense]`` (None: all 0)."""
        self._reset_plan()
        state = self.__dict__
        state["s_fast"] = s_fast if self.down is not None else None
        state["s_dense"] = s_dense if self.dense is not None else None
        state["plan"] = PER_SAMPLE
        state["mode"] = LOWRANK if state["s_fast"] is not None or state["s_dense"] is not None else OFF

    # ---------------------------------------------------------------- forward

    def forward(self, x, *args, **kwargs):
        base = self._base
        if args or kwargs or base._forward_pre_hooks or base._forward_hooks or "forward" in base.__dict__:
            y = base(x, *args, **kwargs)  # hooked (e.g. offloading) or unusual call: through the module
        elif self.is_conv:
            y = base._conv_forward(x, base.weight, base.bias)
        else:
            y = F.linear(x, base.weight, base.bias)
        state = self.__dict__
        # rows the layer processes (tokens, or output positions of a conv), for the runtime's cost model
        state["tokens"] = y.numel() // y.shape[1] if self.is_conv else x.numel() // x.shape[-1]
        state["batch"] = x.shape[0]  # a 2-D Linear input is [batch, features]: one row per sample
        if state["mode"] != LOWRANK:
            return y
        inplace = not torch.is_grad_enabled() and y.is_contiguous()
        plan = state["plan"]
        if plan == SHARED:
            if state["up_w"] is not None:
                k0, k1 = state["shared_k"]
                down = self.down if k0 == 0 and k1 == self.down.shape[0] else self.down[k0:k1]
                y = self._accumulate(y, self._op(x, down), state["up_w"], inplace)
            if state["dense_w"] is not None:
                d = self._op(x, state["dense_w"])
                y = y.add_(d) if inplace else y + d
            return y
        if plan == SEGMENTS:
            self._check_batch(x.shape[0], state["seg_batch"])
            if not inplace:
                y = y.clone(memory_format=torch.contiguous_format)
            for b0, b1, k0, k1, up in state["segments"]:
                self._accumulate(y[b0:b1], self._op(x[b0:b1], self.down[k0:k1]), up, True)
            if state["s_dense"] is not None:
                y.add_(self._dense_output(x))
            return y
        out = self.lora_output(x)
        return y.add_(out) if inplace else y + out

    def _accumulate(self, y: torch.Tensor, h: torch.Tensor, up: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``y + up-projection of h`` (in place, as one fused matmul-add, when allowed)."""
        if self.is_conv:
            if inplace and h.is_contiguous():
                b, r = h.shape[0], h.shape[1]
                y.view(b, y.shape[1], -1).baddbmm_(up.expand(b, -1, -1), h.view(b, r, -1))
                return y
            d = F.conv2d(h, up[:, :, None, None])
        else:
            if inplace:
                y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t())
                return y
            d = F.linear(h, up)
        return y.add_(d) if inplace else y + d

    def _check_batch(self, batch: int, expected: int) -> None:
        if batch != expected:
            raise RuntimeError(f"{self.name}: the runtime prepared weights for a batch of {expected}, but the "
                               f"layer sees a batch of {batch}")

    def lowrank_cost(self, rank: int | None = None) -> tuple[float, float] | None:
        """Estimated cost of ``(re-folding the weights once, one low-rank forward)``; None if unknown.

        Multiply-adds, plus `MEM_COST` per float read or written (folding reads W0 and writes W; the low-rank
        path re-reads the input and updates the output), plus `OP_COST` per op (folding 2, low-rank 3).
        `rank`: the ranks that run (default: all).
        """
        tokens = self.__dict__.get("tokens")
        if tokens is None or self.down is None or self.dense is not None:
            return None
        w = self.base.weight
        r = self.down.shape[0] if rank is None else rank
        out, inp = w.shape[0], w[0].numel()
        fold = out * inp * (r + 2 * self.MEM_COST) + 2 * self.OP_COST
        lowrank = tokens * ((inp + out) * r + (inp + 2 * out) * self.MEM_COST) + 3 * self.OP_COST
        return fold, lowrank

    def lowrank_cheaper(self, ranks: tuple[int, int] | None = None) -> bool:
        """Whether one low-rank forward (of ranks ``k0:k1``, default all) costs less than re-folding them."""
        cost = self.lowrank_cost(None if ranks is None else ranks[1] - ranks[0])
        return cost is not None and cost[1] < cost[0]

    def segments_cheaper(self, rows_ranks: list[tuple[int, int]], batch: int) -> bool:
        """Whether per-segment low-rank products (``(rows, ranks)`` per active segment) beat one batched product of
        all ranks over `batch` rows with per-sample scales."""
        w = self.base.weight
        out, inp = w.shape[0], w[0].numel()
        r_all = self.down.shape[0]
        tokens, seen = self.__dict__.get("tokens"), self.__dict__.get("batch")
        per_sample = tokens / seen if tokens and seen else 1e9  # unknown: compare the arithmetic only
        batched = per_sample * batch * ((inp + out) * r_all + (inp + 2 * out + 2 * r_all) * self.MEM_COST)
        seg = sum(per_sample * n * ((inp + out) * r + (inp + 2 * out) * self.MEM_COST) for n, r in rows_ranks)
        return seg + 4 * len(rows_ranks) * self.OP_COST < batched + 4 * self.OP_COST

    def _per_sample(self, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Reshape a ``[batch or 1, k]`` scale to broadcast against an activation with k channels."""
        if s.shape[0] != 1:
            self._check_batch(h.shape[0], s.shape[0])
        if self.is_conv:
            return s.reshape(s.shape[0], s.shape[1], *[1] * (h.dim() - 2))
        return s.reshape(s.shape[0], *[1] * (h.dim() - 2), s.shape[1]) if s.shape[0] != 1 else s[0]

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base op (without bias) with another weight."""
        if self.is_conv:
            b = self.base
            return F.conv2d(x, weight, None, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, weight)

    def _dense_output(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s_dense.to(self.dense.dtype)
        if s.shape[0] == 1:
            return self._op(x, torch.tensordot(s[0], self.dense, dims=1))
        d = None
        for i in range(self.dense.shape[0]):
            term = self._op(x, self.dense[i])
            self._check_batch(term.shape[0], s.shape[0])
            term = term * s[:, i].reshape((-1,) + (1,) * (term.dim() - 1))
            d = term if d is None else d + term
        return d

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRAs' output on the per-sample plan (the reference path: per-sample scales on the rank axis)."""
        out = None
        if self.s_fast is not None:
            h = self._op(x, self.down)
            h = h * self._per_sample(self.s_fast.to(h.dtype), h)
            out = F.conv2d(h, self.up[:, :, None, None]) if self.is_conv else F.linear(h, self.up)
        if self.s_dense is not None:
            d = self._dense_output(x)
            out = d if out is None else out + d
        return out

    # ---------------------------------------------------------------- patching

    def patch(self, w_fast: torch.Tensor | None, w_dense: torch.Tensor | None,
              ranks: tuple[int, int] | None = None) -> None:
        """Fold the weights (per rank for fast LoRAs, per LoRA for dense ones; None: all 0) into the base weight.

        `ranks`: ``(k0, k1)``, the fast ranks to fold (the weights outside are 0; default: all)."""
        weight = self.base.weight
        if self.original is None:
            self.original = weight.detach().clone()
        # everything below writes through .data and uses factors that need no grad: no autograd graph
        flat = (weight.shape[0], -1)
        self._reset_plan()
        if self.down is not None and w_fast is not None:
            k0, k1 = self._ranks(ranks)
            scaled = self.up[:, k0:k1] * w_fast[k0:k1].detach().to(device=self.up.device, dtype=self.up.dtype)
            down = self.down[k0:k1].reshape(k1 - k0, -1)
            if weight.dtype == torch.float32:
                torch.addmm(self.original.view(flat), scaled, down, out=weight.data.view(flat))
            else:  # half precision: sum in float32, round once
                delta = scaled.float() @ down.float()
                weight.data.copy_((self.original.float().view(flat) + delta).view(weight.shape))
        else:
            weight.data.copy_(self.original)
        if self.dense is not None and w_dense is not None:
            w = w_dense.detach().to(device=self.dense.device, dtype=torch.float32)
            delta = torch.tensordot(w, self.dense.float(), dims=1)
            weight.data.copy_((weight.data.float() + delta).to(weight.dtype))
        state = self.__dict__  # plain attributes: skip nn.Module.__setattr__ on this hot path
        state["patched"] = True
        state["mode"] = PATCHED

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
        return (f"{self.name}, fast={len(self.fast_ids)} (Σr={sum(self.fast_ranks)}), dense={len(self.dense_ids)}, "
                f"mode={self.mode}, plan={self.plan}")
