//! The I/O seam: an [`IoEngine`] submits io_uring operations and awaits their
//! completion. Two engines exist: [`uring::Uring`], a ring of its own for host
//! tools, tests and the benchmark, and the ublk queue's ring (in
//! [`crate::ublk`]), so the queues run the same image code on their own ring.
//!
//! The helpers here pick the path per storage: io_uring on the storage's
//! descriptor, or the storage's synchronous methods when it has none (the
//! simulated disk in tests).

pub mod aligned;
pub mod uring;
pub mod wake;

pub use aligned::AlignedBuf;

use crate::storage::Storage;
use io_uring::{opcode, squeue, types};
use std::future::Future;
use std::io;

pub(crate) mod sealed {
    /// Only this crate's engines implement [`super::IoEngine`]: each of them
    /// keeps the promise that makes the image's I/O futures safe to drop (see
    /// there). The ublk queue engine implements it where it is defined, so
    /// that this layer names nothing above it.
    pub trait Sealed {}
    impl Sealed for super::SyncOnly {}
    impl Sealed for super::uring::Uring {}
}

/// Submits io_uring operations.
///
/// The image's public async functions (`Image::read`, `Image::write`, ...) lend
/// the kernel borrowed buffers, and a caller may drop their futures at any
/// point: safe code can do that. What keeps the kernel from writing into freed
/// memory is a promise every engine keeps by construction, which is why the
/// trait is sealed (no engine from outside the crate):
/// - [`uring::Uring`] (host tools, tests): a dropped operation's future waits in
///   its `Drop` for the completion before the buffers can go;
/// - [`SyncOnly`]: nothing is ever in flight (every helper here takes the
///   storage's synchronous path);
/// - the ublk queue engine: only the queue threads can make one (it is private
///   to the crate), and they run every future to completion (a per-tag task
///   awaits its request before committing it; a queue thread leaves its loop
///   only after all of its tasks, the background ones included, have finished).
pub trait IoEngine: sealed::Sealed {
    /// Submits `sqe` and resolves to the CQE's result (negative errno on failure).
    ///
    /// # Safety
    /// Every buffer the entry points to must stay valid and unaliased until the
    /// operation completes. The callers in this crate borrow the buffers across
    /// the await of the returned future; that the future is never abandoned while
    /// the operation is in flight is the engine's promise (see the trait).
    unsafe fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32>;
}

fn check(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// Reads exactly `buf.len()` bytes at `off`; bytes past the end read as zeros.
pub async fn read_at<E: IoEngine>(e: &E, s: &dyn Storage, buf: &mut [u8], off: u64) -> io::Result<()> {
    let Some(fd) = s.raw_fd() else {
        return s.read_at(buf, off);
    };
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let len = rest.len().min(1 << 30) as u32;
        let sqe = opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), len).offset(off + done as u64).build();
        // SAFETY: `rest` is borrowed mutably across the await below, so it stays
        // valid and unaliased until the operation completes; we await it at once.
        let n = check(unsafe { e.submit(sqe) }.await)?;
        if n == 0 {
            rest.fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Writes all of `buf` at `off`.
pub async fn write_at<E: IoEngine>(e: &E, s: &dyn Storage, buf: &[u8], off: u64) -> io::Result<()> {
    let Some(fd) = s.raw_fd() else {
        return s.write_at(buf, off);
    };
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &buf[done..];
        let len = rest.len().min(1 << 30) as u32;
        let sqe = opcode::Write::new(types::Fd(fd), rest.as_ptr(), len).offset(off + done as u64).build();
        // SAFETY: `rest` is borrowed across the await below and the kernel only
        // reads from it; the operation is awaited at once.
        let n = check(unsafe { e.submit(sqe) }.await)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
        done += n;
    }
    Ok(())
}

/// A request's data in a buffer the kernel registered on the queue's ring
/// (ublk zero copy, `UBLK_F_AUTO_BUF_REG`): the registered buffer's index,
/// and a byte offset into it. The daemon never sees those bytes: fixed-buffer
/// reads and writes move them between the request's pages and a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedBuf {
    pub index: u16,
    pub off: usize,
}

impl FixedBuf {
    /// The same buffer, `off` bytes further on.
    pub fn at(self, off: usize) -> FixedBuf {
        FixedBuf { index: self.index, off: self.off + off }
    }
}

/// Reads `len` bytes of `fd` at `off` into the registered buffer `fb`. A read
/// that ends early (end of file) fills the rest from `zero_fd` (/dev/zero).
pub async fn read_fixed<E: IoEngine>(
    e: &E,
    fd: i32,
    zero_fd: i32,
    fb: FixedBuf,
    len: usize,
    off: u64,
) -> io::Result<()> {
    let mut done = 0usize;
    let mut src = (fd, off);
    while done < len {
        let n = (len - done).min(1 << 30) as u32;
        let at = (fb.off + done) as u64;
        let sqe =
            opcode::ReadFixed::new(types::Fd(src.0), at as *mut u8, n, fb.index).offset(src.1 + done as u64).build();
        // SAFETY: a fixed-buffer read points at no daemon memory: its address
        // is an offset into the kernel's registered buffer `fb.index`, which
        // belongs to one request until that request is committed, and the
        // request's task commits only after this awaited operation completed.
        let got = check(unsafe { e.submit(sqe) }.await)?;
        if got == 0 {
            if src.0 == zero_fd {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read of zeros"));
            }
            // Past the end of the file: the rest reads as zeros.
            src = (zero_fd, 0);
            continue;
        }
        done += got;
    }
    Ok(())
}

