"""Loading tiny random SD1.5- and SDXL-topology pipelines from diffusers folders and single-file checkpoints."""
from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from studio import pipeline as studio_pipeline
from studio.pipeline import CONFIGS, load_pipeline, model_kind, pick_device, pick_dtype
from studio.tinyworld.tokenizer import write_clip_tokenizer

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


# ---------------------------------------------------------------- tiny random pipelines


def _text_config(hidden: int, act: str, projection_dim: int = 32) -> CLIPTextConfig:
    # bos/eos/pad as in the real SD configs (eos 2: pooled output at the argmax id, i.e. <|endoftext|>)
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=projection_dim,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        sample_size=32,
    )


def _tokenizer(folder, pad_token=None) -> CLIPTokenizer:
    write_clip_tokenizer(folder)
    if pad_token:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            data = json.loads((folder / name).read_text())
            data["pad_token"] = pad_token
            (folder / name).write_text(json.dumps(data))
    return CLIPTokenizer.from_pretrained(str(folder))


def tiny_sd15(tokenizer) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(32, "quick_gelu")), tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, **SCHEDULE),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl(tokenizer, tokenizer_2) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    # Text encoders of different widths (as in SDXL: 768 / 1280), so that their checkpoint keys are told apart.
    text_encoder = CLIPTextModel(_text_config(32, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(64, "gelu", projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=32 + 64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **SCHEDULE),
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny pipelines saved with save_pretrained: {"sd15": folder, "sdxl": folder}."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = _tokenizer(root / "tok")
    tokenizer_2 = _tokenizer(root / "tok2", pad_token="!")
    out = {"sd15": root / "sd15", "sdxl": root / "sdxl"}
    tiny_sd15(tokenizer).save_pretrained(out["sd15"])
    tiny_sdxl(tokenizer, tokenizer_2).save_pretrained(out["sdxl"])
    return out


def generate(pipe, seed=1):
    generator = torch.Generator("cpu").manual_seed(seed)
    result = pipe("a red cube", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
                  height=32, width=32, generator=generator, output_type="np")
    return result.images[0]


# ---------------------------------------------------------------- diffusers -> original single-file layout


def unet_to_ldm(unet) -> dict:
    """UNet2DConditionModel state dict -> `model.diffusion_model.*` (LDM / SGM openaimodel layout)."""
    config = unet.config
    n, per = len(config.block_out_channels), config.layers_per_block
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(n):
        for j in range(per):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * (per + 1) + j}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * (per + 1) + j}.1."))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op."))
        for j in range(per + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (per + 1) + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (per + 1) + j}.1."))
        upsampler_index = 2 if "CrossAttn" in config.up_block_types[i] else 1
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (per + 1) + per}.{upsampler_index}."))
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    out = {}
    for key, value in unet.state_dict().items():
        for new, old in pairs:
            if key.startswith(new):
                rest = key[len(new):]
                if ".resnets." in new:
                    for a, b in resnet:
                        rest = rest.replace(a, b)
                key = old + rest
                break
        else:
            raise KeyError(key)
        out["model.diffusion_model." + key] = value
    return out


def vae_to_ldm(vae) -> dict:
    """AutoencoderKL state dict -> `first_stage_model.*` (LDM layout; attention projections as 1x1 convs)."""
    n, per = len(vae.config.block_out_channels), vae.config.layers_per_block
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{i}.", f"{part}.mid.block_{i + 1}.") for i in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(per)]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.") for j in range(per + 1)]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    attention = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in vae.state_dict().items():
        for new, old in pairs:
            if key.startswith(new):
                rest = key[len(new):].replace("conv_shortcut", "nin_shortcut")
                if ".attentions." in new:
                    for a, b in attention:
                        rest = rest.replace(a, b)
                    if value.ndim == 2:
                        value = value[:, :, None, None]
                key = old + rest
                break
        out["first_stage_model." + key] = value
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict:
    """CLIPTextModel state dict -> `<prefix>text_model.*` (transformers' own names), plus the position_ids buffer."""
    out = {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def open_clip_to_sgm(text_encoder, prefix: str = "conditioner.embedders.1.model.") -> dict:
    """CLIPTextModelWithProjection state dict -> open_clip text tower names (fused in_proj, transposed projection)."""
    out, qkv = {}, {}
    names = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
             ("self_attn.out_proj", "attn.out_proj")]
    for key, value in text_encoder.state_dict().items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key.startswith("final_layer_norm."):
            out[key.replace("final_layer_norm", "ln_final")] = value
        else:
            layer, rest = re.match(r"encoder\.layers\.(\d+)\.(.*)", key).groups()
            match = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if match:
                qkv[(layer, match[2], match[1])] = value
                continue
            for a, b in names:
                rest = rest.replace(a, b)
            out[f"transformer.resblocks.{layer}.{rest}"] = value
    for layer, kind in {(layer, kind) for layer, kind, _ in qkv}:
        fused = torch.cat([qkv[(layer, kind, p)] for p in "qkv"])
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return {prefix + k: v for k, v in out.items()}


