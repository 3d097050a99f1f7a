//! Triton Inference Server model repositories: a verified export written as
//! `REPO/NAME/config.pbtxt` + `REPO/NAME/<version>/model.onnx`, the layout Triton's ONNX Runtime
//! backend loads as it is. The config is derived from the exported graph itself (names, shapes,
//! dtypes) and its metadata, so the two cannot disagree.

use super::graph::{shape_of, Dim};
use super::{export_checkpoint, ExportOptions, ExportReport};
use crate::{Error, Result};
use candle_onnx::onnx::{tensor_proto::DataType, type_proto, GraphProto, ModelProto};
use prost::Message;
use std::path::{Path, PathBuf};

/// Where Triton places model instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKind {
    Gpu,
    Cpu,
}

/// How the model is served: the choices config.pbtxt records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingOptions {
    /// Largest batch Triton forms from queued requests (and the largest a client may send).
    pub max_batch: usize,
    /// Model instances per device (per GPU for `Gpu`).
    pub instances: usize,
    pub kind: InstanceKind,
    /// Run the ONNX model through ONNX Runtime's TensorRT provider; `Some(true)` allows FP16.
    pub tensorrt: Option<bool>,
}

impl Default for ServingOptions {
    fn default() -> Self {
        Self {
            max_batch: 64,
            instances: 1,
            kind: InstanceKind::Gpu,
            tensorrt: None,
        }
    }
}

impl ServingOptions {
    /// Rejects options Triton would refuse or that make no sense together.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: &str| Err(Error::Config(msg.into()));
        if self.max_batch == 0 {
            return bad("--max-batch must be at least 1 (with 0 Triton would not batch and the batch axis would have to be part of every request's shape)");
        }
        if self.instances == 0 {
            return bad("--instances must be at least 1");
        }
        if self.tensorrt.is_some() && self.kind == InstanceKind::Cpu {
            return bad("--tensorrt needs --kind gpu (TensorRT runs on GPUs only)");
        }
        Ok(())
    }
}

/// Accepts the model names Triton loads and addresses without surprises: letters, digits, `_`,
/// `-` and `.`, not starting with `.` (Triton rejects `..` and `/`; hidden directories and
/// characters that need escaping in `/v2/models/NAME` URLs are refused here too).
pub fn check_model_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "'{name}' is not a usable Triton model name (1 to 128 of letters, digits, '_', '-', '.'; not starting with '.'): pass --name"
        )))
    }
}

/// An input or output as Triton describes it: the batch dimension left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// Triton's data type name, e.g. `TYPE_FP32`.
    pub data_type: &'static str,
    /// The dimensions after the batch one.
    pub dims: Vec<usize>,
}

/// The inputs and outputs of an exported graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl Signature {
    /// Reads the signature of `model`, whose every input and output must be batch-first with
    /// fixed other dimensions (as sagan-export writes them).
    pub fn of(model: &ModelProto, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| bad("the model has no graph".into()))?;
        let spec = |info: &candle_onnx::onnx::ValueInfoProto| -> Result<TensorSpec> {
            let elem = match info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(type_proto::Value::TensorType(t)) => t.elem_type,
                _ => return Err(bad(format!("'{}' is not a tensor", info.name))),
            };
            let data_type = match DataType::try_from(elem) {
                Ok(DataType::Float) => "TYPE_FP32",
                Ok(DataType::Int64) => "TYPE_INT64",
                _ => {
                    return Err(bad(format!(
                        "'{}' has a data type Triton configs here do not cover (ONNX type {elem})",
                        info.name
                    )))
                }
            };
            match shape_of(graph, &info.name).as_deref() {
                Some([Dim::Batch, rest @ ..]) => Ok(TensorSpec {
                    name: info.name.clone(),
                    data_type,
                    dims: rest
                        .iter()
                        .map(|d| match d {
                            Dim::Fixed(n) => Ok(*n),
                            Dim::Batch => Err(bad(format!(
                                "'{}' has a symbolic dimension after the batch one",
                                info.name
                            ))),
                        })
                        .collect::<Result<_>>()?,
                }),
                _ => Err(bad(format!(
                    "'{}' has no symbolic batch dimension first",
                    info.name
                ))),
            }
        };
        let all = |values: &[candle_onnx::onnx::ValueInfoProto]| {
            values.iter().map(spec).collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            inputs: all(&graph_inputs(graph))?,
            outputs: all(&graph.output)?,
        })
    }

    /// One line per tensor, e.g. `z FP32 [128]`, for error messages.
    fn describe(&self) -> String {
        let one = |t: &TensorSpec| {
            format!(
                "{} {} {:?}",
                t.name,
                t.data_type.trim_start_matches("TYPE_"),
                t.dims
            )
        };
        let list = |ts: &[TensorSpec]| ts.iter().map(one).collect::<Vec<_>>().join(", ");
        format!("in: {}; out: {}", list(&self.inputs), list(&self.outputs))
    }
}