/// Writes `len` bytes of the registered buffer `fb` to `fd` at `off`.
pub async fn write_fixed<E: IoEngine>(e: &E, fd: i32, fb: FixedBuf, len: usize, off: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(1 << 30) as u32;
        let at = (fb.off + done) as u64;
        let sqe =
            opcode::WriteFixed::new(types::Fd(fd), at as *const u8, n, fb.index).offset(off + done as u64).build();
        // SAFETY: as in `read_fixed`: the address is an offset into the
        // kernel's registered buffer, valid until the request's task commits,
        // which it does only after this awaited operation completed.
        let got = check(unsafe { e.submit(sqe) }.await)?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
        done += got;
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes of a descriptor at `off` (the zero-copy
/// bounce file: always fully there).
pub async fn read_fd<E: IoEngine>(e: &E, fd: i32, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let sqe = opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), rest.len().min(1 << 30) as u32)
            .offset(off + done as u64)
            .build();
        // SAFETY: `rest` is borrowed mutably across the await below; awaited at once.
        let n = check(unsafe { e.submit(sqe) }.await)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
        }
        done += n;
    }
    Ok(())
}

/// Writes all of `buf` to a descriptor at `off`.
pub async fn write_fd<E: IoEngine>(e: &E, fd: i32, buf: &[u8], off: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &buf[done..];
        let sqe = opcode::Write::new(types::Fd(fd), rest.as_ptr(), rest.len().min(1 << 30) as u32)
            .offset(off + done as u64)
            .build();
        // SAFETY: `rest` is borrowed across the await below and only read; awaited at once.
        let n = check(unsafe { e.submit(sqe) }.await)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
        done += n;
    }
    Ok(())
}

/// Deallocates a range of a descriptor (fallocate punch).
pub async fn punch_fd<E: IoEngine>(e: &E, fd: i32, off: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let sqe = opcode::Fallocate::new(types::Fd(fd), len).offset(off).mode(mode).build();
    // SAFETY: fallocate points at no memory.
    check(unsafe { e.submit(sqe) }.await).map(|_| ())
}

/// Makes completed writes durable (fdatasync).
pub async fn sync<E: IoEngine>(e: &E, s: &dyn Storage) -> io::Result<()> {
    let Some(fd) = s.raw_fd() else {
        return s.sync();
    };
    let sqe = opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build();
    // SAFETY: fsync points at no memory.
    check(unsafe { e.submit(sqe) }.await).map(|_| ())
}

/// Deallocates a range so that it reads as zeros.
pub async fn punch<E: IoEngine>(e: &E, s: &dyn Storage, off: u64, len: u64) -> io::Result<()> {
    let Some(fd) = s.raw_fd().filter(|_| !s.sync_punch()) else {
        return s.punch(off, len);
    };
    if len == 0 {
        return Ok(());
    }
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let sqe = opcode::Fallocate::new(types::Fd(fd), len).offset(off).mode(mode).build();
    // SAFETY: fallocate points at no memory.
    check(unsafe { e.submit(sqe) }.await).map(|_| ())
}

/// Sleeps on the engine's ring (a timeout operation), so that a queue thread
/// keeps serving requests meanwhile.
pub async fn sleep<E: IoEngine>(e: &E, d: std::time::Duration) {
    let ts = types::Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos());
    let sqe = opcode::Timeout::new(&ts).build();
    // SAFETY: `ts` lives on this future's frame until the operation completes,
    // which we await at once.
    let _ = unsafe { e.submit(sqe) }.await;
}

/// Waits `d` in steps of at most 100 ms, ending early once `cancelled` says
/// so. True if the whole wait passed without a cancel.
pub async fn sleep_unless<E: IoEngine>(e: &E, d: std::time::Duration, cancelled: impl Fn() -> bool) -> bool {
    let until = std::time::Instant::now() + d;
    loop {
        if cancelled() {
            return false;
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        sleep(e, left.min(std::time::Duration::from_millis(100))).await;
    }
}

/// An engine for storage without a descriptor: every helper above takes the
/// synchronous path, so `submit` is never reached.
pub struct SyncOnly;

impl IoEngine for SyncOnly {
    unsafe fn submit(&self, _sqe: squeue::Entry) -> impl Future<Output = i32> {
        std::future::ready(-libc::EOPNOTSUPP)
    }
}

/// Runs a future to completion on the current thread with the synchronous
/// engine (for storage without descriptors, and for code paths where every
/// operation is synchronous).
pub fn block_on_sync<F: Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}
