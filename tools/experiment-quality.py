#!/usr/bin/env python3
"""Learning speed per step, over seeds: sagan against a plain PyTorch SAGAN of the same model,
sagan's initialisations and settings, and SAGAN against its no-attention baseline (DCGAN).

Every arm trains on full MNIST (tools/fetch-mnist.sh) or, the -fashion arms, on Fashion-MNIST
(tools/fetch-fashion-mnist.py), with batch 64, one thread per run, two runs at a time; each
checkpoint's generator (EMA, and the raw weights with --raw) is exported to ONNX and scored by
sagan-eval: FID of 10,000 samples against 10,000 training images in the features of the built-in
MNIST classifier, or for Fashion-MNIST of the same MLP trained on it
(tools/train_mnist_classifier.py --name fashion-classifier, trained on first use into
runs/fashion/). Lower is better.

  tools/experiment-quality.py run [--steps 2000] [--every 500] [--seeds 1,2,3] ARM...
  tools/experiment-quality.py table [--compact] [ARM...]   # mean, spread and every seed per step

Arms (see ARMS below): the paper's settings (G at 1e-4) in sagan and in PyTorch, with each
initialisation; G at D's rate (4e-4) for SAGAN, DCGAN and PyTorch, and for SAGAN and DCGAN on
Fashion-MNIST; all at batch 64. Results: runs/experiment-quality/ARM/seedS/
(checkpoints, fid.json); `table` prints markdown. A run whose fid.json is complete is skipped.
The PyTorch arms need torch, numpy and safetensors (tools/bench.sh installs them into
.bench-venv; SAGAN_TORCH_PYTHON names another interpreter).
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs/experiment-quality")
DATA = os.path.join(ROOT, "data/mnist")
BIN = os.environ.get("SAGAN_BIN", os.path.join(ROOT, "target/release"))
# Every setting an arm depends on is spelt out, so that the presets' own can change.
PAPER = ["--lr-g", "1e-4", "--batch-size", "64"]  # the paper's two time-scale rule (D 4e-4, G 1e-4)
FAST_G = ["--lr-g", "4e-4", "--batch-size", "64"]  # G at D's rate

XAVIER = [("init = \"pytorch\"", "init = \"xavier\"")]
ORTHOGONAL = [("init = \"pytorch\"", "init = \"orthogonal\"")]

# arm: (trainer, preset, extra arguments, preset edits as (text, replacement), dataset)
ARMS = {
    "sagan-paper": ("sagan", "sagan-mnist28", PAPER, [], "mnist"),
    "torch-paper": ("torch", "sagan-mnist28", PAPER + ["--init", "pytorch"], [], "mnist"),
    "sagan-normal-init": ("sagan", "sagan-mnist28", PAPER, [("init = \"pytorch\"", "init = \"normal\"")], "mnist"),
    "sagan-xavier-init": ("sagan", "sagan-mnist28", PAPER, XAVIER, "mnist"),
    "sagan-orthogonal-init": ("sagan", "sagan-mnist28", PAPER, ORTHOGONAL, "mnist"),
    # The paper's rates times sqrt(3), the ratio of orthogonal weights' scale to PyTorch's.
    "sagan-orthogonal-scaled-lr": ("sagan", "sagan-mnist28", ["--lr-d", "6.93e-4", "--lr-g", "1.73e-4",
                                                              "--batch-size", "64"], ORTHOGONAL, "mnist"),
    "torch-normal-init": ("torch", "sagan-mnist28", PAPER + ["--init", "normal"], [], "mnist"),
    "torch-xavier-init": ("torch", "sagan-mnist28", PAPER + ["--init", "xavier"], [], "mnist"),
    "torch-orthogonal-init": ("torch", "sagan-mnist28", PAPER + ["--init", "orthogonal"], [], "mnist"),
    "sagan-fast-g": ("sagan", "sagan-mnist28", FAST_G, [], "mnist"),
    "sagan-xavier-fast-g": ("sagan", "sagan-mnist28", FAST_G, XAVIER, "mnist"),
    "dcgan-fast-g": ("sagan", "dcgan-mnist28", FAST_G, [], "mnist"),
    "torch-fast-g": ("torch", "sagan-mnist28", FAST_G + ["--init", "pytorch"], [], "mnist"),
    "sagan-fashion": ("sagan", "sagan-mnist28", FAST_G, [], "fashion"),
    "dcgan-fashion": ("sagan", "dcgan-mnist28", FAST_G, [], "fashion"),
}

# dataset: (data folder, feature network for the FID (None: sagan-eval's built-in MNIST one))
DATASETS = {
    "mnist": (DATA, None),
    "fashion": (os.path.join(ROOT, "data/fashion-mnist"), os.path.join(ROOT, "runs/fashion/fashion-classifier.onnx")),
}


def prepare(dataset):
    """Fetches a dataset (and trains its feature network) unless already there."""
    data, net = DATASETS[dataset]
    if not os.path.exists(os.path.join(data, "train-images-idx3-ubyte.gz")):
        fetch = "tools/fetch-mnist.sh" if dataset == "mnist" else "tools/fetch-fashion-mnist.py"
        subprocess.run([os.path.join(ROOT, fetch), data], check=True)
    if net and not os.path.exists(net):
        python = os.environ.get("SAGAN_PYTHON", os.path.join(ROOT, ".venv/bin/python"))
        subprocess.run([python, os.path.join(ROOT, "tools/train_mnist_classifier.py"), "--data", data,
                        "--out", os.path.dirname(net), "--name", os.path.basename(net).removesuffix(".onnx")],
                       check=True)


def preset_file(arm, run_dir):
    _, preset, _, edits, _ = ARMS[arm]
    text = open(os.path.join(ROOT, "models", preset + ".toml")).read()
    for old, new in edits:
        if old not in text:
            raise SystemExit(f"{arm}: models/{preset}.toml has no '{old}' to change")
        text = text.replace(old, new)
    path = os.path.join(run_dir, "preset.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def train(arm, seed, steps, every):
    trainer, _, extra, _, dataset = ARMS[arm]
    data = DATASETS[dataset][0]
    run_dir = os.path.join(OUT, arm, f"seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    preset = preset_file(arm, run_dir)
    out = os.path.join(run_dir, "train")
    ckpts = os.path.join(out, "checkpoints")
    if os.path.isdir(os.path.join(ckpts, f"step-{steps:08d}")):
        return run_dir
    log = open(os.path.join(run_dir, "train.log"), "a")
    if trainer == "sagan":
        schedule = ["--steps", str(steps), "--threads", "1", "--checkpoint-every", str(every), "--keep-last", "1000",
                    "--sample-every", str(steps)]
        if os.path.isdir(ckpts) and os.listdir(ckpts):  # an interrupted run goes on, bit-identical
            cmd = [os.path.join(BIN, "sagan-train"), "--resume", out] + schedule
        else:
            cmd = [os.path.join(BIN, "sagan-train"), "--preset", preset, "--data", data, "--seed", str(seed),
                   "--out", out] + schedule + extra
        env = dict(os.environ, RUST_LOG="warn")
    else:
        python = os.environ.get("SAGAN_TORCH_PYTHON", os.path.join(ROOT, ".bench-venv/bin/python"))
        shutil.rmtree(out, ignore_errors=True)  # no optimizer state is saved: start over
        saves = ",".join(str(s) for s in range(every, steps + 1, every))
        cmd = [python, os.path.join(ROOT, "tools/torch_sagan.py"), "--threads", "1", "fit", "--preset", preset,
               "--data", data, "--steps", str(steps), "--save", saves, "--seed", str(seed), "--plain",
               "--out", out] + extra
        env = dict(os.environ)
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return run_dir


def evaluate(arm, run_dir, raw):
    """FID of every checkpoint's EMA (and raw) generator, into run_dir/fid.json."""
    path = os.path.join(run_dir, "fid.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    ckpts = os.path.join(run_dir, "train", "checkpoints")
    # Only finished checkpoints: a running trainer's `.step-N.partial` is not one yet.
    for step_dir in sorted(d for d in os.listdir(ckpts) if d.startswith("step-")):
        step = str(int(step_dir.split("-")[1]))
        for weights in ["ema", "raw"] if raw else ["ema"]:
            key = f"{step}/{weights}"
            if key in results:
                continue
            name = "generator_ema.safetensors" if weights == "ema" else "generator.safetensors"
            onnx = os.path.join(run_dir, f"step-{step}-{weights}.onnx")
            report = os.path.join(run_dir, f"step-{step}-{weights}.json")
            subprocess.run([os.path.join(BIN, "sagan-export"), onnx, "--checkpoint",
                            os.path.join(ckpts, step_dir, name)], check=True, capture_output=True)
            data, net = DATASETS[ARMS[arm][4]]
            subprocess.run([os.path.join(BIN, "sagan-eval"), "--model", onnx, "--data", data, "--count", "10000",
                            "--threads", "1", "--json", report] + (["--feature-net", net] if net else []),
                           check=True, capture_output=True)
            results[key] = json.load(open(report))["fid"]
            os.remove(onnx)
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1, sort_keys=True)
            os.replace(path + ".tmp", path)
    return results


