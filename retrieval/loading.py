"""Reading catalogued LoRA files for indexing, fast: factors only, no dense ΔW, no second validation.

A catalog scan has already read, checked (finite values, shapes, family) and hashed each file with
`studio.library.formats.read_lora`. Indexing only needs each module's factors and scale, so `read_factors`
reads the container with the library's one-read `read_safetensors` (tensors as views of the bytes) and
groups tensor names into modules with the library's `group_keys`, computed once per distinct key set (a library's files mostly share
one). Plain LoRA/LoCon modules become ``(B, A, scale)`` triples; every other module goes through the library's
own module builder, and anything unusual (pickles, odd dtypes, unknown keys) through `read_lora`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from studio.library import formats
from studio.library.canonical import LoRA, ModuleLoRA

Factors = Union[tuple, ModuleLoRA]  # (B (out, r), A (r, in'), scale) or a full module


class _Fallback(Exception):
    pass


def read_factors(path: str | Path, family: str | None = None) -> tuple[dict[str, Factors], str, dict[str, str]]:
    """({module: (B, A, scale) or ModuleLoRA}, family, metadata) of a LoRA file."""
    path = Path(path)
    try:
        return _read_fast(path, family)
    except _Fallback:
        lora = formats.read_lora(path)
        return dict(lora.modules), family or lora.family, lora.metadata


def load_for_index(path: str | Path, family: str | None = None) -> LoRA:
    """A canonical `LoRA` built from `read_factors` (plain modules rebuilt as `ModuleLoRA`)."""
    modules, family, metadata = read_factors(path, family)
    out = {}
    for name, m in modules.items():
        if isinstance(m, tuple):
            B, A, scale = m
            out[name] = ModuleLoRA("lora", {"down": A, "up": B}, alpha=scale * A.shape[0])
        else:
            out[name] = m
    return LoRA(out, family=family, metadata=metadata)


def _read_fast(path: Path, family: str | None):
    if path.suffix.lower() != ".safetensors":
        raise _Fallback
    try:
        tensors, metadata = formats.read_safetensors(path)
    except formats.LoRAFileError:
        raise _Fallback from None   # read_lora says what is wrong with the file
    keys = tuple(tensors)
    fmt = formats.detect_format(keys, metadata)
    if fmt == "unknown":
        raise _Fallback
    groups, unknown = formats.grouped_keys(keys, fmt)
    if unknown or not groups:
        raise _Fallback
    tensor = tensors.__getitem__

    configs = formats.adapter_configs(path, metadata) if fmt == "diffusers" else {}
    modules: dict[str, Factors] = {}
    for name, group in sorted(groups.items()):
        k = group.keys
        kind = group.kind or "lora"
        config = configs.get(name.split(".", 1)[0], {})
        if kind == "lora" and "mid" not in k and "down" in k and "up" in k:
            down, up = tensor(k["down"]), tensor(k["up"])
            if up.dim() != down.dim():
                raise _Fallback
            B, A = (up, down) if up.dim() == 2 else (up.flatten(1), down.flatten(1))
            if B.shape[1] != A.shape[0]:
                raise _Fallback
            rank = A.shape[0]
            if "alpha" in k:
                a = tensor(k["alpha"])
                if a.numel() != 1:
                    raise _Fallback
                alpha = float(a.reshape(()).item())
            elif fmt != "kohya":
                alpha = formats.peft_alpha(config, name.split(".", 1)[1], rank)
            else:
                alpha = None
            modules[name] = (B, A, alpha / rank if alpha and rank else 1.0)
        else:
            modules[name] = formats._build_module(path, name, group, {t: tensor(t) for t in k.values()}, fmt, config)
    if family is None:
        family = formats.detect_family({key: tuple(t.shape) for key, t in tensors.items()}, metadata)
    kept = {key: v for key, v in metadata.items()
            if key != formats.ADAPTER_METADATA_KEY and (key, v) != ("format", "pt")}
    return modules, family, kept
