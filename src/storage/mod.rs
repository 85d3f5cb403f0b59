//! Where an image's bytes live: a file, a block device, or (in tests) a
//! simulated disk that separates volatile from durable bytes.
//!
//! The data path does not call these synchronous methods when [`Storage::raw_fd`]
//! returns a descriptor: it submits io_uring operations on that descriptor
//! instead (see [`crate::io`]). The synchronous methods serve open, create,
//! check and storage without a descriptor.

pub mod blockdev;
pub mod device;
pub mod file;
pub mod grow;
pub mod lv;
pub mod lvm;
pub mod sim;

pub use device::ZeroedDevice;
pub use file::{held_by_writer, FileStorage, OpenMode};
pub use lv::LvStorage;
pub use sim::{PowerCut, SimStorage};

use lvm::policy::Growth;
use std::io;
use std::os::fd::RawFd;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path} is in use by another fvd process (lock held)")]
    Locked { path: String },
    #[error("{path}: cannot grow to {want:#x} bytes: {source}")]
    Grow { path: String, want: u64, source: io::Error },
    #[error("{path}: no space: the image needs {want:#x} bytes and the device holds {have:#x}")]
    NoSpace { path: String, want: u64, have: u64 },
    #[error("{path}: {what} at {offset:#x}: {source}")]
    Io { path: String, what: &'static str, offset: u64, source: io::Error },
    #[error("{path}: cannot reduce to {to:#x} bytes: {source}")]
    Reduce { path: String, to: u64, source: io::Error },
}

/// Why [`Storage::give_back`] is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slack {
    /// A snapshot froze the image: it never allocates again.
    Frozen,
    /// A stop closed it (an LV tagged `fvd-keep-slack` keeps its slack then).
    Stopped,
    /// Someone asked (`fvd reduce`).
    Asked,
}

/// What [`Storage::give_back`] gave back: the size before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaveBack {
    pub from: u64,
    pub to: u64,
}

/// The storage under an image (or a raw base).
pub trait Storage: Send + Sync {
    /// A name for messages: the path.
    fn name(&self) -> &str;
    /// Current size in bytes.
    fn size(&self) -> u64;
    /// Makes the storage at least `min` bytes long, growing by the grow unit.
    /// The one place allocation asks for space.
    fn ensure_size(&self, min: u64) -> Result<(), StorageError>;
    /// Reads exactly `buf.len()` bytes; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Deallocates a range; it then reads as zeros.
    fn punch(&self, off: u64, len: u64) -> io::Result<()>;
    /// The descriptor io_uring operates on, when there is one.
    fn raw_fd(&self) -> Option<RawFd>;
    /// Bytes the storage actually occupies, when known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// Whether a range holds allocated data (false when it is a hole).
    fn has_data(&self, _off: u64, _len: u64) -> bool {
        true
    }
    /// The most the image can ever need: growth never goes past it.
    fn set_size_limit(&self, _max: u64) {}
    /// Storage-specific state for `fvd info` / `fvd list` (growth, pool usage).
    fn status(&self) -> Option<serde_json::Value> {
        None
    }
    /// Whether a punch must go through [`Storage::punch`] rather than
    /// fallocate on [`Storage::raw_fd`]: block devices that need a discard
    /// or zero-out (an LVM logical volume).
    fn sync_punch(&self) -> bool {
        false
    }
    /// Storage whose unused bytes are not zeros by themselves (a plain block device,
    /// see [`device`]): the offset below which every byte the image has not written
    /// reads as zeros, which is also its [`Storage::size`]. The image keeps it in its
    /// header. `None`: the storage's unused space reads as zeros (files, LVs).
    fn initialised_end(&self) -> Option<u64> {
        None
    }
    /// Hands the mark kept in the image's header back to the storage at open.
    fn set_initialised_end(&self, _end: u64) {}
    /// Gives back the space past `keep` bytes where holding it costs something
    /// and the storage can (a linear LV: `lvreduce`, see [`lv`]). Only for an
    /// image that allocates no more while this storage is open (frozen, or
    /// closed). `Ok(None)`: nothing given back.
    fn give_back(&self, _keep: u64, _why: Slack) -> Result<Option<GaveBack>, StorageError> {
        Ok(None)
    }
    /// Storage of a fixed size (a plain block device): the most it can ever hold.
    /// `None`: it grows (files, LVs).
    fn capacity(&self) -> Option<u64> {
        None
    }
}

