#!/usr/bin/env bash
# The GPU half of the speed benchmarks, in one call of the device tool: step cost per method against the base
# UNet and diffusers/PEFT at SD1.5 and SDXL size (bench/speed.py, fp16), CMLoRA against Composite over whole
# runs, and the switching cost with 1/10/100 LoRAs loaded (bench/switching.py). The result files come back in
# $OUT (8 files: the device's limit); the CPU rows already in speed.json / speed_cmlora.json are kept there,
# switching goes to switching_gpu.json beside the CPU switching.json. Back here: copy them (all but log.txt) into
# bench/results/, run `python bench/summary.py`, commit.
#
# Before the call: the wheels of tools/gpu_rebuild.sh's header in .git-ignored .whl/ (only diffusers is needed
# here), and assets/loras untracked for the call as described there (the tracked tree is ~63 MiB; a call carries
# at most 64 MiB).
# The call: run(command="bash tools/gpu_bench.sh", carry=[".whl"], timeout_s=600)
set -euo pipefail
OUT=${OUT:-/tmp/gpu_bench_out}
source tools/device_env.sh

# each part under its own time limit (the device runs a command 10 minutes at most; speed.py saves after each LoRA set,
# so a part stopped at its limit still leaves what it finished), most targets first
timeout 300 python3 bench/speed.py --device cuda || echo "speed stopped or failed"
cp bench/results/speed.json bench/results/speed.md bench/results/speed_runs.json "$OUT/" || true
timeout 150 python3 bench/switching.py || echo "switching stopped or failed"
cp bench/results/switching_gpu.json "$OUT/" || true
timeout 100 python3 bench/speed.py --device cuda --ranks 16 --n-loras 2,3,4,5 --targets attn \
    --methods composite,cmlora --out bench/results/speed_cmlora.json || echo "speed_cmlora stopped or failed"
cp bench/results/speed_cmlora.json bench/results/speed_cmlora.md bench/results/speed_cmlora_runs.json "$OUT/" || true
