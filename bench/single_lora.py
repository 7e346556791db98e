"""Single-LoRA fidelity: each headline TinyWorld LoRA alone, with its trigger word, 20 samples, judged.

    python bench/single_lora.py        # writes bench/results/single_lora.json

concept_rate: the judge finds the LoRA's concept. base_rate: the asked base attributes (colour; shape unless
the LoRA is a character; plain background unless it is a background LoRA) are right. A no-LoRA baseline with
the same prompts is reported beside each (a judge head can fire on base samples).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from studio.api import Studio  # noqa: E402
from studio.tinyworld.catalog import CONCEPTS, CONCEPTS_BY_NAME, caption, sample_base  # noqa: E402
from studio.tinyworld.judge import JudgeModel  # noqa: E402
from studio.tinyworld.train_lora import with_concept  # noqa: E402

HEAD = {"character": "subject", "background": "background", "clothing": "clothing", "style": "style",
        "object": "object"}


def base_hits(comp, pred, category) -> list[bool]:
    hits = [pred["color"] == comp.color]
    if category != "character":
        hits.append(pred["subject"] == comp.subject)
    if category != "background":
        hits.append(pred["background"] == comp.background)
    return hits


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--library", default=str(ROOT / "assets" / "loras"))
    ap.add_argument("--model", default=None, help="default: the committed TinyWorld")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "single_lora.json"))
    ap.add_argument("--concepts", default=None, help="comma-separated subset (a quick check; not for the result)")
    args = ap.parse_args(argv)

    studio = Studio(model=args.model, library=args.library)
    judge = JudgeModel()
    report = {}
    chosen = [c for c in CONCEPTS if args.concepts is None or c.name in args.concepts.split(",")]
    for concept in chosen:
        rng = random.Random(zlib.crc32(concept.name.encode()))   # str hash() changes per process: not a seed
        comps = [with_concept(sample_base(rng), concept.name) for _ in range(args.n)]
        prompts = [caption(c, rng) for c in comps]
        seeds = [5000 + i for i in range(args.n)]
        head = HEAD[concept.category]
        row = {}
        for label, loras in (("lora", [(concept.name, 1.0)]), ("no_lora", None)):
            images = [r.image for r in studio.generate_many(prompts, seeds, steps=args.steps, cfg=args.cfg,
                                                              loras=loras, progress=False)]
            preds = judge.predict(images)
            present = np.mean([p[head] == concept.name for p in preds])
            base = np.mean([np.mean(base_hits(c, p, concept.category)) for c, p in zip(comps, preds)])
            row[label] = (float(present), float(base))
        report[concept.name] = {"category": concept.category, "trigger": CONCEPTS_BY_NAME[concept.name].trigger,
                                "concept_rate": round(row["lora"][0], 3), "base_rate": round(row["lora"][1], 3),
                                "no_lora_concept_rate": round(row["no_lora"][0], 3),
                                "no_lora_base_rate": round(row["no_lora"][1], 3), "n": args.n}
        print(concept.name, report[concept.name])
    report["_meta"] = {"model": args.model or "assets/tinyworld", "steps": args.steps, "cfg": args.cfg,
                       "machine": machine(),
                       "targets": {"concept_rate": 0.90, "base_rate": 0.85}}
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
