//! Writers: threads that write, read back, flush, discard and zero a device's checked
//! region with direct I/O, each on its own stripes of it, keeping the model of every
//! acknowledged request and checking every read against it.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::dev::{now_ms, Device};
use crate::log::Log;
use crate::model::{check_block, stamp_block, BLOCK};

/// Blocks per stripe: a writer owns whole stripes, and one request stays in one.
pub const STRIPE: u64 = 16;

/// A zeroed buffer aligned for direct I/O.
pub struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let layout = Layout::from_size_align(len.max(BLOCK), BLOCK).expect("a 4 KiB-aligned layout");
        // SAFETY: the layout has a non-zero size; the pointer is checked for null below.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, len: len.max(BLOCK) }
    }
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.len);
        // SAFETY: ptr points to self.len initialised bytes owned by self, and &mut self
        // makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, BLOCK).expect("the layout new() made");
        // SAFETY: allocated in new() with this very layout and not freed since.
        unsafe { dealloc(self.ptr, layout) }
    }
}

// SAFETY: Aligned owns its allocation outright; nothing else holds the pointer.
unsafe impl Send for Aligned {}

fn errno_result(r: isize, want: usize) -> Result<(), i32> {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else if r as usize != want {
        Err(-1)
    } else {
        Ok(())
    }
}

pub fn pread(f: &File, buf: &mut [u8], off: u64) -> Result<(), i32> {
    // SAFETY: buf is a live, writable slice of buf.len() bytes for the whole call.
    let r = unsafe { libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off as libc::off_t) };
    errno_result(r, buf.len())
}

fn pwrite(f: &File, buf: &[u8], off: u64, fua: bool) -> Result<(), i32> {
    let iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let flags = if fua { libc::RWF_DSYNC } else { 0 };
    // SAFETY: iov describes buf, live and readable for the whole call; one iovec.
    let r = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, off as libc::off_t, flags) };
    errno_result(r, buf.len())
}

fn ioctl_range(f: &File, req: libc::c_ulong, off: u64, len: u64) -> Result<(), i32> {
    let range = [off, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read a [u64; 2] that lives for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, range.as_ptr()) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else {
        Ok(())
    }
}

const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn flush(f: &File) -> Result<(), i32> {
    // SAFETY: fdatasync on an fd that f keeps open.
    if unsafe { libc::fdatasync(f.as_raw_fd()) } < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else {
        Ok(())
    }
}

/// What one writer thread needs.
pub struct Writer<'a> {
    pub dev: &'a Device,
    pub thread: u64,
    pub threads: u64,
    pub region_blocks: u64,
    pub seed: u64,
    pub log: &'a Log,
    pub stop: &'a AtomicBool,
    /// When the request under way began (ms since start; 0: none).
    pub op_start: &'a AtomicU64,
    /// The next write's value: unique in the run.
    pub values: &'a AtomicU64,
    pub counts: &'a [AtomicU64; 7],
    /// At most this long a pause after each request (drawn at random), µs.
    pub think_us: u64,
    /// The control run: one write is left out of the model, which must be caught.
    pub control: bool,
}

/// Index into `Writer::counts`.
pub const WRITES: usize = 0;
pub const FUA_WRITES: usize = 1;
pub const READS: usize = 2;
pub const FLUSHES: usize = 3;
pub const DISCARDS: usize = 4;
pub const ZEROES: usize = 5;
pub const ERRORS: usize = 6;

