"""Speed of one denoising step with several LoRAs: the fusion runtime vs the base UNet and vs diffusers/PEFT.

SD1.5- and SDXL-shaped UNets with random weights (``UNet2DConditionModel.from_config`` on the shipped configs in
`studio/configs`, seeded), random rank-r LoRAs (1, 3, 5 of them) on the attention projections
(``attn1``/``attn2`` ``to_q``/``to_k``/``to_v``/``to_out.0``; ``--targets kohya`` adds ``proj_in``/``proj_out`` and
the feed-forward, i.e. every Linear/Conv2d of the transformer blocks, as a kohya LoRA has). One "step" is one UNet
call with CFG batch 2 (uncond + cond), under ``torch.inference_mode``; the step index advances every call (so
per-step schedules really change). Each LoRA set (targets, rank, N) is timed in ``--rounds`` interleaved rounds:
a round loads the LoRAs for each contender in turn (PEFT adapters, then our runtime) and times one step of every
method after ``--warmup`` untimed steps (default 0 on CPU, 2 on GPU; `static` runs first and always gets one more:
it folds its weights then, once per run, and our layers learn their token counts for the cost model); the steps
that follow are what every step of a run costs (per-step and per-branch schedules re-plan or hit their cache each
step, as in a run). A method's time is its median over the rounds, so the slow drift of a shared machine hits
every method alike. On CPU the clock is the process's user CPU time (single-threaded by default: other jobs on the machine then do not count, nor does the kernel's
page-fault handling, see `CPU_CLOCK`; system time, page faults and wall-clock are kept per step); on GPU
wall-clock after ``cuda.synchronize``.

Methods (the same LoRAs, the same weights, in the same run):

- ``base``: the UNet without LoRAs;
- ``diffusers_unfused``: PEFT adapters (``unet.load_lora_adapter``) + ``set_adapters(names, weights)``, unfused;
- ``diffusers_fused``: the same after ``unet.fuse_lora(adapter_names=names)``;
- ``static``: our runtime, `Merge` (static weights: folded once, then the base cost);
- ``per_layer_step``: our runtime, a schedule whose weight changes every step for every LoRA at every layer
  (as gated fusion / K-LoRA produce); both CFG halves share it;
- ``per_branch``: our runtime, block weights with ``uncond_scale=0`` (the LoRAs only in the cond half: the
  per-sample low-rank path);
- ``composite``: our runtime, `Composite` (uncond without LoRAs + one cond pass per LoRA, batched in one call:
  ``1 + N`` rows instead of 2; `ratio_to_n_base` compares it with N separate CFG steps, the reference's cost);
- ``switch``: our runtime, `Switch` with ``tau=1`` (the worst case: a different LoRA every step; with tau=k
  only every k-th step pays the switch, the others cost the static step);
- ``cmlora``: our runtime, `CMLoRA` with its defaults (full steps, Composite's 1+N rows, on 5 of 20 steps; one
  row on the others, the rest from its cache). Its cost changes from step to step, so its timed call is a whole
  run of `RUN_STEPS` steps (steps 0..19 of 20, the cache filled and reused as in a real run) and its ms/step is
  that run's time over `RUN_STEPS`; ``ratio_to_composite`` is the speed-up the issue asks about, measured here
  at SD1.5 / SDXL size rather than on TinyWorld's tiny UNet (where per-call overhead, not rows, sets the time).

Ratios per row, to the same block's rows: ``ratio_to_base``, ``ratio_to_diffusers_unfused`` and
``ratio_to_diffusers_fused`` (the same LoRAs and weights). ``rel_diff_to_diffusers_unfused`` checks that `static`
and ``diffusers_fused`` compute what diffusers' unfused adapters compute (max abs difference / max abs output).

    python bench/speed.py                       # CPU defaults (1 thread, small latents); bench/results/speed.{json,md}
    python bench/speed.py --device cuda         # GPU defaults: fp16, SD1.5 latents 64, SDXL 128 (CPU rows kept)
    python bench/speed.py --unets sd15 --latent-sd15 8 --ranks 16 --n-loras 1 --targets attn --rounds 1 \
        --out /tmp/speed_smoke.json             # a smoke run
"""
from __future__ import annotations

