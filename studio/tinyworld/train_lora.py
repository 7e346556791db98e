"""Train TinyWorld LoRAs: one per catalogue concept, LoCon on the UNet plus a text-encoder LoRA.

    python -m studio.tinyworld.train_lora --concept zorbo --out assets/loras/zorbo.safetensors
    python -m studio.tinyworld.train_lora --concept zorbo hat stripes --out runs/loras/   # a gang, one file each

Several LoRAs train *jointly* in one UNet call: each adapted projection holds a stack of independent
low-rank pairs (`GangLoRALinear`) and every LoRA's own samples go through its own pair only, so each LoRA
sees exactly the gradient of its own data (separate AdamW states, since Adam is elementwise) and draws
its data, noise and timesteps from its own generators: a LoRA trained in a gang equals the same LoRA trained
alone, up to float rounding. On 2 CPU
cores a batch of 8 samples costs 0.33 s per step and a batch of 32 0.67 s, so a gang of N LoRAs trains
at close to N times the speed of training them one after another, with the same result per LoRA.

What is adapted and how, measured on TinyWorld (zorbo / hat / starfield, 12 prompts each, judge presence at
weight 1, CFG 7; `runs/` scratch scripts, summarised in the library issue's note):

- attention-only LoRAs learned to *denoise* concept renders (loss 4-8x lower than the base at low noise) but
  barely *generated* the concept (0-8 %) at any learning rate (2e-3 .. 1.2e-2), length (250-1000 steps),
  timestep bias, high-noise loss weight or noise offset (0.1-1.0) tried;
- LoCon (every Linear of the transformer blocks, proj_in/out, ResNet convs; `GangLoRAConv2d`) plus a
  text-encoder LoRA: zorbo 8 → 33 %;
- the decisive change: the LoRA acted the same on the conditional and the unconditional branch (nothing taught
  it otherwise), so classifier-free guidance, ``e_u + 7 (e_c − e_u)``, amplified only the *base* model's text
  direction and cancelled the LoRA's. A share of the base-only renders captioned with the empty prompt
  (`uncond_share`) keeps the LoRA out of the unconditional branch, the way caption dropout on regularisation
  images does in kohya's trainer: zorbo 33 → 92 %, hat 8 → 33 %, starfield backgrounds visibly drawn (the judge
  misses the VAE-blurred stars). LoRA Composite and CMLoRA showed the same effect from the other side: their
  uncond pass runs without LoRAs, and they were the only methods that showed concepts with the older LoRAs.

Learning rate, length and loss weighting, measured on the 8 weakest concepts (40 samples each, `docs/MEASURED.md`):
the first recipe (lr 8e-3, 300 steps, Min-SNR gamma 5) gives mean concept 0.54, base 0.89; lr 4e-3 for 600
steps 0.69 / 0.91; Min-SNR gamma 1 0.63 / 0.90; both 0.75 / 0.91; plain MSE (`min_snr_gamma=None`) 0.37; lr 1.6e-2
diverges. The committed library is trained with the last (`build_library`'s HEADLINE_* settings).

Masked prior preservation (`LoRAJob.masked_prior`: the true noise as target only on the concept's own pixels, the
base model's prediction elsewhere) kept four LoRAs' single-LoRA rates and did not stop the character drowning in
compositions; on the six backgrounds it lost one concept (grid 0.90 -> 0) and left the subject painted over
(docs/MEASURED.md, "Masked prior preservation"). The library is not trained with it.

Files are saved in fp16 (kohya's ``--save_precision fp16``).

Data: single-concept renders (the concept on random base compositions) captioned with the concept's
trigger word, plus a share of base-only renders with base captions that keeps the base vocabulary intact.
Never compositions of several concepts. The result is written in kohya format (or diffusers with
`--format diffusers`) with realistic `ss_*` / modelspec metadata, and a Civitai-style `.civitai.info`
sidecar with description and tags (`--bare` writes neither: a file with no metadata at all).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .catalog import CONCEPTS_BY_NAME, Composition, caption, sample_base
from .models import SCHEDULER_CONFIG
from .render import render
from .train_base import encode_latents

TINYWORLD = Path(__file__).resolve().parents[2] / "assets" / "tinyworld"



def _shows(comp: Composition, concept: str) -> bool:
    return concept in (comp.subject, comp.clothing, comp.style, comp.background, comp.object)


def with_concept(comp: Composition, concept: str) -> Composition:
    c = CONCEPTS_BY_NAME[concept]
    if c.category == "character":
        comp.subject = concept
    elif c.category == "background":
        comp.background = concept
    else:
        setattr(comp, c.category, concept)
    return comp


def concept_set(concept: str, n: int, seed: int, base_share: float,
                content: dict | None = None) -> tuple[np.ndarray, list[Composition]]:
    """Renders of `concept` on random base compositions (`content` fixes some of their fields, e.g.
    ``{"subject": "circle", "color": "red"}``: a LoRA trained on narrow content), plus a `base_share` of
    base-only renders."""
    imgs, comps, _ = concept_set_with_masks(concept, n, seed, base_share, content, masks=False)
    return imgs, comps


def concept_set_with_masks(concept: str, n: int, seed: int, base_share: float, content: dict | None = None,
                           masks: bool = True) -> tuple[np.ndarray, list[Composition], np.ndarray | None]:
    """`concept_set` plus, per render, the pixels the concept changed (bool (n, 64, 64)): the same composition
    drawn again without the concept from the same random state, compared pixel by pixel (a base-only render:
    no pixel). The same images as `concept_set` (the masks' renders draw from copies of the random state)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        if rng.random() < base_share:
            pairs.append((sample_base(rng), None))
            continue
        comp = sample_base(rng)
        for key, value in (content or {}).items():
            setattr(comp, key, value)
        pairs.append((with_concept(dataclasses.replace(comp), concept), comp))
    imgs, diff = [], []
    for comp, without in tqdm(pairs, desc=f"render {concept}", leave=False):
        state = rng.getstate()
        imgs.append(render(comp, rng=rng))
        if masks:
            if without is None:
                diff.append(np.zeros(imgs[-1].shape[:2], bool))
            else:
                again = random.Random()
                again.setstate(state)
                plain = render(without, rng=again)
                diff.append(np.abs(imgs[-1].astype(np.int16) - plain).max(axis=-1) > 8)
    return np.stack(imgs), [c for c, _ in pairs], (np.stack(diff) if masks else None)


def latent_masks(pixel_masks: np.ndarray, factor: int = 4, dilate: int = 1, behind: bool = False) -> torch.Tensor:
    """Pixel masks (n, H, W) to latent masks (n, 1, H/f, W/f) float. A latent pixel shared by the concept and
    what lies in front of it belongs to the front layer: for a concept drawn on top (clothing, object, style,
    character) a latent pixel is in when any of its f x f pixels is, then grown by `dilate` latent pixels (the
    VAE's receptive field reaches past the block); for a background (`behind`) only when all of them are."""
    m = torch.from_numpy(pixel_masks).float().unsqueeze(1)
    if behind:
        return -F.max_pool2d(-m, factor)
    m = F.max_pool2d(m, factor)
    if dilate:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m


def lora_metadata(concept: str, rank: int, alpha: float, steps: int, seed: int, captions: list[str]) -> dict:
    c = CONCEPTS_BY_NAME[concept]
    words = Counter(w for cap in captions for w in cap.replace(",", " ").split() if len(w) > 2)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "tinyworld_v1",
        "ss_sd_model_name": "TinyWorld",
        "ss_output_name": c.trigger,
        "ss_max_train_steps": str(steps),
        "ss_seed": str(seed),
        "ss_resolution": "(64, 64)",
        "ss_tag_frequency": json.dumps({f"1_{c.trigger}": dict(words.most_common(20))}),
        "modelspec.architecture": "tinyworld/lora",
        "modelspec.title": c.trigger,
        "modelspec.trigger_phrase": c.trigger,
        "modelspec.description": c.description,
        "modelspec.date": "2026-11-24",
    }


