"""`Studio`: the one Python entry point that the CLI, the UI and batch jobs all call."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from .library.catalog import cache_dir

TINYWORLD = Path(__file__).resolve().parents[1] / "assets" / "tinyworld"
TINYWORLD_LORAS = Path(__file__).resolve().parents[1] / "assets" / "loras"
FAMILY_BY_CROSS_ATTENTION = {128: "tinyworld", 768: "sd15", 2048: "sdxl"}

MAX_STEPS = 200
MAX_IMAGES = 64
MAX_PROMPT_CHARS = 2000


def open_catalog(library: str | Path):
    """The catalog of a LoRA library folder, kept in its cache folder (`studio.library.catalog.cache_dir`)."""
    from .library.catalog import Catalog

    library = Path(library)
    if not library.is_dir():
        raise StudioInputError(f"no LoRA library folder at {library}: pass a folder of LoRA files")
    return Catalog(cache_dir(library) / "catalog.sqlite")


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


def _applied_weights(schedule, step: int, n_steps: int, cfg: bool) -> torch.Tensor:
    """``[N, L]``: the schedule's UNet weights at `step`, summed over the conditional passes it computes then."""
    w = schedule.weights(step, n_steps).detach().float().cpu()
    try:
        rows = [p.row for p in schedule.passes(step, n_steps, cfg) if p.branch == "cond" and not p.reuse]
    except Exception:
        rows = []
    if not rows:
        return w.mean(0)
    return w[rows].sum(0)


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
        self.last_picks = []  # the retrieval picks of the last generate(loras="auto")
        self.last_weight_trace = None  # generate(trace_weights=True): the schedule's weights per step

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
                 method_params: dict | None = None, batch_size: int = 16, on_step=None,
                 trace_weights: bool = False) -> list[GeneratedImage]:
        """n images of one prompt; image i uses seed + i, so any single image can be reproduced alone.

        LoRAs come from `<lora:name:weight>` tags in the prompt and/or `loras` (or `loras="auto"`: picked by
        retrieval from the library, trigger words inserted); `method` is a fusion method (merge, blockwise,
        switch, composite, ...: `fusion.SCHEDULES`) with its `method_params`.

        `on_step(done, total)` is called after every denoising step (for progress bars); with `trace_weights`
        the schedule's LoRA weights per step are kept in `last_weight_trace` (see `generate_many`).
        """
        validate_request(prompt, n, steps, cfg)
        return self.generate_many([prompt] * n, [seed + i for i in range(n)], steps=steps, cfg=cfg,
                                  negative_prompt=negative_prompt, out=out, batch_size=batch_size, loras=loras,
                                  method=method, method_params=method_params, on_step=on_step,
                                  trace_weights=trace_weights)

    def generate_many(self, prompts: list[str], seeds: list[int], steps: int = 25, cfg: float = 7.0,
                      negative_prompt: str = "", out: str | Path | None = None,
                      batch_size: int = 16, progress: bool = True, loras=None, method: str | None = None,
                      method_params: dict | None = None, on_step=None,
                      trace_weights: bool = False) -> list[GeneratedImage]:
        """One image per (prompt, seed), run in batches through the pipeline. All prompts share one LoRA plan.

        `on_step(done, total)`: called after each denoising step of each batch (total = batches × steps).
        `trace_weights`: record, at every step of the first batch, the UNet weights the schedule applied in the
        conditional passes it computed (summed over those passes: Composite's per-LoRA passes give every LoRA at
        its weight, a CMLoRA cached step only the dominant LoRA) in
        ``self.last_weight_trace = {"names", "layers", "weights": Tensor[steps, N, L]}`` (None without LoRAs).
        """
        from tqdm import tqdm

        from .recipe import Recipe, save_png

        for p in set(prompts):
            validate_request(p, 1, steps, cfg)
        self.last_picks = []
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
        self.last_weight_trace = None
        trace = [] if trace_weights and plan.loras else None
        schedule = self._runtime.schedule if plan.loras and self._runtime is not None else None
        for k, start in enumerate(tqdm(chunks, desc="generate", disable=not progress or len(chunks) < 2)):
            ps, ss = prompts[start: start + batch_size], seeds[start: start + batch_size]
            gens = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in ss]
            callback = None
            if on_step is not None or (trace is not None and k == 0):
                callback = self._step_callback(on_step, k * steps, len(chunks) * steps, steps,
                                               trace if k == 0 else None, schedule)
            images = self.pipe(ps, negative_prompt=[negative_prompt] * len(ps), num_inference_steps=steps,
                               guidance_scale=cfg, generator=gens, callback_on_step_end=callback).images
            for p, s, im in zip(ps, ss, images):
                recipe = Recipe(prompt=p, negative_prompt=negative_prompt, seed=int(s), steps=steps, cfg=cfg,
                                sampler=self.sampler, width=im.width, height=im.height,
                                model=self.model_name, model_hash=self._model_hash, loras=lora_rows,
                                method=plan.method if plan.loras else "",
                                method_params=plan.to_dict() if plan.loras else {})
                results.append(GeneratedImage(im, recipe))
        if trace:
            self.last_weight_trace = {"names": list(schedule.binding.names),
                                      "layers": list(schedule.binding.unet_layers),
                                      "weights": torch.stack(trace)}
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            for i, r in enumerate(results):
                r.path = out / f"{i:04d}-seed{r.recipe.seed}.png"
                save_png(r.image, r.path, r.recipe)
        return results

    @staticmethod
    def _step_callback(on_step, offset: int, total: int, steps: int, trace, schedule):
        """A diffusers ``callback_on_step_end``: progress (`on_step(done, total)`) and the schedule's weights."""

        def callback(pipe, step, timestep, callback_kwargs):
            if trace is not None and schedule is not None:
                trace.append(_applied_weights(schedule, int(step), steps, bool(pipe.do_classifier_free_guidance)))
            if on_step is not None:
                on_step(offset + int(step) + 1, total)
            return callback_kwargs

        return callback

    # ------------------------------------------------------------------ batch jobs
    def generate_batch(self, jobs, out: str | Path, engine: str = "local", workers: int | None = None,
                       batch_size: int = 1, progress: bool = True, on_progress=None):
        """Run a batch of jobs (a list of dicts, or a JSONL / YAML / JSON job file) into the folder `out`.

        Each job: ``prompt``, ``loras`` ("auto", names, ``[name, weight]`` pairs or LoRARef dicts), ``method``,
        ``method_params``, ``seeds`` (or ``seed`` + ``n``), ``steps``, ``cfg``, ``negative_prompt``, ``id``. Jobs
        are grouped by LoRA set; every image is a PNG carrying its recipe and a line of ``out/manifest.jsonl``,
        written as soon as it is finished, so a run that stops is resumed by running it again. `engine="ray"`
        fans the groups out over Ray workers (one per GPU, else `workers` CPU workers). Returns a
        `studio.batch.BatchReport`. See `studio.batch`.
        """
        from .batch import run_batch

        return run_batch(self, jobs, out, engine=engine, workers=workers, batch_size=batch_size,
                         progress=progress, on_progress=on_progress)

    # ------------------------------------------------------------------ style clustering
    def cluster(self, k: int | None = None, out_png: str | Path | None = None, previews: bool = False,
                preview_steps: int = 12, progress: bool = False):
        """Cluster the library's LoRAs (of this model's family) by style, from their weights alone.

        `k`: the number of clusters (None: chosen by silhouette). `out_png`: where to draw the style map (each
        LoRA a thumbnail framed in its cluster's colour). Thumbnails are the LoRA's own preview image when the
        library has one, else a preview cached in ``<library>/.studio/previews/``; with `previews=True` missing
        previews are rendered (the LoRA alone on its trigger words, seed 0, `preview_steps` steps) and cached.
        Returns a `retrieval.clustering.LibraryStyles` (``.groups()``: cluster name -> member names;
        ``.map_png``; ``.to_dict()``).
        """
        from retrieval.clustering import cluster_library

        if k is not None:
            try:
                k = int(k)
            except (TypeError, ValueError):
                raise StudioInputError(f"k={k!r}: give a whole number of clusters, or leave it out") from None
            if k < 1:
                raise StudioInputError(f"k={k}: the number of clusters is at least 1 (leave it out to choose it)")
        catalog = self.catalog
        entries = [e for e in catalog.all() if e.status == "ok"]
        if not entries:
            raise StudioInputError(f"the library {self.library} has no LoRA to cluster: add LoRA files "
                                   "(.safetensors) to the folder")
        if out_png is not None:
            out_png = Path(out_png)
            if out_png.suffix.lower() != ".png":
                raise StudioInputError(f"{out_png}: the style map is a .png file")
            out_png.parent.mkdir(parents=True, exist_ok=True)
        try:
            return cluster_library(entries, lambda e: catalog.load(e.id), self.family,
                                   out_png=str(out_png) if out_png is not None else None,
                                   thumbnail=lambda e: self._thumbnail(e, previews, preview_steps), k=k,
                                   progress=progress)
        except ValueError as e:  # e.g. no LoRA of this family
            raise StudioInputError(f"{e} (library: {self.library})") from None

    def _thumbnail(self, entry, render: bool, steps: int):
        """A LoRA's picture for the style map: its own preview, a cached one, or (`render`) a new cached one."""
        if entry.preview is not None and Path(entry.preview).is_file():
            try:
                with Image.open(entry.preview) as im:
                    return im.convert("RGB")
            except Exception:
                pass  # a broken preview file: fall through to the cache
        key = (entry.tensor_hash or entry.file_sha256 or entry.name)[:16]
        cached = cache_dir(self.library) / "previews" / f"{key}-{self.family}-s{steps}.png"
        if cached.is_file():
            try:
                with Image.open(cached) as im:
                    return im.convert("RGB")
            except Exception:
                cached.unlink(missing_ok=True)
        if not render or entry.family not in (self.family, None, "unknown"):
            return None
        prompt = ", ".join(entry.trigger_words[:2]) or entry.description[:200].strip() or entry.name
        image = self.generate(prompt, n=1, seed=0, steps=steps, loras=[(entry.name, 1.0)])[0].image
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp")
        image.save(tmp, format="PNG")
        tmp.replace(cached)
        return image
