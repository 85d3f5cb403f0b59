//! A file or block device as image storage.

use super::blockdev::{self, ZeroMethod};
use super::grow::SteppedSize;
use super::{Storage, StorageError};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// How to open storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Shared, read-only: no lock that would keep a writer out.
    ReadOnly,
    /// Read-write with an exclusive lock: one writer at a time.
    ReadWrite,
    /// Create a new file (fails if it exists), read-write, locked.
    Create,
}

pub struct FileStorage {
    file: File,
    /// The same file opened with O_DIRECT, for the data path (see `direct`).
    direct: Option<File>,
    path: String,
    /// The size, grown by the grow unit up to the image's largest extent.
    size: SteppedSize,
    is_block_device: bool,
    /// Block devices: how `punch` makes a range read as zeros (fallocate
    /// alone fails on most of them, LVs included).
    zero: Option<ZeroMethod>,
}

impl FileStorage {
    /// Default growth step for files. Large, because extending a file stalls
    /// the O_DIRECT writes in flight on it (measured: 1 MiB sequential first
    /// writes at 0.74x raw with 256 MiB steps, 0.97x with one step per GiB);
    /// the file stays sparse, so a large step costs no space.
    pub const DEFAULT_GROW_UNIT: u64 = 1 << 30;

    pub fn open(path: &Path, mode: OpenMode) -> Result<FileStorage, StorageError> {
        let name = path.display().to_string();
        let mut oo = OpenOptions::new();
        oo.read(true);
        match mode {
            OpenMode::ReadOnly => {}
            OpenMode::ReadWrite => {
                oo.write(true);
            }
            OpenMode::Create => {
                oo.write(true).create_new(true).mode(0o644);
            }
        }
        let file = oo.open(path).map_err(|source| StorageError::Open { path: name.clone(), source })?;
        let meta = file.metadata().map_err(|source| StorageError::Open { path: name.clone(), source })?;
        let is_block_device = meta.file_type().is_block_device();
        if mode != OpenMode::ReadOnly {
            lock_exclusive(&file, &name, is_block_device)?;
        }
        if mode == OpenMode::ReadWrite {
            take_stale_write_error(&file, &name);
        }
        let size = if is_block_device {
            blockdev::size(file.as_raw_fd()).map_err(|source| StorageError::Open { path: name.clone(), source })?
        } else {
            meta.len()
        };
        let zero =
            is_block_device.then(|| ZeroMethod::probe(file.as_raw_fd(), blockdev::is_lvm_thin(file.as_raw_fd())));
        Ok(FileStorage {
            file,
            direct: None,
            path: name,
            size: SteppedSize::new(size, Self::DEFAULT_GROW_UNIT),
            is_block_device,
            zero,
        })
    }

    pub fn with_grow_unit(mut self, unit: u64) -> Self {
        self.size = self.size.with_unit(unit);
        self
    }

    /// Routes the io_uring data path through O_DIRECT (bypassing the host
    /// page cache, as qemu's cache=none); synchronous metadata access at open
    /// and check keeps the buffered descriptor.
    pub fn with_direct_io(mut self) -> Result<Self, StorageError> {
        let mut oo = OpenOptions::new();
        oo.read(true).custom_flags(libc::O_DIRECT);
        // Read-only storage has no exclusive lock; opening for write here
        // only when the buffered descriptor was opened for write too.
        let writable = {
            // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
            let fl = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETFL) };
            fl >= 0 && (fl & libc::O_ACCMODE) == libc::O_RDWR
        };
        oo.write(writable);
        let f = oo
            .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
            .map_err(|source| StorageError::Open { path: self.path.clone(), source })?;
        self.direct = Some(f);
        Ok(self)
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }
}

/// Takes, with one fdatasync, a write-back error that an earlier writer left and nobody
/// has seen: Linux reports such an error to the next process that opens the file and
/// syncs, although it belongs to writes that process never made. Those writes were never
/// made durable by their writer (its own sync would have seen the error), so after its
/// crash or forced stop they may be lost like any write not flushed, and recovery starts
/// from what storage holds. Found by the torture run: after a dm-flakey error window and a
/// forced stop, `fvd start` failed once with EIO on a healthy device. An error that
/// persists fails this process's own next sync.
fn take_stale_write_error(file: &File, name: &str) {
    if let Err(e) = nix::unistd::fdatasync(file.as_raw_fd()) {
        tracing::warn!(
            path = name,
            error = %e,
            "writes an earlier process left unsynced on this storage failed; they were never durable, \
             and this open starts from what the storage holds"
        );
    }
}

/// How long a block device's lock is waited for: udev holds a shared flock on a block
/// device while it probes it, right after a writer closed it (the previous fvd command).
const BLOCK_DEVICE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn lock_exclusive(file: &File, name: &str, block_device: bool) -> Result<(), StorageError> {
    let t0 = std::time::Instant::now();
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(StorageError::Open { path: name.to_string(), source: e });
        }
        if !block_device || t0.elapsed() >= BLOCK_DEVICE_LOCK_WAIT {
            return Err(StorageError::Locked { path: name.to_string() });
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Whether another process holds `path` open for writing (an fvd writer's
/// exclusive lock: a daemon, or a command such as `fvd io`). Tries a shared
/// lock without waiting and lets it go at once, so it never keeps a writer
/// out. False when the file cannot be opened (the caller's own open says why).
pub fn held_by_writer(path: &Path) -> bool {
    let Ok(f) = File::open(path) else { return false };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

impl Storage for FileStorage {
    fn name(&self) -> &str {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size.get()
    }

    fn ensure_size(&self, min: u64) -> Result<(), StorageError> {
        self.size.ensure(min, u64::MAX, |have, want| {
            if self.is_block_device {
                return Err(StorageError::NoSpace { path: self.path.clone(), want: min, have });
            }
            self.file.set_len(want).map_err(|source| StorageError::Grow { path: self.path.clone(), want, source })
        })
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.file.read_at(&mut buf[done..], off + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        match &self.zero {
            Some(z) => z.zero(self.file.as_raw_fd(), off, len),
            None => blockdev::punch_hole(self.file.as_raw_fd(), off, len),
        }
    }

    fn sync_punch(&self) -> bool {
        self.is_block_device
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.direct.as_ref().unwrap_or(&self.file).as_raw_fd())
    }

    fn set_size_limit(&self, max: u64) {
        self.size.set_limit(max);
    }

    fn allocated_bytes(&self) -> Option<u64> {
        if self.is_block_device {
            return None;
        }
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn has_data(&self, off: u64, len: u64) -> bool {
        if self.is_block_device {
            return blockdev::has_nonzero(self, off, len);
        }
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off as i64, libc::SEEK_DATA) };
        r >= 0 && (r as u64) < off + len
    }
}
