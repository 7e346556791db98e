"""`Studio`: the one Python entry point that the CLI, the UI and batch jobs all call."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

TINYWORLD = Path(__file__).resolve().parents[1] / "assets" / "tinyworld"

MAX_STEPS = 200
MAX_IMAGES = 64
MAX_PROMPT_CHARS = 2000


class StudioInputError(ValueError):
    """A request the studio refuses, with what to do instead."""


@dataclass
class GeneratedImage:
    image: Image.Image
    recipe: "object"  # studio.recipe.Recipe
    path: Optional[Path] = None


def validate_request(prompt: str, n: int, steps: int, cfg: float, tokenizer=None) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise StudioInputError("the prompt is empty: describe the picture, e.g. 'a red star on a black background'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise StudioInputError(f"the prompt has {len(prompt)} characters (limit {MAX_PROMPT_CHARS}): shorten it; "
                               "the text encoder reads only its first tokens anyway")
    if "\x00" in prompt:
        raise StudioInputError("the prompt contains a NUL character: remove control characters")
    if not 1 <= int(steps) <= MAX_STEPS:
        raise StudioInputError(f"steps={steps} is outside 1..{MAX_STEPS}: use 20-30 for DPM-Solver++ or DDIM")
    if not 1 <= int(n) <= MAX_IMAGES:
        raise StudioInputError(f"n={n} is outside 1..{MAX_IMAGES}: ask for fewer images per call, or use a batch job")
    if not (0.0 <= float(cfg) <= 30.0) or cfg != cfg:
        raise StudioInputError(f"cfg={cfg} is outside 0..30: typical values are 4-9")


class Studio:
    """Generate images with a diffusers pipeline (TinyWorld by default).

    >>> studio = Studio()                       # TinyWorld, offline, CPU or CUDA
    >>> images = studio.generate("a red star on a black background", n=4, out="out/")
    """

    def __init__(self, model: str | Path | None = None, device: str | None = None, sampler: str = "dpm++"):
        from .pipeline import load_pipeline
        from .recipe import model_hash

        self.model_path = Path(model) if model else TINYWORLD
        if not self.model_path.exists():
            raise StudioInputError(f"model not found: {self.model_path}: pass a diffusers folder or a .safetensors "
                                   "checkpoint (SD1.5 or SDXL); without --model the bundled TinyWorld is used")
        self.pipe = load_pipeline(self.model_path, device=device, scheduler=sampler)
        self.sampler = sampler
        self.model_name = "TinyWorld" if self.model_path == TINYWORLD else self.model_path.stem
        self._model_hash = model_hash(self.model_path)
        self.pipe.set_progress_bar_config(disable=True)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def generate(self, prompt: str, n: int = 1, seed: int = 0, steps: int = 25, cfg: float = 7.0,
                 negative_prompt: str = "", out: str | Path | None = None,
                 batch_size: int = 16) -> list[GeneratedImage]:
        """n images of one prompt; image i uses seed + i, so any single image can be reproduced alone."""
        validate_request(prompt, n, steps, cfg)
        return self.generate_many([prompt] * n, [seed + i for i in range(n)], steps=steps, cfg=cfg,
                                  negative_prompt=negative_prompt, out=out, batch_size=batch_size)

    def generate_many(self, prompts: list[str], seeds: list[int], steps: int = 25, cfg: float = 7.0,
                      negative_prompt: str = "", out: str | Path | None = None,
                      batch_size: int = 16, progress: bool = True) -> list[GeneratedImage]:
        """One image per (prompt, seed), run in batches through the pipeline."""
        from tqdm import tqdm

        from .recipe import Recipe, save_png

        for p in set(prompts):
            validate_request(p, 1, steps, cfg)
        results: list[GeneratedImage] = []
        gen_device = "cpu" if self.device.type == "mps" else self.device
        chunks = range(0, len(prompts), batch_size)
        for start in tqdm(chunks, desc="generate", disable=not progress or len(chunks) < 2):
            ps, ss = prompts[start: start + batch_size], seeds[start: start + batch_size]
            gens = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in ss]
            images = self.pipe(ps, negative_prompt=[negative_prompt] * len(ps), num_inference_steps=steps,
                               guidance_scale=cfg, generator=gens).images
            for p, s, im in zip(ps, ss, images):
                recipe = Recipe(prompt=p, negative_prompt=negative_prompt, seed=int(s), steps=steps, cfg=cfg,
                                sampler=self.sampler, width=im.width, height=im.height,
                                model=self.model_name, model_hash=self._model_hash)
                results.append(GeneratedImage(im, recipe))
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            for i, r in enumerate(results):
                r.path = out / f"{i:04d}-seed{r.recipe.seed}.png"
                save_png(r.image, r.path, r.recipe)
        return results
