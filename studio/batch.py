"""Batch jobs: many prompts × seeds × LoRA sets into one folder of PNGs (each carrying its recipe) and a manifest.

A job is a dict (or a line of a JSONL file, or an item of a YAML / JSON list)::

    {"id": "knight", "prompt": "a knight", "loras": "auto" | ["hero", ["ink", 0.6], {"name": "x", "lbw": "MIDD"}],
     "method": "switch", "method_params": {"tau": 5}, "seeds": [0, 1, 2], "steps": 25, "cfg": 7,
     "negative_prompt": ""}

``seed`` + ``n`` may replace ``seeds`` (seeds seed .. seed+n-1). A YAML / JSON file may also be a mapping
``{"defaults": {...}, "jobs": [...]}`` whose defaults fill every job. ``<lora:...>`` tags in the prompt work as in
`Studio.generate`.

How a run goes (`run_batch`, also `Studio.generate_batch` and ``studio batch JOBFILE --out DIR``):

1. every job is checked and planned first (``loras="auto"`` picks by retrieval; unknown LoRAs, bad methods and
   bad parameters fail before anything runs, naming the job);
2. each job's seeds are cut into fixed chunks of `batch_size` (default 1: one image per pipeline call); a chunk
   is one pipeline call, so an image depends only on its job and its chunk, never on the order of the jobs, on
   how they are grouped, on the engine or on a resume (with ``batch_size=1`` it equals
   ``Studio.generate(prompt, n=1, seed=s)``: bit for bit without LoRAs; with LoRAs up to the fusion runtime's
   float rounding, a level on a few pixels, since its cost model may fold a LoRA into a weight on one call and
   run it low-rank on the next);
3. chunks are grouped by LoRA set (fewest LoRA switches) and run locally, or fanned out over Ray actors
   (``engine="ray"``: one per GPU, else `workers` CPU actors), whole groups per actor;
4. each finished image is written as ``<job id>-seed<seed>.png`` (temporary file, then an atomic rename) and then
   one line is appended to ``manifest.jsonl`` (one ``write`` on an ``O_APPEND`` file, then fsync). An image
   counts as done when its manifest line exists and its PNG is there, so running the same jobs into the same
   folder again skips what is finished: an interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .api import StudioInputError, validate_request

MANIFEST = "manifest.jsonl"
LOCK = ".batch.lock"
MAX_SEEDS_PER_JOB = 100_000
JOB_FILE_SUFFIXES = (".jsonl", ".json", ".yaml", ".yml")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELDS = {"id", "prompt", "loras", "method", "method_params", "seeds", "seed", "n", "steps", "cfg",
           "negative_prompt"}
_ALIASES = {"params": "method_params", "negative": "negative_prompt"}


class BatchJobError(StudioInputError):
    """A job (or job file) that cannot run; the message names the job and what to change."""


@dataclass
class Job:
    prompt: str
    loras: Any = None
    method: str | None = None
    method_params: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 25
    cfg: float = 7.0
    negative_prompt: str = ""
    id: str = ""


@dataclass
class Unit:
    """One pipeline call: consecutive seeds (a fixed chunk) of one job."""

    job: str
    job_index: int
    group: str
    prompt: str
    negative_prompt: str
    plan: dict
    steps: int
    cfg: float
    seeds: list[int]
    keys: list[str]
    files: list[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class BatchReport:
    out: Path
    engine: str
    jobs: int
    groups: int
    images: int
    generated: int
    skipped: int
    seconds: float
    files: list[Path] = field(default_factory=list)

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST

    def __str__(self) -> str:
        return (f"{self.images} image(s) of {self.jobs} job(s) in {self.groups} LoRA group(s): {self.generated} "
                f"generated, {self.skipped} already done, {self.seconds:.1f}s ({self.engine}); "
                f"{self.out.resolve()}/{MANIFEST}")


# ----------------------------------------------------------------------------------------------- job files
def read_job_file(path: str | Path) -> list[dict]:
    """The job dicts of a JSONL, JSON or YAML file (a list, or {"defaults": {...}, "jobs": [...]})."""
    path = Path(path)
    if path.suffix.lower() not in JOB_FILE_SUFFIXES:
        raise BatchJobError(f"{path.name}: a job file is .jsonl, .json, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BatchJobError(f"{path}: cannot read the job file ({e})") from None
    if path.suffix.lower() == ".jsonl":
        jobs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                jobs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BatchJobError(f"{path.name} line {i}: not JSON ({e.msg}); write one job object per line") from None
        return jobs
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise BatchJobError(f"{path.name}: cannot parse the job file ({e})") from None
    if isinstance(data, dict) and "jobs" in data:
        unknown = set(data) - {"jobs", "defaults"}
        if unknown:
            raise BatchJobError(f"{path.name}: unknown top-level key(s) {sorted(unknown)}; use 'jobs' and 'defaults'")
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict) or not isinstance(data["jobs"], list):
            raise BatchJobError(f"{path.name}: 'defaults' is a mapping and 'jobs' a list")
        return [{**defaults, **j} if isinstance(j, dict) else j for j in data["jobs"]]
    if not isinstance(data, list):
        raise BatchJobError(f"{path.name}: expected a list of jobs or a mapping with 'jobs'")
    return data


def load_jobs(source: str | Path | Iterable) -> list[Job]:
    """Jobs from a job file path or a list of dicts (or `Job`s), checked; ids default to ``job0000``, ..."""
    raw = read_job_file(source) if isinstance(source, (str, Path)) else list(source)
    if not raw:
        raise BatchJobError("no jobs: give at least one job with a 'prompt'")
    jobs = [j if isinstance(j, Job) else job_from_dict(j, i) for i, j in enumerate(raw)]
    seen = {}
    for i, job in enumerate(jobs):
        if not job.id:
            job.id = f"job{i:04d}"
        if job.id in seen:
            raise BatchJobError(f"job {i}: id {job.id!r} is already used by job {seen[job.id]}; ids must be unique")
        seen[job.id] = i
    return jobs


def job_from_dict(data: dict, index: int = 0) -> Job:
    where = f"job {index}" + (f" ({data.get('id')!r})" if isinstance(data, dict) and data.get("id") else "")
    if not isinstance(data, dict):
        raise BatchJobError(f"{where}: a job is a mapping with at least a 'prompt', got {type(data).__name__}")
    data = {_ALIASES.get(k, k): v for k, v in data.items()}
    unknown = set(data) - _FIELDS
    if unknown:
        raise BatchJobError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise BatchJobError(f"{where}: 'prompt' must be a string")
    job = Job(prompt=prompt)
    if "id" in data:
        job.id = str(data["id"])
        if not _ID.match(job.id):
            raise BatchJobError(f"{where}: id {job.id!r}: use 1-64 letters, digits, '_', '-' or '.' (it names the files)")
    try:
        job.steps = int(data.get("steps", job.steps))
        job.cfg = float(data.get("cfg", job.cfg))
    except (TypeError, ValueError):
        raise BatchJobError(f"{where}: 'steps' is an integer and 'cfg' a number") from None
    job.negative_prompt = data.get("negative_prompt", "") or ""
    if not isinstance(job.negative_prompt, str):
        raise BatchJobError(f"{where}: 'negative_prompt' must be a string")
    try:
        validate_request(job.prompt, 1, job.steps, job.cfg)
    except StudioInputError as e:
        raise BatchJobError(f"{where}: {e}") from None
    if "seeds" in data and ("seed" in data or "n" in data):
        raise BatchJobError(f"{where}: give 'seeds' (a list) or 'seed' + 'n', not both")
    try:
        if "seeds" in data:
            seeds = data["seeds"]
            if isinstance(seeds, (int, str)) or not isinstance(seeds, Sequence):
                raise TypeError
            job.seeds = [_int(s) for s in seeds]
        else:
            seed, n = _int(data.get("seed", 0)), _int(data.get("n", 1))
            if n < 1:
                raise BatchJobError(f"{where}: n={n} must be >= 1")
            job.seeds = list(range(seed, seed + n))
    except (TypeError, ValueError):
        raise BatchJobError(f"{where}: 'seeds' is a list of integers (or 'seed' and 'n' integers)") from None
    if not job.seeds or len(job.seeds) > MAX_SEEDS_PER_JOB:
        raise BatchJobError(f"{where}: {len(job.seeds)} seeds; give 1..{MAX_SEEDS_PER_JOB}")
    if len(set(job.seeds)) != len(job.seeds):
        raise BatchJobError(f"{where}: seeds repeat; each seed once per job")
    if any(not 0 <= s < 2**63 for s in job.seeds):
        raise BatchJobError(f"{where}: seeds are integers in 0..2**63-1")
    job.method = data.get("method")
    if job.method is not None and not isinstance(job.method, str):
        raise BatchJobError(f"{where}: 'method' is a method name")
    params = data.get("method_params") or {}
    if not isinstance(params, dict):
        raise BatchJobError(f"{where}: 'method_params' is a mapping, e.g. {{\"tau\": 5}}")
    job.method_params = params
    job.loras = _loras(data.get("loras"), where)
    return job


def _int(value) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)


def _loras(value, where: str):
    from fusion import LoRARef

    if value is None or value == "auto":
        return value
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise BatchJobError(f"{where}: 'loras' is \"auto\" or a list of names, [name, weight] pairs or "
                            "{\"name\": ..., \"weight\": ...} mappings")
    out = []
    for item in value:
        try:
            if isinstance(item, str):
                out.append(LoRARef(item))
            elif isinstance(item, dict):
                out.append(LoRARef.from_dict(item))
            elif isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str):
                out.append(LoRARef(item[0], float(item[1])))
            else:
                raise ValueError(f"cannot read {item!r}")
        except (TypeError, ValueError) as e:
            raise BatchJobError(f"{where}: LoRA {item!r}: {e}") from None
    return out


# ----------------------------------------------------------------------------------------------- planning
def _methods() -> list[str]:
    from fusion.schedules import SCHEDULES

    return list(SCHEDULES)


def plan_jobs(studio, jobs: Sequence[Job], batch_size: int = 1) -> list[Unit]:
    """Check and plan every job; the units (fixed seed chunks), grouped by LoRA set, groups in order of first use."""
    from fusion import build_schedule
    from retrieval.studio import resolve_loras

    if int(batch_size) < 1:
        raise BatchJobError(f"batch_size={batch_size} must be >= 1")
    methods = _methods()
    groups: dict[str, list[Unit]] = {}
    for i, job in enumerate(jobs):
        where = f"job {i} ({job.id!r})"
        if job.method is not None and job.method not in methods:
            raise BatchJobError(f"{where}: unknown method {job.method!r}; use one of {methods}")
        try:
            prompt, loras = job.prompt, job.loras
            if loras == "auto":
                prompts, loras, _ = resolve_loras(studio, [prompt], "auto")
                prompt = prompts[0]
            clean, plan = studio.plan(prompt, loras, job.method, **job.method_params)
            for ref in plan.loras:
                entry = studio.catalog.get(ref.name)
                if entry.family and entry.family not in (studio.family, "unknown"):
                    raise ValueError(f"{entry.path.name} is a {entry.family} LoRA, the model is {studio.family}: "
                                     f"pick a LoRA made for {studio.family}")
            if plan.loras:
                build_schedule(plan)  # checks the method's parameters
            validate_request(clean, 1, job.steps, job.cfg)
        except KeyError as e:
            raise BatchJobError(f"{where}: {e.args[0] if e.args else e} (library: {studio.library})") from None
        except (ValueError, TypeError) as e:
            raise BatchJobError(f"{where}: {e}") from None
        group = "+".join(sorted(plan.names))
        plan_dict = plan.to_dict()
        for start in range(0, len(job.seeds), batch_size):
            chunk = job.seeds[start:start + batch_size]
            keys = [image_key(studio, clean, job.negative_prompt, plan_dict, job.steps, job.cfg, s, chunk)
                    for s in chunk]
            files = [f"{job.id}-seed{s}.png" for s in chunk]
            groups.setdefault(group, []).append(Unit(job.id, i, group, clean, job.negative_prompt, plan_dict,
                                                     job.steps, job.cfg, chunk, keys, files))
    return [u for units in groups.values() for u in units]


def image_key(studio, prompt: str, negative: str, plan: dict, steps: int, cfg: float, seed: int,
              chunk: Sequence[int]) -> str:
    """What an image depends on: model, sampler, prompt, plan, steps, CFG, seed and its pipeline-call chunk."""
    spec = {"model": studio._model_hash, "sampler": studio.sampler, "prompt": prompt, "negative": negative,
            "plan": plan, "steps": int(steps), "cfg": float(cfg), "seed": int(seed), "chunk": [int(s) for s in chunk]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------- running
def generate_unit(studio, unit: dict) -> list[tuple[str, object, dict]]:
    """Run one unit on a Studio: [(key, PIL image, recipe dict)] in seed order."""
    from fusion import Plan

    plan = Plan.from_dict(unit["plan"])
    seeds = unit["seeds"]
    results = studio.generate_many([unit["prompt"]] * len(seeds), seeds, steps=unit["steps"], cfg=unit["cfg"],
                                   negative_prompt=unit["negative_prompt"], batch_size=len(seeds), progress=False,
                                   loras=list(plan.loras), method=plan.method, method_params=dict(plan.params))
    return [(k, r.image, r.recipe.to_dict()) for k, r in zip(unit["keys"], results)]


def read_manifest(out: str | Path) -> list[dict]:
    """The manifest's rows (a torn last line, from a crash mid-write, is ignored)."""
    path = Path(out) / MANIFEST
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "key" in row and "file" in row:
                rows.append(row)
    return rows


