"""Errors raised for LoRA files that cannot be used: each names the file, the reason and the fix."""
from __future__ import annotations

from pathlib import Path


class LoRAFileError(Exception):
    """A LoRA file that cannot be read or does not fit; `str()` names the file, the reason and the fix."""

    def __init__(self, path: str | Path, reason: str, fix: str):
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        super().__init__(f"{self.path}: {reason}\n  fix: {fix}")

    def one_line(self) -> str:
        return f"{Path(self.path).name}: {self.reason} (fix: {self.fix})"


class CorruptFileError(LoRAFileError):
    """Truncated, unparsable or internally inconsistent file."""


class PickleRefusedError(LoRAFileError):
    """A pickled checkpoint (.ckpt/.pt/.bin/.pth) read without allow_pickle=True."""


class NonFiniteError(LoRAFileError):
    """Tensors holding NaN or Inf."""


class ShapeMismatchError(LoRAFileError):
    """Modules or shapes that the base model does not have."""


class FamilyMismatchError(LoRAFileError):
    """A LoRA made for another base-model family (e.g. SDXL LoRA on SD1.5)."""


class UnknownFormatError(LoRAFileError):
    """Keys that match no supported LoRA format or adapter type."""
