//! The queue's io_uring, set up as the fastest ublk servers set theirs up
//! (issue 22), when asked: `FVD_QUEUE_RING=tuned` in the daemon's environment.
//!
//! libublk makes each queue's ring on the queue's own thread, with
//! `COOP_TASKRUN`, unless the thread made one first. Tuned adds
//! `SINGLE_ISSUER` (only the queue thread submits: true by construction, as
//! the ring is thread-local and other threads reach the queue through its
//! eventfd bell, never its ring) and `DEFER_TASKRUN` (completions are
//! posted when the queue thread asks for them, in its `io_uring_enter`
//! waits, which carry GETEVENTS), with `TASKRUN_FLAG`: the kernel marks the
//! ring while completions wait to be posted, and an enter that waits for
//! nothing (libublk's, once the queue is stopping) then asks for them too.
//! Without it the aborted fetch commands of a stopping device were never
//! posted and the daemon did not exit on SIGTERM (20-fio-verify, 6.12).
//! A kernel that refuses these flags gets libublk's own ring. Off by default
//! until the peer benchmark's medians show the gain on both kernels; a
//! registered ring fd is not used (libublk makes a new `Submitter` for every
//! enter, and the registration lives in one).

use io_uring::{cqueue, squeue, IoUring};
use libublk::io::UblkDev;
use libublk::UblkError;
use std::cell::RefCell;

/// Whether the daemon's environment asks for the tuned ring.
pub fn tuned() -> bool {
    std::env::var("FVD_QUEUE_RING").is_ok_and(|v| v == "tuned")
}

/// Makes this thread's queue ring tuned, before `UblkQueue::new` (which then
/// keeps it). Returns whether it did.
pub fn init_tuned(dev: &UblkDev) -> bool {
    let (sq, cq) = (u32::from(dev.tgt.sq_depth), u32::from(dev.tgt.cq_depth));
    let r = libublk::io::ublk_init_task_ring(|cell| {
        if cell.get().is_some() {
            return Err(UblkError::OtherError(-libc::EEXIST));
        }
        let ring = IoUring::<squeue::Entry, cqueue::Entry>::builder()
            .setup_cqsize(cq)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(sq)
            .map_err(UblkError::IOError)?;
        cell.set(RefCell::new(ring)).map_err(|_| UblkError::OtherError(-libc::EEXIST))
    });
    match r {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %super::error::ublk_why(&e), "tuned queue ring refused: libublk's default ring");
            false
        }
    }
}
