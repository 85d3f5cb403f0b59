//! An image on a plain block device (a partition, a loop device, a disk; not an LVM
//! logical volume, see [`super::lv`]): space is made to read as zeros as the image
//! first uses it, never the whole device at once.
//!
//! Such a device holds whatever was on it before. A range the guest never wrote must
//! still read as zeros, after crashes and discards too, and zeroing a large device at
//! create (or at every recovery) would take hours. So the device is used like storage
//! that grows: its [`Storage::size`] is the *initialised end*, the offset below which
//! everything the image has not written reads as zeros (zeroed by this module, or
//! punched at recovery: see `Image::wipe_unreferenced`). [`Storage::ensure_size`]
//! extends it by zeroing (BLKZEROOUT, or a discard that zeroes: see
//! [`ZeroMethod`]) up to the next grow unit, never past the device's end; reads past
//! it return zeros without touching the device.
//!
//! The image keeps the mark in its header (`initialised_end`) and hands it back at
//! open ([`Storage::set_initialised_end`]); it writes a larger mark only after the
//! zeroing below it is durable (read the mark, sync, then write the header).

use super::blockdev;
use super::file::FileStorage;
use super::grow::SteppedSize;
use super::{Storage, StorageError};
use std::io;
use std::os::fd::RawFd;

pub struct ZeroedDevice {
    inner: FileStorage,
    /// Everything below this reads as zeros unless the image wrote it; grown
    /// by the grow unit, never past the device's end.
    end: SteppedSize,
    device: u64,
}

impl ZeroedDevice {
    /// Zeroing step: small enough that the write that triggers it waits only briefly
    /// on a device without write-zeroes offload.
    pub const DEFAULT_GROW_UNIT: u64 = 64 << 20;

    /// Wraps a plain block device. To be formatted, nothing on it is initialised (the
    /// mark starts at 0); otherwise the whole device reads as it is until the image,
    /// having read its header, hands over the mark kept there.
    pub fn new(inner: FileStorage, grow_unit: Option<u64>, format: bool) -> ZeroedDevice {
        let device = inner.size();
        ZeroedDevice {
            inner,
            end: SteppedSize::new(if format { 0 } else { device }, grow_unit.unwrap_or(Self::DEFAULT_GROW_UNIT)),
            device,
        }
    }
}

impl Storage for ZeroedDevice {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn size(&self) -> u64 {
        self.end.get()
    }

    fn ensure_size(&self, min: u64) -> Result<(), StorageError> {
        self.end.ensure(min, self.device, |have, want| {
            if min > self.device {
                return Err(StorageError::NoSpace { path: self.name().to_string(), want: min, have: self.device });
            }
            self.inner.punch(have, want - have).map_err(|source| StorageError::Grow {
                path: self.name().to_string(),
                want,
                source,
            })
        })
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let end = self.size();
        let n = (end.saturating_sub(off) as usize).min(buf.len());
        buf[n..].fill(0);
        if n > 0 {
            self.inner.read_at(&mut buf[..n], off)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch(off, len)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }

    fn has_data(&self, off: u64, len: u64) -> bool {
        let end = self.size();
        off < end && blockdev::has_nonzero(&self.inner, off, len.min(end - off))
    }

    fn set_size_limit(&self, max: u64) {
        self.end.set_limit(max);
    }

    fn status(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "kind": "block device",
            "device-size": self.device,
            "initialised-end": self.size(),
        }))
    }

    fn sync_punch(&self) -> bool {
        true
    }

    fn initialised_end(&self) -> Option<u64> {
        Some(self.size())
    }

    fn set_initialised_end(&self, end: u64) {
        self.end.set(end.min(self.device));
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.device)
    }
}
