//! What `fvd start` and `fvd recover` ask of the daemon.

use super::state::RunDir;
use std::path::PathBuf;

/// A new device (`fvd start`) or taking back one whose daemon died (`fvd recover`).
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Add { id: Option<u32> },
    Recover { id: u32 },
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Absolute path of the image.
    pub image: PathBuf,
    pub mode: Mode,
    pub queues: u16,
    pub depth: u16,
    pub writethrough: bool,
    pub read_only: bool,
    pub logical_block: u32,
    pub lazy_metadata: bool,
    /// Copy-on-read (None: the image's default).
    pub copy_on_read: Option<bool>,
    /// Prefetch the base in the background (also when the image asks by default).
    pub prefetch: bool,
    /// Upper bound on the prefetch rate, bytes per second.
    pub prefetch_rate: Option<u64>,
    /// Writeback mode: commit metadata at least this often (None: only on
    /// flush and under pressure).
    pub commit_interval: Option<std::time::Duration>,
    /// Growth step of the image's storage (None: the storage's default).
    pub grow_unit: Option<u64>,
    /// Zero copy (`--zero-copy`; a recovered device keeps what it was added with).
    pub zero_copy: super::zc::ZeroCopy,
    /// Add the device as an unprivileged one (the caller lacks CAP_SYS_ADMIN).
    pub unprivileged: bool,
    pub run_dir: RunDir,
    /// The daemon's log file when detached (renamed to `<id>.log` once the ID is known).
    pub log: Option<PathBuf>,
    /// Recoveries so far (kept in the state file).
    pub recoveries: u32,
    /// Online snapshots so far, and the last one's pause (kept in the state file).
    pub snapshots: u32,
    pub last_snapshot_held_ms: Option<f64>,
}
