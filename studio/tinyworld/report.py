"""Write `assets/TINYWORLD.md`: training time per component, parameter counts, file sizes, seconds per image.

    python -m studio.tinyworld.report

Every number is read from the training logs the scripts wrote beside the assets, from the files themselves,
or measured here (seconds per image).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"
ASSETS_LIMIT_MB = 60   # all of `assets/` (`test_assets_stay_small`): issue 2 asks <= 60 MB


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def library_rows() -> list[str]:
    """The LoRA library (`assets/loras_labels.json`, written by `build_library`): one table row per kind."""
    from collections import defaultdict

    from safetensors import safe_open

    labels = json.loads((ASSETS / "loras_labels.json").read_text())
    kinds = defaultdict(list)
    for rel, lab in labels.items():
        if rel.startswith("assets/") and (ROOT / rel).is_file():   # what is committed (runs/ is built on demand)
            kinds[lab["kind"]].append((rel, lab))
    rows = ["| kind | files | ranks | network | formats | no metadata | steps | files size |",
            "|---|---:|---|---|---|---:|---|---:|"]
    for kind, items in sorted(kinds.items()):
        nets = set()
        for rel, _ in items:
            with safe_open(str(ROOT / rel), "pt") as f:
                keys = list(f.keys())
            nets.add("LoCon (attn, ff, resnets) + TE" if any("resnets" in k for k in keys) else
                     "attention + TE" if any("lora_te" in k or "text_encoder" in k for k in keys) else "attention")
        size = sum((ROOT / rel).stat().st_size for rel, _ in items)
        rows.append(f"| {kind} | {len(items)} | {', '.join(str(r) for r in sorted({l['rank'] for _, l in items}))} | "
                    f"{'; '.join(sorted(nets))} | {', '.join(sorted({l['format'] for _, l in items}))} | "
                    f"{sum(bool(l['bare']) for _, l in items)} | "
                    f"{', '.join(str(x) for x in sorted({l['steps'] for _, l in items}))} | {_mb(size)} |")
    return rows


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def seconds_per_image(n: int = 16, steps: int = 25) -> float:
    import torch

    from ..api import Studio

    studio = Studio(device="cpu")
    studio.generate("a red star on a black background", n=2, steps=steps)  # warm-up
    t0 = time.time()
    studio.generate("a blue circle on a white background", n=n, steps=steps, batch_size=n)
    return (time.time() - t0) / n, torch.get_num_threads()


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.machine import machine

    tw = ASSETS / "tinyworld"
    vae = json.loads((tw / "vae" / "training.json").read_text())
    base = json.loads((tw / "training.json").read_text())
    stages = base.get("stages", []) + [base]   # train_base --init: earlier stages first
    judge = json.loads((ASSETS / "judge" / "accuracy.json").read_text())
    judge_stages = judge.get("stages", [judge])
    spi, threads = seconds_per_image()
    m = machine()
    rows = [
        ("VAE (AutoencoderKL)", vae["params"], vae["train_seconds"], f"{vae['steps']} steps × 32",
         _size(tw / "vae"), f"PSNR {vae['psnr_base_renders_db']} dB on held-out base renders"),
        ("UNet (UNet2DConditionModel)", base["unet_params"], sum(s["train_seconds"] for s in stages),
         " then ".join(f"{s['steps']} steps × {s['batch']} (lr {s['lr']:g}, noise offset {s.get('noise_offset', 0.1)})"
                       for s in stages), _size(tw / "unet"),
         "trained jointly with the text encoder" + (", later stages fine-tune the earlier" if len(stages) > 1 else "")),
        ("Text encoder (CLIPTextModel)", base["text_encoder_params"], None, "(joint)", _size(tw / "text_encoder"),
         "49 408-token embedding: most parameters are the vocabulary table"),
        ("Tokenizer (CLIPTokenizer)", 0, 0, "built offline", _size(tw / "tokenizer"), "ids equal open_clip's"),
        ("Judge (CNN)", judge["params"], sum(s["train_seconds"] for s in judge_stages),
         " then ".join(f"{s['steps']} steps × 64 ({s.get('vae_share', 0):.0%} VAE round trips)" for s in judge_stages),
         _size(ASSETS / "judge"), "min held-out accuracy " + f"{min(judge['accuracy'].values()):.4f}"),
    ]
    lines = [
        "# TinyWorld assets",
        "",
        "Written by `python -m studio.tinyworld.report` from the training logs beside the assets.",
        "",
        f"Seconds per image measured on: {m['cpu']}, {m['cores']} cores, torch {m.get('torch')}. Training ran on 2-core CPU VMs (2 threads; not always this one), no GPU.",
        "",
        "| component | parameters | training time | schedule | files | note |",
        "|---|---:|---:|---|---:|---|",
    ]
    for name, params, secs, sched, size, note in rows:
        t = "—" if secs is None else (f"{secs / 60:.1f} min" if secs else "0")
        lines.append(f"| {name} | {params:,} | {t} | {sched} | {_mb(size)} | {note} |")
    lines += [
        "",
        "## LoRA library (`python -m studio.tinyworld.build_library`; committed: `assets/loras/`, the headline set, "
        "resized with sv_fro 0.95; `runs/community/` is built on demand for the benchmarks)",
        "",
        *library_rows(),
        "",
        f"All of `assets/`: {_mb(_size(ASSETS))} (limit {ASSETS_LIMIT_MB} MB; `test_assets_stay_small`).",
        "",
        f"Sampling on CPU ({threads} threads, DPM-Solver++ 25 steps, CFG 7, batch 16): "
        f"**{spi:.3f} s per image** at 64×64.",
        "",
        "## Judge accuracy on held-out renders",
        "",
        "| head | renders | the same renders after TinyWorld's VAE |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v:.4f} | {judge['accuracy_vae_roundtrip'][k]:.4f} |" for k, v in judge["accuracy"].items()]
    lines += ["", f"({judge['heldout_renders']} held-out renders; trained on {judge['train_renders']} renders and "
                  "their VAE round trips, never on generated images.)", ""]
    (ASSETS / "TINYWORLD.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
