"""Why composing TinyWorld LoRAs fails: four measurements behind `bench/compose.py`'s numbers.

    python bench/compose_diagnosis.py                      # all four; bench/results/compose_diagnosis.json
    python bench/compose_diagnosis.py --parts foreign,weights   # some of them (the others kept from the file)

1. **Who takes the subject.** Every set of TinyComposLoRA at N = 2 (a character + one LoRA of another category, the
   same sets, prompts and seeds as `bench/compose.py`) is generated three times: the character LoRA alone, the other
   LoRA alone, and both merged at weight 1. The judge's subject reading of each image says what the merge does to
   the character: kept, replaced by a base shape (the other LoRA was trained on base-shape subjects and draws one
   when it runs alone on the set's prompt), or replaced by another character.
2. **Where a LoRA's concept lives.** Each LoRA of those sets runs alone restricted to one group of UNet layers
   (zero weight elsewhere): the attention projections (``attn1``/``attn2`` ``to_q/k/v/out``), the other layers of
   the transformer blocks (``proj_in/out``, feed-forward), the ResNet convolutions (LoCon), or everything. The
   judge's presence of its own concept per group says which layers a composition method must arbitrate.

3. **Do the other trigger words hurt a LoRA?** (``foreign``, N = 3 sets.) Each LoRA of a set runs alone on the set's
   prompt as written and with the other LoRAs' trigger words removed: its own concept's presence in both.
4. **Can a weight fix a merge?** (``weights``, N = 3 sets.) Every LoRA merged at one common weight (1, 0.8, 0.65,
   0.5): all-present and per-concept presence. A weight low enough to stop the sum from collapsing the image is
   low enough to make a concept vanish.

Every LoRA at weight 1 (text encoder included) unless said, 20 DPM-Solver++ steps, CFG 7, one image per set, the
sets and seeds of `bench/compose.py`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compose import judge_set, make_sets, plan_loras, set_seed  # noqa: E402
from bench.machine import machine  # noqa: E402

BASE_SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
LAYER_GROUPS = {
    "attention_projections": r"\.attn[12]\.",
    "other_transformer_layers": r"\.attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.ff\.)",
    "resnet_convs": r"\.resnets\.\d+\.",
    "all": r".",
}
PARTS = ("subject", "layers", "foreign", "weights")
MERGE_WEIGHTS = (1.0, 0.8, 0.65, 0.5)


def strip_words(prompt: str, words) -> str:
    """`prompt` without `words` (whole words), spaces tidied."""
    for w in words:
        prompt = re.sub(r"\b" + re.escape(w) + r"\b", "", prompt)
    return re.sub(r"\s+", " ", prompt).replace(" ,", ",").strip()


def layer_mask_schedule():
    """A schedule class that keeps each LoRA only on the UNet layers matching ``pattern`` (a fixed merge)."""
    from fusion.schedules import Schedule

    class LayerGroup(Schedule):
        method = "layer_group"
        static = True

        def __init__(self, loras, pattern: str):
            super().__init__(loras)
            self.pattern = re.compile(pattern)

        def bind(self, binding):
            super().bind(binding)
            keep = torch.tensor([bool(self.pattern.search(x)) for x in binding.unet_layers], dtype=torch.float32)
            self.unet_table = self.unet_table * keep[None]

    return LayerGroup


def run_with_schedule(studio, prompt: str, seed: int, schedule, names: list[str], args):
    """One image with `schedule` activated by hand on the studio's runtime (a method the plan does not list)."""
    from fusion import LoRARuntime

    if studio._runtime is None:
        studio._runtime = LoRARuntime(studio.pipe)
    rt = studio._runtime
    for n in names:
        if n not in rt.loras:
            rt.load(n, studio._lora(n))
    rt.activate(names, schedule)
    try:
        gen = torch.Generator("cpu").manual_seed(seed)
        return studio.pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.cfg, generator=gen).images[0]
    finally:
        rt.deactivate()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-sets", type=int, default=60)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which measurements: {', '.join(PARTS)}")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compose_diagnosis.json"))
    args = ap.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if set(parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; known: {PARTS}")
    torch.set_num_threads(2)
    from studio.api import Studio
    from studio.tinyworld.judge import JudgeModel

    studio = Studio()
    judge = JudgeModel()
    settings = {"sets": args.n_sets, "steps": args.steps, "cfg": args.cfg, "sampler": "dpm++"}
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    old = result.get("settings", {})
    if {k: old.get(k) for k in settings} != settings:
        result = {}   # other settings: nothing to keep
    t0 = time.time()
    seconds = result.get("seconds_per_part") or ({"subject+layers": result["seconds"]} if "seconds" in result else {})
    if {"subject", "layers"} & set(parts):
        seconds.pop("subject+layers", None)   # the first version's joint time of those two parts
    if "subject" in parts:
        result["subject"] = who_takes_the_subject(studio, judge, make_sets(2, args.n_sets), args, t0)
        seconds["subject"] = round(time.time() - t0, 1)
    if "layers" in parts:
        t1 = time.time()
        result["layer_groups"] = where_concepts_live(studio, judge, make_sets(2, args.n_sets), args, t0)
        result["layer_patterns"] = LAYER_GROUPS
        seconds["layers"] = round(time.time() - t1, 1)
    if "foreign" in parts:
        t1 = time.time()
        result["foreign_triggers"] = foreign_triggers(studio, judge, make_sets(3, args.n_sets), args, t0)
        seconds["foreign"] = round(time.time() - t1, 1)
    if "weights" in parts:
        t1 = time.time()
        result["merge_weights"] = merge_weights(studio, judge, make_sets(3, args.n_sets), args, t0)
        seconds["weights"] = round(time.time() - t1, 1)
    result.pop("seconds", None)
    result["settings"] = {**settings, "n": {"subject": 2, "layers": 2, "foreign": 3, "weights": 3}, "weights": 1.0}
    result["seconds_per_part"] = seconds
    result["machine"] = machine()
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("subject", "machine")}, indent=2))


