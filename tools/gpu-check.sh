#!/usr/bin/env bash
# The GPU check: every preset, trained a few steps and exported (attention gammas set to 0.8 so
# that attention counts), run on the CPU, CUDA, TensorRT fp32 and TensorRT fp16 providers; one
# Markdown table of max |diff| against the CPU, images/s at batch 1 and 64, TensorRT start-up
# (first run builds the engine, the second loads it from the cache) and GPU memory.
#
# Then training on CUDA (sagan-train --device cuda, a binary built with --features cuda, see
# tools/check-cuda-build.sh): sagan-mnist28, sagan64 and sagan128 for --train-steps steps;
# images/s next to PyTorch eager on the same GPU (tools/torch_sagan.py train --device cuda, with
# --torch PYTHON, a Python that has torch with CUDA; unconditional presets only), the losses of
# the first 3 steps against the same run on the CPU, the peak GPU memory (nvidia-smi), and the
# largest sagan128 batch that trains with plain and with pooled attention.
#
# For a machine with an NVIDIA GPU and driver but no network and no Rust toolchain: its inputs
# are the release binaries and the GPU runtime, as wheels or installed.
#
# Usage: tools/gpu-check.sh [--bin DIR] [--wheels DIR | --runtime DIR] [--presets A,B]
#                           [--providers A,B] [--out FILE] [--only infer|train]
#                           [--train-steps N] [--torch PYTHON]
#   --bin DIR       sagan-train, sagan-export, sagan-infer [default: target/release]; for the
#                   training rows a --features cuda build (target/cuda/release)
#   --wheels DIR    install the GPU runtime from these wheels first (see
#                   tools/install-onnxruntime.sh gpu --list), into .onnxruntime/gpu
#   --runtime DIR   an installed GPU runtime [default: .onnxruntime/gpu]; its CUDA 13 libraries
#                   (nvidia/cu13/lib) also serve sagan-train --device cuda
#   --presets A,B   the presets to check [default: all six]
#   --providers A,B of cpu, cuda, tensorrt-fp32, tensorrt-fp16 [default: all four]
#   --out FILE      also write the table to FILE [default: gpu-check.md]
#   --only WHAT     run only the inference rows (infer) or only the training rows (train)
#   --train-steps N steps of each CUDA training run [default: 300]
#   --torch PYTHON  a Python with torch (CUDA) for the PyTorch column [default: none]
# Needs python3 (standard library only) and, for the memory column, nvidia-smi.
# Exit status: 0 when every provider and training run was within its bound, 1 when a bound failed
# (a provider's max |diff|, the first training steps' losses), 2 when a provider or CUDA training
# could not run (its error is printed under the table) or a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

# Bounds on max |diff| against the CPU provider, over images in [-1, 1]. fp32 providers do the
# same arithmetic in another order (TF32 is turned off): 1e-4. fp16 keeps 11 significant bits,
# a relative step of 4.9e-4 per rounding, through every layer of the generator, and the maximum
# is taken over some 10^5 to 10^6 values: errors of a few 1e-2 are rounding. 5e-2 is 6.4 steps
# of the 8-bit PNG output (2/255 each): above it fp16 would change pictures visibly.
fp32_bound=1e-4
fp16_bound=5e-2
all_presets="sagan-mnist28,dcgan-mnist28,sagan64,dcgan64,sagan-cond-mnist32,sagan128"

bin=target/release
wheels=""
runtime=.onnxruntime/gpu
presets="$all_presets"
providers="cpu,cuda,tensorrt-fp32,tensorrt-fp16"
out=gpu-check.md
only=""
train_steps=300
torch_python=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) bin="${2:?--bin needs a folder}"; shift ;;
        --wheels) wheels="${2:?--wheels needs a folder}"; shift ;;
        --runtime) runtime="${2:?--runtime needs a folder}"; shift ;;
        --presets) presets="${2:?--presets needs a list}"; shift ;;
        --out) out="${2:?--out needs a file}"; shift ;;
        --providers) providers="${2:?--providers needs a list}"; shift ;;
        --only) only="${2:?--only needs infer or train}"; shift ;;
        --train-steps) train_steps="${2:?--train-steps needs a number}"; shift ;;
        --torch) torch_python="${2:?--torch needs a python}"; shift ;;
        -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "error: $*" >&2; exit 2; }
case "$only" in
    "" | infer | train) ;;
    *) die "--only: '$only' is neither infer nor train" ;;
esac
[[ "$train_steps" =~ ^[1-9][0-9]*$ ]] || die "--train-steps: '$train_steps' is not a positive number"
needed=(sagan-train sagan-export sagan-infer)
[[ $only == train ]] && needed=(sagan-train)
for b in "${needed[@]}"; do
    [[ -x "$bin/$b" ]] || die "$bin/$b not found (--bin DIR: the release binaries)"
