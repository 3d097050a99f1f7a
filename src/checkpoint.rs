//! Checkpoints: safetensors files whose metadata say what they hold (kind, preset, training
//! configuration, step), grouped per step in a run directory and written atomically.
//!
//! ```text
//! RUN_DIR/checkpoints/step-00000500/generator.safetensors
//!                                  /generator_ema.safetensors   (when EMA is on)
//!                                  /discriminator.safetensors
//!                                  /optimizer.safetensors
//! ```

use crate::config::{ModelConfig, TrainConfig};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "sagan-checkpoint-v1";

/// What a checkpoint file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Generator,
    GeneratorEma,
    Discriminator,
    Optimizer,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Generator => "generator",
            Kind::GeneratorEma => "generator_ema",
            Kind::Discriminator => "discriminator",
            Kind::Optimizer => "optimizer",
        }
    }

    pub fn file_name(self) -> String {
        format!("{}.safetensors", self.name())
    }

    fn parse(name: &str) -> Option<Self> {
        [
            Kind::Generator,
            Kind::GeneratorEma,
            Kind::Discriminator,
            Kind::Optimizer,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// The metadata every sagan checkpoint file carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    pub kind: Kind,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub step: usize,
    /// The training run that wrote the file, shared by all files of one checkpoint, so files
    /// of different runs (or of two trainers racing on one directory) are never mixed up.
    /// Absent in files of older versions.
    pub run_id: Option<String>,
}

impl Metadata {
    fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("kind".to_string(), self.kind.name().to_string()),
            ("model".to_string(), self.model.to_json()),
            (
                "train".to_string(),
                serde_json::to_string(&self.train).unwrap_or_default(),
            ),
            ("step".to_string(), self.step.to_string()),
            ("seed".to_string(), self.train.seed.to_string()),
            (
                "producer".to_string(),
                format!("sagan {}", env!("CARGO_PKG_VERSION")),
            ),
        ]);
        if let Some(id) = &self.run_id {
            map.insert("run_id".to_string(), id.clone());
        }
        map
    }

    fn from_map(map: &HashMap<String, String>, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        if map.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(
                "not a sagan checkpoint (no sagan format tag in its metadata)".into(),
            ));
        }
        let field = |key: &str| {
            map.get(key)
                .ok_or_else(|| bad(format!("metadata lacks '{key}'")))
        };
        let kind = Kind::parse(field("kind")?)
            .ok_or_else(|| bad(format!("unknown kind '{}'", map["kind"])))?;
        let model =
            ModelConfig::from_json(field("model")?).map_err(|e| bad(format!("its preset: {e}")))?;
        let train = serde_json::from_str(field("train")?)
            .map_err(|e| bad(format!("its training config: {e}")))?;
        let step = field("step")?
            .parse()
            .map_err(|e| bad(format!("bad step: {e}")))?;
        Ok(Self {
            kind,
            model,
            train,
            step,
            run_id: map.get("run_id").cloned(),
        })
    }
}

/// One file of a checkpoint: its metadata and its named tensors.
pub type CheckpointFile = (Metadata, Vec<(String, Tensor)>);

