"""sagan against PyTorch on this CPU, side by side in one run, with the same thread count.

Run it through tools/bench.sh, which installs what it needs. It measures, interleaved (every
repetition runs every row in turn, so drift and background load hit all of them):
  - training images/s at batch 64 (one D step + one G step) of sagan-train and of PyTorch eager
    (tools/torch_sagan.py) for sagan-mnist28 and sagan64;
  - generator images/s at batch 1 and 64 of sagan-infer (ONNX Runtime through ort, CPU
    provider), ONNX Runtime's Python API on the same exported file, and PyTorch eager on the
    checkpoint that file was exported from;
  - the peak resident memory of each (every measurement is its own process);
  - this CPU's sgemm peak (torch.matmul and NumPy, 4096x4096 float32);
and first checks that PyTorch's generator on sagan's weights gives sagan's output (ONNX Runtime
on sagan-export's file) within 1e-4 for every preset, attention made to count (gamma set to 0.5
in the checkpoint both sides load). It prints a Markdown table and writes it to --out.
"""
import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
TORCH_SAGAN = os.path.join(ROOT, "tools", "torch_sagan.py")
ORT_LIB = os.path.join(ROOT, ".onnxruntime", "cpu", "lib", "libonnxruntime.so")

# Every preset PyTorch implements; sagan128's generator runs too but a run of it takes minutes.
PARITY_PRESETS = ["sagan-mnist28", "dcgan-mnist28", "sagan64", "dcgan64", "sagan-cond-mnist32"]
BENCH_PRESETS = ["sagan-mnist28", "sagan64"]
PARITY_TOLERANCE = 1e-4
PARITY_GAMMA = 0.5
TRAIN_BATCH = 64
INFER_BATCHES = [1, 64]
INFER_WARMUP = 3  # as sagan-infer --bench
SGEMM_N = 4096

# (warm-up steps, timed steps) per training process; a sagan64 step takes seconds in sagan.
# PyTorch's steps on this shared 2-core machine vary 0.5-2x around its mean within one process
# (sagan's ~0.9-1.1x): 30 timed steps hold a process's mean to a few percent where 10 did not.
TRAIN_STEPS = {"sagan-mnist28": (2, 30), "sagan64": (1, 5)}
QUICK_TRAIN_STEPS = {"sagan-mnist28": (1, 3), "sagan64": (1, 1)}
INFER_RUNS = {1: 100, 64: 10}
QUICK_INFER_RUNS = {1: 20, 64: 3}


def child_env(threads):
    # OpenMP (PyTorch) and OpenBLAS (NumPy) size their pools from this.
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "RUST_LOG": "warn", "ORT_DYLIB_PATH": ORT_LIB}


def cpu_busy():
    """Busy and total jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # less idle and iowait


def wait_quiet(limit):
    """Waits, at most `limit` seconds, for a second in which the CPUs are under 10% busy: other
    work on a 2-core machine (a compile) distorts 2-thread timings, PyTorch's OpenMP most."""
    deadline = time.monotonic() + limit
    while True:
        busy, total = cpu_busy()
        time.sleep(1)
        busy2, total2 = cpu_busy()
        if busy2 - busy <= 0.1 * (total2 - total) or time.monotonic() >= deadline:
            return


def measured(cmd, threads):
    """Runs cmd; its stdout, its own peak resident memory in MiB, and the share of the machine's
    CPU time that other processes used meanwhile."""
    busy, start = cpu_busy()[0], time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=child_env(threads), text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
    others = (cpu_busy()[0] - busy) / os.sysconf("SC_CLK_TCK") - usage.ru_utime - usage.ru_stime
    background = max(0.0, others / ((time.monotonic() - start) * os.cpu_count()))
    return out, (usage.ru_maxrss / 1024, background)


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def ort_session(onnx_path, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])


# ---- FLOPs, counted from the preset (a multiply-add is 2) ----

