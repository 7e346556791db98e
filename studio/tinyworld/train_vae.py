"""Train TinyWorld's AutoencoderKL. Resumable: `python -m studio.tinyworld.train_vae --steps 1500`.

Data: base-vocabulary renders and generic textures (never a LoRA concept). Saves checkpoints under
`--work` every 100 steps and the final model with `save_pretrained` under `--out`, its latent scaling
factor measured on the training set.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import cached, vae_set
from .models import build_vae, n_params


def to_tensor(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b + 1) / 2).item()
    return 10 * np.log10(1.0 / max(mse, 1e-10))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--work", default="runs/vae")
    ap.add_argument("--out", default="assets/tinyworld/vae")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = cached(work / "train.npz", lambda: {"x": vae_set(24000, seed=1)})["x"]
    val = cached(work / "val.npz", lambda: {"x": vae_set(512, seed=2)})["x"]
    val_base = to_tensor(val[0::2][:128])

    torch.manual_seed(0)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    step, seconds = 0, 0.0
    ckpt = work / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)  # our own checkpoint
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seconds = state["step"], state["seconds"]
        print(f"resumed at step {step}")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: float(min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps)))),
        last_epoch=step - 1 if step else -1)
    rng = np.random.default_rng(step)
    bar = tqdm(total=args.steps, initial=step, desc="vae")
    vae.train()
    while step < args.steps:
        t0 = time.time()
        idx = rng.integers(0, len(train), args.batch)
        x = to_tensor(train[idx])
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        seconds += time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0 or step == args.steps:
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds}, ckpt)
    bar.close()

    vae.eval()
    with torch.no_grad():
        rec = vae.decode(vae.encode(val_base).latent_dist.mode()).sample
        val_psnr = psnr(rec, val_base)
        lat = torch.cat([vae.encode(to_tensor(train[i: i + 256])).latent_dist.mode() for i in range(0, 4096, 256)])
        scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(args.out)
    stats = {"component": "vae", "steps": step, "train_seconds": round(seconds, 1), "params": n_params(vae),
             "psnr_base_renders_db": round(val_psnr, 2), "scaling_factor": scaling}
    (Path(args.out) / "training.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
