"""Read and write LoRA files (kohya/A1111, LyCORIS LoHa/LoKr, DoRA, diffusers/PEFT) as canonical `LoRA`s.

Formats, by key naming:

- ``kohya``: ``lora_unet_*``/``lora_te_*``/``lora_te1_*``/``lora_te2_*`` names with ``.lora_down.weight``,
  ``.lora_up.weight``, ``.lora_mid.weight``, ``.alpha``, ``.dora_scale`` or LyCORIS ``.hada_*``/``.lokr_*``.
- ``diffusers``: ``unet.<path>.lora_A.weight``/``lora_B.weight`` (PEFT), DoRA ``lora_magnitude_vector``,
  alphas in the ``lora_adapter_metadata`` JSON of the safetensors metadata.
- ``diffusers_old`` (read only): ``<path>.lora.down.weight``, ``lora_linear_layer``, attention processors'
  ``to_q_lora.down.weight``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .canonical import COMPONENTS, FAMILIES, LoRA, ModuleLoRA, delta_shape
from .errors import (
    CorruptFileError,
    FamilyMismatchError,
    LoRAFileError,
    NonFiniteError,
    PickleRefusedError,
    ShapeMismatchError,
    UnknownFormatError,
)
from .naming import KOHYA_PREFIXES, is_sgm_name, kohya_to_path, path_to_kohya

FORMATS = ("kohya", "diffusers", "diffusers_old")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"

_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 * 1024 * 1024

_LYCORIS_SUFFIXES = {
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"), "lokr_t2": ("lokr", "t2"),
}
_SUFFIXES = {
    "kohya": {"lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"),
              "lora_mid.weight": ("lora", "mid"), "alpha": (None, "alpha"), "dora_scale": (None, "dora_scale"),
              **_LYCORIS_SUFFIXES},
    "diffusers": {"lora_A.weight": ("lora", "down"), "lora_B.weight": ("lora", "up"),
                  "lora_magnitude_vector": (None, "dora_scale"), "lora_magnitude_vector.weight": (None, "dora_scale"),
                  "alpha": (None, "alpha"), **_LYCORIS_SUFFIXES},
    "diffusers_old": {"lora.down.weight": ("lora", "down"), "lora.up.weight": ("lora", "up"),
                      "lora_linear_layer.down.weight": ("lora", "down"),
                      "lora_linear_layer.up.weight": ("lora", "up"), "alpha": (None, "alpha")},
}
_KOHYA_FACTOR_KEYS = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"}
_LOHA_KEYS = {v[1]: k for k, v in _LYCORIS_SUFFIXES.items() if v[0] == "loha"}
_LOKR_KEYS = {v[1]: k for k, v in _LYCORIS_SUFFIXES.items() if v[0] == "lokr"}
_OLD_PROCESSOR = re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_OLD_TE_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding")
_UNSUPPORTED = {"oft_blocks": "OFT", "oft_diag": "Diag-OFT", "diff": "full fine-tune (diff)", "w_norm": "norm",
                "on_input": "IA3", "a1.weight": "GLoRA", "lora_A.bias": "LoRA bias", "lora_B.bias": "LoRA bias"}

_CROSS_ATTN_FAMILY = {768: "sd15", 2048: "sdxl", 128: "tinyworld"}
_TEXT_WIDTH_FAMILY = {768: "sd15", 128: "tinyworld"}
_KNOWN_WIDTHS = {1024: "SD2.x", 4096: "a T5-conditioned model"}


# --------------------------------------------------------------------------------------------------------------
# safetensors header


@dataclass
class Header:
    """A safetensors header: metadata and, per tensor, its dtype and shape; no tensor data is read."""

    metadata: dict[str, str]
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    size: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: shape for k, (_, shape) in self.tensors.items()}


REEXPORT_FIX = "re-download the file or export it again"


def is_pickle(path: str | Path) -> bool:
    """Whether the file is a pickled torch checkpoint: by its zip/pickle magic bytes, else by its suffix."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) == 9 and head[8:9] == b"{":
        return False  # a safetensors header, whatever the suffix
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return True
    return path.suffix.lower() in PICKLE_SUFFIXES


def _header_length(path: Path, head: bytes, size: int) -> int:
    if len(head) < 8:
        raise CorruptFileError(path, f"file is {size} bytes, too short for a safetensors header", REEXPORT_FIX)
    n = int.from_bytes(head[:8], "little")
    if n > min(size - 8, _MAX_HEADER):
        raise CorruptFileError(
            path, f"truncated or not a safetensors file: header claims {n} bytes, {size - 8} follow", REEXPORT_FIX,
        )
    return n


def _parse_header(path: Path, raw: bytes, size: int) -> tuple[Header, dict[str, tuple[int, int]]]:
    """The checked header and each tensor's byte span in the data section."""
    header, spans, _ = _parse_header_layout(path, raw, size)
    return header, spans


def _parse_header_layout(path: Path, raw: bytes, size: int):
    """`_parse_header` plus the layout: ((key, dtype, shape, begin, end), ...) in header order, hashable (files
    with the same layout share the work that depends on it alone, see `_Layout`)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptFileError(path, "safetensors header is not valid JSON (corrupt file)", REEXPORT_FIX) from None
    data_size = size - 8 - len(raw)
    split = _split_metadata(text)
    known = _CHECKED_TENSORS.get((split[1], data_size)) if split is not None else None
    if known is not None:   # the tensor entries of an earlier file, character for character: checked already
        metadata = split[0] or {}
        _check_metadata(path, metadata)
        tensors, spans, layout = known
        return Header(metadata=dict(metadata), tensors=dict(tensors), size=size), dict(spans), layout
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise CorruptFileError(path, "safetensors header is not valid JSON (corrupt file)", REEXPORT_FIX) from None
    if not isinstance(header, dict):
        raise CorruptFileError(path, "safetensors header is not a JSON object (corrupt file)", REEXPORT_FIX)
    metadata = header.pop("__metadata__", None) or {}
    _check_metadata(path, metadata)
    tensors, spans, layout = {}, {}, []
    sizes = _DTYPE_SIZES
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            n = sizes.get(dtype)
            ok = (n is not None and type(shape) is list and type(begin) is int and type(end) is int
                  and 0 <= begin <= end)
            if ok:
                for d in shape:   # every dimension an int >= 0 (not a bool or a float), the byte count on the way
                    if type(d) is not int or d < 0:
                        ok = False
                        break
                    n *= d
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CorruptFileError(path, f"bad header entry for tensor {key!r} (corrupt file)", REEXPORT_FIX)
        if end - begin != n:
            raise CorruptFileError(path, f"tensor {key!r}: shape {shape} does not match its byte span", REEXPORT_FIX)
        if end > data_size:
            raise CorruptFileError(
                path, f"truncated: tensor {key!r} ends at byte {end} but only {data_size} data bytes exist",
                REEXPORT_FIX,
            )
        shape = tuple(shape)
        tensors[key] = (dtype, shape)
        spans[key] = (begin, end)
        layout.append((key, dtype, shape, begin, end))
    layout = tuple(layout)
    if not _spans_disjoint(tuple(spans.values())):
        raise CorruptFileError(path, "tensors overlap in the data section (corrupt file)", REEXPORT_FIX)
    if split is not None:
        _remember_tensors(split[1], data_size, tensors, spans, layout)
    return Header(metadata=dict(metadata), tensors=dict(tensors), size=size), dict(spans), layout


def _check_metadata(path: Path, metadata) -> None:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFileError(path, "safetensors metadata must map strings to strings (corrupt file)", REEXPORT_FIX)


# Headers that start with their metadata (as safetensors writes them) are remembered by the text that follows the
# metadata: a library's files mostly repeat it exactly (same tensor names, dtypes, shapes, offsets), and then only
# the metadata needs parsing. {(text after the metadata, data section size): (tensors, spans, layout)}, checked.
_METADATA_FIRST = '{"__metadata__":'
_JSON_DECODER = json.JSONDecoder()
_CHECKED_TENSORS: dict[tuple[str, int], tuple] = {}
_CHECKED_MAX = 16
_JSON_SPACE = " \t\n\r"


def _split_metadata(text: str) -> tuple[object, str] | None:
    """(the metadata value, the text after it) of a header that starts with ``{"__metadata__":``, else None."""
    if not text.startswith(_METADATA_FIRST):
        return None
    try:
        value, end = _JSON_DECODER.raw_decode(text, len(_METADATA_FIRST))
    except (json.JSONDecodeError, RecursionError):
        return None
    return value, text[end:]


def _remember_tensors(rest: str, data_size: int, tensors: dict, spans: dict, layout: tuple) -> None:
    """Remember a checked header's tensor entries by the text after its metadata, when that text holds exactly
    those entries (no second ``__metadata__``): any header made of a metadata value and this text then parses to
    that metadata and these entries."""
    tail = rest.lstrip(_JSON_SPACE)
    try:
        if tail.startswith(","):
            entries = json.loads("{" + tail[1:])
        elif tail.startswith("}") and not tail[1:].strip(_JSON_SPACE):
            entries = {}
        else:
            return
    except (json.JSONDecodeError, RecursionError):
        return
    if not isinstance(entries, dict) or "__metadata__" in entries or list(entries) != list(tensors):
        return
    if len(_CHECKED_TENSORS) >= _CHECKED_MAX:
        del _CHECKED_TENSORS[next(iter(_CHECKED_TENSORS))]
    _CHECKED_TENSORS[(rest, data_size)] = (dict(tensors), dict(spans), layout)


@functools.lru_cache(maxsize=64)   # pure: a library's files mostly share their spans
def _spans_disjoint(spans: tuple[tuple[int, int], ...]) -> bool:
    ordered = sorted(spans)
    return not any(b < e_prev for (_, e_prev), (b, _) in zip(ordered, ordered[1:]))


def read_header(path: str | Path) -> Header:
    """Parse and check the header of a safetensors file without reading tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = _header_length(path, f.read(8), size)
            raw = f.read(n)
    except OSError as e:
        raise LoRAFileError(path, f"cannot read the file ({e.strerror or e})", "check the path and its permissions")
    return _parse_header(path, raw, size)[0]


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# a float is NaN or infinite exactly when all its exponent bits are set: (unsigned view, exponent mask) per dtype
_EXPONENT_BITS = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
                  "F64": (np.uint64, 0x7FF0000000000000)}


@dataclass
class _Container:
    """A safetensors file read into memory with its checked header (see `_read_container`)."""

    data: bytearray
    start: int                       # first byte of the data section
    header: Header
    spans: dict[str, tuple[int, int]]
    layout: tuple                    # ((key, dtype, shape, begin, end), ...)

    @property
    def torch_only(self) -> bool:
        return all(dtype in _TORCH_DTYPES for dtype, _ in self.header.tensors.values())

    def view(self, key: str) -> torch.Tensor:
        """One float tensor as a view of the file's bytes (no copy)."""
        dtype, shape = self.header.tensors[key]
        begin, end = self.spans[key]
        dt = _TORCH_DTYPES[dtype]
        if end == begin:
            return torch.zeros(shape, dtype=dt)
        return torch.frombuffer(self.data, dtype=dt, count=(end - begin) // dt.itemsize,
                                offset=self.start + begin).reshape(shape)

    def views(self) -> dict[str, torch.Tensor]:
        return {key: self.view(key) for key in self.header.tensors}


def _read_container(path: Path) -> _Container:
    """Read a safetensors file in one go and check its header (the errors of `read_safetensors`)."""
    try:
        size = path.stat().st_size
        data = bytearray(size)
        with open(path, "rb") as f:
            got = f.readinto(data)
    except OSError as e:
        raise LoRAFileError(path, f"cannot read the file ({e.strerror or e})", "check the path and its permissions")
    if got != size:
        raise CorruptFileError(path, f"the file changed while it was read ({got} of {size} bytes)", REEXPORT_FIX)
    n = _header_length(path, bytes(data[:8]), size)
    header, spans, layout = _parse_header_layout(path, bytes(data[8:8 + n]), size)
    return _Container(data, 8 + n, header, spans, layout)


def _load_other_dtypes(path: Path, c: _Container) -> dict[str, torch.Tensor]:
    """All tensors of a file that has some dtype torch views do not cover (safetensors' `load` copies them)."""
    from safetensors.torch import load

    try:
        return load(bytes(c.data))
    except Exception as e:  # safetensors raises its own error type for bad data
        raise CorruptFileError(path, f"cannot load the tensors ({e})", REEXPORT_FIX) from None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file from one read: the header checked as `read_header` does, each
    float tensor a view of the file's bytes (no per-tensor copies; safetensors' `load` reads other dtypes).
    Measured in `bench/retrieval.py`'s catalog scan."""
    c = _read_container(path)
    if not c.torch_only:
        return _load_other_dtypes(path, c), c.header.metadata
    return c.views(), c.header.metadata


