//! The fast path: a read or write that is one I/O on the image's storage and
//! nothing else, carried out without an executor by a caller that owns the
//! ring (a ublk queue's loop, see `crate::ublk::hybrid`).
//!
//! [`Image::fast_begin`] plans the request exactly as [`Image::read`] and
//! [`Image::write`] do (the same checks, the same in-flight hold on its guest
//! chunks, the same plan) and takes it only when the plan is one piece in
//! allocated space whose I/O is all there is to do: for a read, one range of
//! the storage below its size; for a write, no copy-on-write, no FUA, no
//! writethrough, an image already marked dirty. A write into a chunk not yet
//! allocated beyond the base allocates it first, as the async path does (a
//! plain call); its metadata is then journaled before the write completes
//! ([`FastEnd::Settle`]) unless a volatile log covers a daemon crash. The caller submits
//! [`FastIo::sqe`] and gives its result to [`Image::fast_end`], which does the
//! bookkeeping `write` does after its I/O. Anything else (None from
//! `fast_begin`, [`FastEnd::Retry`] or [`FastEnd::Settle`] from `fast_end`)
//! goes to the async path, which carries the request out whole (a write
//! written twice at the same place is harmless) or journals its metadata.

use super::Image;
use crate::io::FixedBuf;
use crate::meta::{InflightTicket, Source};
use crate::units::Bytes;
use io_uring::{opcode, squeue, types};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

/// One request on the fast path, planned and holding its guest chunks.
#[derive(Debug)]
#[must_use = "a fast request must be ended with Image::fast_end"]
pub struct FastIo {
    write: bool,
    fd: RawFd,
    /// Storage offset and guest offset of the request.
    so: u64,
    off: u64,
    len: u32,
    ticket: Option<InflightTicket>,
}

/// Where a fast request's bytes are.
#[derive(Debug, Clone, Copy)]
pub enum FastBuf {
    /// A buffer in the daemon, `len` bytes long, that nothing else touches
    /// until the operation completes.
    Mem(*mut u8),
    /// The request's registered buffer (zero copy).
    Fixed(FixedBuf),
}

/// What is left of a fast request once its I/O completed.
#[derive(Debug, PartialEq, Eq)]
pub enum FastEnd {
    /// Done: answer with this (the byte count).
    Done(i32),
    /// The data is written; journal the pending metadata (the async path's
    /// `journal_completed`), then answer with this.
    Settle(i32),
    /// The I/O failed or was short: carry the whole request out again on the
    /// async path (which reports the error, or finishes a short transfer).
    Retry,
    /// The write is done but its metadata could not be logged: answer with
    /// this negative errno.
    Failed(i32),
}

impl FastIo {
    /// The request's one operation: a read or write of `len` bytes of the
    /// storage at `so`, to or from `buf`.
    ///
    /// Building the entry is safe; submitting it is not: the submitter keeps
    /// `buf` valid until the completion, as for every operation.
    pub fn sqe(&self, buf: FastBuf) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        match (self.write, buf) {
            (false, FastBuf::Mem(p)) => opcode::Read::new(fd, p, self.len).offset(self.so).build(),
            (true, FastBuf::Mem(p)) => opcode::Write::new(fd, p, self.len).offset(self.so).build(),
            (false, FastBuf::Fixed(f)) => {
                opcode::ReadFixed::new(fd, f.off as *mut u8, self.len, f.index).offset(self.so).build()
            }
            (true, FastBuf::Fixed(f)) => {
                opcode::WriteFixed::new(fd, f.off as *const u8, self.len, f.index).offset(self.so).build()
            }
        }
    }
}