def layer_flops(layers, shape):
    """Forward FLOPs per image of each layer, from input shape (C, H, W)."""
    flops = []
    c, h, w = shape
    for layer in layers:
        if layer["type"] == "attention":
            n, r = h * w, c // 8
            # query, key, value 1x1 convs; energy q^T k; o = v attention^T
            flops.append(2 * n * c * (2 * r + c) + 2 * n * n * r + 2 * n * n * c)
            continue
        k, s, p, out = layer["kernel"], layer.get("stride", 1), layer.get("padding", 0), layer["out"]
        if layer["type"] == "conv":
            oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            flops.append(2 * c * out * k * k * oh * ow)
        else:  # conv_transpose: every input pixel meets the whole kernel
            oh, ow = (h - 1) * s + k - 2 * p, (w - 1) * s + k - 2 * p
            flops.append(2 * c * out * k * k * h * w)
        c, h, w = out, oh, ow
    return flops


def model_flops(preset):
    """FLOPs of one generated image, and of one training image (a batch-B step / B).

    Backward is twice the forward (input and weight gradients), less the input gradient of a
    first layer whose input needs none. A training step as sagan-train runs it by default: one
    D step, G forward on B latents and D forward and backward on 2B images (real and fake in one
    batch); then the G step: G forward and backward on B, D forward and input gradients on B (D is
    frozen: no weight gradients, in sagan and in the PyTorch peer alike).
    """
    g = layer_flops(preset["generator"]["layers"], (preset["z_dim"], 1, 1))
    d = layer_flops(preset["discriminator"]["layers"], (preset["channels"], preset["image_size"], preset["image_size"]))
    gf, df = sum(g), sum(d)
    d_step = gf + 2 * (3 * df - d[0])
    g_step = (3 * gf - g[0]) + 2 * df
    return gf, d_step + g_step


# ---- one measurement each: images/s and measured()'s (peak RSS MiB, background CPU share) ----

def sagan_train(ctx, preset, batch):
    warmup, steps = ctx.train_steps[preset]
    out = tempfile.mkdtemp(dir=ctx.workdir)
    _, stats = measured([os.path.join(BIN, "sagan-train"), "--preset", preset, "--steps", str(warmup + steps),
                       "--batch-size", str(batch), "--sample-every", "0", "--checkpoint-every", "0",
                       "--log-every", "1", "--threads", str(ctx.threads), "--out", out], ctx.threads)
    # With --log-every 1 every record times one step: train_step and its metrics line.
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f][warmup:]
    shutil.rmtree(out)
    seconds = sum(batch / r["images_per_sec"] for r in records)
    return batch * len(records) / seconds, stats


def torch_train(ctx, preset, batch):
    warmup, steps = ctx.train_steps[preset]
    out, stats = measured([sys.executable, TORCH_SAGAN, "--threads", str(ctx.threads), "train",
                         "--checkpoint", ctx.step_dirs[preset], "--batch-size", str(batch),
                         "--warmup", str(warmup), "--steps", str(steps)], ctx.threads)
    return last_json(out)["images_per_s"], stats


def sagan_infer(ctx, preset, batch):
    out, stats = measured([os.path.join(BIN, "sagan-infer"), "--model", ctx.onnx[preset], "--bench",
                         "--batch", str(batch), "--threads", str(ctx.threads),
                         "--bench-runs", str(ctx.infer_runs[batch])], ctx.threads)
    # The last row of its table: batch runs p50 p90 p99 images/s
    row = [line.split() for line in out.splitlines() if re.match(r"^\s*\d+\s+\d+\s", line)][-1]
    return float(row[5]), stats


def python_ort(ctx, preset, batch):
    out, stats = measured([sys.executable, __file__, "--threads", str(ctx.threads), "ort", "--model",
                         ctx.onnx[preset], "--batch", str(batch), "--runs", str(ctx.infer_runs[batch])],
                        ctx.threads)
    return last_json(out)["images_per_s"], stats


def torch_infer(ctx, preset, batch):
    out, stats = measured([sys.executable, TORCH_SAGAN, "--threads", str(ctx.threads), "infer", "--generator",
                         ctx.generators[preset], "--batch", str(batch), "--warmup", str(INFER_WARMUP),
                         "--runs", str(ctx.infer_runs[batch])], ctx.threads)
    return last_json(out)["images_per_s"], stats


# ---- workers: run as their own processes ----

