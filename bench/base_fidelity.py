"""Base fidelity of TinyWorld: 200 random base-vocabulary prompts, fixed seeds, judged.

    python bench/base_fidelity.py            # writes bench/results/base_fidelity.json and docs/base_samples.png
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from studio.api import Studio  # noqa: E402
from studio.tinyworld.catalog import caption, sample_base  # noqa: E402
from studio.tinyworld.judge import JudgeModel  # noqa: E402
from studio.tinyworld.render import render_grid  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--sampler", default="dpm++")
    ap.add_argument("--model", default=None, help="default: the committed TinyWorld")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "base_fidelity.json"))
    ap.add_argument("--grid", default=str(ROOT / "docs" / "base_samples.png"))
    args = ap.parse_args(argv)

    rng = random.Random(2026)
    comps = [sample_base(rng) for _ in range(args.n)]
    prompts = [caption(c, rng) for c in comps]
    seeds = [10_000 + i for i in range(args.n)]
    studio = Studio(model=args.model, sampler=args.sampler)
    t0 = time.time()
    results = studio.generate_many(prompts, seeds, steps=args.steps, cfg=args.cfg, batch_size=25)
    seconds = time.time() - t0
    preds = JudgeModel().predict([r.image for r in results])

    hits = {"shape": [], "color": [], "background": []}
    for c, p in zip(comps, preds):
        hits["shape"].append(p["subject"] == c.subject)
        hits["color"].append(p["color"] == c.color)
        hits["background"].append(p["background"] == c.background)
    all3 = np.mean([a and b and c for a, b, c in zip(*hits.values())])
    report = {k: round(float(np.mean(v)), 4) for k, v in hits.items()}
    by_size = {size: round(float(np.mean([h for c, h in zip(comps, hits["shape"]) if c.size == size])), 4)
               for size in sorted({c.size for c in comps})}
    confusions = {attr: dict(Counter(f"{getattr(c, key)}->{p[name]}" for c, p in zip(comps, preds)
                                     if p[name] != getattr(c, key)).most_common(6))
                  for attr, key, name in (("shape", "subject", "subject"), ("color", "color", "color"),
                                          ("background", "background", "background"))}
    report.update(all_three=round(float(all3), 4), shape_by_size=by_size, top_confusions=confusions, n=args.n,
                  model=args.model or "assets/tinyworld", steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                  seconds_per_image=round(seconds / args.n, 4), device=str(studio.device), machine=machine(),
                  examples=[{"prompt": p, "seed": s, "judge": j} for p, s, j in
                            list(zip(prompts, seeds, preds))[:8]])
    Path(args.out).write_text(json.dumps(report, indent=2))
    grid = render_grid([np.asarray(r.image) for r in results[:48]], cols=8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.grid)
    (Path(args.grid).with_suffix(".txt")).write_text("\n".join(f"{i}: {p}" for i, p in enumerate(prompts[:48])))
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))


if __name__ == "__main__":
    main()
