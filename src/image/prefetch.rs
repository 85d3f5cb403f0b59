//! Prefetch: copying the rest of the base into the image, in sequential
//! pieces from a saved cursor on, until the base is no longer needed. The
//! copies themselves are in [`super::base_copy`]; their pace in
//! [`super::pacing`].

use super::pacing::Pacing;
use super::{Image, ImageError};
use crate::io::{AlignedBuf, IoEngine};
use crate::units::BlockIdx;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

/// Prefetch tuning.
#[derive(Debug, Clone)]
pub struct PrefetchOptions {
    /// Bytes copied per step (rounded to whole blocks).
    pub piece: u64,
    /// Upper bound on the copy rate, bytes per second.
    pub rate_limit: Option<u64>,
    /// Below this throughput (bytes per second, over about a second) prefetch
    /// assumes it competes with the guest or with other hosts for the base,
    /// and pauses for a randomized while.
    pub floor: u64,
    /// Base pause when backing off (randomized ±50 %, doubling while it lasts).
    pub pause: Duration,
    /// Progress is made durable after this many bytes.
    pub save_every: u64,
    /// Set from outside to stop at the next piece (the cursor is kept).
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Set from outside while the daemon holds requests (an online snapshot):
    /// stop at the next piece as well; the daemon starts it again afterwards.
    pub hold: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions {
            piece: 1 << 20,
            rate_limit: None,
            floor: 4 << 20,
            pause: Duration::from_secs(1),
            save_every: 256 << 20,
            cancel: None,
            hold: None,
        }
    }
}

impl PrefetchOptions {
    /// Whether the prefetch was told to stop.
    pub(super) fn cancelled(&self) -> bool {
        let set = |f: &Option<std::sync::Arc<std::sync::atomic::AtomicBool>>| {
            f.as_ref().is_some_and(|c| c.load(Ordering::Acquire))
        };
        set(&self.cancel) || set(&self.hold)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefetchState {
    Idle,
    Running,
    BackingOff,
    Done,
    Failed,
}

/// Live prefetch progress, for `fvd list` / `fvd info`.
#[derive(Debug, Default)]
pub struct PrefetchProgress {
    state: AtomicU8,
    pub copied_bytes: AtomicU64,
    pub backoffs: AtomicU64,
}

impl PrefetchProgress {
    pub fn state(&self) -> PrefetchState {
        match self.state.load(Ordering::Acquire) {
            1 => PrefetchState::Running,
            2 => PrefetchState::BackingOff,
            3 => PrefetchState::Done,
            4 => PrefetchState::Failed,
            _ => PrefetchState::Idle,
        }
    }

    pub(super) fn set(&self, s: PrefetchState) {
        let v = match s {
            PrefetchState::Idle => 0,
            PrefetchState::Running => 1,
            PrefetchState::BackingOff => 2,
            PrefetchState::Done => 3,
            PrefetchState::Failed => 4,
        };
        self.state.store(v, Ordering::Release);
    }
}

impl Image {
    /// Copies the rest of the base into the image, from the saved cursor on,
    /// in sequential pieces, skipping blocks already present; backs off when
    /// its throughput drops below the floor; marks the image prefetched when
    /// done, after which the base is never needed again.
    pub async fn prefetch<E: IoEngine>(&self, e: &E, o: &PrefetchOptions) -> Result<(), ImageError> {
        let p = &self.prefetch;
        let r = self.prefetch_inner(e, o).await;
        let done = self.meta.all_present() || self.meta.geo.base_blocks() == 0;
        p.set(match (&r, done) {
            (Err(_), _) => PrefetchState::Failed,
            (Ok(()), true) => PrefetchState::Done,
            (Ok(()), false) => PrefetchState::Idle,
        });
        r
    }

    async fn prefetch_inner<E: IoEngine>(&self, e: &E, o: &PrefetchOptions) -> Result<(), ImageError> {
        let p = &self.prefetch;
        let geo = &self.meta.geo;
        let bb = geo.base_blocks();
        if self.meta.all_present() || bb == 0 {
            return Ok(());
        }
        let Some(base) = &self.base else { return Ok(()) };
        let bs = geo.block_size as u64;
        let step = (o.piece / bs).max(1);
        p.set(PrefetchState::Running);
        let mut pacing = Pacing::new(o);
        let mut since_save = 0u64;
        let mut cursor = self.meta.prefetch_cursor.load(Ordering::Acquire);
        while cursor < bb {
            if o.cancelled() {
                return Ok(()); // progress is saved by the next checkpoint or close
            }
            let end = (cursor + step).min(bb);
            let mut b = cursor;
            while b < end {
                if self.meta.block_in_image(BlockIdx(b)) {
                    b += 1;
                    continue;
                }
                let mut run_end = b + 1;
                while run_end < end && !self.meta.block_in_image(BlockIdx(run_end)) {
                    run_end += 1;
                }
                let mut buf = AlignedBuf::zeroed(((run_end - b) * bs) as usize);
                let n = (geo.base_size.0.min(run_end * bs) - b * bs) as usize;
                base.read(e, &mut buf[..n], b * bs).await?;
                self.copy_blocks(e, BlockIdx(b), run_end - b, &buf).await?;
                pacing.copied(buf.len() as u64);
                p.copied_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                b = run_end;
            }
            since_save += (end - cursor) * bs;
            cursor = end;
            self.meta.prefetch_cursor.store(cursor, Ordering::Release);
            if since_save >= o.save_every && cursor < bb {
                self.save_progress(e).await?;
                since_save = 0;
            }
            pacing.pace(e, self).await;
        }
        // Everything is in: a checkpoint makes that durable with the flag.
        self.save_progress(e).await
    }

    /// Commits and checkpoints, recording the prefetch cursor in the header.
    pub async fn save_progress<E: IoEngine>(&self, e: &E) -> Result<(), ImageError> {
        self.ensure_dirty(e).await?;
        let mut j = self.journal_lock().await;
        let r = self.checkpoint_locked(e, &mut j).await;
        if r.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        r
    }

    pub fn prefetch_progress(&self) -> (u64, u64, PrefetchState) {
        let bb = self.meta.geo.base_blocks();
        let c = if self.meta.all_present() { bb } else { self.meta.prefetch_cursor.load(Ordering::Acquire) };
        (c, bb, self.prefetch.state())
    }
}