def who_takes_the_subject(studio, judge, sets, args, t0) -> dict:
    """1: per N = 2 set, the character alone, the other LoRA alone, and both merged: what happened to the subject."""
    outcome, rows = Counter(), []
    for s in sets:
        seed = set_seed(2, s["k"])
        refs = plan_loras(s)
        char = next(r for r in refs if r.category == "character")
        other = next(r for r in refs if r.category != "character")
        images = [studio.generate_many([s["prompt"]], [seed], steps=args.steps, cfg=args.cfg, loras=lr,
                                       method="merge", progress=False)[0].image for lr in ([char], [other], refs)]
        alone_char, alone_other, merged = judge_set(judge, images, s)
        subject = merged["pred"]["subject"]
        if subject == char.name:
            kind = "character_kept"
        elif subject in BASE_SHAPES:
            kind = "base_shape"  # the subject the other LoRA was trained on (it draws one alone: see the summary)
        else:
            kind = "another_character"
        outcome[kind] += 1
        rows.append({"k": s["k"], "character": char.name, "other": [other.category, other.name],
                     "character_alone_shows": alone_char["hits"]["character"],
                     "other_alone_subject": alone_other["pred"]["subject"], "merged_subject": subject,
                     "outcome": kind, "merged_all_present": merged["all"]})
        print(f"[{time.time() - t0:5.0f}s] set {s['k']}: {char.name} + {other.name}: {kind} ({subject})", flush=True)
    shown = [r for r in rows if r["character_alone_shows"]]
    return {
        "sets": len(rows),
        "outcome": {k: round(v / len(rows), 4) for k, v in sorted(outcome.items())},
        "character_alone_shows": round(len(shown) / len(rows), 4),
        "lost_when_alone_shows": round(float(np.mean([r["outcome"] != "character_kept" for r in shown])), 4)
        if shown else None,
        "other_alone_subject_is_a_base_shape": round(float(np.mean(
            [r["other_alone_subject"] in BASE_SHAPES for r in rows])), 4),
        "base_shape_is_the_other_alones": round(float(np.mean(
            [r["merged_subject"] == r["other_alone_subject"] for r in rows if r["outcome"] == "base_shape"] or [0])), 4),
        "rows": rows,
    }


def where_concepts_live(studio, judge, sets, args, t0) -> dict:
    """2: each LoRA of the N = 2 sets alone on one group of UNet layers: its own concept's presence per group."""
    LayerGroup = layer_mask_schedule()
    groups = {}
    for group, pattern in LAYER_GROUPS.items():
        hits: dict[str, list[bool]] = {}
        for s in sets:
            seed = set_seed(2, s["k"])
            for ref in plan_loras(s):
                image = run_with_schedule(studio, s["prompt"], seed, LayerGroup([ref], pattern), [ref.name], args)
                hits.setdefault(ref.category, []).append(judge_set(judge, [image], s)[0]["hits"][ref.category])
        groups[group] = _rates(hits)
        print(f"[{time.time() - t0:5.0f}s] alone on {group}: {groups[group]}", flush=True)
    return groups


def foreign_triggers(studio, judge, sets, args, t0) -> dict:
    """3: each LoRA of the N = 3 sets alone, on the set's prompt as written and without the other trigger words."""
    hits: dict[str, dict[str, list[bool]]] = {"as_written": {}, "other_triggers_removed": {}}
    for s in sets:
        seed = set_seed(3, s["k"])
        refs = plan_loras(s)
        for ref in refs:
            others = [w for o in refs if o.name != ref.name for w in studio.catalog.get(o.name).trigger_words]
            for kind, prompt in (("as_written", s["prompt"]), ("other_triggers_removed", strip_words(s["prompt"], others))):
                image = studio.generate_many([prompt], [seed], steps=args.steps, cfg=args.cfg, loras=[ref],
                                             method="merge", progress=False)[0].image
                hits[kind].setdefault(ref.category, []).append(judge_set(judge, [image], s)[0]["hits"][ref.category])
    res = {kind: _rates(h) for kind, h in hits.items()}
    print(f"[{time.time() - t0:5.0f}s] foreign trigger words: {res}", flush=True)
    return res


def merge_weights(studio, judge, sets, args, t0) -> dict:
    """4: every LoRA of the N = 3 sets merged at one common weight: all-present and per-concept presence."""
    from fusion import LoRARef

    res = {}
    for w in MERGE_WEIGHTS:
        rows = []
        for s in sets:
            refs = [LoRARef(r.name, w, category=r.category) for r in plan_loras(s)]
            image = studio.generate_many([s["prompt"]], [set_seed(3, s["k"])], steps=args.steps, cfg=args.cfg,
                                         loras=refs, method="merge", progress=False)[0].image
            rows += judge_set(judge, [image], s)
        hits: dict[str, list[bool]] = {}
        for r in rows:
            for c, h in r["hits"].items():
                hits.setdefault(c, []).append(h)
        res[str(w)] = {"all_present": round(float(np.mean([r["all"] for r in rows])), 4), **_rates(hits)}
        print(f"[{time.time() - t0:5.0f}s] merge at weight {w}: {res[str(w)]}", flush=True)
    return res


def _rates(hits: dict[str, list[bool]]) -> dict:
    out = {c: round(float(np.mean(v)), 4) for c, v in sorted(hits.items())}
    out["mean"] = round(float(np.mean([x for v in hits.values() for x in v])), 4)
    return out


if __name__ == "__main__":
    main()
