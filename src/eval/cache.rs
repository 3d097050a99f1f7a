//! A cache of the real images' statistics. Running the feature network over ten thousand real
//! images costs as much as over the generated ones, and they do not change between
//! evaluations of successive checkpoints.
//!
//! One file per [`CacheKey`] (named by its hash), in a small binary format: a magic line, the
//! key and the sizes as one JSON line, then the mean and the covariance as little-endian f64.
//! The whole key is stored and compared on load, so neither a hash collision nor a stale file
//! can hand back the statistics of other data or another network.

use super::features::{fingerprint, FeatureNet, Resize};
use super::frechet::Statistics;
use crate::infer::InferResult;
use crate::{fsutil, Error, Result};
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"sagan-fid-stats 1\n";

/// Everything the real statistics depend on.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheKey {
    /// Where the images came from, for people reading the file.
    pub data: String,
    /// [`fingerprint`] of the images' bytes, as 16 hex digits.
    pub data_fingerprint: String,
    pub count: usize,
    /// (channels, height, width) of the images fed to the network.
    pub shape: [usize; 3],
    /// [`FeatureNet::fingerprint`], as 16 hex digits.
    pub feature_net: String,
    pub features_output: String,
    pub resize: Resize,
}

impl CacheKey {
    pub fn new(
        net: &FeatureNet,
        data: &str,
        data_fingerprint: u64,
        count: usize,
        shape: [usize; 3],
    ) -> Self {
        Self {
            data: data.to_string(),
            data_fingerprint: format!("{data_fingerprint:016x}"),
            count,
            shape,
            feature_net: format!("{:016x}", net.fingerprint()),
            features_output: net.features_output().to_string(),
            resize: net.resize(),
        }
    }

    /// The file for this key in `dir`.
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        let json = serde_json::to_vec(self).unwrap_or_default();
        dir.join(format!("real-{:016x}.stats", fingerprint(&json)))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    key: CacheKey,
    n: usize,
    dim: usize,
}

/// The statistics cached for `key` in `dir`, if any. A missing, unreadable or mismatched file
/// is a cache miss (logged), never an error: the statistics are then simply recomputed.
pub fn load(dir: &Path, key: &CacheKey) -> Option<Statistics> {
    let path = key.path_in(dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::debug!("no cached statistics in {}: {e}", path.display());
            return None;
        }
    };
    match parse(&bytes, key) {
        Ok(stats) => Some(stats),
        Err(msg) => {
            tracing::warn!("ignoring cached statistics {}: {msg}", path.display());
            None
        }
    }
}

fn parse(bytes: &[u8], key: &CacheKey) -> std::result::Result<Statistics, String> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("not a sagan statistics file (or another version)")?;
    let line_end = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header: Header =
        serde_json::from_slice(&rest[..line_end]).map_err(|e| format!("bad header: {e}"))?;
    if header.key != *key {
        return Err("written for other data or another network".into());
    }
    let values: Vec<f64> = rest[line_end + 1..]
        .chunks(8)
        .map(|c| c.try_into().map(f64::from_le_bytes))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| "truncated")?;
    let dim = header.dim;
    if values.len() != dim + dim * dim {
        return Err(format!(
            "holds {} values, expected {} for {dim}-d features",
            values.len(),
            dim + dim * dim
        ));
    }
    let stats = Statistics {
        n: header.n,
        mean: values[..dim].to_vec(),
        cov: values[dim..].to_vec(),
    };
    stats.validate()?;
    Ok(stats)
}

/// Writes `stats` for `key` into `dir` (created if needed), atomically; returns the file.
pub fn save(dir: &Path, key: &CacheKey, stats: &Statistics) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = key.path_in(dir);
    let header = Header {
        key: key.clone(),
        n: stats.n,
        dim: stats.dim(),
    };
    let mut bytes = MAGIC.to_vec();
    let json = serde_json::to_vec(&header)
        .map_err(|e| Error::Config(format!("statistics header: {e}")))?;
    bytes.extend(json);
    bytes.push(b'\n');
    for v in stats.mean.iter().chain(&stats.cov) {
        bytes.extend(v.to_le_bytes());
    }
    fsutil::write_atomic(&path, &bytes)?;
    Ok(path)
}

/// The statistics for `key`: from the cache in `dir` when it has them, else computed and
/// saved there (a file that cannot be written is a warning, not an error). Without a `dir`
/// they are computed and nothing is read or written.
pub fn load_or_compute(
    dir: Option<&Path>,
    key: &CacheKey,
    compute: impl FnOnce() -> InferResult<Statistics>,
) -> InferResult<Statistics> {
    let Some(dir) = dir else {
        return compute();
    };
    if let Some(stats) = load(dir, key) {
        tracing::info!("real statistics from the cache in {}", dir.display());
        return Ok(stats);
    }
    let stats = compute()?;
    match save(dir, key, &stats) {
        Ok(path) => tracing::info!("cached the real statistics in {}", path.display()),
        Err(e) => tracing::warn!("could not cache the real statistics: {e}"),
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CacheKey {
        CacheKey {
            data: "built-in MNIST subset".into(),
            data_fingerprint: format!("{:016x}", 42),
            count: 100,
            shape: [1, 28, 28],
            feature_net: format!("{:016x}", 7),
            features_output: "features".into(),
            resize: Resize::Bilinear,
        }
    }

    fn stats() -> Statistics {
        Statistics {
            n: 100,
            mean: vec![0.5, -1.25],
            cov: vec![2.0, 0.1, 0.1, 1.0 / 3.0],
        }
    }

    #[test]
    fn round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), &key()), None);
        let path = save(&dir.path().join("sub"), &key(), &stats()).unwrap();
        assert!(path.starts_with(dir.path().join("sub")));
        assert_eq!(load(&dir.path().join("sub"), &key()), Some(stats()));
    }

    #[test]
    fn other_keys_and_damaged_files_miss() {
        let dir = tempfile::tempdir().unwrap();
        let path = save(dir.path(), &key(), &stats()).unwrap();
        let mut other = key();
        other.count = 200;
        assert_ne!(other.path_in(dir.path()), path);
        // Same file name, different key inside: a collision must not be trusted.
        std::fs::copy(&path, other.path_in(dir.path())).unwrap();
        assert_eq!(load(dir.path(), &other), None);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(load(dir.path(), &key()), None);
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(load(dir.path(), &key()), None);
    }

    #[test]
    fn load_or_compute_computes_once_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let calls = std::cell::Cell::new(0);
        let compute = || {
            calls.set(calls.get() + 1);
            Ok(stats())
        };
        assert_eq!(load_or_compute(None, &key(), compute).unwrap(), stats());
        assert!(!cache.exists(), "no cache dir: nothing written");
        for _ in 0..2 {
            let got = load_or_compute(Some(&cache), &key(), compute).unwrap();
            assert_eq!(got, stats());
        }
        assert_eq!(calls.get(), 2, "the second call with the cache reads it");
        assert!(key().path_in(&cache).is_file());
        // A cache that cannot be written still gives the statistics.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"").unwrap();
        let got = load_or_compute(Some(&blocked), &key(), compute).unwrap();
        assert_eq!((got, calls.get()), (stats(), 3));
    }
}
