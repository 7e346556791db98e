"""Train TinyWorld's whole LoRA library: one headline LoRA per concept, then the "community" variants.

    python -m studio.tinyworld.build_library [--only headline|community]

Resumable: a file that exists is skipped. LoRAs of one rank train together in gangs (see `train_lora`; a
LoRA trained in a gang equals the same LoRA trained alone). Headline LoRAs go to
`assets/loras/<concept>.safetensors` (kohya, full metadata, `.civitai.info` sidecar), resized after training
as kohya's `resize_lora.py --dynamic_method sv_fro 0.95` would (half the bytes; `assets/` stays under 60 MB):
TinyWorld's default library, the curated set a user would keep, trained with the HEADLINE_* recipe below
(~56 min on 2 cores as two `--shard K/2 --threads 1` processes). Community variants go to `runs/community/`
(git-ignored: the benchmarks' "downloaded from Civitai" pile for retrieval and clustering, built on demand by
`--only community` and `--only style_content`, ~17 min on 2 cores; not committed, to keep the repository small) with ranks 4-32 (skewed small), two per concept, other seeds, step counts and alphas, some in diffusers format
and some with no metadata at all, and style LoRAs trained on narrow, different content (one shape and colour
each) for the style-clustering benchmark. The ground truth (concept, category, style family per file, keyed by
the path from the repository root) is written to `assets/loras_labels.json`, which the product never reads.
"""
from __future__ import annotations

import argparse
import json
import random
import zlib
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from .catalog import CONCEPTS
from .train_lora import LoRAJob, train_loras

ROOT = Path(__file__).resolve().parents[2]
LORAS = ROOT / "assets" / "loras"
COMMUNITY = ROOT / "runs" / "community"
HEADLINE_RESIZE_FRO = 0.95
LABELS = ROOT / "assets" / "loras_labels.json"


# The headline recipe (docs/MEASURED.md, "Headline LoRA training"): on the 8 weakest concepts, lr 4e-3 x 600 steps
# with Min-SNR gamma 1 lifted concept_rate 0.54 -> 0.75 at base_rate 0.91 over lr 8e-3 x 300 steps with gamma 5.
HEADLINE_STEPS = 600
HEADLINE_LR = 4e-3
HEADLINE_MIN_SNR_GAMMA = 1.0
COMMUNITY_STEPS = (100, 150, 250)
COMMUNITY_VARIANTS = 2   # 26 headline + 52 community + 24 style-on-content = 102 files
COMMUNITY_BATCH_SEED = 101   # the v1 variants: one uploader's batch with a fixed seed (see `file_seed`)
GANG = 10
STYLE_CONTENTS = [{"subject": "circle", "color": "red"}, {"subject": "square", "color": "blue"},
                  {"subject": "triangle", "color": "green"}, {"subject": "star", "color": "yellow"}]


def file_seed(out: str) -> int:
    """A file's own seed (initialisation and data draws), stable across runs: its name's CRC-32.

    Most LoRAs of a library come from different trainers' runs, each from its own random initialisation; only
    one uploader's batch with a fixed seed shares one. The seed shapes the weights far more than it seems: on
    the library built before (every headline LoRA seed 0, community variants 100 / 101, style variants by content),
    LoRAs of different concepts from one seed overlapped in ΔW's input subspace 0.44 on average (0.83-0.93 within a
    rank-4 batch), LoRAs from different seeds 0.09, chance 0.08 (`bench/lora_overlap.py`). So every file gets its
    own seed except the community ``v1`` variants, which stay one uploader's fixed-seed batch
    (`COMMUNITY_BATCH_SEED`): the shared-initialisation case that retrieval and clustering take out
    (`retrieval.shared_init`)."""
    return zlib.crc32(Path(out).stem.encode()) % 1_000_000


