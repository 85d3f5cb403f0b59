//! The image engine's I/O seam on a ublk queue's own io_uring, and the
//! doorbell that lets other queue threads wake this one.
//!
//! Every queue thread runs one io_uring (libublk's thread-local queue ring)
//! and one single-threaded executor. The image is shared by all queues, so a
//! task here may wait on a lock (a journal commit, a copy-on-write block)
//! that a task on another queue releases. That release wakes our task from
//! the other thread, while this thread sleeps in `io_uring_enter` waiting for
//! a completion that may never come. The doorbell is an eventfd with a poll
//! always armed on this ring: a wake from a foreign thread rings it, the poll
//! completes, and the queue loop runs the woken task.

use crate::io::IoEngine;
use io_uring::{opcode, squeue, types};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::ThreadId;

/// Submits the engine's operations on the calling queue thread's ring. Private to
/// the crate: only the queue threads, which run every future to completion, make one
/// (see [`crate::io::IoEngine`]).
pub(crate) struct QueueEngine;

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

/// An eventfd polled on the owning queue's ring.
pub struct Doorbell {
    fd: File,
    owner: ThreadId,
    stopped: AtomicBool,
}

impl Doorbell {
    /// A doorbell owned by the calling (queue) thread.
    pub fn new() -> std::io::Result<Arc<Doorbell>> {
        // SAFETY: eventfd takes no pointers; the descriptor it returns is new
        // and owned by nothing else, so OwnedFd may take it.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: see above: `fd` is a fresh descriptor we own.
        let fd = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Arc::new(Doorbell { fd, owner: std::thread::current().id(), stopped: AtomicBool::new(false) }))
    }

    fn ring(&self) {
        // A full counter (EAGAIN) still means "readable", which is all we need.
        let _ = (&self.fd).write(&1u64.to_ne_bytes());
    }

    fn drain(&self) {
        let mut b = [0u8; 8];
        let _ = (&self.fd).read(&mut b);
    }

    /// Tells [`Doorbell::serve`] to return at its next wake-up, and wakes it.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.ring();
    }

    /// Keeps a poll armed on the ring until [`Doorbell::stop`]; each
    /// completion just lets the queue loop run what was woken.
    pub async fn serve(self: Arc<Self>) {
        while !self.stopped.load(Ordering::Acquire) {
            let sqe = opcode::PollAdd::new(types::Fd(self.fd.as_raw_fd()), libc::POLLIN as u32).build();
            // A poll points at no memory, so nothing can be left dangling
            // even if this future were dropped with the poll in flight.
            if ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await.is_err() {
                break;
            }
            self.drain();
        }
    }

    /// Wraps a task's future so that wakes from other threads ring the bell.
    pub fn wrap<F: Future>(self: &Arc<Self>, fut: F) -> Rung<F> {
        Rung { fut: Box::pin(fut), bell: self.clone(), cached: None }
    }
}

struct BellWaker {
    inner: Waker,
    bell: Arc<Doorbell>,
}

impl Wake for BellWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Queue the task first, then ring: when the owner wakes up, the task
        // is already runnable.
        self.inner.wake_by_ref();
        if std::thread::current().id() != self.bell.owner {
            self.bell.ring();
        }
    }
}

/// A future whose waker also rings a [`Doorbell`] on cross-thread wakes.
pub struct Rung<F> {
    fut: Pin<Box<F>>,
    bell: Arc<Doorbell>,
    /// The executor's waker and our wrapper around it, reused while the
    /// executor hands out the same waker.
    cached: Option<(Waker, Waker)>,
}

impl<F: Future> Future for Rung<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let fresh = match &this.cached {
            Some((inner, _)) => !inner.will_wake(cx.waker()),
            None => true,
        };
        if fresh {
            let w = Waker::from(Arc::new(BellWaker { inner: cx.waker().clone(), bell: this.bell.clone() }));
            this.cached = Some((cx.waker().clone(), w));
        }
        let waker = match &this.cached {
            Some((_, w)) => w.clone(),
            None => cx.waker().clone(),
        };
        this.fut.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A wake from another thread reaches the inner waker and rings the bell;
    /// a wake from the owner thread does not ring it.
    #[test]
    fn foreign_wakes_ring_the_bell() {
        let bell = Doorbell::new().unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let inner = Waker::from(count.clone());
        let stash: Arc<std::sync::Mutex<Option<Waker>>> = Arc::default();
        let s2 = stash.clone();
        let mut fut = bell.wrap(std::future::poll_fn(move |cx| {
            *s2.lock().unwrap() = Some(cx.waker().clone());
            Poll::<()>::Pending
        }));
        let mut cx = Context::from_waker(&inner);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        let w = stash.lock().unwrap().take().unwrap();

        w.wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let mut b = [0u8; 8];
        assert!((&bell.fd).read(&mut b).is_err(), "owner-thread wake rang the bell");

        std::thread::spawn(move || w.wake()).join().unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert_eq!((&bell.fd).read(&mut b).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(b), 1);
    }
}
