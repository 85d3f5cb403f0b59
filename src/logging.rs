//! Logging through tracing; RUST_LOG selects what is shown (default: warnings).

use std::io::IsTerminal;

/// Sets up logging to stderr. Colours only when stderr is a terminal and the
/// process will not become a detached daemon (whose stderr is a log file).
pub fn init(detaching: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = !detaching && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}