import argparse
import gc
import os
try:
    import resource
except ImportError:  # not on Windows
    resource = None
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from fusion import BlockWise, CMLoRA, Composite, LoRARef, LoRARuntime, Merge, Schedule, Switch  # noqa: E402
from studio.library.canonical import LoRA, ModuleLoRA, module_shapes  # noqa: E402

CONFIGS = ROOT / "studio" / "configs"
OURS = ("static", "per_layer_step", "per_branch", "composite", "switch", "cmlora")
RUN_STEPS = 20  # cmlora: one timed call is a whole run of this many steps
DIFFUSERS = ("diffusers_unfused", "diffusers_fused")
METHODS = ("base",) + DIFFUSERS + OURS
ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0")


class PerLayerStep(Schedule):
    """A different weight every step for every LoRA at every layer (never 0, so no layer is skipped)."""

    method = "per_layer_step"

    def weights(self, step, n_steps):
        n, layers = len(self.binding.names), len(self.binding.unet_layers)
        phase = step * 0.61 + torch.arange(layers, dtype=torch.float32)[None] * 0.37 + torch.arange(n)[:, None]
        return (self.table(step, n_steps) * (0.75 + 0.25 * torch.sin(phase)))[None]


CPU_CLOCK = ("user CPU time of the process (1 thread): excludes waiting for a core on a shared machine, and the "
             "kernel's page-fault handling (in ms_system with page_faults: here the VM's DAMON reclaimer unmaps pages "
             "of a process that waits long for a core, ~0.6M faults per step for every method); wall-clock in ms_wall")
JEMALLOC_CONF = "retain:true,dirty_decay_ms:600000,muzzy_decay_ms:0,background_thread:false"


def find_jemalloc() -> str | None:
    """A jemalloc shared library: $JEMALLOC, the system's, or the one Ray ships (a dependency of the batch runner)."""
    import glob
    import site

    candidates = [os.environ.get("JEMALLOC", ""), "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2"]
    for d in site.getsitepackages():
        candidates += sorted(glob.glob(os.path.join(d, "ray", "core", "libjemalloc.so*")))
    return next((c for c in candidates if c and os.path.exists(c)), None)


def use_jemalloc(argv) -> str | None:
    """Re-run this script with jemalloc preloaded (freed memory kept for 10 min before it goes back to the OS: on a
    busy machine one round of steps can take minutes of wall-clock); returns
    the library when already running under it, None when none was found (glibc malloc, see `keep_freed_memory`).

    Why: with glibc (even tuned by `keep_freed_memory`), after our runtime's activation every step page-faulted
    ~144k pages for our methods (perf: inside the GEMM kernels, i.e. fresh activation memory) and almost none for
    the base and diffusers steps measured in the same process; ~0.2 s of kernel time per SD1.5 step at latent 8 on
    this VM, an artefact of glibc's heap layout (we did not pin the mechanism down), not of the runtime's work.
    Under jemalloc every method runs on the same warm heap (a few hundred to a few thousand faults per step, unless
    the VM's reclaimer unmaps pages, see `CPU_CLOCK`).
    """
    if os.environ.get("_SPEED_JEMALLOC"):
        return os.environ["_SPEED_JEMALLOC"]
    lib = find_jemalloc()
    if lib is None:
        return None
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [lib, os.environ.get("LD_PRELOAD")])),
               MALLOC_CONF=JEMALLOC_CONF, _SPEED_JEMALLOC=lib)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


