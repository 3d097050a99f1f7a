#!/usr/bin/env bash
# The GPU check: every preset, trained a few steps and exported (attention gammas set to 0.8 so
# that attention counts), run on the CPU, CUDA, TensorRT fp32 and TensorRT fp16 providers; one
# Markdown table of max |diff| against the CPU, images/s at batch 1 and 64, TensorRT start-up
# (first run builds the engine, the second loads it from the cache) and GPU memory.
#
# For a machine with an NVIDIA GPU and driver but no network and no Rust toolchain: its inputs
# are the release binaries and the GPU runtime, as wheels or installed.
#
# Usage: tools/gpu-check.sh [--bin DIR] [--wheels DIR | --runtime DIR] [--presets A,B]
#                           [--providers A,B] [--out FILE]
#   --bin DIR       sagan-train, sagan-export, sagan-infer [default: target/release]
#   --wheels DIR    install the GPU runtime from these wheels first (see
#                   tools/install-onnxruntime.sh gpu --list), into .onnxruntime/gpu
#   --runtime DIR   an installed GPU runtime [default: .onnxruntime/gpu]
#   --presets A,B   the presets to check [default: all six]
#   --providers A,B of cpu, cuda, tensorrt-fp32, tensorrt-fp16 [default: all four]
#   --out FILE      also write the table to FILE [default: gpu-check.md]
# Needs python3 (standard library only) and, for the memory column, nvidia-smi.
# Exit status: 0 when every provider ran within its bound, 1 when a bound failed, 2 when a
# provider could not run (its error is printed under the table) or a step failed.
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
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) bin="${2:?--bin needs a folder}"; shift ;;
        --wheels) wheels="${2:?--wheels needs a folder}"; shift ;;
        --runtime) runtime="${2:?--runtime needs a folder}"; shift ;;
        --presets) presets="${2:?--presets needs a list}"; shift ;;
        --out) out="${2:?--out needs a file}"; shift ;;
        --providers) providers="${2:?--providers needs a list}"; shift ;;
        -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "error: $*" >&2; exit 2; }
for b in sagan-train sagan-export sagan-infer; do
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
[[ -s "$runtime/lib/libonnxruntime.so" ]] || die "$runtime has no lib/libonnxruntime.so (--runtime DIR or --wheels DIR)"
export ORT_DYLIB_PATH
ORT_DYLIB_PATH="$(cd "$runtime" && pwd)/lib/libonnxruntime.so"
export RUST_LOG=error

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
smi=0
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && smi=1

ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

# Runs sagan-infer with the given flags; its output is in $work/last.out. With $smi, the
# process's peak GPU memory (MiB, nvidia-smi) is left in $peak.
peak="-"
infer() {
    peak="-"
    "$bin/sagan-infer" "$@" >"$work/last.out" 2>&1 &
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
IFS=, read -r -a preset_list <<<"$presets"
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
{
    echo "GPU check: $gpu_name; ONNX Runtime $ORT_DYLIB_PATH; $(date -u +%Y-%m-%d); $(($(date +%s) - started)) s"
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
} | tee "$out"

if [[ ${#unavailable[@]} -gt 0 ]]; then
    exit 2
fi
exit $parity_failed
