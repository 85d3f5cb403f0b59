//! Logging through tracing; RUST_LOG selects what is shown (default: warnings).

use std::io::IsTerminal;

/// How log lines look (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line: timestamp, level, target, message and the
    /// event's fields (tracing-subscriber's JSON format), for log shippers.
    Json,
}

/// Sets up logging to stderr. Colours only when stderr is a terminal and the
/// process will not become a detached daemon (whose stderr is a log file).
pub fn init(detaching: bool, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = !detaching && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}
