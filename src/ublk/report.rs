//! Telling whoever started the daemon that the device is live, or why not.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Tells whoever started the daemon that the device is live, or why not.
pub enum Reporter {
    /// `--foreground`: print the device path on stdout.
    Stdout,
    /// Detached: one line on the pipe the waiting `fvd start` reads.
    Pipe(std::fs::File),
}

impl Reporter {
    pub(super) fn live(self, dev: &str) {
        let r = match self {
            Reporter::Stdout => {
                // A service manager that started us in the foreground
                // (systemd's Type=notify) learns it too.
                super::notify::tell(&format!("READY=1\nSTATUS=serving {dev}\nMAINPID={}", std::process::id()));
                let mut out = std::io::stdout();
                writeln!(out, "{dev}").and_then(|_| out.flush())
            }
            Reporter::Pipe(mut f) => writeln!(f, "live {dev}"),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not report the device as live");
        }
    }

    pub(super) fn failed(self, msg: &str) {
        if let Reporter::Pipe(mut f) = self {
            let _ = writeln!(f, "error {msg}");
        }
    }
}

/// The reporter, taken by whichever comes first: "live" or "failed".
pub(super) type Slot = Arc<Mutex<Option<Reporter>>>;

pub(super) fn take(slot: &Slot) -> Option<Reporter> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}
