//! The data path: read, write, discard and write-zeroes.
//!
//! Every request is planned first (no I/O), then all of its pieces are issued
//! at once and awaited together: a read that touches the base and several
//! chunks costs one round trip, not one per piece.

use super::{Image, ImageError};
use crate::io::{self, IoEngine};
use crate::meta::{Piece, Source};
use crate::storage::StorageError;
use crate::units::{BlockIdx, Bytes, ChunkIdx};

use futures::future::join_all;
use std::sync::atomic::Ordering;

/// How many commits an allocation on a full image tries before it gives up
/// on chunks freed by discards (each after a pause but the first).
const FREED_RETRIES: u32 = 100;

/// The pause between those tries grows from 1 ms to this, so that the
/// tries span about two seconds: a punch under load can take that long.
const FREED_PAUSE_MAX_MS: u64 = 32;

/// Where a write's bytes come from.
#[derive(Clone, Copy)]
enum Data<'a> {
    Mem(&'a [u8]),
    /// The request's registered buffer (zero copy).
    Fixed(io::FixedBuf),
    Zeros,
}

impl<'a> Data<'a> {
    /// The part of the data at `off` (bytes from the request's start), `len` long.
    fn part(self, off: usize, len: usize) -> Data<'a> {
        match self {
            Data::Mem(b) => Data::Mem(&b[off..off + len]),
            Data::Fixed(f) => Data::Fixed(f.at(off)),
            Data::Zeros => Data::Zeros,
        }
    }
}

fn first_error(results: Vec<Result<(), ImageError>>) -> Result<(), ImageError> {
    results.into_iter().collect()
}

impl Image {
    pub(super) fn check_request(&self, off: u64, len: u64, write: bool) -> Result<(), ImageError> {
        if off % 512 != 0 || len % 512 != 0 {
            return Err(ImageError::Unaligned { path: self.name(), off, len });
        }
        self.meta.check_range(Bytes(off), len).map_err(|source| ImageError::Meta { path: self.name(), source })?;
        if write {
            if self.opts.read_only {
                return Err(ImageError::ReadOnly { path: self.name() });
            }
            self.check_not_failed()?;
        }
        Ok(())
    }

    /// Appends this request's metadata updates to the volatile log (with
    /// every update made before them, in order: see `VolatileLog`).
    pub(crate) fn sync_volatile(&self) -> Result<(), ImageError> {
        if let Some(v) = &self.volatile {
            if v.covers(&self.meta.persist) {
                return Ok(());
            }
            v.sync(&self.meta.persist).map_err(|source| ImageError::Io {
                path: self.name(),
                what: "volatile log append",
                offset: 0,
                source,
            })?;
        }
        Ok(())
    }

    async fn check_write<E: IoEngine>(&self, e: &E, off: u64, len: u64) -> Result<(), ImageError> {
        self.check_request(off, len, true)?;
        self.ensure_dirty(e).await
    }