done
command -v python3 >/dev/null || die "python3 is needed (to set the attention gammas)"

started=$(date +%s)
if [[ -n "$wheels" ]]; then
    extra=()
    compgen -G "$wheels/tensorrt_cu13_libs-*.whl" >/dev/null || extra=(--no-tensorrt)
    tools/install-onnxruntime.sh gpu --from "$wheels" "${extra[@]}" >/dev/null || die "installing the GPU runtime from $wheels failed"
    runtime=.onnxruntime/gpu
fi
# sagan-train --device cuda loads CUDA 13's cuBLAS and cuRAND at run time: the GPU runtime's copies.
if [[ -d "$runtime/nvidia/cu13/lib" ]]; then
    export LD_LIBRARY_PATH
    LD_LIBRARY_PATH="$(cd "$runtime/nvidia/cu13/lib" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [[ $only != train ]]; then
    [[ -s "$runtime/lib/libonnxruntime.so" ]] || die "$runtime has no lib/libonnxruntime.so (--runtime DIR or --wheels DIR)"
    export ORT_DYLIB_PATH
    ORT_DYLIB_PATH="$(cd "$runtime" && pwd)/lib/libonnxruntime.so"
fi
export RUST_LOG=error

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
smi=0
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && smi=1

ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

# Runs a command; its output is in $work/last.out. With $smi, the process's peak GPU memory
# (MiB, nvidia-smi) is left in $peak.
peak="-"
measured() {
    peak="-"
    "$@" >"$work/last.out" 2>&1 &
    local pid=$! top=0 m
    if [[ $smi == 1 ]]; then
        while kill -0 "$pid" 2>/dev/null; do
            m="$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
                awk -F', *' -v p="$pid" '$1 == p {print $2}')"
            [[ -n "$m" && "$m" -gt "$top" ]] && top="$m"
            sleep 0.1
        done
        [[ $top -gt 0 ]] && peak="$top MiB"
    fi
    wait "$pid"
}
infer() { measured "$bin/sagan-infer" "$@"; }
images_per_s() { tail -n 1 "$work/last.out" | awk '{print $NF}'; }

# Provider configurations: name, flags, bound.
IFS=, read -r -a configs <<<"$providers"
declare -A flags=(
    [cpu]="--provider cpu"
    [cuda]="--provider cuda"
    [tensorrt-fp32]="--provider tensorrt --trt-batch 1,64,64 --trt-cache $work/trt-fp32"
    [tensorrt-fp16]="--provider tensorrt --trt-batch 1,64,64 --trt-cache $work/trt-fp16 --trt-fp16"
)
declare -A bound=([cuda]=$fp32_bound [tensorrt-fp32]=$fp32_bound [tensorrt-fp16]=$fp16_bound)
declare -A unavailable=()
for config in "${configs[@]}"; do
    [[ -n "${flags[$config]:-}" ]] || die "--providers: unknown '$config' (cpu, cuda, tensorrt-fp32, tensorrt-fp16)"
done

