"""How much two LoRAs of a library share their weights' directions, by seed and by concept.

    python bench/lora_overlap.py                                   # assets/loras + runs/community
    python bench/lora_overlap.py --library DIR [DIR ...] --out FILE

For every pair of LoRA files adapting a UNet module in common: per module, the overlap of the input (row)
subspaces of their ΔW (``‖V_a V_bᵀ‖²_F / min(r_a, r_b)`` over the right singular vectors holding 90 % of each ΔW's
singular-value mass; 0 for orthogonal subspaces, 1 for nested ones), the cosine of the flattened ΔW, and what two
random subspaces of those ranks would overlap (``max(r_a, r_b) / fan_in``). Pairs are grouped by whether the two
files share their training seed and their concept (both from `assets/loras_labels.json`, keyed by file name). Two LoRAs that start
from one initialisation keep much of it: their updates read the same input directions, which neither the weights'
meaning nor a composition of them should depend on. Writes `bench/results/lora_overlap.json`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from studio.library.formats import read_lora  # noqa: E402


def row_space(delta: torch.Tensor, mass: float = 0.9) -> torch.Tensor:
    """The right singular vectors holding `mass` of ΔW's singular-value sum (rows of the result)."""
    _, s, vh = torch.linalg.svd(delta.flatten(1).float(), full_matrices=False)
    k = int((s.cumsum(0) / s.sum() < mass).sum()) + 1
    return vh[:k]


def pair_overlap(a: dict, b: dict) -> dict | None:
    common = sorted(set(a) & set(b))
    if not common:
        return None
    ov, cos, chance = [], [], []
    for k in common:
        (da, va), (db, vb) = a[k], b[k]
        ov.append(float(((va @ vb.T) ** 2).sum()) / min(len(va), len(vb)))
        cos.append(float(torch.nn.functional.cosine_similarity(da.flatten(), db.flatten(), dim=0)))
        chance.append(max(len(va), len(vb)) / va.shape[1])
    n = len(common)
    return {"overlap": sum(ov) / n, "cosine": sum(cos) / n, "chance": sum(chance) / n, "modules": n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", nargs="+", default=[str(ROOT / "assets" / "loras"), str(ROOT / "runs" / "community")])
    ap.add_argument("--labels", default=str(ROOT / "assets" / "loras_labels.json"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_overlap.json"))
    args = ap.parse_args(argv)

    labels = {Path(k).name: v for k, v in json.loads(Path(args.labels).read_text()).items()}
    files = sorted(p for d in args.library for p in Path(d).glob("*.safetensors"))
    loras = {}
    for p in files:
        label = labels.get(p.name)
        if label is None:
            sys.exit(f"{p}: not in {args.labels}; run `python -m studio.tinyworld.build_library` to label it")
        mods = {k: (m.delta_weight().float(), row_space(m.delta_weight()))
                for k, m in read_lora(p).modules.items() if k.startswith("unet")}
        loras[p.name] = (label["concept"], label["seed"], mods)
    groups = defaultdict(list)
    for (ka, (ca, sa, ma)), (kb, (cb, sb, mb)) in itertools.combinations(loras.items(), 2):
        res = pair_overlap(ma, mb)
        if res is None:
            continue
        group = f"{'same' if sa == sb else 'different'} seed, {'same' if ca == cb else 'different'} concept"
        groups[group].append(res)
    report = {"machine": machine(), "files": len(loras), "groups": {}}
    for group, rows in sorted(groups.items()):
        report["groups"][group] = {"pairs": len(rows), **{f"mean_{m}": round(sum(r[m] for r in rows) / len(rows), 4)
                                                          for m in ("overlap", "cosine", "chance")}}
        print(f"{group:36s} {report['groups'][group]}")
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
