"""Random-weight TinyWorld-shaped models and random canonical LoRAs for the fusion tests.

`reference(models, [(lora, weight_fn), ...])` builds the ground truth the runtime must match: deep copies of the
models whose weights were replaced by ``W + Σ w · ΔW`` (ΔW from the canonical `delta_weight`).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from studio.library.canonical import LoRA, ModuleLoRA, module_shapes, resolve_module
from studio.tinyworld.models import build_text_encoder, build_unet

ATTENTION = ("attn1.", "attn2.", ".ff.", ".proj_in", ".proj_out")


def unet(seed: int = 0):
    torch.manual_seed(seed)
    return build_unet().eval()


def text_encoder(seed: int = 1):
    torch.manual_seed(seed)
    return build_text_encoder().eval()


def is_attention(name: str) -> bool:
    return any(key in name for key in ATTENTION)


def random_lora(models: dict, rank: int = 4, seed: int = 0, select: Callable[[str], bool] | None = None,
                alpha: float | None = None, strength: float = 0.5) -> LoRA:
    """A plain LoRA/LoCon for every Linear/Conv2d module `select` accepts (default: all)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, shape in module_shapes(models).items():
        if select is not None and not select(name):
            continue
        out, inp, *k = shape
        if len(shape) not in (2, 4):
            continue
        down = torch.randn(rank, inp, *k, generator=g) / (inp * max(1, int(torch.tensor(k).prod()) if k else 1)) ** 0.5
        up = torch.randn(out, rank, *[1] * len(k), generator=g) * strength / rank ** 0.5
        modules[name] = ModuleLoRA("locon" if k else "lora", {"down": down, "up": up}, alpha=alpha)
    return LoRA(modules=modules, family="tinyworld")


def dense_kinds_lora(models: dict, seed: int = 0, rank: int = 3) -> LoRA:
    """LoHa, LoKr, Tucker LoCon and DoRA modules on a handful of layers (linear and conv)."""
    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes(models)

    def rnd(*s, scale=0.3):
        return torch.randn(*s, generator=g) * scale

    picks = {
        "loha_linear": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "loha_conv": "unet.down_blocks.1.resnets.0.conv1",
        "lokr_linear": "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        "lokr_conv": "unet.up_blocks.1.resnets.1.conv2",
        "tucker": "unet.up_blocks.2.resnets.0.conv1",
        "dora": "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v",
    }
    modules = {}
    out, inp = shapes[picks["loha_linear"]]
    modules[picks["loha_linear"]] = ModuleLoRA("loha", {"w1a": rnd(out, rank), "w1b": rnd(rank, inp),
                                                        "w2a": rnd(out, rank), "w2b": rnd(rank, inp)}, alpha=2.0)
    out, inp, kh, kw = shapes[picks["loha_conv"]]
    modules[picks["loha_conv"]] = ModuleLoRA("loha", {"w1a": rnd(out, rank), "w1b": rnd(rank, inp * kh * kw),
                                                      "w2a": rnd(out, rank), "w2b": rnd(rank, inp * kh * kw)})
    out, inp = shapes[picks["lokr_linear"]]
    modules[picks["lokr_linear"]] = ModuleLoRA("lokr", {"w1": rnd(4, 4), "w2a": rnd(out // 4, 2),
                                                        "w2b": rnd(2, inp // 4)}, alpha=1.0)
    out, inp, kh, kw = shapes[picks["lokr_conv"]]
    modules[picks["lokr_conv"]] = ModuleLoRA("lokr", {"w1": rnd(2, 2), "w2": rnd(out // 2, inp // 2, kh, kw, scale=0.05)})
    out, inp, kh, kw = shapes[picks["tucker"]]
    modules[picks["tucker"]] = ModuleLoRA("locon", {"down": rnd(rank, inp, 1, 1), "mid": rnd(rank, rank, kh, kw),
                                                    "up": rnd(out, rank, 1, 1)}, alpha=1.5)
    out, inp = shapes[picks["dora"]]
    w = resolve_module(models, picks["dora"]).weight.detach()
    modules[picks["dora"]] = ModuleLoRA("lora", {"down": rnd(rank, inp), "up": rnd(out, rank)},
                                        dora_scale=w.norm(dim=1, keepdim=True) * 1.1)
    return LoRA(modules=modules, family="tinyworld")


@torch.no_grad()
def reference(models: dict, terms) -> dict:
    """Copies of `models` with ``W += w(name) · ΔW`` for each ``(lora, w)``; `w` a float or a function of the name."""
    copies = {k: copy.deepcopy(v) for k, v in models.items()}
    originals = {}
    for lora, w in terms:
        for name, m in lora.modules.items():
            if name.split(".", 1)[0] not in copies:
                continue
            target = resolve_module(copies, name)
            if name not in originals:
                originals[name] = target.weight.detach().clone()
            weight = w(name) if callable(w) else w
            delta = m.delta_weight(originals[name]).reshape(target.weight.shape)
            target.weight.add_(weight * delta.to(target.weight.dtype))
    return copies


def unet_inputs(batch: int = 2, seed: int = 0, t: int = 500):
    """Random (sample, timestep, encoder_hidden_states) shaped by TinyWorld's current UNet config."""
    from studio.tinyworld.models import UNET_CONFIG

    g = torch.Generator().manual_seed(seed)
    size = UNET_CONFIG["sample_size"]
    sample = torch.randn(batch, UNET_CONFIG["in_channels"], size, size, generator=g)
    ehs = torch.randn(batch, 77, UNET_CONFIG["cross_attention_dim"], generator=g)
    return sample, torch.tensor(t), ehs


@torch.no_grad()
def run_unet(model, inputs):
    sample, t, ehs = inputs
    return model(sample, t, encoder_hidden_states=ehs, return_dict=False)[0]


def tiny_pipeline(tmp_path, seed: int = 0):
    """A StableDiffusionPipeline from TinyWorld configs with random weights (no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from studio.tinyworld.models import SCHEDULER_CONFIG, build_vae
    from studio.tinyworld.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=build_vae().eval(), text_encoder=build_text_encoder().eval(),
        tokenizer=build_clip_tokenizer(tmp_path / "tokenizer"), unet=build_unet().eval(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
