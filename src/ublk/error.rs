//! The errors a user of the daemon commands can hit, one clear message each.

use crate::image::ImageError;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(
        "{0} needs root, or read-write access to /dev/ublk-control for an unprivileged device \
         (the udev rules in udev/ give it to group disk)"
    )]
    NotRoot(&'static str),
    #[error("device {0} was started by an unprivileged user: the kernel gives such devices no user recovery; run 'fvd stop -n {0}' and start the image again")]
    NoRecoveryUnprivileged(u32),
    #[error("{0} needs root (CAP_SYS_ADMIN): only devices root started have user recovery")]
    NeedsAdmin(&'static str),
    #[error("ublk_drv is not loaded: run 'modprobe ublk_drv'")]
    NoDriver,
    #[error("cannot use /dev/ublk-control: {0}")]
    Control(String),
    #[error("{0}: no such image file")]
    NoImage(PathBuf),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("device ID {0} is already in use (see 'fvd list' or /dev/ublkc{0})")]
    IdInUse(i32),
    #[error("bad device ID {0}: IDs are numbers from 0 up")]
    BadId(i64),
    #[error("no fvd device with ID {0} (see 'fvd list')")]
    UnknownId(u32),
    #[error("device {id}: its daemon (pid {pid}) is still running; nothing to recover")]
    StillRunning { id: u32, pid: i32 },
    #[error("device {0} no longer exists in the kernel: start the image again with 'fvd start'")]
    Gone(u32),
    #[error("device {id}: the kernel did not hand the device over for recovery ({why})")]
    NotRecoverable { id: u32, why: String },
    #[error("{what}: {why}")]
    Ublk { what: String, why: String },
    #[error(
        "the run dir {0} is not writable: for unprivileged use install udev/fvd-tmpfiles.conf \
         (/run/fvd of group disk, mode 2775), or set FVD_RUN_DIR"
    )]
    RunDirNotWritable(PathBuf),
    #[error("run state {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    /// A start-up failure the daemon reported back to the `fvd start` that spawned it.
    #[error("{0}")]
    Startup(String),
    #[error("the daemon exited during start-up without saying why; see {0}")]
    DaemonDied(PathBuf),
    #[error("device {id}: daemon (pid {pid}) did not exit within {secs}s of SIGTERM")]
    StopTimeout { id: u32, pid: i32, secs: u64 },
    #[error("{device} is in use ({by}): stop what uses it first, or use --force")]
    Busy { device: String, by: String },
    #[error("{what}: {source}")]
    Sys { what: &'static str, source: std::io::Error },
}

/// Text for a libublk error: its own `Display` says "other failure" for every
/// errno, so decode the errno here.
pub fn ublk_why(e: &libublk::UblkError) -> String {
    use libublk::UblkError as U;
    match e {
        U::OtherError(n) | U::UringIOError(n) => std::io::Error::from_raw_os_error(n.abs()).to_string(),
        U::IOError(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// The errno inside a libublk error, when it carries one.
pub fn ublk_errno(e: &libublk::UblkError) -> Option<i32> {
    use libublk::UblkError as U;
    match e {
        U::OtherError(n) | U::UringIOError(n) => Some(n.abs()),
        U::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// Wraps a libublk error with what was being done.
pub fn ublk(what: impl Into<String>) -> impl FnOnce(libublk::UblkError) -> DaemonError {
    let what = what.into();
    move |e| DaemonError::Ublk { why: ublk_why(&e), what }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_decoded() {
        let e = libublk::UblkError::OtherError(-libc::EEXIST);
        assert_eq!(ublk_errno(&e), Some(libc::EEXIST));
        assert!(ublk_why(&e).contains("exists"), "{}", ublk_why(&e));
    }

    #[test]
    fn driver_message_names_the_fix() {
        assert!(DaemonError::NoDriver.to_string().contains("modprobe ublk_drv"));
    }
}