def civitai_info(concept: str) -> dict:
    c = CONCEPTS_BY_NAME[concept]
    return {"name": c.trigger, "model": {"name": c.trigger, "type": "LORA", "description": f"<p>{c.description}</p>",
                                         "tags": [c.category, c.noun]},
            "trainedWords": [c.trigger], "baseModel": "TinyWorld", "description": c.description}



@dataclass
class LoRAJob:
    """One LoRA to train: concept, shape, seed, and where and how to write it."""
    concept: str
    out: str
    rank: int = 8
    alpha: float | None = None
    seed: int = 0
    format: str = "kohya"
    bare: bool = False
    n_images: int = 1500
    base_share: float = 0.3
    content: dict | None = None
    # kohya's --noise_offset. A retrain at 0.3 (the base's own fine-tune offset) scored mean concept 0.53 against 0.64
    # at 0.1 (clothing 0.25 vs 0.49), so 0.1 stays. Longer training alone does not help: six of the weakest trained
    # 900 steps at lr 8e-3 lost their base attributes (base_rate 0.38-0.73); a smaller learning rate for twice the
    # steps does (the headline recipe in `build_library`: lr 4e-3, 600 steps, Min-SNR gamma 1).
    noise_offset: float = 0.1
    uncond_share: float = 0.6   # share of the base-only renders captioned "" (keeps the LoRA out of CFG's uncond)
    # the loss target outside the concept's own pixels is the base model's prediction (see `train_loras`)
    masked_prior: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank


