"""Retrieval from the command line.

    python -m retrieval train  --library assets/loras --out assets/retrieval/encoder_tinyworld.safetensors
    python -m retrieval search --library assets/loras "a spooky phantom wearing shades" [-k 5] [--mode fused]
    python -m retrieval pick   --library assets/loras "a spooky phantom wearing shades" [-k 3]

The catalog is ``<library>/.studio/catalog.sqlite`` (scanned first), the index sits beside it. The text
embedder is the best available (``--text``); ``--model`` is the base model folder whose CLIP text encoder is used.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _catalog(library: Path):
    from studio.library.catalog import Catalog, cache_dir

    cat = Catalog(cache_dir(library) / "catalog.sqlite")
    cat.scan(library)
    return cat


def _text(args):
    from .text import default_text_embedder

    return default_text_embedder(Path(args.model), prefer=args.text)


def train(args) -> None:
    from .descriptor import lora_svds
    from .encoder import TrainingPair, train_encoder
    from .loading import load_for_index
    from .text import Metadata, captions

    cat = _catalog(Path(args.library))
    text = _text(args)
    pairs = []
    for e in cat.all():
        m = Metadata.of(e)
        if e.status != "ok" or e.family != args.family or not m.has_text:
            continue
        group = (e.trigger_words[0] if e.trigger_words else e.description).lower()
        svds = lora_svds(load_for_index(e.path, e.family), 4)
        pairs.append(TrainingPair(svds, captions(m), group, m.text(), e.family))
    print(f"training on {len(pairs)} LoRAs with metadata, text embedder {text.name}")
    enc, report = train_encoder(pairs, text, steps=args.steps, seed=args.seed, log=print)
    path = enc.save(args.out)
    print(json.dumps({"out": str(path), "pairs": len(pairs), "final_loss": report.losses[-1],
                      "seconds": round(report.seconds, 1)}))


def _index(args):
    from .encoder import LoRAEncoder
    from .library import LibraryIndex

    encoder = LoRAEncoder.load(args.encoder) if args.encoder else None
    return LibraryIndex.open(_catalog(Path(args.library)), text_embedder=_text(args), encoder=encoder)


def search(args) -> None:
    index = _index(args)
    for h in index.search(args.prompt, k=args.k, family=args.family, mode=args.mode):
        chans = ", ".join(f"{c} {v:.2f}" for c, v in h.channels.items())
        model = f"  [version of {h.model}]" if h.model and h.model != h.name else ""
        print(f"{h.score:.3f}  {h.name}{model}  ({chans})  {' '.join(h.matched)}")


def pick(args) -> None:
    from .autopick import autopick, explain, insert_triggers

    picks = autopick(args.prompt, _index(args), k=args.k, family=args.family, threshold=args.threshold)
    print(explain(picks))
    print("prompt:", insert_triggers(args.prompt, picks))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m retrieval")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("train", "search", "pick"):
        p = sub.add_parser(name)
        p.add_argument("--library", default=str(ROOT / "assets" / "loras"))
        p.add_argument("--model", default=str(ROOT / "assets" / "tinyworld"))
        p.add_argument("--text", default="auto", choices=["auto", "sentence", "clip", "hashing"])
        p.add_argument("--family", default="tinyworld")
        if name == "train":
            p.add_argument("--out", required=True)
            p.add_argument("--steps", type=int, default=600)
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("prompt")
            p.add_argument("-k", type=int, default=5 if name == "search" else 3)
            p.add_argument("--encoder", default=None)
            if name == "search":
                p.add_argument("--mode", default="fused")
            else:
                p.add_argument("--threshold", type=float, default=0.3)
    args = ap.parse_args(argv)
    {"train": train, "search": search, "pick": pick}[args.cmd](args)


if __name__ == "__main__":
    main()
