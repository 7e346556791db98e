"""Resize a LoRA to a smaller rank per module, as kohya's ``resize_lora.py --dynamic_method sv_fro`` does.

Each module's ΔW (a LoRA or LoCon product; other kinds are kept as they are) is factored by SVD and cut to the
smallest rank whose singular values keep `fro` of ΔW's Frobenius norm; the new factors carry √σ on each side
and alpha = rank (scale 1), so the resized file applies ΔW's best approximation at that rank. A module never
grows. Metadata says what was done, as kohya writes it (``ss_network_dim``/``ss_network_alpha`` "Dynamic",
``ss_training_comment``).
"""
from __future__ import annotations

import torch

from .canonical import LoRA, ModuleLoRA


def resize_module(module: ModuleLoRA, fro: float) -> ModuleLoRA:
    if module.kind not in ("lora", "locon") or "mid" in module.factors or module.dora_scale is not None:
        return module
    dtype = module.factors["up"].dtype
    down_shape = module.factors["down"].shape
    delta = module.lowrank_delta()
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
    power = s.double() ** 2   # float64: a tail of tiny singular values must not round the energy up to 1
    energy = power.cumsum(0) / power.sum().clamp_min(1e-300)
    rank = min(int((energy < fro ** 2).sum()) + 1, module.rank)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).reshape(delta.shape[0], rank, *([1] * (len(down_shape) - 2)))
    down = (root[:, None] * vh[:rank]).reshape(rank, *down_shape[1:])
    return ModuleLoRA(module.kind, {"down": down.to(dtype).contiguous(), "up": up.to(dtype).contiguous()},
                      alpha=float(rank))


def resize_lora(lora: LoRA, fro: float = 0.95) -> LoRA:
    """`lora` with every LoRA/LoCon module cut to the rank that keeps `fro` of its ΔW's Frobenius norm."""
    if not 0.0 < fro <= 1.0:
        raise ValueError(f"fro must be in (0, 1], got {fro}")
    modules = {name: resize_module(m, fro) for name, m in lora.modules.items()}
    ranks = sorted({m.rank for m in lora.modules.values() if m.rank})
    metadata = dict(lora.metadata, ss_network_dim="Dynamic", ss_network_alpha="Dynamic",
                    ss_training_comment=f"dynamic resize with sv_fro: {fro} from rank {'/'.join(map(str, ranks))}")
    return LoRA(modules, family=lora.family, metadata=metadata, source_format=lora.source_format)
