"""Tiny random-weight LoRA files in each format, with real SD1.5 / SDXL / TinyWorld module names and shapes.

State dicts are built by hand here (not with `write_lora`), so the readers are tested against an
independent spelling of each format. Shapes come from models instantiated on the meta device.
"""
from __future__ import annotations

import json
from functools import lru_cache

import torch
from safetensors.torch import save_file

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[320, 640, 1280],
    layers_per_block=2, transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20], use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)

# kohya SDXL (SGM) names, spelled out by hand, and the diffusers modules they denote
SDXL_SGM = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_4_1_transformer_blocks_0_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "input_blocks_4_1_transformer_blocks_0_attn2_to_v": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "input_blocks_8_1_transformer_blocks_1_attn1_to_q": "down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_q",
    "input_blocks_8_1_transformer_blocks_1_attn1_to_out_0": "down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_out.0",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_transformer_blocks_9_ff_net_2": "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
    "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
    "output_blocks_0_1_transformer_blocks_0_ff_net_0_proj": "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out",
    "output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    "out_2": "conv_out",
}
SDXL_TEXT = [
    "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
    "text_encoder.text_model.encoder.layers.11.mlp.fc1",
    "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoder_2.text_model.encoder.layers.31.mlp.fc2",
]
SD15_MODULES = [
    "unet.down_blocks.0.attentions.0.proj_in",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "unet.down_blocks.0.resnets.0.conv1",
    "unet.down_blocks.0.resnets.0.time_emb_proj",
    "unet.down_blocks.0.downsamplers.0.conv",
    "unet.down_blocks.1.resnets.0.conv_shortcut",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.up_blocks.0.upsamplers.0.conv",
    "unet.up_blocks.3.resnets.2.conv2",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoder.text_model.encoder.layers.0.self_attn.out_proj",
    "text_encoder.text_model.encoder.layers.11.mlp.fc2",
]


