"""Switching cost: change the active LoRA set with 1, 10 or 100 LoRAs loaded, against diffusers, in one run.

    python bench/switching.py                 # writes bench/results/switching.json (switching_gpu.json on CUDA)

An SD1.5-shaped UNet (random weights, the shipped SD1.5 config) and 100 random rank-16 LoRAs on every attention
projection (kohya-style coverage of to_q/k/v/out.0). Each switch activates a new set of 3 LoRAs (1 when only 1
is loaded) at new weights.

- studio: the LoRAs sit in a CPU dict (the studio's `LoRACache` holds canonical LoRAs the same way);
  `LoRARuntime.load` registers them once; a switch is `activate(set, Merge(weights))`, and the static weights
  are folded into the base weights during the next UNet call. Reported: `activate_ms` (the call) and
  `switch_ms` = first UNet call after the switch minus a steady call (folding included).
- diffusers unfused: `unet.load_lora_adapter` for every LoRA once (PEFT adapters), a switch is
  `set_adapters(set, weights)`; `switch_ms` measured the same way (PEFT's per-adapter side paths run every call).
- diffusers fused: a switch is `unfuse_lora` + `set_adapters` + `fuse_lora`.
Steady per-call times are reported too: what the chosen set costs on every denoising step afterwards.
The UNet call uses a small latent (8×8 on CPU, 64×64 on GPU) so the switch, not the convolution, dominates.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from fusion import LoRARuntime  # noqa: E402
from fusion.schedules import Merge  # noqa: E402
from studio.library.canonical import LoRA, ModuleLoRA  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def sd15_unet(device, dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(ROOT / "studio" / "configs" / "sd15" / "unet")
    return UNet2DConditionModel.from_config(config).to(device, dtype).eval()


def attention_modules(unet) -> list[tuple[str, torch.nn.Linear]]:
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in TARGETS) \
                and (".attn1." in name or ".attn2." in name):
            out.append((name, module))
    return out


def random_lora(modules, rank: int, seed: int) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    mods = {f"unet.{name}": ModuleLoRA("lora", {"down": torch.randn(rank, m.in_features, generator=g) * 0.02,
                                               "up": torch.randn(m.out_features, rank, generator=g) * 0.02},
                                       alpha=float(rank)) for name, m in modules}
    return LoRA(mods, family="sd15")


def peft_state(lora: LoRA) -> dict[str, torch.Tensor]:
    """The LoRA as a diffusers/PEFT state dict (`unet.<module>.lora_A/B.weight`)."""
    out = {}
    for name, m in lora.modules.items():
        out[f"{name}.lora_A.weight"] = m.factors["down"]
        out[f"{name}.lora_B.weight"] = m.factors["up"]
    return out


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1000


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--loaded", default="1,10,100")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--switches", type=int, default=8)
    ap.add_argument("--latent", type=int, default=None)
    ap.add_argument("--out", default=None, help="default: bench/results/switching.json on the CPU, "
                    "switching_gpu.json on CUDA (both are kept)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.out = args.out or str(ROOT / "bench" / "results" / ("switching_gpu.json" if cuda else "switching.json"))
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    latent = args.latent or (64 if cuda else 8)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loaded_counts = [int(x) for x in args.loaded.split(",")]

    unet = sd15_unet(device, dtype)
    modules = attention_modules(unet)
    loras = {f"l{i}": random_lora(modules, args.rank, i) for i in range(max(loaded_counts))}
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    ctx = torch.randn(2, 77, 768, device=device, dtype=dtype)

    def call():
        with torch.inference_mode():
            unet(x, t, ctx)

    for _ in range(2):
        call()
    base_ms = statistics.median(timed(call, sync) for _ in range(5))
    rows = []
    rng = random.Random(0)

    def sets(n_loaded):
        k = min(3, n_loaded)
        return [(rng.sample([f"l{i}" for i in range(n_loaded)], k), [round(rng.uniform(0.3, 1.0), 2) for _ in range(k)])
                for _ in range(args.switches)]

    # ---- studio runtime
    for n_loaded in loaded_counts:
        rt = LoRARuntime(unet=unet, cfg=True)
        t0 = time.perf_counter()
        for i in range(n_loaded):
            rt.load(f"l{i}", loras[f"l{i}"])
        load_s = time.perf_counter() - t0
        activate, switch, steady = [], [], []
        for names, weights in sets(n_loaded):
            activate.append(timed(lambda: rt.activate(names, Merge(dict(zip(names, weights)))), sync))
            first = timed(call, sync)
            steady_ms = statistics.median(timed(call, sync) for _ in range(2))
            switch.append(activate[-1] + first - steady_ms)
            steady.append(steady_ms)
        rt.remove()
        rows.append({"engine": "studio", "loaded": n_loaded, "load_all_s": round(load_s, 2),
                     "activate_ms": round(statistics.median(activate), 2),
                     "switch_ms": round(statistics.median(switch), 2),
                     "steady_call_ms": round(statistics.median(steady), 2)})
        print(rows[-1])

    # ---- diffusers (PEFT adapters)
    for n_loaded in loaded_counts:
        unet_d = unet
        t0 = time.perf_counter()
        for i in range(n_loaded):
            unet_d.load_lora_adapter(peft_state(loras[f"l{i}"]), adapter_name=f"l{i}", prefix="unet")
        load_s = time.perf_counter() - t0
        for mode in ("unfused", "fused"):
            switch, steady = [], []
            fused = False
            for names, weights in sets(n_loaded):
                def do_switch():
                    nonlocal fused
                    if mode == "fused" and fused:
                        unet_d.unfuse_lora()
                    unet_d.set_adapters(names, weights)
                    if mode == "fused":
                        unet_d.fuse_lora(adapter_names=names)
                        fused = True
                s = timed(do_switch, sync)
                first = timed(call, sync)
                steady_ms = statistics.median(timed(call, sync) for _ in range(2))
                switch.append(s + first - steady_ms)
                steady.append(steady_ms)
            if fused:
                unet_d.unfuse_lora()
            rows.append({"engine": f"diffusers_{mode}", "loaded": n_loaded, "load_all_s": round(load_s, 2),
                         "switch_ms": round(statistics.median(switch), 2),
                         "steady_call_ms": round(statistics.median(steady), 2)})
            print(rows[-1])
        unet_d.delete_adapters([f"l{i}" for i in range(n_loaded)])

    by = {(r["engine"], r["loaded"]): r for r in rows}
    for r in rows:
        d = by.get(("diffusers_unfused", r["loaded"]))
        if d and r["engine"] == "studio":
            r["switch_vs_diffusers_unfused"] = round(r["switch_ms"] / max(d["switch_ms"], 1e-6), 3)
            r["steady_vs_diffusers_unfused"] = round(r["steady_call_ms"] / d["steady_call_ms"], 3)
    result = {"machine": machine(), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "unet": "sd15 (random weights)", "rank": args.rank, "latent": latent, "dtype": str(dtype),
              "base_call_ms": round(base_ms, 2), "rows": rows,
              "target": "switch <= 20 ms at SD1.5 size on GPU, flat in the number loaded"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
