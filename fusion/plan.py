"""A composition plan: which LoRAs, at which weights and block weights, fused by which method.

A `Plan` is a small value: it goes into the PNG recipe and into batch job files, and the A1111 prompt syntax
(`fusion.syntax`) and the Python API both produce one. `fusion.schedules.build_schedule(plan)` turns it into
the schedule the runtime runs.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

METHODS = ("merge", "blockwise", "switch", "composite", "cmlora", "gated", "klora")


@dataclass(frozen=True)
class LoRARef:
    """One LoRA of a plan.

    - `weight`: the UNet multiplier (A1111 ``unet=``); `te_weight` the text-encoder one (``te=``), None = `weight`.
    - `lbw`: LoRA Block Weight spec: a preset name (``MIDD``), a weight string of 12/17/20/26 numbers, or a
      B-LoRA part (``BLORA_CONTENT``, ``BLORA_STYLE``, ``BLORA``); None = every block at 1.
    - `start` / `stop`: the LoRA acts on 1-indexed steps ``start <= s < stop`` (A1111 LBW); a value in (0, 1) is a
      fraction of the run.
    - `category`: what the LoRA depicts ("character", "style", "object", ...); Switch starts with the character.
    """

    name: str
    weight: float = 1.0
    lbw: str | None = None
    start: int | float | None = None
    stop: int | float | None = None
    category: str | None = None
    te_weight: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a LoRA reference needs a name, got {self.name!r}")
        for key in ("weight", "te_weight"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"LoRA {self.name!r}: {key}={value!r} is not a finite number")
        for key in ("start", "stop"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"LoRA {self.name!r}: {key}={value!r} must be a step number >= 0 or a fraction in (0, 1)")

    @property
    def text_weight(self) -> float:
        return self.weight if self.te_weight is None else self.te_weight

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "name"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoRARef":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LoRA reference field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class Plan:
    """LoRAs + method + the method's parameters (e.g. ``{"tau": 5}`` for switch)."""

    loras: list[LoRARef] = field(default_factory=list)
    method: str = "merge"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown fusion method {self.method!r}; use one of {METHODS}")
        names = [r.name for r in self.loras]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"LoRA(s) {duplicates} appear more than once in the plan")

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.loras]

    def to_dict(self) -> dict[str, Any]:
        return {"loras": [r.to_dict() for r in self.loras], "method": self.method, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        unknown = set(data) - {"loras", "method", "params"}
        if unknown:
            raise ValueError(f"unknown plan field(s) {sorted(unknown)}")
        return cls(loras=[LoRARef.from_dict(r) for r in data.get("loras", [])],
                   method=data.get("method", "merge"), params=dict(data.get("params", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))