def keep_freed_memory() -> str | None:
    """glibc malloc: serve big tensors from the heap (mmap threshold 32 MiB, its maximum) and never give freed
    memory back to the OS. Otherwise every step maps and unmaps its activations afresh; on a VM whose page faults
    are slow (this one: ~465k faults per SD1.5 step, 10x the step's CPU time in wall-clock) that cost, the same
    for every method, would swamp the differences. Returns what was set (None where glibc is not there)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = [libc.mallopt(-3, 32 << 20), libc.mallopt(-1, (1 << 31) - 1), libc.mallopt(-2, 256 << 20)]
    except (OSError, AttributeError):
        return None
    return "glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 2 GiB, M_TOP_PAD 256 MiB" if all(ok) else None


def build_unet(kind: str, device, dtype):
    from diffusers import UNet2DConditionModel

    config = json.loads((CONFIGS / kind / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    return unet.to(device=device, dtype=dtype).eval()


def unet_inputs(unet, kind: str, latent: int, device, dtype, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    kw = dict(device=device, dtype=dtype)
    sample = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(**kw)
    ehs = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(**kw)
    extra = {}
    if kind == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, generator=g).to(**kw),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch).to(**kw),
        }
    return sample, ehs, extra


def targets(unet, which: str) -> dict[str, tuple[int, ...]]:
    """Canonical names and weight shapes of the modules the LoRAs adapt."""
    shapes = module_shapes({"unet": unet})
    if which == "attn":
        return {n: s for n, s in shapes.items() if ".transformer_blocks." in n and n.endswith(ATTENTION)}
    if which == "kohya":
        return {n: s for n, s in shapes.items() if ".attentions." in n and len(s) in (2, 4) and s[2:] in ((), (1, 1))}
    raise ValueError(which)


def random_lora(shapes: dict, rank: int, seed: int) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, shape in shapes.items():
        out, inp, *k = shape
        down = torch.randn(rank, inp, *k, generator=g) / inp ** 0.5
        up = torch.randn(out, rank, *[1] * len(k), generator=g) * (0.2 / rank ** 0.5)
        modules[name] = ModuleLoRA("locon" if k else "lora", {"down": down, "up": up})  # alpha = rank: scale 1
    return LoRA(modules=modules, family="bench")


def peft_state_dict(lora: LoRA) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in lora.modules.items():
        out[f"{name}.lora_A.weight"] = m.factors["down"]
        out[f"{name}.lora_B.weight"] = m.factors["up"]
    return out


def schedule_for(method: str, names: list[str], weights: dict[str, float]) -> Schedule:
    if method == "static":
        return Merge(weights)
    if method == "per_layer_step":
        return PerLayerStep(weights)
    if method == "per_branch":
        return BlockWise(weights, uncond_scale=0.0)
    if method == "composite":
        return Composite(weights)
    if method == "switch":
        return Switch([LoRARef(n, w) for n, w in weights.items()], tau=1)
    if method == "cmlora":
        return CMLoRA(weights)
    raise ValueError(method)


def bench_unet(kind: str, args, device, dtype, rows: list, log, save) -> None:
    """Every (targets, rank, N) block is measured in `args.rounds` interleaved rounds: each round times every
    method once (base, diffusers unfused and fused, ours), so a shared machine's slow drift hits all methods alike;
    a method's time is its median over the rounds, its ratios are to the same block's base and diffusers rows."""
    t0 = time.time()
    unet = build_unet(kind, device, dtype)
    latent = args.latent_sd15 if kind == "sd15" else args.latent_sdxl
    sample, ehs, extra = unet_inputs(unet, kind, latent, device, dtype)
    log(f"[{kind}] built in {time.time() - t0:.0f}s; latents {latent}x{latent}, batch 2")
    n_steps = 1000  # schedules see steps 0..n_steps-1; the step advances every call
    state = {"step": 0}

    def run():
        return unet(sample, 500, encoder_hidden_states=ehs, return_dict=False, **extra)[0]

    def usage() -> tuple[float, float, int]:
        """(user CPU s, system CPU s, minor page faults) of this process so far."""
        if resource is None:
            return time.process_time(), 0.0, 0
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime, r.ru_stime, r.ru_minflt

    def measure(call, warmup: int) -> tuple[float, float, float, int, torch.Tensor]:
        """``(clock s, system CPU s, wall s, page faults, output)`` of one call after `warmup` calls; the step
        advances every call. The clock: user CPU time on CPU (see `CPU_CLOCK`), wall-clock on GPU."""
        for _ in range(warmup):
            call(state["step"])
            state["step"] += 1
        sync = device.type == "cuda"
        if sync:
            torch.cuda.synchronize()
        u0, s0, f0 = usage()
        w0 = time.perf_counter()
        out = call(state["step"])
        if sync:
            torch.cuda.synchronize()
        w1 = time.perf_counter()
        u1, s1, f1 = usage()
        state["step"] += 1
        return (w1 - w0 if sync else u1 - u0), s1 - s0, w1 - w0, f1 - f0, out

    def per_step(result, steps: int):
        """A whole run's measurement as per-step figures (clock, system time, wall and page faults over `steps`)."""
        c, sys_s, w, f, out = result
        return c / steps, sys_s / steps, w / steps, f // steps, out

    methods = [m for m in METHODS if m == "base" or m in args.methods]
    ours = [m for m in OURS if m in methods]
    with torch.inference_mode():
        measure(lambda step: run(), 1)  # the first call of a fresh model (allocator, lazy init)
        for target in args.targets:
            shapes = targets(unet, target)
            # the headline (N=3) first, so that a run cut short has it
            grid = [(r, n) for r in args.ranks for n in sorted(args.n_loras, key=lambda n: (n != 3, n))]
            if target != "attn":
                grid = [(r, n) for r, n in grid if (r, n) in ((16, 3),)]  # kohya: the headline case only
                if kind not in args.kohya_unets:
                    continue
            for rank, n in grid:
                tb = time.time()
                loras = {f"l{i}": random_lora(shapes, rank, seed=100 * rank + i) for i in range(n)}
                weights = {name: 0.8 - 0.1 * i for i, name in enumerate(loras)}
                names = list(loras)
                times = {m: [] for m in methods}
                walls = {m: [] for m in methods}
                page_faults = {m: [] for m in methods}
                sys_times = {m: [] for m in methods}
                info = {m: {} for m in methods}
                outputs = {}

                def keep(method, result):
                    c, sys_s, w, f, out = result
                    times[method].append(c)
                    sys_times[method].append(sys_s)
                    walls[method].append(w)
                    page_faults[method].append(f)
                    outputs[method] = out

                for _ in range(args.rounds):
                    keep("base", measure(lambda step: run(), args.warmup))
                    if set(DIFFUSERS) & set(methods):  # diffusers / PEFT adapters, loaded for this round
                        for name, lora in loras.items():
                            unet.load_lora_adapter(peft_state_dict(lora), prefix="unet", adapter_name=name)
                        unet.set_adapters(names, weights=[weights[x] for x in names])
                        if "diffusers_unfused" in methods:
                            keep("diffusers_unfused", measure(lambda step: run(), args.warmup))
                        if "diffusers_fused" in methods:
                            unet.fuse_lora(adapter_names=names)
                            keep("diffusers_fused", measure(lambda step: run(), args.warmup))
                            unet.unfuse_lora()
                        unet.unload_lora()
                    rt = LoRARuntime(unet=unet, cfg=True)  # ours, attached for this round
                    try:
                        for name, lora in loras.items():
                            rt.load(name, lora)
                        for method in ours:
                            rt.activate(names, schedule_for(method, names, weights))

                            def call(step):
                                rt.set_step(step % n_steps, n_steps)
                                return run()

                            def call_run(step):  # cmlora: a whole run; its cache is cleared when step 0 comes back
                                out = None
                                for s in range(RUN_STEPS):
                                    rt.set_step(s, RUN_STEPS)
                                    out = run()
                                return out

                            # static (first) folds its weights in its warm-up call (once per run); from then on the
                            # layers know their token counts, and each later first step is a steady-state step
                            calls, rows_before = rt.unet_calls, rt.unet_rows
                            if method == "cmlora":
                                keep(method, per_step(measure(call_run, 0), RUN_STEPS))
                            else:
                                keep(method, measure(call, args.warmup + (method == ours[0])))
                            modes = {}  # what the layers did in the last call: off / patched / lowrank:<plan>
                            for layer in rt.layers.values():
                                key = f"{layer.mode}:{layer.plan}" if layer.mode == "lowrank" else layer.mode
                                modes[key] = modes.get(key, 0) + 1
                            info[method] = dict(unet_rows=(rt.unet_rows - rows_before) / max(rt.unet_calls - calls, 1),
                                                layer_modes=modes)
                            rt.deactivate()
                    finally:
                        rt.remove()
                    gc.collect()
                block = {}
                for m in methods:
                    block[m] = dict(device=str(device), unet=kind, latent=latent, batch=2, rank=rank, n_loras=n,
                                    targets=target, modules=len(shapes), method=m,
                                    ms_per_step=round(1000 * statistics.median(times[m]), 2),
                                    ms_rounds=[round(1000 * t, 2) for t in times[m]],
                                    ms_wall=[round(1000 * t, 2) for t in walls[m]],
                                    ms_system=[round(1000 * t, 2) for t in sys_times[m]], page_faults=page_faults[m],
                                    **info[m])
                for m, row in block.items():
                    for ref in ("base",) + DIFFUSERS:
                        if ref in block:
                            row[f"ratio_to_{ref}"] = round(row["ms_per_step"] / block[ref]["ms_per_step"], 3)
                    if m == "cmlora" and "composite" in block:
                        row["ratio_to_composite"] = round(row["ms_per_step"] / block["composite"]["ms_per_step"], 3)
                        row["speedup_vs_composite"] = round(block["composite"]["ms_per_step"] / row["ms_per_step"], 3)
                    if m == "composite":
                        row["ratio_to_n_base"] = round(row["ms_per_step"] / (n * block["base"]["ms_per_step"]), 3)
                # the same weights must give the same output (static = diffusers' set_adapters / fuse_lora)
                ref = outputs.get("diffusers_unfused")
                for m in ("static", "diffusers_fused"):
                    if ref is not None and m in outputs:
                        out = outputs[m]
                        block[m]["rel_diff_to_diffusers_unfused"] = float(
                            (out.float() - ref.float()).abs().max() / ref.float().abs().max())
                rows.extend(block.values())
                log(f"[{kind}] {target} rank {rank} N={n} ({time.time() - tb:.0f}s): " + ", ".join(
                    f"{m} {r['ms_per_step']:.0f} ms (×{r['ratio_to_base']:.2f} base"
                    + (f", ×{r['ratio_to_diffusers_unfused']:.2f} unfused" if "ratio_to_diffusers_unfused" in r else "")
                    + ")" for m, r in block.items()))
                for m in ("static", "diffusers_fused"):
                    if "rel_diff_to_diffusers_unfused" in block.get(m, {}):
                        log(f"[{kind}]   {m} vs diffusers_unfused: max rel diff "
                            f"{block[m]['rel_diff_to_diffusers_unfused']:.1e}")
                del loras, outputs
                gc.collect()
                save(complete=False)
    log(f"[{kind}] done in {time.time() - t0:.0f}s")
    del unet
    gc.collect()


