"""One page of every committed benchmark result against its target: `bench/results/SUMMARY.md`.

    python bench/summary.py

Reads only the JSON files the bench scripts wrote (`bench/results/*.json`); prints and writes a table of
measured figure, target and whether it is met. A missing result is listed as not measured. Numbers are copied
from the JSON, never typed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(x) -> str:
    if x is None:
        return "not measured"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def rows() -> list[tuple[str, str, str, str, bool | None]]:
    """(area, measure, measured, target, met)."""
    out = []

    def add(area, measure, value, target, ok):
        out.append((area, measure, _fmt(value), target, None if value is None or ok is None else bool(ok)))

    base = _load("base_fidelity.json") or {}
    for k in ("shape", "color", "background"):
        v = base.get(k)
        add("TinyWorld base model", f"judge finds the asked {k} (n={base.get('n')})", v, ">= 0.90", v is not None and v >= 0.9)

    single = _load("single_lora.json") or {}
    loras = {k: v for k, v in single.items() if isinstance(v, dict) and "concept_rate" in v}
    if loras:
        rates = [v["concept_rate"] for v in loras.values()]
        base_rates = [v["base_rate"] for v in loras.values()]
        add("LoRA library", f"headline LoRAs with concept_rate >= 0.90 (of {len(rates)})",
            sum(r >= 0.9 for r in rates), f"{len(rates)}", all(r >= 0.9 for r in rates))
        add("LoRA library", "mean concept_rate", round(sum(rates) / len(rates), 3), ">= 0.90 each", min(rates) >= 0.9)
        add("LoRA library", "mean base_rate", round(sum(base_rates) / len(base_rates), 3), ">= 0.85 each",
            min(base_rates) >= 0.85)
    else:
        add("LoRA library", "single-LoRA fidelity", None, ">= 0.90 / 0.85", False)

    runs = [sw for sw in (_load("switching.json"), _load("switching_gpu.json")) if sw]   # CPU run, GPU run
    for sw in runs:
        gpu = sw.get("device", "cpu") != "cpu"
        for r in sw.get("rows", []):
            if r["engine"] in ("studio", "diffusers_unfused"):
                add("LoRA library", f"{sw.get('device')}: switch the active set, {r['loaded']} loaded ({r['engine']}), ms",
                    r["switch_ms"], "<= 20 on GPU, flat", (r["switch_ms"] <= 20) if gpu else None)
    if not runs:
        add("LoRA library", "switching cost", None, "<= 20 ms on GPU", False)

    compose = _load("compose.json") or {}
    comp = compose.get("methods", {})
    gated, merge = comp.get("gated", {}), comp.get("merge", {})
    for n in ("3", "5"):   # what the LoRAs themselves allow: every concept shows when its LoRA runs alone
        ref = compose.get("alone", {}).get(n, {}).get("every_concept_alone")
        if ref is not None:
            add("Fusion", f"reference: every concept shows with its LoRA alone, {n} LoRAs' sets", ref, "(context)", None)
    diag = _load("compose_diagnosis.json") or {}
    every_layer = diag.get("layer_groups", {})
    if every_layer.get("all") and every_layer.get("attention_projections"):
        add("Fusion", "diagnosis: a LoRA alone shows its concept, all layers / attention projections only / ResNets only",
            f"{every_layer['all']['mean']} / {every_layer['attention_projections']['mean']} / "
            f"{every_layer.get('resnet_convs', {}).get('mean')}", "(context)", None)
    foreign = diag.get("foreign_triggers", {})
    if foreign:
        add("Fusion", "diagnosis: a LoRA alone on 3 LoRAs' prompts shows its concept, as written / other triggers removed",
            f"{foreign['as_written']['mean']} / {foreign['other_triggers_removed']['mean']}", "(context)", None)
    for w, r in diag.get("merge_weights", {}).items():
        add("Fusion", f"diagnosis: merge of 3 LoRAs at weight {w} each, all concepts present", r["all_present"],
            "(context)", None)
    g3 = gated.get("3", {}).get("all_present")
    g5 = gated.get("5", {}).get("all_present")
    m5 = merge.get("5", {}).get("all_present")
    add("Fusion", "gated: all concepts present, 3 LoRAs", g3, ">= 0.90", g3 is not None and g3 >= 0.9)
    add("Fusion", "gated: all concepts present, 5 LoRAs", g5, ">= 0.75", g5 is not None and g5 >= 0.75)
    add("Fusion", "gated minus merge, 5 LoRAs", None if g5 is None or m5 is None else round(g5 - m5, 3), ">= 0.15",
        g5 is not None and m5 is not None and g5 - m5 >= 0.15)
    for n in ("2", "3", "4", "5"):
        c, m = comp.get("composite", {}).get(n), comp.get("cmlora", {}).get(n)
        if c and m:
            speed = c["sec_per_image"] / m["sec_per_image"]
            add("Fusion", f"CMLoRA vs Composite, {n} LoRAs: speed-up (wall)", round(speed, 2), ">= 1.8", speed >= 1.8)
            add("Fusion", f"CMLoRA vs Composite, {n} LoRAs: UNet rows per image ratio", round(
                c["unet_evals"] / m["unet_evals"], 2), "(context)", None)
            add("Fusion", f"CMLoRA minus Composite all-present, {n} LoRAs", round(m["all_present"] - c["all_present"], 3),
                ">= -0.01", m["all_present"] - c["all_present"] >= -0.01)

    speed = _load("speed.json")
    speed_rows = speed or []
    for dev in dict.fromkeys(r["device"] for r in speed_rows):
        for unet in ("sd15", "sdxl"):
            def row(method, rank=16, n=3):
                return next((r for r in speed_rows if r["device"] == dev and r["unet"] == unet and r["rank"] == rank
                             and r["n_loras"] == n and r["method"] == method and r.get("targets", "attn") == "attn"),
                            None)
            r = row("per_layer_step")
            if r is None:
                continue
            cap = 1.10 if dev == "cpu" else 1.05
            add("Fusion speed", f"{dev} {unet}: 3 rank-16 LoRAs, per-layer per-step weights, x base step",
                r["ratio_to_base"], f"<= {cap}", r["ratio_to_base"] <= cap)
            add("Fusion speed", f"{dev} {unet}: same, x diffusers unfused set_adapters", r["ratio_to_diffusers_unfused"],
                "<= 0.5 (2x faster)", r["ratio_to_diffusers_unfused"] <= 0.5)
            for n in (3, 5):
                c = row("composite", 16, n)
                if c:
                    add("Fusion speed", f"{dev} {unet}: Composite batched, {n} LoRAs, x base step", c["ratio_to_base"],
                        f"<= {0.6 * n:.1f} (0.6 N)", c["ratio_to_base"] <= 0.6 * n)
    if not speed_rows:
        add("Fusion speed", "step cost", None, "<= 1.10x base on CPU", False)
    # CMLoRA vs Composite at real UNet size (bench/speed.py --methods composite,cmlora --out speed_cmlora.json):
    # a whole 20-step run per timed call, so the cached steps count as often as in a run
    for r in sorted(_load("speed_cmlora.json") or [], key=lambda r: (r["device"], r["unet"], r["n_loras"])):
        if r["method"] == "cmlora" and "speedup_vs_composite" in r:
            add("Fusion speed", f"{r['device']} {r['unet']}: CMLoRA vs Composite, {r['n_loras']} rank-{r['rank']} LoRAs, "
                "speed-up per step over a run", r["speedup_vs_composite"], ">= 1.8", r["speedup_vs_composite"] >= 1.8)

    ret = _load("retrieval.json") or {}
    fused, wo, scale = ret.get("fused", {}), ret.get("weights_only_unseen", {}), ret.get("scale", {})
    add("Retrieval", "fused R@3", fused.get("r3"), ">= 0.95", (fused.get("r3") or 0) >= 0.95)
    add("Retrieval", "fused MRR", fused.get("mrr"), ">= 0.85", (fused.get("mrr") or 0) >= 0.85)
    add("Retrieval", "weights-only R@3 (neighbour transfer), LoRAs whose metadata no step saw", wo.get("r3"), ">= 0.80",
        (wo.get("r3") or 0) >= 0.8)
    quality = ret.get("details", {}).get("quality", {})
    spread = quality.get("weights_only_unseen_splits", {})
    if spread:
        add("Retrieval", f"same, mean over {spread['splits']} random splits (min {spread['r3_min']}, max "
            f"{spread['r3_max']})", spread["r3_mean"], "(context)", None)
    for key, label in (("trigger", "the trigger word"), ("noun", "the concept's noun"),
                       ("trigger_in_a_scene", "the trigger word among scene words")):
        d = quality.get("direct_prompts", {}).get(key)
        if d:
            add("Retrieval", f"fused R@1 / R@3, prompts naming {label} ({d['n_queries']})", f"{d['r1']} / {d['r3']}",
                "(context)", None)
    draws = quality.get("projection_draws", {})
    if draws:
        n = len(draws["draws"])
        add("Retrieval", f"fused R@3, first / second prompt set, mean over {n} draws of the descriptor's random "
            f"projections", f"{draws['mean_fused_r3']} / {draws['mean_fused_r3_second']}", "(context)", None)
        add("Retrieval", f"weights-only R@3 (mean over the splits), first / second prompt set, mean over {n} draws",
            f"{draws['mean_weights_only_r3_mean']} / {draws['mean_weights_only_r3_mean_second']}", "(context)", None)
    for key, label in (("second_prompts", "second prompt set"), ("all_prompts", "both prompt sets")):
        f2 = quality.get(key, {}).get("fused", {})
        if f2:
            add("Retrieval", f"fused R@3 / MRR, {label} ({f2['n_queries']} prompts)", f"{f2['r3']} / {f2['mrr']}",
                "(context)", None)
    enc = quality.get("encoder_only_unseen", {})
    add("Retrieval", "same, the learned encoder alone, LoRAs it never saw", enc.get("r3"), "(context)", None)
    add("Retrieval", "fused R@3 with the learned encoder's joint channel", quality.get("fused_with_encoder", {}).get("r3"),
        "(context)", None)
    pick = ret.get("details", {}).get("quality", {}).get("autopick", {})
    add("Retrieval", "auto-pick: top pick right, paraphrase prompts", pick.get("top_pick_correct"), "(context)", None)
    add("Retrieval", "auto-pick: nothing picked, off-library prompts", pick.get("nothing_fits_empty"), "(context)", None)
    if "second_prompts" in pick:
        add("Retrieval", "auto-pick, second prompt set: top pick right / nothing picked off-library",
            f"{pick['second_prompts']['top_pick_correct']} / {pick['second_prompts']['nothing_fits_empty']}",
            "(context)", None)
    add("Retrieval", f"query at {scale.get('n', '1M')} vectors, ms", scale.get("ms_per_query"), "<= 1",
        scale.get("ms_per_query") is not None and scale["ms_per_query"] <= 1)
    add("Retrieval", "recall vs exact search at that size", scale.get("recall"), ">= 0.97", (scale.get("recall") or 0) >= 0.97)
    files = ret.get("details", {}).get("files", {})
    rounds = f", median of {files['rounds']} rounds" if files.get("rounds", 1) > 1 else ""
    add("Retrieval", f"index 10 000 LoRA files (headers + low-rank features){rounds}, s", ret.get("index_10k_files_s"),
        "<= 60", ret.get("index_10k_files_s") is not None and ret["index_10k_files_s"] <= 60)
    add("Retrieval", "same, with a trained weight encoder (optional channels), s", files.get("index_with_encoder_s"),
        "<= 60", files.get("index_with_encoder_s") is not None and files["index_with_encoder_s"] <= 60)
    add("Retrieval", "same, with the catalog scan first (hashes, full validation), s", files.get("total_s"), "<= 60",
        files.get("total_s") is not None and files["total_s"] <= 60)

    cl = _load("cluster.json") or {}
    w, im = cl.get("weights", {}), cl.get("image_baseline", {})
    add("Style clustering", "ARI from weights (style families)", w.get("ari"), ">= 0.90", (w.get("ari") or 0) >= 0.9)
    add("Style clustering", "ARI of the image-embedding baseline", im.get("ari"), "< weights ARI",
        w.get("ari") is not None and im.get("ari") is not None and w["ari"] > im["ari"])
    shown = cl.get("weights_styles_shown")
    if shown:
        add("Style clustering", f"ARI from weights, scored on the {shown['loras']} style LoRAs whose samples show their style "
            f"({shown['styles']} styles), auto k / true k", f"{shown['ari']} / {shown['at_true_k']['ari']}",
            "(context)", None)
    add("Style clustering", "10 000 LoRAs clustered, s", cl.get("seconds_10k"), "<= 30",
        cl.get("seconds_10k") is not None and cl["seconds_10k"] <= 30)
    return out


def main() -> None:
    lines = ["# Benchmark results against their targets", "",
             "Written by `python bench/summary.py` from the JSON files in this folder (each written by its bench "
             "script; the machine is in each file).", "",
             "| area | measure | measured | target | met |", "| --- | --- | ---: | --- | --- |"]
    for area, measure, value, target, ok in rows():
        mark = ("n/a on CPU (GPU target)" if "GPU" in target else "-") if ok is None and value != "not measured" else ("yes" if ok else "**no**")
        lines.append(f"| {area} | {measure} | {value} | {target} | {mark} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "SUMMARY.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