rows=()
parity_failed=0
preset_list=()
[[ $only != train ]] && IFS=, read -r -a preset_list <<<"$presets"
for preset in "${preset_list[@]}"; do
    echo "== $preset" >&2
    dir="$work/$preset"
    mkdir -p "$dir"
    "$bin/sagan-train" --preset "$preset" --steps 2 --batch-size 2 --sample-every 0 --checkpoint-every 0 \
        --out "$dir/run" >"$dir.train.log" 2>&1 || die "sagan-train --preset $preset failed: $(tail -n 3 "$dir.train.log")"
    step="$(find "$dir/run/checkpoints" -mindepth 1 -maxdepth 1 -type d | sort | tail -n 1)"
    ckpt="$step/generator_ema.safetensors"
    [[ -f "$ckpt" ]] || ckpt="$step/generator.safetensors"
    python3 tools/set-attention-gamma.py "$ckpt" "$dir/generator.safetensors" >&2 || die "cannot set the gammas of $ckpt"
    "$bin/sagan-export" "$dir/model.onnx" --checkpoint "$dir/generator.safetensors" >"$dir.export.log" 2>&1 ||
        die "sagan-export of $preset failed: $(tail -n 3 "$dir.export.log")"
    model=(--model "$dir/model.onnx")

    for config in "${configs[@]}"; do
        if [[ -n "${unavailable[$config]:-}" ]]; then
            rows+=("| $preset | $config | unavailable | | | | |")
            continue
        fi
        # shellcheck disable=SC2206 # the flags are words without spaces
        f=(${flags[$config]})
        diff="reference"
        startup="-"
        if [[ $config != cpu ]]; then
            # Start-up: the whole command for one image; TensorRT builds its engine on the first
            # run and loads it from the cache on the second.
            t=$(date +%s%N)
            if ! infer "${model[@]}" "${f[@]}" --count 1 --no-grid --png-each --out "$work/png"; then
                unavailable[$config]="$(grep -m1 '^error' "$work/last.out" || tail -n 1 "$work/last.out")"
                rows+=("| $preset | $config | unavailable | | | | |")
                continue
            fi
            startup="$(ms_since "$t") ms"
            if [[ $config == tensorrt-* ]]; then
                t=$(date +%s%N)
                infer "${model[@]}" "${f[@]}" --count 1 --no-grid --png-each --out "$work/png" || die "$config: second run failed: $(tail -n 1 "$work/last.out")"
                startup="$startup / $(ms_since "$t") ms"
            fi
            infer "${model[@]}" "${f[@]}" --compare-cpu --count 16 --no-grid --png-each --out "$work/png" ||
                die "$preset on $config: $(grep -m1 '^error' "$work/last.out")"
            d="$(sed -n 's/^max |diff| against the CPU provider: \([^ ]*\).*/\1/p' "$work/last.out")"
            [[ -n "$d" ]] || die "$preset on $config: no max |diff| in: $(cat "$work/last.out")"
            if awk -v d="$d" -v b="${bound[$config]}" 'BEGIN {exit !(d + 0 <= b + 0 && d == d + 0)}'; then
                diff="$d (<= ${bound[$config]})"
            else
                diff="**$d > ${bound[$config]}**"
                parity_failed=1
            fi
        fi
        # Fewer timed runs on the CPU, where batch 64 of sagan128 takes seconds.
        runs=50
        [[ $config == cpu ]] && runs=5
        infer "${model[@]}" "${f[@]}" --bench --batch 1 --bench-runs "$runs" || die "$preset on $config: bench failed: $(tail -n 1 "$work/last.out")"
        ips1="$(images_per_s)"
        infer "${model[@]}" "${f[@]}" --bench --batch 64 --bench-runs "$runs" || die "$preset on $config: bench failed: $(tail -n 1 "$work/last.out")"
        ips64="$(images_per_s)"
        mem="$peak"
        [[ $config == cpu ]] && mem="-"
        rows+=("| $preset | $config | $diff | $ips1 | $ips64 | $startup | $mem |")
    done
done

gpu_name="no GPU (nvidia-smi found none)"
[[ $smi == 1 ]] && gpu_name="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)"

# ---- Training on CUDA: sagan-train --device cuda against the CPU and PyTorch eager.
# The first steps' losses on the GPU (candle's ops, cuBLAS) and the CPU (the fused kernels) sum in
# different orders; the CPU's two paths agree to 1e-3 after 2 steps at batch 2 (the parity tests
# in src/train/generic_parity.rs). 1e-2 over 3 steps at batch 64 leaves room for cuBLAS's order.
loss_rtol=1e-2
train_batch=64
train_rows=()
train_notes=()
train_status=0
largest=()

# The first 3 steps of two metrics.jsonl files: the largest relative difference of d_loss and
# g_loss; and the mean images/s of the second file after its 10th step.
compare_runs() {
    python3 - "$1" "$2" <<'PY'
import json, sys
def read(path):
    return [json.loads(line) for line in open(path)]
cpu, gpu = read(sys.argv[1]), read(sys.argv[2])
worst = max(abs(c[k] - g[k]) / max(abs(c[k]), abs(g[k]), 1.0)
            for c, g in zip(cpu[:3], gpu[:3]) for k in ("d_loss", "g_loss"))
later = [r["images_per_sec"] for r in gpu if r["step"] > 10] or [r["images_per_sec"] for r in gpu]
print(f"{worst:.2e} {sum(later) / len(later):.1f}")
PY
}

# sagan-train with the flags every run here shares; output in $work/last.out, peak in $peak.
train() {
    measured "$bin/sagan-train" --seed 1 --sample-every 0 --checkpoint-every 0 --log-every 1 --no-tensorboard "$@"
}

