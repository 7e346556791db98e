"""Load an SD1.5- or SDXL-type pipeline offline, from a diffusers folder or a single `.safetensors` checkpoint.

Single-file checkpoints (A1111 / original LDM / SGM key layout) are converted by diffusers' `from_single_file`,
which reads the component configs and tokenizers from a local folder: `studio/configs/sd15` or
`studio/configs/sdxl` (the real SD1.5 / SDXL-base-1.0 configs), or the `config` folder passed in.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "configs"
SCHEDULERS = ("dpm++", "ddim")

# A key that only this kind of single-file checkpoint has (its text encoder's prefix).
_SINGLE_FILE_PREFIXES = {
    "sdxl": "conditioner.embedders.1.model.",  # SGM layout: CLIP-L + OpenCLIP-bigG
    "sd15": "cond_stage_model.transformer.",  # LDM layout: CLIP-L
}


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The requested device ("cpu", "cuda", "cuda:1", "mps"), else CUDA when available, else CPU."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {requested!r}: use 'cpu', 'cuda' or 'mps'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was requested but MPS is not available")
    return device


def pick_dtype(device: str | torch.device) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def model_kind(model: str | Path) -> str:
    """"sd15" or "sdxl": from model_index.json for a diffusers folder, from the keys for a single file."""
    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(f"model not found: {model} (give a local diffusers folder or .safetensors file)")
    if model.is_dir():
        index_file = model / "model_index.json"
        if not index_file.is_file():
            raise ValueError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
        index = json.loads(index_file.read_text())
        if "unet" not in index or "text_encoder" not in index:
            raise ValueError(f"{model}: {index.get('_class_name')} is not an SD1.5- or SDXL-type pipeline")
        if "text_encoder_2" in index or index.get("_class_name", "").startswith("StableDiffusionXL"):
            return "sdxl"
        return "sd15"
    if model.suffix != ".safetensors":
        raise ValueError(f"{model}: expected a diffusers folder or a .safetensors checkpoint")
    from safetensors import safe_open

    with safe_open(str(model), framework="pt") as f:
        keys = list(f.keys())
    for kind, prefix in _SINGLE_FILE_PREFIXES.items():
        if any(k.startswith(prefix) for k in keys):
            return kind
    raise ValueError(f"{model}: not an SD1.5 or SDXL-base checkpoint (no {' or '.join(_SINGLE_FILE_PREFIXES.values())} keys)")


def load_pipeline(
    model: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    scheduler: str = "dpm++",
    config: str | Path | None = None,
):
    """Load `model` (diffusers folder or single-file `.safetensors`) onto `device` in `dtype`.

    `config` overrides the shipped config folder for single files (e.g. a tiny test model's folder).
    The scheduler is DPM++ 2M ("dpm++") or DDIM ("ddim"); there is never a safety checker.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}: use one of {SCHEDULERS}")
    device = pick_device(device)
    dtype = dtype or pick_dtype(device)
    model = Path(model)
    kind = model_kind(model)
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    kwargs = dict(dtype=dtype, local_files_only=True)
    if kind == "sd15":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        kwargs.update(add_watermarker=False)

    if model.is_dir():
        pipe = cls.from_pretrained(str(model), **kwargs)
    else:
        pipe = cls.from_single_file(str(model), config=str(config or CONFIGS / kind), **kwargs)

    set_scheduler(pipe, scheduler)
    pipe.to(device)
    if device.type == "cuda" and _xformers_available():
        pipe.enable_xformers_memory_efficient_attention()
    return pipe


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for DPM++ 2M ("dpm++") or DDIM ("ddim"), keeping its noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "dpm++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    elif name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    else:
        raise ValueError(f"unknown scheduler {name!r}: use one of {SCHEDULERS}")


def _xformers_available() -> bool:
    """Whether xformers is installed, without importing it."""
    return importlib.util.find_spec("xformers") is not None
