"""Train TinyWorld's UNet and CLIP text encoder jointly on base-vocabulary renders. Resumable.

    python -m studio.tinyworld.train_base --steps 4000 [--minutes 60]

The VAE must be trained first (its latents are precomputed once). No LoRA concept appears here: captions
come from `sample_base` compositions only. Epsilon prediction with Min-SNR-5 loss weighting, 10 % caption
dropout for classifier-free guidance, an EMA of the weights. `--export` writes the whole pipeline with
`save_pretrained` from the latest checkpoint's EMA weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .catalog import Composition, caption
from .data import base_set, cached
from .models import SCHEDULER_CONFIG, build_text_encoder, build_unet, n_params
from .tokenizer import build_clip_tokenizer, compact_tokenizer_json
from .train_vae import to_tensor


def encode_latents(vae, imgs: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float16 of the VAE's latent distribution per image, computed on the VAE's device."""
    device = next(vae.parameters()).device
    means, stds = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(imgs), batch), desc="encode latents", leave=False):
            dist = vae.encode(to_tensor(imgs[i: i + batch]).to(device)).latent_dist
            means.append(dist.mean.cpu().numpy())
            stds.append(dist.std.cpu().numpy())
    return np.concatenate(means).astype(np.float16), np.concatenate(stds).astype(np.float16)


def comps_from_arrays(arr: dict) -> list[Composition]:
    keys = ["subject", "color", "background", "size", "position"]
    return [Composition(**{k: str(arr[k][i]) for k in keys}) for i in range(len(arr["subject"]))]


