"""The LoRA library: read any LoRA file into one canonical `LoRA`, write it back, inspect it, catalog a folder."""
from .canonical import FAMILIES, KINDS, LoRA, ModuleLoRA, module_shapes, resolve_module
from .catalog import Catalog, Entry, ScanReport
from .errors import (
    CorruptFileError,
    FamilyMismatchError,
    LoRAFileError,
    NonFiniteError,
    PickleRefusedError,
    ShapeMismatchError,
    UnknownFormatError,
)
from .formats import FORMATS, detect_family, detect_format, read_header, read_lora, write_lora
from .inspect import FormatReport, inspect_file

__all__ = [
    "FAMILIES", "FORMATS", "KINDS",
    "LoRA", "ModuleLoRA", "module_shapes", "resolve_module",
    "read_lora", "write_lora", "read_header", "detect_format", "detect_family",
    "FormatReport", "inspect_file",
    "Catalog", "Entry", "ScanReport",
    "LoRAFileError", "CorruptFileError", "FamilyMismatchError", "NonFiniteError", "PickleRefusedError",
    "ShapeMismatchError", "UnknownFormatError",
]
