//! The image engine's I/O seam on a ublk queue's own io_uring, and the poll
//! that lets other queue threads wake this one.
//!
//! Every queue thread runs one io_uring (libublk's thread-local queue ring)
//! and one single-threaded executor. The image is shared by all queues, so a
//! task here may wait on a lock (a journal commit, a copy-on-write block)
//! that a task on another queue releases. That release wakes our task from
//! the other thread, while this thread sleeps in `io_uring_enter` waiting for
//! a completion that may never come: the queue's [`Bell`] (see
//! [`crate::io::wake`]) has a poll always armed on this ring, a wake from a
//! foreign thread rings it, the poll completes, and the queue loop runs the
//! woken task.

use crate::io::wake::Bell;
use crate::io::IoEngine;
use io_uring::squeue;
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;
use std::sync::Arc;

/// Submits the engine's operations on the calling queue thread's ring. Private to
/// the crate: only the queue threads, which run every future to completion, make one
/// (see [`crate::io::IoEngine`]).
pub(crate) struct QueueEngine;

impl crate::io::sealed::Sealed for QueueEngine {}

impl IoEngine for QueueEngine {
    // SAFETY (contract of `IoEngine::submit`, upheld by the callers in the
    // image engine and here): the SQE's buffers are borrowed by the caller
    // across the await of this future, and every future is run to completion:
    // each request is one libublk per-tag task that awaits the engine before
    // it commits the result, and a queue thread leaves its loop only after
    // all of its tag tasks have finished.
    async unsafe fn submit(&self, sqe: squeue::Entry) -> i32 {
        ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await.unwrap_or(-libc::EIO)
    }
}

/// Keeps the bell's poll armed on the queue's ring; each completion just lets
/// the queue loop run what was woken. Runs until its task is dropped (the
/// poll points at no memory, so dropping it in flight is harmless) or the
/// ring refuses the poll.
pub async fn keep_bell_armed(bell: Arc<Bell>) {
    while ublk_submit_sqe_async(bell.poll_entry(), UblkUringData::Target as u64).await.is_ok() {
        bell.drain();
    }
}