impl Image {
    /// Plans a read (`write` false) or write of `len` bytes at guest offset
    /// `off` for the fast path, or None when it needs more than one plain
    /// I/O (the async path then carries it out; nothing was changed).
    pub fn fast_begin(&self, write: bool, off: u64, len: u64) -> Option<FastIo> {
        let geo = &self.meta.geo;
        // Reads of a chunk not yet allocated read zeros (no I/O), and a first
        // write over the base copies from it: one table lookup says so (None
        // too past the table's end).
        if geo.has_table()
            && self.meta.table.get(geo.chunk_of(Bytes(off))).is_none()
            && (!write || off < geo.base_blocks() * u64::from(geo.block_size))
        {
            return None;
        }
        if len == 0 || len > u64::from(u32::MAX) || self.check_request(off, len, write).is_err() {
            return None;
        }
        let fd = self.storage.raw_fd()?;
        if write {
            if !self.marked_dirty.load(Ordering::Acquire) || self.opts.writethrough {
                return None;
            }
            // Allocates the chunks under the write as the async path does (the
            // raw layout's allocation is the storage's size). A full image or
            // storage goes the async way, which waits for freed chunks.
            if self.try_allocate_range(off, len).is_err() {
                return None;
            }
        }
        let ticket = self.meta.enter_ticket(Bytes(off), len);
        let plan = if write { self.meta.plan_write(Bytes(off), len) } else { self.meta.plan_read(Bytes(off), len) };
        let so = match plan.as_ref().map(|p| p.as_slice()) {
            Ok([p]) => match p.src {
                Source::Image(so) if write || so + len <= self.storage.size() => Some(so),
                _ => None,
            },
            _ => None,
        };
        match so {
            Some(so) => Some(FastIo { write, fd, so, off, len: len as u32, ticket }),
            None => {
                self.leave(ticket);
                None
            }
        }
    }

    fn leave(&self, ticket: Option<InflightTicket>) {
        if let Some(t) = ticket {
            self.meta.inflight.leave(t);
        }
    }

