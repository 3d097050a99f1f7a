use std::path::PathBuf;

/// Errors of the sagan library. Every variant that concerns a file names it, so the binaries
/// can print one line that tells the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The I/O error is part of the message, not a `source`: reporters that print the chain
    // (anyhow's `{:#}`) would show it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: {}", one_line(.msg))]
    Image { path: PathBuf, msg: String },

    #[error("{path}: {}", one_line(.msg))]
    Dataset { path: PathBuf, msg: String },

    #[error("{path}: {}", one_line(.msg))]
    Checkpoint { path: PathBuf, msg: String },

    #[error("invalid configuration: {}", one_line(.0))]
    Config(String),

    /// A preset (a .toml file or a checkpoint's stored one) that cannot describe a model.
    #[error("{path}: {}", one_line(.msg))]
    Preset { path: PathBuf, msg: String },

    /// Training produced non-finite losses or weights; `last_good` says what is left to use.
    #[error("training diverged at step {step} ({what}); {last_good}")]
    Diverged {
        step: usize,
        what: String,
        last_good: String,
    },

    /// Another process is training in the run directory.
    #[error("{path}: {msg}")]
    RunBusy { path: PathBuf, msg: String },

    /// The model and batch would not fit in the memory this machine has free.
    #[error("{0}")]
    TooLarge(String),

    /// An output path holds something sagan did not write there.
    #[error("{path}: {msg}")]
    WouldOverwrite { path: PathBuf, msg: String },

    /// A failure inside candle's tensor code. Kept as text so that this type holds no candle
    /// value: sagan-infer, built on the same library, must link no candle code at all.
    #[error("tensor computation failed: {0}")]
    Compute(String),

    /// A failure of the ONNX Runtime side (e.g. the feature network of FID during training).
    #[error("{0}")]
    Runtime(String),
}

#[cfg(feature = "train")]
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Compute(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A message as one line. Messages quote what they refuse (a file's strings, a decoder's
/// text), and that may hold line breaks: they are shown escaped (`\n`), and trailing white
/// space is dropped, so that an error stays the one line that names its file.
pub fn one_line(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for c in msg.trim_end().chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: a checkpoint whose stored preset names an activation "x\ny" gave a
    /// two-line error (serde quotes the unknown variant), and a JPEG decoder's message ended
    /// in a line break.
    #[test]
    fn quoted_line_breaks_do_not_break_the_line() {
        let err = Error::Checkpoint {
            path: "/runs/g.safetensors".into(),
            msg: "its preset: unknown variant `x\ny`, expected one of `relu`\n".into(),
        };
        assert_eq!(
            err.to_string(),
            "/runs/g.safetensors: its preset: unknown variant `x\\ny`, expected one of `relu`"
        );
        let err = Error::Config("name 'a\r\tb' is not valid".into());
        assert_eq!(
            err.to_string(),
            "invalid configuration: name 'a\\r\\tb' is not valid"
        );
    }

    #[test]
    fn an_io_error_reads_as_one_line_naming_the_file() {
        let err = Error::io(
            "/data/x",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        let shown = format!("{:#}", anyhow::Error::from(err));
        assert!(shown.starts_with("/data/x: "), "{shown}");
        assert_eq!(shown.matches("not found").count(), 1, "{shown}");
    }
}
