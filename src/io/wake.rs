//! Waking a ring's thread from another thread: one mechanism for every ring
//! (the host tools' [`super::uring::Uring`] and the ublk queue rings).
//!
//! A ring's thread sleeps in `io_uring_enter` until a completion arrives.
//! When one of its tasks waits for something another thread holds (a block
//! being copied, the journal's commit lock), the other thread's wake-up only
//! puts the task back in the executor's queue: the sleeping thread would not
//! notice. So each ring owns a [`Bell`], an eventfd it keeps a poll armed on
//! ([`Bell::poll_entry`], then [`Bell::drain`] when it completes), and
//! registers the bell for its thread while it runs ([`Bell::register`]).
//! Futures whose wakes may come from other threads are wrapped in
//! [`CrossThread`]: a wake from any thread but the one that polled them
//! rings the thread's bell, after queueing the task, so the task is runnable
//! when the ring's thread wakes up. Wakes from the ring's own thread do not
//! ring: that thread is awake already and runs its executor before it sleeps.
//!
//! The image wraps its waits that can cross threads (the journal lock, the
//! block locks); the ublk queues also wrap every task, so that nothing a task
//! awaits can leave a queue asleep. A foreign wake through nested wrappers
//! rings once per wrapper, and repeated rings coalesce: the eventfd is a
//! counter, one drain empties it, and a full counter (a write that would
//! block) already means "readable".

use io_uring::{opcode, squeue, types};
use std::cell::RefCell;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// An eventfd that wakes the thread of the ring that polls it.
pub struct Bell {
    fd: File,
}

impl Bell {
    pub fn new() -> std::io::Result<Arc<Bell>> {
        // SAFETY: eventfd takes no pointers; a negative result is an error.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd, so it is open and owned
        // by nothing else.
        let fd = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Arc::new(Bell { fd }))
    }

    /// Makes the bell's poll complete.
    pub fn ring(&self) {
        // A full counter (EAGAIN) still means "readable", which is all we need.
        let _ = (&self.fd).write(&1u64.to_ne_bytes());
    }

    /// Empties the counter, so that the next poll waits for the next ring.
    pub fn drain(&self) {
        let mut b = [0u8; 8];
        let _ = (&self.fd).read(&mut b);
    }

    /// The poll the ring keeps armed: it completes once the bell rings. It
    /// points at no memory, so it may be left in flight or abandoned freely.
    pub fn poll_entry(&self) -> squeue::Entry {
        opcode::PollAdd::new(types::Fd(self.fd.as_raw_fd()), libc::POLLIN as u32).build()
    }

    /// Makes this the calling thread's bell until the guard is dropped (the
    /// previous one, if any, then comes back).
    pub fn register(self: &Arc<Self>) -> Registered {
        let prev = THREAD_BELL.with(|t| t.borrow_mut().replace(self.clone()));
        Registered { prev }
    }
}

thread_local! {
    static THREAD_BELL: RefCell<Option<Arc<Bell>>> = const { RefCell::new(None) };
}

/// The registration of a thread's bell; see [`Bell::register`].
#[must_use = "the bell is registered only while the guard lives"]
pub struct Registered {
    prev: Option<Arc<Bell>>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let prev = self.prev.take();
        THREAD_BELL.with(|t| *t.borrow_mut() = prev);
    }
}

thread_local! {
    /// A byte per thread whose address names the thread (see [`this_thread`]).
    static THREAD_MARK: u8 = const { 0 };
}

/// This thread, cheaply: the address of its [`THREAD_MARK`] (unlike
/// `std::thread::current()`, no reference count is touched). Live threads
/// never share it; a thread that starts after another ended may get the
/// ended one's, which only matters to wakers of that ended thread, and
/// those have no thread left to wake.
fn this_thread() -> usize {
    THREAD_MARK.with(|m| m as *const u8 as usize)
}

/// Wakes `inner`, and rings `bell` when the wake comes from another thread
/// than `owner`, the thread that polled the future and may be asleep.
struct BellWaker {
    inner: Waker,
    bell: Arc<Bell>,
    owner: usize,
}

