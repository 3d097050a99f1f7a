//! run.json: what a run directory is, beside its checkpoints: the run's identity (every
//! checkpoint file it writes carries the same run id) and its output schedule, so that a
//! resumed run keeps both.

use super::Schedule;
use crate::checkpoint::RunDir;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub run_id: String,
    pub preset: String,
    pub schedule: Schedule,
}

impl Manifest {
    pub fn path(run: &RunDir) -> PathBuf {
        run.root().join("run.json")
    }

    /// The run's manifest; None for runs written before there was one.
    pub fn read(run: &RunDir) -> Result<Option<Self>> {
        let path = Self::path(run);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Checkpoint {
                path,
                msg: format!("not a run manifest ({e})"),
            })
    }

    pub fn write(&self, run: &RunDir) -> Result<()> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        crate::fsutil::write_atomic(&Self::path(run), text.as_bytes())
    }
}