    /// Ends `io`, whose operation completed with `res`. `lazy_metadata`: as
    /// [`crate::ublk::request::Policy`] says for this image.
    pub fn fast_end(&self, io: FastIo, res: i32, lazy_metadata: bool) -> FastEnd {
        let FastIo { write, off, len, ticket, .. } = io;
        self.leave(ticket);
        if res != len as i32 {
            return FastEnd::Retry;
        }
        if !write {
            return FastEnd::Done(res);
        }
        // As `write_data` after its I/O.
        self.meta.record_written(Bytes(off), u64::from(len));
        self.stats.guest_writes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.sync_volatile() {
            tracing::warn!(off, len, error = %e, "request failed");
            return FastEnd::Failed(-e.errno());
        }
        self.note_completed();
        // As `journal_completed`: a commit under way may hold the record of
        // the chunk this write landed in.
        if !lazy_metadata && (self.meta.persist.pending() > 0 || self.committing.load(Ordering::Acquire)) {
            return FastEnd::Settle(res);
        }
        FastEnd::Done(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{create, CreateOptions, OpenOptions};
    use crate::io::uring::Uring;

    fn image(dir: &std::path::Path, base: Option<std::path::PathBuf>, chunk: Option<u32>) -> Image {
        let p = dir.join("t.fvd");
        let opts = CreateOptions {
            size: Some(8 << 20),
            base,
            block_size: 64 << 10,
            chunk_size: chunk,
            journal_size: 1 << 20,
            ..Default::default()
        };
        create(&p, &opts).unwrap();
        Image::open(&p, &OpenOptions::default()).unwrap()
    }

    /// Runs `io` on `ring` the way a queue does: its one SQE, then `fast_end`.
    fn run(img: &Image, ring: &Uring, io: FastIo, buf: &mut [u8]) -> FastEnd {
        let sqe = io.sqe(FastBuf::Mem(buf.as_mut_ptr()));
        // SAFETY: `buf` outlives the operation, which block_on awaits.
        let res = ring.block_on(unsafe { crate::io::IoEngine::submit(ring, sqe) }).unwrap();
        img.fast_end(io, res, false)
    }

    #[test]
    fn takes_only_one_plain_io() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), None, Some(1 << 20));
        let ring = Uring::new(8).unwrap();
        // Clean image, unallocated chunk: the async path.
        assert!(img.fast_begin(true, 0, 4096).is_none());
        // Reads of never-written space read zeros without I/O: the async path.
        assert!(img.fast_begin(false, 0, 4096).is_none());
        let data = vec![0x3cu8; 8192];
        ring.block_on(img.write(&ring, 1 << 20, &data, false)).unwrap().unwrap();
        // Not journaled yet: an overwrite there must wait for the journal.
        let io = img.fast_begin(true, 1 << 20, 4096).expect("allocated: fast");
        assert_eq!(run(&img, &ring, io, &mut data.clone()), FastEnd::Settle(4096));
        ring.block_on(img.flush(&ring)).unwrap().unwrap();
        // Allocated now (and dirty): overwrites and reads are fast.
        let mut w = vec![0x77u8; 4096];
        let io = img.fast_begin(true, 1 << 20, 4096).expect("overwrite is fast");
        assert!(!img.meta().inflight.is_idle(crate::units::ChunkIdx(1)), "held while in flight");
        assert_eq!(run(&img, &ring, io, &mut w), FastEnd::Done(4096));
        assert!(img.meta().inflight.is_idle(crate::units::ChunkIdx(1)));
        let mut r = vec![0u8; 8192];
        let io = img.fast_begin(false, 1 << 20, 8192).expect("read is fast");
        assert_eq!(run(&img, &ring, io, &mut r), FastEnd::Done(8192));
        assert!(r[..4096].iter().all(|&b| b == 0x77) && r[4096..].iter().all(|&b| b == 0x3c));
        // A first write beyond the base allocates its chunk on the fast path;
        // the allocation is journaled before the write completes.
        let io = img.fast_begin(true, 3 << 20, 4096).expect("first write beyond the base: fast");
        assert!(img.meta().table.get(crate::units::ChunkIdx(3)).is_some());
        assert_eq!(run(&img, &ring, io, &mut w), FastEnd::Settle(4096));
        ring.block_on(img.flush(&ring)).unwrap().unwrap();
        // Across two chunks (one unallocated), out of range, unaligned: not fast.
        assert!(img.fast_begin(false, (2 << 20) - 4096, 8192).is_none());
        assert!(img.fast_begin(false, 8 << 20, 4096).is_none());
        assert!(img.fast_begin(true, (1 << 20) + 1, 512).is_none());
        assert!(img.fast_begin(false, 1 << 20, 0).is_none());
        img.close().unwrap();
    }

    #[test]
    fn copy_on_write_and_read_only_go_the_async_way() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x5au8; 4 << 20]).unwrap();
        let img = image(dir.path(), Some(base), Some(1 << 20));
        let ring = Uring::new(8).unwrap();
        // Into the chunk, part of one block: the rest of the block is copied.
        ring.block_on(img.write(&ring, 1 << 20, &[1u8; 4096], false)).unwrap().unwrap();
        ring.block_on(img.flush(&ring)).unwrap().unwrap();
        // Same block again: in the image now, fast.
        let io = img.fast_begin(true, (1 << 20) + 4096, 4096).expect("block copied: fast");
        assert_eq!(run(&img, &ring, io, &mut [2u8; 4096]), FastEnd::Done(4096));
        // The next block is still in the base: copy-on-write, not fast.
        assert!(img.fast_begin(true, (1 << 20) + (64 << 10), 4096).is_none());
        // Reads of base blocks go through the base.
        assert!(img.fast_begin(false, 2 << 20, 4096).is_none());
        let mut back = vec![0u8; 3 * 4096];
        ring.block_on(img.read(&ring, 1 << 20, &mut back)).unwrap().unwrap();
        assert!(back[..4096].iter().all(|&b| b == 1));
        assert!(back[4096..8192].iter().all(|&b| b == 2));
        assert!(back[8192..].iter().all(|&b| b == 0x5a));
        img.close().unwrap();
        let ro =
            Image::open(&dir.path().join("t.fvd"), &OpenOptions { read_only: true, ..Default::default() }).unwrap();
        assert!(ro.fast_begin(true, 1 << 20, 4096).is_none());
        assert!(ro
            .fast_begin(false, 1 << 20, 4096)
            .is_some_and(|io| ro.fast_end(io, 4096, false) == FastEnd::Done(4096)));
    }

    #[test]
    fn a_short_or_failed_io_is_retried_and_leaves_nothing_held() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), None, None);
        let ring = Uring::new(8).unwrap();
        ring.block_on(img.write(&ring, 0, &[9u8; 4096], false)).unwrap().unwrap();
        let io = img.fast_begin(true, 0, 4096).expect("raw layout: fast");
        assert!(img.fast_begin(true, 0, 4096).is_some_and(|io| img.fast_end(io, 4096, true) == FastEnd::Done(4096)));
        assert_eq!(img.fast_end(io, -libc::EIO, false), FastEnd::Retry);
        let io = img.fast_begin(false, 0, 4096).expect("fast");
        assert_eq!(img.fast_end(io, 512, false), FastEnd::Retry);
        img.close().unwrap();
    }
}
