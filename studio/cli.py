"""The `studio` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .library.catalog import cache_dir


def _cmd_generate(args) -> int:
    from .api import Studio

    studio = Studio(model=args.model, device=args.device, sampler=args.sampler, library=args.library)
    params = json.loads(args.method_params) if args.method_params else None
    loras = _parse_loras(args.loras) if studio.library is not None else None
    results = studio.generate(args.prompt, n=args.n, seed=args.seed, steps=args.steps, cfg=args.cfg,
                              negative_prompt=args.negative, out=args.out, loras=loras, method=args.method,
                              method_params=params)
    if loras == "auto":
        picks = studio.last_picks
        print("auto-picked LoRAs: " + (", ".join(f"{p.name} ({p.score:.2f})" for p in picks) if picks
                                        else "none fits this prompt"))
    for r in results:
        print(r.path)
    print(f"{len(results)} image(s) in {Path(args.out).resolve()} "
          f"({studio.model_name} on {studio.device.type})")
    return 0


def _parse_loras(spec: str):
    """``auto`` (retrieval picks), ``none``, or ``name[:weight],name[:weight]``."""
    if spec in ("auto", "none"):
        return spec if spec == "auto" else None
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, weight = item.partition(":")
        out.append((name, float(weight) if weight else 1.0))
    return out


def _cmd_inspect(args) -> int:
    from .library.inspect import inspect_file

    code = 0
    for f in args.files:
        try:
            print(inspect_file(f))
        except Exception as e:  # LoRAFileError names the file, reason and fix
            print(f"{f}: {e}", file=sys.stderr)
            code = 1
        print()
    return code


def _cmd_index(args) -> int:
    from .api import open_catalog

    with open_catalog(args.library) as catalog:
        report = catalog.scan(args.library, workers=os.cpu_count() or 1)
        print(report)
        print(f"{len(catalog.all())} LoRA(s) in the catalog, {len(catalog.quarantined())} quarantined "
              f"({cache_dir(args.library) / 'catalog.sqlite'})")
    return 0


def _cmd_batch(args) -> int:
    from .api import Studio

    studio = Studio(model=args.model, device=args.device, sampler=args.sampler, library=args.library)
    report = studio.generate_batch(args.jobfile, out=args.out, engine=args.engine, workers=args.workers,
                                   batch_size=args.batch_size)
    print(report)
    return 0


def _cmd_cluster(args) -> int:
    from .api import Studio, StudioInputError

    if args.k is not None and args.k < 1:
        raise StudioInputError(f"--k {args.k}: the number of clusters is at least 1 (leave it out to choose it)")
    studio = Studio(model=args.model, device=args.device, library=args.library)
    if studio.library is None:
        raise StudioInputError("no LoRA library: pass --library DIR, a folder of LoRA files")
    out = Path(args.out) if args.out else cache_dir(studio.library) / "style_map.png"
    styles = studio.cluster(k=args.k, out_png=out, previews=args.previews)
    if args.json:
        print(json.dumps(styles.to_dict(), indent=2))
        return 0
    groups = styles.groups()
    print(f"{len(styles.names)} {styles.family} LoRA(s) of {Path(studio.library).resolve()} in {len(groups)} "
          f"style cluster(s) (silhouette {styles.clusters.silhouette:.3f}):")
    for i, (name, members) in enumerate(groups.items()):
        print(f"  [{i}] {name} ({len(members)}): {', '.join(members)}")
    for s in styles.skipped:
        print(f"  skipped {s}")
    print(f"style map: {Path(styles.map_png).resolve()}")
    return 0


def _methods() -> list[str]:
    """Every fusion method registered now (`fusion.schedules.SCHEDULES`)."""
    try:
        from fusion.schedules import SCHEDULES

        return list(SCHEDULES)
    except Exception:  # the CLI still starts; Studio reports the real import error
        return ["merge", "blockwise", "switch", "composite"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="studio", description="LoRA Studio: compose LoRAs on a diffusion model.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="prompt to images (TinyWorld unless --model)")
    g.add_argument("prompt")
    g.add_argument("--n", type=int, default=4, help="number of images (image i uses seed + i)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--sampler", choices=["dpm++", "ddim"], default="dpm++")
    g.add_argument("--out", default="out", help="folder for the PNGs (each carries its recipe)")
    g.add_argument("--model", default=None, help="SD1.5/SDXL diffusers folder or .safetensors checkpoint")
    g.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda when available)")
    g.add_argument("--library", default=None, help="folder of LoRA files (default: TinyWorld's own library)")
    g.add_argument("--loras", default="auto", help="auto (picked by retrieval from the library, trigger words "
                   "inserted), none, or name[:weight],... ; <lora:name:w> tags in the prompt always apply")
    g.add_argument("--method", default=None, choices=_methods(),
                   help="how several LoRAs are composed (default: merge, blockwise when a tag has lbw/start/stop)")
    g.add_argument("--method-params", default=None, help='JSON parameters of the method, e.g. \'{"tau": 5}\'')
    g.set_defaults(func=_cmd_generate)

    b = sub.add_parser("batch", help="run a job file (JSONL / YAML / JSON) into a folder of PNGs + manifest.jsonl; "
                                      "running it again resumes")
    b.add_argument("jobfile", help="jobs: prompt, loras (auto | names), method, method_params, seeds, steps, cfg")
    b.add_argument("--out", required=True, help="output folder (PNGs with recipes, manifest.jsonl)")
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="ray: fan out over Ray workers (one per GPU, else --workers CPU workers)")
    b.add_argument("--workers", type=int, default=None, help="number of Ray workers (default: GPUs, else CPUs)")
    b.add_argument("--batch-size", type=int, default=1,
                   help="seeds of one job per pipeline call (1: each image equals `generate --n 1` with its seed)")
    b.add_argument("--sampler", choices=["dpm++", "ddim"], default="dpm++")
    b.add_argument("--model", default=None, help="SD1.5/SDXL diffusers folder or .safetensors checkpoint")
    b.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda when available)")
    b.add_argument("--library", default=None, help="folder of LoRA files")
    b.set_defaults(func=_cmd_batch)

    c = sub.add_parser("cluster", help="cluster the library's LoRAs by style (from their weights) and draw a style map")
    c.add_argument("--library", default=None, help="folder of LoRA files (default: assets/loras with TinyWorld)")
    c.add_argument("--k", type=int, default=None, help="number of clusters (default: chosen by silhouette)")
    c.add_argument("--out", default=None, help="the map PNG (default: <library>/.studio/style_map.png)")
    c.add_argument("--previews", action="store_true",
                   help="render missing thumbnails with the model (cached in <library>/.studio/previews/)")
    c.add_argument("--json", action="store_true", help="print the clusters as JSON")
    c.add_argument("--model", default=None, help="the base model whose family is clustered (default TinyWorld)")
    c.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda when available)")
    c.set_defaults(func=_cmd_cluster)

    x = sub.add_parser("index", help="scan a folder of LoRA files into its catalog (incremental)")
    x.add_argument("library")
    x.set_defaults(func=_cmd_index)

    i = sub.add_parser("inspect", help="print a format report of LoRA files")
    i.add_argument("files", nargs="+")
    i.set_defaults(func=_cmd_inspect)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .api import StudioInputError

    try:
        return args.func(args)
    except StudioInputError as e:
        print(f"studio: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
