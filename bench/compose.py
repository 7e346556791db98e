"""TinyComposLoRA: multi-LoRA composition on TinyWorld, after ComposLoRA (Zhong et al. 2024).

    python bench/compose.py                                  # every method, N = 2..5, 60 sets each
    python bench/compose.py --n-sets 2 --methods cmlora      # a quick partial run (its own output file)

On 2 cores, two 1-thread processes finish sooner than one of 2 threads:
    python bench/compose.py --fresh --threads 1 --methods merge,blockwise,gated,klora &
    python bench/compose.py --fresh --threads 1 --methods switch,composite,cmlora --no-alone --out runs/compose/b.json
    python bench/compose.py --methods merge --include runs/compose/b.json   # both in bench/results/compose.json

Every set has exactly one character LoRA plus 1-4 LoRAs of other categories (clothing, style, background,
object; at most one per category), N = 2..5 LoRAs, on a random base composition (shape colour, size,
position, plain background) captioned with every LoRA's trigger word. Sets and seeds are fixed (set k of N: seed
``10000·N + 10·k + j`` for its image j). Every LoRA at weight 1.

Per method and N: `all_present` (the judge finds every asked concept), per-category presence, `color` (the
asked base colour survives), two image-quality proxies (`confidence`: the judge's mean top probability over
its heads; `hf`: the share of high-frequency spectrum, noise raises it), `unet_evals` (UNet rows per image,
both CFG branches counted, from the runtime) and `sec_per_image` (wall clock of generation, judge excluded).

Reference (`alone`, not a method): each LoRA of every set run alone on the set's prompt and seed, judged for its
own concept; `every_concept_alone` is the share of sets where every concept shows under its own LoRA, what a
composition could reach if combining LoRAs cost nothing (the methods' all-present rates read against it).

Resumable: results are written after every (method, N) to the output JSON and reused when the settings match.
Writes `bench/results/compose.json`, `bench/results/compose.md` and sample grids `docs/compose_N<n>.png`.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402

METHODS = ["merge", "blockwise", "switch", "composite", "cmlora", "gated", "klora"]
OTHER_CATEGORIES = ["clothing", "style", "background", "object"]
HEAD = {"character": "subject", "background": "background", "clothing": "clothing", "style": "style",
        "object": "object"}
# LoRA Block Weight per category for the "blockwise" baseline: characters in the inner blocks, styles in the
# output blocks, the rest everywhere (a common hand recipe; every LoRA at weight 1)
LBW = {"character": "MIDD", "style": "OUTALL"}
PARAMS = {"switch": {"tau": 2}, "gated": {"gate": "auto"}}


def make_sets(n: int, n_sets: int, available: set[str] | None = None) -> list[dict]:
    """`n_sets` fixed compositions of N = n LoRAs: one character + n-1 other categories (one LoRA each).

    `available` (partial runs while a library builds) restricts the concepts; the full benchmark uses all."""
    from studio.tinyworld.catalog import CHARACTERS, CONCEPTS_BY_CATEGORY, caption, sample_base
    from studio.tinyworld.train_lora import with_concept

    def pool(cat):
        names = CHARACTERS if cat == "character" else [x.name for x in CONCEPTS_BY_CATEGORY[cat]]
        return [x for x in names if available is None or x in available]

    rng = random.Random(1000 + n)
    sets = []
    for k in range(n_sets):
        cats = rng.sample([c for c in OTHER_CATEGORIES if pool(c)], n - 1)
        chosen = [("character", rng.choice(pool("character")))]
        chosen += [(c, rng.choice(pool(c))) for c in cats]
        comp = sample_base(rng)
        for _, concept in chosen:
            comp = with_concept(comp, concept)
        sets.append({"k": k, "concepts": chosen, "color": comp.color, "prompt": caption(comp, rng),
                     "comp": comp.to_dict()})
    return sets


def set_seed(n: int, k: int, j: int = 0) -> int:
    """The fixed seed of image `j` of set `k` of N = `n` LoRAs."""
    return 10000 * n + 10 * k + j


def judge_set(judge, images, the_set) -> list[dict]:
    from fusion.cmlora import hf_share

    probs = judge.probs(images)
    from studio.tinyworld.catalog import LABEL_HEADS

    rows = []
    hf = hf_share(images)
    for i in range(len(images)):
        pred = {h: LABEL_HEADS[h][int(p[i].argmax())] for h, p in probs.items()}
        hits = {cat: pred[HEAD[cat]] == concept for cat, concept in the_set["concepts"]}
        rows.append({"hits": hits, "all": all(hits.values()), "color": pred["color"] == the_set["color"],
                     "confidence": float(np.mean([p[i].max() for p in probs.values()])), "hf": float(hf[i]),
                     "pred": pred})
    return rows


def summarise(rows: list[dict], n_sets: int, n_images: int, seconds: float, unet_rows: int) -> dict:
    cats = sorted({c for r in rows for c in r["hits"]})
    return {
        "all_present": round(float(np.mean([r["all"] for r in rows])), 4),
        "per_concept": {c: round(float(np.mean([r["hits"][c] for r in rows if c in r["hits"]])), 4) for c in cats},
        "color": round(float(np.mean([r["color"] for r in rows])), 4),
        "confidence": round(float(np.mean([r["confidence"] for r in rows])), 4),
        "hf": round(float(np.mean([r["hf"] for r in rows])), 4),
        "sets": n_sets, "images": n_images,
        "sec_per_image": round(seconds / max(n_images, 1), 4),
        "unet_evals": round(unet_rows / max(n_images, 1), 2),
    }


def plan_loras(the_set):
    from fusion import LoRARef

    return [LoRARef(concept, 1.0, category=cat) for cat, concept in the_set["concepts"]]


def run_method(studio, judge, method: str, n: int, sets: list[dict], args, samples_dir: Path) -> dict:
    from fusion import LoRARef

    rows, seconds, unet_rows, n_images = [], 0.0, 0, 0
    params = dict(PARAMS.get(method, {}))
    for s in sets:
        refs = plan_loras(s)
        if method == "blockwise":
            refs = [LoRARef(r.name, r.weight, lbw=LBW.get(r.category), category=r.category) for r in refs]
        seeds = [set_seed(n, s["k"], j) for j in range(args.images)]
        before = studio._runtime.unet_rows if studio._runtime is not None else 0
        t0 = time.perf_counter()
        out = studio.generate_many([s["prompt"]] * len(seeds), seeds, steps=args.steps, cfg=args.cfg, loras=refs,
                                   method=method, method_params=params, progress=False)
        seconds += time.perf_counter() - t0
        unet_rows += studio._runtime.unet_rows - before
        images = [r.image for r in out]
        n_images += len(images)
        rows += judge_set(judge, images, s)
        if s["k"] < args.grid_sets:
            images[0].save(samples_dir / f"{method}_N{n}_{s['k']:02d}.png")
    return summarise(rows, len(sets), n_images, seconds, unet_rows)


def alone_reference(studio, judge, n: int, sets: list[dict], args) -> dict:
    """Each LoRA of each set ALONE, on the set's own prompt and seeds: is its concept there? Per concept, and per
    set whether every concept shows when its own LoRA runs alone (`every_concept_alone`): what a composition
    could reach if combining LoRAs cost nothing, so the methods' all-present rates read against it."""
    hits: dict[str, list[bool]] = {}
    every = []
    for s in sets:
        seeds = [set_seed(n, s["k"], j) for j in range(args.images)]
        shown = np.ones(len(seeds), dtype=bool)
        for ref in plan_loras(s):
            out = studio.generate_many([s["prompt"]] * len(seeds), seeds, steps=args.steps, cfg=args.cfg,
                                       loras=[ref], method="merge", progress=False)
            got = np.array([r["hits"][ref.category] for r in judge_set(judge, [o.image for o in out], s)])
            hits.setdefault(ref.category, []).extend(got.tolist())
            shown &= got
        every.extend(shown.tolist())
    return {"every_concept_alone": round(float(np.mean(every)), 4),
            "per_concept": {c: round(float(np.mean(v)), 4) for c, v in sorted(hits.items())},
            "sets": len(sets), "images": len(every)}


