"""Train one TinyWorld LoRA for one catalogue concept (peft LoraConfig on the UNet attention projections).

    python -m studio.tinyworld.train_lora --concept zorbo --rank 8 --steps 600 --out assets/loras/zorbo.safetensors

Data: single-concept renders (the concept on random base compositions) captioned with the concept's
trigger word, plus a share of base-only renders with base captions that keeps the base vocabulary intact.
Never compositions of several concepts. The result is written in kohya format (or diffusers with
`--format diffusers`) with realistic `ss_*` / modelspec metadata, and a Civitai-style `.civitai.info`
sidecar with description and tags (`--bare` writes neither: a file with no metadata at all).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
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
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def with_concept(comp: Composition, concept: str) -> Composition:
    c = CONCEPTS_BY_NAME[concept]
    if c.category == "character":
        comp.subject = concept
    elif c.category == "background":
        comp.background = concept
    else:
        setattr(comp, c.category, concept)
    return comp


def concept_set(concept: str, n: int, seed: int, base_share: float) -> tuple[np.ndarray, list[Composition]]:
    rng = random.Random(seed)
    comps = [sample_base(rng) if rng.random() < base_share else with_concept(sample_base(rng), concept)
             for _ in range(n)]
    imgs = np.stack([render(c, rng=rng) for c in tqdm(comps, desc=f"render {concept}", leave=False)])
    return imgs, comps


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


def peft_to_canonical(state: dict[str, torch.Tensor], alpha: float, family: str = "tinyworld"):
    from ..library.canonical import LoRA, ModuleLoRA

    modules = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        path = key.split(".lora_A.")[0]
        b = state[key.replace(".lora_A.", ".lora_B.")]
        modules[f"unet.{path}"] = ModuleLoRA("lora", {"down": a.detach().clone(), "up": b.detach().clone()},
                                             alpha=float(alpha))
    return LoRA(modules, family=family)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", required=True, choices=sorted(CONCEPTS_BY_NAME))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=None, help="default: rank")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-images", type=int, default=1500)
    ap.add_argument("--base-share", type=float, default=0.25, help="share of base-only samples (prior preservation)")
    ap.add_argument("--model", default=str(TINYWORLD))
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    ap.add_argument("--bare", action="store_true", help="no metadata and no sidecar")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    alpha = args.alpha or float(args.rank)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    te = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    unet.requires_grad_(False)
    te.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=alpha, target_modules=ATTENTION_TARGETS,
                                init_lora_weights="gaussian"))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    imgs, comps = concept_set(args.concept, args.n_images, args.seed + 1000, args.base_share)
    mean, std = (torch.from_numpy(a.astype(np.float32)) for a in encode_latents(vae, imgs))
    scale = vae.config.scaling_factor
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    captions_seen: list[str] = []
    t0 = time.time()
    for step in tqdm(range(args.steps), desc=f"lora {args.concept}"):
        idx = torch.randint(0, len(comps), (args.batch,), generator=gen)
        caps = [caption(comps[i], rng) for i in idx.tolist()]
        captions_seen.extend(caps[:2])
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            cond = te(ids)[0]
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        pred = unet(noise_sched.add_noise(z, noise, t), t, cond).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = float(lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.time() - t0

    from ..library.formats import write_lora

    lora = peft_to_canonical(get_peft_model_state_dict(unet), alpha)
    if not args.bare:
        lora.metadata = lora_metadata(args.concept, args.rank, alpha, args.steps, args.seed, captions_seen)
        lora.metadata["ss_training_time_s"] = f"{seconds:.1f}"
    out = write_lora(lora, args.out, format=args.format)
    if not args.bare:
        Path(out).with_suffix(".civitai.info").write_text(json.dumps(civitai_info(args.concept), indent=2))
    print(json.dumps({"concept": args.concept, "out": str(out), "rank": args.rank, "alpha": alpha,
                      "steps": args.steps, "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