if [[ $only != infer ]]; then
    for preset in sagan-mnist28 sagan64 sagan128; do
        echo "== training $preset" >&2
        dir="$work/train-$preset"
        train --preset "$preset" --steps 3 --batch-size "$train_batch" --device cpu --out "$dir-cpu" ||
            die "sagan-train --preset $preset on the CPU failed: $(tail -n 1 "$work/last.out")"
        if ! train --preset "$preset" --steps "$train_steps" --batch-size "$train_batch" --device cuda --out "$dir-cuda"; then
            train_notes+=("CUDA training could not run: $(grep -m1 '^error' "$work/last.out" || tail -n 1 "$work/last.out")")
            train_status=2
            break
        fi
        mem="$peak"
        read -r worst ips < <(compare_runs "$dir-cpu/metrics.jsonl" "$dir-cuda/metrics.jsonl")
        if awk -v d="$worst" -v b="$loss_rtol" 'BEGIN {exit !(d + 0 <= b + 0)}'; then
            losses="$worst (<= $loss_rtol)"
        else
            losses="**$worst > $loss_rtol**"
            train_status=1
        fi
        torch="-"
        if [[ -z "$torch_python" ]]; then
            torch="- (no --torch)"
        elif [[ $preset == sagan128 ]]; then
            torch="- (torch_sagan.py: unconditional presets only)"
        else
            step="$(find "$dir-cuda/checkpoints" -mindepth 1 -maxdepth 1 -type d | sort | tail -n 1)"
            if measured "$torch_python" tools/torch_sagan.py --threads 16 train --checkpoint "$step" \
                --batch-size "$train_batch" --warmup 5 --steps 50 --device cuda; then
                torch="$(tail -n 1 "$work/last.out" | python3 -c 'import json, sys; r = json.load(sys.stdin); print(f"{r[\"images_per_s\"]:.1f} ({r[\"peak_gpu_mib\"]:.0f} MiB)")')"
            else
                torch="failed: $(tail -n 1 "$work/last.out")"
            fi
        fi
        train_rows+=("| $preset | $train_batch | $ips | $torch | $losses | $mem |")
    done
fi

# The largest sagan128 batch that trains 2 steps: doubling from 32, then halving the gap 3 times.
fits() {
    train --preset "$1" --steps 2 --batch-size "$2" --device cuda --out "$work/fit-$2-$RANDOM"
}
if [[ $only != infer && $train_status != 2 ]]; then
    sed 's/{ type = "attention" }/{ type = "attention", pooled = true }/' models/sagan128.toml >"$work/sagan128-pooled.toml"
    for attention in plain pooled; do
        preset=sagan128
        [[ $attention == pooled ]] && preset="$work/sagan128-pooled.toml"
        echo "== largest sagan128 batch, $attention attention" >&2
        ok=0 bad=0 b=32
        while [[ $b -le 4096 ]]; do
            if fits "$preset" "$b"; then ok=$b; b=$((b * 2)); else bad=$b; break; fi
        done
        if [[ $bad -gt 0 && $ok -gt 0 ]]; then
            for _ in 1 2 3; do
                mid=$(((ok + bad) / 2))
                if fits "$preset" "$mid"; then ok=$mid; else bad=$mid; fi
            done
        fi
        limit="fails at $bad"
        [[ $bad == 0 ]] && limit="all up to 4096 fit"
        largest+=("$attention attention $ok ($limit);")
    done
fi

training_table() {
    echo "Training on CUDA: $train_steps steps at batch $train_batch (seed 1); images/s after step 10 (sagan-train's metrics.jsonl)."
    echo
    echo "| preset | batch | sagan-train CUDA images/s | PyTorch eager CUDA images/s (peak) | first 3 steps' losses vs CPU, max rel. diff | peak GPU memory |"
    echo "|---|---:|---:|---:|---|---:|"
    [[ ${#train_rows[@]} -gt 0 ]] && printf '%s\n' "${train_rows[@]}"
    [[ ${#largest[@]} -gt 0 ]] && echo && echo "Largest sagan128 batch that trains: ${largest[*]}"
    for note in "${train_notes[@]}"; do
        echo
        echo "$note"
    done
}
{
    echo "GPU check: $gpu_name; $(date -u +%Y-%m-%d); $(($(date +%s) - started)) s"
    if [[ $only != train ]]; then
        echo "ONNX Runtime: $ORT_DYLIB_PATH"
        echo
        echo "| preset | provider | max \\|diff\\| vs CPU | images/s, batch 1 | images/s, batch 64 | start-up (first / cached) | GPU memory, batch 64 |"
        echo "|---|---|---|---:|---:|---|---:|"
        printf '%s\n' "${rows[@]}"
        echo
        echo "Bounds: fp32 $fp32_bound; fp16 $fp16_bound (11-bit mantissas through every layer; 6.4 steps of the 8-bit output)."
        echo "Start-up: wall time of \`sagan-infer --count 1\`, process start to exit. Memory: the process's peak in nvidia-smi."
        for config in "${!unavailable[@]}"; do
            echo
            echo "$config could not run: ${unavailable[$config]}"
        done
    fi
    if [[ $only != infer ]]; then
        echo
        training_table
    fi
} | tee "$out"

if [[ ${#unavailable[@]} -gt 0 || $train_status == 2 ]]; then
    exit 2
fi
[[ $train_status == 1 ]] && exit 1
exit $parity_failed
