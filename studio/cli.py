"""The `studio` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_generate(args) -> int:
    from .api import Studio

    studio = Studio(model=args.model, device=args.device, sampler=args.sampler, library=args.library)
    params = json.loads(args.method_params) if args.method_params else None
    results = studio.generate(args.prompt, n=args.n, seed=args.seed, steps=args.steps, cfg=args.cfg,
                              negative_prompt=args.negative, out=args.out, method=args.method,
                              method_params=params)
    for r in results:
        print(r.path)
    print(f"{len(results)} image(s) in {Path(args.out).resolve()} "
          f"({studio.model_name} on {studio.device.type})")
    return 0


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
        report = catalog.scan(args.library)
        print(report)
        print(f"{len(catalog.all())} LoRA(s) in the catalog, {len(catalog.quarantined())} quarantined "
              f"({Path(args.library).resolve() / '.studio' / 'catalog.sqlite'})")
    return 0


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
    g.add_argument("--library", default=None, help="folder of LoRA files named by <lora:name:weight> tags")
    g.add_argument("--method", default=None, choices=["merge", "blockwise", "switch", "composite"],
                   help="how several LoRAs are composed (default: merge, blockwise when a tag has lbw/start/stop)")
    g.add_argument("--method-params", default=None, help='JSON parameters of the method, e.g. \'{"tau": 5}\'')
    g.set_defaults(func=_cmd_generate)

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