def runs_path(out: Path) -> Path:
    return out.with_name(out.stem + "_runs.json")


def load_results(out: Path) -> tuple[list[dict], dict]:
    """(rows, runs) already in `out` (a list of rows; runs: {device: {machine, settings}} beside it)."""
    if not out.is_file():
        return [], {}
    data = json.loads(out.read_text())
    runs = json.loads(runs_path(out).read_text()) if runs_path(out).is_file() else {}
    return data, runs


def write_results(out: Path, device: str, rows: list[dict], info: dict | None, settings: dict | None) -> None:
    """`out`: every row of every device (a list; this device's rows replace its earlier ones, other devices'
    rows are kept: the CPU and the GPU runs live side by side); `<out>_runs.json`: machine and settings per
    device; `<out>.md`: the tables, a section per device."""
    old_rows, runs = load_results(out)
    all_rows = [r for r in old_rows if r["device"] != device] + list(rows)
    if info is not None:
        runs[device] = {"machine": info, "settings": settings}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(all_rows, indent=1))
    runs_path(out).write_text(json.dumps(runs, indent=1))
    parts = []
    for dev in dict.fromkeys(r["device"] for r in all_rows):
        run = runs.get(dev, {"machine": "?", "settings": {}})
        name = run["machine"].get("gpu", run["machine"].get("cpu")) if isinstance(run["machine"], dict) else "?"
        parts.append(markdown(dict(device=f"{dev} ({name})", machine=run["machine"], settings=run["settings"],
                                   rows=[r for r in all_rows if r["device"] == dev])))
    out.with_suffix(".md").write_text("\n\n".join(parts))


