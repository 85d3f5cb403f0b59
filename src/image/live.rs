//! What a serving daemon does on a timer: commit metadata that waited too
//! long (writeback mode), and describe itself for `fvd list` / `fvd info`.
//!
//! The seed: metadata updates "are batched and sent to the journal either on
//! a flush, or memory pressure, or periodically cleaned, just like page cache
//! in kernel". A periodic commit bounds what a power cut can take from a
//! guest that never flushes: a write completed more than one interval ago has
//! its data and metadata durable, as a dirty page of the host's page cache is
//! written back after `dirty_expire_centisecs`. The interval counts from the
//! oldest waiting update, so a guest that flushes more often than that (a
//! journaling file system does) never gets a flush it did not ask for.

use super::{Image, ImageError, PrefetchState, StatsSnapshot};
use crate::io::IoEngine;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Default interval of the periodic commit (ext4's default commit interval).
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// A daemon's view of its image, published for `fvd list` and `fvd info`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct LiveStatus {
    pub stats: StatsSnapshot,
    /// Metadata updates made in memory and not yet in the journal.
    pub pending_records: u64,
    /// Journal records per guest write, and bitmap records per guest write.
    pub records_per_write: f64,
    pub bitmap_records_per_write: f64,
    /// Present when the image has a base to prefetch or has prefetched it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<LivePrefetch>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct LivePrefetch {
    pub state: PrefetchState,
    /// Base blocks below the cursor are in the image.
    pub cursor_blocks: u64,
    pub base_blocks: u64,
    pub percent: f64,
    /// Bytes this daemon copied from the base, and how often it backed off.
    pub copied_bytes: u64,
    pub backoffs: u64,
}

impl Image {
    /// Commits metadata updates still only in memory, with the data they
    /// describe (a flush), if the oldest has waited `older_than` or more: a
    /// guest that flushes often enough never sees a flush it did not ask for.
    /// Returns whether it committed. Read-only and writethrough images never
    /// have anything waiting.
    pub async fn commit_pending<E: IoEngine>(&self, e: &E, older_than: Duration) -> Result<bool, ImageError> {
        if self.opts.read_only || self.meta.persist.pending_age().is_none_or(|age| age < older_than) {
            return Ok(false);
        }
        self.flush(e).await?;
        self.stats.timer_commits.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    pub fn live_status(&self) -> LiveStatus {
        let stats = self.stats.snapshot();
        let per = |n: u64| if stats.guest_writes == 0 { 0.0 } else { n as f64 / stats.guest_writes as f64 };
        let geo = &self.meta.geo;
        let prefetch = (geo.base_size.0 > 0).then(|| {
            let (cursor, total, state) = self.prefetch_progress();
            let state = if cursor >= total { PrefetchState::Done } else { state };
            LivePrefetch {
                state,
                cursor_blocks: cursor,
                base_blocks: total,
                percent: if total == 0 { 100.0 } else { 100.0 * cursor as f64 / total as f64 },
                copied_bytes: self.prefetch.copied_bytes.load(Ordering::Relaxed),
                backoffs: self.prefetch.backoffs.load(Ordering::Relaxed),
            }
        });
        LiveStatus {
            records_per_write: per(stats.journal_records),
            bitmap_records_per_write: per(stats.bitmap_records),
            pending_records: self.meta.persist.pending() as u64,
            stats,
            prefetch,
        }
    }
}