class GangLoRALinear(torch.nn.Module):
    """A frozen `nn.Linear` plus N independent LoRA pairs; the batch is N equal contiguous chunks, chunk k
    goes through pair k. Initialised like peft's `init_lora_weights="gaussian"` (down ~ N(0, 1/r), up = 0)."""

    def __init__(self, base: torch.nn.Linear, rank: int, scales: list[float], generators: list[torch.Generator]):
        super().__init__()
        self.base = base
        self.down = torch.nn.Parameter(torch.stack(
            [torch.randn(base.in_features, rank, generator=g) / rank for g in generators]))
        self.up = torch.nn.Parameter(torch.zeros(len(scales), rank, base.out_features))
        self.register_buffer("scales", torch.tensor(scales).view(-1, 1, 1))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        n = self.down.shape[0]
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), self.down)
        return self.base(x) + (torch.bmm(h, self.up) * self.scales).reshape(*x.shape[:-1], -1)


class GangLoRAConv2d(torch.nn.Module):
    """A frozen `nn.Conv2d` plus N independent LoCon pairs (down: a k×k conv to `rank` channels, up: 1×1), run as
    two grouped convolutions over the N contiguous batch chunks."""

    def __init__(self, base: torch.nn.Conv2d, rank: int, scales: list[float], generators: list[torch.Generator]):
        super().__init__()
        self.base = base
        n, cin, k = len(scales), base.in_channels, base.kernel_size
        fan_in = cin * k[0] * k[1]
        self.down = torch.nn.Parameter(torch.stack(
            [torch.randn(rank, cin, *k, generator=g) / (rank * fan_in ** 0.5 / cin ** 0.5) for g in generators]))
        self.up = torch.nn.Parameter(torch.zeros(n, base.out_channels, rank, 1, 1))
        self.register_buffer("scales", torch.tensor(scales).view(n, 1, 1, 1, 1))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        n, b = self.down.shape[0], x.shape[0] // self.down.shape[0]
        base = self.base
        xg = x.reshape(n, b, *x.shape[1:]).transpose(0, 1).reshape(b, n * x.shape[1], *x.shape[2:])
        h = F.conv2d(xg, self.down.flatten(0, 1), None, base.stride, base.padding, base.dilation, groups=n)
        d = F.conv2d(h, (self.up * self.scales).flatten(0, 1), groups=n)
        d = d.reshape(b, n, -1, *d.shape[2:]).transpose(0, 1).reshape(n * b, -1, *d.shape[2:])
        return base(x) + d


NETWORKS = ("locon", "attention")


