//! A thread-local io_uring with a small single-threaded executor, for host
//! tools, tests and the benchmark.

use super::wake::Bell;
use super::IoEngine;
use io_uring::{squeue, IoUring};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// user_data of the bell's poll (never a slab key).
const BELL_DATA: u64 = u64::MAX;

enum Slot {
    Waiting(Option<Waker>),
    Done(i32),
}

/// One io_uring and the completion slots of its operations in flight.
pub struct Uring {
    ring: RefCell<IoUring>,
    bell: std::sync::Arc<Bell>,
    bell_armed: Cell<bool>,
    slots: RefCell<slab::Slab<Slot>>,
    in_flight: Cell<usize>,
    unsubmitted: Cell<usize>,
}

impl Uring {
    pub fn new(entries: u32) -> std::io::Result<Uring> {
        Ok(Uring {
            ring: RefCell::new(IoUring::new(entries)?),
            bell: Bell::new()?,
            bell_armed: Cell::new(false),
            slots: RefCell::new(slab::Slab::new()),
            in_flight: Cell::new(0),
            unsubmitted: Cell::new(0),
        })
    }

    /// Registers `buf` as fixed buffer 0 (tests of the zero-copy path, which
    /// on a ublk queue uses buffers the kernel registers).
    ///
    /// # Safety
    /// `buf` must stay valid, and be touched by nothing else while an
    /// operation on it is in flight, for as long as the ring lives.
    #[cfg(test)]
    pub(crate) unsafe fn register_buffer(&self, buf: &mut [u8]) -> std::io::Result<()> {
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: the caller keeps `buf` valid for the ring's life (above).
        unsafe { self.ring.borrow().submitter().register_buffers(&[iov]) }
    }

    /// Runs `fut` (and anything it spawns on `exe`) to completion, driving the ring.
    pub fn run<'a, T: 'a>(
        &self,
        exe: &smol::LocalExecutor<'a>,
        fut: impl Future<Output = T> + 'a,
    ) -> std::io::Result<T> {
        let registered = self.bell.register();
        let task = exe.spawn(fut);
        let r = loop {
            while exe.try_tick() {}
            if task.is_finished() {
                break Ok(());
            }
            // Tasks wait for I/O or for another thread: sleep until either
            // a completion or the bell arrives.
            self.arm_bell();
            if let Err(e) = self.submit_and_reap(1) {
                break Err(e);
            }
        };
        drop(registered);
        r?;
        Ok(futures::executor::block_on(task))
    }

    /// Convenience: run one future on a fresh executor.
    pub fn block_on<T>(&self, fut: impl Future<Output = T>) -> std::io::Result<T> {
        let exe = smol::LocalExecutor::new();
        self.run(&exe, fut)
    }

    fn submit_and_reap(&self, want: usize) -> std::io::Result<()> {
        {
            let ring = self.ring.borrow();
            loop {
                match ring.submitter().submit_and_wait(want) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                    Err(e) => return Err(e),
                }
            }
            self.unsubmitted.set(0);
        }
        self.reap();
        Ok(())
    }

    /// Keeps the bell's poll in flight.
    fn arm_bell(&self) {
        if self.bell_armed.get() {
            return;
        }
        let sqe = self.bell.poll_entry().user_data(BELL_DATA);
        let mut ring = self.ring.borrow_mut();
        // SAFETY: a poll points at no memory (see Bell::poll_entry).
        if unsafe { ring.submission().push(&sqe) }.is_ok() {
            self.bell_armed.set(true);
        }
    }

    fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            if cqe.user_data() == BELL_DATA {
                self.bell.drain();
                self.bell_armed.set(false);
                continue;
            }
            let key = cqe.user_data() as usize;
            if let Some(slot) = slots.get_mut(key) {
                if let Slot::Waiting(w) = std::mem::replace(slot, Slot::Done(cqe.result())) {
                    self.in_flight.set(self.in_flight.get() - 1);
                    if let Some(w) = w {
                        w.wake();
                    }
                }
            }
        }
    }

    fn push(&self, sqe: squeue::Entry) -> usize {
        let key = self.slots.borrow_mut().insert(Slot::Waiting(None));
        let sqe = sqe.user_data(key as u64);
        loop {
            let pushed = {
                let mut ring = self.ring.borrow_mut();
                let mut sq = ring.submission();
                // SAFETY: the caller of `submit` guarantees the buffers outlive
                // the operation (see IoEngine::submit).
                unsafe { sq.push(&sqe).is_ok() }
            };
            if pushed {
                break;
            }
            // Submission queue full: hand what is queued to the kernel.
            let _ = self.ring.borrow().submit();
            self.reap();
        }
        self.in_flight.set(self.in_flight.get() + 1);
        self.unsubmitted.set(self.unsubmitted.get() + 1);
        key
    }
}

