//! sagan-export: a generator checkpoint to ONNX, verified against the training graph.

use anyhow::Result;
use clap::Parser;
use sagan::export::{
    export_checkpoint, resolve_checkpoint, ExportOptions, Weights, EXPORT_TOLERANCE,
};
use std::path::PathBuf;

/// Convert a sagan generator checkpoint into an ONNX model any ONNX runtime can serve.
///
/// Spectral norm and batch norm are folded into the convolution weights; the moving-average
/// (EMA) weights are used when the run kept them. Input `z` float32 [batch, z_dim], output
/// `image` float32 [batch, C, H, W] in [-1, 1]; opset 17, IR version 8; metadata_props carry
/// the preset, step and z_dim so sagan-infer needs no side file.
///
/// The written file is read back and evaluated on a few latents with candle-onnx; if it does
/// not reproduce the candle generator within 1e-4 the command fails and writes nothing.
///
/// Examples:
///   sagan-export model.onnx                              # newest checkpoint under runs/
///   sagan-export g.onnx --checkpoint runs/sagan64        # that run's latest checkpoint
///   sagan-export g.onnx --checkpoint runs/x/checkpoints/step-00001000/generator.safetensors
///   sagan-export g.onnx --attention-maps                 # + attention_0.. outputs for the viewer
///   sagan-export g.onnx --decompose-conv-transpose       # for runtimes without ConvTranspose
#[derive(Parser, Debug)]
#[command(name = "sagan-export", version, verbatim_doc_comment)]
struct Args {
    /// Where to write the ONNX model.
    #[arg(default_value = "model.onnx")]
    output: PathBuf,

    /// A run directory, a checkpoint step directory, or a generator .safetensors file.
    /// Default: the newest checkpoint of any run under runs/.
    #[arg(long)]
    checkpoint: Option<PathBuf>,

    /// Export the raw generator weights instead of their moving average.
    #[arg(long)]
    raw: bool,

    /// Add each attention layer's map [batch, N, N] as outputs attention_0, attention_1, ...
    #[arg(long)]
    attention_maps: bool,

    /// Write each ConvTranspose as zero insertion plus Conv.
    #[arg(long)]
    decompose_conv_transpose: bool,

    /// Replace OUTPUT even if it is not an ONNX model sagan wrote (a model sagan wrote is
    /// replaced without it; a .safetensors file never is).
    #[arg(long)]
    force: bool,
}

fn main() {
    sagan::logging::init("info", false);
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let weights = if args.raw {
        Weights::Raw
    } else {
        Weights::Preferred
    };
    let checkpoint = resolve_checkpoint(args.checkpoint.as_deref(), weights)?;
    let opts = ExportOptions {
        attention_maps: args.attention_maps,
        decompose_conv_transpose: args.decompose_conv_transpose,
        force: args.force,
    };
    let report = export_checkpoint(&checkpoint, &args.output, &opts)?;
    println!(
        "{}: {} at step {} from {} ({} bytes, {} nodes, max |candle - onnx| = {:.2e} <= {EXPORT_TOLERANCE:e})",
        report.output.display(),
        report.preset,
        report.step,
        report.checkpoint.display(),
        report.bytes,
        report.nodes,
        report.max_abs_diff
    );
    Ok(())
}