def finished_keys(out: str | Path) -> set[str]:
    out = Path(out)
    return {r["key"] for r in read_manifest(out) if (out / r["file"]).is_file()}


class _Writer:
    """Writes finished images: PNG via temporary file + rename, then one appended, fsynced manifest line."""

    def __init__(self, out: Path):
        from .recipe import Recipe, save_png

        self.out, self._Recipe, self._save_png = out, Recipe, save_png
        path = out / MANIFEST
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a torn last line: start ours on a fresh one
                    os.write(self.fd, b"\n")

    def write(self, unit: Unit, key: str, image, recipe: dict) -> Path:
        i = unit.keys.index(key)
        path = self.out / unit.files[i]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._save_png(image, tmp, self._Recipe.from_dict(recipe))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        row = {"key": key, "file": path.name, "job": unit.job, "job_index": unit.job_index, "seed": unit.seeds[i],
               "group": unit.group, "finished_at": round(time.time(), 3), "recipe": recipe}
        os.write(self.fd, (json.dumps(row) + "\n").encode())
        os.fsync(self.fd)
        return path

    def close(self) -> None:
        os.close(self.fd)


class _Lock:
    """An exclusive lock on the output folder, so two runs never write one manifest."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.f = None

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            self.f.close()
            raise BatchJobError(f"{self.path.parent}: another batch run is writing to this folder; wait for it, "
                                "or use another --out") from None
        return self

    def __exit__(self, *exc):
        self.f.close()


def run_batch(studio, jobs, out: str | Path, engine: str = "local", workers: int | None = None,
              batch_size: int = 1, progress: bool = True,
              on_progress: Callable[[int, int], None] | None = None) -> BatchReport:
    """Plan, skip what the folder's manifest says is finished, run the rest (locally or on Ray); see the module."""
    from tqdm import tqdm

    if engine not in ("local", "ray"):
        raise BatchJobError(f"engine={engine!r}: use 'local' or 'ray'")
    started = time.monotonic()
    job_list = load_jobs(jobs)
    units = plan_jobs(studio, job_list, batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(u.seeds) for u in units)
    with _Lock(out):
        done = finished_keys(out)
        todo = [u for u in units if not all(k in done for k in u.keys)]
        skipped = sum(k in done for u in units for k in u.keys)
        writer = _Writer(out)
        bar = tqdm(total=total, initial=skipped, desc="batch", unit="img", disable=not progress)
        count = [skipped, 0]
        if on_progress is not None:
            on_progress(skipped, total)

        def finished(unit: Unit, results) -> None:
            for key, image, recipe in results:
                if key in done:
                    continue  # a resumed chunk: this image was already written
                writer.write(unit, key, image, recipe)
                done.add(key)
                count[0] += 1
                count[1] += 1
                bar.update(1)
                if on_progress is not None:
                    on_progress(count[0], total)

        try:
            if engine == "local":
                for unit in todo:
                    finished(unit, generate_unit(studio, unit.to_dict()))
            else:
                _run_ray(studio, todo, workers, finished)
        finally:
            bar.close()
            writer.close()
    files = [out / f for u in units for f in u.files]
    return BatchReport(out=out, engine=engine, jobs=len(job_list), groups=len({u.group for u in units}),
                       images=total, generated=count[1], skipped=skipped, seconds=time.monotonic() - started,
                       files=files)