/// Graph inputs that are not initializers (older IR versions list weights as inputs too).
fn graph_inputs(graph: &GraphProto) -> Vec<candle_onnx::onnx::ValueInfoProto> {
    graph
        .input
        .iter()
        .filter(|i| !graph.initializer.iter().any(|t| t.name == i.name))
        .cloned()
        .collect()
}

/// The first line of every config.pbtxt sagan-export writes: how it recognises its own.
const HEADER: &str = "# Triton Inference Server model configuration written by sagan-export.";
/// The last line: a hash of everything above it. While it matches, nobody edited the file and
/// the next export may replace it; once edited, the file is the user's and is left alone.
const FINGERPRINT: &str = "# sagan-export fingerprint (edit the file and it is never rewritten): ";

/// FNV-1a, 64 bit: enough to notice an edit, and no dependency.
fn fingerprint(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Whether `text` is a config sagan-export wrote and nobody changed since.
fn is_unedited(text: &str) -> bool {
    let body_end = text.trim_end_matches('\n').rfind('\n').map_or(0, |i| i + 1);
    let (body, last) = text.split_at(body_end);
    text.starts_with(HEADER) && last.trim_end() == format!("{FINGERPRINT}{}", fingerprint(body))
}

/// A string in protobuf text format.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_ascii_control() => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn dims_list(dims: &[usize]) -> String {
    let dims: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("[ {} ]", dims.join(", "))
}

/// Triton needs at least one dimension per tensor: a graph input of shape [batch] (the class)
/// is declared [batch, 1] and reshaped back by Triton before it reaches the model.
fn declared_dims(t: &TensorSpec) -> (Vec<usize>, bool) {
    match t.dims.is_empty() {
        true => (vec![1], true),
        false => (t.dims.clone(), false),
    }
}

fn tensor_block(section: &str, tensors: &[TensorSpec]) -> String {
    let entries: Vec<String> = tensors
        .iter()
        .map(|t| {
            let (dims, reshape) = declared_dims(t);
            let reshape = match reshape {
                true => "\n    # The graph takes [batch]: clients send [batch, 1], Triton drops the 1.\n    reshape: { shape: [ ] }",
                false => "",
            };
            format!(
                "  {{\n    name: {}\n    data_type: {}\n    dims: {}{reshape}\n  }}",
                quoted(&t.name),
                t.data_type,
                dims_list(&dims)
            )
        })
        .collect();
    format!("{section} [\n{}\n]\n", entries.join(",\n"))
}

/// Batch sizes Triton prefers to form: powers of two from 8 up to the maximum, and the maximum.
fn preferred_batch_sizes(max_batch: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = std::iter::successors(Some(8usize), |s| s.checked_mul(2))
        .take_while(|&s| s < max_batch)
        .collect();
    sizes.push(max_batch);
    sizes
}

/// The metadata a config carries as `parameters`: sagan's keys of the ONNX file but the whole
/// model description (long, and in the file for whoever needs it).
pub fn parameters(model: &ModelProto) -> Vec<(String, String)> {
    model
        .metadata_props
        .iter()
        .filter(|p| p.key.starts_with("sagan.") && p.key != "sagan.model")
        .map(|p| (p.key.clone(), p.value.clone()))
        .collect()
}

