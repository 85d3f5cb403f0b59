//! Copy-on-read: base blocks a guest read fetched are queued, bounded in
//! bytes, and stored in the image off the read's path by whoever runs
//! [`Image::run_background_copies`] (a ublk queue, or `fvd io`).

use super::Image;
use crate::io::{AlignedBuf, IoEngine};
use crate::units::BlockIdx;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
}
