"""Kohya/A1111 module names <-> canonical module paths.

Kohya names are module paths with ``.`` replaced by ``_`` after a component prefix (``lora_unet_``,
``lora_te_``; ``lora_te1_``/``lora_te2_`` for SDXL's two text encoders). For SD1.x the UNet path is the
diffusers one; for SDXL kohya trains the SGM/LDM UNet, so its names use ``input_blocks``/``middle_block``/
``output_blocks`` with ``in_layers_2``/``emb_layers_1``/``out_layers_3``/``skip_connection`` inside resnets.
"""
from __future__ import annotations

import functools
import re

KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)

# Identifiers containing "_" in the module paths of diffusers' UNet2DConditionModel and transformers' CLIP.
_TOKENS = {
    "time_emb_proj", "final_layer_norm", "conv_norm_out", "add_time_proj",
    "add_embedding", "class_embedding", "conv_in", "conv_out", "conv_shortcut", "down_blocks", "up_blocks",
    "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out", "time_embedding",
    "time_proj", "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "text_projection", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
    "add_q_proj", "add_k_proj", "add_v_proj", "encoder_hid_proj",
}
_SGM_PREFIXES = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
_LAYERS_PER_BLOCK = 2  # SD1.x and SDXL: 2 resnets per down block, 3 per up block
_SDXL_UP_BLOCKS_WITH_ATTENTION = (0, 1)

_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_DIFFUSERS_RESNET = {v: k for k, v in _SGM_RESNET.items()}
_SGM_TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
            "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
            "input_blocks_0_0": "conv_in", "out_2": "conv_out"}
_DIFFUSERS_TOP = {v.replace("_linear_", ".linear_"): k for k, v in _SGM_TOP.items()}


def _underscores_to_path(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in`` (longest known token first)."""
    parts = name.split("_")
    out, i = [], 0
    while i < len(parts):
        for n in (3, 2):
            token = "_".join(parts[i : i + n])
            if i + n <= len(parts) and token in _TOKENS:
                out.append(token)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


@functools.lru_cache(maxsize=1 << 16)   # a library repeats the same few hundred module names in every file
def kohya_to_path(name: str) -> str | None:
    """``lora_unet_down_blocks_0_attentions_0_proj_in`` -> ``unet.down_blocks.0.attentions.0.proj_in``, or None."""
    for prefix, component in KOHYA_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            if component == "unet" and rest.startswith(_SGM_PREFIXES):
                rest = _sgm_to_diffusers(rest)
                if rest is None:
                    return None
            return f"{component}.{_underscores_to_path(rest)}" if rest else None
    return None


def is_sgm_name(name: str) -> bool:
    return name.startswith("lora_unet_") and name[len("lora_unet_") :].startswith(_SGM_PREFIXES)


def path_to_kohya(path: str, family: str) -> str:
    """Canonical path -> kohya name; SDXL UNet modules get SGM block names, as kohya's sd-scripts writes them."""
    component, rest = path.split(".", 1)
    if component == "unet":
        return "lora_unet_" + (_diffusers_to_sgm(rest) if family == "sdxl" else rest.replace(".", "_"))
    if component == "text_encoder":
        return ("lora_te1_" if family == "sdxl" else "lora_te_") + rest.replace(".", "_")
    if component == "text_encoder_2":
        return "lora_te2_" + rest.replace(".", "_")
    raise ValueError(f"no kohya prefix for component {component!r} of {path!r}")


_BLOCK = re.compile(
    r"(?:(down_blocks|up_blocks)\.(\d+)|mid_block)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)


def _sgm_to_diffusers(rest: str) -> str | None:
    """SGM UNet name (underscored) -> diffusers UNet name (underscored); None when it names no known module."""
    if rest in _SGM_TOP:
        return _SGM_TOP[rest]
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)_(\d+)_(?:(\d+)_)?(.+)", rest)
    if not m:
        return None
    where, i, j, tail = m[1], int(m[2]), m[3] and int(m[3]), m[4]
    resnet = _SGM_RESNET.get(tail)
    if where == "middle_block":
        if j is not None:
            return None
        if i == 1:
            return f"mid_block_attentions_0_{tail}"
        return f"mid_block_resnets_{i // 2}_{resnet}" if i in (0, 2) and resnet else None
    if j is None:
        return None
    if where == "input_blocks":
        if i == 0:
            return None
        block, layer = divmod(i - 1, _LAYERS_PER_BLOCK + 1)
        if layer == _LAYERS_PER_BLOCK:
            return f"down_blocks_{block}_downsamplers_0_conv" if (j, tail) == (0, "op") else None
        prefix = f"down_blocks_{block}"
    else:
        block, layer = divmod(i, _LAYERS_PER_BLOCK + 1)
        if j > 0 and tail == "conv":
            return f"up_blocks_{block}_upsamplers_0_conv"
        prefix = f"up_blocks_{block}"
    if j == 0:
        return f"{prefix}_resnets_{layer}_{resnet}" if resnet else None
    return f"{prefix}_attentions_{layer}_{tail}" if j == 1 else None


def _diffusers_to_sgm(rest: str) -> str:
    """Diffusers UNet path (dotted) -> SDXL SGM name (underscored); ValueError when there is none."""
    if rest in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[rest]
    m = _BLOCK.fullmatch(rest)
    error = ValueError(f"UNet module {rest!r} has no SGM (SDXL kohya) name")
    if not m:
        raise error
    where, block, kind, layer, tail = m[1] or "mid_block", int(m[2] or 0), m[3], int(m[4]), m[5]
    if kind == "resnets":
        if tail not in _DIFFUSERS_RESNET:
            raise error
        slot, tail = 0, _DIFFUSERS_RESNET[tail]
    elif kind == "attentions":
        slot, tail = 1, tail.replace(".", "_")
    elif (layer, tail) != (0, "conv") or where == "mid_block":
        raise error
    if where == "down_blocks":
        index = block * (_LAYERS_PER_BLOCK + 1) + 1
        if kind == "downsamplers":
            return f"input_blocks_{index + _LAYERS_PER_BLOCK}_0_op"
        return f"input_blocks_{index + layer}_{slot}_{tail}"
    if where == "mid_block":
        if (kind, layer) == ("attentions", 0):
            return f"middle_block_1_{tail}"
        if kind == "resnets" and layer in (0, 1):
            return f"middle_block_{2 * layer}_{tail}"
        raise error
    index = block * (_LAYERS_PER_BLOCK + 1)
    if kind == "upsamplers":
        inner = 2 if block in _SDXL_UP_BLOCKS_WITH_ATTENTION else 1
        return f"output_blocks_{index + _LAYERS_PER_BLOCK}_{inner}_conv"
    return f"output_blocks_{index + layer}_{slot}_{tail}"
