//! Cross-thread wake-ups for rings that sleep in the kernel.
//!
//! A queue thread sleeps in `io_uring_enter` until a completion arrives. When
//! one of its tasks waits for something another thread holds (a block being
//! copied, the journal's commit lock), the other thread's wake-up only puts
//! the task back in the executor's queue: the sleeping thread would not
//! notice. So each ring keeps a read on an eventfd in flight, registers that
//! eventfd for its thread here, and the waits that can cross threads wrap
//! their wakers with [`cross_thread_waker`] to write to it.

use std::cell::RefCell;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// An eventfd that wakes one ring's thread.
pub struct Kick {
    fd: OwnedFd,
}

impl Kick {
    pub fn new() -> std::io::Result<Kick> {
        // SAFETY: eventfd takes no pointers; a negative result is an error.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Kick { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to a descriptor we own.
        // A full counter (EAGAIN) already means a wake-up is pending.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

thread_local! {
    static THREAD_KICK: RefCell<Option<Arc<Kick>>> = const { RefCell::new(None) };
}

/// Registers the kick of the ring that runs on this thread.
pub fn set_thread_kick(k: Option<Arc<Kick>>) {
    THREAD_KICK.with(|t| *t.borrow_mut() = k);
}

struct KickingWaker {
    inner: Waker,
    kick: Arc<Kick>,
}

impl Wake for KickingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.inner.wake_by_ref();
        self.kick.kick();
    }
}

/// A waker that also wakes this thread's ring, when it has one.
pub fn cross_thread_waker(w: &Waker) -> Waker {
    THREAD_KICK.with(|t| match t.borrow().as_ref() {
        Some(k) => Waker::from(Arc::new(KickingWaker { inner: w.clone(), kick: k.clone() })),
        None => w.clone(),
    })
}

/// Wraps a future whose wake-up may come from another thread.
pub struct CrossThread<F>(pub F);

impl<F: Future + Unpin> Future for CrossThread<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let w = cross_thread_waker(cx.waker());
        let mut cx2 = Context::from_waker(&w);
        Pin::new(&mut self.0).poll(&mut cx2)
    }
}
