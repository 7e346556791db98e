"""LoRA Studio in the browser (Gradio 6): ``python app.py`` serves TinyWorld on http://127.0.0.1:7860.

    python app.py [--model M] [--library DIR] [--out DIR] [--host 127.0.0.1] [--port 7860] [--auth user:pass]
                  [--max-upload-mb 512] [--device cpu|cuda|mps]

Tabs: Generate (prompt -> auto-picked LoRAs as editable rows -> fusion method -> gallery with recipes, per-step
progress, a heatmap of the LoRA weights the method applied per layer and step), Library (search, format reports,
previews, trigger words, uploads), Styles (`Studio.cluster`: clusters and the style map), Batch (job files -> zip
of PNGs + manifest). Every event is a named API endpoint (see `ENDPOINTS`; ``gradio_client.Client(url).predict(..., api_name="/generate")``).

The app adds nothing of its own: every action calls the same `Studio` methods as the CLI. Safety: it binds to
127.0.0.1 unless --host says otherwise; --auth USER:PASSWORD (or the LORA_STUDIO_AUTH environment variable) adds a
login; uploads are .safetensors only (by default), limited in size (--max-upload-mb), stored only under
``<library>/uploads`` with a sanitized name and validated by the catalog (a bad file is quarantined there with the
catalog's reason and fix, and never loaded); Gradio may serve files only from the library and output folders
(``<library>/.studio`` blocked), plus its own upload cache. Handlers take LoRAs by catalog name, never by path;
files handed to them (uploads, job files) must lie in Gradio's upload folder, the library or the output folder,
symlinks resolved; a library entry that is a symlink to a file outside the library is never read.

All Studio work runs on one worker thread: one pipeline, one LoRA runtime and one SQLite catalog connection are
never used from two threads at once; the Gradio queue orders the requests.
"""
from __future__ import annotations

import argparse
import contextvars
import hashlib
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls

import gradio as gr  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from studio.api import TINYWORLD_LORAS, StudioInputError  # noqa: E402
from studio.library.catalog import cache_dir  # noqa: E402

DEFAULT_OUT = ROOT / "out" / "app"
UPLOAD_TYPES = (".safetensors",)
JOB_TYPES = (".jsonl", ".json", ".yaml", ".yml")
DEFAULT_MAX_UPLOAD_MB = 512
LORA_HEADERS = ["lora", "weight", "block preset", "start", "stop"]
LIBRARY_HEADERS = ["name", "category", "family", "format", "rank", "trigger words", "status"]
SEARCH_HEADERS = ["name", "score", "version of", "trigger", "matched words"]
STYLE_HEADERS = ["cluster", "LoRAs", "members"]
HEATMAP_METHODS = ("gated", "cmlora")
AUTH_ENV = "LORA_STUDIO_AUTH"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ENDPOINTS = ("retrieve", "add_lora", "remove_lora", "generate", "select_recipe", "methods", "library", "rescan",
             "search", "inspect", "upload", "style_map_initial", "style_map", "batch")


def methods() -> list[str]:
    """The fusion methods registered now (`fusion.schedules.SCHEDULES`), read at run time."""
    from fusion.schedules import SCHEDULES

    return list(SCHEDULES)


def presets() -> list[str]:
    from fusion.blockweights import BLORA_SPECS, PRESETS

    return list(PRESETS) + list(BLORA_SPECS)


# ----------------------------------------------------------------------------------------------- helpers
def _blank(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and not value.strip()


def _number(value, what: str, row: int):
    if _blank(value):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise StudioInputError(f"LoRA row {row}: {what} {value!r} is not a number") from None
    return x


def check_lora_name(name, where: str = "") -> str:
    """A LoRA is named (catalog name, file stem or alias), never given by path: no separators, no '..', no
    absolute or home paths, no control characters."""
    text = str(name).strip()
    if (not text or "/" in text or "\\" in text or text.startswith(("~", "."))
            or any(ord(c) < 32 for c in text) or Path(text).is_absolute() or re.match(r"^[A-Za-z]:", text)):
        raise StudioInputError(f"{where}{text!r} is not a LoRA name: name a LoRA of the library (its catalog name), "
                               "not a path")
    return text


def rows_to_refs(rows) -> list:
    """The LoRA table (lora, weight, block preset, start, stop) -> `fusion.LoRARef`s; empty rows are skipped."""
    from fusion import LoRARef
    from fusion.blockweights import BlockWeightError, check_spec

    if isinstance(rows, dict):  # the API form {"headers": [...], "data": [[...]]}
        rows = rows.get("data") or []
    refs = []
    for i, row in enumerate(rows or [], 1):
        row = list(row) + [None] * (5 - len(row))
        name, weight, lbw, start, stop = row[:5]
        if _blank(name):
            continue
        name = check_lora_name(name, f"LoRA row {i}: ")
        weight = _number(weight, "weight", i)
        start, stop = _number(start, "start", i), _number(stop, "stop", i)
        lbw = None if _blank(lbw) else str(lbw).strip()
        if lbw is not None:
            try:
                check_spec(lbw)
            except BlockWeightError as e:
                raise StudioInputError(f"LoRA row {i} ({name}): {e}; presets: {', '.join(presets())}") from None
        try:
            refs.append(LoRARef(str(name).strip(), 1.0 if weight is None else weight, lbw=lbw,
                                start=None if start is None else (int(start) if start >= 1 else start),
                                stop=None if stop is None else (int(stop) if stop >= 1 else stop)))
        except ValueError as e:
            raise StudioInputError(f"LoRA row {i}: {e}") from None
    return refs


def _row(name: str, weight: float = 1.0, lbw: str = "", start=None, stop=None) -> list:
    return [name, weight, lbw or "", start, stop]


def _table(rows) -> list[list]:
    if isinstance(rows, dict):
        rows = rows.get("data") or []
    return [list(r) for r in (rows or []) if r and not _blank(r[0])]


def _bullets(text: str) -> str:
    """Markdown list of the lines of `text` (Markdown would join them into one paragraph)."""
    return "\n".join(f"- {line}" for line in text.splitlines() if line.strip())


def _safe_name(name: str, default: str = "lora") -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(name)).name).strip("._")[:100]
    return stem or default


