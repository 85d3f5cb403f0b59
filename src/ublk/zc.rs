//! Zero copy (`UBLK_F_AUTO_BUF_REG`, Linux 6.16 and later): the kernel
//! registers each request's pages as a fixed buffer on the queue's io_uring
//! (index = tag), and the image moves them to and from its storage with
//! fixed-buffer reads and writes; they never pass through the daemon.
//!
//! Requests that need their bytes in the daemon (a copy-on-write merge with
//! the base, copy-on-read, reads through a base) take the copy path through
//! a per-queue bounce file (a memfd): a write's bytes go from the registered
//! buffer into the file and from there into the tag's own buffer; a read's
//! bytes go the other way. Ranges that read as zeros are read from /dev/zero
//! into the registered buffer, also a fixed-buffer read.

use super::DaemonError;
use crate::io::{self, FixedBuf, IoEngine};
use libublk::sys;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

/// `fvd start --zero-copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroCopy {
    /// On when the driver offers it, else the copy path.
    #[default]
    Auto,
    /// On, or `fvd start` fails.
    On,
    Off,
}

impl std::str::FromStr for ZeroCopy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ZeroCopy::Auto),
            "on" | "1" | "yes" => Ok(ZeroCopy::On),
            "off" | "0" | "no" => Ok(ZeroCopy::Off),
            _ => Err(format!("'{s}': --zero-copy is auto, on or off")),
        }
    }
}

/// The device flags zero copy adds: auto registration, and zero copy itself,
/// which the kernel asks for before a server may register a buffer by hand
/// (UBLK_AUTO_BUF_REG_FALLBACK).
pub const FLAGS: u64 = (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY) as u64;

/// Whether to add the device with zero copy, given what was asked and the
/// driver's features (None: the driver can't say, as before 6.5).
pub fn resolve(want: ZeroCopy, features: Option<u64>, unprivileged: bool) -> Result<bool, DaemonError> {
    let has = features.is_some_and(|f| f & FLAGS == FLAGS);
    match want {
        ZeroCopy::Off => Ok(false),
        ZeroCopy::Auto => Ok(has && !unprivileged),
        ZeroCopy::On if unprivileged => Err(DaemonError::Invalid(
            "--zero-copy on: the kernel gives zero copy to devices root adds only (CAP_SYS_ADMIN)".into(),
        )),
        ZeroCopy::On if !has => Err(DaemonError::Invalid(
            "--zero-copy on: this kernel's ublk driver has no auto buffer registration \
             (UBLK_F_AUTO_BUF_REG, Linux 6.16 and later); use --zero-copy auto or off"
                .into(),
        )),
        ZeroCopy::On => Ok(true),
    }
}

/// A queue's zero-copy helpers: /dev/zero, and the bounce file of the copy path.
pub struct ZcQueue {
    zero: File,
    bounce: File,
    /// Bytes of the bounce file per tag.
    slot: u64,
}

impl ZcQueue {
    pub fn new(slot: u32) -> std::io::Result<ZcQueue> {
        let zero = File::open("/dev/zero")?;
        // SAFETY: memfd_create reads the NUL-terminated name and returns a new
        // descriptor (or -1), which we own from here on.
        let fd = unsafe { libc::memfd_create(c"fvd-bounce".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let bounce = unsafe { File::from_raw_fd(fd) };
        Ok(ZcQueue { zero, bounce, slot: u64::from(slot) })
    }

    pub fn zero_fd(&self) -> i32 {
        self.zero.as_raw_fd()
    }

    /// The registered buffer of request `tag`.
    pub fn buf(tag: u16) -> FixedBuf {
        FixedBuf { index: tag, off: 0 }
    }

    /// Copies a write's `buf.len()` bytes from its registered buffer into `buf`.
    pub async fn fetch<E: IoEngine>(&self, e: &E, tag: u16, buf: &mut [u8]) -> std::io::Result<()> {
        let (fd, at) = (self.bounce.as_raw_fd(), u64::from(tag) * self.slot);
        io::write_fixed(e, fd, Self::buf(tag), buf.len(), at).await?;
        let r = io::read_fd(e, fd, buf, at).await;
        let _ = io::punch_fd(e, fd, at, buf.len() as u64).await;
        r
    }

    /// Copies a read's bytes from `buf` into its registered buffer.
    pub async fn deliver<E: IoEngine>(&self, e: &E, tag: u16, buf: &[u8]) -> std::io::Result<()> {
        let (fd, at) = (self.bounce.as_raw_fd(), u64::from(tag) * self.slot);
        io::write_fd(e, fd, buf, at).await?;
        let r = io::read_fixed(e, fd, self.zero_fd(), Self::buf(tag), buf.len(), at).await;
        let _ = io::punch_fd(e, fd, at, buf.len() as u64).await;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_the_mode() {
        let all = Some(FLAGS | 0xff);
        assert!(resolve(ZeroCopy::Auto, all, false).unwrap());
        assert!(!resolve(ZeroCopy::Auto, Some(0xff), false).unwrap());
        assert!(!resolve(ZeroCopy::Auto, None, false).unwrap());
        assert!(!resolve(ZeroCopy::Auto, all, true).unwrap());
        assert!(!resolve(ZeroCopy::Off, all, false).unwrap());
        assert!(resolve(ZeroCopy::On, all, false).unwrap());
        assert!(resolve(ZeroCopy::On, Some(0xff), false).unwrap_err().to_string().contains("UBLK_F_AUTO_BUF_REG"));
        assert!(resolve(ZeroCopy::On, all, true).is_err());
        assert_eq!("off".parse::<ZeroCopy>(), Ok(ZeroCopy::Off));
        assert!("maybe".parse::<ZeroCopy>().is_err());
    }
}