def export_pipeline(vae, unet, text_encoder, tokenizer, out: str | Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    compact_tokenizer_json(Path(out) / "tokenizer")
    # stored in fp16 to keep assets/ small (CPU loads them back as fp32)
    unet.to(torch.float16).save_pretrained(str(Path(out) / "unet"))
    text_encoder.to(torch.float16).save_pretrained(str(Path(out) / "text_encoder"))
    unet.to(torch.float32)
    text_encoder.to(torch.float32)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4000, help="length of the LR schedule")
    ap.add_argument("--minutes", type=float, default=0, help="training-time budget: the LR decays over it, then training stops with a checkpoint")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--n-images", type=int, default=40000)
    ap.add_argument("--vae", default="assets/tinyworld/vae")
    ap.add_argument("--work", default="runs/base")
    ap.add_argument("--out", default="assets/tinyworld")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: on CUDA the UNet and text encoder train under "
                    "bf16 autocast (data, noise and the random draws stay on the CPU generator: the same "
                    "samples as on CPU)")
    ap.add_argument("--noise-offset", type=float, default=0.3,
                    help="std of a per-image, per-channel constant added to the noise, so that the global colour "
                         "of a picture is learned from the text rather than read from the noise (16x16 latents "
                         "leak it). At 0.1 black backgrounds came out gray (judge: 10 of 48 black backgrounds right); "
                         "0.3 fixed that in a 12-minute fine-tune (48 of 48)")
    ap.add_argument("--init", default=None, help="start from this pipeline folder's UNet and text encoder "
                    "(e.g. assets/tinyworld) when no checkpoint exists, with a fresh optimizer; its training.json "
                    "is kept as the earlier stage of the exported one")
    ap.add_argument("--export", action="store_true", help="only export the pipeline from the checkpoint")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL, DDPMScheduler

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(work / "tokenizer")
    vae = AutoencoderKL.from_pretrained(args.vae).eval().to(args.device)   # encodes the training set
    scale = vae.config.scaling_factor

    def make_set():
        imgs, comps = base_set(args.n_images, seed=11)
        mean, std = encode_latents(vae, imgs)
        cols = {k: np.array([getattr(c, k) for c in comps]) for k in ["subject", "color", "background", "size",
                                                                        "position"]}
        return {"mean": mean, "std": std, **cols}

    # the exported training.json lists every stage: the --init model's own log first (read before any export)
    earlier = json.loads((work / "earlier_stages.json").read_text()) if (work / "earlier_stages.json").exists() else []
    if args.init and not earlier and (Path(args.init) / "training.json").exists():
        init_log = json.loads((Path(args.init) / "training.json").read_text())
        earlier = init_log.pop("stages", []) + [init_log]
        (work / "earlier_stages.json").write_text(json.dumps(earlier, indent=2))

    data = cached(work / "latents.npz", make_set)
    vae.to("cpu")   # exported with the pipeline, from the CPU like the UNet and text encoder
    comps = comps_from_arrays(data)
    mean = torch.from_numpy(data["mean"].astype(np.float32))
    std = torch.from_numpy(data["std"].astype(np.float32))

    torch.manual_seed(0)
    unet, text_encoder = build_unet(), build_text_encoder()
    ckpt = work / "ckpt.pt"
    if args.init and not ckpt.exists():
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(args.init, subfolder="text_encoder", dtype=torch.float32)
        print(f"initialised from {args.init}")
    device = torch.device(args.device)
    unet.to(device)
    text_encoder.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    step, seconds = 0, 0.0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=True, map_location=device)
        unet.load_state_dict(st["unet"])
        text_encoder.load_state_dict(st["te"])
        ema_unet.load_state_dict(st["ema_unet"])
        ema_te.load_state_dict(st["ema_te"])
        opt.load_state_dict(st["opt"])
        step, seconds = st["step"], st["seconds"]
        print(f"resumed at step {step}")

    def save():
        torch.save({"unet": unet.state_dict(), "te": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                    "ema_te": ema_te.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds},
                   work / "ckpt.tmp")
        (work / "ckpt.tmp").replace(ckpt)

    def export():
        ema_unet.eval()
        ema_unet.to("cpu")
        ema_te.to("cpu")
        export_pipeline(vae, ema_unet, ema_te, tokenizer, args.out)
        ema_unet.to(device)
        ema_te.to(device)
        stats = {"component": "unet+text_encoder", "steps": step, "train_seconds": round(seconds, 1),
                 "unet_params": n_params(ema_unet), "text_encoder_params": n_params(ema_te),
                 "batch": args.batch, "n_train_images": args.n_images, "lr": args.lr,
                 "noise_offset": args.noise_offset}
        if earlier:
            stats["stages"] = earlier
        (Path(args.out) / "training.json").write_text(json.dumps(stats, indent=2))
        print(json.dumps(stats))

    if args.export:
        export()
        return

    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    warm = 200

    def lr_at(s):
        # cosine over whichever budget runs out first: steps, or minutes of training time
        progress = s / args.steps
        if args.minutes:
            progress = max(progress, seconds / (args.minutes * 60))
        progress = min(progress, 1.0)
        return min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * progress)))

    rng = random.Random(step)
    gen = torch.Generator().manual_seed(step)
    unet.train()
    text_encoder.train()
    bar = tqdm(total=args.steps, initial=step, desc="unet+te")
    while step < args.steps:
        t0 = time.time()
        idx = torch.randint(0, len(comps), (args.batch,), generator=gen)
        caps = [caption(comps[i], rng) if rng.random() >= 0.1 else "" for i in idx.tolist()]
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(z.shape, generator=gen)
        noise += args.noise_offset * torch.randn(z.shape[0], z.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        zt = noise_sched.add_noise(z, noise, t)
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        zt, noise, t, w, ids = (x.to(device, non_blocking=True) for x in (zt, noise, t, w, ids))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond = text_encoder(ids)[0]
            pred = unet(zt, t, cond).sample
        loss = (F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        for g in opt.param_groups:
            g["lr"] = float(args.lr * lr_at(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in ((unet, ema_unet), (text_encoder, ema_te)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - decay)
        step += 1
        seconds += time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0:
            save()
        if args.minutes and seconds > args.minutes * 60:
            break
    bar.close()
    save()
    export()


if __name__ == "__main__":
    main()