_COLORS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # viridis anchors


def _viridis(t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0) * (len(_COLORS) - 1)
    i = min(int(t), len(_COLORS) - 2)
    f = t - i
    a, b = _COLORS[i], _COLORS[i + 1]
    return tuple(int(round(a[k] + f * (b[k] - a[k]))) for k in range(3))


def weight_heatmap(trace: dict, title: str = "") -> Image.Image:
    """One panel per LoRA: its UNet weight at every layer (rows, UNet order down -> mid -> up) × step (columns)."""
    w = trace["weights"].float()  # [S, N, L]
    names = trace["names"]
    steps, n, layers = w.shape
    vmax = float(w.abs().max()) or 1.0
    vmin = float(w.min())
    lo = min(0.0, vmin)
    cw = max(6, min(24, 360 // max(steps, 1)))
    ch = max(2, min(12, 260 // max(layers, 1)))
    pw, ph = cw * steps, ch * layers
    font = ImageFont.load_default()
    top, left, gap = 34, 10, 16
    width = left + n * (pw + gap) + 70
    height = top + ph + 34
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 4), title or "LoRA weight per layer (rows) and step (columns)", fill="black", font=font)
    for j, name in enumerate(names):
        x0 = left + j * (pw + gap)
        d.text((x0, top - 14), name[:max(8, pw // 6)], fill="black", font=font)
        for s in range(steps):
            for l in range(layers):
                t = (float(w[s, j, l]) - lo) / ((vmax - lo) or 1.0)
                d.rectangle([x0 + s * cw, top + l * ch, x0 + (s + 1) * cw - 1, top + (l + 1) * ch - 1],
                            fill=_viridis(t))
        d.text((x0, top + ph + 4), f"step 1 .. {steps}", fill="black", font=font)
    # colour bar
    bx = left + n * (pw + gap) + 4
    for y in range(ph):
        d.line([bx, top + y, bx + 10, top + y], fill=_viridis(1 - y / max(ph - 1, 1)))
    d.text((bx + 14, top - 4), f"{vmax:.2g}", fill="black", font=font)
    d.text((bx + 14, top + ph - 8), f"{lo:.2g}", fill="black", font=font)
    d.text((left, top + ph + 18), f"{layers} adapted UNet layers, top = first (down blocks), bottom = last (up blocks)",
           fill="black", font=font)
    return img


# ----------------------------------------------------------------------------------------------- the app
class StudioApp:
    """The Gradio studio around one `Studio` (created on the worker thread on first use)."""

    def __init__(self, model: str | Path | None = None, library: str | Path | None = None,
                 out: str | Path | None = None, device: str | None = None, sampler: str = "dpm++",
                 upload_types: tuple[str, ...] = UPLOAD_TYPES, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
        self.model = Path(model) if model else None
        if library is None and model is None:
            library = TINYWORLD_LORAS
        if library is None:
            raise StudioInputError("--model without --library: pass the folder of LoRA files for this model")
        self.library = Path(library).resolve()
        self.library.mkdir(parents=True, exist_ok=True)
        self.uploads = self.library / "uploads"
        self.out = Path(out or DEFAULT_OUT).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.device, self.sampler = device, sampler
        self.upload_types = tuple(t.lower() for t in upload_types)
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        if self.max_upload_bytes <= 0:
            raise StudioInputError(f"max_upload_mb={max_upload_mb}: the upload limit must be positive")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="studio")
        self._studio = None
        self._counter = 0

    # ---------------------------------------------------------------- the worker thread
    def call(self, fn, *args, **kwargs):
        """Run `fn` on the Studio's thread (Gradio's progress context travels with it); StudioInputErrors and
        other refusals become `gr.Error`s with their message."""
        ctx = contextvars.copy_context()
        try:
            return self._executor.submit(ctx.run, fn, *args, **kwargs).result()
        except gr.Error:
            raise
        except (StudioInputError, ValueError, KeyError) as e:
            raise gr.Error(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)) from None

    @property
    def studio(self):
        if self._studio is None:
            from studio.api import Studio

            self._studio = Studio(model=self.model, device=self.device, sampler=self.sampler, library=self.library)
        return self._studio

    def warm_up(self) -> None:
        """Load the pipeline and scan the library now (instead of on the first request)."""
        self.call(lambda: self.studio.catalog)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- what handlers may read
    @property
    def input_roots(self) -> list[Path]:
        """Folders a file handed to a handler (an upload, a job file) may lie in: Gradio's upload folder (where
        the browser's and gradio_client's uploads land), the library and the output folder."""
        from gradio.utils import get_upload_folder

        return [Path(get_upload_folder()).resolve(), self.library, self.out]

    def _inside(self, path: Path, roots) -> bool:
        return any(path.is_relative_to(r) for r in roots) and not path.is_relative_to(cache_dir(self.library))

    def _input_file(self, file_path, what: str) -> Path:
        """The file a handler was given, resolved (symlinks followed), if it lies in `input_roots`; anything
        else (``../../etc/passwd``, an absolute path elsewhere, a symlink pointing outside) is refused."""
        if isinstance(file_path, dict):  # a FileData payload
            file_path = file_path.get("path")
        if _blank(file_path):
            raise StudioInputError(f"choose a {what}")
        given = Path(str(file_path))
        try:
            path = given.resolve(strict=True)
        except (OSError, RuntimeError):
            raise StudioInputError(f"{given.name}: no such {what}") from None
        if not self._inside(path, self.input_roots):
            raise StudioInputError(f"{given.name}: refused, a {what} must be uploaded to the app (files elsewhere "
                                   "on the server are never read)")
        if not path.is_file():
            raise StudioInputError(f"{given.name}: not a file")
        return path

    def _outside(self) -> dict[str, Path]:
        """Catalogued LoRAs whose file resolves outside the library (a symlink pointing out): name -> path.
        The app never reads them."""
        out = {}
        for e in self.studio.catalog.all():
            try:
                real = Path(e.path).resolve()
            except (OSError, RuntimeError):
                real = None
            if real is None or not real.is_relative_to(self.library) or real.is_relative_to(cache_dir(self.library)):
                out[e.name] = Path(e.path)
        return out

    def _check_usable(self, names) -> None:
        """Refuse LoRAs whose catalog entry points outside the library (by name, alias or id)."""
        outside = self._outside()
        if not outside:
            return
        for name in names:
            try:
                entry = self.studio.catalog.get(str(name))
            except KeyError:
                continue  # unknown names get the Studio's own message
            if entry.name in outside:
                raise StudioInputError(f"{entry.name}: its file is a link to {outside[entry.name].resolve()}, "
                                       f"outside the library {self.library}; the app does not read it (copy the "
                                       "file into the library instead)")

    # ---------------------------------------------------------------- Generate tab
    def _retrieve(self, prompt: str, k: int):
        from retrieval.autopick import explain, insert_triggers

        if not prompt or not prompt.strip():
            raise StudioInputError("the prompt is empty: describe the picture first")
        picks = self.studio.retrieve(prompt, k=int(k))
        rows = [_row(p.name) for p in picks]
        why = _bullets(explain(picks)) if picks else "no LoRA of the library fits this prompt"
        return rows, why, insert_triggers(prompt, picks)

    def retrieve(self, prompt: str, k: float = 3):
        rows, why, new_prompt = self.call(self._retrieve, prompt, k)
        return rows, why, new_prompt

    def _add(self, prompt: str, rows, name: str):
        from retrieval.autopick import Pick, insert_triggers

        rows = _table(rows)
        if _blank(name):
            raise StudioInputError("pick a LoRA of the library to add")
        entry = self.studio.catalog.get(check_lora_name(name))
        self._check_usable([entry.name])
        if any(r[0] == entry.name for r in rows):
            return rows, prompt
        trig = entry.trigger_words[0] if entry.trigger_words else None
        if trig:
            prompt = insert_triggers(prompt or "", [Pick(entry.name, "", 1.0, [], trig, "added by hand")])
        return rows + [_row(entry.name)], prompt

    def add_lora(self, prompt: str, rows, name: str):
        return self.call(self._add, prompt, rows, name)

    def remove_lora(self, rows, name: str):
        rows = _table(rows)
        return [r for r in rows if r[0] != name]

    def _generate(self, prompt, rows, method, params_text, seed, n, steps, cfg, negative, auto_pick, heatmap,
                  progress):
        from fusion import parse_prompt
        from retrieval.autopick import explain
        from retrieval.studio import resolve_loras
        from studio.api import validate_request

        studio = self.studio
        refs = rows_to_refs(rows)
        method = None if _blank(method) or method == "auto" else str(method)
        if method is not None and method not in methods():
            raise StudioInputError(f"unknown method {method!r}; use one of {methods()}")
        try:
            params = json.loads(params_text) if not _blank(params_text) else {}
        except json.JSONDecodeError as e:
            raise StudioInputError(f"method parameters are not JSON ({e.msg}); e.g. {{\"tau\": 5}}") from None
        if not isinstance(params, dict):
            raise StudioInputError("method parameters are a JSON object, e.g. {\"tau\": 5}")
        validate_request(prompt, int(n), int(steps), float(cfg))
        tags = parse_prompt(prompt)[1]
        for ref in tags:
            check_lora_name(ref.name, "prompt tag <lora:...>: ")
        picks, auto = [], bool(auto_pick) and not refs
        if auto:  # resolved here (as Studio.generate would) so the picks can be checked too
            prompts, refs, picks = resolve_loras(studio, [prompt], "auto")
            prompt = prompts[0]
        self._check_usable([r.name for r in [*tags, *refs]])
        loras = refs
        self._counter += 1
        folder = self.out / "images" / f"{time.strftime('%Y%m%d-%H%M%S')}-{self._counter:04d}"
        trace = bool(heatmap) or method in HEATMAP_METHODS  # cheap: the schedule's weights once per step

        def on_step(done, total):
            progress((done, total), desc="denoising", unit="steps")

        progress((0, int(steps) * 1), desc="starting", unit="steps")
        started = time.monotonic()
        results = studio.generate(prompt, n=int(n), seed=int(seed), steps=int(steps), cfg=float(cfg),
                                  negative_prompt=negative or "", out=folder, loras=loras, method=method,
                                  method_params=params, on_step=on_step, trace_weights=trace)
        seconds = time.monotonic() - started
        gallery = [(str(r.path), f"seed {r.recipe.seed}") for r in results]
        recipes = [r.recipe.to_dict() | {"file": r.path.name} for r in results]
        rec = results[0].recipe
        used = ", ".join(f"{l['name']}:{l['weight']:g}" for l in rec.loras) or "none"
        status = (f"{len(results)} image(s), seeds {rec.seed}..{rec.seed + len(results) - 1}, {seconds:.1f}s on "
                  f"{studio.device.type}; LoRAs: {used}; method: {rec.method or '-'}")
        if auto:
            studio.last_picks = picks
            status += "\n\nauto-pick:\n\n" + _bullets(explain(picks))
        image = None
        if trace and studio.last_weight_trace is not None:
            image = weight_heatmap(studio.last_weight_trace, f"{rec.method}: LoRA weight applied per layer (rows) and step")
        return gallery, recipes, image, status

    def generate(self, prompt, rows, method, params_text, seed, n, steps, cfg, negative, auto_pick, heatmap,
                 progress=gr.Progress()):
        return self.call(self._generate, prompt, rows, method, params_text, seed, n, steps, cfg, negative,
                         auto_pick, heatmap, progress)

    @staticmethod
    def select_recipe(recipes, index=None, evt: gr.EventData = None):  # a plain class hint: Gradio injects it
        """The recipe of image `index` of the gallery: from the click's event data in the browser, from `index`
        through the API (``client.predict(recipes, 1, api_name="/select_recipe")``); None if out of range."""
        data = getattr(evt, "_data", None)
        if isinstance(data, dict) and "index" in data:
            index = data["index"]
        if isinstance(index, float) and index.is_integer():
            index = int(index)
        if not recipes or not isinstance(index, int) or not 0 <= index < len(recipes):
            return None
        return recipes[index]

    # ---------------------------------------------------------------- Library tab
    def _library_rows(self):
        from retrieval.autopick import category_from_metadata

        catalog = self.studio.catalog
        outside = self._outside()
        rows = []
        for e in catalog.all():
            status = "ok" if e.status == "ok" else "duplicate"
            if e.name in outside:
                status = "refused: a link to a file outside the library (copy the file in instead)"
            if e.family not in (self.studio.family, "unknown"):
                status += f" (for {e.family}, not usable with {self.studio.family})"
            rows.append([e.name, category_from_metadata(e.tags, e.description) or "", e.family or "",
                         e.format or "", "/".join(map(str, e.ranks)), ", ".join(e.trigger_words), status])
        for e in catalog.quarantined():
            rows.append([e.path.stem, "", "", "", "", "", f"quarantined: {e.reason} (fix: {e.fix})"])
        return rows

    def _names(self) -> list[str]:
        outside = self._outside()
        return [e.name for e in self.studio.catalog.all() if e.status == "ok" and e.name not in outside]

    def library_table(self):
        rows, names = self.call(lambda: (self._library_rows(), self._names()))
        return rows, gr.update(choices=names), gr.update(choices=names)

    def _search(self, query: str, k: int):
        from retrieval.studio import library_index

        if _blank(query):
            raise StudioInputError("type what the LoRA should depict, e.g. 'a ghost' or 'striped style'")
        hits = library_index(self.studio).search(query, k=int(k), family=self.studio.family)
        return [[h.name, round(h.score, 3), h.model, h.trigger or "", ", ".join(h.matched)] for h in hits]

    def search(self, query: str, k: float = 10):
        return self.call(self._search, query, k)

    def _entry_path(self, path: Path | None) -> Path | None:
        """`path` if it lies inside the library folder, else None (nothing outside is ever read)."""
        if path is None:
            return None
        try:
            p = Path(path).resolve()
        except OSError:
            return None
        return p if p.is_relative_to(self.library) and p.is_file() else None

    def _inspect(self, name: str):
        from studio.library.inspect import inspect_file

        if _blank(name):
            raise StudioInputError("pick a LoRA of the library")
        name = check_lora_name(name)
        catalog = self.studio.catalog
        try:
            entry = catalog.get(str(name))
        except KeyError as e:
            bad = [q for q in catalog.quarantined() if q.path.stem == str(name)]
            if bad:
                return f"{bad[0].path.name}: {bad[0].reason}\n  fix: {bad[0].fix}", "", "", None
            raise StudioInputError(str(e.args[0]) if e.args else str(e)) from None
        self._check_usable([entry.name])
        path = self._entry_path(entry.path)
        if path is None:
            raise StudioInputError(f"{name!r}: its file is outside the library {self.library}; it is not read")
        report = str(inspect_file(path))
        preview = self._entry_path(entry.preview)
        image = None
        if preview is not None:
            try:
                with Image.open(preview) as im:
                    image = im.convert("RGB")
            except Exception:
                image = None
        return report, ", ".join(entry.trigger_words), entry.description, image

    def inspect(self, name: str):
        return self.call(self._inspect, name)

    def _upload(self, file_path):
        """Add an uploaded LoRA file to ``<library>/uploads`` (sanitized name, never over a LoRA already there)
        and index it. A bad file (corrupt, pickled, NaN, not a LoRA) stays there quarantined by the catalog, which
        never loads it, and the upload fails with the catalog's one-line reason and fix; a duplicate of a LoRA
        already in the library is not kept. Nothing already indexed changes."""
        src = self._input_file(file_path, "LoRA file to upload")
        name = Path(str(file_path.get("path") if isinstance(file_path, dict) else file_path)).name
        suffix = Path(name).suffix.lower()
        if suffix not in self.upload_types or src.suffix.lower() not in self.upload_types:
            raise StudioInputError(f"{name}: only {', '.join(self.upload_types)} files can be uploaded "
                                   "(pickled checkpoints can run code: convert them to .safetensors)")
        size = src.stat().st_size
        if size > self.max_upload_bytes:
            raise StudioInputError(f"{name}: {size / 2**20:.1f} MB is over the upload limit of "
                                   f"{self.max_upload_bytes / 2**20:g} MB")
        catalog = self.studio.catalog
        self.uploads.mkdir(parents=True, exist_ok=True)
        uploads = self.uploads.resolve()
        if not uploads.is_relative_to(self.library):
            raise StudioInputError(f"{self.uploads} is a link out of the library: uploads are refused")
        quarantined = {Path(e.path).resolve() for e in catalog.quarantined()}
        taken = {e.name.lower() for e in catalog.all()} | {Path(e.path).stem.lower() for e in catalog.all()}
        stem = _safe_name(Path(name).stem)
        dest, k = uploads / f"{stem}{suffix}", 1
        # a new name (never shadowing an indexed LoRA); a quarantined upload of the same name is replaced
        while (dest.exists() or dest.is_symlink()) and dest not in quarantined or dest.stem.lower() in taken:
            dest, k = uploads / f"{stem}-{k}{suffix}", k + 1
        if dest.parent != uploads or dest.is_symlink():
            raise StudioInputError(f"{name}: bad file name")
        part = dest.with_name(f".{dest.name}.part")  # the scanner skips dot files
        try:
            shutil.copyfile(src, part)
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        if src.is_relative_to(self.input_roots[0]):
            src.unlink(missing_ok=True)  # the copy in Gradio's upload cache is no longer needed
        catalog.scan(self.uploads)
        bad = [e for e in catalog.quarantined() if Path(e.path).resolve() == dest]
        if bad:  # kept, quarantined: listed in the library table with the reason, never loaded
            raise StudioInputError(f"{name} was not added, quarantined as uploads/{dest.name}: {bad[0].reason} "
                                   f"(fix: {bad[0].fix})")
        entry = next(e for e in catalog.all() if Path(e.path).resolve() == dest)
        if entry.status == "duplicate":
            original = catalog.get(entry.duplicate_of)
            dest.unlink(missing_ok=True)
            catalog.scan(self.uploads)
            raise StudioInputError(f"{name} was not added: it has the same tensors as {original.name} "
                                   f"({original.path.name}), already in the library")
        note = ""
        if entry.family not in (self.studio.family, "unknown"):
            note = f" It is a {entry.family} LoRA: the loaded model ({self.studio.family}) cannot use it."
        status = (f"added **{entry.name}** ({entry.family}, {', '.join(entry.kinds)}, rank "
                  f"{'/'.join(map(str, entry.ranks))}, {entry.n_modules} modules) to {self.uploads.name}/.{note}")
        return status, self._library_rows(), self._names(), self._inspect(entry.name)[0]

    def upload(self, file_path):
        status, rows, names, report = self.call(self._upload, file_path)
        return status, rows, gr.update(choices=names), gr.update(choices=names), report

    # ---------------------------------------------------------------- Styles tab
    @property
    def style_map_png(self) -> Path:
        return self.out / "style_map.png"

    def _style_rows(self, styles: dict) -> list[list]:
        return [[c["name"], len(c["members"]), ", ".join(c["members"])] for c in styles.get("clusters", [])]

    def _style_map(self, refresh: bool, k=None, previews: bool = False):
        """(map image, status, cluster rows). `refresh`: cluster the library now (`Studio.cluster`); otherwise
        show the last map this app drew, if any. An empty library is a message, not an error."""
        png, meta = self.style_map_png, self.style_map_png.with_suffix(".json")
        if refresh:
            k = None if _blank(k) or int(float(k)) <= 0 else int(float(k))
            started = time.monotonic()
            try:
                styles = self.studio.cluster(k=k, out_png=png, previews=bool(previews))
            except StudioInputError as e:
                return None, str(e), []
            data = styles.to_dict()
            tmp = meta.with_name(f".{meta.name}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, meta)
            status = (f"{len(styles.names)} {styles.family} LoRA(s) in {styles.clusters.k} style cluster(s), "
                      f"silhouette {styles.clusters.silhouette:.3f}, {time.monotonic() - started:.1f}s")
            if styles.skipped:
                status += "; skipped: " + "; ".join(styles.skipped[:10])
        else:
            if not png.is_file():
                n = len(self._names())
                return None, (f"{n} LoRA(s) in the library: press **Cluster** to draw the style map" if n else
                              f"the library {self.library} is empty: add LoRA files (Library tab) to cluster them"), []
            try:
                data = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}
            status = f"the last style map ({len(data.get('loras', []))} LoRAs); press **Cluster** to redraw it"
        with Image.open(png) as im:
            return im.convert("RGB"), status, self._style_rows(data)

    def style_map(self, refresh: bool = True, k=0, previews: bool = False):
        return self.call(self._style_map, bool(refresh), k, bool(previews))

    # ---------------------------------------------------------------- Batch tab
    def _batch(self, file_path, batch_size, progress):
        from studio.batch import JOB_FILE_SUFFIXES, load_jobs, plan_jobs, read_manifest, zip_results

        src = self._input_file(file_path, "job file (.jsonl, .json, .yaml or .yml)")
        if src.suffix.lower() not in JOB_FILE_SUFFIXES:
            raise StudioInputError(f"{src.name}: a job file is .jsonl, .json, .yaml or .yml")
        if src.stat().st_size > self.max_upload_bytes:
            raise StudioInputError(f"{src.name}: the job file is over the upload limit")
        data = src.read_bytes()
        if self._outside():  # the jobs may name a LoRA that links out of the library: check them first
            units = plan_jobs(self.studio, load_jobs(src), int(batch_size))
            self._check_usable({ref["name"] for u in units for ref in u.plan.get("loras", [])})
        digest = hashlib.sha256(data + f"|bs={int(batch_size)}".encode()).hexdigest()[:12]
        folder = self.out / "batch" / digest  # the same file again resumes into the same folder

        def on_progress(done, total):
            progress((done, total), desc="batch", unit="images")

        report = self.studio.generate_batch(src, out=folder, batch_size=int(batch_size), progress=False,
                                            on_progress=on_progress)
        archive = zip_results(folder, self.out / "batch" / f"{digest}.zip")
        rows = read_manifest(folder)
        gallery = [(str(folder / r["file"]), f"{r['job']} seed {r['seed']}") for r in rows[-48:]
                   if (folder / r["file"]).is_file()]
        return str(archive), str(report).replace(str(folder.resolve()), f"batch/{digest}"), gallery

    def batch(self, file_path, batch_size=1, progress=gr.Progress()):
        return self.call(self._batch, file_path, batch_size, progress)

    # ---------------------------------------------------------------- layout
    def build(self) -> gr.Blocks:
        method_choices = ["auto"] + methods()
        # The LoRA dropdowns start with the library's names: Gradio checks a dropdown's input against the choices
        # of the caller's session, and an API client (gradio_client) fires no page-load event, so with empty
        # initial choices its /add_lora and /inspect would refuse every LoRA until it called /library or /rescan.
        # The page load, /rescan and /upload still refresh them per session. Only read when the Studio is loaded
        # (`warm_up`, as `main` does): laying out the page never loads a model.
        lora_choices = self.call(self._names) if self._studio is not None else []
        with gr.Blocks(title="LoRA Studio", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
            gr.Markdown("## LoRA Studio\nCompose LoRAs on "
                        f"**{self.model.name if self.model else 'TinyWorld'}**; library `{self.library}`.")
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", value="a red star on a black background", lines=2,
                                            elem_id="prompt")
                        negative = gr.Textbox(label="Negative prompt", value="")
                        with gr.Row():
                            k = gr.Slider(1, 5, value=3, step=1, label="LoRAs to pick")
                            pick = gr.Button("Pick LoRAs for this prompt", elem_id="pick")
                        why = gr.Markdown()
                        rows = gr.Dataframe(headers=LORA_HEADERS, datatype=["str", "number", "str", "number", "number"],
                                            value=[], type="array", interactive=True, label="LoRAs (edit the rows)",
                                            elem_id="loras")
                        gr.Markdown("Block presets: " + ", ".join(f"`{p}`" for p in presets()) +
                                    ". Start / stop: 1-indexed steps, or a fraction of the run in (0, 1).")
                        with gr.Row():
                            add_name = gr.Dropdown(label="Library LoRA", choices=lora_choices, value=None,
                                                   allow_custom_value=False)
                            add = gr.Button("Add")
                            remove = gr.Button("Remove")
                        with gr.Row():
                            method = gr.Dropdown(method_choices, value="auto", label="Fusion method", elem_id="method")
                            params = gr.Textbox(label="Method parameters (JSON)", value="", placeholder='{"tau": 5}')
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, label="Seed")
                            n = gr.Slider(1, 16, value=4, step=1, label="Images", elem_id="images")
                            steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="steps")
                            cfg = gr.Slider(0, 20, value=7, step=0.5, label="CFG")
                        with gr.Row():
                            auto_pick = gr.Checkbox(value=True, label="Auto-pick LoRAs when the table is empty")
                            heatmap = gr.Checkbox(value=True, label="LoRA weight heatmap (layers x steps)")
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Column(scale=3):
                        gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png",
                                             elem_id="gallery")
                        status = gr.Markdown(elem_id="status")
                        selected = gr.JSON(label="Recipe of the selected image")
                        selected_index = gr.Number(value=None, precision=0, visible=False)  # API: which image
                        heat = gr.Image(label="LoRA weights: layers x steps", type="pil", format="png", interactive=False)
                        recipes = gr.JSON(label="Recipes (all images)")
            with gr.Tab("Library"):
                with gr.Row():
                    query = gr.Textbox(label="Search the library", placeholder="a ghost, striped style, ...")
                    kk = gr.Slider(1, 50, value=10, step=1, label="Results")
                    find = gr.Button("Search")
                hits = gr.Dataframe(headers=SEARCH_HEADERS, type="array", interactive=False, label="Matches")
                lib_rows = gr.Dataframe(headers=LIBRARY_HEADERS, type="array", interactive=False,
                                        label="All LoRAs (quarantined files with the reason and the fix)")
                refresh_lib = gr.Button("Rescan")
                with gr.Row():
                    with gr.Column():
                        which = gr.Dropdown(label="LoRA", choices=lora_choices, value=None)
                        show = gr.Button("Inspect")
                        preview = gr.Image(label="Preview", type="pil", interactive=False)
                        triggers = gr.Textbox(label="Trigger words", interactive=False)
                        description = gr.Textbox(label="Description", interactive=False)
                    with gr.Column():
                        report = gr.Code(label="Format report", language=None)
                with gr.Row():
                    upload_file = gr.File(label=f"Upload a LoRA ({', '.join(self.upload_types)}, up to "
                                                f"{self.max_upload_bytes // 2**20} MB)",
                                          file_types=list(self.upload_types), type="filepath")
                    upload_go = gr.Button("Add to library")
                upload_status = gr.Markdown()
            with gr.Tab("Styles"):
                gr.Markdown("LoRAs clustered by style from their weights alone (`Studio.cluster`, like "
                            "`studio cluster`); each point is a LoRA, framed in its cluster's colour.")
                with gr.Row():
                    style_k = gr.Number(value=0, precision=0, minimum=0, label="Clusters (0: automatic)")
                    style_previews = gr.Checkbox(value=False, label="Render missing thumbnails (cached)")
                    recluster = gr.Checkbox(value=True, visible=False)
                    style_refresh = gr.Button("Cluster the library", variant="primary")
                style_status = gr.Markdown()
                style_rows = gr.Dataframe(headers=STYLE_HEADERS, type="array", interactive=False, label="Clusters")
                style_img = gr.Image(label="Style map", type="pil", format="png", interactive=False)
            with gr.Tab("Batch"):
                gr.Markdown("A job file: JSONL (one job per line) or YAML / JSON (a list, or `defaults` + `jobs`). "
                            "Each job: `prompt`, `loras` (`auto` or names), `method`, `method_params`, `seeds`, "
                            "`steps`, `cfg`, `id`. Submitting the same file again resumes it.")
                with gr.Row():
                    job_file = gr.File(label="Job file", file_types=list(JOB_TYPES), type="filepath")
                    bs = gr.Number(value=1, precision=0, minimum=1, maximum=64, label="Seeds per pipeline call")
                    run = gr.Button("Run batch", variant="primary")
                batch_status = gr.Markdown()
                archive = gr.File(label="Results (zip of PNGs + manifest.jsonl)", interactive=False)
                batch_gallery = gr.Gallery(label="Latest results", columns=8, height="auto", format="png")

            pick.click(self.retrieve, [prompt, k], [rows, why, prompt], api_name="retrieve")
            add.click(self.add_lora, [prompt, rows, add_name], [rows, prompt], api_name="add_lora")
            remove.click(self.remove_lora, [rows, add_name], [rows], api_name="remove_lora")
            go.click(self.generate, [prompt, rows, method, params, seed, n, steps, cfg, negative, auto_pick, heatmap],
                     [gallery, recipes, heat, status], api_name="generate", concurrency_limit=1)
            gallery.select(self.select_recipe, [recipes, selected_index], [selected], api_name="select_recipe")
            demo.load(lambda: gr.update(choices=["auto"] + methods()), None, [method], api_name="methods")
            demo.load(self.library_table, None, [lib_rows, add_name, which], api_name="library")
            refresh_lib.click(self.library_table, None, [lib_rows, add_name, which], api_name="rescan")
            find.click(self.search, [query, kk], [hits], api_name="search")
            show.click(self.inspect, [which], [report, triggers, description, preview], api_name="inspect")
            upload_go.click(self.upload, [upload_file], [upload_status, lib_rows, add_name, which, report],
                            api_name="upload")
            demo.load(lambda: self.style_map(False), None, [style_img, style_status, style_rows],
                      api_name="style_map_initial")
            style_refresh.click(self.style_map, [recluster, style_k, style_previews],
                                [style_img, style_status, style_rows], api_name="style_map")
            run.click(self.batch, [job_file, bs], [archive, batch_status, batch_gallery], api_name="batch",
                      concurrency_limit=1)
        demo.queue(default_concurrency_limit=1, max_size=256)
        return demo

    def launch_kwargs(self, host: str = "127.0.0.1", port: int | None = None, auth=None, quiet: bool = False) -> dict:
        """`demo.launch` arguments: bind address, auth, upload limit, and the only folders Gradio may serve."""
        return dict(server_name=host or "127.0.0.1", server_port=port, auth=auth, quiet=quiet, show_error=True,
                    allowed_paths=[str(self.library), str(self.out)],
                    blocked_paths=[str(cache_dir(self.library))],
                    max_file_size=self.max_upload_bytes, enable_monitoring=False, share=False)

    def launch(self, host: str = "127.0.0.1", port: int | None = None, auth=None, quiet: bool = False,
               prevent_thread_lock: bool = False) -> gr.Blocks:
        """Build and serve the app (`launch_kwargs`); returns the Blocks (``demo.close()`` stops it)."""
        if host not in LOCAL_HOSTS and not auth:
            print(f"warning: serving on {host} without --auth: anyone who can reach this port can use the app",
                  file=sys.stderr)
        demo = self.build()
        demo.launch(prevent_thread_lock=prevent_thread_lock, **self.launch_kwargs(host, port, auth, quiet))
        return demo


def parse_auth(text: str | None):
    """``USER:PASSWORD`` -> (user, password); None for no login. The password may contain ':'."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise SystemExit("--auth (or $" + AUTH_ENV + ") takes USER:PASSWORD")
    return (user.strip(), password)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="app.py", description="LoRA Studio in the browser (Gradio).")
    ap.add_argument("--model", default=None, help="SD1.5/SDXL diffusers folder or .safetensors (default TinyWorld)")
    ap.add_argument("--library", default=None, help="folder of LoRA files (default assets/loras for TinyWorld)")
    ap.add_argument("--out", default=None, help=f"folder for generated images and batch results (default {DEFAULT_OUT})")
    ap.add_argument("--host", default="127.0.0.1",
                    help="bind address (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--auth", default=None,
                    help=f"USER:PASSWORD required to open the app (default: ${AUTH_ENV} if set, else no login)")
    ap.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda when available)")
    ap.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                    help=f"upload size limit in MB (default {DEFAULT_MAX_UPLOAD_MB})")
    return ap


def main(argv: list[str] | None = None, prevent_thread_lock: bool = False):
    args = parser().parse_args(argv)
    auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV))
    app = StudioApp(model=args.model, library=args.library, out=args.out, device=args.device,
                    max_upload_mb=args.max_upload_mb)
    app.warm_up()
    demo = app.launch(args.host, args.port, auth, prevent_thread_lock=prevent_thread_lock)
    return app, demo


if __name__ == "__main__":
    main()
