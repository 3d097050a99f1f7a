//! sagan-export: a generator checkpoint to ONNX, verified against the training graph.

use clap::{Parser, ValueEnum};
use sagan::export::session::{self, Request, Target};
use sagan::export::triton::{InstanceKind, ServingOptions};
use sagan::export::{ExportOptions, Weights};
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
///   sagan-export --triton models/ --max-batch 32 --instances 2 --tensorrt --trt-fp16
///       # a Triton Inference Server model repository: models/<preset>/config.pbtxt and
///       # models/<preset>/1/model.onnx (the next export of it goes to models/<preset>/2/)
#[derive(Parser, Debug)]
#[command(name = "sagan-export", version, verbatim_doc_comment)]
struct Args {
    /// Where to write the ONNX model.
    #[arg(default_value = "model.onnx")]
    output: PathBuf,

    /// Write into this Triton Inference Server model repository instead (created if missing;
    /// an existing directory must be a repository): REPO/NAME/config.pbtxt and
    /// REPO/NAME/<version>/model.onnx, a new version directory when the model exists.
    #[arg(long, value_name = "REPO", conflicts_with = "output")]
    triton: Option<PathBuf>,

    /// Triton: the model's name [default: the preset's].
    #[arg(long, requires = "triton")]
    name: Option<String>,

    /// Triton: the largest batch it forms from queued requests (dynamic batching).
    #[arg(long, value_name = "N", default_value_t = 64, requires = "triton")]
    max_batch: usize,

    /// Triton: model instances per GPU (or on the CPU), running batches concurrently.
    #[arg(long, value_name = "K", default_value_t = 1, requires = "triton")]
    instances: usize,

    /// Triton: where the instances run.
    #[arg(long, value_enum, default_value_t = KindArg::Gpu, requires = "triton")]
    kind: KindArg,

    /// Triton: run the model through ONNX Runtime's TensorRT provider (GPU only).
    #[arg(long, requires = "triton")]
    tensorrt: bool,

    /// Triton: let TensorRT use FP16 kernels.
    #[arg(long, requires = "tensorrt")]
    trt_fp16: bool,

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KindArg {
    Gpu,
    Cpu,
}

impl Args {
    fn request(self) -> Request {
        Request {
            checkpoint: self.checkpoint,
            weights: match self.raw {
                true => Weights::Raw,
                false => Weights::Preferred,
            },
            options: ExportOptions {
                attention_maps: self.attention_maps,
                decompose_conv_transpose: self.decompose_conv_transpose,
                force: self.force,
            },
            target: match self.triton {
                None => Target::Onnx(self.output),
                Some(repo) => Target::Triton {
                    repo,
                    name: self.name,
                    serving: ServingOptions {
                        max_batch: self.max_batch,
                        instances: self.instances,
                        kind: match self.kind {
                            KindArg::Gpu => InstanceKind::Gpu,
                            KindArg::Cpu => InstanceKind::Cpu,
                        },
                        tensorrt: self.tensorrt.then_some(self.trt_fp16),
                    },
                },
            },
        }
    }
}

fn main() {
    let request = Args::parse().request();
    sagan::logging::init("info", false);
    if let Err(e) = session::run(&request) {
        eprintln!("error: {:#}", anyhow::Error::from(e));
        std::process::exit(1);
    }
}