/// config.pbtxt for a model with `signature` and `parameters` served as `name` with `opts`,
/// every choice explained in a comment.
pub fn model_config(
    name: &str,
    signature: &Signature,
    parameters: &[(String, String)],
    opts: &ServingOptions,
) -> String {
    let (kind, placement) = match opts.kind {
        InstanceKind::Gpu => ("KIND_GPU", "on every GPU Triton sees"),
        InstanceKind::Cpu => ("KIND_CPU", "on the CPU"),
    };
    let tensorrt = match opts.tensorrt {
        None => String::new(),
        Some(fp16) => format!(
            r#"# ONNX Runtime hands the graph to TensorRT; FP16 allows half-precision kernels (faster on
# tensor cores; the images end up 8-bit anyway).
optimization {{
  execution_accelerators {{
    gpu_execution_accelerator: [
      {{
        name: "tensorrt"
        parameters {{ key: "precision_mode" value: "{}" }}
      }}
    ]
  }}
}}
"#,
            if fp16 { "FP16" } else { "FP32" }
        ),
    };
    let mut warmup_sizes = vec![1];
    if opts.max_batch > 1 {
        warmup_sizes.push(opts.max_batch);
    }
    let warmups: Vec<String> = warmup_sizes
        .iter()
        .map(|batch| {
            let inputs: String = signature
                .inputs
                .iter()
                .map(|t| {
                    format!(
                        "\n    inputs {{ key: {} value {{ data_type: {} dims: {} zero_data: true }} }}",
                        quoted(&t.name),
                        t.data_type,
                        dims_list(&declared_dims(t).0)
                    )
                })
                .collect();
            format!("  {{\n    name: \"zeros_batch_{batch}\"\n    batch_size: {batch}{inputs}\n  }}")
        })
        .collect();
    let parameters: String = parameters
        .iter()
        .map(|(key, value)| {
            format!(
                "parameters {{ key: {} value {{ string_value: {} }} }}\n",
                quoted(key),
                quoted(value)
            )
        })
        .collect();
    let body = format!(
        r#"{HEADER}
# New exports of the same model go to a new version directory; Triton serves the newest (its
# default version_policy). Text format of Triton's ModelConfig message.
name: {name}
platform: "onnxruntime_onnx"
# Triton batches requests up to this many images; the graph's batch axis is symbolic.
max_batch_size: {max_batch}
# Shapes leave out the batch dimension: Triton adds it since max_batch_size > 0.
{inputs}{outputs}# Requests queued together run as one batch; waiting up to 100 us for more trades a little
# latency for throughput under load.
dynamic_batching {{
  preferred_batch_size: {preferred}
  max_queue_delay_microseconds: 100
}}
# Copies of the model {placement}: more than one overlap one batch's transfers with another's
# compute.
instance_group [
  {{
    count: {instances}
    kind: {kind}
  }}
]
{tensorrt}# Runs before the model is marked ready, so no client pays for first-run allocation (or for
# TensorRT building engines that cover batch 1 to max_batch_size). Zeros, not random data: a
# random class would be out of range.
model_warmup [
{warmups}
]
# sagan's metadata, as in model.onnx: clients read the latent size, the classes and the value
# range of `image` from here.
{parameters}"#,
        name = quoted(name),
        max_batch = opts.max_batch,
        inputs = tensor_block("input", &signature.inputs),
        outputs = tensor_block("output", &signature.outputs),
        preferred = dims_list(&preferred_batch_sizes(opts.max_batch)),
        instances = opts.instances,
        warmups = warmups.join(",\n"),
    );
    let hash = fingerprint(&body);
    format!("{body}{FINGERPRINT}{hash}\n")
}

/// Numbered version directories Triton serves: decimal names without a leading zero.
fn version_of(name: &str) -> Option<u64> {
    (!name.starts_with('0') && name.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.parse().ok())
        .flatten()
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// The names in `dir`, but hidden ones (which Triton does not treat as models or versions).
fn visible_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_hidden(&name) {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// A directory Triton would take for a model: a config.pbtxt or a numbered version inside.
fn looks_like_model(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        return Ok(false);
    }
    Ok(dir.join("config.pbtxt").is_file()
        || visible_entries(dir)?
            .iter()
            .any(|(name, path)| version_of(name).is_some() && path.is_dir()))
}

/// Refuses an existing `repo` that is not a model repository (a file, or a directory holding
/// anything but model directories), so that exporting into the wrong place writes nothing.
fn check_repository(repo: &Path) -> Result<()> {
    let not_repo = |what: String| {
        Error::Checkpoint {
        path: repo.to_path_buf(),
        msg: format!("is not a Triton model repository ({what}): pass a new or empty directory, or an existing repository"),
    }
    };
    if !repo.exists() {
        return match repo.parent() {
            Some(p) if !p.as_os_str().is_empty() && !p.is_dir() => Err(Error::io(
                repo,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "its parent directory does not exist",
                ),
            )),
            _ => Ok(()),
        };
    }
    if !repo.is_dir() {
        return Err(not_repo("it is a file".into()));
    }
    for (name, path) in visible_entries(repo)? {
        if !looks_like_model(&path)? {
            return Err(not_repo(format!(
                "'{name}' is not a model directory with config.pbtxt or numbered versions"
            )));
        }
    }
    Ok(())
}

fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    ModelProto::decode(bytes.as_slice()).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("does not decode as ONNX: {e}"),
    })
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir(path).map_err(|e| Error::io(path, e))
}

/// What an existing model directory allows.
struct ExistingModel {
    next_version: u64,
    /// Its config.pbtxt is sagan-export's, unedited: the next export may replace it.
    config_unedited: bool,
}

/// Checks that `dir`, an existing model directory, is one sagan-export wrote and that its
/// newest version has the same inputs and outputs as `signature`.
fn existing_model(dir: &Path, signature: &Signature) -> Result<ExistingModel> {
    let config_path = dir.join("config.pbtxt");
    let not_ours = || Error::Checkpoint {
        path: dir.to_path_buf(),
        msg: "exists and was not written by sagan-export: pass another --name".into(),
    };
    let config = std::fs::read_to_string(&config_path).map_err(|_| not_ours())?;
    if !config.starts_with(HEADER) {
        return Err(not_ours());
    }
    let latest = visible_entries(dir)?
        .iter()
        .filter_map(|(name, _)| version_of(name))
        .max()
        .unwrap_or(0);
    if latest > 0 {
        let file = dir.join(latest.to_string()).join("model.onnx");
        let theirs = Signature::of(&read_model(&file)?, &file)?;
        if &theirs != signature {
            return Err(Error::Checkpoint {
                path: file,
                msg: format!(
                    "has other inputs or outputs ({}) than this export ({}): one config cannot serve both, pass another --name",
                    theirs.describe(),
                    signature.describe()
                ),
            });
        }
    }
    Ok(ExistingModel {
        next_version: latest + 1,
        config_unedited: is_unedited(&config),
    })
}

/// What happened to config.pbtxt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigWrite {
    /// A new model: written.
    Created,
    /// sagan-export's own unedited config: replaced by this export's.
    Replaced,
    /// Already what this export would write.
    Unchanged,
    /// Edited by someone since sagan-export wrote it: left as it is.
    KeptEdited,
}

/// What an export into a repository wrote.
#[derive(Debug, Clone)]
pub struct RepositoryReport {
    /// The verified export; `output` is the final model.onnx.
    pub export: ExportReport,
    pub name: String,
    pub model_dir: PathBuf,
    pub version: u64,
    pub config: ConfigWrite,
}

/// Exports `checkpoint` into the Triton model repository `repo` as model `name` (default: the
/// preset's name): `repo/name/config.pbtxt` and `repo/name/<version>/model.onnx`, the version
/// one past the newest present. Everything is assembled in a hidden directory and renamed into
/// place, so Triton never sees a half-written model and a failure leaves nothing behind.
pub fn export_to_repository(
    checkpoint: &Path,
    repo: &Path,
    name: Option<&str>,
    export: &ExportOptions,
    serving: &ServingOptions,
) -> Result<RepositoryReport> {
    serving.validate()?;
    if let Some(name) = name {
        check_model_name(name)?;
    }
    check_repository(repo)?;
    let created_repo = !repo.exists();
    if created_repo {
        create_dir(repo)?;
    }
    let staging = repo.join(format!(".sagan-export.tmp{}", std::process::id()));
    let result = create_dir(&staging)
        .and_then(|()| stage_and_place(checkpoint, repo, &staging, name, export, serving));
    // The staging directory is ours (its name carries our process id); it is empty or gone on
    // success and holds at most a partial export on failure.
    let _ = std::fs::remove_dir_all(&staging);
    if result.is_err() && created_repo {
        let _ = std::fs::remove_dir(repo);
    }
    result
}