def write_markdown(report: dict, path: Path) -> None:
    methods = [m for m in METHODS if m in report["methods"]] + [m for m in report["methods"] if m not in METHODS]
    ns = sorted({int(n) for m in methods for n in report["methods"][m]})
    lines = ["# TinyComposLoRA: multi-LoRA composition on TinyWorld", "",
             f"Written by `bench/compose.py`. {report['settings']['sets_per_n']} sets per N (one character + N-1 "
             f"LoRAs of other categories), {report['settings']['images']} image(s) per set, "
             f"{report['settings']['steps']} DPM-Solver++ steps, CFG {report['settings']['cfg']}, every LoRA at "
             f"weight 1. Machine: {report['machine'].get('cpu')}, {report['machine'].get('torch_threads')} threads.",
             "", "## All asked concepts present (judge)", "",
             "| method | " + " | ".join(f"N={n}" for n in ns) + " | mean |",
             "|---|" + "---:|" * (len(ns) + 1)]
    for m in methods:
        vals = [report["methods"][m].get(str(n), {}).get("all_present") for n in ns]
        got = [v for v in vals if v is not None]
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
                     + f" | {np.mean(got):.3f} |" if got else f"| {m} | " + " | ".join("-" for _ in ns) + " | - |")
    if report.get("alone"):
        vals = [report["alone"].get(str(n), {}).get("every_concept_alone") for n in ns]
        lines += ["", "Reference, not a method: each LoRA of a set run ALONE on the set's prompt and seed; the share of "
                  "sets where every concept shows under its own LoRA (what composing could reach if it cost nothing):",
                  "", "| reference | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns),
                  "| every concept alone | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |"]
    lines += ["", "## Cost: seconds per image / UNet rows per image (both CFG branches)", "",
              "| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for m in methods:
        cells = []
        for n in ns:
            r = report["methods"][m].get(str(n))
            cells.append("-" if r is None else f"{r['sec_per_image']:.3f} s / {r['unet_evals']:.0f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Per concept, base colour and quality proxies (mean over N)", "",
              "| method | character | clothing | style | background | object | colour kept | judge confidence | hf share |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        rs = list(report["methods"][m].values())

        def avg(key, sub=None):
            vals = [(r[key].get(sub) if sub else r[key]) for r in rs]
            vals = [v for v in vals if v is not None]
            return f"{np.mean(vals):.3f}" if vals else "-"

        lines.append(f"| {m} | {avg('per_concept', 'character')} | {avg('per_concept', 'clothing')} | "
                     f"{avg('per_concept', 'style')} | {avg('per_concept', 'background')} | "
                     f"{avg('per_concept', 'object')} | {avg('color')} | {avg('confidence')} | {avg('hf')} |")
    if "notes" in report:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in report["notes"]]
    path.write_text("\n".join(lines) + "\n")


def write_grids(samples_dir: Path, methods: list[str], ns: list[int], n_cols: int, out_dir: Path) -> list[Path]:
    from PIL import Image, ImageDraw

    written = []
    for n in ns:
        rows = [m for m in methods if (samples_dir / f"{m}_N{n}_00.png").exists()]
        if not rows:
            continue
        size, label_w = 64, 72
        grid = Image.new("RGB", (label_w + n_cols * size, len(rows) * size), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        for i, m in enumerate(rows):
            draw.text((4, i * size + 26), m, fill=(0, 0, 0))
            for k in range(n_cols):
                p = samples_dir / f"{m}_N{n}_{k:02d}.png"
                if p.exists():
                    grid.paste(Image.open(p).convert("RGB").resize((size, size)), (label_w + k * size, i * size))
        path = out_dir / f"compose_N{n}.png"
        grid.save(path)
        written.append(path)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description="TinyComposLoRA benchmark")
    ap.add_argument("--n-sets", type=int, default=60, help="sets per N")
    ap.add_argument("--ns", default="2,3,4,5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--images", type=int, default=1, help="images (seeds) per set, generated in one batch")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--library", default=str(ROOT / "assets" / "loras"))
    ap.add_argument("--out", default=None, help="default bench/results/compose.json (full runs) or "
                                                 "runs/compose/partial.json (--n-sets < 60)")
    ap.add_argument("--grid-sets", type=int, default=8, help="sets per N kept for the sample grids")
    ap.add_argument("--fresh", action="store_true", help="ignore results already in the output file")
    ap.add_argument("--no-alone", action="store_true",
                    help="skip the each-LoRA-alone reference (N images per set; reused from the output file)")
    ap.add_argument("--rerun", action="store_true",
                    help="measure --methods again even where the output file has them (e.g. timings on a quiet machine)")
    ap.add_argument("--include", nargs="*", default=[],
                    help="result files of other runs of this script with the same settings (e.g. a second process "
                         "measuring other --methods; two 1-thread processes on 2 cores): their methods, alone "
                         "reference and frequency scores are taken in, not measured again")
    ap.add_argument("--available-only", action="store_true",
                    help="draw sets only from LoRAs already in the library (partial runs while it builds)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fusion.cmlora import frequency_scores
    from studio.api import Studio
    from studio.tinyworld.catalog import CONCEPTS, caption, sample_base
    from studio.tinyworld.judge import JudgeModel
    from studio.tinyworld.train_lora import with_concept

    full = args.n_sets >= 60
    out = Path(args.out) if args.out else (ROOT / "bench" / "results" / "compose.json" if full
                                           else ROOT / "runs" / "compose" / "partial.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    samples_dir = ROOT / "runs" / "compose" / ("samples" if full else "samples_partial")
    samples_dir.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    ns = [int(x) for x in args.ns.split(",")]
    settings = {"sets_per_n": args.n_sets, "images": args.images, "steps": args.steps, "cfg": args.cfg,
                "sampler": "dpm++", "weights": 1.0}
    available = None
    if args.available_only:
        available = {c.name for c in CONCEPTS if (Path(args.library) / f"{c.name}.safetensors").exists()}
        settings["available_only"] = sorted(available)
    report = {"methods": {}, "settings": settings}
    if out.exists() and not args.fresh:
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            report = old
    report["machine"] = machine()
    report["settings"] = settings
    for part in args.include:
        other = json.loads(Path(part).read_text())
        if other.get("settings") != settings:
            ap.error(f"--include {part}: measured with other settings {other.get('settings')}, not {settings}")
        for method, by_n in other.get("methods", {}).items():
            for n, res in by_n.items():
                report["methods"].setdefault(method, {}).setdefault(n, res)
        for n, res in other.get("alone", {}).items():
            report.setdefault("alone", {}).setdefault(n, res)
        for key in ("frequency_scores", "frequency_seconds"):
            if key in other and key not in report:
                report[key] = other[key]

    studio = Studio(library=args.library)
    judge = JudgeModel()
    # CMLoRA's frequency scores: each LoRA alone vs no LoRA, computed once (cached beside the library)
    t0 = time.perf_counter()
    if "cmlora" in methods:
        prompts = {}
        for c in CONCEPTS:
            rng = random.Random(f"freq-{c.name}")
            prompts[c.name] = [caption(with_concept(sample_base(rng), c.name), rng) for _ in range(4)]
        names = [c.name for c in CONCEPTS if available is None or c.name in available]
        scores = frequency_scores(studio, names, prompts=prompts, n_images=4, steps=args.steps, cfg=args.cfg)
        report["frequency_scores"] = {k: round(v, 4) for k, v in scores.items()}
        report["frequency_seconds"] = round(time.perf_counter() - t0, 1)
    from fusion.gated import TRAINED_GATE

    report["gate"] = str(TRAINED_GATE.relative_to(ROOT)) if TRAINED_GATE.exists() else "training-free default"
    for method in methods:
        for n in ns:
            if str(n) in report["methods"].get(method, {}) and not args.rerun:
                print(f"{method} N={n}: done earlier", report["methods"][method][str(n)]["all_present"])
                continue
            sets = make_sets(n, args.n_sets, available)
            res = run_method(studio, judge, method, n, sets, args, samples_dir)
            report["methods"].setdefault(method, {})[str(n)] = res
            print(f"{method} N={n}: all_present {res['all_present']:.3f} {res['sec_per_image']:.3f} s/img "
                  f"{res['unet_evals']:.0f} rows/img {res['per_concept']}", flush=True)
            out.write_text(json.dumps(report, indent=1))
    if not args.no_alone:
        for n in ns:
            if str(n) in report.get("alone", {}):
                continue
            report.setdefault("alone", {})[str(n)] = res = alone_reference(studio, judge, n,
                                                                          make_sets(n, args.n_sets, available), args)
            print(f"each LoRA alone N={n}: every concept {res['every_concept_alone']:.3f} {res['per_concept']}",
                  flush=True)
            out.write_text(json.dumps(report, indent=1))
    if "composite" in report["methods"] and "cmlora" in report["methods"]:
        comp, cml = report["methods"]["composite"], report["methods"]["cmlora"]
        common = sorted(set(comp) & set(cml))
        if common:
            report["cmlora_vs_composite"] = {
                "speedup": round(float(np.mean([comp[n]["sec_per_image"] for n in common])
                                       / np.mean([cml[n]["sec_per_image"] for n in common])), 3),
                "unet_eval_ratio": round(float(np.mean([comp[n]["unet_evals"] for n in common])
                                               / np.mean([cml[n]["unet_evals"] for n in common])), 3),
                "all_present_delta": round(float(np.mean([cml[n]["all_present"] - comp[n]["all_present"]
                                                          for n in common])), 4)}
    out.write_text(json.dumps(report, indent=1))
    if full:
        write_markdown(report, out.with_suffix(".md"))
        write_grids(samples_dir, METHODS, ns, min(args.grid_sets, 8), ROOT / "docs")
    else:
        write_markdown(report, out.with_suffix(".md"))
    print(json.dumps({m: {n: r["all_present"] for n, r in v.items()} for m, v in report["methods"].items()}))


if __name__ == "__main__":
    main()
