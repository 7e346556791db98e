"""K-LoRA (Ouyang et al., CVPR 2025: "K-LoRA: Unlocking training-free fusion of any subject and style LoRAs"),
generalised from one content + one style LoRA to N LoRAs.

Per adapted layer, each LoRA's importance is the sum of the top-K absolute elements of its ΔW (K = `k`, 64 in
the reference). Each sum is divided by that LoRA's mean top-K sum over its layers (the reference divides the
content sum by the ratio of the two LoRAs' averages, which compares the same two quantities). Style LoRAs'
sums are then multiplied by a step-dependent factor ``alpha · progress + beta`` (0.5 → 2.0 over the run with the
reference's alpha = 1.5, beta = 0.5), so content LoRAs win early (layout, identity) and style LoRAs late
(texture). Every other LoRA (character, clothing, object, background, unknown) is content. At each step each
layer runs the ONE LoRA with the largest scaled score (the argmax, at its plan weight × block weight); layers
only one LoRA adapts keep it. The selection is per layer and per step, so the weights are one row ``[1, N, L]``
and every sample of a call shares them (the runtime folds them into the base weights).

`bind` computes the top-K sums from each LoRA's factors (``binding.loras[name].modules[layer]``); the choice per
step is then a table lookup.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .schedules import Schedule

STYLE_CATEGORIES = ("style",)


def topk_sum(delta: torch.Tensor, k: int) -> float:
    """Sum of the `k` largest absolute elements of a ΔW (all of them if it has fewer)."""
    flat = delta.detach().abs().flatten().float()
    return float(torch.topk(flat, min(int(k), flat.numel())).values.sum())


class KLoRA(Schedule):
    """Per layer and step, the LoRA with the largest (normalised, time-scaled) top-K |ΔW| sum.

    - `k`: how many elements of |ΔW| each layer's sum takes (reference: 64).
    - `alpha`, `beta`: the style factor ``alpha · step / n_steps + beta``.
    - `style`: names of the style LoRAs; default: the LoRAs whose `LoRARef.category` is ``style``.
    - `normalise`: divide each LoRA's sums by its mean over its layers (False: raw sums).
    """

    method = "klora"

    def __init__(self, loras, k: int = 64, alpha: float = 1.5, beta: float = 0.5,
                 style: Sequence[str] | None = None, normalise: bool = True):
        super().__init__(loras)
        if int(k) < 1:
            raise ValueError(f"k={k} must be >= 1")
        self.k, self.alpha, self.beta, self.normalise = int(k), float(alpha), float(beta), bool(normalise)
        if style is None:
            style = [r.name for r in self.refs if (r.category or "") in STYLE_CATEGORIES]
        unknown = set(style) - set(self.names)
        if unknown:
            raise ValueError(f"style LoRAs {sorted(unknown)} are not among {self.names}")
        self.style = list(style)

    def bind(self, binding):
        super().bind(binding)
        layers = binding.unet_layers
        n = len(binding.names)
        sums = torch.zeros(n, len(layers))
        for i, name in enumerate(binding.names):
            modules = binding.loras[name].modules
            for j, layer in enumerate(layers):
                m = modules.get(layer)
                if m is not None:
                    delta = m.delta_weight() if m.dora_scale is None else m.lowrank_delta()  # DoRA: its low-rank part
                    sums[i, j] = topk_sum(delta, self.k)
        self.topk = sums  # [N, L] raw top-K sums
        if self.normalise:
            present = sums > 0
            mean = (sums.sum(1) / present.sum(1).clamp(min=1)).clamp(min=1e-12)
            self.importance = sums / mean[:, None]
        else:
            self.importance = sums.clone()
        self.is_style = torch.tensor([name in self.style for name in binding.names], dtype=torch.bool)

    def style_scale(self, step: int, n_steps: int) -> float:
        return self.alpha * step / max(n_steps, 1) + self.beta

    def scores(self, step: int, n_steps: int) -> torch.Tensor:
        """``[N, L]``: the scaled importance compared per layer at `step` (gated LoRAs score 0)."""
        self._check_bound()
        factor = torch.where(self.is_style, torch.tensor(self.style_scale(step, n_steps)), torch.tensor(1.0))
        return self.importance * factor[:, None] * self.gate(step, n_steps)[:, None]

    def choice(self, step: int, n_steps: int) -> torch.Tensor:
        """``[L]``: the index of the LoRA each layer runs at `step` (-1 where no LoRA scores above 0)."""
        s = self.scores(step, n_steps)
        best = s.argmax(0)
        return torch.where(s.amax(0) > 0, best, torch.full_like(best, -1))

    def weights(self, step, n_steps):
        choice = self.choice(step, n_steps)
        n = self.unet_table.shape[0]
        mask = (choice[None, :] == torch.arange(n)[:, None]).to(self.unet_table.dtype)
        return (self.unet_table * mask)[None]

    def describe(self):
        return f"KLoRA({', '.join(f'{r.name}:{r.weight:g}' for r in self.refs)}; k={self.k}, style={self.style})"
