"""A1111 prompt syntax: ``<lora:name:weight:lbw=PRESET:start=N:stop=N>`` -> a clean prompt and `LoRARef`s.

Accepted forms (``lyco`` is a synonym of ``lora``):

- ``<lora:name>`` (weight 1), ``<lora:name:0.8>``, ``<lora:name:0.8:0.6>`` (A1111: text-encoder weight, then UNet
  weight; one number sets both), ``<lora:name:te=0.5:unet=0.8>``;
- LoRA Block Weight: ``lbw=PRESET`` or ``lbw=1,0,0,...`` (``w=`` also), or, in LBW's older form, the preset or
  weight string as the third item: ``<lora:name:1:MIDD>``; ``start=N``, ``stop=N``, ``step=A-B`` (1-indexed steps;
  a value in (0, 1) is a fraction of the run);
- ``cat=character`` (not A1111: the LoRA's category, which Switch orders by).

Any malformed tag raises `PromptSyntaxError` naming the tag.
"""
from __future__ import annotations

import re

from .blockweights import BLORA_SPECS, PRESETS, BlockWeightError, check_spec, is_weight_string
from .plan import LoRARef, Plan

TAG = re.compile(r"<(lora|lyco):([^>]*)>", re.IGNORECASE)
_UNSUPPORTED = {"dyn": "dynamic-dim", "lbwe": "LBW elemental", "x": "LBW dynamic X"}


class PromptSyntaxError(ValueError):
    """A ``<lora:...>`` tag that cannot be read."""


def _number(tag: str, key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PromptSyntaxError(f"{tag}: {key} {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise PromptSyntaxError(f"{tag}: {key} {text!r} is not a finite number")
    return value


def _step(tag: str, key: str, text: str) -> int | float:
    value = _number(tag, key, text)
    if value < 0:
        raise PromptSyntaxError(f"{tag}: {key}={text} must be >= 0")
    return int(value) if value >= 1 or value == 0 else value


def _is_lbw(text: str) -> bool:
    return text.strip() in PRESETS or text.strip() in BLORA_SPECS or is_weight_string(text)


def parse_tag(tag: str, body: str) -> LoRARef:
    """One tag's body (what follows ``<lora:``) -> `LoRARef`."""
    items = body.split(":")
    name = items[0].strip()
    if not name:
        raise PromptSyntaxError(f"{tag}: the LoRA name is empty")
    named, positional = {}, []
    for item in items[1:]:
        item = item.strip()
        if not item:
            raise PromptSyntaxError(f"{tag}: empty field (two ':' in a row?)")
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip().lower()
            if key in named:
                raise PromptSyntaxError(f"{tag}: {key}= given twice")
            named[key] = value.strip()
        else:
            if named:
                raise PromptSyntaxError(f"{tag}: positional value {item!r} after a key=value field")
            positional.append(item)

    for key, what in _UNSUPPORTED.items():
        if key in named:
            raise PromptSyntaxError(f"{tag}: {key}= ({what}) is not supported")
    if "lbw" in named and "w" in named:
        raise PromptSyntaxError(f"{tag}: give lbw= or w=, not both")
    lbw = named.pop("lbw", None) or named.pop("w", None)
    te_pos = unet_pos = None
    if len(positional) > 3:
        raise PromptSyntaxError(f"{tag}: too many fields; write <lora:name:weight:lbw=...:start=N:stop=N>")
    if positional:
        te_pos = _number(tag, "weight", positional[0])
    if len(positional) >= 2:
        if _is_lbw(positional[1]) and len(positional) == 2:
            lbw = _merge_lbw(tag, lbw, positional[1])
        else:
            unet_pos = _number(tag, "UNet weight", positional[1])
    if len(positional) == 3:
        if not _is_lbw(positional[2]):
            raise PromptSyntaxError(f"{tag}: third field {positional[2]!r} is neither a block-weight preset nor a "
                                    "weight string")
        lbw = _merge_lbw(tag, lbw, positional[2])
    # A1111: te = te= or the first number or 1; unet = unet= or the second number or te
    te = _number(tag, "te", named.pop("te")) if "te" in named else (1.0 if te_pos is None else te_pos)
    unet = _number(tag, "unet", named.pop("unet")) if "unet" in named else (te if unet_pos is None else unet_pos)
    start = _step(tag, "start", named.pop("start")) if "start" in named else None
    stop = _step(tag, "stop", named.pop("stop")) if "stop" in named else None
    if "step" in named:
        text = named.pop("step")
        if "-" not in text or start is not None or stop is not None:
            raise PromptSyntaxError(f"{tag}: step= takes a range A-B and excludes start=/stop=")
        a, _, b = text.partition("-")
        start, stop = _step(tag, "step", a), _step(tag, "step", b)
    category = named.pop("cat", None)
    if named:
        raise PromptSyntaxError(f"{tag}: unknown field(s) {sorted(named)}; known: te, unet, lbw, w, start, stop, "
                                "step, cat")
    if lbw is not None:
        try:
            check_spec(lbw)
        except BlockWeightError as e:
            raise PromptSyntaxError(f"{tag}: {e}") from None
    if (start is not None and stop is not None and start >= 1 and stop >= 1 and stop <= start):
        raise PromptSyntaxError(f"{tag}: stop={stop} must come after start={start}")
    return LoRARef(name=name, weight=unet, te_weight=None if te == unet else te, lbw=lbw,
                   start=start, stop=stop, category=category)


def _merge_lbw(tag: str, current: str | None, value: str) -> str:
    if current is not None:
        raise PromptSyntaxError(f"{tag}: block weights given twice")
    return value.strip()


def parse_prompt(text: str) -> tuple[str, list[LoRARef]]:
    """Split a prompt into its text without the ``<lora:...>`` tags and the LoRA references, in order."""
    refs = []
    for m in TAG.finditer(text):
        refs.append(parse_tag(m.group(0), m.group(2)))
    names = [r.name for r in refs]
    for n in names:
        if names.count(n) > 1:
            raise PromptSyntaxError(f"<lora:{n}:...> appears {names.count(n)} times; give each LoRA once")
    clean = TAG.sub(" ", text)
    clean = re.sub(r"\s+", " ", clean)
    clean = re.sub(r"\s*,(\s*,)+", ",", clean)
    clean = re.sub(r"\s+,", ",", clean).strip(" ,")
    return clean, refs


def plan_from_prompt(text: str, method: str | None = None, **params) -> tuple[str, Plan]:
    """`parse_prompt` + the plan: method ``blockwise`` when a tag has start/stop, else ``merge``, unless given."""
    clean, refs = parse_prompt(text)
    if method is None:
        method = "blockwise" if any(r.start is not None or r.stop is not None for r in refs) else "merge"
    return clean, Plan(loras=refs, method=method, params=params)


def _num(x: float) -> str:
    return f"{x:g}" if float(x) == float(f"{x:g}") else repr(float(x))


def format_tag(ref: LoRARef) -> str:
    """The ``<lora:...>`` tag that `parse_tag` reads back into `ref` (for recipes and the UI)."""
    fields = [ref.name]
    if ref.te_weight is None:
        fields.append(_num(ref.weight))
    else:
        fields += [f"te={_num(ref.te_weight)}", f"unet={_num(ref.weight)}"]
    if ref.lbw is not None:
        fields.append(f"lbw={ref.lbw}")
    if ref.start is not None:
        fields.append(f"start={_num(ref.start)}")
    if ref.stop is not None:
        fields.append(f"stop={_num(ref.stop)}")
    if ref.category is not None:
        fields.append(f"cat={ref.category}")
    return "<lora:" + ":".join(fields) + ">"