def _ratio(v) -> str:
    return "" if v is None else f"{v:.2f}"


def markdown(report: dict) -> str:
    rows = report["rows"]
    st = report["settings"]
    lines = [f"# Step speed with LoRAs ({report['device']})", "",
             f"Machine: {report['machine']}.  ", f"Settings: {st}.", ""]
    if not st.get("complete", True):
        lines += ["**Incomplete run**: the rows below are the LoRA sets measured before it stopped.", ""]
    lines += [
             "One step = one UNet call with CFG batch 2 (uncond + cond), under `torch.inference_mode`, the step index "
             f"advancing every call. Clock: {st['clock']}. Each LoRA set is timed in {st['rounds']} interleaved "
             f"rounds (every method once per round, after {st['warmup']} untimed steps; static after one more, "
             "its fold); a time is the median over the "
             "rounds. Ratios are to the same LoRA set's rows: the base UNet, and diffusers/PEFT with the same LoRAs "
             "and weights (`set_adapters` unfused, and after `fuse_lora`). Composite runs 1+N rows in one call; "
             "`× N·base` compares it with the N separate CFG steps of the reference implementation. Layer modes: "
             "what our layers did in the timed step (`patched`: weights folded in; `lowrank:<plan>`). "
             "Produced by `bench/speed.py`; numbers are not edited.", ""]
    kinds = list(dict.fromkeys(r["unet"] for r in rows))
    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted(rows, key=lambda r: (kinds.index(r["unet"]), r["targets"] != "attn", r["rank"], r["n_loras"],
                                       order[r["method"]]))
    heads = [r for r in rows if r["method"] != "base" and r["n_loras"] == 3 and r["targets"] == "attn"]
    if heads:
        lines += ["## Headline: 3 LoRAs on the attention projections", "",
                  "| UNet | rank | method | ms/step | × base | × diffusers unfused | × diffusers fused |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for r in heads:
            lines.append(f"| {r['unet']} | {r['rank']} | {r['method']} | {r['ms_per_step']:.0f} | "
                         f"{_ratio(r['ratio_to_base'])} | {_ratio(r.get('ratio_to_diffusers_unfused'))} | "
                         f"{_ratio(r.get('ratio_to_diffusers_fused'))} |")
        lines.append("")
    for kind in kinds:
        ours = [r for r in rows if r["unet"] == kind]  # sorted above
        latent = next(r["latent"] for r in rows if r["unet"] == kind)
        lines += [f"## {kind} (latents {latent}x{latent})", "",
                  "| targets | rank | N | method | ms/step | × base | × diffusers unfused | × diffusers fused | "
                  "layer modes | note |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in ours:
            note = f"{r['ratio_to_n_base']:.2f} × N·base" if "ratio_to_n_base" in r else ""
            if "speedup_vs_composite" in r:
                note = f"{r['speedup_vs_composite']:.2f}x faster than composite (a {RUN_STEPS}-step run, per step)"
            modes = ", ".join(f"{k} {v}" for k, v in sorted(r.get("layer_modes", {}).items()))
            if "rel_diff_to_diffusers_unfused" in r:
                note = f"output vs diffusers unfused: {r['rel_diff_to_diffusers_unfused']:.0e}"
            lines.append(f"| {r['targets']} | {r['rank']} | {r['n_loras']} | {r['method']} | {r['ms_per_step']:.0f} | "
                         f"{_ratio(r['ratio_to_base'])} | {_ratio(r.get('ratio_to_diffusers_unfused'))} | "
                         f"{_ratio(r.get('ratio_to_diffusers_fused'))} | {modes} | {note} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--unets", default="sd15,sdxl")
    ap.add_argument("--latent-sd15", type=int, default=None, help="default: 64 on GPU, 32 on CPU")
    ap.add_argument("--latent-sdxl", type=int, default=None, help="default: 128 on GPU, 24 on CPU")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--n-loras", default="1,3,5")
    ap.add_argument("--targets", default="attn,kohya", help="attn (all rank/N) and kohya (rank 16, N=3 only)")
    ap.add_argument("--kohya-unets", default=None, help="UNets that get the kohya block (default: all on GPU; sd15 "
                    "on CPU, where SDXL's fp32 weights plus the saved originals of every transformer layer would not "
                    "fit in memory)")
    ap.add_argument("--methods", default=",".join(METHODS[1:]))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, torch's on GPU)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each times every method once)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before each timed one (default: 0 on "
                    "CPU, 2 on GPU; static always gets one more)")
    ap.add_argument("--allocator", choices=("auto", "glibc"), default="auto",
                    help="auto: on CPU, re-run under jemalloc (retained memory) when one is found; glibc: as is")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed.json"))
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gpu = device.type == "cuda"
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    malloc = None
    if not gpu and args.allocator == "auto":
        lib = use_jemalloc(sys.argv[1:] if argv is None else argv)  # returns only when already under jemalloc
        if lib is not None:
            malloc = f"jemalloc ({lib}), MALLOC_CONF={JEMALLOC_CONF}"
    if not gpu and malloc is None:
        malloc = keep_freed_memory()
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 0)
    args.latent_sd15 = args.latent_sd15 or (64 if gpu else 32)
    args.latent_sdxl = args.latent_sdxl or (128 if gpu else 24)
    args.ranks = [int(x) for x in args.ranks.split(",")]
    args.n_loras = [int(x) for x in args.n_loras.split(",")]
    args.targets = args.targets.split(",")
    args.kohya_unets = (args.kohya_unets or ("sd15,sdxl" if gpu else "sd15")).split(",")
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; use {METHODS}")
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    t0, c0 = time.time(), time.process_time()
    rows: list[dict] = []
    log = lambda s: print(f"{time.time() - t0:7.0f}s {s}", flush=True)  # noqa: E731
    out = Path(args.out)

    def save(complete: bool) -> None:
        """Write the JSON and the markdown (after every LoRA set, so a cut-off run leaves what it measured)."""
        settings = dict(
            latent_sd15=args.latent_sd15, latent_sdxl=args.latent_sdxl, dtype=str(dtype).removeprefix("torch."),
            batch=2, cfg=True, rounds=args.rounds, warmup=args.warmup, ranks=args.ranks, n_loras=args.n_loras,
            targets=args.targets, kohya_grid="rank 16, N=3 only", kohya_unets=args.kohya_unets, methods=args.methods,
            threads=torch.get_num_threads(), inference_mode=True, malloc=malloc,
            clock=CPU_CLOCK if not gpu else "wall-clock after cuda.synchronize",
            lora_init="randn, alpha=rank (scale 1)", lora_weights="0.8 - 0.1 i for LoRA i",
            wall_seconds=round(time.time() - t0), cpu_seconds=round(time.process_time() - c0), complete=complete)
        info = machine()
        write_results(out, device.type, rows, info, settings)

    for kind in args.unets.split(","):
        bench_unet(kind, args, device, dtype, rows, log, save)
    save(complete=True)
    log(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
