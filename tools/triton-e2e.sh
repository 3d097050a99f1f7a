#!/usr/bin/env bash
# End to end against a real Triton Inference Server on the CPU: sagan-export --triton writes a
# repository, tritonserver (the 2.x binary nvidia-pytriton ships on PyPI) loads it unchanged, and
# tools/triton_client.py asks it for images over HTTP, which must equal sagan-infer's pixel for
# pixel. PyPI has no Triton ONNX Runtime backend, so tools/triton_standin_backend.py (onnxruntime
# in a Python-based backend) stands in for it: Triton's config validation, warm-up, dynamic
# batching, versioning and HTTP protocol are the real ones, the backend's own code is not.
#
# Usage: tools/triton-e2e.sh      (~2 minutes; installs ~450 MB into .venv-triton once)
# Not part of tools/test.sh: the server venv is large. Only 127.0.0.1 is used.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

venv="$root/.venv-triton"
if ! "$venv/bin/python" -c "import pytriton, onnxruntime, tritonclient.http, PIL" 2>/dev/null; then
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check nvidia-pytriton==0.7.0 \
        onnxruntime==1.31.1 "tritonclient[http]==2.73.0" numpy pillow
fi
py="$venv/bin/python"
site="$("$py" -c 'import site; print(site.getsitepackages()[0])')"
dist="$site/pytriton/tritonserver"
pyver="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

cargo build --release --quiet --bin sagan-train --bin sagan-export --bin sagan-infer
tools/install-onnxruntime.sh cpu >/dev/null
bin="$root/target/release"

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

echo "== checkpoints and repository"
for preset in sagan-cond-mnist32 dcgan-mnist28; do
    "$bin/sagan-train" --preset "$preset" --steps 1 --batch-size 2 --threads 2 --out "runs/$preset" \
        --sample-every 0 >/dev/null 2>&1
    "$bin/sagan-export" --triton repo --checkpoint "runs/$preset" --kind cpu --max-batch 8 --instances 2
done
# A second export of the same model: version 2, which Triton then serves.
"$bin/sagan-export" --triton repo --checkpoint runs/sagan-cond-mnist32 --kind cpu --max-batch 8 --instances 2

echo "== tritonserver (pytriton's, with the stand-in onnxruntime backend)"
cp -r "$dist/backends" backends
cp "$dist/python_backend_stubs/$pyver/triton_python_backend_stub" backends/python/
mkdir backends/onnxruntime
cp "$root/tools/triton_standin_backend.py" backends/onnxruntime/model.py
port=$((20000 + $$ % 20000))
# The Python backend's stub finds the venv's packages through the python on PATH.
PATH="$venv/bin:$PATH" LD_LIBRARY_PATH="$site/nvidia_pytriton.libs" \
    "$dist/bin/tritonserver" --model-repository "$work/repo" --backend-directory "$work/backends" \
    --http-address 127.0.0.1 --http-port "$port" --grpc-address 127.0.0.1 --grpc-port $((port + 1)) \
    --allow-metrics false --exit-on-error true >server.log 2>&1 &
server_pid=$!
url="127.0.0.1:$port"
for _ in $(seq 120); do
    curl -sf "http://$url/v2/health/ready" >/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat server.log; echo "error: tritonserver exited"; exit 1; }
    sleep 1
done
curl -sf "http://$url/v2/health/ready" >/dev/null || { tail -30 server.log; echo "error: not ready after 120 s"; exit 1; }
grep -E "successfully loaded|READY" server.log | sed 's/^/  /'

echo "== the client against sagan-infer"
compare() { # two PNGs: same size and pixels
    "$py" - "$1" "$2" <<'EOF'
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(p).convert("RGB")) for p in sys.argv[1:3])
if a.shape != b.shape or (a != b).any():
    sys.exit(f"error: {sys.argv[1]} and {sys.argv[2]} differ ({a.shape} vs {b.shape})")
print(f"  {sys.argv[1]} == {sys.argv[2]} ({a.shape[1]}x{a.shape[0]} pixels)")
EOF
}
for case in "sagan-cond-mnist32 20 5 3" "dcgan-mnist28 9 3 8"; do
    read -r model count columns batch <<<"$case"
    "$py" "$root/tools/triton_client.py" --url "$url" --model "$model" --seed 4 --count "$count" \
        --columns "$columns" --batch "$batch" --out "client-$model"
    "$bin/sagan-infer" --model "repo/$model/$(ls repo/$model | sort -n | tail -1)/model.onnx" \
        --ort-lib "$root/.onnxruntime/cpu/lib/libonnxruntime.so" --seed 4 --count "$count" \
        --columns "$columns" --out "infer-$model" >/dev/null 2>&1
    compare "client-$model/seed4-grid.png" "infer-$model/seed4-grid.png"
done

echo "== served version and metadata"
curl -sf "http://$url/v2/models/sagan-cond-mnist32" | "$py" -c 'import json,sys; m=json.load(sys.stdin); print("  versions served:", m["versions"])'
curl -sf "http://$url/v2/models/sagan-cond-mnist32/config" | "$py" -c '
import json, sys
c = json.load(sys.stdin)
print("  max_batch_size", c["max_batch_size"], "| instances", c["instance_group"][0]["count"], c["instance_group"][0]["kind"],
      "| warm-up", [w["batch_size"] for w in c["model_warmup"]], "| sagan.z_dim", c["parameters"]["sagan.z_dim"]["string_value"])'

echo "== 128 requests of 1 image, 32 in flight at once (through the dynamic batcher)"
stats() {
    curl -sf "http://$url/v2/models/sagan-cond-mnist32/stats" |
        "$py" -c 'import json,sys; s=json.load(sys.stdin)["model_stats"][0]; print(s["inference_count"], s["execution_count"])'
}
read -r images0 runs0 <<<"$(stats)"
"$py" "$root/tools/triton_client.py" --url "$url" --model sagan-cond-mnist32 --seed 4 --count 128 --batch 1 \
    --concurrency 32 --out parallel
"$bin/sagan-infer" --model "repo/sagan-cond-mnist32/2/model.onnx" \
    --ort-lib "$root/.onnxruntime/cpu/lib/libonnxruntime.so" --seed 4 --count 128 --out infer-128 >/dev/null 2>&1
compare parallel/seed4-grid.png infer-128/seed4-grid.png
read -r images1 runs1 <<<"$(stats)"
echo "  the server ran $((images1 - images0)) images in $((runs1 - runs0)) model runs"
[[ $((images1 - images0)) == 128 ]] || { echo "error: expected 128 images served"; exit 1; }
echo "== the client's errors"
for bad in "--model nosuch" "--model dcgan-mnist28 --class 3" "--model sagan-cond-mnist32 --class 10" \
    "--model sagan-cond-mnist32 --batch 9"; do
    # shellcheck disable=SC2086
    if err="$("$py" "$root/tools/triton_client.py" --url "$url" $bad --out bad 2>&1)"; then
        echo "error: $bad was accepted"; exit 1
    fi
    echo "  $bad: $err"
done
echo "ok: the repository served by tritonserver, the client's grids equal sagan-infer's"
