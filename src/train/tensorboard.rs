//! TensorBoard event files: TFRecord framing (length, masked CRC-32C, data, masked CRC-32C)
//! around `tensorboard.Event` protobufs, the few messages of TensorBoard's event.proto and
//! summary.proto that sagan writes, declared here with prost's derive.
//!
//! Each sagan-train process writes a new file. A resumed run first cuts every existing file
//! back to the checkpoint it starts from ([`prune`]): a killed run leaves events past its last
//! checkpoint, which the resumed run computes again, so without the cut a reader would see those
//! steps twice. The new file also starts with a SessionLog START at the first step it will
//! write, TensorBoard's own signal to drop such events from a view it already loaded.

use super::metrics::Record;
use crate::{Error, Result};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(oneof = "What", tags = "3, 5, 7")]
        pub what: Option<What>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        #[prost(string, tag = "3")]
        FileVersion(String),
        #[prost(message, tag = "5")]
        Summary(Summary),
        #[prost(message, tag = "7")]
        SessionLog(SessionLog),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionLog {
        /// SessionLog.SessionStatus: 1 is START.
        #[prost(int32, tag = "1")]
        pub status: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(oneof = "Kind", tags = "2, 4")]
        pub kind: Option<Kind>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(float, tag = "2")]
        SimpleValue(f32),
        #[prost(message, tag = "4")]
        Image(Image),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(int32, tag = "1")]
        pub height: i32,
        #[prost(int32, tag = "2")]
        pub width: i32,
        /// 3: RGB.
        #[prost(int32, tag = "3")]
        pub colorspace: i32,
        #[prost(bytes = "vec", tag = "4")]
        pub encoded_image_string: Vec<u8>,
    }
}

use proto::{Event, What};

/// What TensorBoard reads as the current event format.
const FILE_VERSION: &str = "brain.Event:2";
/// TensorBoard reads every file whose name contains "tfevents"; this is TensorFlow's prefix.
const FILE_PREFIX: &str = "events.out.tfevents.";
const SESSION_START: i32 = 1;
const RGB: i32 = 3;

/// CRC-32C (Castagnoli), bitwise: the records are small and written a few times a second.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// TFRecord's checksum: CRC-32C rotated and offset, so data holding its own CRC stays checkable.
fn masked_crc(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// One TFRecord: u64 length, its masked CRC, the data, the data's masked CRC (little-endian).
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc(data).to_le_bytes());
    record
}

/// The whole, checksummed records at the start of `bytes`, and the offset where they end
/// (short of `bytes.len()` when the rest is truncated or damaged).
fn records(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 12) {
        let len = header[..8].try_into().map(u64::from_le_bytes).unwrap_or(0);
        let crc = |b: &[u8]| b.try_into().map(u32::from_le_bytes).ok();
        if crc(&header[8..]) != Some(masked_crc(&header[..8])) {
            break;
        }
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|n| (at + 12).checked_add(n))
        else {
            break;
        };
        let (Some(data), Some(sum)) = (bytes.get(at + 12..end), bytes.get(end..end + 4)) else {
            break;
        };
        if crc(sum) != Some(masked_crc(data)) {
            break;
        }
        found.push(data);
        at = end + 4;
    }
    (found, at)
}

/// The scalars of one metrics record, by TensorBoard tag.
pub fn scalars(record: &Record) -> Vec<(String, f32)> {
    let mut values = vec![
        ("loss/d_loss".to_string(), record.d_loss),
        ("loss/g_loss".to_string(), record.g_loss),
        ("D/D(x)".to_string(), record.d_real),
        ("D/D(G(z))".to_string(), record.d_fake),
        ("speed/images_per_sec".to_string(), record.images_per_sec),
    ];
    values.extend(
        record
            .gammas
            .iter()
            .map(|(layer, gamma)| (format!("gamma/{layer}"), *gamma)),
    );
    if let Some(fid) = record.fid {
        values.push(("eval/FID".to_string(), fid as f32));
    }
    values
}