/// All variables of `varmap`, sorted by name.
pub fn varmap_tensors(varmap: &VarMap) -> Vec<(String, Tensor)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut tensors: Vec<_> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// The name of the first floating-point tensor holding NaN or infinity, if any.
pub fn first_non_finite(tensors: &[(String, Tensor)]) -> Result<Option<String>> {
    for (name, t) in tensors {
        if !t.dtype().is_float() {
            continue;
        }
        // x - x is 0 for every finite x and NaN for NaN and infinities; a sum keeps any NaN.
        let probe = t.sub(t)?.sum_all()?.to_dtype(candle_core::DType::F32)?;
        if !probe.to_scalar::<f32>()?.is_finite() {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// Serialises tensors and metadata to `path` atomically. Tensors on a GPU are copied to the
/// CPU first: a checkpoint is the same file whatever device trained it.
pub fn save(path: &Path, tensors: &[(String, Tensor)], meta: &Metadata) -> Result<()> {
    let on_cpu = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let bytes =
        safetensors::tensor::serialize(on_cpu.iter().map(|(k, t)| (*k, t)), Some(meta.to_map()))
            .map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// The largest safetensors header read; real ones are kilobytes.
const MAX_HEADER: u64 = 100 << 20;

/// Reads the metadata of a checkpoint file from its header, without reading its tensors.
pub fn read_metadata(path: &Path) -> Result<Metadata> {
    use std::io::Read;
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)
        .map_err(|_| bad("not a readable safetensors file (shorter than its header)".into()))?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER || n > len - 8 {
        return Err(bad(format!(
            "not a readable safetensors file (declares a {n}-byte header in a {len}-byte file)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    // The header alone: safetensors' own reader wants the tensor data too.
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a readable safetensors file (header: {e})")))?;
    let map: HashMap<String, String> = json
        .get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    Metadata::from_map(&map, path)
}

/// Checks that the checkpoint files beside `path` (the other files of its step directory)
/// come from the same run and step, so a file copied in from elsewhere, or one left by a
/// second trainer racing on the directory, is not taken for part of this checkpoint.
pub fn check_siblings(path: &Path, meta: &Metadata) -> Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    for kind in [
        Kind::Generator,
        Kind::GeneratorEma,
        Kind::Discriminator,
        Kind::Optimizer,
    ] {
        let other = dir.join(kind.file_name());
        if other == path || !other.is_file() {
            continue;
        }
        let theirs = read_metadata(&other)?;
        let mismatch = |what: String| Error::Checkpoint {
            path: other.clone(),
            msg: format!(
                "{what} than {} beside it: the step directory mixes checkpoints",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
        };
        if theirs.model != meta.model {
            return Err(mismatch(format!(
                "holds another preset ({}, not {})",
                theirs.model.name, meta.model.name
            )));
        }
        if theirs.run_id != meta.run_id {
            return Err(mismatch(format!(
                "comes from another run (run id {}, not {})",
                theirs.run_id.as_deref().unwrap_or("none"),
                meta.run_id.as_deref().unwrap_or("none")
            )));
        }
        if theirs.step != meta.step {
            return Err(mismatch(format!(
                "holds another step ({}, not {})",
                theirs.step, meta.step
            )));
        }
    }
    Ok(())
}

/// Loads a checkpoint file: its tensors and its metadata.
pub fn load(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, Metadata)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes, path, Some(device)).map(|(t, meta)| (t.unwrap_or_default(), meta))
}

type Parsed = (Option<HashMap<String, Tensor>>, Metadata);

fn parse(bytes: &[u8], path: &Path, device: Option<&Device>) -> Result<Parsed> {
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a readable safetensors file ({e})")))?;
    let meta = Metadata::from_map(header.metadata().as_ref().unwrap_or(&HashMap::new()), path)?;
    let tensors = match device {
        None => None,
        Some(device) => Some(
            candle_core::safetensors::load_buffer(bytes, device)
                .map_err(|e| bad(format!("corrupt tensor data ({e})")))?,
        ),
    };
    Ok((tensors, meta))
}

/// Sets every variable of `varmap` from `tensors`; names and shapes must match exactly.
pub fn restore_varmap(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(extra) = tensors.keys().find(|k| !data.contains_key(*k)) {
        return Err(bad(format!(
            "holds '{extra}', which the model does not have"
        )));
    }
    let mut names: Vec<_> = data.keys().collect();
    names.sort();
    for name in names {
        let tensor = tensors
            .get(name)
            .ok_or_else(|| bad(format!("lacks '{name}'")))?;
        let var = &data[name];
        if tensor.shape() != var.shape() {
            return Err(bad(format!(
                "'{name}' has shape {:?}, the model expects {:?}",
                tensor.dims(),
                var.dims()
            )));
        }
        var.set(tensor)?;
    }
    Ok(())
}

const LOCK_FILE: &str = ".lock";

/// A run directory held by this process (see [`RunDir::lock`]).
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

/// A training run's directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub fn curves(&self) -> PathBuf {
        self.root.join("curves.png")
    }

    /// The checkpoint with the best FID so far (when training evaluates).
    pub fn best_dir(&self) -> PathBuf {
        self.checkpoints().join("best")
    }

    pub fn step_dir(&self, step: usize) -> PathBuf {
        self.checkpoints().join(format!("step-{step:08}"))
    }

    /// Complete checkpoints (directories named step-N), oldest first.
    pub fn checkpoint_steps(&self) -> Result<Vec<usize>> {
        let dir = self.checkpoints();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(dir, e)),
        };
        let mut steps: Vec<usize> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
            .collect();
        steps.sort_unstable();
        Ok(steps)
    }

    pub fn latest_step(&self) -> Result<Option<usize>> {
        Ok(self.checkpoint_steps()?.last().copied())
    }

    /// Takes the run directory for this process until the returned lock is dropped (or the
    /// process ends, however it ends): a second trainer on the same directory is refused
    /// instead of interleaving its checkpoint files with ours.
    pub fn lock(&self) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(&self.root).map_err(|e| Error::io(&self.root, e))?;
        let path = self.root.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {
                let pid = std::process::id().to_string();
                file.set_len(0)
                    .and_then(|()| file.rewind())
                    .and_then(|()| file.write_all(pid.as_bytes()))
                    .map_err(|e| Error::io(&path, e))?;
                Ok(RunLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("another process (pid {pid})"),
                };
                Err(Error::RunBusy {
                    path: self.root.clone(),
                    msg: format!(
                        "{holder} is training in this run directory; wait for it to finish or stop it (Ctrl-C saves a checkpoint)"
                    ),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }

    /// Removes what an interrupted write left behind: half-written checkpoint directories and
    /// temporary files. Only under the lock, so no live writer's files are taken.
    pub fn remove_stale_temporaries(&self, _lock: &RunLock) -> Result<usize> {
        let mut removed = 0;
        for dir in [self.root.clone(), self.checkpoints(), self.samples()] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(dir, e)),
            };
            for entry in entries.filter_map(|e| e.ok()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                let stale_dir = dir == self.checkpoints()
                    && name.starts_with(".step-")
                    && name.ends_with(".partial");
                if stale_dir {
                    std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
                    removed += 1;
                } else if crate::fsutil::is_temp_name(&name) {
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Creates the directories a run writes into.
    pub fn create(&self) -> Result<()> {
        for dir in [self.checkpoints(), self.samples()] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Ok(())
    }

    /// Writes one checkpoint, then removes all but the newest `keep_last` step checkpoints.
    pub fn write_checkpoint(
        &self,
        step: usize,
        files: &[CheckpointFile],
        keep_last: usize,
    ) -> Result<PathBuf> {
        let final_dir = self.step_dir(step);
        self.write_files(&final_dir, files)?;
        let steps = self.checkpoint_steps()?;
        for old in steps
            .iter()
            .take(steps.len().saturating_sub(keep_last.max(1)))
        {
            let dir = self.step_dir(*old);
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Ok(final_dir)
    }

    /// Replaces the best checkpoint.
    pub fn write_best(&self, files: &[CheckpointFile]) -> Result<PathBuf> {
        let dir = self.best_dir();
        self.write_files(&dir, files)?;
        Ok(dir)
    }

    /// The files go into a hidden directory that is renamed to `final_dir` only once all are
    /// complete, so a crash leaves the previous checkpoints intact.
    fn write_files(&self, final_dir: &Path, files: &[CheckpointFile]) -> Result<()> {
        let name = final_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp_dir = self.checkpoints().join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp_dir);
        std::fs::create_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
        let written = files.iter().try_for_each(|(meta, tensors)| {
            save(&tmp_dir.join(meta.kind.file_name()), tensors, meta)
        });
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&tmp_dir);
            return Err(e);
        }
        if final_dir.exists() {
            std::fs::remove_dir_all(final_dir).map_err(|e| Error::io(final_dir, e))?;
        }
        std::fs::rename(&tmp_dir, final_dir).map_err(|e| Error::io(final_dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(kind: Kind, step: usize) -> Metadata {
        Metadata {
            kind,
            model: ModelConfig::resolve("sagan-mnist28").unwrap(),
            train: TrainConfig::default(),
            step,
            run_id: Some("run-a".into()),
        }
    }

    fn tensors() -> Vec<(String, Tensor)> {
        vec![(
            "a.weight".into(),
            Tensor::arange(0f32, 6., &Device::Cpu)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
        )]
    }

    #[test]
    fn round_trip_keeps_tensors_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        save(&path, &tensors(), &meta(Kind::Generator, 42)).unwrap();
        let (loaded, m) = load(&path, &Device::Cpu).unwrap();
        assert_eq!(m, meta(Kind::Generator, 42));
        assert_eq!(
            loaded["a.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        assert_eq!(read_metadata(&path).unwrap().step, 42);
    }

    #[test]
    fn truncated_and_foreign_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        save(&path, &tensors(), &meta(Kind::Generator, 1)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = load(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("g.safetensors"), "{err}");

        let foreign = dir.path().join("foreign.safetensors");
        candle_core::safetensors::save(
            &HashMap::from([(
                "x",
                Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
            )]),
            &foreign,
        )
        .unwrap();
        let err = load(&foreign, &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("foreign.safetensors") && err.contains("not a sagan checkpoint"),
            "{err}"
        );
    }

    #[test]
    fn metadata_is_read_from_the_header_alone_and_bad_headers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        save(&path, &tensors(), &meta(Kind::Generator, 3)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // Tensor data cut off: the header still reads.
        let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        std::fs::write(&path, &bytes[..header_len]).unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta(Kind::Generator, 3));
        for bad in [
            bytes[..5].to_vec(),
            [u64::MAX.to_le_bytes().as_slice(), &bytes[8..]].concat(),
            bytes[..header_len - 1].to_vec(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let err = read_metadata(&path).unwrap_err().to_string();
            assert!(err.starts_with(&path.display().to_string()), "{err}");
        }
    }

    #[test]
    fn files_of_another_run_or_step_in_a_step_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let g = dir.path().join(Kind::Generator.file_name());
        let d = dir.path().join(Kind::Discriminator.file_name());
        save(&g, &tensors(), &meta(Kind::Generator, 5)).unwrap();
        save(&d, &tensors(), &meta(Kind::Discriminator, 5)).unwrap();
        check_siblings(&g, &meta(Kind::Generator, 5)).unwrap();
        let foreign = Metadata {
            run_id: Some("run-b".into()),
            ..meta(Kind::Discriminator, 5)
        };
        save(&d, &tensors(), &foreign).unwrap();
        let err = check_siblings(&g, &meta(Kind::Generator, 5))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("discriminator.safetensors") && err.contains("another run"),
            "{err}"
        );
        save(&d, &tensors(), &meta(Kind::Discriminator, 6)).unwrap();
        let err = check_siblings(&g, &meta(Kind::Generator, 5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("another step"), "{err}");
    }

    #[test]
    fn a_locked_run_refuses_a_second_holder_and_names_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path().join("run"));
        let held = run.lock().unwrap();
        let err = run.lock().unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("training"),
            "{err}"
        );
        drop(held);
        run.lock().unwrap();
    }

    #[test]
    fn stale_partial_checkpoints_and_temporaries_are_removed_under_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        run.create().unwrap();
        run.write_checkpoint(1, &[(meta(Kind::Generator, 1), tensors())], 2)
            .unwrap();
        let partial = run.checkpoints().join(".step-00000002.partial");
        std::fs::create_dir(&partial).unwrap();
        std::fs::write(partial.join("generator.safetensors"), b"half").unwrap();
        let temp = crate::fsutil::temp_path(&run.metrics());
        std::fs::write(&temp, b"half").unwrap();
        std::fs::write(run.samples().join("keep.png"), b"user's").unwrap();
        let lock = run.lock().unwrap();
        assert_eq!(run.remove_stale_temporaries(&lock).unwrap(), 2);
        assert!(!partial.exists() && !temp.exists());
        assert!(run.samples().join("keep.png").exists());
        assert_eq!(run.checkpoint_steps().unwrap(), vec![1]);
    }

    #[test]
    fn checkpoints_rotate_and_latest_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        run.create().unwrap();
        for step in [10, 20, 30, 40] {
            run.write_checkpoint(step, &[(meta(Kind::Generator, step), tensors())], 2)
                .unwrap();
        }
        assert_eq!(run.checkpoint_steps().unwrap(), vec![30, 40]);
        assert_eq!(run.latest_step().unwrap(), Some(40));
        assert!(run.step_dir(40).join("generator.safetensors").exists());
    }

    #[test]
    fn restore_rejects_missing_and_misshapen_variables() {
        let varmap = VarMap::new();
        varmap
            .get(
                (2, 3),
                "a.weight",
                candle_nn::Init::Const(0.),
                candle_core::DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let good: HashMap<_, _> = tensors().into_iter().collect();
        restore_varmap(&varmap, &good, Path::new("x")).unwrap();
        let wrong = HashMap::from([(
            "a.weight".to_string(),
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        )]);
        assert!(restore_varmap(&varmap, &wrong, Path::new("x"))
            .unwrap_err()
            .to_string()
            .contains("shape"));
        assert!(restore_varmap(&varmap, &HashMap::new(), Path::new("x"))
            .unwrap_err()
            .to_string()
            .contains("lacks"));
    }
}
