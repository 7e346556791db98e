"""`inspect_file`: what a LoRA file holds, read from its header (and alpha scalars) without loading factors."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import sidecars as sc
from .canonical import module_rank
from .errors import CorruptFileError
from .formats import (
    REEXPORT_FIX,
    ADAPTER_METADATA_KEY,
    adapter_configs,
    load_tensors,
    no_lora_error,
    delta_shapes,
    peft_alpha,
    unsupported_reason,
    detect_format,
    family_evidence,
    group_keys,
    is_pickle,
    read_header,
)

_SUMMARY_KEYS = (
    "ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim",
    "ss_network_alpha", "ss_network_args", "ss_num_train_images", "ss_num_epochs", "ss_resolution",
    "modelspec.title", "modelspec.architecture", "modelspec.author", "modelspec.date", "modelspec.license",
)


@dataclass
class FormatReport:
    """Summary of one LoRA file; `str()` is the text of ``studio inspect FILE``."""

    path: str
    size: int
    format: str
    kinds: list[str]
    dora: bool
    family: str
    family_evidence: str
    ranks: list[int]
    alphas: list[float]
    n_modules: int
    components: dict[str, int]
    dtypes: list[str]
    trigger_words: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        naming = {"kohya": "kohya / A1111 / LyCORIS names", "diffusers": "diffusers / PEFT",
                  "diffusers_old": "old diffusers (attention processors)"}.get(self.format, self.format)
        kinds = ", ".join(self.kinds) + (" + DoRA" if self.dora else "") or "-"
        per = ", ".join(f"{c} {n}" for c, n in self.components.items())
        alpha = ", ".join(f"{a:g}" for a in self.alphas) or "none (scale 1)"
        lines = [
            f"{Path(self.path).name}  ({_size(self.size)})",
            f"  format    {naming}",
            f"  adapters  {kinds}",
            f"  family    {self.family}  ({self.family_evidence})",
            f"  rank      {', '.join(map(str, self.ranks)) or '-'}   alpha {alpha}",
            f"  modules   {self.n_modules}" + (f" ({per})" if per else ""),
            f"  dtype     {', '.join(self.dtypes) or '-'}",
        ]
        if self.trigger_words:
            lines.append(f"  triggers  {', '.join(self.trigger_words)}")
        for key, value in self.metadata.items():
            lines.append(f"  {key} = {value}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def inspect_file(path: str | Path, *, allow_pickle: bool = False) -> FormatReport:
    """Describe a LoRA file: format, adapter kinds, family, ranks, alphas, modules, triggers, metadata, warnings.

    Reads the safetensors header and the alpha scalars only; raises `LoRAFileError` for corrupt, pickled
    (unless `allow_pickle`) or non-LoRA files.
    """
    path = Path(path)
    warnings = []
    if is_pickle(path):
        tensors, metadata = load_tensors(path, allow_pickle)
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        size = path.stat().st_size
        warnings.append("pickled checkpoint: prefer .safetensors")
    else:
        header = read_header(path)
        tensors, shapes, metadata, size = None, header.shapes, header.metadata, header.size
        dtypes = sorted({d for d, _ in header.tensors.values()})
    fmt = detect_format(shapes, metadata)
    if fmt == "unknown":
        raise no_lora_error(path)
    groups, unknown = group_keys(shapes, fmt)
    if unknown:
        warnings.append(unsupported_reason(unknown))
    delta = delta_shapes(groups, shapes)
    if broken := sorted(set(groups) - set(delta)):
        warnings.append(f"{len(broken)} module(s) whose factors do not fit together, e.g. {broken[0]}")
    alpha_keys = [k for g in groups.values() if (k := g.keys.get("alpha")) and math.prod(shapes[k]) == 1]
    values = _scalars(path, alpha_keys, tensors)
    configs = adapter_configs(path, metadata) if fmt == "diffusers" else {}
    alphas, ranks, kinds, components = set(), set(), set(), Counter()
    for name, group in sorted(groups.items()):
        component, module = name.split(".", 1)
        components[component] += 1
        kind = group.module_kind(shapes)
        kinds.add(kind)
        rank = module_rank(kind, group.factor_shapes(shapes)) if name in delta else None
        ranks.add(rank)
        if group.keys.get("alpha") in values:
            alphas.add(values[group.keys["alpha"]])
        elif fmt == "diffusers" and rank is not None:
            alphas.add(peft_alpha(configs.get(component, {}), module, rank))
    family, evidence, family_warnings = family_evidence(shapes, metadata)
    warnings += family_warnings
    side = sc.find_sidecars(path)
    warnings += side.warnings
    hint = sc.family_hint(side)
    if hint and family == "unknown":
        family, evidence = hint, "from the sidecar files"
    elif hint and hint != family:
        warnings.append(f"sidecar files say {hint} but the tensors say {family}")
    summary = {k: _short(metadata[k]) for k in _SUMMARY_KEYS if k in metadata}
    if ADAPTER_METADATA_KEY in metadata:
        summary[ADAPTER_METADATA_KEY] = "present (per-module alphas)"
    return FormatReport(
        path=str(path), size=size, format=fmt, kinds=sorted(kinds),
        dora=any("dora_scale" in g.keys for g in groups.values()), family=family, family_evidence=evidence,
        ranks=sorted(r for r in ranks if r is not None), alphas=sorted(a for a in alphas if a is not None),
        n_modules=len(groups), components=dict(components), dtypes=dtypes,
        trigger_words=sc.trigger_words(metadata, side), metadata=summary, warnings=warnings,
    )


def _scalars(path: Path, keys: list[str], tensors: dict | None) -> dict[str, float]:
    """Values of single-element tensors, read one by one from a safetensors file unless already loaded."""
    if tensors is not None:
        return {k: float(tensors[k].float().reshape(-1)[0]) for k in keys}
    if not keys:
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: float(f.get_tensor(k).float().reshape(-1)[0]) for k in keys}
    except Exception as e:  # safetensors raises its own error type for data it cannot map
        raise CorruptFileError(path, f"cannot read the alpha values ({e})", REEXPORT_FIX) from None


def _short(value: str, limit: int = 80) -> str:
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"
