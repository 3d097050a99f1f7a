#!/usr/bin/env bash
# The class-conditional path on real data: sagan-cond-mnist32 trained on full MNIST, exported,
# sampled one class per row with sagan-infer, and scored by sagan-eval: FID and the class
# accuracy (how often the built-in MNIST classifier reads the digit each image was asked for).
#
#   tools/experiment-conditional.sh [STEPS] [SEED]
#
# Writes runs/experiment-conditional and, in tools/experiments/conditional-mnist/, the results
# (results.md), the sagan-infer grid (row r = digit r), the attention maps and the curves.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=${1:-2400}
seed=${2:-1}
data=data/mnist
out=runs/experiment-conditional
results=tools/experiments/conditional-mnist

[ -f "$data/train-images-idx3-ubyte.gz" ] || tools/fetch-mnist.sh "$data"
[ -e .onnxruntime/cpu/lib/libonnxruntime.so ] || tools/install-onnxruntime.sh cpu
cargo build --release --bins
rm -rf "$out"
mkdir -p "$out" "$results"

RUST_LOG=warn ./target/release/sagan-train --preset sagan-cond-mnist32 --data "$data" \
    --steps "$steps" --seed "$seed" --eval-every 200 --eval-count 2000 --sample-every 200 \
    --checkpoint-every 200 --out "$out/run"
./target/release/sagan-export "$out/cond.onnx" --checkpoint "$out/run" --attention-maps
./target/release/sagan-infer --model "$out/cond.onnx" --count 80 --columns 8 --out "$out/samples"
./target/release/sagan-eval --model "$out/cond.onnx" --data "$data" --count 5000 --json "$out/eval.json"

cp "$out/samples/seed0-grid.png" "$results/grid-by-class.png"
cp "$out/samples/seed0-attention0.png" "$results/attention.png"
cp "$out/run/curves.png" "$results/curves.png"
python3 - "$out" "$results" "$steps" "$seed" <<'PY'
import json, sys, time
out, results, steps, seed = sys.argv[1:]
report = json.load(open(f"{out}/eval.json"))
fids = [json.loads(l) for l in open(f"{out}/run/metrics.jsonl")]
fids = [(r["step"], r["fid"]) for r in fids if r.get("fid") is not None]
lines = [
    f"sagan-cond-mnist32 on full MNIST, batch 64, {steps} steps, seed {seed}; "
    f"{time.strftime('%Y-%m-%d')}.",
    "",
    "| step | FID (2000 EMA samples, during training) |",
    "|---|---|",
    *[f"| {s} | {f:.2f} |" for s, f in fids],
    "",
    f"Final export, {report['n']} images (classes in turn) against {report['n_real']} real digits:",
    f"FID {report['fid']:.2f}, IS {report['is_mean']:.3f}, "
    f"class accuracy {100 * report['class_accuracy']:.2f}%.",
]
open(f"{results}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