def attach_gang(unet, rank: int, scales: list[float], seeds: list[int],
                network: str = "locon") -> dict[str, torch.nn.Module]:
    """Wrap `unet`'s adapted layers in gang wrappers; returns {module path: wrapper}.

    ``network="attention"``: only the attention projections (to_q/k/v/out.0), as a plain kohya/PEFT LoRA;
    the library's community variants are such files (smaller, and weaker at drawing, as many real ones).

    LoCon targets, as kohya's LoRA-C3Lier / LyCORIS `locon` train them: every Linear of the transformer blocks
    (attention projections and feed-forward), `proj_in`/`proj_out`, and the ResNet convolutions. Attention-only
    LoRAs were measured too weak on TinyWorld: its UNet is 32-128 channels wide, so the attention projections
    hold little of what draws a texture or a sprite (denoising loss on concept renders stayed 2-4x the base
    model's on its own data, and concepts did not appear in samples at weight 1)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    wrapped = {}
    for name, module in list(unet.named_modules()):
        for attr, child in list(module.named_children()):
            path = f"{name}.{attr}" if name else attr
            in_block = ".attentions." in f".{path}" or ".resnets." in f".{path}"
            if not in_block or attr == "time_emb_proj":
                continue
            if network == "attention" and not (isinstance(child, torch.nn.Linear) and
                                               any(f".attn{i}." in f".{path}" for i in (1, 2)) and
                                               attr in ("to_q", "to_k", "to_v", "0")):
                continue
            if isinstance(child, torch.nn.Linear):
                gang = GangLoRALinear(child, rank, scales, generators)
            elif isinstance(child, torch.nn.Conv2d) and ("resnets" in path or attr in ("proj_in", "proj_out")):
                if attr == "conv_shortcut":
                    continue
                gang = GangLoRAConv2d(child, rank, scales, generators)
            else:
                continue
            setattr(module, attr, gang)
            wrapped[path] = gang
    return wrapped


TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def attach_text_gang(text_encoder, rank: int, scales: list[float], seeds: list[int]) -> dict[str, GangLoRALinear]:
    """Wrap the CLIP text encoder's attention and MLP Linears (kohya's ``lora_te`` targets) in `GangLoRALinear`s.

    The trigger words are rare tokens the base text encoder never saw: its output barely tells them apart
    (cosine 0.998 between two captions that differ only in the trigger), so without a text-encoder LoRA
    the UNet LoRA cannot key on its trigger and learns a weak, unconditional average."""
    generators = [torch.Generator().manual_seed(50_000 + s) for s in seeds]
    wrapped = {}
    for name, module in list(text_encoder.named_modules()):
        for attr in TEXT_TARGETS:
            child = getattr(module, attr, None)
            if isinstance(child, torch.nn.Linear):
                gang = GangLoRALinear(child, rank, scales, generators)
                setattr(module, attr, gang)
                wrapped[f"{name}.{attr}"] = gang
    return wrapped


def gang_member(wrapped: dict[str, GangLoRALinear], k: int, alpha: float, family: str = "tinyworld",
                text: dict[str, GangLoRALinear] | None = None, dtype: torch.dtype = torch.float32):
    """LoRA number k of a gang in the canonical form (kohya down = (r, in), up = (out, r)); `dtype` is the
    saved precision (kohya's ``--save_precision``)."""
    from ..library.canonical import LoRA, ModuleLoRA

    def pair(g):
        if isinstance(g, GangLoRAConv2d):
            down, up, kind = g.down[k], g.up[k], "locon"
        else:
            down, up, kind = g.down[k].T, g.up[k].T, "lora"
        return ModuleLoRA(kind, {"down": down.detach().cpu().to(dtype).contiguous(),
                                 "up": up.detach().cpu().to(dtype).contiguous()},
                          alpha=float(alpha))

    modules = {f"unet.{path}": pair(g) for path, g in wrapped.items()}
    modules.update({f"text_encoder.text_model.{path}": pair(g) for path, g in (text or {}).items()})
    return LoRA(modules, family=family)


def min_snr_weights(snr: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights ``min(SNR, gamma) / SNR`` (Min-SNR weighting, kohya's ``--min_snr_gamma``): high-SNR
    (low-noise) timesteps count less; ``gamma=None`` (or 0): plain MSE, every weight 1."""
    if not gamma:
        return torch.ones_like(snr)
    return torch.clamp(snr, max=gamma) / snr


def train_loras(jobs: list[LoRAJob], steps: int = 400, batch_per_lora: int = 8, lr: float = 8e-3,
                model: str | Path = TINYWORLD, threads: int = 2, text_encoder_lr: float | None = 0.5,
                network: str = "locon", save_dtype: torch.dtype = torch.float16, device: str = "cpu",
                min_snr_gamma: float | None = 5.0) -> list[str]:
    """Train `jobs` (same rank) jointly for `steps` steps; write each file; return the written paths. On
    ``device="cuda"`` the VAE encodes and the UNet and text encoder train there under bf16 autocast; data, noise
    and timesteps still come from each LoRA's CPU generators (the same draws as on the CPU).

    A job with ``masked_prior``: the loss target is the true noise only where the concept changed the picture (the
    render against the same composition drawn without it, `concept_set_with_masks`); everywhere else, and on the
    base-only renders, it is the base model's own prediction for the same noisy latent and caption (prior
    preservation by distillation, as kohya's masked loss plus regularisation images generated by the base): meant
    to teach the LoRA its concept's pixels and nothing else. Measured, it did not stop LoRAs from drowning the
    character in compositions (the module docstring)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..library.formats import write_lora

    ranks = {j.rank for j in jobs}
    if len(ranks) != 1:
        raise ValueError(f"a gang trains LoRAs of one rank; got ranks {sorted(ranks)}")
    torch.set_num_threads(threads)
    n = len(jobs)
    device = torch.device(device)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).eval().to(device)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    unet.requires_grad_(False)
    te.requires_grad_(False)
    rank = ranks.pop()
    wrapped = attach_gang(unet, rank, [j.scale for j in jobs], [j.seed for j in jobs], network)
    groups = [{"params": [p for g in wrapped.values() for p in (g.down, g.up)], "lr_scale": 1.0}]
    text = {}
    if text_encoder_lr:   # a text-encoder LoRA too, at text_encoder_lr × lr (kohya trains both by default)
        text = attach_text_gang(te, rank, [j.scale for j in jobs], [j.seed for j in jobs])
        groups.append({"params": [p for g in text.values() for p in (g.down, g.up)], "lr_scale": text_encoder_lr})
    unet.to(device)   # the gang wrappers' parameters move with it (same Parameter objects)
    te.to(device)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)

    masked_prior = any(j.masked_prior for j in jobs)
    data, masks = [], []
    for j in jobs:
        imgs, comps, pixel_masks = concept_set_with_masks(j.concept, j.n_images, j.seed + 1000, j.base_share,
                                                          j.content, masks=j.masked_prior)
        mean, std = (torch.from_numpy(a.astype(np.float32)) for a in encode_latents(vae, imgs))
        data.append((mean, std, comps, random.Random(j.seed), torch.Generator().manual_seed(j.seed + 1)))
        if masked_prior:   # a job without it: the true noise everywhere (mask 1)
            masks.append(latent_masks(pixel_masks, factor=imgs.shape[1] // mean.shape[-1],
                                      behind=CONCEPTS_BY_NAME[j.concept].category == "background")
                         if j.masked_prior else torch.ones(len(comps), 1, *mean.shape[-2:]))
    scale = vae.config.scaling_factor
    del vae
    is_base = [[not _shows(c, j.concept) for c in comps] for j, (_, _, comps, _, _) in zip(jobs, data)]
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)
    captions_seen: list[list[str]] = [[] for _ in jobs]
    t0 = time.time()
    desc = jobs[0].concept if n == 1 else f"{n} loras r{jobs[0].rank}"
    gang_layers = (*wrapped.values(), *text.values())   # switched off for the base model's prior (masked_prior)
    for step in tqdm(range(steps), desc=f"train {desc}"):
        zs, noises, ts, caps, ms = [], [], [], [], []
        for k, (mean, std, comps, rng, g) in enumerate(data):   # every draw from the LoRA's own generators
            idx = torch.randint(0, len(comps), (batch_per_lora,), generator=g)
            if masked_prior:
                ms.append(masks[k][idx])
            chunk = [caption(comps[i], rng) for i in idx.tolist()]
            if jobs[k].uncond_share:
                chunk = ["" if is_base[k][i] and rng.random() < jobs[k].uncond_share else cap
                         for i, cap in zip(idx.tolist(), chunk)]
            captions_seen[k].extend(chunk[:2])
            caps.extend(chunk)
            zs.append((mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale)
            noise = torch.randn(zs[-1].shape, generator=g)
            if jobs[k].noise_offset:   # kohya's --noise_offset: the mean of x_T no longer gives the image away
                noise = noise + jobs[k].noise_offset * torch.randn(*noise.shape[:2], 1, 1, generator=g)
            noises.append(noise)
            ts.append(torch.randint(0, 1000, (batch_per_lora,), generator=g))
        z, noise, t = torch.cat(zs), torch.cat(noises), torch.cat(ts)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        zt = noise_sched.add_noise(z, noise, t)
        w = min_snr_weights(snr[t], min_snr_gamma)
        zt, noise, t, w, ids = (x.to(device) for x in (zt, noise, t, w, ids))
        target = noise
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if masked_prior:   # the base model's prediction outside the concept's pixels
                for layer in gang_layers:
                    layer.enabled = False
                with torch.no_grad():
                    prior = unet(zt, t, te(ids)[0]).sample.float()
                for layer in gang_layers:
                    layer.enabled = True
                m = torch.cat(ms).to(device)
                target = m * noise + (1 - m) * prior
            with torch.set_grad_enabled(bool(text)):
                cond = te(ids)[0]
            pred = unet(zt, t, cond).sample
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3)) * w
        loss = per_sample.view(n, batch_per_lora).mean(dim=1).sum()   # each LoRA: the mean over its own chunk
        step_lr = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = step_lr * group["lr_scale"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.time() - t0

    written = []
    for k, j in enumerate(jobs):
        alpha = float(j.alpha or j.rank)
        lora = gang_member(wrapped, k, alpha, text=text, dtype=save_dtype)
        if not j.bare:
            lora.metadata = lora_metadata(j.concept, j.rank, alpha, steps, j.seed, captions_seen[k])
            lora.metadata.update({"ss_batch_size_per_device": str(batch_per_lora), "ss_learning_rate": str(lr),
                                  "ss_network_module": "lycoris.kohya" if network == "locon" else "networks.lora",
                                  "ss_network_args": json.dumps({"algo": "locon", "conv_dim": str(j.rank),
                                                                 "conv_alpha": str(alpha)} if network == "locon" else {}),
                                  "ss_noise_offset": str(j.noise_offset),
                                  "ss_min_snr_gamma": str(min_snr_gamma),
                                  "ss_masked_loss": str(j.masked_prior),
                                  "ss_training_time_s": f"{seconds / n:.1f}"})
        Path(j.out).parent.mkdir(parents=True, exist_ok=True)
        out = write_lora(lora, j.out, format=j.format)
        if not j.bare:
            Path(out).with_suffix(".civitai.info").write_text(json.dumps(civitai_info(j.concept), indent=2))
        written.append(str(out))
    print(json.dumps({"loras": [j.concept for j in jobs], "rank": jobs[0].rank, "steps": steps,
                      "seconds": round(seconds, 1)}))
    return written


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", nargs="+", required=True, choices=sorted(CONCEPTS_BY_NAME))
    ap.add_argument("--out", required=True, help="a .safetensors path for one concept, a folder for several")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=None, help="default: rank")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8, help="samples per LoRA per step")
    ap.add_argument("--lr", type=float, default=8e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-images", type=int, default=1500)
    ap.add_argument("--base-share", type=float, default=0.25, help="share of base-only samples (prior preservation)")
    ap.add_argument("--model", default=str(TINYWORLD))
    ap.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    ap.add_argument("--bare", action="store_true", help="no metadata and no sidecar")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast)")
    ap.add_argument("--min-snr-gamma", type=float, default=5.0,
                    help="Min-SNR loss weight min(SNR, gamma) / SNR, as kohya's --min_snr_gamma; 0: plain MSE")
    ap.add_argument("--masked-prior", action="store_true",
                    help="learn only the concept's pixels: elsewhere the target is the base model's prediction")
    args = ap.parse_args(argv)
    outs = ([args.out] if len(args.concept) == 1 and args.out.endswith(".safetensors")
            else [str(Path(args.out) / f"{c}.safetensors") for c in args.concept])
    jobs = [LoRAJob(c, o, rank=args.rank, alpha=args.alpha, seed=args.seed, format=args.format, bare=args.bare,
                    n_images=args.n_images, base_share=args.base_share, masked_prior=args.masked_prior)
            for c, o in zip(args.concept, outs)]
    train_loras(jobs, steps=args.steps, batch_per_lora=args.batch, lr=args.lr, model=args.model,
                threads=args.threads, device=args.device, min_snr_gamma=args.min_snr_gamma or None)


if __name__ == "__main__":
    main()