# ----------------------------------------------------------------------------------------------- Ray
class _RayWorker:
    """A Ray actor holding one Studio (one pipeline) and running units on it."""

    def __init__(self, model: str, device: str | None, sampler: str, library: str | None, threads: int | None):
        root = str(Path(__file__).resolve().parents[1])
        if root not in sys.path:  # the repository's packages, whatever the worker's working directory
            sys.path.insert(0, root)
        import torch

        if threads:
            torch.set_num_threads(threads)
        from studio.api import Studio

        self.studio = Studio(model=model, device=device, sampler=sampler, library=library)

    def run(self, unit: dict):
        return generate_unit(self.studio, unit)


def _ray():
    try:
        import ray
    except ImportError:
        raise BatchJobError("engine='ray' needs Ray: pip install ray (or use engine='local')") from None
    return ray


def assign_groups(units: Sequence[Unit], n_workers: int) -> list[list[Unit]]:
    """Whole LoRA groups per worker, largest first onto the least loaded worker; units keep their order."""
    groups: dict[str, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.group, []).append(u)
    loads = [0] * n_workers
    queues: list[list[Unit]] = [[] for _ in range(n_workers)]
    for name, us in sorted(groups.items(), key=lambda kv: -sum(len(u.seeds) for u in kv[1])):
        w = loads.index(min(loads))
        queues[w].extend(us)
        loads[w] += sum(len(u.seeds) * u.steps for u in us)
    return queues


