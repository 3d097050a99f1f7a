"""Generator inference on the CPU: sagan-infer (ONNX Runtime through ort) next to ONNX Runtime's
own Python API on the same exported file, same thread count, interleaved in one run.

Usage: .venv/bin/python tools/bench_infer.py [--threads 2] [--runs 50]
Needs: target/release/{sagan-train,sagan-export,sagan-infer} (cargo build --release),
.onnxruntime/cpu (tools/install-onnxruntime.sh cpu) and onnxruntime==1.31.1 in this Python.
"""
import argparse
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


def run(*cmd, env=None):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


def export(preset, workdir):
    """A one-step checkpoint of the preset, exported: timing does not depend on the weights."""
    run_dir = os.path.join(workdir, preset)
    run(os.path.join(BIN, "sagan-train"), "--preset", preset, "--steps", "1", "--batch-size", "2",
        "--sample-every", "0", "--out", run_dir, env={**os.environ, "RUST_LOG": "warn"})
    onnx_path = os.path.join(workdir, preset + ".onnx")
    run(os.path.join(BIN, "sagan-export"), onnx_path, "--checkpoint", run_dir)
    return onnx_path


def sagan_infer(onnx_path, batch, threads, runs):
    out = run(os.path.join(BIN, "sagan-infer"), "--model", onnx_path, "--bench", "--batch", str(batch),
              "--threads", str(threads), "--bench-runs", str(runs),
              env={**os.environ, "ORT_DYLIB_PATH": os.path.join(ROOT, ".onnxruntime/cpu/lib/libonnxruntime.so")})
    row = [line.split() for line in out.splitlines() if re.match(r"^\s*\d+\s+\d+\s", line)][-1]
    return float(row[2]), float(row[5])  # p50 ms, images/s


def python_ort(onnx_path, batch, threads, runs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    z_dim = int(session.get_modelmeta().custom_metadata_map["sagan.z_dim"])
    z = np.random.default_rng(0).standard_normal((batch, z_dim)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"z": z})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"z": z})
        times.append(time.perf_counter() - start)
    p50 = statistics.median(times)
    return p50 * 1e3, batch / p50


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} threads, onnxruntime {ort.__version__}, median of {args.runs} runs")
    print()
    print("| preset | batch | sagan-infer p50 ms | sagan-infer img/s | Python ORT p50 ms | Python ORT img/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for preset in ["sagan-mnist28", "sagan64"]:
            onnx_path = export(preset, workdir)
            for batch in [1, 64]:
                ours = sagan_infer(onnx_path, batch, args.threads, args.runs)
                theirs = python_ort(onnx_path, batch, args.threads, args.runs)
                print(f"| {preset} | {batch} | {ours[0]:.2f} | {ours[1]:.1f} | {theirs[0]:.2f} | {theirs[1]:.1f} "
                      f"| {ours[1] / theirs[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