# --------------------------------------------------------------------------------------------------------------
# key naming


def detect_format(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """``kohya``, ``diffusers``, ``diffusers_old`` or ``unknown``, from the tensor names (and metadata)."""
    fmt = _format_of_keys(tuple(keys))
    if fmt == "unknown" and ADAPTER_METADATA_KEY in (metadata or {}):
        return "diffusers"
    return fmt


_KOHYA_STARTS = tuple(p for p, _ in KOHYA_PREFIXES)
_PEFT_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", *(f".{s}" for s in _LYCORIS_SUFFIXES))


@functools.lru_cache(maxsize=64)   # pure: the files of a library mostly share one key set
def _format_of_keys(keys: tuple[str, ...]) -> str:
    if any(k.startswith(_KOHYA_STARTS) for k in keys):
        return "kohya"
    if any(_OLD_PROCESSOR.fullmatch(k) or ".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers_old"
    if any(marker in k for k in keys for marker in _PEFT_MARKERS):
        return "diffusers"
    return "unknown"


def _component_path(path: str) -> str | None:
    """Prefix a diffusers-style path with its component ("unet." etc.) when the file left it out."""
    path = path.removeprefix("base_model.model.")
    head = path.split(".", 1)[0]
    if head in COMPONENTS:
        return path if "." in path else None
    if head in _UNET_ROOTS:
        return f"unet.{path}"
    if head == "text_model":
        return f"text_encoder.{path}"
    return None


@functools.lru_cache(maxsize=1 << 16)   # pure: the same tensor names recur in every file of a library
def _parse_key(key: str, fmt: str) -> tuple[str, str | None, str] | None:
    """(module path, kind hint, factor) of a tensor name, or None when it is not an adapter tensor we know."""
    if fmt == "kohya":
        name, _, suffix = key.partition(".")
        hit = _SUFFIXES["kohya"].get(suffix)
        path = kohya_to_path(name) if hit else None
        return (path, *hit) if path else None
    if fmt == "diffusers_old" and (m := _OLD_PROCESSOR.fullmatch(key)):
        path = _component_path(m[1])
        if path is None:
            return None
        if path.startswith("unet."):
            target = "to_out.0" if m[2] == "to_out" else m[2]
        else:
            target = _OLD_TE_NAMES[m[2]]
        return f"{path}.{target}", "lora", m[3]
    for suffix, hit in _SUFFIXES.get(fmt, {}).items():
        if key.endswith("." + suffix):
            path = _component_path(key[: -len(suffix) - 1])
            return (path, *hit) if path else None
    return None


@dataclass
class KeyGroup:
    """Tensor names of one module, by factor, and the adapter family their suffixes name (None: not yet known)."""

    kind: str | None
    keys: dict[str, str]

    def module_kind(self, shapes: Mapping[str, Sequence[int]]) -> str:
        """``lora``, ``locon`` (a conv ``down``), ``loha`` or ``lokr``."""
        kind = self.kind or "lora"
        if kind == "lora" and len(shapes.get(self.keys.get("down", ""), ())) > 2:
            return "locon"
        return kind

    def factor_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        return {f: tuple(shapes[k]) for f, k in self.keys.items() if f not in ("alpha", "dora_scale")}


def group_keys(keys: Iterable[str], fmt: str) -> tuple[dict[str, KeyGroup], list[str]]:
    """Group tensor names by module: ({path: KeyGroup}, [names that belong to no supported adapter])."""
    groups: dict[str, KeyGroup] = {}
    unknown = []
    for key in keys:
        parsed = _parse_key(key, fmt)
        if parsed is None:
            unknown.append(key)
            continue
        path, hint, factor = parsed
        group = groups.setdefault(path, KeyGroup(None, {}))
        if factor in group.keys or (hint and group.kind and hint != group.kind):
            unknown.append(key)  # a duplicate factor or a second adapter kind on one module
            continue
        group.kind = group.kind or hint
        group.keys[factor] = key
    return groups, unknown


@functools.lru_cache(maxsize=64)
def grouped_keys(keys: tuple[str, ...], fmt: str) -> tuple[dict[str, KeyGroup], list[str]]:
    """`group_keys` memoised per key set (the files of a library mostly share one); the result is shared: read
    it, never change it."""
    return group_keys(keys, fmt)


def no_lora_error(path: Path) -> UnknownFormatError:
    return UnknownFormatError(
        path, "no LoRA tensors found (neither kohya, LyCORIS nor diffusers/PEFT names)",
        "check that this is a LoRA file and not a full checkpoint, embedding or other adapter",
    )


def unsupported_reason(keys: Sequence[str]) -> str:
    for key in keys:
        for suffix, algo in _UNSUPPORTED.items():
            if key.endswith("." + suffix):
                return f"uses {algo} adapters ({key}), which LoRA Studio does not support"
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"has tensors that belong to no supported LoRA module: {shown}"


def delta_shapes(groups: Mapping[str, KeyGroup], shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """ΔW shape per module, for modules whose factor shapes fit together (others are left out)."""
    out = {}
    for path, group in groups.items():
        try:
            out[path] = delta_shape(group.module_kind(shapes), group.factor_shapes(shapes))
        except ValueError:
            pass
    return out


# --------------------------------------------------------------------------------------------------------------
# base family


def _metadata_family(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl", f"metadata says {version or arch}"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd15", f"metadata says {version or arch}"
    if arch.startswith("tinyworld"):
        return "tinyworld", f"metadata says {arch}"
    if version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2") or metadata.get("ss_v2") == "True":
        return "unknown", f"metadata says SD2.x ({version or arch or 'ss_v2'})"
    return None


def family_evidence(
    shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None
) -> tuple[str, str, list[str]]:
    """(family, the evidence for it, warnings) from tensor names and shapes, then metadata."""
    metadata = metadata or {}
    fmt = detect_format(shapes, metadata)
    return _family_verdict(_tensor_family(tuple((k, tuple(v)) for k, v in shapes.items()), fmt), metadata)


@functools.lru_cache(maxsize=64)   # pure: the files of a library mostly share their names and shapes
def _tensor_family(items: tuple[tuple[str, tuple[int, ...]], ...], fmt: str) -> tuple[str, str] | None:
    """(family, evidence) that the tensor names and shapes decide, or None."""
    shapes = dict(items)
    keys = list(shapes)
    groups, _ = grouped_keys(tuple(keys), fmt)
    dims = delta_shapes(groups, shapes)
    found: tuple[str, str] | None = None

    cross = sorted({s[1] for p, s in dims.items() if p.startswith("unet.") and re.search(r"attn2\.to_[kv]$", p)})
    if cross:
        width = cross[0]
        family = _CROSS_ATTN_FAMILY.get(width, "unknown")
        note = f" ({_KNOWN_WIDTHS[width]})" if width in _KNOWN_WIDTHS else ""
        found = family, f"cross-attention input width {width}{note}"
    elif any(p.startswith("text_encoder_2.") for p in groups) or any(k.startswith("lora_te1_") for k in keys):
        found = "sdxl", "two text encoders"
    elif any(is_sgm_name(k.partition(".")[0]) for k in keys):
        found = "sdxl", "SGM UNet names (kohya SDXL)"
    else:
        te = sorted({s[1] for p, s in dims.items() if re.fullmatch(r"text_encoder\..*self_attn\.[qkv]_proj", p)})
        unet = {p: s for p, s in dims.items() if p.startswith("unet.")}
        if te:
            width = te[0]
            note = f" ({_KNOWN_WIDTHS[width]})" if width in _KNOWN_WIDTHS else ""
            found = _TEXT_WIDTH_FAMILY.get(width, "unknown"), f"text-encoder width {width}{note}"
        elif any(re.search(r"transformer_blocks\.[1-9]", p) for p in unet):
            found = "sdxl", "several transformer blocks per attention (SDXL layout)"
        elif widths := {s[1] for p, s in unet.items() if re.match(r"unet\.down_blocks\.0\.attentions\..*\.to_q$", p)}:
            width = min(widths)
            found = {320: "sd15", 32: "tinyworld"}.get(width, "unknown"), f"first attention width {width}"
    return found


def _family_verdict(found: tuple[str, str] | None, metadata: Mapping[str, str]) -> tuple[str, str, list[str]]:
    meta = _metadata_family(metadata)
    warnings = []
    if found is None:
        return (*meta, []) if meta else ("unknown", "no decisive module or metadata", [])
    if meta and meta[0] != found[0]:
        warnings.append(f"tensors say {found[0]} ({found[1]}) but {meta[1]}; trusting the tensors")
    return found[0], found[1], warnings


def detect_family(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None) -> str:
    """``sd15``, ``sdxl``, ``tinyworld`` or ``unknown`` from tensor names -> shapes and metadata.

    Decisive: the input width of cross-attention k/v (768 sd15, 2048 sdxl, 128 tinyworld), a second text
    encoder or SGM UNet names (sdxl), the text-encoder width; then ``ss_base_model_version`` and
    ``modelspec.architecture``.
    """
    return family_evidence(shapes, metadata)[0]


# --------------------------------------------------------------------------------------------------------------
# reading


def load_tensors(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if is_pickle(path):
        if not allow_pickle:
            raise PickleRefusedError(
                path,
                "pickled checkpoint: loading it could run arbitrary code",
                "convert it to .safetensors, or pass allow_pickle=True if you trust where it came from",
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many unrelated types for corrupt input
            raise CorruptFileError(path, f"cannot unpickle the checkpoint ({type(e).__name__})", REEXPORT_FIX) from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UnknownFormatError(path, "the checkpoint is not a flat dict of tensors", "save a LoRA state dict")
        return {str(k): v for k, v in obj.items()}, {}
    return read_safetensors(path)


def adapter_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, dict]:
    """PEFT LoraConfig kwargs per component from diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise CorruptFileError(path, f"metadata {ADAPTER_METADATA_KEY} is not valid JSON", REEXPORT_FIX) from None
    if not isinstance(flat, dict):
        raise CorruptFileError(path, f"metadata {ADAPTER_METADATA_KEY} is not a JSON object", REEXPORT_FIX)
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _pattern_value(patterns: Mapping[str, float], module: str) -> float | None:
    """A rank/alpha pattern's value for a module: PEFT matches the pattern against a dotted suffix of the name.

    Patterns are compared literally (diffusers writes plain module names): a regex from an untrusted file
    could take forever to match.
    """
    for pattern, value in patterns.items():
        if module == pattern or module.endswith(f".{pattern}"):
            return value
    return None


def peft_alpha(config: Mapping, module: str, rank: int) -> float | None:
    patterns = config.get("alpha_pattern")
    alpha = _pattern_value(patterns, module) if isinstance(patterns, dict) else None
    alpha = config.get("lora_alpha") if alpha is None else alpha
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    return float(alpha) * math.sqrt(rank) if config.get("use_rslora") else float(alpha)


def _build_module(path: Path, name: str, group: KeyGroup, tensors: Mapping[str, torch.Tensor], fmt: str,
                  config: Mapping) -> ModuleLoRA:
    factors = {f: tensors[k] for f, k in group.keys.items() if f not in ("alpha", "dora_scale")}
    if not factors:
        raise CorruptFileError(path, f"module {name} has an alpha or DoRA scale but no LoRA factors", REEXPORT_FIX)
    kind = group.module_kind({k: tensors[k].shape for k in group.keys.values()})
    alpha = None
    if "alpha" in group.keys:
        t = tensors[group.keys["alpha"]]
        if t.numel() != 1 or t.dtype.is_complex or t.dtype == torch.bool:
            raise CorruptFileError(path, f"module {name}: alpha must be a single number", REEXPORT_FIX)
        alpha = float(t.reshape(()).item())
    dora = tensors.get(group.keys.get("dora_scale", ""))
    try:
        if fmt != "kohya" and "alpha" not in group.keys and kind in ("lora", "locon"):
            rank = factors["down"].shape[0] if "down" in factors else 1
            alpha = peft_alpha(config, name.split(".", 1)[1], rank)
        if dora is not None and fmt != "kohya":
            out = factors["up"].shape[0] if "up" in factors else dora.numel()
            ndim = factors["down"].dim() if "down" in factors else 2
            if dora.numel() != out:
                raise ValueError(f"DoRA magnitude {tuple(dora.shape)} does not match {out} outputs")
            dora = dora.reshape(out, *[1] * (ndim - 1))  # PEFT: (out,) or (1, out, 1, 1) -> (out, 1, ...)
        module = ModuleLoRA(kind, factors, alpha, dora)
    except ValueError as e:
        raise CorruptFileError(path, f"module {name}: {e}", REEXPORT_FIX) from None
    if alpha is not None and not math.isfinite(alpha):
        raise NonFiniteError(path, f"module {name}: alpha is {alpha}", REEXPORT_FIX)
    return module


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    floats = [t.reshape(-1) for t in tensors.values() if t.is_floating_point()]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in floats:
        by_dtype.setdefault(t.dtype, []).append(t)
    if all(bool(torch.isfinite(torch.cat(ts)).all()) for ts in by_dtype.values()):   # one check per dtype
        return
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t.float()).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(path, f"NaN or Inf values in {shown}", "the training diverged; use an earlier checkpoint")


def _check_base(path: Path, lora: LoRA, family: str | None, base_shapes: Mapping[str, Sequence[int]] | None,
                evidence: str) -> None:
    if family and lora.family not in ("unknown", family):
        raise FamilyMismatchError(
            path,
            f"this LoRA is for {lora.family} ({evidence}) but the base model is {family}",
            f"pick a {family} LoRA, or switch the base model to {lora.family}",
        )
    if base_shapes is None:
        return
    problems = []
    for name, module in lora.modules.items():
        want = base_shapes.get(name)
        got = module.shape
        if want is None:
            problems.append(f"{name} (not in the base model)")
        elif math.prod(want) != math.prod(got) or want[0] != got[0] or (len(want) == len(got) and tuple(want) != got):
            problems.append(f"{name} (ΔW {got}, base weight {tuple(want)})")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ShapeMismatchError(
            path, f"{len(problems)} module(s) do not fit the base model: {shown}",
            "use a LoRA trained for this base model (check its family and version)",
        )


def read_lora(
    path: str | Path,
    *,
    family: str | None = None,
    base_shapes: Mapping[str, Sequence[int]] | None = None,
    allow_pickle: bool = False,
) -> LoRA:
    """Read any supported LoRA file into a canonical `LoRA`; every problem raises a `LoRAFileError`.

    `family` and `base_shapes` (see `module_shapes`) check the file against the base model it will be used with.
    Pickled checkpoints are refused unless `allow_pickle`, then loaded with ``torch.load(weights_only=True)``.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = Path(path)
    if is_pickle(path):
        tensors, metadata = load_tensors(path, allow_pickle)
        return _lora_from_tensors(path, tensors, metadata, family, base_shapes)
    c = _read_container(path)
    if not c.torch_only:
        return _lora_from_tensors(path, _load_other_dtypes(path, c), c.header.metadata, family, base_shapes)
    return _lora_from_container(path, c, family, base_shapes)


def _lora_from_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], family: str | None,
                       base_shapes: Mapping[str, Sequence[int]] | None) -> LoRA:
    """`read_lora` of loaded tensors (pickles, files with dtypes other than floats)."""
    fmt = detect_format(tensors, metadata)
    if fmt == "unknown":
        raise no_lora_error(path)
    groups, unknown = grouped_keys(tuple(tensors), fmt)
    if unknown:
        raise UnknownFormatError(path, unsupported_reason(unknown), "convert it to a plain LoRA, LoCon, LoHa or LoKr")
    if not groups:
        raise UnknownFormatError(path, "the file holds no LoRA modules", "check that this is the file you meant")
    _check_finite(path, tensors)
    configs = adapter_configs(path, metadata) if fmt == "diffusers" else {}
    modules = {
        name: _build_module(path, name, group, tensors, fmt, configs.get(name.split(".", 1)[0], {}))
        for name, group in sorted(groups.items())
    }
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    detected, evidence, _ = family_evidence(shapes, metadata)
    return _finish(path, modules, detected, evidence, metadata, fmt, family, base_shapes)


def _finish(path: Path, modules: dict[str, ModuleLoRA], detected: str, evidence: str, metadata: Mapping[str, str],
            fmt: str, family: str | None, base_shapes: Mapping[str, Sequence[int]] | None) -> LoRA:
    kept = {k: v for k, v in metadata.items() if k != ADAPTER_METADATA_KEY and (k, v) != ("format", "pt")}
    lora = LoRA(modules=modules, family=detected, metadata=kept, source_format=fmt)
    _check_base(path, lora, family, base_shapes, evidence)
    return lora


# -- the same, faster, for safetensors files of float tensors: what depends on the layout alone (names, dtypes,
# shapes and byte spans of the tensors) is worked out once per layout, and a library's files mostly share one.

@dataclass
class _ModuleSpec:
    name: str
    kind: str
    factors: tuple[tuple[str, str], ...]    # (factor, tensor name)
    alpha: int | None                       # the module's slot in `_Layout.alpha_keys`
    peft: tuple[str, str, int] | None       # (component, module path, rank) when alpha comes from the adapter config
    dora: str | None                        # tensor name of a DoRA magnitude
    dora_shape: tuple[int, ...] | None      # ... and its shape in the canonical module (non-kohya files)


class _Layout:
    """What `read_lora` derives from a file's layout and format alone."""

    def __init__(self, layout: tuple, fmt: str):
        self.fmt = fmt
        self.shapes = tuple((key, shape) for key, _, shape, _, _ in layout)
        runs: dict[str, list[list[int]]] = {}   # float bytes per dtype, adjacent spans merged
        for _, dtype, _, begin, end in sorted(layout, key=lambda t: t[3]):
            if end > begin:
                r = runs.setdefault(dtype, [])
                if r and r[-1][1] == begin:
                    r[-1][1] = end
                else:
                    r.append([begin, end])
        self.runs = [(dtype, begin, end) for dtype, rs in runs.items() for begin, end in rs]
        self.spans = {key: (dtype, begin) for key, dtype, _, begin, _ in layout}
        self.tensors = {key: (_TORCH_DTYPES[dtype], (end - begin) // _DTYPE_SIZES[dtype], begin, shape)
                        for key, dtype, shape, begin, end in layout}
        self.modules: list[_ModuleSpec] | None = None   # set once a file of this layout has been read in full
        self.alpha_keys: list[str] = []
        self.view_plan: list[tuple] = []   # the modules' tensors per run of bytes (see `learn` and `module_views`)
        self.empty: list[tuple[str, torch.dtype, tuple]] = []   # ... and those with no bytes
        self._family: tuple | None = None

    @property
    def family(self) -> tuple[str, str] | None:
        if self._family is None:
            self._family = (_tensor_family(self.shapes, self.fmt),)
        return self._family[0]

    def finite(self, c: _Container) -> bool:
        """Whether every tensor value is finite: one vectorised check of the exponent bits per run of bytes."""
        for dtype, begin, end in self.runs:
            uint, mask = _EXPONENT_BITS[dtype]
            size = np.dtype(uint).itemsize
            bits = np.frombuffer(c.data, dtype=uint, count=(end - begin) // size, offset=c.start + begin)
            if ((bits & uint(mask)) == uint(mask)).any():
                return False
        return True

    def learn(self, groups: Mapping[str, KeyGroup], shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Record the module recipe, after `_build_module` accepted every module of a file with this layout."""
        specs, alpha_keys = [], []
        for name, group in sorted(groups.items()):
            factors = tuple((f, k) for f, k in group.keys.items() if f not in ("alpha", "dora_scale"))
            kind = group.module_kind(shapes)
            alpha = peft = dora_shape = None
            if "alpha" in group.keys:
                alpha = len(alpha_keys)
                alpha_keys.append(group.keys["alpha"])
            elif self.fmt != "kohya" and kind in ("lora", "locon"):
                component, module = name.split(".", 1)
                peft = component, module, shapes[group.keys["down"]][0] if "down" in group.keys else 1
            dora = group.keys.get("dora_scale")
            if dora is not None and self.fmt != "kohya":
                out = shapes[group.keys["up"]][0] if "up" in group.keys else math.prod(shapes[dora])
                ndim = len(shapes[group.keys["down"]]) if "down" in group.keys else 2
                dora_shape = (out, *[1] * (ndim - 1))
            specs.append(_ModuleSpec(name, kind, factors, alpha, peft, dora, dora_shape))
        self.alpha_keys = alpha_keys
        self.modules = specs
        self._plan_views({k for m in specs for _, k in m.factors} | {m.dora for m in specs if m.dora is not None})

    def _plan_views(self, keys: set[str]) -> None:
        """Per run of adjacent same-dtype bytes holding some of `keys`: (dtype, begin, element count, [(key, shape,
        strides, element offset in the run)]), so `module_views` needs one buffer view per run."""
        by_run: dict[int, list] = {}
        for key in keys:
            dt, count, begin, shape = self.tensors[key]
            if not count:
                self.empty.append((key, dt, shape))
                continue
            run = next(i for i, (d, b, e) in enumerate(self.runs) if d == self.spans[key][0] and b <= begin < e)
            strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
            by_run.setdefault(run, []).append((key, shape, strides, (begin - self.runs[run][1]) // dt.itemsize))
        for run, members in sorted(by_run.items()):
            dtype, begin, end = self.runs[run]
            dt = _TORCH_DTYPES[dtype]
            self.view_plan.append((dt, begin, (end - begin) // dt.itemsize, members))

    def module_views(self, c: _Container) -> dict[str, torch.Tensor]:
        """The modules' tensors (factors, DoRA magnitudes) as views of the file's bytes: per run of bytes one buffer
        view, the tensors strided views of it (`view` per tensor costs about twice as much)."""
        out = {key: torch.zeros(shape, dtype=dt) for key, dt, shape in self.empty}
        for dt, begin, count, members in self.view_plan:
            strided = torch.frombuffer(c.data, dtype=dt, count=count, offset=c.start + begin).as_strided
            for key, shape, strides, offset in members:
                out[key] = strided(shape, strides, offset)
        return out

    def alphas(self, c: _Container) -> list[float]:
        """The alpha scalars of a file, read straight from its bytes (as ``float(tensor.item())`` gives them)."""
        if not self.alpha_keys:
            return []
        by_dtype: dict[str, list[int]] = {}
        for k in self.alpha_keys:
            by_dtype.setdefault(self.spans[k][0], []).append(k)
        raw = np.frombuffer(c.data, dtype=np.uint8)
        values: dict[str, float] = {}
        for dtype, keys in by_dtype.items():
            size = _DTYPE_SIZES[dtype]
            begins = np.array([self.spans[k][1] for k in keys], dtype=np.int64) + c.start
            grabbed = np.ascontiguousarray(raw[begins[:, None] + np.arange(size)])
            if dtype == "BF16":
                floats = (grabbed.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                floats = grabbed.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])
            values.update(zip(keys, floats.reshape(-1).tolist()))
        return [values[k] for k in self.alpha_keys]


@functools.lru_cache(maxsize=64)
def _layout_plan(layout: tuple, fmt: str) -> _Layout:
    return _Layout(layout, fmt)


_MODULE_FIELDS_KNOWN = [f.name for f in dataclasses.fields(ModuleLoRA)] == ["kind", "factors", "alpha", "dora_scale"]


def _checked_module(kind: str, factors: dict[str, torch.Tensor], alpha: float | None,
                    dora: torch.Tensor | None) -> ModuleLoRA:
    """A `ModuleLoRA` whose checks (factor dtypes and shapes, DoRA shape: all fixed by the layout) already passed
    for another file of the same layout, so they are not run again."""
    if not _MODULE_FIELDS_KNOWN:   # ModuleLoRA changed its fields: construct it the ordinary way
        return ModuleLoRA(kind, factors, alpha, dora)
    module = object.__new__(ModuleLoRA)
    module.kind, module.factors, module.alpha, module.dora_scale = kind, factors, alpha, dora
    return module


def _lora_from_container(path: Path, c: _Container, family: str | None,
                         base_shapes: Mapping[str, Sequence[int]] | None) -> LoRA:
    """`_lora_from_tensors` for a safetensors file of float tensors, with the same checks and errors."""
    metadata = c.header.metadata
    keys = tuple(c.header.tensors)
    fmt = detect_format(keys, metadata)
    if fmt == "unknown":
        raise no_lora_error(path)
    groups, unknown = grouped_keys(keys, fmt)
    if unknown:
        raise UnknownFormatError(path, unsupported_reason(unknown), "convert it to a plain LoRA, LoCon, LoHa or LoKr")
    if not groups:
        raise UnknownFormatError(path, "the file holds no LoRA modules", "check that this is the file you meant")
    plan = _layout_plan(c.layout, fmt)
    if not plan.finite(c):
        _check_finite(path, c.views())   # names the tensors
    configs = adapter_configs(path, metadata) if fmt == "diffusers" else {}
    if plan.modules is None:   # the first file of this layout: every module built and checked in full
        tensors = c.views()
        modules = {
            name: _build_module(path, name, group, tensors, fmt, configs.get(name.split(".", 1)[0], {}))
            for name, group in sorted(groups.items())
        }
        plan.learn(groups, dict(plan.shapes))
    else:
        alphas = plan.alphas(c)
        views = plan.module_views(c)
        modules = {}
        for m in plan.modules:
            alpha = alphas[m.alpha] if m.alpha is not None else None
            if m.peft is not None:
                alpha = peft_alpha(configs.get(m.peft[0], {}), m.peft[1], m.peft[2])
            dora = None
            if m.dora is not None:
                dora = views[m.dora]
                if m.dora_shape is not None:
                    dora = dora.reshape(m.dora_shape)
            modules[m.name] = _checked_module(m.kind, {f: views[k] for f, k in m.factors}, alpha, dora)
            if alpha is not None and not math.isfinite(alpha):
                raise NonFiniteError(path, f"module {m.name}: alpha is {alpha}", REEXPORT_FIX)
    detected, evidence, _ = _family_verdict(plan.family, metadata)
    return _finish(path, modules, detected, evidence, metadata, fmt, family, base_shapes)


# --------------------------------------------------------------------------------------------------------------
# writing


def _kohya_state_dict(lora: LoRA) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in lora.modules.items():
        try:
            key = path_to_kohya(name, lora.family)
        except ValueError as e:
            raise ValueError(f"cannot write {name} in kohya format: {e}") from None
        table = {"lora": _KOHYA_FACTOR_KEYS, "locon": _KOHYA_FACTOR_KEYS, "loha": _LOHA_KEYS, "lokr": _LOKR_KEYS}
        for factor, tensor in module.factors.items():
            out[f"{key}.{table[module.kind][factor]}"] = tensor
        if module.alpha is not None:
            dtype = next(iter(module.factors.values())).dtype
            out[f"{key}.alpha"] = torch.tensor(module.alpha, dtype=dtype)
        if module.dora_scale is not None:
            out[f"{key}.dora_scale"] = module.dora_scale
    return out


def _diffusers_state_dict(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    out, per_component = {}, {}
    for name, module in lora.modules.items():
        if module.kind not in ("lora", "locon") or "mid" in module.factors:
            kind = "Tucker LoCon" if module.kind == "locon" else module.kind
            raise ValueError(f"{name} is a {kind} module, which diffusers cannot load; write format='kohya'")
        out[f"{name}.lora_A.weight"] = module.factors["down"]
        out[f"{name}.lora_B.weight"] = module.factors["up"]
        if module.dora_scale is not None:
            if not module.dora_on_output:
                raise ValueError(f"{name} has a LyCORIS input-axis DoRA scale, unknown to PEFT; use format='kohya'")
            out_dim = module.shape[0]
            shape = (out_dim,) if len(module.shape) == 2 else (1, out_dim, *[1] * (len(module.shape) - 2))
            out[f"{name}.lora_magnitude_vector.weight"] = module.dora_scale.reshape(shape)
        component, path = name.split(".", 1)
        per_component.setdefault(component, {})[path] = module
    for component, modules in per_component.items():
        if len({m.dora_scale is None for m in modules.values()}) > 1:
            raise ValueError(f"{component} mixes DoRA and plain modules, unlike a PEFT config; write format='kohya'")
    return out, {c: _peft_config(mods) for c, mods in per_component.items()}


def _peft_config(modules: Mapping[str, ModuleLoRA]) -> dict:
    """LoraConfig kwargs reproducing each module's rank and alpha (most common values + patterns).

    Names drop CLIP's ``text_model.`` level: PEFT matches them as suffixes, so they fit transformers 4 and 5.
    """
    modules = {p.removeprefix("text_model."): m for p, m in modules.items()}
    ranks = {p: m.rank for p, m in modules.items()}
    alphas = {p: m.alpha if m.alpha else float(m.rank) for p, m in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(modules),
        "use_dora": any(m.dora_scale is not None for m in modules.values()),
    }


def write_lora(lora: LoRA, path: str | Path, format: str = "kohya") -> Path:
    """Write `lora` as a safetensors file in ``kohya`` (A1111/LyCORIS) or ``diffusers`` (PEFT) format.

    Kohya files of SDXL LoRAs use SGM UNet names and ``lora_te1_``/``lora_te2_``, as sd-scripts writes them.
    Diffusers files carry each module's alpha in ``lora_adapter_metadata``, so ``pipe.load_lora_weights``
    applies the same ΔW; LoHa, LoKr, Tucker LoCon and input-axis DoRA need ``kohya``.
    """
    path = Path(path)
    metadata = dict(lora.metadata)
    if format == "kohya":
        tensors = _kohya_state_dict(lora)
    elif format == "diffusers":
        tensors, configs = _diffusers_state_dict(lora)
        flat = {f"{c}.{k}": v for c, config in configs.items() for k, v in config.items()}
        metadata[ADAPTER_METADATA_KEY] = json.dumps(flat, indent=2, sort_keys=True)
        metadata.setdefault("format", "pt")
    else:
        raise ValueError(f"unknown format {format!r}; use 'kohya' or 'diffusers'")
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