@lru_cache
def meta_models(family: str) -> dict[str, torch.nn.Module]:
    """The components of a family's base model, on the meta device (names and shapes, no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.tinyworld.models import TEXT_CONFIG, UNET_CONFIG

    with torch.device("meta"):
        if family == "tinyworld":
            return {"unet": UNet2DConditionModel(**UNET_CONFIG), "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))}
        if family == "sd15":
            return {"unet": UNet2DConditionModel(**SD15_UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
        }


@lru_cache
def base_shapes(family: str) -> dict[str, tuple[int, ...]]:
    from studio.library import module_shapes

    return module_shapes(meta_models(family))


def family_modules(family: str) -> list[str]:
    """Module paths a test LoRA of this family adapts (attention, ff, resnets, samplers, text encoders)."""
    if family == "sdxl":
        return [f"unet.{p}" for p in SDXL_SGM.values()] + SDXL_TEXT
    if family == "sd15":
        return SD15_MODULES
    shapes = base_shapes("tinyworld")
    return [p for p in shapes if ("attentions.0" in p and ".attn" in p) or "resnets.0.conv" in p
            or "self_attn" in p or "time_emb_proj" in p]


def kohya_name(path: str, family: str) -> str:
    component, rest = path.split(".", 1)
    if component == "unet":
        if family == "sdxl":
            return "lora_unet_" + {v: k for k, v in SDXL_SGM.items()}[rest]
        return "lora_unet_" + rest.replace(".", "_")
    if component == "text_encoder":
        return ("lora_te1_" if family == "sdxl" else "lora_te_") + rest.replace(".", "_")
    return "lora_te2_" + rest.replace(".", "_")


def lora_factors(shape, rank: int, gen: torch.Generator, tucker: bool = False, dtype=torch.float32) -> dict:
    """down/up (+ mid for a Tucker conv) for a weight of this shape."""
    out, inp, *k = shape
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    if not k:
        return {"down": r(rank, inp), "up": r(out, rank)}
    if tucker and any(d > 1 for d in k):
        return {"down": r(rank, inp, 1, 1), "mid": r(rank, rank, *k), "up": r(out, rank, 1, 1)}
    return {"down": r(rank, inp, *k), "up": r(out, rank, 1, 1)}


def random_modules(family: str, seed: int = 0, rank: int = 4, dtype=torch.float32) -> dict[str, dict]:
    """{path: {"factors": ..., "alpha": ...}} with mixed ranks and alphas, one Tucker conv, one alpha-less module."""
    gen = torch.Generator().manual_seed(seed)
    shapes = base_shapes(family)
    modules = {}
    tucker_done = False
    for i, path in enumerate(family_modules(family)):
        shape = shapes[path]
        tucker = len(shape) == 4 and shape[2] > 1 and not tucker_done
        tucker_done |= tucker
        r = rank if i % 3 else rank // 2
        alpha = None if i == 1 else float(r) / (1 + i % 2)
        modules[path] = {"factors": lora_factors(shape, r, gen, tucker, dtype), "alpha": alpha}
    return modules


_KOHYA_KEYS = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"}


def kohya_state_dict(modules: dict[str, dict], family: str) -> dict[str, torch.Tensor]:
    sd = {}
    for path, m in modules.items():
        name = kohya_name(path, family)
        for factor, t in m["factors"].items():
            sd[f"{name}.{_KOHYA_KEYS[factor]}"] = t
        if m["alpha"] is not None:
            sd[f"{name}.alpha"] = torch.tensor(m["alpha"], dtype=t.dtype)
    return sd


def diffusers_state_dict(modules: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT keys plus diffusers' ``lora_adapter_metadata`` giving each module's alpha (rank when it has none)."""
    sd, flat = {}, {}
    for path, m in modules.items():
        assert "mid" not in m["factors"]
        sd[f"{path}.lora_A.weight"] = m["factors"]["down"]
        sd[f"{path}.lora_B.weight"] = m["factors"]["up"]
        component, module = path.split(".", 1)
        rank = m["factors"]["down"].shape[0]
        flat.setdefault(f"{component}.r", rank)
        flat.setdefault(f"{component}.lora_alpha", 1.0)
        flat.setdefault(f"{component}.alpha_pattern", {})[module] = m["alpha"] or float(rank)
        flat.setdefault(f"{component}.rank_pattern", {})[module] = rank
        flat.setdefault(f"{component}.target_modules", []).append(module)
    return sd, {"format": "pt", "lora_adapter_metadata": json.dumps(flat)}


KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_output_name": "test_lora",
    "modelspec.trigger_phrase": "zqx style, blue glow",
    "ss_tag_frequency": json.dumps({"10_zqx": {"zqx style": 10, "cat": 7, "outdoors": 3}}),
}


def write_kohya(path, family: str, seed: int = 0, metadata: dict | None = None, **kw) -> dict[str, torch.Tensor]:
    """A kohya LoRA/LoCon file for this family; returns its state dict."""
    sd = kohya_state_dict(random_modules(family, seed, **kw), family)
    save_file(sd, str(path), metadata=dict(KOHYA_METADATA if metadata is None else metadata))
    return sd


def write_diffusers(path, family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    modules = {p: m for p, m in random_modules(family, seed).items() if "mid" not in m["factors"]}
    sd, metadata = diffusers_state_dict(modules)
    save_file(sd, str(path), metadata=metadata)
    return sd


def small_kohya_file(path, seed: int = 0, metadata: dict | None = None) -> None:
    """A few-KB TinyWorld kohya LoRA (two attention modules, rank 2)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        sd[f"{name}.lora_down.weight"] = torch.randn(2, 128, generator=gen)
        sd[f"{name}.lora_up.weight"] = torch.randn(32 if "unet" in name else 128, 2, generator=gen)
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(path), metadata=metadata or {"ss_output_name": f"small{seed}"})