impl Writer<'_> {
    pub fn run(&self) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ ((self.dev.index as u64) << 40) ^ (self.thread << 20));
        let stripes = self.region_blocks / STRIPE;
        let mine: Vec<u64> = (0..stripes).filter(|s| s % self.threads == self.thread).collect();
        let mut buf = Aligned::new(STRIPE as usize * BLOCK);
        let t0 = self.log.start();
        let mut writes_done = 0u64;
        while !self.stop.load(Ordering::SeqCst) && !self.log.has_failed() {
            let stripe = mine[rng.gen_range(0..mine.len())];
            let first = stripe * STRIPE + rng.gen_range(0..STRIPE);
            let n = rng.gen_range(1..=(stripe + 1) * STRIPE - first).min(8);
            let op = rng.gen_range(0..100);
            let guard = match self.dev.io.read() {
                Ok(g) => g,
                Err(_) => return,
            };
            let Some(f) = guard.as_ref() else {
                drop(guard);
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            };
            self.op_start.store(now_ms(t0).max(1), Ordering::SeqCst);
            // A request that spans a crash may or may not have taken effect, whatever it
            // returned: it counts as uncertain (the crash count is read again under the
            // model's lock, which the crash takes to count itself).
            let crashes = self.dev.crashes.load(Ordering::SeqCst);
            let off = first * BLOCK as u64;
            let len = (n as usize) * BLOCK;
            let what;
            let res = match op {
                0..=54 => {
                    let fua = op >= 50;
                    what = if fua { "fua write" } else { "write" };
                    let b = buf.get(len);
                    let mut vals = Vec::with_capacity(n as usize);
                    for i in 0..n {
                        let v = self.values.fetch_add(1, Ordering::SeqCst);
                        stamp_block(&mut b[i as usize * BLOCK..][..BLOCK], self.dev.index, first + i, v);
                        vals.push(v);
                    }
                    if let Ok(mut m) = self.dev.model.lock() {
                        m.begin(self.thread as usize, vals.iter().enumerate().map(|(i, &v)| (first + i as u64, v)));
                    }
                    let r = pwrite(f, b, off, fua);
                    writes_done += 1;
                    // The control: the model forgets this write (it expects the write before),
                    // and the block is read back at once: the run must fail.
                    let forget =
                        self.control && self.thread == 0 && self.dev.index == 1 && writes_done == 25 && r.is_ok();
                    if forget {
                        self.log.line(&format!("control: the model forgets write {:#x} to block {first}", vals[0]));
                        if let Ok(mut m) = self.dev.model.lock() {
                            m.wrote(first, vals[0] - 1, true);
                        }
                        let rb = buf.get(BLOCK);
                        if pread(f, rb, off).is_ok() {
                            if let Ok(m) = self.dev.model.lock() {
                                if let Err(e) = check_block(rb, self.dev.index, first, &m.blocks[first as usize].cur) {
                                    self.log.fail(&format!(
                                        "{} dev {}: read: {e}",
                                        self.dev.kind.name(),
                                        self.dev.index
                                    ));
                                }
                            }
                        }
                        self.op_start.store(0, Ordering::SeqCst);
                        drop(guard);
                        continue;
                    }
                    if let Ok(mut m) = self.dev.model.lock() {
                        m.end(self.thread as usize);
                        let spanned = self.dev.crashes.load(Ordering::SeqCst) != crashes;
                        for (i, v) in vals.into_iter().enumerate() {
                            if spanned {
                                m.wrote(first + i as u64, v, false);
                                continue;
                            }
                            match (&r, fua) {
                                (Ok(()), true) => m.wrote_durable(first + i as u64, v),
                                (Ok(()), false) => m.wrote(first + i as u64, v, true),
                                (Err(_), _) => m.wrote(first + i as u64, v, false),
                            }
                        }
                    }
                    self.counts[if fua { FUA_WRITES } else { WRITES }].fetch_add(1, Ordering::Relaxed);
                    r
                }
                55..=84 => {
                    what = "read";
                    let b = buf.get(len);
                    let r = pread(f, b, off);
                    if r.is_ok() {
                        if let Ok(m) = self.dev.model.lock() {
                            for i in 0..n {
                                let blk = first + i;
                                let allowed = &m.blocks[blk as usize].cur;
                                if let Err(e) =
                                    check_block(&b[i as usize * BLOCK..][..BLOCK], self.dev.index, blk, allowed)
                                {
                                    self.log.fail(&format!(
                                        "{} dev {}: read: {e}",
                                        self.dev.kind.name(),
                                        self.dev.index
                                    ));
                                }
                            }
                        }
                    }
                    self.counts[READS].fetch_add(1, Ordering::Relaxed);
                    r
                }
                85..=91 => {
                    what = "flush";
                    let upto = self.dev.model.lock().map(|m| m.seq()).unwrap_or(0);
                    let r = flush(f);
                    if r.is_ok() {
                        if let Ok(mut m) = self.dev.model.lock() {
                            if self.dev.crashes.load(Ordering::SeqCst) == crashes {
                                m.flushed(upto);
                            }
                        }
                    }
                    self.counts[FLUSHES].fetch_add(1, Ordering::Relaxed);
                    r
                }
                _ => {
                    let discard = op < 96;
                    what = if discard { "discard" } else { "write-zeroes" };
                    if let Ok(mut m) = self.dev.model.lock() {
                        m.begin(self.thread as usize, (0..n).map(|i| (first + i, 0)));
                    }
                    let r = ioctl_range(f, if discard { BLKDISCARD } else { BLKZEROOUT }, off, len as u64);
                    if let Ok(mut m) = self.dev.model.lock() {
                        m.end(self.thread as usize);
                        let spanned = self.dev.crashes.load(Ordering::SeqCst) != crashes;
                        for i in 0..n {
                            m.wrote(first + i, 0, r.is_ok() && !spanned);
                        }
                    }
                    self.counts[if discard { DISCARDS } else { ZEROES }].fetch_add(1, Ordering::Relaxed);
                    r
                }
            };
            self.op_start.store(0, Ordering::SeqCst);
            // A pause between requests leaves the (emulated) CPUs to the operations.
            std::thread::sleep(std::time::Duration::from_micros(rng.gen_range(0..self.think_us.max(1))));
            if let Err(e) = res {
                self.counts[ERRORS].fetch_add(1, Ordering::Relaxed);
                let trouble = self.dev.trouble.load(Ordering::SeqCst);
                self.log.line(&format!(
                    "{} dev {}: {what} of {n} blocks at block {first}: errno {e}{}",
                    self.dev.kind.name(),
                    self.dev.index,
                    if trouble { " (in a trouble window: allowed)" } else { "" }
                ));
                if !trouble {
                    self.log.fail(&format!(
                        "{} dev {}: {what} at block {first} failed (errno {e}) outside any fault window",
                        self.dev.kind.name(),
                        self.dev.index
                    ));
                }
                drop(guard);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}
