"""A1111 LoRA Block Weight (hako-mikan/sd-webui-lora-block-weight) presets and weight strings, and B-LoRA.

LBW names the blocks of the original LDM/SGM UNet: ``BASE`` (the text encoders), ``IN00``-``IN11``
(``input_blocks``), ``M00`` (``middle_block``), ``OUT00``-``OUT11`` (``output_blocks``). A weight string has
12 / 17 / 20 / 26 values in the order of `BLOCK_IDS[n]`; as in LBW's ``to26``, a string of fewer values sets the
blocks it does not name to 0, and modules outside every block (``time_embedding``, ``conv_out``, SDXL's
``add_embedding``) keep weight 1. `block_id` maps a diffusers module path to its block:

- ``IN00`` = ``conv_in``; down block ``i`` holds ``IN{1+3i}``, ``IN{2+3i}`` (``resnets.j`` + ``attentions.j``)
  and ``IN{3+3i}`` (its downsampler);
- ``M00`` = ``mid_block``;
- up block ``k`` holds ``OUT{3k}``..``OUT{3k+2}`` (``resnets.j`` + ``attentions.j``, the upsampler in the last).

This is the same layout for SD1.5 (IN00-IN11, OUT00-OUT11), SDXL (IN00-IN08, OUT00-OUT08) and TinyWorld
(SD1.5's blocks at small width). The 17-value form lists SD1.5's blocks with attention, the 12-value form
SDXL's; the 26 / 20-value forms add the resnet-only and sampler slots.

B-LoRA (Frenkel et al. 2024) trains SDXL's ``up_blocks.0.attentions.0`` (content) and
``up_blocks.0.attentions.1`` (style); the specs ``BLORA_CONTENT`` / ``BLORA_STYLE`` / ``BLORA`` keep only those.
"""
from __future__ import annotations

import re
from typing import Callable

BLOCKID26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
             "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
BLOCKID20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
BLOCK_IDS = {12: BLOCKID12, 17: BLOCKID17, 20: BLOCKID20, 26: BLOCKID26}
FORMS = {"sd15": (17, 26), "tinyworld": (17, 26), "sdxl": (12, 20)}

# LBW's default preset table (DEF_WEIGHT_PRESET in scripts/lora_block_weight.py; FLUXALL left out).
DEFAULT_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}


def _one_hot_presets() -> dict[str, str]:
    """The single-block presets of LBW's shipped lbwpresets.txt: ``IN05`` keeps one block, ``NIN05`` drops it.

    Reproduced as shipped, including its ``MID``/``NMID`` spelling and ``NMID`` zeroing BASE as well.
    """
    out = {}
    for i, block in enumerate(BLOCKID17):
        name = "MID" if block == "M00" else block
        out[name] = ",".join("1" if j == i else "0" for j in range(17))
        values = ["0" if j == i else "1" for j in range(17)]
        if block == "M00":
            values[0] = "0"
        out[f"N{name}"] = ",".join(values)
    return out


PRESETS = {**_one_hot_presets(), **DEFAULT_PRESETS}

BLORA_BLOCKS = {
    "content": ("unet.up_blocks.0.attentions.0",),
    "style": ("unet.up_blocks.0.attentions.1",),
}
BLORA_SPECS = {
    "BLORA_CONTENT": BLORA_BLOCKS["content"],
    "BLORA_STYLE": BLORA_BLOCKS["style"],
    "BLORA": BLORA_BLOCKS["content"] + BLORA_BLOCKS["style"],
}


class BlockWeightError(ValueError):
    """A block-weight spec that is neither a known preset nor a weight string of a valid length."""


def is_weight_string(spec: str) -> bool:
    return "," in spec