/// How [`open_image_storage`] opens an image's storage.
#[derive(Debug, Clone, Copy)]
pub struct StorageOptions {
    pub mode: OpenMode,
    /// Growth step. Defaults: files 1 GiB ([`FileStorage::DEFAULT_GROW_UNIT`]);
    /// plain block devices 64 MiB, the zeroing step ([`ZeroedDevice::DEFAULT_GROW_UNIT`]);
    /// LVs 1 GiB ([`lvm::policy::DEFAULT_GROW_UNIT`]) unless $FVD_GROW_UNIT or the
    /// LV's tag says otherwise (see [`lv`]).
    pub grow_unit: Option<u64>,
    /// O_DIRECT for the data path.
    pub direct: bool,
    /// The caller is about to format the storage (`fvd create`): an LV is
    /// first made to read as zeros (thin: discarded, giving its blocks back).
    pub format: bool,
    /// An LV grows ahead of need, by whole grow units (a serving daemon);
    /// otherwise only as far as each write needs (one-shot commands, which
    /// should not take a volume group's free space for writes that never come).
    pub grow_ahead: bool,
}

impl StorageOptions {
    pub fn new(mode: OpenMode) -> StorageOptions {
        StorageOptions { mode, grow_unit: None, direct: false, format: false, grow_ahead: false }
    }
}

/// Opens an image's storage: an LVM logical volume (grown automatically,
/// see [`lv`]) or a plain file or block device.
pub fn open_image_storage(path: &std::path::Path, o: &StorageOptions) -> Result<Box<dyn Storage>, StorageError> {
    let mut f = FileStorage::open(path, o.mode)?;
    if !f.is_block_device() {
        if let Some(u) = o.grow_unit {
            f = f.with_grow_unit(u);
        }
    }
    if o.direct {
        f = f.with_direct_io()?;
    }
    let lo = lv::LvOptions {
        writable: o.mode != OpenMode::ReadOnly,
        grow_unit: o.grow_unit,
        growth: if o.format {
            Growth::Exact
        } else if o.grow_ahead {
            Growth::Ahead
        } else {
            Growth::Steps
        },
        ..Default::default()
    };
    match LvStorage::detect(f, &lo)? {
        Ok(s) => {
            if o.format {
                let size = s.size();
                tracing::info!(device = %s.name(), bytes = size, "clearing the LV before formatting it");
                s.punch(0, size).map_err(|e| StorageError::io(s.name(), "clearing the LV", 0, e))?;
            }
            Ok(Box::new(s))
        }
        // A plain block device holds old bytes: zeroed as the image first uses it.
        Err(f) if f.is_block_device() => Ok(Box::new(ZeroedDevice::new(f, o.grow_unit, o.format))),
        Err(f) => Ok(Box::new(f)),
    }
}

impl StorageError {
    pub fn io(path: &str, what: &'static str, offset: u64, source: io::Error) -> Self {
        StorageError::Io { path: path.to_string(), what, offset, source }
    }
}

/// Shared storage (tests keep a handle to reopen or crash it).
impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn ensure_size(&self, min: u64) -> Result<(), StorageError> {
        (**self).ensure_size(min)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        (**self).read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        (**self).write_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        (**self).punch(off, len)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        (**self).raw_fd()
    }
    fn allocated_bytes(&self) -> Option<u64> {
        (**self).allocated_bytes()
    }
    fn has_data(&self, off: u64, len: u64) -> bool {
        (**self).has_data(off, len)
    }
    fn status(&self) -> Option<serde_json::Value> {
        (**self).status()
    }
    fn set_size_limit(&self, max: u64) {
        (**self).set_size_limit(max)
    }
    fn sync_punch(&self) -> bool {
        (**self).sync_punch()
    }
    fn initialised_end(&self) -> Option<u64> {
        (**self).initialised_end()
    }
    fn set_initialised_end(&self, end: u64) {
        (**self).set_initialised_end(end)
    }
    fn capacity(&self) -> Option<u64> {
        (**self).capacity()
    }
    fn give_back(&self, keep: u64, why: Slack) -> Result<Option<GaveBack>, StorageError> {
        (**self).give_back(keep, why)
    }
}