/// An image summary: a PNG and its size.
pub struct Png {
    pub tag: String,
    pub width: u32,
    pub height: u32,
    pub bytes: Vec<u8>,
}

/// The event file of one training process.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// Starts a new event file in `dir` for a process that continues from `step`. Its name
    /// sorts after every event file already there, as TensorBoard reads them in name order.
    pub fn create(dir: &Path, step: usize) -> Result<Self> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let newest = event_files(dir)?
            .iter()
            .filter_map(|p| file_stamp(p))
            .max()
            .map_or(0, |s| s + 1);
        let path = dir.join(format!("{FILE_PREFIX}{:010}.sagan", now.max(newest)));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut writer = Self { path, file };
        writer.write(0, What::FileVersion(FILE_VERSION.into()))?;
        writer.write(
            step + 1,
            What::SessionLog(proto::SessionLog {
                status: SESSION_START,
            }),
        )?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn scalars(&mut self, step: usize, values: &[(String, f32)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| proto::Value {
                tag: tag.clone(),
                kind: Some(proto::Kind::SimpleValue(*v)),
            })
            .collect();
        self.write(step, What::Summary(proto::Summary { value }))
    }

    pub fn images(&mut self, step: usize, images: &[Png]) -> Result<()> {
        let value = images
            .iter()
            .map(|png| proto::Value {
                tag: png.tag.clone(),
                kind: Some(proto::Kind::Image(proto::Image {
                    height: png.height as i32,
                    width: png.width as i32,
                    colorspace: RGB,
                    encoded_image_string: png.bytes.clone(),
                })),
            })
            .collect();
        self.write(step, What::Summary(proto::Summary { value }))
    }

    /// One event as one write: a killed process leaves at most its last record cut short.
    fn write(&mut self, step: usize, what: What) -> Result<()> {
        let event = Event {
            wall_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            step: step as i64,
            what: Some(what),
        };
        self.file
            .write_all(&frame(&event.encode_to_vec()))
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// The event files in `dir`, in TensorBoard's (name) order; none if `dir` does not exist.
fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(FILE_PREFIX));
        if ours && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The seconds in an event file's name (`events.out.tfevents.SECONDS.…`).
fn file_stamp(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?.strip_prefix(FILE_PREFIX)?;
    name.split('.').next()?.parse().ok()
}

