//! The binaries' logging: tracing to stderr, `RUST_LOG` overriding each binary's default level,
//! colour only on a terminal.

use std::io::IsTerminal;

/// Installs the subscriber. Long jobs (training) want `timestamps`; short commands do not.
pub fn init(default_filter: &str, timestamps: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    if timestamps {
        builder.init();
    } else {
        builder.without_time().init();
    }
}
