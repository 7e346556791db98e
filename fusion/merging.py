"""Merge several LoRAs into one canonical `LoRA`, PEFT-style (`add_weighted_adapter`'s combination types).

- ``cat``: the factors concatenated along the rank axis, each LoRA's ``weight · alpha/rank`` folded into its up
  factor: exactly the weighted sum of the ΔWs, at rank Σr.
- ``svd``: the weighted sum of the dense ΔWs, truncated to `rank` (default: the largest input rank) by SVD.
- ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune``: PEFT's merge on the factors, down (A) and up
  (B) separately, with weights ``±sqrt(|w·scale|)`` on A and ``sqrt(|w·scale|)`` on B (needs equal ranks).
- ``*_svd``: the same merge on the dense ΔWs, then SVD to `rank`.

The merge functions are `peft.utils.merge_utils`; DARE's random drop uses `seed`. A weight is given per
(LoRA, module), so block weights merge too. Plain weighted sums (``linear``) need no merge: the runtime runs them.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from studio.library.canonical import LoRA, ModuleLoRA

FACTOR_COMBINATIONS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE_COMBINATIONS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def _is_fast(m: ModuleLoRA) -> bool:
    return m.kind in ("lora", "locon") and "mid" not in m.factors and m.dora_scale is None


def _merge_fn(combination: str, density, majority_sign_method):
    from peft.utils import merge_utils as mu

    base = combination.removesuffix("_svd")
    if base in ("svd", "linear"):
        return lambda tensors, weights: mu.task_arithmetic(tensors, weights)
    if density is None:
        raise ValueError(f"merge combination {combination!r} needs a density in (0, 1]")
    if base == "ties":
        return lambda t, w: mu.ties(t, w, density, majority_sign_method)
    if base == "dare_linear":
        return lambda t, w: mu.dare_linear(t, w, density)
    if base == "dare_ties":
        return lambda t, w: mu.dare_ties(t, w, density, majority_sign_method)
    if base == "magnitude_prune":
        return lambda t, w: mu.magnitude_prune(t, w, density)
    raise ValueError(f"unknown merge combination {combination!r}")


def _lowrank_module(delta: torch.Tensor, rank: int, conv_shape: tuple[int, ...] | None) -> ModuleLoRA:
    """Truncated SVD of a 2-D ΔW ``(out, in·k·k)`` -> a LoRA (linear) or LoCon (conv) module with scale 1."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = max(1, min(rank, s.numel()))
    up, down = u[:, :r] * s[:r], vh[:r]
    if conv_shape is None:
        return ModuleLoRA("lora", {"down": down.contiguous(), "up": up.contiguous()})
    out, inp, *k = conv_shape
    return ModuleLoRA("locon", {"down": down.reshape(r, inp, *k).contiguous(), "up": up.reshape(out, r, 1, 1).contiguous()})


def merge_loras(loras: Sequence[LoRA], names: Sequence[str], weight: Callable[[str, str], float], combination: str,
                density: float | None = None, majority_sign_method: str = "total", rank: int | None = None,
                seed: int = 0, base_weight: Callable[[str], torch.Tensor] | None = None) -> LoRA:
    """One LoRA from several; `weight(lora_name, module_name)` gives each LoRA's weight at each module."""
    if combination not in ("cat",) + FACTOR_COMBINATIONS + DENSE_COMBINATIONS:
        raise ValueError(f"unknown merge combination {combination!r}")
    modules: dict[str, ModuleLoRA] = {}
    all_names = sorted({m for lora in loras for m in lora.modules})
    fn = None if combination == "cat" else _merge_fn(combination, density, majority_sign_method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in all_names:
            parts = [(n, lora.modules[module], float(weight(n, module)))
                     for n, lora in zip(names, loras) if module in lora.modules]
            if combination == "cat":
                modules[module] = _cat(module, parts)
            elif combination in FACTOR_COMBINATIONS:
                modules[module] = _factor_merge(module, parts, fn)
            else:
                modules[module] = _dense_merge(module, parts, fn, rank, base_weight)
    metadata = {"merged_from": ",".join(names), "combination": combination}
    return LoRA(modules=modules, family=loras[0].family if loras else "unknown", metadata=metadata,
                source_format="merge")


def _cat(module: str, parts) -> ModuleLoRA:
    bad = [n for n, m, _ in parts if not _is_fast(m)]
    if bad:
        raise ValueError(f"cat merges plain LoRA/LoCon factors; {bad} have {parts[0][1].kind}/DoRA/Tucker modules at "
                         f"{module}: use combination='svd'")
    first = parts[0][1]
    downs, ups = [], []
    for _, m, w in parts:
        r = m.factors["down"].shape[0]
        downs.append(m.factors["down"].float().reshape(r, *first.factors["down"].shape[1:]))
        up = m.factors["up"].float() * (w * m.scale)
        ups.append(up.reshape(up.shape[0], r, *first.factors["up"].shape[2:]))
    return ModuleLoRA(first.kind, {"down": torch.cat(downs), "up": torch.cat(ups, dim=1)})


def _factor_merge(module: str, parts, fn) -> ModuleLoRA:
    bad = [n for n, m, _ in parts if not _is_fast(m)]
    if bad:
        raise ValueError(f"merging factors needs plain LoRA/LoCon modules; {bad} are not at {module}: use the *_svd form")
    ranks = {m.rank for _, m, _ in parts}
    if len(ranks) > 1:
        raise ValueError(f"merging factors needs equal ranks, {module} has ranks {sorted(ranks)}: use the *_svd form")
    first = parts[0][1]
    wa, wb, a_list, b_list = [], [], [], []
    for _, m, w in parts:
        ws = w * m.scale
        wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        wb.append(math.sqrt(abs(ws)))
        a_list.append(m.factors["down"].float().reshape(first.factors["down"].shape))
        b_list.append(m.factors["up"].float().reshape(first.factors["up"].shape))
    down = fn(a_list, torch.tensor(wa))
    up = fn(b_list, torch.tensor(wb))
    return ModuleLoRA(first.kind, {"down": down.contiguous(), "up": up.contiguous()})


def _dense_merge(module: str, parts, fn, rank: int | None, base_weight) -> ModuleLoRA:
    deltas, weights = [], []
    for _, m, w in parts:
        base = base_weight(module) if base_weight is not None else None
        if m.dora_scale is not None and base is None:
            raise ValueError(f"{module} is a DoRA module: merging it needs the base weights")
        delta = m.delta_weight(base)
        deltas.append(delta.float())
        weights.append(w)
    shape = deltas[0].shape
    if any(d.shape != shape for d in deltas):
        deltas = [d.reshape(shape) for d in deltas]
    merged = fn(deltas, torch.tensor(weights, dtype=torch.float32))
    ranks = [m.rank for _, m, _ in parts if m.rank is not None]
    r = rank or (max(ranks) if ranks else min(shape[0], int(torch.tensor(shape[1:]).prod())))
    conv = tuple(shape) if len(shape) > 2 else None
    return _lowrank_module(merged.reshape(shape[0], -1), r, conv)
