//! One sagan-export invocation: a checkpoint to an ONNX file, or into a Triton Inference Server
//! model repository; prints what it wrote.

use super::triton::{export_to_repository, ConfigWrite, ServingOptions};
use super::EXPORT_TOLERANCE;
use super::{export_checkpoint, resolve_checkpoint, ExportOptions, ExportReport, Weights};
use crate::Result;
use std::path::PathBuf;

/// What the user asked for: sagan-export's flags.
#[derive(Clone, Debug)]
pub struct Request {
    /// A run directory, a checkpoint step directory or a generator .safetensors file; `None`:
    /// the newest checkpoint of any run under runs/.
    pub checkpoint: Option<PathBuf>,
    pub weights: Weights,
    pub options: ExportOptions,
    pub target: Target,
}

/// Where the export goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// One ONNX file.
    Onnx(PathBuf),
    /// A new version of model `name` (default: the preset's) in the repository `repo`.
    Triton {
        repo: PathBuf,
        name: Option<String>,
        serving: ServingOptions,
    },
}

/// Exports as `request` asks and prints what was written.
pub fn run(request: &Request) -> Result<()> {
    let checkpoint = resolve_checkpoint(request.checkpoint.as_deref(), request.weights)?;
    let opts = &request.options;
    let (repo, name, serving) = match &request.target {
        Target::Onnx(output) => {
            print_report(&export_checkpoint(&checkpoint, output, opts)?);
            return Ok(());
        }
        Target::Triton {
            repo,
            name,
            serving,
        } => (repo, name.as_deref(), serving),
    };
    let report = export_to_repository(&checkpoint, repo, name, opts, serving)?;
    print_report(&report.export);
    let config = report.model_dir.join("config.pbtxt");
    match report.config {
        ConfigWrite::Created => println!("{}: written", config.display()),
        ConfigWrite::Replaced => println!(
            "{}: replaced (unedited since sagan-export wrote it)",
            config.display()
        ),
        ConfigWrite::Unchanged => println!("{}: unchanged", config.display()),
        ConfigWrite::KeptEdited => println!(
            "{}: kept as edited (this export's serving flags and metadata are not in it)",
            config.display()
        ),
    }
    println!(
        "Triton model '{}' version {}: tritonserver --model-repository {}",
        report.name,
        report.version,
        repo.display()
    );
    Ok(())
}

fn print_report(report: &ExportReport) {
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
}