def cmd_run(args):
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]  # seed-major: balanced when cut short

    def job(arm, seed):
        run_dir = train(arm, seed, args.steps, args.every)
        evaluate(arm, run_dir, args.raw)
        print(f"{arm} seed {seed}: done", flush=True)

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for f in [pool.submit(job, arm, seed) for arm, seed in jobs]:
            f.result()


def cmd_table(args):
    arms = args.arms or sorted(os.listdir(OUT))
    rows = {}
    for arm in arms:
        for seed_dir in sorted(os.listdir(os.path.join(OUT, arm))):
            path = os.path.join(OUT, arm, seed_dir, "fid.json")
            if os.path.exists(path):
                for key, fid in json.load(open(path)).items():
                    step, weights = key.split("/")
                    rows.setdefault((arm, weights, int(step)), []).append((seed_dir, fid))
    if args.compact:
        # Steps down, arms across: mean +- sd over the seeds (their count when not all are in).
        columns = sorted({(arm, weights) for arm, weights, _ in rows}, key=lambda c: (arms.index(c[0]), c[1]))
        print("| step | " + " | ".join(f"{arm} ({weights})" for arm, weights in columns) + " |")
        print("|---|" + "---|" * len(columns))
        for step in sorted({step for _, _, step in rows}):
            cells = []
            for arm, weights in columns:
                values = [f for _, f in rows.get((arm, weights, step), [])]
                sd = f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.1f}{sd} ({len(values)})" if values else "")
            print(f"| {step} | " + " | ".join(cells) + " |")
        return
    print("| arm | weights | step | seeds | mean FID | sd | min - max | per seed |")
    print("|---|---|---|---|---|---|---|---|")
    for (arm, weights, step), fids in sorted(rows.items()):
        values = [f for _, f in fids]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        per_seed = ", ".join(f"{s.removeprefix('seed')}: {f:.1f}" for s, f in fids)
        print(f"| {arm} | {weights} | {step} | {len(values)} | {statistics.mean(values):.1f} | {sd:.1f} | "
              f"{min(values):.1f} - {max(values):.1f} | {per_seed} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train and score the arms' seeds")
    p.add_argument("arms", nargs="+", choices=sorted(ARMS))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=500, help="checkpoint (and score) every N steps")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--raw", action="store_true", help="also score the raw (non-EMA) weights")
    p.set_defaults(run=cmd_run)
    p = sub.add_parser("table", help="markdown table of the scores so far")
    p.add_argument("arms", nargs="*")
    p.add_argument("--compact", action="store_true", help="steps down, arms across, mean +- sd")
    p.set_defaults(run=cmd_table)
    args = parser.parse_args()
    if args.command == "run":
        for dataset in sorted({ARMS[arm][4] for arm in args.arms}):
            prepare(dataset)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