def to_single_file(pipe) -> dict:
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if isinstance(pipe, StableDiffusionXLPipeline):
        state.update(clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_sgm(pipe.text_encoder_2))
    else:
        state.update(clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer."))
    return {k: v.contiguous() for k, v in state.items()}


def config_only_copy(folder, dest):
    """The pipeline folder without its weights: what a single-file load needs besides the checkpoint."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_load_folder_generates_deterministically(folders, kind):
    pipe = load_pipeline(folders[kind], device="cpu")
    expected_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    assert type(pipe) is expected_cls
    assert model_kind(folders[kind]) == kind
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    if kind == "sd15":
        assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False
    image = generate(pipe)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(image, generate(pipe))
    assert not np.array_equal(image, generate(pipe, seed=2))
    assert "xformers" not in sys.modules


def test_ddim_scheduler(folders):
    pipe = load_pipeline(folders["sd15"], device="cpu", scheduler="ddim")
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="unknown scheduler"):
        load_pipeline(folders["sd15"], device="cpu", scheduler="euler")


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_load_single_file(folders, kind, tmp_path):
    reference = load_pipeline(folders[kind], device="cpu")
    checkpoint = tmp_path / f"tiny_{kind}.safetensors"
    save_file(to_single_file(reference), str(checkpoint))
    config = config_only_copy(folders[kind], tmp_path / "config")
    assert model_kind(checkpoint) == kind

    pipe = load_pipeline(checkpoint, device="cpu", config=config)
    assert type(pipe) is type(reference)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert_same_weights(pipe.unet, reference.unet)
    assert_same_weights(pipe.vae, reference.vae)
    assert_same_weights(pipe.text_encoder, reference.text_encoder)
    if kind == "sdxl":
        assert_same_weights(pipe.text_encoder_2, reference.text_encoder_2)
        assert pipe.tokenizer_2.pad_token == "!"
    else:
        assert pipe.safety_checker is None
    np.testing.assert_array_equal(generate(pipe), generate(reference))


def test_model_kind_rejects_unknown_checkpoints(tmp_path):
    sd2 = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)}, str(sd2))
    with pytest.raises(ValueError, match="not an SD1.5 or SDXL"):
        model_kind(sd2)
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        model_kind(tmp_path / "model.ckpt")
    with pytest.raises(FileNotFoundError):
        load_pipeline("runwayml/stable-diffusion-v1-5", device="cpu")
    with pytest.raises(ValueError, match="model_index.json"):
        model_kind(tmp_path)


def test_shipped_configs():
    for kind, cls_name in [("sd15", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")]:
        assert json.loads((CONFIGS / kind / "model_index.json").read_text())["_class_name"] == cls_name
        assert model_kind(CONFIGS / kind) == kind
        assert UNet2DConditionModel.load_config(CONFIGS / kind / "unet")["in_channels"] == 4
    xl_unet = UNet2DConditionModel.load_config(CONFIGS / "sdxl" / "unet")
    assert xl_unet["cross_attention_dim"] == 2048 and xl_unet["projection_class_embeddings_input_dim"] == 2816
    tokenizer = CLIPTokenizer.from_pretrained(str(CONFIGS / "sd15" / "tokenizer"))
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(CONFIGS / "sdxl" / "tokenizer_2"))
    assert tokenizer_2.pad_token == "!" and tokenizer_2.pad_token_id == 0


def test_pick_device_and_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="unsupported device"):
        pick_device("xla")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(None) == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda:1")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype("cuda:0") == torch.float16
    assert pick_dtype("cpu") == torch.float32


@pytest.mark.parametrize("device, installed, expected", [("cpu", True, False), ("cuda", False, False), ("cuda", True, True)])
def test_xformers_only_on_cuda_when_installed(folders, monkeypatch, device, installed, expected):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(studio_pipeline, "_xformers_available", lambda: installed)
    monkeypatch.setattr(StableDiffusionPipeline, "to", lambda self, *a, **k: self)  # no GPU here
    monkeypatch.setattr(StableDiffusionPipeline, "enable_xformers_memory_efficient_attention",
                        lambda self: calls.append(True))
    pipe = load_pipeline(folders["sd15"], device=device)
    assert bool(calls) == expected
    assert pipe.unet.dtype == (torch.float16 if device == "cuda" else torch.float32)
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert "xformers" not in sys.modules
