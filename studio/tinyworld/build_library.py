"""Train TinyWorld's whole LoRA library: one headline LoRA per concept, then the "community" variants.

    python -m studio.tinyworld.build_library [--only headline|community] [--steps 600]

Resumable: a file that exists is skipped. Headline LoRAs go to `assets/loras/<concept>.safetensors` (kohya,
full metadata, `.civitai.info` sidecar). Community variants go to `assets/loras/community/` with ranks 4-32,
other seeds, steps and alphas, some in diffusers format and some with no metadata at all. The ground truth
(concept, category, style family per file) is written to `assets/loras_labels.json`, which the product never
reads at run time.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tqdm import tqdm

from .catalog import CONCEPTS
from .train_lora import main as train_lora

ROOT = Path(__file__).resolve().parents[2]
LORAS = ROOT / "assets" / "loras"
LABELS = ROOT / "assets" / "loras_labels.json"


def plan(steps: int) -> list[dict]:
    jobs = [dict(concept=c.name, rank=8, alpha=8.0, steps=steps, seed=0, format="kohya", bare=False,
                 out=LORAS / f"{c.name}.safetensors", kind="headline") for c in CONCEPTS]
    rng = random.Random(7)
    for c in CONCEPTS:
        for v in range(3):
            rank = rng.choice([4, 8, 16, 32])
            fmt = "diffusers" if v == 1 else "kohya"
            bare = v == 2
            jobs.append(dict(concept=c.name, rank=rank, alpha=float(rng.choice([rank, rank / 2, 1])),
                             steps=rng.choice([steps // 2, steps, int(steps * 1.5)]), seed=100 + v, format=fmt,
                             bare=bare, out=LORAS / "community" / f"{c.name}_v{v}_r{rank}.safetensors",
                             kind="community"))
    return jobs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["headline", "community"], default=None)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args(argv)
    jobs = [j for j in plan(args.steps) if args.only in (None, j["kind"])]
    labels = json.loads(LABELS.read_text()) if LABELS.exists() else {}
    concepts = {c.name: c for c in CONCEPTS}
    for job in tqdm(jobs, desc="library"):
        rel = str(Path(job["out"]).relative_to(ROOT / "assets"))
        c = concepts[job["concept"]]
        labels[rel] = {"concept": c.name, "category": c.category, "style_family": c.style_family,
                       "kind": job["kind"], "rank": job["rank"], "seed": job["seed"], "format": job["format"],
                       "bare": job["bare"]}
        if Path(job["out"]).exists():
            continue
        argv = ["--concept", job["concept"], "--rank", str(job["rank"]), "--alpha", str(job["alpha"]),
                "--steps", str(job["steps"]), "--seed", str(job["seed"]), "--out", str(job["out"]),
                "--format", job["format"]] + (["--bare"] if job["bare"] else [])
        train_lora(argv)
        LABELS.write_text(json.dumps(labels, indent=2, sort_keys=True))
    LABELS.write_text(json.dumps(labels, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
