//! Memory and time of the two self-attention forms at high resolution: the plain SAGAN block
//! (N x N map) against the official code's pooled one (keys and values 2x2 max-pooled, N x N/4
//! map, values at C/2), one training forward + backward each.
//!
//! cargo run --release --example bench_attention [-- --batch 1 --channels 64 --runs 3]
//!
//! Each configuration runs in its own child process, so its peak resident memory (VmHWM) is
//! its own; the table lists the peak above the process's baseline, and the time per
//! forward + backward (min and median of the runs).

use anyhow::{bail, Context, Result};
use candle_core::{Device, ModuleT, Tensor};
use candle_nn::VarMap;
use sagan::config::{AttentionConfig, WeightInit};
use sagan::model::SelfAttention;
use sagan::rng::{normal_vec, seeded_var_builder, stream};
use std::time::Instant;

/// A memory figure of this process from /proc/self/status ("VmRSS", "VmHWM": the peak), in MiB.
fn memory_mib(field: &str) -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    Ok(kib / 1024.0)
}

/// One configuration, in this process: prints "ms_min ms_median peak_mib".
fn measure(side: usize, pooled: bool, batch: usize, channels: usize, runs: usize) -> Result<()> {
    sagan::train::cpu::flush_denormals();
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let block = SelfAttention::new(
        seeded_var_builder(&varmap, stream(1, 1), &device),
        channels,
        &AttentionConfig { pooled },
        WeightInit::default(),
    )?;
    // A non-zero gamma: the attention output must reach the loss, as in a trained model.
    for (name, var) in varmap.data().lock().expect("varmap").iter() {
        if name == "gamma" {
            var.set(&Tensor::new(&[0.5f32], &device)?)?;
        }
    }
    let n = batch * channels * side * side;
    let x = Tensor::from_vec(
        normal_vec(&mut stream(2, 2), n),
        (batch, channels, side, side),
        &device,
    )?;
    let baseline = memory_mib("VmRSS")?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let loss = block.forward_t(&x, true)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        drop((loss, grads));
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{:.1} {:.1} {:.0}",
        times[0],
        times[times.len() / 2],
        memory_mib("VmHWM")? - baseline
    );
    Ok(())
}

fn flag(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} needs a number")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let batch = flag(&args, "--batch", 1)?;
    let channels = flag(&args, "--channels", 64)?;
    let runs = flag(&args, "--runs", 3)?;
    let threads = flag(&args, "--threads", 2)?;
    if batch == 0 || channels < 8 || runs == 0 {
        bail!("--batch and --runs must be positive, --channels at least 8");
    }
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let side: usize = args[i + 1].parse()?;
        let pooled = args[i + 2] == "pooled";
        sagan::train::cpu::configure(Some(threads))?;
        return measure(side, pooled, batch, channels, runs);
    }
    println!(
        "Self-attention forward + backward, batch {batch}, {channels} channels, {threads} threads, {runs} runs\n"
    );
    println!("| feature map | form | map per image | time min (ms) | time median (ms) | peak memory (MiB) |");
    println!("|---|---|---|---:|---:|---:|");
    let exe = std::env::current_exe()?;
    for side in [64usize, 128] {
        for form in ["plain", "pooled"] {
            let out = std::process::Command::new(&exe)
                .args(["--child", &side.to_string(), form])
                .args([
                    "--batch",
                    &batch.to_string(),
                    "--channels",
                    &channels.to_string(),
                ])
                .args([
                    "--runs",
                    &runs.to_string(),
                    "--threads",
                    &threads.to_string(),
                ])
                .output()
                .with_context(|| format!("running {}", exe.display()))?;
            if !out.status.success() {
                println!(
                    "| {side}x{side} | {form} | | failed: {} | | |",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                continue;
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let fields: Vec<&str> = text.split_whitespace().collect();
            let n = side * side;
            let keys = if form == "pooled" { n / 4 } else { n };
            println!(
                "| {side}x{side} | {form} | {n} x {keys} | {} | {} | {} |",
                fields.first().unwrap_or(&"?"),
                fields.get(1).unwrap_or(&"?"),
                fields.get(2).unwrap_or(&"?")
            );
        }
    }
    Ok(())
}
