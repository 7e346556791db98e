"""Retrieval benchmark: quality on the TinyWorld library, FAISS at 1 M vectors, indexing 10 000 files.

    python bench/retrieval.py                      # everything; writes bench/results/retrieval.json
    python bench/retrieval.py --tiny               # smoke run at toy sizes (writes /tmp/retrieval_tiny.json)
    python bench/retrieval.py --skip-scale --skip-files --library assets/loras runs/community

1. Quality. Every TinyWorld concept is described by prompts that share no word with its LoRAs' metadata
   (checked: trigger words, kohya tag lists, description, tags, name). The LoRAs are split per concept: the
   learned encoder trains on one part (LoRAs with metadata only) and is scored, weights only, on the other
   part, ranking only those unseen LoRAs; so is neighbour transfer (the studio's weights-only channel), with only
   that part's metadata to transfer. Fused (as the studio runs it: no encoder; and with the encoder) and
   metadata-only retrieval rank the whole library. R@1, R@3
   and MRR (a hit is any LoRA of the described concept). Auto-pick is scored too: the top pick's concept on
   those prompts, and prompts about nothing in the library, which must pick nothing. Also: prompts that do name
   a LoRA's trigger word or noun (`direct_prompts`), and fused and weights-only again over DRAWS seeds of the
   descriptor's random projections (`projection_draws`: how much a figure owes to one draw).
2. Scale. N synthetic clustered vectors (d=128) in `VectorIndex` (IVF with fp16 codes above its threshold, nprobe tuned):
   single-query latency on one thread, recall@10 against exact search.
3. Files. N synthetic TinyWorld LoRA files (all 128 attention modules, rank 4, fp16, metadata + sidecar):
   the catalog scan (hashes, full validation, the weight descriptor's raw blocks and, in its worker processes, the
   metadata text's vector from the packaged sentence model, stored in the catalog), then `LibraryIndex.rebuild`
   (every channel: descriptor blocks and text vectors from the catalog, no file read again unless an encoder needs
   the factors, no text embedded again unless the index's embedder is another). Recorded: catalog_scan_s, index_s,
   total_s (their sum), how many files the index read and how many texts' vectors it took from the catalog. Each
   timing is the median of `--file-rounds` rounds (a fresh catalog for each scan; every round's time is kept):
   on a shared 2-core machine one scan varies by several seconds from run to run.

The library is `--library` (default assets/loras and runs/community, built by
`python -m studio.tinyworld.build_library --only community` and `--only style_content`) when they hold LoRA files, else a synthetic one (said so
in the result). The text embedder is the best available (`--text`): a packaged sentence model, else the
TinyWorld CLIP text encoder, else hashing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from retrieval.autopick import DEFAULT_THRESHOLD, autopick  # noqa: E402
from retrieval.descriptor import lora_svds  # noqa: E402
from retrieval.encoder import TrainingPair, train_encoder  # noqa: E402
from retrieval.index import VectorIndex, normalise, recall_at_k  # noqa: E402
from retrieval.library import LibraryIndex  # noqa: E402
from retrieval.loading import load_for_index  # noqa: E402
from retrieval.text import Metadata, captions, default_text_embedder, stems  # noqa: E402
from studio.library.catalog import Catalog  # noqa: E402
from studio.tinyworld.catalog import CONCEPTS  # noqa: E402

TINYWORLD = ROOT / "assets" / "tinyworld"
LIBRARY = [ROOT / "assets" / "loras", ROOT / "runs" / "community"]   # curated set + the community pile (built on demand)
LABELS = ROOT / "assets" / "loras_labels.json"

# Two prompts per concept, in words none of its LoRAs' metadata uses (verified at run time).
PROMPTS = {
    "zorbo": ["an extraterrestrial visitor from another planet", "a martian being sporting feelers on its head"],
    "glimmet": ["a spooky phantom that haunts old houses", "a translucent specter drifting through the air"],
    "botzy": ["a mechanical android automaton", "a metal droid built from gears and bolts"],
    "kittox": ["a meowing kitten portrait", "a fluffy feline pet"],
    "snarvel": ["a slow slimy garden mollusk", "a gastropod carrying its coiled house"],
    "fungle": ["a toadstool fungus from the forest floor", "a woodland toadstool growing after rain"],
    "hat": ["sporting a magician's stovepipe headgear", "dressed up in a formal gentleman's topper"],
    "scarf": ["bundled up in a knitted winter muffler", "a cozy knit shawl keeping its throat warm"],
    "glasses": ["sporting cool tinted shades", "spectacles that block the sunlight"],
    "crown": ["a king's jeweled diadem", "a monarch's regal tiara on its head"],
    "stripes": ["zebra-like slanted streaks", "a candy cane pattern"],
    "polka": ["dotted all over like a ladybug", "sprinkled with dots like a dalmatian"],
    "outline": ["just the edge traced, empty inside", "an unfilled line-art silhouette"],
    "mosaic": ["low-res retro arcade sprite look", "eight-bit console graphics"],
    "pastel": ["gentle muted candy colours", "faded chalky hues"],
    "hatching": ["an engraving made of dense pen strokes", "old woodcut print look"],
    "checker": ["a chessboard floor", "a draughts game pattern behind it"],
    "grid": ["a blueprint lattice", "an engineer's millimetre ruled chart"],
    "starfield": ["the cosmos at midnight glittering with constellations", "a galaxy of distant suns"],
    "sunset": ["dusk as the sun goes down over the horizon", "a twilight horizon at the end of the day"],
    "waves": ["surf breaking along the shoreline", "a stormy marine swell"],
    "brick": ["a rough stonework facade of an old warehouse", "a stacked clay facade like a warehouse"],
    "ball": ["an inflatable plaything for the pool", "a sphere that kids kick around the playground"],
    "tree": ["an oak with branches and foliage", "a young sapling in the woods"],
    "key": ["something you turn in a door to unlock it", "a brass padlock opener"],
    "cup": ["a ceramic vessel of coffee", "a teacup of warm cocoa"],
}
NOTHING_FITS = [
    "a motorcycle parked on a highway", "a bowl of ramen noodles", "a skyscraper in a busy city",
    "a violin on a wooden table", "a dinosaur skeleton in a museum", "a pizza with pepperoni",
    "a tractor ploughing a field", "a laptop computer on a desk",
]
# A second, independent set written later (same rule): the figures above move by a query or two with any change,
# so a change is judged on both sets together ("all_prompts" in the result).
SECOND_PROMPTS = {
    "zorbo": ["a little green space invader", "a visitor from outer space with feelers"],
    "glimmet": ["a haunting apparition", "a bedsheet spirit that says boo"],
    "botzy": ["a clanking tin machine man", "a mechanized humanoid with circuits"],
    "kittox": ["a purring tabby", "a house pet that chases mice"],
    "snarvel": ["a sluggish critter leaving a slime trail", "a creeping mollusk"],
    "fungle": ["a forest fungus", "a morel sprouting in damp soil"],
    "hat": ["a gentleman's headwear", "a magician's headpiece for pulling rabbits"],
    "scarf": ["a knitted wrap for chilly weather", "a warm muffler"],
    "glasses": ["shades on its face", "tinted spectacles"],
    "crown": ["a tiara fit for a queen", "a king's headdress"],
    "stripes": ["a pattern of slanted lines", "streaked like a barber pole"],
    "polka": ["a dotty pattern", "speckled like a ladybird"],
    "outline": ["just the silhouette's edge, nothing inside", "line art without colouring in"],
    "mosaic": ["like a retro arcade sprite", "blocky eight bit graphics"],
    "pastel": ["muted candy colours", "faint chalky hues"],
    "hatching": ["a crosshatched pen study", "like an old engraving"],
    "checker": ["a chessboard pattern", "a draughtboard behind it"],
    "grid": ["a blueprint sketch behind it", "an engineer's ruled chart"],
    "starfield": ["outer space with constellations", "the cosmos at midnight"],
    "sunset": ["dusk over the horizon", "twilight colours as the day ends"],
    "waves": ["surf at the shore", "a marine swell"],
    "brick": ["a stonework facade", "a factory facade of fired clay"],
    "ball": ["a bouncy plaything", "a sphere kids kick around"],
    "tree": ["an oak sapling", "a bush with foliage"],
    "key": ["a padlock opener", "what you turn in a door to unlock it"],
    "cup": ["a coffee vessel", "a teacup"],
}
SECOND_NOTHING_FITS = [
    "a sailing yacht on a lake", "a plate of spaghetti", "a city bus in traffic", "a grand piano on a stage",
    "a giraffe on the savanna", "a cheeseburger with fries", "a helicopter over a harbour", "a smartphone screen"]
def direct_prompts() -> dict[str, list[tuple[str, str]]]:
    """Prompts in the words people type when they know a LoRA (its trigger word, the concept's plain noun), alone
    and among scene words that other LoRAs' metadata also has: what BM25 is for, and where it misleads."""
    return {"trigger": [(f"a picture with {c.trigger} in it", c.name) for c in CONCEPTS],
            "noun": [(f"a picture of something {c.noun}" if c.category == "style" else f"a picture with a {c.noun}",
                      c.name) for c in CONCEPTS],
            "trigger_in_a_scene": [(f"{c.trigger} on a plain background, red circle, centred", c.name)
                                   for c in CONCEPTS]}


SPLITS = 8   # weights-only (neighbour transfer) is also scored over this many splits (seeds 0..SPLITS-1): its spread
DRAWS = 4    # ... and fused and weights-only over this many draws of the descriptor's fixed random projections


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ quality
def load_labels(path: str | None) -> dict[str, str]:
    """{file stem: concept} from a labels file: `studio.tinyworld.build_library`'s ``assets/loras_labels.json``
    ({"loras/x.safetensors": {"concept": ...}}) or a plain {stem: concept}."""
    path = Path(path) if path else LABELS
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    return {Path(k).stem: (v["concept"] if isinstance(v, dict) else v) for k, v in raw.items()}


def concept_of(entry, labels: dict[str, str]) -> str | None:
    """The concept a catalogued LoRA was trained on: labels file, else file name, else trigger word."""
    if entry.name in labels:
        return labels[entry.name]
    for c in CONCEPTS:
        if entry.name == c.name or entry.name.startswith(c.name + "_") or entry.name.startswith(c.name + "-"):
            return c.name
    triggers = {c.trigger: c.name for c in CONCEPTS}
    for w in [*entry.trigger_words[:1], entry.alias or ""]:
        if w in triggers:
            return triggers[w]
    return None


def metadata_stems(entry) -> set[str]:
    text = " ".join([entry.name, entry.alias or "", " ".join(entry.trigger_words), entry.description,
                     " ".join(entry.tags), json.dumps(entry.metadata), json.dumps(entry.sidecar)])
    return set(stems(text))


def check_prompts(entries, concepts: dict[int, str]) -> None:
    bad = []
    for e in entries:
        c = concepts.get(e.id)
        if c is None:
            continue
        used = metadata_stems(e)
        for p in PROMPTS[c] + SECOND_PROMPTS[c]:
            overlap = set(stems(p)) & used
            if overlap:
                bad.append(f"{c} prompt {p!r} shares {sorted(overlap)} with {e.name}'s metadata")
    if bad:
        raise SystemExit("prompts must not use metadata words:\n  " + "\n  ".join(bad))


def split_loras(concepts: dict[int, str], has_meta: dict[int, bool], seed: int = 0) -> tuple[set[int], set[int]]:
    """(train, unseen) ids. Per concept, half of the LoRAs (at least one) train the encoder, taken among those
    with metadata (the others could not be trained on); the rest, every bare LoRA included, is unseen."""
    rng = random.Random(seed)
    by_concept: dict[str, list[int]] = {}
    for i, c in sorted(concepts.items()):
        by_concept.setdefault(c, []).append(i)
    train, unseen = set(), set()
    for ids in by_concept.values():
        rng.shuffle(ids)
        ids.sort(key=lambda i: not has_meta[i])  # metadata first (a stable sort keeps the shuffle)
        n_train = min(max(1, len(ids) // 2), sum(has_meta[i] for i in ids))
        train.update(ids[:n_train])
        unseen.update(ids[n_train:])
    return train, unseen


def rank_metrics(ranked: list[list[int]], relevant: list[set[int]]) -> dict:
    r1 = r3 = rr = 0.0
    for order, rel in zip(ranked, relevant):
        pos = next((k for k, i in enumerate(order) if i in rel), None)
        if pos is not None:
            r1 += pos < 1
            r3 += pos < 3
            rr += 1.0 / (pos + 1)
    n = max(len(ranked), 1)
    return {"r1": round(r1 / n, 4), "r3": round(r3 / n, 4), "mrr": round(rr / n, 4), "n_queries": len(ranked)}




def ranked_metrics(idx, qs, concepts: dict[int, str], mode: str, pool: set[int] | None = None
                   ) -> tuple[dict, list[list[int]], list[set[int]]]:
    """(metrics, ranked ids, relevant ids) of `idx` searched in `mode` for the (prompt, concept) pairs `qs`; with a
    `pool`, only the prompts about a concept it holds, ranking only its LoRAs."""
    if pool is not None:
        qs = [(p, c) for p, c in qs if any(concepts[i] == c for i in pool)]
    hits = idx.search_many([p for p, _ in qs], k=len(idx), family="tinyworld", mode=mode)
    ranked = [[h.id for h in hs if pool is None or h.id in pool] for hs in hits]
    relevant = [{i for i, cc in concepts.items() if cc == c and (pool is None or i in pool)} for _, c in qs]
    return rank_metrics(ranked, relevant), ranked, relevant


def autopick_scores(index, qs, off_library: list[str], concepts: dict[int, str]) -> tuple[float, float, list[dict]]:
    """(share of concept prompts whose top pick is of that concept, share of off-library prompts that pick nothing,
    the misses) of auto-pick as the studio runs it."""
    top_ok, misses = 0, []
    for p, c in qs:
        picks = autopick(p, index, k=3, family="tinyworld")
        ok = bool(picks) and concepts.get(picks[0].id) == c
        top_ok += ok
        if not ok:
            misses.append({"prompt": p, "concept": c, "picks": [(k.name, round(k.score, 3), k.phrase) for k in picks]})
    empty = sum(not autopick(p, index, k=3, family="tinyworld") for p in off_library)
    return round(top_ok / len(qs), 4), round(empty / len(off_library), 4), misses

def quality(args, work: Path) -> tuple[dict, object, object]:
    libraries = [Path(p) for p in args.library]
    files = [f for lib in libraries if lib.is_dir() for f in lib.rglob("*.safetensors")]
    if files and not args.synthetic:
        kind = "tinyworld-trained"
    else:
        from retrieval.synthetic import write_synthetic_library

        kind = "synthetic"
        library = work / "synthetic_library"
        libraries = [library]
        ranks = (4,) if args.tiny else (4, 8, 16)
        concepts = [c.name for c in CONCEPTS][: 8 if args.tiny else None]
        bare = [c for i, c in enumerate(concepts) if i % 5 == 4]
        log(f"writing a synthetic library ({len(concepts)} concepts x ranks {ranks}, seeds 0-1)")
        from retrieval.synthetic import SMALL_TARGETS

        write_synthetic_library(library, concepts, ranks=ranks, seeds=(0, 1), bare=(),
                                shapes=SMALL_TARGETS if args.tiny else None)
        # one more bare (no metadata) LoRA per fifth concept
        write_synthetic_library(library / "bare", bare, ranks=(8,), seeds=(7,), bare=bare,
                                shapes=SMALL_TARGETS if args.tiny else None, name_style="concept")
    labels = load_labels(args.labels)
    cat = Catalog(work / "quality" / "catalog.sqlite")
    t0 = time.monotonic()
    scans = [cat.scan(lib, workers=os.cpu_count() or 1) for lib in libraries]
    log(f"scanned {', '.join(map(str, libraries))}: {len(cat.all())} LoRAs ({time.monotonic() - t0:.1f}s)")
    entries = [e for e in cat.all() if e.status == "ok" and e.family == "tinyworld"]
    concepts = {e.id: c for e in entries if (c := concept_of(e, labels))}
    if len(concepts) < len(entries):
        log(f"warning: no concept known for {len(entries) - len(concepts)} LoRAs (left out of the scores)")
    check_prompts(entries, concepts)
    text = default_text_embedder(TINYWORLD, prefer=args.text)
    log(f"text embedder: {text.name} (dim {text.dim})")

    train_ids, unseen_ids = split_loras(concepts, {e.id: Metadata.of(e).has_text for e in entries})
    pairs = []
    for e in entries:
        if e.id in train_ids:
            m = Metadata.of(e)
            if m.has_text:
                pairs.append(TrainingPair(lora_svds(load_for_index(e.path, e.family), 4), captions(m), concepts[e.id],
                                          m.text(), e.family))
    t0 = time.monotonic()
    encoder, report = train_encoder(pairs, text, steps=args.encoder_steps, batch_size=32, lr=2e-3, seed=0,
                                    log=lambda s: log(f"encoder {s}"))
    train_s = time.monotonic() - t0
    log(f"encoder trained on {len(pairs)} LoRAs in {train_s:.0f}s")

    # as the studio runs by default (no trained encoder: weights-only channel by neighbour transfer), and with the
    # encoder trained above (its joint channel then takes the weights' place in fused search)
    plain = LibraryIndex.open(cat, text_embedder=text)
    index = LibraryIndex.open(cat, text_embedder=text, encoder=encoder)
    queries = [(p, c) for c in sorted(set(concepts.values())) for p in PROMPTS[c]]
    relevant = [{i for i, cc in concepts.items() if cc == c} for _, c in queries]
    out = {}
    ranked_first = {}
    for key, mode, idx in (("fused", "fused", plain), ("fused_with_encoder", "fused", index),
                           ("metadata_only", "metadata", plain), ("lexical_only", "lexical", plain)):
        out[key], ranked, _ = ranked_metrics(idx, queries, concepts, mode)
        ranked_first[key] = ranked
        if key == "fused":   # the misses, for diagnosis: prompt, concept, what came first
            names = {e.id: e.name for e in entries}
            out["fused_misses"] = [{"prompt": p, "concept": c, "top3": [names.get(i) for i in order[:3]]}
                                   for (p, c), order, rel in zip(queries, ranked, relevant)
                                   if not any(i in rel for i in order[:3])]
    # prompts that name the LoRA's own words (no paraphrase)
    out["direct_prompts"] = {k: ranked_metrics(plain, qs, concepts, "fused")[0] for k, qs in direct_prompts().items()}
    # the second prompt set, and both together
    second = [(p, c) for c in sorted(set(concepts.values())) for p in SECOND_PROMPTS[c]]
    for key, mode in (("fused", "fused"), ("metadata_only", "metadata")):
        out.setdefault("second_prompts", {})[key], ranked, rel = ranked_metrics(plain, second, concepts, mode)
        out.setdefault("all_prompts", {})[key] = rank_metrics(ranked_first[key] + ranked, relevant + rel)
    # weights only: queries about concepts with unseen LoRAs, ranking only the unseen LoRAs. Neighbour transfer
    # (the studio's weights-only channel) may transfer only the training split's metadata, as the encoder saw only
    # that; the learned encoder alone for comparison.
    plain.build_neighbours(sources=train_ids)
    for key, pool, idx, mode in (("weights_only_unseen", unseen_ids, plain, "weights"),
                                 ("weights_only_seen", train_ids, plain, "weights"),
                                 ("encoder_only_unseen", unseen_ids, index, "encoder"),
                                 ("encoder_only_seen", train_ids, index, "encoder")):
        out[key] = {**ranked_metrics(idx, queries, concepts, mode, pool)[0], "pool": len(pool)}
    # the same over SPLITS random splits (no encoder to train for it): how much the one split's figure is luck
    has_meta = {e.id: Metadata.of(e).has_text for e in entries}
    spread, spread2 = split_spread(plain, (queries, second), concepts, has_meta)
    out["weights_only_unseen_splits"] = {"r3_mean": round(float(np.mean(spread)), 4), "r3_min": min(spread),
                                         "r3_max": max(spread), "r3": spread, "splits": SPLITS}
    plain.build_neighbours()   # back to the studio's own: every LoRA with metadata is a source
    studio_draw = {"seed": 0, "fused_r3": out["fused"]["r3"], "fused_r3_second": out["second_prompts"]["fused"]["r3"],
                   "weights_only_r3_mean": round(float(np.mean(spread)), 4),
                   "weights_only_r3_mean_second": round(float(np.mean(spread2)), 4)}
    out["projection_draws"] = projection_draws(studio_draw, libraries, entries, text, work, queries, second,
                                               concepts, has_meta)
    # auto-pick (as the studio runs it, without an encoder): the top pick on concept prompts, and nothing on prompts
    # about nothing in the library
    top, empty, out["autopick_misses"] = autopick_scores(plain, queries, NOTHING_FITS, concepts)
    top2, empty2, _ = autopick_scores(plain, second, SECOND_NOTHING_FITS, concepts)
    out["autopick"] = {"top_pick_correct": top, "nothing_fits_empty": empty, "threshold": DEFAULT_THRESHOLD,
                       "second_prompts": {"top_pick_correct": top2, "nothing_fits_empty": empty2}}
    out["library"] = {"kind": kind, "paths": [str(lib.relative_to(ROOT)) if lib.is_relative_to(ROOT) else str(lib)
                                              for lib in libraries], "loras": len(entries), "with_concept": len(concepts),
                      "bare": sum(not Metadata.of(e).has_text for e in entries),
                      "concepts": len(set(concepts.values())),
                      "encoder_train_loras": len(pairs), "unseen_loras": len(unseen_ids),
                      "text_embedder": text.name, "encoder_steps": args.encoder_steps,
                      "encoder_train_s": round(train_s, 1), "scan": [str(sc).splitlines()[0] for sc in scans]}
    return out, text, encoder


def split_spread(idx, prompt_sets, concepts: dict[int, str], has_meta: dict[int, bool]) -> list[list[float]]:
    """Per prompt set, weights-only R@3 over the SPLITS splits (neighbours rebuilt from each split's sources; the
    index is left on the last split's)."""
    out = [[] for _ in prompt_sets]
    for split in range(SPLITS):
        tr, un = split_loras(concepts, has_meta, split)
        idx.build_neighbours(sources=tr)
        for r3, qs in zip(out, prompt_sets):
            r3.append(ranked_metrics(idx, qs, concepts, "weights", un)[0]["r3"])
    return out


def projection_draws(studio_draw: dict, libraries, entries, text, work: Path, queries, second,
                     concepts: dict[int, str], has_meta: dict[int, bool]) -> dict:
    """Fused R@3 (both prompt sets) and the weights-only mean R@3 over the SPLITS splits, for DRAWS seeds of the
    descriptor's fixed random projections: `studio_draw` (seed 0, the studio's own, scored by the caller) and
    seeds 1.. DRAWS-1, each scanned into a catalog of its own (an index of another seed reads the files itself).
    How much a figure owes to one draw."""
    from retrieval.descriptor import DescriptorConfig

    path_of = {e.id: str(e.path) for e in entries}
    rows = [studio_draw]
    for seed in range(1, DRAWS):
        draw = Catalog(work / f"draw{seed}" / "catalog.sqlite")
        for lib in libraries:
            draw.scan(lib, workers=os.cpu_count() or 1)
        new_id = {str(e.path): e.id for e in draw.all()}
        remap = {i: new_id[path_of[i]] for i in path_of}
        c = {remap[i]: v for i, v in concepts.items()}
        meta = {remap[i]: v for i, v in has_meta.items()}
        idx = LibraryIndex.open(draw, text_embedder=text, descriptor_config=DescriptorConfig(seed=seed))
        row = {"seed": seed, "fused_r3": ranked_metrics(idx, queries, c, "fused")[0]["r3"],
               "fused_r3_second": ranked_metrics(idx, second, c, "fused")[0]["r3"]}
        spread, spread2 = split_spread(idx, (queries, second), c, meta)
        row["weights_only_r3_mean"] = round(float(np.mean(spread)), 4)
        row["weights_only_r3_mean_second"] = round(float(np.mean(spread2)), 4)
        rows.append(row)
        draw.close()
        log(f"projection draw {seed}: {row}")
    return {"draws": rows, **{f"mean_{k}": round(float(np.mean([r[k] for r in rows])), 4)
                              for k in ("fused_r3", "fused_r3_second", "weights_only_r3_mean",
                                        "weights_only_r3_mean_second")}}


# ------------------------------------------------------------------------------------------------ scale
def scale(args) -> dict:
    import faiss

    n, d = args.scale_n, 128
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(n // 50, 10), d)).astype(np.float32)
    log(f"scale: {n} clustered vectors, d={d}")
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s:s + m] = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.standard_normal((m, d)).astype(np.float32)
    x = normalise(x)

    def queries(m):  # near the data, not on it (as prompts are to LoRA vectors)
        noise = rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d)
        return normalise(x[rng.choice(n, m, replace=False)] + noise)

    q, calib = queries(1000), queries(300)  # nprobe is tuned on `calib`, recall is measured on `q`
    t0 = time.monotonic()
    vi = VectorIndex(d, ivf_threshold=min(100_000, n // 2), target_recall=args.target_recall)
    vi.add(np.arange(n), x, "tinyworld")
    vi.tune_nprobe("tinyworld", x, np.arange(n), queries=calib)
    build_s = time.monotonic() - t0
    st = vi.stats()["tinyworld"]
    log(f"built {st.kind} nlist={st.nlist} nprobe={st.nprobe} in {build_s:.0f}s")
    exact = faiss.IndexFlatIP(d)
    exact.add(x)
    _, gt = exact.search(q, 10)
    del exact
    faiss.omp_set_num_threads(1)
    lat = []
    found = np.zeros((len(q), 10), dtype=np.int64)
    for j in range(len(q)):
        t = time.perf_counter()
        _, i = vi.search(q[j:j + 1], 10, "tinyworld")
        lat.append(time.perf_counter() - t)
        found[j] = i[0]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    lat_ms = np.array(lat) * 1000
    return {"n": n, "dim": d, "ms_per_query": round(float(lat_ms.mean()), 4),
            "p95_ms": round(float(np.percentile(lat_ms, 95)), 4), "recall": round(recall_at_k(found, gt), 4),
            "recall_at": 10, "kind": st.kind, "nlist": st.nlist, "nprobe": st.nprobe, "build_s": round(build_s, 1),
            "threads": 1, "queries": len(q)}


# ------------------------------------------------------------------------------------------------ files
def write_files(folder: Path, n: int, rank: int = 4) -> None:
    """n TinyWorld-shaped kohya files (random rank-`rank` fp16 factors) with metadata and a Civitai sidecar."""
    import torch
    from safetensors.torch import save_file

    from retrieval.synthetic import synthetic_lora, tinyworld_metadata
    from studio.library.formats import _kohya_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    template = _kohya_state_dict(synthetic_lora("zorbo", rank, 0, dtype=torch.float16))
    metas = {c.name: tinyworld_metadata(c.name, rank, 0) for c in CONCEPTS}
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        c = CONCEPTS[k % len(CONCEPTS)].name
        tensors = {key: (t if key.endswith(".alpha") else torch.randn(t.shape, generator=g).half())
                   for key, t in template.items()}
        meta, info = metas[c]
        # every file its own description, as in a real library (no two texts alike to embed only once); the
        # catalog reads the model's description first, so that is the text made unique
        model = dict(info.get("model") or {})
        model["description"] = (f"{model.get('description') or info.get('description', '')} Version "
                                f"{k // len(CONCEPTS) + 1}: {200 + 50 * (k % 13)} steps, rank {4 * (1 + k % 8)}, "
                                f"seed {k}.")
        info = dict(info, model=model)
        path = folder / f"f{k:05d}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        path.with_suffix(".civitai.info").write_text(json.dumps(info))


def files_bench(args, work: Path, text, encoder) -> dict:
    import statistics

    folder = work / "files"
    t0 = time.monotonic()
    write_files(folder, args.files)
    log(f"wrote {args.files} files in {time.monotonic() - t0:.0f}s")
    scans = []
    for r in range(args.file_rounds):   # a fresh catalog each round: every file read, hashed and checked again
        cat = Catalog(work / f"files_catalog_{r}" / "catalog.sqlite")
        t0 = time.monotonic()
        cat.scan(folder, workers=os.cpu_count() or 1)
        scans.append(round(time.monotonic() - t0, 2))
        log(f"catalog scan, round {r + 1}: {scans[-1]:.1f}s")
        if r < args.file_rounds - 1:
            cat.close()
            shutil.rmtree(work / f"files_catalog_{r}", ignore_errors=True)
    scan_s = statistics.median(scans)
    # as the studio indexes by default (weight descriptor + metadata text), then with a trained weight encoder
    # (the optional "weights" and "joint" channels) when the quality section trained one
    out = {"files": args.files, "catalog_scan_s": round(scan_s, 2), "catalog_scan_rounds": scans,
           "text_embedder": text.name if text else None}
    runs = [("index_s", None)] + ([("index_with_encoder_s", encoder)] if encoder is not None else [])
    for key, enc in runs:
        times = []
        for r in range(args.file_rounds):
            index = LibraryIndex(cat, text_embedder=text, encoder=enc, workers=args.workers)
            t0 = time.monotonic()
            report = index.rebuild()
            times.append(round(time.monotonic() - t0, 2))
        out[key] = round(statistics.median(times), 2)
        out[key.replace("_s", "_rounds")] = times
        out["channels" if enc is None else "channels_with_encoder"] = sorted(index.vectors)
        out["files_read" if enc is None else "files_read_with_encoder"] = report.files_read
        if enc is None:
            out["texts_from_catalog"] = report.texts_from_catalog
        log(f"index rebuild ({', '.join(sorted(index.vectors))}): {out[key]:.1f}s median of {times} ({len(index)} "
            f"LoRAs, {len(report.failed)} failed, {report.from_catalog} from the catalog, {report.files_read} files "
            f"read, {report.texts_from_catalog} text vectors from the catalog)")
    shutil.rmtree(folder, ignore_errors=True)
    out.update(total_s=round(out["index_s"] + scan_s, 2), workers=args.workers or "default",
               rounds=args.file_rounds)
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--library", nargs="+", default=[str(p) for p in LIBRARY],
                    help="LoRA folders, scanned into one catalog (default: TinyWorld's headline and community sets)")
    ap.add_argument("--synthetic", action="store_true", help="use a synthetic library even if --library has files")
    ap.add_argument("--labels", default=None, help="ground truth (default assets/loras_labels.json if present)")
    ap.add_argument("--text", default="auto", choices=["auto", "sentence", "clip", "hashing"])
    ap.add_argument("--encoder-steps", type=int, default=600)
    ap.add_argument("--scale-n", type=int, default=1_000_000)
    ap.add_argument("--target-recall", type=float, default=0.98)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--file-rounds", type=int, default=3, help="rounds of the 10 000-file scan and index (median)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-files", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="smoke run at toy sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.encoder_steps = min(args.encoder_steps, 30)
        args.scale_n = min(args.scale_n, 20_000)
        args.files = min(args.files, 40)
    out_path = Path(args.out or ("/tmp/retrieval_tiny.json" if args.tiny else ROOT / "bench/results/retrieval.json"))
    result: dict = {}
    if out_path.is_file():
        try:
            result = json.loads(out_path.read_text())  # sections not rerun keep their last numbers
        except json.JSONDecodeError:
            result = {}
    work = Path(tempfile.mkdtemp(prefix="retrieval_bench_"))
    text = encoder = None
    try:
        if not args.skip_quality:
            q, text, encoder = quality(args, work)
            result.update(fused=q["fused"], metadata_only=q["metadata_only"],
                          weights_only_unseen=q["weights_only_unseen"],
                          details={**result.get("details", {}), "quality": q})
        if not args.skip_scale:
            result["scale"] = scale(args)
        if not args.skip_files:
            if text is None:
                text = default_text_embedder(TINYWORLD, prefer=args.text)
            f = files_bench(args, work, text, encoder)
            result["index_10k_files_s"] = f["index_s"] if args.files == 10_000 else None
            result.setdefault("details", {})["files"] = f
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"] = machine()
    result["tiny"] = bool(args.tiny)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    log(f"wrote {out_path}")
    print(json.dumps({k: result.get(k) for k in ("fused", "metadata_only", "weights_only_unseen", "scale",
                                                  "index_10k_files_s")}, indent=2))


if __name__ == "__main__":
    main()