def _run_ray(studio, units: list[Unit], workers: int | None, finished) -> None:
    if not units:
        return
    ray = _ray()
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    n_groups = len({u.group for u in units})
    if gpus:
        n = min(workers or gpus, gpus, n_groups)
        options = {"num_gpus": 1, "num_cpus": 1}
        device, threads = None, None
    else:
        n = min(workers or max(1, int(resources.get("CPU", 1))), n_groups)
        options = {"num_cpus": 1}
        device, threads = "cpu", 1
    actor = ray.remote(_RayWorker).options(**options)
    library = str(studio.library) if studio.library else None
    actors = [actor.remote(str(studio.model_path), device, studio.sampler, library, threads) for _ in range(n)]
    queues = [deque(q) for q in assign_groups(units, n)]
    pending = {}

    def submit(w: int) -> None:
        if queues[w]:
            unit = queues[w].popleft()
            pending[actors[w].run.remote(unit.to_dict())] = (w, unit)

    try:
        for w in range(n):
            submit(w)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            w, unit = pending.pop(ready[0])
            finished(unit, ray.get(ready[0]))
            submit(w)
    finally:
        for a in actors:
            ray.kill(a)


# ----------------------------------------------------------------------------------------------- results
def zip_results(out: str | Path, zip_path: str | Path | None = None) -> Path:
    """A zip of the folder's PNGs and manifest (for download)."""
    out = Path(out)
    zip_path = Path(zip_path) if zip_path else out.with_suffix(".zip")
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in sorted(out.iterdir()):
            if f.is_file() and not f.name.startswith(".") and (f.suffix == ".png" or f.name == MANIFEST):
                z.write(f, f.name)
    os.replace(tmp, zip_path)
    return zip_path