def worker_ort(args):
    session = ort_session(args.model, args.threads)
    z_dim = int(session.get_modelmeta().custom_metadata_map["sagan.z_dim"])
    z = np.random.default_rng(0).standard_normal((args.batch, z_dim)).astype(np.float32)
    times = []
    for i in range(INFER_WARMUP + args.runs):
        start = time.perf_counter()
        session.run(None, {"z": z})
        if i >= INFER_WARMUP:
            times.append(time.perf_counter() - start)
    return {"images_per_s": args.batch * len(times) / sum(times)}


def worker_sgemm(args):
    import torch

    torch.set_num_threads(args.threads)
    n, flops = SGEMM_N, 2 * SGEMM_N**3
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    an, bn = a.numpy(), b.numpy()
    best = {"torch": math.inf, "numpy": math.inf}
    for _ in range(args.runs):
        start = time.perf_counter()
        torch.matmul(a, b, out=c)
        best["torch"] = min(best["torch"], time.perf_counter() - start)
        start = time.perf_counter()
        np.matmul(an, bn)
        best["numpy"] = min(best["numpy"], time.perf_counter() - start)
    return {name: flops / t / 1e9 for name, t in best.items()}


# ---- the run ----

class Context:
    """What every measurement needs: thread count, run lengths, and the prepared files."""

    def __init__(self, args, workdir):
        self.threads, self.workdir = args.threads, workdir
        self.train_steps = QUICK_TRAIN_STEPS if args.quick else TRAIN_STEPS
        self.infer_runs = QUICK_INFER_RUNS if args.quick else INFER_RUNS
        self.step_dirs, self.generators, self.onnx, self.presets = {}, {}, {}, {}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "RUST_LOG": "warn"})