def parse_weights(spec: str, presets: dict[str, str] | None = None) -> list[float]:
    """The 26 block weights (order `BLOCKID26`) of a preset name or a 12/17/20/26-value weight string."""
    presets = PRESETS if presets is None else presets
    text = presets.get(spec.strip(), spec) if isinstance(spec, str) else spec
    if not isinstance(text, str):
        raise BlockWeightError(f"block weights must be a preset name or a weight string, got {spec!r}")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1:
        known = ", ".join(sorted(presets)[:12]) + ", ..."
        raise BlockWeightError(f"unknown block-weight preset {spec!r}; known presets: {known} "
                               f"(or give {'/'.join(map(str, BLOCK_IDS))} comma-separated numbers)")
    if len(parts) not in BLOCK_IDS:
        raise BlockWeightError(
            f"block-weight string {spec!r} has {len(parts)} values; LBW takes 17 or 26 (SD1.5) or 12 or 20 (SDXL): "
            + "; ".join(f"{n} = {','.join(ids)}" for n, ids in sorted(BLOCK_IDS.items())))
    values = []
    for p in parts:
        if p in ("R", "U") or p.startswith("X"):
            raise BlockWeightError(f"block-weight string {spec!r}: the random/dynamic value {p!r} is not supported; "
                                   "write numbers")
        try:
            values.append(float(p))
        except ValueError:
            raise BlockWeightError(f"block-weight string {spec!r}: {p!r} is not a number") from None
    out = [0.0] * 26
    for block, value in zip(BLOCK_IDS[len(values)], values):
        out[BLOCKID26.index(block)] = value
    return out


_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(\.|$)")
_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(\.|$)")


def block_id(module: str, layers_per_block: int = 2) -> str | None:
    """LBW block of a canonical module name (``unet.down_blocks.1.attentions.0.proj_in`` -> ``IN04``).

    Text-encoder modules are ``BASE``; UNet modules outside every block (time embedding, ``conv_out``,
    ``conv_norm_out``, SDXL's ``add_embedding``) give None.
    """
    component, _, path = module.partition(".")
    if component.startswith("text_encoder"):
        return "BASE"
    if component != "unet":
        return None
    if path == "conv_in" or path.startswith("conv_in."):
        return "IN00"
    if path.startswith("mid_block."):
        return "M00"
    per = layers_per_block + 1
    m = _DOWN.match(path)
    if m:
        i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        index = 1 + i * per + (layers_per_block if kind == "downsamplers" else j)
        return f"IN{index:02d}"
    m = _UP.match(path)
    if m:
        k, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        index = k * per + (layers_per_block if kind == "upsamplers" else j)
        return f"OUT{index:02d}"
    return None


def block_prefixes(block: str, n_down: int, layers_per_block: int = 2) -> list[str]:
    """The diffusers module prefixes (``unet.`` / ``text_encoder``) an LBW block covers in a UNet with `n_down` blocks."""
    if block == "BASE":
        return ["text_encoder"]
    if block == "M00":
        return ["unet.mid_block"]
    per = layers_per_block + 1
    kind, index = block[:-2], int(block[-2:])
    if kind == "IN":
        if index == 0:
            return ["unet.conv_in"]
        i, j = divmod(index - 1, per)
        if i >= n_down:
            return []
        if j == layers_per_block:
            return [f"unet.down_blocks.{i}.downsamplers.0"] if i < n_down - 1 else []
        return [f"unet.down_blocks.{i}.resnets.{j}", f"unet.down_blocks.{i}.attentions.{j}"]
    k, j = divmod(index, per)
    if k >= n_down:
        return []
    out = [f"unet.up_blocks.{k}.resnets.{j}", f"unet.up_blocks.{k}.attentions.{j}"]
    if j == layers_per_block and k < n_down - 1:
        out.append(f"unet.up_blocks.{k}.upsamplers.0")
    return out


def layer_rule(spec: str | None, layers_per_block: int = 2,
               presets: dict[str, str] | None = None) -> Callable[[str], float]:
    """A function module name -> block weight for an LBW spec (preset, weight string, B-LoRA part or None)."""
    if spec is None:
        return lambda module: 1.0
    key = spec.strip()
    if key in BLORA_SPECS:
        prefixes = BLORA_SPECS[key]
        return lambda module: 1.0 if any(module == p or module.startswith(p + ".") for p in prefixes) else 0.0
    weights = parse_weights(key, presets)

    def rule(module: str) -> float:
        block = block_id(module, layers_per_block)
        return 1.0 if block is None else weights[BLOCKID26.index(block)]

    return rule


def check_spec(spec: str, presets: dict[str, str] | None = None) -> None:
    """Raise `BlockWeightError` unless `spec` is a preset, a weight string of a valid length or a B-LoRA part."""
    if spec.strip() not in BLORA_SPECS:
        parse_weights(spec, presets)