impl Wake for BellWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Queue the task first, then ring: when the owner wakes up, the task
        // is already runnable.
        self.inner.wake_by_ref();
        if this_thread() != self.owner {
            self.bell.ring();
        }
    }
}

/// The waker a [`CrossThread`] hands its future, kept while the executor
/// polls it with the same waker on the same bell's thread.
struct Cached {
    /// The executor's waker it wraps.
    inner: Waker,
    /// Compared only, never read through; `waker` holds the bell alive, so
    /// no other bell can take its address while this is kept.
    bell: *const Bell,
    waker: Waker,
}

/// A future whose wakes from other threads ring the bell registered for the
/// thread that polls it (without a registered bell, it is the bare future).
/// A poll with the waker of the poll before costs a thread-local lookup and
/// two comparisons: no allocation, no reference count.
pub struct CrossThread<F> {
    fut: Pin<Box<F>>,
    cached: Option<Cached>,
}

impl<F: Future> CrossThread<F> {
    pub fn new(fut: F) -> CrossThread<F> {
        CrossThread { fut: Box::pin(fut), cached: None }
    }
}

impl<F: Future> Future for CrossThread<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let CrossThread { fut, cached } = &mut *self;
        let Some(bell) = THREAD_BELL.with(|t| t.borrow().as_ref().map(Arc::as_ptr)) else {
            return fut.as_mut().poll(cx);
        };
        let reuse = matches!(cached, Some(c) if c.bell == bell && c.inner.will_wake(cx.waker()));
        if !reuse {
            let Some(bell) = THREAD_BELL.with(|t| t.borrow().clone()) else {
                return fut.as_mut().poll(cx);
            };
            let inner = cx.waker().clone();
            let waker =
                Waker::from(Arc::new(BellWaker { inner: inner.clone(), bell: bell.clone(), owner: this_thread() }));
            *cached = Some(Cached { inner, bell: Arc::as_ptr(&bell), waker });
        }
        match cached {
            Some(c) => fut.as_mut().poll(&mut Context::from_waker(&c.waker)),
            None => fut.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn pending_with_stash() -> (impl Future<Output = ()>, Arc<std::sync::Mutex<Option<Waker>>>) {
        let stash: Arc<std::sync::Mutex<Option<Waker>>> = Arc::default();
        let s2 = stash.clone();
        let fut = std::future::poll_fn(move |cx| {
            *s2.lock().unwrap() = Some(cx.waker().clone());
            Poll::<()>::Pending
        });
        (fut, stash)
    }

    /// A wake from another thread reaches the inner waker and rings the bell
    /// once however often it comes; a wake from the polling thread does not ring.
    #[test]
    fn foreign_wakes_ring_the_bell() {
        let bell = Bell::new().unwrap();
        let _reg = bell.register();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let inner = Waker::from(count.clone());
        let (fut, stash) = pending_with_stash();
        let mut fut = CrossThread::new(fut);
        let mut cx = Context::from_waker(&inner);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        let w = stash.lock().unwrap().take().unwrap();

        w.wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let mut b = [0u8; 8];
        assert!((&bell.fd).read(&mut b).is_err(), "owner-thread wake rang the bell");

        let w2 = w.clone();
        std::thread::spawn(move || {
            w2.wake_by_ref();
            w2.wake();
        })
        .join()
        .unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 3);
        assert_eq!((&bell.fd).read(&mut b).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(b), 2);
        bell.ring();
        bell.drain();
        assert!((&bell.fd).read(&mut b).is_err(), "drain left the counter set");
    }

    /// Without a registered bell the future gets the executor's waker as is;
    /// the registration ends with its guard.
    #[test]
    fn no_bell_no_wrapper() {
        let bell = Bell::new().unwrap();
        drop(bell.register());
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let inner = Waker::from(count.clone());
        let (fut, stash) = pending_with_stash();
        let mut fut = CrossThread::new(fut);
        assert!(Pin::new(&mut fut).poll(&mut Context::from_waker(&inner)).is_pending());
        let w = stash.lock().unwrap().take().unwrap();
        assert!(w.will_wake(&inner));
    }
}