fn stage_and_place(
    checkpoint: &Path,
    repo: &Path,
    staging: &Path,
    name: Option<&str>,
    export: &ExportOptions,
    serving: &ServingOptions,
) -> Result<RepositoryReport> {
    let version_dir = staging.join("version");
    create_dir(&version_dir)?;
    let onnx = version_dir.join("model.onnx");
    let mut report = export_checkpoint(checkpoint, &onnx, export)?;
    let model = read_model(&onnx)?;
    let name = match name {
        Some(name) => name.to_string(),
        None => {
            check_model_name(&report.preset)?;
            report.preset.clone()
        }
    };
    let signature = Signature::of(&model, &onnx)?;
    let config = model_config(&name, &signature, &parameters(&model), serving);
    let model_dir = repo.join(&name);
    let rename = |from: &Path, to: &Path| std::fs::rename(from, to).map_err(|e| Error::io(to, e));
    let (version, config_write) = if model_dir.exists() {
        let existing = existing_model(&model_dir, &signature)?;
        let config_path = model_dir.join("config.pbtxt");
        let config_write = match std::fs::read_to_string(&config_path) {
            Ok(old) if old == config => ConfigWrite::Unchanged,
            _ if existing.config_unedited => ConfigWrite::Replaced,
            _ => ConfigWrite::KeptEdited,
        };
        let version = existing.next_version;
        rename(&version_dir, &model_dir.join(version.to_string()))?;
        if config_write == ConfigWrite::Replaced {
            crate::fsutil::write_atomic(&config_path, config.as_bytes())?;
        }
        (version, config_write)
    } else {
        let staged_model = staging.join("model");
        create_dir(&staged_model)?;
        let config_path = staged_model.join("config.pbtxt");
        std::fs::write(&config_path, &config).map_err(|e| Error::io(&config_path, e))?;
        rename(&version_dir, &staged_model.join("1"))?;
        rename(&staged_model, &model_dir)?;
        (1, ConfigWrite::Created)
    };
    report.output = model_dir.join(version.to_string()).join("model.onnx");
    Ok(RepositoryReport {
        export: report,
        name,
        model_dir,
        version,
        config: config_write,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::export::generator_to_onnx;
    use crate::model::Generator;
    use crate::rng::{seeded_var_builder, stream};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn exported(preset: &str) -> ModelProto {
        let cfg = ModelConfig::resolve(preset).unwrap();
        let varmap = VarMap::new();
        let g = Generator::new(
            seeded_var_builder(&varmap, stream(0, 1), &Device::Cpu),
            &cfg,
        )
        .unwrap();
        let metadata = vec![
            ("sagan.preset".to_string(), cfg.name.clone()),
            ("sagan.model".to_string(), cfg.to_json()),
            ("sagan.step".to_string(), "5".to_string()),
        ];
        generator_to_onnx(&g, &cfg, metadata, &ExportOptions::default()).unwrap()
    }

    #[test]
    fn model_names_triton_cannot_take_are_refused() {
        for good in ["sagan64", "sagan-cond-mnist32", "a_b.c", "X1"] {
            check_model_name(good).unwrap();
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "has space",
            "é",
            &long,
        ] {
            let err = check_model_name(bad).unwrap_err().to_string();
            assert!(err.contains("--name"), "{bad}: {err}");
        }
    }

    #[test]
    fn serving_options_are_validated() {
        ServingOptions::default().validate().unwrap();
        let cases = [
            (
                ServingOptions {
                    max_batch: 0,
                    ..Default::default()
                },
                "--max-batch",
            ),
            (
                ServingOptions {
                    instances: 0,
                    ..Default::default()
                },
                "--instances",
            ),
            (
                ServingOptions {
                    kind: InstanceKind::Cpu,
                    tensorrt: Some(false),
                    ..Default::default()
                },
                "--tensorrt",
            ),
        ];
        for (opts, flag) in cases {
            let err = opts.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn preferred_batch_sizes_are_powers_of_two_up_to_the_maximum() {
        assert_eq!(preferred_batch_sizes(1), [1]);
        assert_eq!(preferred_batch_sizes(8), [8]);
        assert_eq!(preferred_batch_sizes(64), [8, 16, 32, 64]);
        assert_eq!(preferred_batch_sizes(100), [8, 16, 32, 64, 100]);
    }

    #[test]
    fn strings_are_escaped_for_protobuf_text_format() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quoted("x\ny\t"), r#""x\ny\011""#);
        assert_eq!(quoted("é"), "\"é\"");
    }

    #[test]
    fn signature_leaves_out_the_batch_dimension() {
        let sig = Signature::of(&exported("sagan-cond-mnist32"), Path::new("m.onnx")).unwrap();
        let spec = |name: &str, data_type, dims: &[usize]| TensorSpec {
            name: name.into(),
            data_type,
            dims: dims.to_vec(),
        };
        assert_eq!(
            sig.inputs,
            [
                spec("z", "TYPE_FP32", &[64]),
                spec("class", "TYPE_INT64", &[])
            ]
        );
        assert_eq!(sig.outputs, [spec("image", "TYPE_FP32", &[1, 32, 32])]);
    }

    #[test]
    fn config_declares_the_graph_and_the_options() {
        let model = exported("sagan-cond-mnist32");
        let sig = Signature::of(&model, Path::new("m.onnx")).unwrap();
        let params = parameters(&model);
        assert_eq!(
            params,
            [
                ("sagan.preset".to_string(), "sagan-cond-mnist32".to_string()),
                ("sagan.step".to_string(), "5".to_string()),
                ("sagan.attention_outputs".to_string(), "0".to_string()),
            ]
        );
        let plain = model_config("digits", &sig, &params, &ServingOptions::default());
        assert!(plain.contains("name: \"digits\"\n"));
        assert!(plain.contains("max_batch_size: 64\n"));
        assert!(plain.contains("dims: [ 1 ]\n    # The graph takes [batch]"));
        assert!(plain.contains("reshape: { shape: [ ] }"));
        assert!(plain.contains("dims: [ 1, 32, 32 ]"));
        assert!(plain.contains("preferred_batch_size: [ 8, 16, 32, 64 ]"));
        assert!(plain.contains("count: 1\n    kind: KIND_GPU"));
        assert!(plain.contains("batch_size: 1\n") && plain.contains("batch_size: 64\n"));
        assert!(plain.contains(r#"parameters { key: "sagan.step" value { string_value: "5" } }"#));
        assert!(!plain.contains("sagan.model") && !plain.contains("tensorrt"));
        assert!(is_unedited(&plain));
        assert!(!is_unedited(&plain.replace("count: 1", "count: 2")));
        assert!(!is_unedited(&plain.replace(HEADER, "# mine")));

        let opts = ServingOptions {
            max_batch: 1,
            instances: 3,
            kind: InstanceKind::Gpu,
            tensorrt: Some(true),
        };
        let trt = model_config("digits", &sig, &params, &opts);
        assert!(trt.contains("name: \"tensorrt\""));
        assert!(trt.contains(r#"key: "precision_mode" value: "FP16""#));
        assert!(trt.contains("count: 3"));
        assert_eq!(
            trt.matches("\n    batch_size: ").count(),
            1,
            "one warm-up at batch 1"
        );
        let fp32 = ServingOptions {
            tensorrt: Some(false),
            ..opts
        };
        assert!(model_config("digits", &sig, &params, &fp32).contains(r#"value: "FP32""#));
    }

    #[test]
    fn versions_are_decimal_names_without_leading_zero() {
        assert_eq!(version_of("1"), Some(1));
        assert_eq!(version_of("42"), Some(42));
        for not in ["0", "01", "", "1a", "-1", "x"] {
            assert_eq!(version_of(not), None, "{not}");
        }
    }

    #[test]
    fn only_new_empty_or_model_holding_directories_are_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        check_repository(&root.join("new")).unwrap();
        std::fs::create_dir(root.join("empty")).unwrap();
        check_repository(&root.join("empty")).unwrap();
        std::fs::create_dir_all(root.join("repo/a/1")).unwrap();
        std::fs::create_dir_all(root.join("repo/b")).unwrap();
        std::fs::write(root.join("repo/b/config.pbtxt"), "").unwrap();
        std::fs::write(root.join("repo/.hidden"), "").unwrap();
        check_repository(&root.join("repo")).unwrap();
        std::fs::create_dir(root.join("repo/src")).unwrap();
        let err = check_repository(&root.join("repo"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("'src' is not a model directory"), "{err}");
        let err = check_repository(&root.join("repo/b/config.pbtxt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("it is a file"), "{err}");
    }
}
