use crate::format::{HeaderError, LayoutError};
use crate::meta::MetaError;
use crate::storage::StorageError;
use std::io;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{path}: {source}")]
    Header { path: String, source: HeaderError },
    #[error("{path}: {source}")]
    Layout { path: String, source: LayoutError },
    #[error("{path}: {source}")]
    Meta { path: String, source: MetaError },
    #[error("{path}: base image {base}: {why}")]
    Base { path: String, base: String, why: String },
    #[error("{path}: {what} at {offset:#x}: {source}")]
    Io { path: String, what: &'static str, offset: u64, source: io::Error },
    #[error("{path}: request {off:#x}+{len:#x} is not aligned to 512 bytes")]
    Unaligned { path: String, off: u64, len: u64 },
    #[error("{path}: image is open read-only")]
    ReadOnly { path: String },
    #[error("{path}: an earlier metadata commit failed; the image refuses writes until reopened")]
    Failed { path: String },
    #[error("{path}: a frozen snapshot layer: overlays read through it, so it is not opened for writing (serve its overlay, or 'fvd commit' into it)")]
    Frozen { path: String },
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
    /// A journal block is damaged, and a later, completed commit follows it:
    /// the log does not end there, and replaying only up to it would lose
    /// flushed writes without a word. Never opened so.
    #[error(
        "{path}: journal block {block} at {offset:#x} is damaged ({why}), but block {later} after it belongs \
         to a later, completed commit: flushed writes of that commit would be lost. \
         'fvd check --repair' replays what can be trusted and names what may be lost"
    )]
    JournalDamaged { path: String, block: u64, offset: u64, why: String, later: u64 },
    /// Every physical chunk is in use. Chunks freed by a discard come back
    /// once its record is durable, so the allocator commits and tries again
    /// on this error (and only on this one).
    #[error("{path}: no free chunk left")]
    NoFreeChunk { path: String },
}

impl ImageError {
    /// The errno a block device should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ImageError::Storage(StorageError::NoSpace { .. }) => libc::ENOSPC,
            ImageError::Storage(StorageError::Grow { source, .. })
            | ImageError::Storage(StorageError::Io { source, .. })
            | ImageError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ImageError::Unaligned { .. } | ImageError::Meta { source: MetaError::OutOfRange { .. }, .. } => {
                libc::EINVAL
            }
            ImageError::ReadOnly { .. } => libc::EROFS,
            _ => libc::EIO,
        }
    }
}