def prepare(ctx, preset):
    """A short sagan run of the preset, its EMA generator with every gamma at PARITY_GAMMA, and
    that generator exported: the files parity and inference use (timing does not depend on the
    weights); PyTorch's training starts from the run's checkpoint."""
    run_dir = os.path.join(ctx.workdir, preset)
    run(os.path.join(BIN, "sagan-train"), "--preset", preset, "--steps", "2", "--batch-size", "8",
        "--sample-every", "0", "--checkpoint-every", "0", "--threads", str(ctx.threads), "--out", run_dir)
    step_dir = os.path.join(run_dir, "checkpoints", "step-00000002")
    with safe_open(os.path.join(step_dir, "generator_ema.safetensors"), "np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    rng = np.random.default_rng(2)
    for name in tensors:
        if name.endswith(".gamma"):
            tensors[name] = np.full_like(tensors[name], PARITY_GAMMA)
        # Conditional batch norm's class rows, still near their initial 1 and 0 after two steps,
        # made different per class so that a wrong class lookup would show.
        if ".norm" in name and name.endswith((".gain", ".bias")):
            noise = rng.standard_normal(tensors[name].shape).astype(np.float32)
            tensors[name] = tensors[name] + 0.3 * noise
    generator = os.path.join(ctx.workdir, preset + "-generator.safetensors")
    save_file(tensors, generator, metadata=meta)
    onnx_path = os.path.join(ctx.workdir, preset + ".onnx")
    run(os.path.join(BIN, "sagan-export"), onnx_path, "--checkpoint", generator)
    ctx.step_dirs[preset], ctx.generators[preset], ctx.onnx[preset] = step_dir, generator, onnx_path
    ctx.presets[preset] = json.loads(meta["model"])


def parity(ctx, preset):
    """max |PyTorch - sagan| over 8 images, and max |sagan|: sagan's output is ONNX Runtime on
    sagan-export's file (held to candle's generator within 1e-4 by the export, ~1e-7 in practice)."""
    z_dim = ctx.presets[preset]["z_dim"]
    z = np.random.default_rng(1).standard_normal((8, z_dim)).astype(np.float32)
    z_path, classes_path, out_path = (os.path.join(ctx.workdir, f"{preset}-{name}.npy")
                                      for name in ("z", "classes", "torch"))
    np.save(z_path, z)
    inputs, class_args = {"z": z}, []
    num_classes = ctx.presets[preset].get("num_classes", 0)
    if num_classes:
        inputs["class"] = np.arange(8, dtype=np.int64) * (num_classes - 1) // 7
        np.save(classes_path, inputs["class"])
        class_args = ["--classes", classes_path]
    measured([sys.executable, TORCH_SAGAN, "--threads", str(ctx.threads), "generate", "--generator",
              ctx.generators[preset], "--z", z_path, *class_args, "--out", out_path], ctx.threads)
    ours = ort_session(ctx.onnx[preset], ctx.threads).run(None, inputs)[0]
    return float(np.abs(np.load(out_path) - ours).max()), float(np.abs(ours).max())


IMPLEMENTATIONS = {
    "train": [("sagan-train (candle)", sagan_train), ("PyTorch eager", torch_train)],
    "infer": [("sagan-infer (ort, CPU)", sagan_infer), ("ONNX Runtime Python", python_ort),
              ("PyTorch eager", torch_infer)],
}


# (label, kind, preset, batch), in the order of every repetition.
WORKLOADS = [(f"train {p}, batch {TRAIN_BATCH}", "train", p, TRAIN_BATCH) for p in BENCH_PRESETS] + [
    (f"generate {p}, batch {b}", "infer", p, b) for p in BENCH_PRESETS for b in INFER_BATCHES]


def versions():
    import importlib.metadata as md

    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.split()[1]
    sagan = subprocess.run([os.path.join(BIN, "sagan-train"), "--version"], capture_output=True,
                           text=True).stdout.split()[-1]
    return (f"sagan {sagan} (rustc {rustc}), PyTorch {md.version('torch')}, "
            f"onnxruntime {md.version('onnxruntime')}, NumPy {np.__version__}, Python {platform.python_version()}")


def cpu_model():
    fields = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    avx512 = " AVX-512" if "avx512f" in fields.get("Flags", "").split() else ""
    return (f"{fields.get('Model name', platform.processor())} (family {fields.get('CPU family', '?')} "
            f"model {fields.get('Model', '?')}{avx512}), {os.cpu_count()} cores")


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def memory_gib():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def parity_table(diffs):
    lines = [f"Parity: PyTorch's generator on sagan's weights (every attention gamma set to {PARITY_GAMMA}) "
             "against sagan's output (ONNX Runtime on sagan-export's file of the same weights), 8 images:",
             "", "| preset | max abs diff | max abs pixel |", "|---|---|---|"]
    return lines + [f"| {p} | {d:.1e} | {m:.3f} |" for p, (d, m) in diffs.items()]


def report(ctx, args, diffs, results, sgemm, load_before, load_after, wall):
    best = {name: max(s[name] for s in sgemm) for name in ("torch", "numpy")}
    peak = max(best.values())
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_model()}, {memory_gib():.0f} GiB; "
        f"{ctx.threads} threads for every implementation; {versions()}.",
        "",
        f"sgemm peak: {peak:.0f} GFLOP/s, the best {SGEMM_N}x{SGEMM_N} float32 matmul of the run "
        f"(torch.matmul {best['torch']:.0f}, NumPy {best['numpy']:.0f} GFLOP/s). Load average "
        f"(1, 5, 15 min) before: {load_before}, after: {load_after}.",
        "",
        "| workload | implementation | img/s min | img/s median | vs PyTorch | paired | % of sgemm peak "
        "| peak RSS MiB | background CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, kind, preset, _ in WORKLOADS:
        infer_flops, train_flops = model_flops(ctx.presets[preset])
        flops = train_flops if kind == "train" else infer_flops
        torch_values = [x for x, _ in results[(label, "PyTorch eager")]]
        torch_median = statistics.median(torch_values)
        for i, (name, _) in enumerate(IMPLEMENTATIONS[kind]):
            values = [x for x, _ in results[(label, name)]]
            median = statistics.median(values)
            paired = statistics.median(v / t for v, t in zip(values, torch_values))
            rss = max(rss for _, (rss, _) in results[(label, name)])
            background = statistics.median(b for _, (_, b) in results[(label, name)])
            lines.append(f"| {label if i == 0 else ''} | {name} | {min(values):.1f} | {median:.1f} "
                         f"| {median / torch_median:.2f} | {paired:.2f} | {100 * median * flops / 1e9 / peak:.0f} "
                         f"| {rss:.0f} | {100 * background:.0f} |")
    flop_notes = "; ".join(f"{p} {model_flops(ctx.presets[p])[1] / 1e9:.2f} per training image and "
                           f"{model_flops(ctx.presets[p])[0] / 1e9:.3f} per generated image"
                           for p in BENCH_PRESETS)
    train = ", ".join(f"{p} {w} + {s}" for p, (w, s) in ctx.train_steps.items())
    infer = ", ".join(f"batch {b} {r}" for b, r in ctx.infer_runs.items())
    lines += [
        "",
        f"{args.reps} repetitions, each running every row in turn; every measurement is its own "
        f"process. Training: warm-up + timed steps per process ({train}); generation: "
        f"{INFER_WARMUP} warm-up + timed runs per process ({infer}). vs PyTorch and % of sgemm peak "
        f"use the medians; paired: the median of the per-repetition ratios to PyTorch (the two sides "
        f"of a pair run minutes apart, so a slow stretch of the machine hits both: it moves less "
        f"than the ratio of medians when one side drifts between repetitions); GFLOP counted from the presets: {flop_notes}. Peak RSS: the largest of the "
        f"repetitions. Background CPU: the share of the machine's CPU time other processes used "
        f"during the measurement (median). Whole run {wall / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines + parity_table(diffs)) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads of every implementation (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (default 3)")
    parser.add_argument("--quick", action="store_true", help="one short repetition: a smoke test, not numbers")
    parser.add_argument("--parity-only", action="store_true", help="only the PyTorch-vs-sagan parity check")
    parser.add_argument("--settle", type=float, default=20,
                        help="before each measurement, wait up to this many seconds for a quiet second (default 20)")
    parser.add_argument("--out", default=os.path.join(ROOT, "tools", "bench-results.md"),
                        help="where the Markdown table goes (default tools/bench-results.md)")
    sub = parser.add_subparsers(dest="worker", help=argparse.SUPPRESS)
    w = sub.add_parser("ort")
    w.add_argument("--model", required=True)
    w.add_argument("--batch", type=int, required=True)
    w.add_argument("--runs", type=int, required=True)
    w = sub.add_parser("sgemm")
    w.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"ort": worker_ort, "sgemm": worker_sgemm}[args.worker](args)))
        return
    if args.quick:
        args.reps = 1

    started = time.perf_counter()
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as workdir:
        ctx = Context(args, workdir)
        diffs = {}
        for preset in PARITY_PRESETS:
            prepare(ctx, preset)
            diffs[preset] = parity(ctx, preset)
            log(f"parity {preset}: max abs diff {diffs[preset][0]:.1e}")
        failed = [p for p, (d, _) in diffs.items() if not d <= PARITY_TOLERANCE]
        if failed:
            raise SystemExit(f"parity failed (> {PARITY_TOLERANCE}): {', '.join(failed)}")
        if args.parity_only:
            print("\n".join(parity_table(diffs) + ["", f"parity ok: every preset within {PARITY_TOLERANCE}"]))
            return

        results, sgemm = {}, []
        for rep in range(args.reps):
            wait_quiet(args.settle)
            out, _ = measured([sys.executable, __file__, "--threads", str(args.threads), "sgemm"], args.threads)
            sgemm.append(last_json(out))
            log(f"rep {rep + 1}/{args.reps} sgemm: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in sgemm[-1].items()))
            for label, kind, preset, batch in WORKLOADS:
                for name, measure in IMPLEMENTATIONS[kind]:
                    wait_quiet(args.settle)
                    ips, (rss, background) = result = measure(ctx, preset, batch)
                    results.setdefault((label, name), []).append(result)
                    log(f"rep {rep + 1}/{args.reps} {label}: {name} {ips:.1f} img/s, {rss:.0f} MiB, "
                        f"background CPU {100 * background:.0f}%")
    text = report(ctx, args, diffs, results, sgemm, load_before, loadavg(), time.perf_counter() - started)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
