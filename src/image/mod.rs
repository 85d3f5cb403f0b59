//! An open FVD image: carries out the plans of [`crate::meta`] with the I/O of
//! [`crate::io`] on the storage of [`crate::storage`].
//!
//! `Image` is `Send + Sync`: the ublk queues share one `Arc<Image>`, each
//! driving it from its own thread with its own io_uring. Requests to
//! allocated, already-copied data take no lock; allocation, copy-on-write and
//! journal commits take short locks of their own.

mod base;
mod base_copy;
mod commit;
mod copy_on_read;
mod create;
mod data;
mod error;
pub mod fast;
pub mod fold;
pub mod identity;
mod inspect;
pub mod layer_header;
mod live;
mod meta_copies;
mod open;
mod pacing;
mod prefetch;
pub mod rebase;
mod repair;
pub mod resize;
pub mod scrub;
pub mod slack;
pub mod snapshot;
pub mod volatile;
mod zero_scan;

pub use base::{Base, Layer};
pub use copy_on_read::CorQueue;
pub use create::{create, create_on, is_block_device, put_in_place, stage, temp_name, CreateOptions, Staged};
pub use error::ImageError;
pub use inspect::{check, header_of, CheckReport, MapKind, MapRange};
pub use live::{LivePrefetch, LiveStatus, DEFAULT_COMMIT_INTERVAL};
pub use open::OpenOptions;
pub use prefetch::{PrefetchOptions, PrefetchProgress, PrefetchState};
pub use repair::repair_metadata;

use crate::format::{Geometry, Header};
use crate::meta::Meta;
use crate::storage::Storage;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters, for `fvd info`, `fvd list` and the benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    pub guest_writes: AtomicU64,
    pub cow_blocks: AtomicU64,
    pub chunks_allocated: AtomicU64,
    pub journal_commits: AtomicU64,
    pub journal_records: AtomicU64,
    /// Of those, bitmap records (the updates FVD's base optimizations avoid).
    pub bitmap_records: AtomicU64,
    pub journal_blocks: AtomicU64,
    pub checkpoints: AtomicU64,
    pub data_syncs: AtomicU64,
    /// Commits the periodic timer made (writeback mode, no flush from the guest).
    pub timer_commits: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct StatsSnapshot {
    pub guest_writes: u64,
    pub cow_blocks: u64,
    pub chunks_allocated: u64,
    pub journal_commits: u64,
    pub journal_records: u64,
    pub bitmap_records: u64,
    pub journal_blocks: u64,
    pub checkpoints: u64,
    pub data_syncs: u64,
    pub timer_commits: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            guest_writes: g(&self.guest_writes),
            cow_blocks: g(&self.cow_blocks),
            chunks_allocated: g(&self.chunks_allocated),
            journal_commits: g(&self.journal_commits),
            journal_records: g(&self.journal_records),
            bitmap_records: g(&self.bitmap_records),
            journal_blocks: g(&self.journal_blocks),
            checkpoints: g(&self.checkpoints),
            data_syncs: g(&self.data_syncs),
            timer_commits: g(&self.timer_commits),
        }
    }
}

/// Journal position, guarded by the commit lock.
pub(crate) struct JournalPos {
    /// Index of the next block of the log to write.
    next: u64,
    /// How the region holds the log's blocks (the header's, changed only
    /// where a new log starts: a checkpoint).
    shape: crate::format::journal::Shape,
}

pub struct Image {
    path: PathBuf,
    storage: Box<dyn Storage>,
    base: Option<Base>,
    meta: Meta,
    header: Mutex<Header>,
    journal: async_lock::Mutex<JournalPos>,
    opts: OpenOptions,
    /// Writes and discards completed so far, and how many of them a finished
    /// commit covered: a flush with nothing new to cover returns at once.
    completed: AtomicU64,
    durable: AtomicU64,
    /// Set when a commit failed part-way: the image refuses further writes.
    failed: AtomicBool,
    /// A journal commit has taken its batch and is writing it.
    committing: AtomicBool,
    /// Discards between punching a whole chunk and unmapping it: the chunk
    /// is about to be freed, so an allocation that finds none waits.
    freeing: std::sync::atomic::AtomicUsize,
    /// Whether the header on storage says dirty (set before the first change).
    marked_dirty: AtomicBool,
    closed: AtomicBool,
    /// Whether the journal had to be replayed at open.
    recovered: bool,
    /// The volatile log of metadata updates (see [`volatile`]).
    volatile: Option<volatile::VolatileLog>,
    /// Copy-on-read queue (None when copy-on-read is off).
    cor: Option<CorQueue>,
    pub prefetch: PrefetchProgress,
    pub stats: Stats,
}

impl Image {
    pub fn geometry(&self) -> &Geometry {
        &self.meta.geo
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    pub fn base(&self) -> Option<&Base> {
        self.base.as_ref()
    }

    pub fn size(&self) -> u64 {
        self.meta.geo.virtual_size.0
    }

    pub fn block_size(&self) -> u32 {
        self.meta.geo.block_size
    }

    pub fn read_only(&self) -> bool {
        self.opts.read_only
    }

    pub fn writethrough(&self) -> bool {
        self.opts.writethrough
    }

    /// True when open found the image not cleanly closed and replayed its journal.
    pub fn was_recovered(&self) -> bool {
        self.recovered
    }

    /// Whether metadata updates go to a volatile log, so that a new daemon
    /// can take over after this one dies without losing completed writes.
    pub fn has_volatile_log(&self) -> bool {
        self.volatile.is_some()
    }

    pub fn header(&self) -> Header {
        self.header.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A ring of its own for an offline step on the image at `path` (a recovery,
/// a resize, a fold, a scrub): one use, then dropped.
pub(crate) fn offline_ring(path: &str) -> Result<crate::io::uring::Uring, ImageError> {
    crate::io::uring::Uring::new(64).map_err(|source| ImageError::Io {
        path: path.to_string(),
        what: "io_uring setup",
        offset: 0,
        source,
    })
}