def plan() -> list[tuple[int, list[LoRAJob]]]:
    """[(steps, gang of LoRAJobs)]: headline gangs first, then community gangs (one rank per gang)."""
    headline = [LoRAJob(c.name, str(LORAS / f"{c.name}.safetensors"), rank=8, alpha=8.0,
                        seed=file_seed(f"{c.name}.safetensors"),
                        extra={"kind": "headline"}) for c in CONCEPTS]
    gangs = [(HEADLINE_STEPS, headline[i::4]) for i in range(4)]
    rng = random.Random(7)
    by_rank: dict[int, list[LoRAJob]] = defaultdict(list)
    for ci, c in enumerate(CONCEPTS):
        for v in range(COMMUNITY_VARIANTS):   # ranks skewed small, as on Civitai (and to keep assets/ small)
            rank = rng.choices([4, 8, 16, 32], weights=[4, 3, 2, 1])[0]
            name = f"{c.name}_v{v}_r{rank}.safetensors"
            by_rank[rank].append(LoRAJob(
                c.name, str(COMMUNITY / name), rank=rank, alpha=float(rng.choice([rank, rank / 2, 1])),
                seed=COMMUNITY_BATCH_SEED if v == 1 else file_seed(name),
                format="diffusers" if v == 1 else "kohya", bare=(ci + v) % 3 == 0, n_images=800,
                extra={"kind": "community"}))
    i = 0
    for rank in sorted(by_rank):
        jobs = by_rank[rank]
        for start in range(0, len(jobs), GANG):
            gangs.append((COMMUNITY_STEPS[i % len(COMMUNITY_STEPS)], jobs[start:start + GANG]))
            i += 1
    # style LoRAs trained on narrow, different content: the style-clustering benchmark's hard case
    styles = [c for c in CONCEPTS if c.category == "style"]
    for rank, steps in ((4, 400), (8, 300)):
        gang = []
        for c in styles:
            for v, content in enumerate(STYLE_CONTENTS[:2] if rank == 4 else STYLE_CONTENTS[2:]):
                tag = f"{content['subject']}_{content['color']}"
                name = f"{c.name}_on_{tag}_r{rank}.safetensors"
                gang.append(LoRAJob(c.name, str(COMMUNITY / name), rank=rank, alpha=float(rank), seed=file_seed(name),
                                    n_images=800, content=content, bare=v == 1, extra={"kind": "style_content"}))
        gangs.append((steps, gang))
    return gangs


def resize_file(path: Path, fro: float) -> None:
    """Rewrite a kohya file at the dynamic ranks that keep `fro` of each module's ΔW (metadata kept)."""
    from ..library.formats import read_lora, write_lora
    from ..library.resize import resize_lora

    write_lora(resize_lora(read_lora(path), fro), path, format="kohya")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["headline", "community", "style_content"], default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast; the same data draws as on the CPU)")
    ap.add_argument("--shard", default="0/1", help="K/N: train only gangs K, K+N, ... (run N processes at once; "
                    "on 2 cores, two processes of --threads 1 train 1.5x faster than one of 2 threads)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    k, _, n = args.shard.partition("/")
    shard, n_shards = (int(k), int(n)) if k.isdigit() and n.isdigit() else (0, 0)
    if not shard < n_shards:
        ap.error(f"--shard {args.shard!r}: expected K/N with 0 <= K < N, e.g. 0/2 and 1/2 for two processes")
    gangs = [(steps, [j for j in jobs if args.only in (None, j.extra["kind"])]) for steps, jobs in plan()]
    labels = json.loads(LABELS.read_text()) if LABELS.exists() else {}
    concepts = {c.name: c for c in CONCEPTS}
    for g, (steps, jobs) in enumerate(tqdm(gangs, desc="library")):
        for j in jobs:
            c = concepts[j.concept]
            labels[str(Path(j.out).relative_to(ROOT))] = {
                "concept": c.name, "category": c.category, "style_family": c.style_family, "kind": j.extra["kind"],
                "rank": j.rank, "alpha": j.alpha, "seed": j.seed, "steps": steps, "format": j.format, "bare": j.bare,
                "content": j.content}
        todo = [j for j in jobs if not Path(j.out).exists()] if g % n_shards == shard else []
        if todo:   # community and style variants: half the batch; their weights matter (retrieval, clustering)
            headline = todo[0].extra["kind"] == "headline"   # variants: plain attention LoRAs (smaller files)
            recipe = {"lr": HEADLINE_LR, "min_snr_gamma": HEADLINE_MIN_SNR_GAMMA} if headline else {}
            train_loras(todo, steps=steps, batch_per_lora=8 if headline else 4, threads=args.threads,
                        network="locon" if headline else "attention", device=args.device, **recipe)
            if headline:
                for j in todo:
                    resize_file(Path(j.out), HEADLINE_RESIZE_FRO)
        LABELS.write_text(json.dumps(labels, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
