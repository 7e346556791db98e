"""LoRA Studio: compose several LoRAs on a diffusion model."""
from __future__ import annotations

__all__ = ["Studio", "StudioInputError"]


def __getattr__(name):  # keep `import studio` light: torch/diffusers load on first use
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