    fn meta_err(&self) -> impl FnOnce(crate::meta::MetaError) -> ImageError + '_ {
        move |source| ImageError::Meta { path: self.name(), source }
    }

    fn data_err(&self, what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
        move |source| ImageError::Io { path: self.name(), what, offset, source }
    }

    /// Reads `buf.len()` bytes at guest offset `off` (both multiples of 512).
    pub async fn read<E: IoEngine>(&self, e: &E, off: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.check_request(off, buf.len() as u64, false)?;
        let _inflight = self.meta.enter(Bytes(off), buf.len() as u64);
        let plan = self.meta.plan_read(Bytes(off), buf.len() as u64).map_err(self.meta_err())?;
        if let [p] = plan.as_slice() {
            // One piece (the common case): no fan-out needed.
            self.read_piece(e, p.src, &mut buf[..]).await?;
        } else {
            let mut futs = Vec::with_capacity(plan.len());
            let mut rest = &mut *buf;
            for p in &plan {
                let (piece, tail) = rest.split_at_mut(p.len);
                rest = tail;
                futs.push(self.read_piece(e, p.src, piece));
            }
            first_error(join_all(futs).await)?;
        }
        if self.cor.is_some() {
            for p in plan.iter().filter(|p| matches!(p.src, Source::Base(_))) {
                if let Source::Base(bo) = p.src {
                    self.queue_copy_on_read(bo, &buf[p.buf_off..p.buf_off + p.len]);
                }
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at guest offset `off` straight into the request's
    /// registered buffer `fb` (zero copy), with `zero_fd` (/dev/zero) for
    /// ranges that read as zeros. Ok(false): this read needs its bytes in the
    /// daemon (copy-on-read, a base, storage without a descriptor or past its
    /// end); nothing was read, and the caller takes the copy path.
    pub async fn read_fixed<E: IoEngine>(
        &self,
        e: &E,
        off: u64,
        len: u64,
        fb: io::FixedBuf,
        zero_fd: i32,
    ) -> Result<bool, ImageError> {
        self.check_request(off, len, false)?;
        let Some(fd) = self.storage.raw_fd() else {
            return Ok(false);
        };
        if self.cor.is_some() {
            return Ok(false);
        }
        let _inflight = self.meta.enter(Bytes(off), len);
        let plan = self.meta.plan_read(Bytes(off), len).map_err(self.meta_err())?;
        let end = self.storage.size();
        let direct = |p: &Piece| match p.src {
            Source::Image(so) => so + p.len as u64 <= end,
            Source::Zero | Source::Copy(_) => true,
            Source::Base(_) => self.base.is_none(),
        };
        if !plan.iter().all(direct) {
            return Ok(false);
        }
        let piece = |p: &Piece| {
            let (src, so) = match p.src {
                Source::Image(so) => (fd, so),
                _ => (zero_fd, 0),
            };
            let (f, len) = (fb.at(p.buf_off), p.len);
            async move { io::read_fixed(e, src, zero_fd, f, len, so).await.map_err(self.data_err("read", so)) }
        };
        if let [p] = plan.as_slice() {
            piece(p).await?;
        } else {
            first_error(join_all(plan.iter().map(piece)).await)?;
        }
        Ok(true)
    }

    pub(super) async fn read_piece<E: IoEngine>(&self, e: &E, src: Source, buf: &mut [u8]) -> Result<(), ImageError> {
        match src {
            Source::Image(so) => {
                // Storage bytes at or past the storage's size read as zeros: past a
                // file's end, and past a plain block device's initialised end (what
                // lies there is the device's old content, see `storage::device`).
                let n = (self.storage.size().saturating_sub(so) as usize).min(buf.len());
                buf[n..].fill(0);
                if n == 0 {
                    return Ok(());
                }
                io::read_at(e, self.storage.as_ref(), &mut buf[..n], so).await.map_err(self.data_err("read", so))
            }
            Source::Base(bo) => match &self.base {
                Some(b) => b.read(e, buf, bo).await,
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            Source::Zero | Source::Copy(_) => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Writes `buf` at guest offset `off`. With `fua` (or in writethrough mode)
    /// the data and its metadata are durable when this returns.
    pub async fn write<E: IoEngine>(&self, e: &E, off: u64, buf: &[u8], fua: bool) -> Result<(), ImageError> {
        self.write_data(e, off, buf.len() as u64, Data::Mem(buf), fua).await.map(|_| ())
    }

    /// Writes `len` bytes at guest offset `off` straight from the request's
    /// registered buffer `fb` (zero copy). Ok(false): this write needs its
    /// bytes in the daemon (a copy-on-write merge with the base, storage
    /// without a descriptor); nothing was written (its chunks may have been
    /// allocated, which a retry finds done), and the caller takes the copy
    /// path. The metadata path is the same as `write`'s.
    pub async fn write_fixed<E: IoEngine>(
        &self,
        e: &E,
        off: u64,
        len: u64,
        fb: io::FixedBuf,
        fua: bool,
    ) -> Result<bool, ImageError> {
        if self.storage.raw_fd().is_none() {
            return Ok(false);
        }
        self.write_data(e, off, len, Data::Fixed(fb), fua).await
    }

    async fn write_data<E: IoEngine>(
        &self,
        e: &E,
        off: u64,
        len: u64,
        data: Data<'_>,
        fua: bool,
    ) -> Result<bool, ImageError> {
        self.check_write(e, off, len).await?;
        let (inflight, plan) = self.allocate_and_plan(e, off, len).await?;
        if let Data::Fixed(_) = data {
            // A copy-on-write of part of a block merges the request's bytes
            // with the base's in the daemon.
            let bs = self.meta.geo.block_size as u64;
            let whole = |p: &Piece| (off + p.buf_off as u64) % bs == 0 && p.len as u64 % bs == 0;
            if !plan.iter().all(|p| !matches!(p.src, Source::Copy(_)) || whole(p)) {
                return Ok(false);
            }
        }
        let r = if let [p] = plan.as_slice() {
            self.write_piece(e, off, p, data).await
        } else {
            let futs = plan.iter().map(|p| self.write_piece(e, off, p, data.part(p.buf_off, p.len)));
            first_error(join_all(futs).await)
        };
        drop(inflight);
        if r.is_ok() {
            self.meta.record_written(Bytes(off), len);
        }
        self.stats.guest_writes.fetch_add(1, Ordering::Relaxed);
        self.sync_volatile()?;
        self.note_completed();
        r?;
        if fua || self.opts.writethrough {
            self.flush(e).await?;
        }
        Ok(true)
    }

    /// Allocates the chunks under a write and plans it. A discard that frees
    /// one of them in between (the guest sent both at once) makes the plan
    /// fail; the write then allocates again, as if it came after the discard.
    async fn allocate_and_plan<E: IoEngine>(
        &self,
        e: &E,
        off: u64,
        len: u64,
    ) -> Result<(Option<crate::meta::InflightGuard<'_>>, crate::meta::Plan), ImageError> {
        let mut tries = 0;
        loop {
            self.allocate_range(e, off, len).await?;
            // Entered after allocating: a full image's allocation may wait for
            // a freed chunk of this very range to be released (meta::inflight).
            let inflight = self.meta.enter(Bytes(off), len);
            match self.meta.plan_write(Bytes(off), len) {
                Ok(plan) => return Ok((inflight, plan)),
                Err(crate::meta::MetaError::BitWithoutChunk { .. }) if tries < 8 => tries += 1,
                Err(err) => return Err(self.meta_err()(err)),
            }
        }
    }

    /// Writes (or zeroes) one planned piece.
    async fn write_piece<E: IoEngine>(&self, e: &E, req_off: u64, p: &Piece, data: Data<'_>) -> Result<(), ImageError> {
        match p.src {
            Source::Image(so) => self.put(e, so, p.len, data).await,
            Source::Copy(_) => self.copy_in(e, req_off + p.buf_off as u64, p.len, data).await,
            Source::Base(_) | Source::Zero => Ok(()),
        }
    }

    /// Writes `data` (or zeros) at storage offset `so`.
    async fn put<E: IoEngine>(&self, e: &E, so: u64, len: usize, data: Data<'_>) -> Result<(), ImageError> {
        let s = self.storage.as_ref();
        match data {
            Data::Mem(d) => io::write_at(e, s, d, so).await.map_err(self.data_err("write", so)),
            Data::Fixed(f) => match s.raw_fd() {
                Some(fd) => io::write_fixed(e, fd, f, len, so).await.map_err(self.data_err("write", so)),
                None => Err(ImageError::Invalid {
                    path: self.name(),
                    why: "zero-copy write to storage without a descriptor".into(),
                }),
            },
            Data::Zeros => io::punch(e, s, so, len as u64).await.map_err(self.data_err("punch", so)),
        }
    }

    /// Holds blocks `first..first+count`, in order. A holder may run on
    /// another queue's thread, so the waits wake this thread's ring.
    pub(super) async fn lock_blocks(&self, first: BlockIdx, count: u64) -> Vec<crate::meta::locks::BlockGuard<'_>> {
        let mut g = Vec::with_capacity(count as usize);
        for b in first.0..first.0 + count {
            g.push(io::wake::CrossThread::new(self.meta.locks.lock(BlockIdx(b))).await);
        }
        g
    }

    /// Copy-on-write of the blocks under `[goff, goff+len)`, which are still in
    /// the base: either whole blocks (written as they are), or part of one
    /// block (the rest of the block is read from the base and written with it).
    /// The bits are set only after the block's data write has completed.
    async fn copy_in<E: IoEngine>(&self, e: &E, goff: u64, len: usize, data: Data<'_>) -> Result<(), ImageError> {
        let geo = &self.meta.geo;
        let bs = geo.block_size as u64;
        let first = goff / bs;
        let last = (goff + len as u64 - 1) / bs;
        let guards = self.lock_blocks(BlockIdx(first), last - first + 1).await;
        let so = |g: u64| {
            self.meta.storage_offset(Bytes(g)).ok_or_else(|| ImageError::Invalid {
                path: self.name(),
                why: format!("chunk of guest offset {g:#x} vanished during copy-on-write"),
            })
        };
        let whole = goff % bs == 0 && len as u64 % bs == 0;
        if whole {
            self.put(e, so(goff)?, len, data).await?;
        } else if self.meta.block_in_image(BlockIdx(first)) {
            // Copied by another request while we waited for the lock.
            return self.put(e, so(goff)?, len, data).await;
        } else {
            let start = first * bs;
            let mut blk = io::AlignedBuf::zeroed(bs as usize);
            let head = (goff - start) as usize;
            let tail = head + len;
            {
                let (h, rest) = blk.split_at_mut(head);
                let (_, t) = rest.split_at_mut(len);
                let (rh, rt) = futures::join!(
                    self.read_base_clipped(e, h, start),
                    self.read_base_clipped(e, t, start + tail as u64)
                );
                rh?;
                rt?;
            }
            match data {
                Data::Mem(d) => blk[head..tail].copy_from_slice(d),
                Data::Zeros => {}
                // write_data sends such writes down the copy path.
                Data::Fixed(_) => {
                    return Err(ImageError::Invalid {
                        path: self.name(),
                        why: "zero-copy write merging with the base".into(),
                    })
                }
            }
            let target = so(start)?;
            io::write_at(e, self.storage.as_ref(), &blk, target)
                .await
                .map_err(self.data_err("copy-on-write", target))?;
        }
        let n = last - first + 1;
        self.meta.set_blocks_written(BlockIdx(first), n);
        self.stats.cow_blocks.fetch_add(n, Ordering::Relaxed);
        drop(guards);
        Ok(())
    }

    /// Reads from the base; bytes past the base's size read as zeros.
    async fn read_base_clipped<E: IoEngine>(&self, e: &E, buf: &mut [u8], off: u64) -> Result<(), ImageError> {
        let base_size = self.meta.geo.base_size.0;
        let n = (base_size.saturating_sub(off) as usize).min(buf.len());
        buf[n..].fill(0);
        match (&self.base, n) {
            (Some(b), n) if n > 0 => b.read(e, &mut buf[..n], off).await,
            _ => Ok(()),
        }
    }

    /// Makes sure every chunk under `[off, off+len)` is allocated, asking the
    /// storage to grow first when needed. When no chunk is free, commits (so
    /// chunks freed by discards come back) and tries again, a few times.
    pub(crate) async fn allocate_range<E: IoEngine>(&self, e: &E, off: u64, len: u64) -> Result<(), ImageError> {
        let mut tries = 0;
        loop {
            match self.try_allocate_range(off, len) {
                Err(ImageError::NoFreeChunk { .. } | ImageError::Storage(StorageError::NoSpace { .. }))
                    if tries < FREED_RETRIES
                        && (tries == 0
                            || self.meta.persist.has_freed()
                            || self.freeing.load(Ordering::Acquire) > 0
                            || self.committing.load(Ordering::Acquire)) =>
                {
                    // Every chunk is in use (or the storage can't grow), but
                    // some may be freed by a discard whose record is not yet
                    // durable, or taken by a commit under way that releases
                    // them when done, or wait for a request still in flight
                    // in their old guest chunk. A flush waits out the commit
                    // under way and commits the rest; then wait a moment for
                    // requests in flight.
                    if tries > 0 {
                        let ms = (1u64 << (tries - 1).min(5)).min(FREED_PAUSE_MAX_MS);
                        io::sleep(e, std::time::Duration::from_millis(ms)).await;
                    }
                    self.flush(e).await?;
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    pub(super) fn try_allocate_range(&self, off: u64, len: u64) -> Result<(), ImageError> {
        let geo = &self.meta.geo;
        let s = self.storage.as_ref();
        if !geo.has_table() {
            return Ok(s.ensure_size(geo.data_offset + off + len)?);
        }
        let cb = geo.chunk_bytes();
        for c in off / cb..(off + len).div_ceil(cb) {
            let c = ChunkIdx(c);
            if self.meta.table.get(c).is_some() {
                continue;
            }
            let grow = |hwm: u32| s.ensure_size(geo.data_offset + hwm as u64 * cb);
            let Some(p) = self.meta.alloc.allocate(geo.chunks(), grow)? else {
                return Err(ImageError::NoFreeChunk { path: self.name() });
            };
            match self.meta.persist.install(&self.meta.table, c, p) {
                Ok(()) => {
                    self.stats.chunks_allocated.fetch_add(1, Ordering::Relaxed);
                }
                // Another request allocated this chunk first.
                Err(_) => self.meta.alloc.release([p]),
            }
        }
        Ok(())
    }

    /// Discards `[off, off+len)`: it reads as zeros afterwards, also over a
    /// base. Whole chunks beyond the base are freed; the rest is punched.
    pub async fn discard<E: IoEngine>(&self, e: &E, off: u64, len: u64) -> Result<(), ImageError> {
        self.check_write(e, off, len).await?;
        let geo = &self.meta.geo;
        let base_end = geo.base_blocks() * geo.block_size as u64;
        let cb = geo.chunk_bytes();
        let mut frees = Vec::new();
        let mut spans = Vec::new();
        for (c, s, end) in self.meta.chunk_spans(Bytes(off), len) {
            let whole = s == c.0 * cb && end - s == cb;
            if geo.has_table() && whole && s >= base_end {
                frees.push(self.free_chunk(e, c));
            } else {
                spans.push(self.zero_span(e, s, end));
            }
        }
        let (a, b) = futures::join!(join_all(frees), join_all(spans));
        let r = first_error(a).and_then(|_| first_error(b));
        if r.is_ok() {
            self.meta.record_written(Bytes(off), len);
        }
        self.sync_volatile()?;
        self.note_completed();
        r?;
        // Writethrough: a completed discard is as durable as a completed
        // write (its unmap and bitmap records too).
        if self.opts.writethrough {
            self.flush(e).await?;
        }
        Ok(())
    }

    /// Write-zeroes: the same effect as a discard (zeros read back).
    pub async fn write_zeroes<E: IoEngine>(&self, e: &E, off: u64, len: u64) -> Result<(), ImageError> {
        self.discard(e, off, len).await
    }

    async fn free_chunk<E: IoEngine>(&self, e: &E, c: ChunkIdx) -> Result<(), ImageError> {
        // In flight like any request: a second discard of `c` punching the
        // same chunk must not find it reused by another guest chunk.
        let _inflight = self.meta.inflight.enter(c, ChunkIdx(c.0 + 1));
        let Some(p) = self.meta.table.get(c) else {
            return Ok(());
        };
        // Until the unmap below, `p` is neither mapped for long nor freed: an
        // allocation that finds no free chunk meanwhile must wait for it.
        let _freeing = Freeing::enter(&self.freeing);
        let off = self.meta.chunk_offset(p);
        io::punch(e, self.storage.as_ref(), off, self.meta.geo.chunk_bytes())
            .await
            .map_err(self.data_err("punch chunk", off))?;
        self.meta.persist.unmap(&self.meta.table, c, p);
        Ok(())
    }

    /// Zeroes a span inside one chunk.
    async fn zero_span<E: IoEngine>(&self, e: &E, s: u64, end: u64) -> Result<(), ImageError> {
        let geo = &self.meta.geo;
        let touches_base = s < geo.base_blocks() * geo.block_size as u64;
        if geo.has_table() && self.meta.table.get(geo.chunk_of(Bytes(s))).is_none() {
            if !touches_base {
                return Ok(()); // unallocated beyond the base: already zeros
            }
            self.allocate_range(e, s, end - s).await?;
        } else if !geo.has_table() {
            self.allocate_range(e, s, end - s).await?;
        }
        let _inflight = self.meta.enter(Bytes(s), end - s);
        let plan = self.meta.plan_write(Bytes(s), end - s).map_err(self.meta_err())?;
        first_error(join_all(plan.iter().map(|p| self.write_piece(e, s, p, Data::Zeros))).await)
    }
}

/// A discard between its punch and its unmap (see `Image::freeing`).
struct Freeing<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Freeing<'a> {
    fn enter(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Freeing(n)
    }
}

impl Drop for Freeing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