impl Uring {
    /// Submits `sqe` and waits for its completion, without a task (what a
    /// ublk queue's fast path does with its SQEs, for host harnesses).
    ///
    /// # Safety
    /// As [`IoEngine::submit`]: the buffers `sqe` points to stay valid until
    /// this returns, which it does only once the operation completed.
    pub unsafe fn run_one(&self, sqe: squeue::Entry) -> std::io::Result<i32> {
        let key = self.push(sqe);
        loop {
            let done = match self.slots.borrow().get(key) {
                Some(Slot::Done(res)) => Some(*res),
                _ => None,
            };
            if let Some(res) = done {
                self.slots.borrow_mut().remove(key);
                return Ok(res);
            }
            self.submit_and_reap(1)?;
        }
    }
}

/// The future of one operation on a [`Uring`].
pub struct UringOp<'r> {
    ring: &'r Uring,
    key: usize,
    done: bool,
}

impl Future for UringOp<'_> {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let mut slots = self.ring.slots.borrow_mut();
        let key = self.key;
        match slots.get_mut(key) {
            Some(Slot::Done(res)) => {
                let res = *res;
                slots.remove(key);
                drop(slots);
                self.done = true;
                Poll::Ready(res)
            }
            Some(Slot::Waiting(w)) => {
                *w = Some(cx.waker().clone());
                Poll::Pending
            }
            None => Poll::Ready(-libc::EIO),
        }
    }
}

impl Drop for UringOp<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Dropped while in flight: the kernel may still use the buffers the
        // caller lent. Wait for the completion here so they outlive it.
        loop {
            let finished = matches!(self.ring.slots.borrow().get(self.key), Some(Slot::Done(_)) | None);
            if finished {
                break;
            }
            if self.ring.submit_and_reap(1).is_err() {
                break;
            }
        }
        let mut slots = self.ring.slots.borrow_mut();
        if slots.contains(self.key) {
            slots.remove(self.key);
        }
    }
}

impl IoEngine for Uring {
    unsafe fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32> {
        let key = self.push(sqe);
        UringOp { ring: self, key, done: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::wake::CrossThread;
    use std::sync::{Arc, Mutex};

    /// A task woken from another thread while the ring sleeps is run: the
    /// ring's bell wakes it.
    #[test]
    fn a_foreign_wake_wakes_the_sleeping_ring() {
        let ring = Uring::new(8).unwrap();
        let slot: Arc<Mutex<(bool, Option<Waker>)>> = Arc::default();
        let s2 = slot.clone();
        let waiter = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut g = s2.lock().unwrap();
            g.0 = true;
            if let Some(w) = g.1.take() {
                w.wake();
            }
        });
        let done = ring.block_on(CrossThread::new(std::future::poll_fn(|cx| {
            let mut g = slot.lock().unwrap();
            if g.0 {
                return Poll::Ready(true);
            }
            g.1 = Some(cx.waker().clone());
            Poll::Pending
        })));
        assert!(done.unwrap());
        waiter.join().unwrap();
    }
}
