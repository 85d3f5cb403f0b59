//! Copy-on-read and prefetch: moving base data into the image off the
//! guest's critical path, without bitmap updates on storage.
//!
//! Copies set only the live bitmap: on storage the block still reads from
//! the base, which holds the same bytes, so a crash at any point loses
//! nothing and never exposes a half-copied block. Chunk allocations they need
//! are journaled as usual. Prefetch records its progress as the header's
//! cursor at checkpoints, after the copies below it are durable.

use super::{Image, ImageError};
use crate::io::{self, AlignedBuf, IoEngine};
use crate::units::{BlockIdx, Bytes};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Base blocks read by the guest, waiting to be stored in the image.
pub struct CorQueue {
    jobs: Mutex<VecDeque<CorJob>>,
    bytes: AtomicU64,
    limit: u64,
    pub copied_blocks: AtomicU64,
    pub dropped_blocks: AtomicU64,
}

struct CorJob {
    first: BlockIdx,
    count: u64,
    data: AlignedBuf,
}

impl CorQueue {
    pub fn new(limit: u64) -> CorQueue {
        CorQueue {
            jobs: Mutex::new(VecDeque::new()),
            bytes: AtomicU64::new(0),
            limit,
            copied_blocks: AtomicU64::new(0),
            dropped_blocks: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<CorJob>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, first: BlockIdx, count: u64, data: &[u8]) {
        let n = data.len() as u64;
        if self.bytes.fetch_add(n, Ordering::AcqRel) + n > self.limit {
            // Over the bound: the copy is an optimisation, drop it.
            self.bytes.fetch_sub(n, Ordering::AcqRel);
            self.dropped_blocks.fetch_add(count, Ordering::Relaxed);
            return;
        }
        self.lock().push_back(CorJob { first, count, data: AlignedBuf::from_slice(data) });
    }

    fn pop(&self) -> Option<CorJob> {
        let j = self.lock().pop_front()?;
        self.bytes.fetch_sub(j.data.len() as u64, Ordering::AcqRel);
        Some(j)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

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
        }
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

    fn set(&self, s: PrefetchState) {
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

/// Sleeps on the engine's ring (a timeout operation), so the queue thread
/// keeps serving requests meanwhile.
pub async fn sleep<E: IoEngine>(e: &E, d: Duration) {
    let ts = io_uring::types::Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos());
    let sqe = io_uring::opcode::Timeout::new(&ts).build();
    // SAFETY: `ts` lives on this future's frame until the operation completes,
    // which we await at once.
    let _ = unsafe { e.submit(sqe) }.await;
}

impl Image {
    /// Queues the whole base blocks in `data`, which a read just fetched from
    /// the base at guest (and base) offset `off`.
    pub(crate) fn queue_copy_on_read(&self, off: u64, data: &[u8]) {
        let Some(q) = &self.cor else { return };
        let bs = self.meta.geo.block_size as u64;
        let base_end = self.meta.geo.base_size.0;
        let first = off.div_ceil(bs);
        let end = ((off + data.len() as u64) / bs).min(base_end / bs);
        if first >= end {
            return;
        }
        let start = (first * bs - off) as usize;
        let stop = (end * bs - off) as usize;
        q.push(BlockIdx(first), end - first, &data[start..stop]);
    }

    /// Whether copy-on-read work is waiting (the front end then runs
    /// [`Image::run_background_copies`]).
    pub fn background_pending(&self) -> bool {
        self.cor.as_ref().is_some_and(|q| !q.is_empty())
    }

    pub fn copy_on_read_queue(&self) -> Option<&CorQueue> {
        self.cor.as_ref()
    }

    /// Stores queued copy-on-read blocks until the queue is empty.
    pub async fn run_background_copies<E: IoEngine>(&self, e: &E) {
        let Some(q) = &self.cor else { return };
        while let Some(job) = q.pop() {
            match self.copy_blocks(e, job.first, job.count, &job.data).await {
                Ok(n) => {
                    q.copied_blocks.fetch_add(n, Ordering::Relaxed);
                }
                Err(err) => {
                    tracing::warn!(image = %self.name(), error = %err, "copy-on-read failed; the block stays in the base")
                }
            }
        }
    }

    /// Stores base data for blocks `first..first+count` that are not yet in
    /// the image. Returns how many blocks it stored.
    async fn copy_blocks<E: IoEngine>(
        &self,
        e: &E,
        first: BlockIdx,
        count: u64,
        data: &[u8],
    ) -> Result<u64, ImageError> {
        if self.meta.all_present() || self.read_only() {
            return Ok(0);
        }
        let bs = self.meta.geo.block_size as u64;
        let off = first.0 * bs;
        let zero = data.iter().all(|&b| b == 0);
        let chunk_missing = self.meta.geo.has_table()
            && self.meta.chunk_spans(Bytes(off), count * bs).iter().any(|(c, _, _)| self.meta.table.get(*c).is_none());
        if zero && chunk_missing && self.meta.chunk_spans(Bytes(off), count * bs).len() == 1 {
            // All zeros into an unallocated chunk: it reads zeros already.
            let _g = self.lock_blocks(first, count).await;
            let fresh: Vec<u64> =
                (first.0..first.0 + count).filter(|&b| !self.meta.block_in_image(BlockIdx(b))).collect();
            if self.meta.table.get(self.meta.geo.chunk_of(Bytes(off))).is_none() {
                for &b in &fresh {
                    self.meta.set_blocks_copied(BlockIdx(b), 1);
                }
                return Ok(fresh.len() as u64);
            }
        }
        self.ensure_dirty(e).await?;
        self.allocate_range(e, off, count * bs).await?;
        let _g = self.lock_blocks(first, count).await;
        let mut stored = 0;
        let mut b = first.0;
        while b < first.0 + count {
            if self.meta.block_in_image(BlockIdx(b)) {
                b += 1;
                continue;
            }
            // A run of missing blocks inside one chunk: one write.
            let mut end = b + 1;
            let chunk = self.meta.geo.chunk_of(Bytes(b * bs));
            while end < first.0 + count
                && !self.meta.block_in_image(BlockIdx(end))
                && self.meta.geo.chunk_of(Bytes(end * bs)) == chunk
            {
                end += 1;
            }
            let so = self.meta.storage_offset(Bytes(b * bs)).ok_or_else(|| ImageError::Invalid {
                path: self.name(),
                why: format!("chunk of block {b:#x} vanished during a copy"),
            })?;
            let piece = &data[((b - first.0) * bs) as usize..((end - first.0) * bs) as usize];
            io::write_at(e, self.storage.as_ref(), piece, so).await.map_err(|source| ImageError::Io {
                path: self.name(),
                what: "copy from base",
                offset: so,
                source,
            })?;
            self.meta.set_blocks_copied(BlockIdx(b), end - b);
            stored += end - b;
            b = end;
        }
        self.sync_volatile()?;
        Ok(stored)
    }

    async fn lock_blocks(&self, first: BlockIdx, count: u64) -> Vec<crate::meta::locks::BlockGuard<'_>> {
        let mut g = Vec::with_capacity(count as usize);
        for b in first.0..first.0 + count {
            g.push(self.meta.locks.lock(BlockIdx(b)).await);
        }
        g
    }

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
        let started = Instant::now();
        let mut window = (Instant::now(), 0u64);
        let mut pause = o.pause;
        let mut since_save = 0u64;
        let mut total = 0u64;
        let mut cursor = self.meta.prefetch_cursor.load(Ordering::Acquire);
        let cancelled = || o.cancel.as_ref().is_some_and(|c| c.load(Ordering::Acquire));
        while cursor < bb {
            if cancelled() {
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
                window.1 += buf.len() as u64;
                total += buf.len() as u64;
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
            // Rate limit.
            if let Some(limit) = o.rate_limit {
                loop {
                    let ahead = total as f64 / limit.max(1) as f64 - started.elapsed().as_secs_f64();
                    if ahead <= 0.0 || cancelled() {
                        break;
                    }
                    sleep(e, Duration::from_secs_f64(ahead.min(0.1))).await;
                }
            }
            // Back off while throughput stays under the floor.
            let elapsed = window.0.elapsed();
            if elapsed >= Duration::from_secs(1) {
                let rate = window.1 as f64 / elapsed.as_secs_f64();
                if window.1 > 0 && rate < o.floor as f64 {
                    p.set(PrefetchState::BackingOff);
                    p.backoffs.fetch_add(1, Ordering::Relaxed);
                    let jitter = 0.5 + rand::random::<f64>();
                    tracing::info!(image = %self.name(), rate_mib = rate / 1048576.0, "prefetch slower than its floor: backing off");
                    let until = Instant::now() + pause.mul_f64(jitter);
                    while Instant::now() < until && !cancelled() {
                        sleep(e, Duration::from_millis(100).min(until - Instant::now())).await;
                    }
                    pause = (pause * 2).min(Duration::from_secs(60));
                    p.set(PrefetchState::Running);
                } else {
                    pause = o.pause;
                }
                window = (Instant::now(), 0);
            }
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
