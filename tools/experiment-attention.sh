#!/usr/bin/env bash
# SAGAN against its no-attention baseline on full MNIST: sagan-mnist28 and dcgan-mnist28 with the
# same seed, data order and step budget, FID (built-in MNIST classifier, 2000 images) every
# EVAL_EVERY steps. The two runs share the machine, one thread each.
#
#   tools/experiment-attention.sh [STEPS] [EVAL_EVERY] [SEED]
#
# Writes runs/experiment-attention/{sagan-mnist28,dcgan-mnist28} and, in
# tools/experiments/attention-mnist/, the FID table (results.md), the final sample grids, the
# SAGAN run's attention maps and both runs' curves.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=${1:-700}
eval_every=${2:-100}
seed=${3:-1}
data=data/mnist
out=runs/experiment-attention
results=tools/experiments/attention-mnist

[ -f "$data/train-images-idx3-ubyte.gz" ] || tools/fetch-mnist.sh "$data"
[ -e .onnxruntime/cpu/lib/libonnxruntime.so ] || tools/install-onnxruntime.sh cpu
cargo build --release --bin sagan-train
rm -rf "$out"
mkdir -p "$out" "$results"

for preset in sagan-mnist28 dcgan-mnist28; do
    RUST_LOG=warn ./target/release/sagan-train --preset "$preset" --data "$data" --steps "$steps" \
        --seed "$seed" --threads 1 --eval-every "$eval_every" --eval-count 2000 \
        --sample-every "$steps" --checkpoint-every "$steps" --out "$out/$preset" &
done
wait

python3 - "$out" "$results" "$steps" "$eval_every" "$seed" <<'PY'
import json, shutil, sys, time
out, results, steps, every, seed = sys.argv[1:]
runs = ["sagan-mnist28", "dcgan-mnist28"]
fid = {}
for run in runs:
    with open(f"{out}/{run}/metrics.jsonl") as f:
        fid[run] = {r["step"]: r["fid"] for r in map(json.loads, f) if "fid" in r}
lines = [f"Full MNIST (60k), batch 64, {steps} steps, seed {seed}, FID of 2000 EMA samples against 2000 "
         f"training digits through the built-in MNIST classifier (lower is better); "
         f"{time.strftime('%Y-%m-%d')}, 2-core CPU, one thread per run.", "",
         "| step | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
for step in sorted(set().union(*[set(v) for v in fid.values()])):
    lines.append(f"| {step} | " + " | ".join(f"{fid[r].get(step, float('nan')):.2f}" for r in runs) + " |")
best = {r: min(fid[r].values()) for r in runs}
lines += ["", "Best: " + ", ".join(f"{r} {best[r]:.2f}" for r in runs)]
open(f"{results}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
step = f"{int(steps):08d}"
for run in runs:
    shutil.copy(f"{out}/{run}/samples/step-{step}.png", f"{results}/{run}-samples.png")
    shutil.copy(f"{out}/{run}/curves.png", f"{results}/{run}-curves.png")
shutil.copy(f"{out}/sagan-mnist28/samples/attention-g2-step-{step}.png", f"{results}/sagan-mnist28-attention.png")
PY
