//! metrics.jsonl, one record per logged step, and the loss/gamma curves drawn from it.

use crate::image_io::{plot_panels, Panel, Series};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: usize,
    /// Means over the steps since the previous record.
    #[serde(with = "float")]
    pub d_loss: f32,
    #[serde(with = "float")]
    pub g_loss: f32,
    /// Mean D logit on real images and on G's samples.
    #[serde(with = "float")]
    pub d_real: f32,
    #[serde(with = "float")]
    pub d_fake: f32,
    /// Every attention layer's gamma, keyed `g.layers.I` / `d.layers.I`.
    #[serde(with = "float_map")]
    pub gammas: BTreeMap<String, f32>,
    /// Real images per second: batch size x generator steps per second (each with n_dis D steps).
    #[serde(with = "float")]
    pub images_per_sec: f32,
    pub elapsed_sec: f64,
    /// FID of the sampling generator, at the steps training evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid: Option<f64>,
}

/// JSON has no NaN or infinity: such values are written as the strings "NaN", "inf", "-inf"
/// and read back as they were (a bare `null`, from older files, reads as NaN), so a log of a
/// diverging run stays readable.
mod float {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    pub(super) enum Repr {
        Number(Option<f32>),
        Text(String),
    }

    impl Repr {
        pub(super) fn of(x: f32) -> Self {
            match x {
                x if x.is_finite() => Repr::Number(Some(x)),
                x if x.is_nan() => Repr::Text("NaN".into()),
                x if x > 0.0 => Repr::Text("inf".into()),
                _ => Repr::Text("-inf".into()),
            }
        }

        pub(super) fn value<E: serde::de::Error>(self) -> Result<f32, E> {
            match self {
                Repr::Number(x) => Ok(x.unwrap_or(f32::NAN)),
                Repr::Text(t) => match t.as_str() {
                    "NaN" => Ok(f32::NAN),
                    "inf" => Ok(f32::INFINITY),
                    "-inf" => Ok(f32::NEG_INFINITY),
                    other => Err(E::custom(format!("'{other}' is not a number"))),
                },
            }
        }
    }

    pub fn serialize<S: Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
        Repr::of(*x).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Repr::deserialize(d)?.value()
    }
}

/// [`float`] for every value of a map.
mod float_map {
    use super::float::Repr;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(map: &BTreeMap<String, f32>, s: S) -> Result<S::Ok, S::Error> {
        map.iter()
            .map(|(k, v)| (k, Repr::of(*v)))
            .collect::<BTreeMap<_, _>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f32>, D::Error> {
        BTreeMap::<String, Repr>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.value()?)))
            .collect()
    }
}

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens the log for a run at `step`, dropping records past it (written after the
    /// checkpoint a resumed run starts from).
    pub fn open(path: &Path, step: usize) -> Result<Self> {
        let kept: Vec<Record> = read(path)?.into_iter().filter(|r| r.step <= step).collect();
        let mut text = String::new();
        for record in &kept {
            text.push_str(&serde_json::to_string(record).unwrap_or_default());
            text.push('\n');
        }
        crate::fsutil::write_atomic(path, text.as_bytes())?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn append(&self, record: &Record) -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        let line = serde_json::to_string(record).unwrap_or_default();
        writeln!(file, "{line}").map_err(|e| Error::io(&self.path, e))
    }
}

/// Every record of a metrics file; a missing file has none.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| Error::Dataset {
                path: path.to_path_buf(),
                msg: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

fn series(records: &[Record], label: &str, value: impl Fn(&Record) -> Option<f32>) -> Series {
    Series {
        label: label.to_string(),
        points: records
            .iter()
            .filter_map(|r| Some((r.step as f64, value(r)? as f64)))
            .collect(),
    }
}

/// Losses, D's outputs and the attention gammas over training, one panel each.
pub fn save_curves(records: &[Record], path: &Path) -> Result<()> {
    let gamma_names: Vec<&String> = records
        .iter()
        .flat_map(|r| r.gammas.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let panel = |title: &str, series: Vec<Series>| Panel {
        title: title.to_string(),
        x_label: "step".to_string(),
        series,
    };
    let mut panels = vec![
        panel(
            "losses",
            vec![
                series(records, "d_loss", |r| Some(r.d_loss)),
                series(records, "g_loss", |r| Some(r.g_loss)),
            ],
        ),
        panel(
            "mean D logit",
            vec![
                series(records, "D(x)", |r| Some(r.d_real)),
                series(records, "D(G(z))", |r| Some(r.d_fake)),
            ],
        ),
    ];
    if records.iter().any(|r| r.fid.is_some()) {
        panels.push(panel(
            "FID",
            vec![series(records, "FID", |r| r.fid.map(|f| f as f32))],
        ));
    }
    if !gamma_names.is_empty() {
        let gammas = gamma_names
            .iter()
            .map(|name| {
                series(records, &format!("gamma {name}"), |r| {
                    r.gammas.get(*name).copied()
                })
            })
            .collect();
        panels.push(panel("attention gamma", gammas));
    }
    crate::image_io::save_png(path, &plot_panels(&panels, 900, 280))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: usize) -> Record {
        Record {
            step,
            d_loss: 1.0,
            g_loss: 0.5,
            d_real: 0.2,
            d_fake: -0.2,
            gammas: BTreeMap::from([("g.layers.2".to_string(), 0.01 * step as f32)]),
            images_per_sec: 100.0,
            elapsed_sec: step as f64,
            fid: (step == 20).then_some(12.5),
        }
    }

    #[test]
    fn non_finite_values_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let log = MetricsLog::open(&path, 0).unwrap();
        let mut diverged = record(10);
        diverged.d_loss = f32::NAN;
        diverged.g_loss = f32::INFINITY;
        diverged.d_fake = f32::NEG_INFINITY;
        diverged.gammas.insert("d.layers.1".into(), f32::NAN);
        log.append(&diverged).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.len(), 1);
        let r = &back[0];
        assert!(r.d_loss.is_nan() && r.gammas["d.layers.1"].is_nan());
        assert_eq!((r.g_loss, r.d_fake), (f32::INFINITY, f32::NEG_INFINITY));
        assert_eq!(r.gammas["g.layers.2"], diverged.gammas["g.layers.2"]);
        // Reopening (what --resume does) parses and rewrites it.
        MetricsLog::open(&path, 10).unwrap();
        assert!(read(&path).unwrap()[0].d_loss.is_nan());
    }

    #[test]
    fn older_files_with_null_read_as_nan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let line = serde_json::to_string(&record(10))
            .unwrap()
            .replace("\"d_loss\":1.0", "\"d_loss\":null");
        assert!(line.contains("null"), "{line}");
        std::fs::write(&path, line).unwrap();
        assert!(read(&path).unwrap()[0].d_loss.is_nan());
    }

    #[test]
    fn reopening_drops_records_past_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let log = MetricsLog::open(&path, 0).unwrap();
        for step in [10, 20, 30] {
            log.append(&record(step)).unwrap();
        }
        MetricsLog::open(&path, 20).unwrap();
        assert_eq!(read(&path).unwrap(), vec![record(10), record(20)]);
        save_curves(&read(&path).unwrap(), &dir.path().join("curves.png")).unwrap();
        assert!(image::open(dir.path().join("curves.png")).is_ok());
    }
}
