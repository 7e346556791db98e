"""`Studio`: the one Python entry point that the CLI, the UI and batch jobs all call."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

TINYWORLD = Path(__file__).resolve().parents[1] / "assets" / "tinyworld"
TINYWORLD_LORAS = Path(__file__).resolve().parents[1] / "assets" / "loras"
FAMILY_BY_CROSS_ATTENTION = {128: "tinyworld", 768: "sd15", 2048: "sdxl"}

MAX_STEPS = 200
MAX_IMAGES = 64
MAX_PROMPT_CHARS = 2000


def open_catalog(library: str | Path):
    """The catalog of a LoRA library folder, kept beside the files in `<library>/.studio/catalog.sqlite`."""
    from .library.catalog import Catalog

    library = Path(library)
    if not library.is_dir():
        raise StudioInputError(f"no LoRA library folder at {library}: pass a folder of LoRA files")
    return Catalog(library / ".studio" / "catalog.sqlite")


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

    def __init__(self, model: str | Path | None = None, device: str | None = None, sampler: str = "dpm++",
                 library: str | Path | None = None):
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
        self.family = FAMILY_BY_CROSS_ATTENTION.get(self.pipe.unet.config.cross_attention_dim, "unknown")
        default_library = TINYWORLD_LORAS if self.model_path == TINYWORLD else None
        self.library = Path(library) if library else default_library
        self._catalog = None
        self._cache = None
        self._runtime = None

    # ------------------------------------------------------------------ the LoRA library
    @property
    def catalog(self):
        """The library's catalog (`<library>/.studio/catalog.sqlite`), scanned incrementally on first use."""
        if self._catalog is None:
            from .library.cache import LoRACache

            if self.library is None:
                raise StudioInputError("no LoRA library: pass library=DIR (or --library DIR), a folder of LoRA files")
            self._catalog = open_catalog(self.library)
            self._catalog.scan(self.library)
            self._cache = LoRACache(self._catalog)
        return self._catalog

    def _lora(self, name: str):
        try:
            entry = self.catalog.get(name)
        except KeyError as e:
            raise StudioInputError(f"{e.args[0] if e.args else name} (library: {self.library})") from None
        if entry.family and entry.family not in (self.family, "unknown"):
            raise StudioInputError(f"{entry.path}: this LoRA is for {entry.family}, the model is {self.family}: "
                                   f"pick a LoRA made for {self.family}, or load a {entry.family} model")
        return self._cache.get(name)

    def plan(self, prompt: str, loras=None, method: str | None = None, **params):
        """(prompt without tags, Plan) from A1111 `<lora:name:w>` tags in the prompt plus `loras`
        (names, (name, weight) pairs or `fusion.LoRARef`s)."""
        from fusion import LoRARef, Plan, parse_prompt

        clean, refs = parse_prompt(prompt)
        for item in loras or []:
            if isinstance(item, LoRARef):
                refs.append(item)
            elif isinstance(item, str):
                refs.append(LoRARef(item))
            else:
                refs.append(LoRARef(item[0], float(item[1])))
        if method is None:
            method = "blockwise" if any(r.start is not None or r.stop is not None or r.lbw for r in refs) else "merge"
        return clean, Plan(loras=refs, method=method, params=params)

    def retrieve(self, prompt: str, k: int = 5, **kw):
        """LoRAs of the library for `prompt`: capped per category, thresholded, explained."""
        from retrieval.studio import retrieve

        return retrieve(self, prompt, k, **kw)

    def _activate(self, plan) -> None:
        from fusion import LoRARuntime, build_schedule

        if not plan.loras:
            if self._runtime is not None:
                self._runtime.deactivate()
            return
        if self._runtime is None:
            self._runtime = LoRARuntime(self.pipe)
        for ref in plan.loras:
            if ref.name not in self._runtime.loras:
                self._runtime.load(ref.name, self._lora(ref.name))
        self._runtime.activate([r.name for r in plan.loras], build_schedule(plan))

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def generate(self, prompt: str, n: int = 1, seed: int = 0, steps: int = 25, cfg: float = 7.0,
                 negative_prompt: str = "", out: str | Path | None = None, loras=None, method: str | None = None,
                 method_params: dict | None = None, batch_size: int = 16) -> list[GeneratedImage]:
        """n images of one prompt; image i uses seed + i, so any single image can be reproduced alone.

        LoRAs come from `<lora:name:weight>` tags in the prompt and/or `loras` (or `loras="auto"`: picked by
        retrieval from the library, trigger words inserted); `method` is a fusion method (merge, blockwise,
        switch, composite) with its `method_params`.
        """
        validate_request(prompt, n, steps, cfg)
        return self.generate_many([prompt] * n, [seed + i for i in range(n)], steps=steps, cfg=cfg,
                                  negative_prompt=negative_prompt, out=out, batch_size=batch_size, loras=loras,
                                  method=method, method_params=method_params)

    def generate_many(self, prompts: list[str], seeds: list[int], steps: int = 25, cfg: float = 7.0,
                      negative_prompt: str = "", out: str | Path | None = None,
                      batch_size: int = 16, progress: bool = True, loras=None, method: str | None = None,
                      method_params: dict | None = None) -> list[GeneratedImage]:
        """One image per (prompt, seed), run in batches through the pipeline. All prompts share one LoRA plan."""
        from tqdm import tqdm

        from .recipe import Recipe, save_png

        for p in set(prompts):
            validate_request(p, 1, steps, cfg)
        if isinstance(loras, str) and loras == "auto":
            from retrieval.studio import resolve_loras

            prompts, loras, self.last_picks = resolve_loras(self, prompts, "auto")
        planned = [self.plan(p, loras, method, **(method_params or {})) for p in prompts]
        plan = planned[0][1]
        if any(pl.to_dict() != plan.to_dict() for _, pl in planned):
            raise StudioInputError("prompts of one call must name the same LoRAs: split the call by LoRA set")
        prompts = [clean for clean, _ in planned]
        self._activate(plan)
        lora_rows = [{"name": r.name, "weight": r.weight, "hash": self.catalog.get(r.name).tensor_hash or ""}
                     for r in plan.loras]
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
                                model=self.model_name, model_hash=self._model_hash, loras=lora_rows,
                                method=plan.method if plan.loras else "",
                                method_params=plan.to_dict() if plan.loras else {})
                results.append(GeneratedImage(im, recipe))
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            for i, r in enumerate(results):
                r.path = out / f"{i:04d}-seed{r.recipe.seed}.png"
                save_png(r.image, r.path, r.recipe)
        return results
