"""Synthetic TinyWorld-shaped LoRAs for tests and benchmarks (no training needed).

Each concept of the TinyWorld catalogue gets a fixed low-rank "signal" per module (shared in part with its
category, so categories are visible in the weights). A LoRA of that concept mimics what LoRA training produces:
a random ``A`` (the seed's init, which training barely moves) and ``B`` fitted so that ``B·A`` is the signal seen
through ``A``'s row space, plus noise. Two LoRAs of one concept thus share their output side and differ in their
input side, like two trainings with different seeds. Files carry the same metadata as
`studio.tinyworld.train_lora` writes (kohya ``ss_*``, modelspec, ``.civitai.info``), or none (``bare``).
"""
from __future__ import annotations

import hashlib
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from studio.library.canonical import LoRA, ModuleLoRA
from studio.tinyworld.catalog import CATEGORIES, CONCEPTS, CONCEPTS_BY_NAME, caption, sample_base


@lru_cache(maxsize=1)
def tinyworld_targets() -> dict[str, tuple[int, int]]:
    """(out, in) of the TinyWorld UNet's attention projections (the modules TinyWorld LoRAs adapt), by name."""
    from studio.library.canonical import module_shapes
    from studio.tinyworld.models import build_unet

    with torch.device("meta"):
        unet = build_unet()
    shapes = module_shapes({"unet": unet})
    keep = ("to_q", "to_k", "to_v", "to_out.0")
    return {k: tuple(v) for k, v in shapes.items() if k.endswith(keep)}


def _attention(prefix: str, width: int, cross: int) -> dict[str, tuple[int, int]]:
    out = {}
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            out[f"{prefix}.transformer_blocks.0.{attn}.{proj}"] = (width, cross if attn == "attn2" and proj in
                                                                   ("to_k", "to_v") else width)
    return out


# 16 real TinyWorld modules (one down block's and the mid block's attention): small, fast LoRAs for tests
SMALL_TARGETS = {**_attention("unet.down_blocks.1.attentions.0", 64, 128),
                 **_attention("unet.mid_block.attentions.0", 128, 128)}
# SD1.5 modules (cross-attention input 768): a LoRA of another family
SD15_TARGETS = _attention("unet.down_blocks.0.attentions.0", 320, 768)


def _gen(*key) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") % (2**63)
    return torch.Generator().manual_seed(seed)


def _signal(tag: str, name: str, shape: tuple[int, int], rank: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen("signal", tag, name)
    out, inp = shape
    return torch.randn(out, rank, generator=g) / out ** 0.5, torch.randn(rank, inp, generator=g) / inp ** 0.5


def synthetic_lora(concept: str, rank: int = 8, seed: int = 0, shapes: dict[str, tuple[int, int]] | None = None,
                   noise: float = 0.15, category_share: float = 0.5, alpha: float | None = None,
                   family: str = "tinyworld", dtype: torch.dtype = torch.float32) -> LoRA:
    """A LoRA that 'learned' `concept` (a TinyWorld catalogue name, or any string for an off-catalogue one)."""
    shapes = shapes or tinyworld_targets()
    c = CONCEPTS_BY_NAME.get(concept)
    category = c.category if c else "other"
    g = _gen("lora", concept, rank, seed)
    modules = {}
    for name, (out, inp) in shapes.items():
        Uc, Vc = _signal(f"concept:{concept}", name, (out, inp))
        Uk, Vk = _signal(f"category:{category}", name, (out, inp))
        target = Uc @ Vc + category_share * (Uk @ Vk)                        # (out, in)
        A = torch.randn(rank, inp, generator=g) / rank ** 0.5                 # the init that training keeps
        # B·A = target projected on A's row space: B = target·A⁺
        B = target @ torch.linalg.pinv(A)
        B = B + noise * B.norm() / (out * rank) ** 0.5 * torch.randn(out, rank, generator=g)
        a = float(alpha if alpha is not None else rank)
        scale = a / rank
        modules[name] = ModuleLoRA("lora", {"down": A.to(dtype), "up": (B / scale).to(dtype)}, alpha=a)
    return LoRA(modules, family=family)


def tinyworld_metadata(concept: str, rank: int, seed: int, steps: int = 600) -> tuple[dict, dict]:
    """(safetensors metadata, .civitai.info dict) as `studio.tinyworld.train_lora` writes them."""
    from studio.tinyworld.train_lora import civitai_info, lora_metadata, with_concept

    rng = random.Random(seed)
    caps = [caption(with_concept(sample_base(rng), concept), rng) for _ in range(16)]
    return lora_metadata(concept, rank, float(rank), steps, seed, caps), civitai_info(concept)


def write_synthetic_library(folder: str | Path, concepts: Sequence[str] | None = None, ranks: Sequence[int] = (4, 8),
                            seeds: Sequence[int] = (0,), bare: Sequence[str] = (), shapes=None, noise: float = 0.15,
                            dtype: torch.dtype = torch.float32, name_style: str = "neutral",
                            fmt: str = "kohya") -> list[dict]:
    """Write one file per (concept, rank, seed); LoRAs of concepts in `bare` get no metadata and no sidecar.

    `name_style`: ``neutral`` names files ``lora_0007`` (the name says nothing), ``concept`` ``zorbo_r8_s0``.
    Returns one record per file: path, concept, category, rank, seed, bare.
    """
    from studio.library.formats import write_lora

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    concepts = list(concepts) if concepts is not None else [c.name for c in CONCEPTS]
    records = []
    n = 0
    for concept in concepts:
        for rank in ranks:
            for seed in seeds:
                lora = synthetic_lora(concept, rank, seed, shapes, noise=noise, dtype=dtype)
                is_bare = concept in bare
                info = None
                if not is_bare:
                    lora.metadata, info = tinyworld_metadata(concept, rank, seed)
                stem = f"lora_{n:04d}" if name_style == "neutral" else f"{concept}_r{rank}_s{seed}"
                path = write_lora(lora, folder / f"{stem}.safetensors", format=fmt)
                if info is not None:
                    path.with_suffix(".civitai.info").write_text(json.dumps(info, indent=2))
                c = CONCEPTS_BY_NAME.get(concept)
                records.append({"path": str(path), "name": stem, "concept": concept,
                                "category": c.category if c else "other", "rank": rank, "seed": seed,
                                "bare": is_bare})
                n += 1
    return records


__all__ = ["SMALL_TARGETS", "SD15_TARGETS", "tinyworld_targets", "synthetic_lora", "tinyworld_metadata",
           "write_synthetic_library", "CATEGORIES"]