/// Cuts the event files in `dir` back to `step`: events after it, and a damaged or truncated
/// tail (a process killed mid-write), are dropped; files that need no cut are left untouched.
pub fn prune(dir: &Path, step: usize) -> Result<()> {
    for path in event_files(dir)? {
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let (found, end) = records(&bytes);
        if end < bytes.len() {
            tracing::warn!(
                "{}: dropping {} bytes from byte {end} on (a truncated or damaged record)",
                path.display(),
                bytes.len() - end
            );
        }
        let kept: Vec<&[u8]> = found
            .iter()
            .copied()
            .take_while(|data| Event::decode(*data).is_ok_and(|e| e.step <= step as i64))
            .collect();
        if kept.len() == found.len() && end == bytes.len() {
            continue;
        }
        let text: Vec<u8> = kept.iter().flat_map(|data| frame(data)).collect();
        crate::fsutil::write_atomic(&path, &text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (step, what) of every event in a file.
    fn read(path: &Path) -> Vec<(i64, What)> {
        let bytes = std::fs::read(path).unwrap();
        let (found, end) = records(&bytes);
        assert_eq!(end, bytes.len(), "{}", path.display());
        found
            .iter()
            .map(|d| {
                let e = Event::decode(*d).unwrap();
                (e.step, e.what.unwrap())
            })
            .collect()
    }

    fn steps(path: &Path) -> Vec<i64> {
        read(path).into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn a_written_file_reads_back_event_by_event() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 0).unwrap();
        w.scalars(1, &[("loss/d".into(), 0.5), ("loss/g".into(), -1.25)])
            .unwrap();
        let png = Png {
            tag: "samples".into(),
            width: 2,
            height: 1,
            bytes: b"not really a png".to_vec(),
        };
        w.images(1, &[png]).unwrap();
        let events = read(w.path());
        assert_eq!(events[0], (0, What::FileVersion(FILE_VERSION.into())));
        assert_eq!(
            events[1],
            (1, What::SessionLog(proto::SessionLog { status: 1 }))
        );
        let What::Summary(s) = &events[2].1 else {
            panic!("{:?}", events[2])
        };
        assert_eq!(s.value[1].tag, "loss/g");
        assert_eq!(s.value[1].kind, Some(proto::Kind::SimpleValue(-1.25)));
        let What::Summary(s) = &events[3].1 else {
            panic!("{:?}", events[3])
        };
        let Some(proto::Kind::Image(image)) = &s.value[0].kind else {
            panic!("{s:?}")
        };
        assert_eq!((image.width, image.height, image.colorspace), (2, 1, 3));
        assert_eq!(image.encoded_image_string, b"not really a png");
    }

    #[test]
    fn prune_cuts_files_back_to_the_step_and_new_files_sort_last() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = EventWriter::create(dir.path(), 0).unwrap();
        for step in 1..=6 {
            first.scalars(step, &[("x".into(), step as f32)]).unwrap();
        }
        // A process killed in the middle of a write.
        let cut = frame(&Event::default().encode_to_vec());
        first.file.write_all(&cut[..cut.len() - 3]).unwrap();
        let first = first.path().to_path_buf();

        prune(dir.path(), 4).unwrap();
        assert_eq!(steps(&first), vec![0, 1, 1, 2, 3, 4]);
        let untouched = std::fs::metadata(&first).unwrap().modified().unwrap();
        prune(dir.path(), 4).unwrap();
        assert_eq!(
            std::fs::metadata(&first).unwrap().modified().unwrap(),
            untouched
        );

        let second = EventWriter::create(dir.path(), 4).unwrap();
        assert_eq!(steps(second.path()), vec![0, 5]);
        assert_eq!(
            event_files(dir.path()).unwrap(),
            vec![first, second.path().into()]
        );
    }

    #[test]
    fn a_damaged_record_is_dropped_with_everything_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 0).unwrap();
        w.scalars(1, &[("x".into(), 1.0)]).unwrap();
        let whole = std::fs::read(w.path()).unwrap();
        w.scalars(2, &[("x".into(), 2.0)]).unwrap();
        let mut bytes = std::fs::read(w.path()).unwrap();
        let flipped = whole.len() + 14;
        bytes[flipped] ^= 1;
        std::fs::write(w.path(), &bytes).unwrap();
        prune(dir.path(), 10).unwrap();
        assert_eq!(std::fs::read(w.path()).unwrap(), whole);
    }

    #[test]
    fn record_scalars_name_every_metric() {
        let record = Record {
            step: 3,
            d_loss: 1.0,
            g_loss: 2.0,
            d_real: 3.0,
            d_fake: 4.0,
            gammas: [("g.layers.2".to_string(), 0.5)].into(),
            images_per_sec: 6.0,
            elapsed_sec: 7.0,
            fid: Some(8.0),
        };
        let tags: Vec<(String, f32)> = scalars(&record);
        assert_eq!(
            tags,
            [
                ("loss/d_loss", 1.0),
                ("loss/g_loss", 2.0),
                ("D/D(x)", 3.0),
                ("D/D(G(z))", 4.0),
                ("speed/images_per_sec", 6.0),
                ("gamma/g.layers.2", 0.5),
                ("eval/FID", 8.0),
            ]
            .map(|(t, v)| (t.to_string(), v))
        );
    }
}
