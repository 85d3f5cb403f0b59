//! One block request: decoded from the ublk I/O descriptor, carried out on the
//! image, answered with a byte count or a negative errno.

use super::zc::ZcQueue;
use crate::image::{Image, ImageError};
use crate::io::IoEngine;
use libublk::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write { fua: bool },
    Flush,
    Discard,
    WriteZeroes,
}

/// A decoded request; offsets and lengths in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub off: u64,
    pub len: u64,
}

/// Decodes an I/O descriptor. Sectors are always 512 bytes in ublk,
/// whatever the device's logical block size. Err is the negative errno to
/// answer with.
pub fn decode(iod: &sys::ublksrv_io_desc) -> Result<Request, i32> {
    let op = match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ => Op::Read,
        sys::UBLK_IO_OP_WRITE => Op::Write { fua: iod.op_flags & sys::UBLK_IO_F_FUA != 0 },
        sys::UBLK_IO_OP_FLUSH => Op::Flush,
        sys::UBLK_IO_OP_DISCARD => Op::Discard,
        sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
        _ => return Err(-libc::EOPNOTSUPP),
    };
    if op == Op::Flush {
        // A flush has no range: the block layer puts its sector at -1.
        return Ok(Request { op, off: 0, len: 0 });
    }
    let off = iod.start_sector.checked_mul(512).ok_or(-libc::EINVAL)?;
    let len = u64::from(iod.nr_sectors) << 9;
    off.checked_add(len).ok_or(-libc::EINVAL)?;
    Ok(Request { op, off, len })
}

/// How writes complete.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Complete a write that changed metadata (allocated a chunk, copied a
    /// block from the base, freed a chunk) before that metadata is journaled.
    /// Faster first writes, but a daemon crash then loses such writes even
    /// though they completed, so `fvd recover` cannot hide the crash.
    pub lazy_metadata: bool,
}

impl Policy {
    /// The policy for requests on `img`: with a volatile log, a new daemon
    /// finds every metadata update a dead one made, so nothing need be
    /// journaled before a write completes.
    pub fn for_image(self, img: &Image) -> Policy {
        Policy { lazy_metadata: self.lazy_metadata || img.has_volatile_log() }
    }
}

/// Carries out `req` with `buf` as the data buffer (at least `req.len` bytes
/// for reads and writes). Returns what the block layer is told: bytes
/// transferred (reads, writes), 0 (other operations) or a negative errno.
pub async fn execute<E: IoEngine>(img: &Image, e: &E, req: Request, buf: &mut [u8], pol: Policy) -> i32 {
    execute_on(img, e, req, buf, pol, None).await
}

/// A request whose data sits in the buffer the kernel registered for its tag
/// (zero copy), and its queue's helpers.
#[derive(Clone, Copy)]
pub struct Zc<'a> {
    pub q: &'a ZcQueue,
    pub tag: u16,
}

/// As [`execute`]; with `zc`, reads and writes move the data straight
/// between the request's registered buffer and the image's storage, and
/// those that need the bytes in the daemon copy them through `buf`.
pub async fn execute_on<E: IoEngine>(
    img: &Image,
    e: &E,
    req: Request,
    buf: &mut [u8],
    pol: Policy,
    zc: Option<Zc<'_>>,
) -> i32 {
    let len = req.len as usize;
    if matches!(req.op, Op::Read | Op::Write { .. }) && (len > buf.len() || len > i32::MAX as usize) {
        tracing::warn!(op = ?req.op, len, buf = buf.len(), "request larger than its buffer");
        return -libc::EINVAL;
    }
    let r = match (req.op, zc) {
        (Op::Read, Some(z)) => read_zc(img, e, req, &mut buf[..len], z).await,
        (Op::Write { fua }, Some(z)) => write_zc(img, e, req, &mut buf[..len], fua, z).await,
        (Op::Read, None) => img.read(e, req.off, &mut buf[..len]).await,
        (Op::Write { fua }, None) => img.write(e, req.off, &buf[..len], fua).await,
        (op, _) => execute_other(img, e, op, req).await,
    };
    let r = match r {
        Ok(()) if changes_data(req.op) && !pol.lazy_metadata => settle(img, e).await,
        other => other,
    };
    match r {
        Ok(()) if matches!(req.op, Op::Read | Op::Write { .. }) => len as i32,
        Ok(()) => 0,
        Err(err) => {
            tracing::warn!(op = ?req.op, off = req.off, len = req.len, error = %err, "request failed");
            -err.errno()
        }
    }
}

/// An error of a fixed-buffer operation that the copy path may not hit: the
/// storage refused the request's pages (O_DIRECT alignment), or the buffer.
fn copy_may_work(err: &ImageError) -> bool {
    matches!(err, ImageError::Io { source, .. } if matches!(source.raw_os_error(), Some(libc::EINVAL | libc::EFAULT | libc::EOPNOTSUPP)))
}

fn bounce_err(img: &Image, off: u64) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: img.name(), what: "zero-copy bounce", offset: off, source }
}

async fn read_zc<E: IoEngine>(img: &Image, e: &E, req: Request, buf: &mut [u8], z: Zc<'_>) -> Result<(), ImageError> {
    match img.read_fixed(e, req.off, req.len, ZcQueue::buf(z.tag), z.q.zero_fd()).await {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(err) if copy_may_work(&err) => tracing::debug!(error = %err, "zero-copy read refused: copy path"),
        Err(err) => return Err(err),
    }
    img.read(e, req.off, buf).await?;
    z.q.deliver(e, z.tag, buf).await.map_err(bounce_err(img, req.off))
}

async fn write_zc<E: IoEngine>(
    img: &Image,
    e: &E,
    req: Request,
    buf: &mut [u8],
    fua: bool,
    z: Zc<'_>,
) -> Result<(), ImageError> {
    match img.write_fixed(e, req.off, req.len, ZcQueue::buf(z.tag), fua).await {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        // Writing the same bytes again at the same place is harmless.
        Err(err) if copy_may_work(&err) => tracing::debug!(error = %err, "zero-copy write refused: copy path"),
        Err(err) => return Err(err),
    }
    z.q.fetch(e, z.tag, buf).await.map_err(bounce_err(img, req.off))?;
    img.write(e, req.off, buf, fua).await
}

async fn execute_other<E: IoEngine>(img: &Image, e: &E, op: Op, req: Request) -> Result<(), ImageError> {
    match op {
        Op::Flush => img.flush(e).await,
        Op::Discard => img.discard(e, req.off, req.len).await,
        Op::WriteZeroes => img.write_zeroes(e, req.off, req.len).await,
        Op::Read | Op::Write { .. } => unreachable!("reads and writes are matched by the caller"),
    }
}

fn changes_data(op: Op) -> bool {
    matches!(op, Op::Write { .. } | Op::Discard | Op::WriteZeroes)
}

/// Journals pending metadata before the request completes, so a daemon that
/// dies after completing it loses nothing a new daemon can't replay. Writes
/// into already allocated space leave nothing pending and skip this.
async fn settle<E: IoEngine>(img: &Image, e: &E) -> Result<(), crate::image::ImageError> {
    img.journal_completed(e).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{create, CreateOptions, OpenOptions};
    use crate::io::uring::Uring;

    fn iod(op: u32, flags: u32, sector: u64, nr: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc { op_flags: op | flags, nr_sectors: nr, start_sector: sector, addr: 0 }
    }

    #[test]
    fn decodes_ops_and_flags() {
        let r = decode(&iod(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 8, 16)).unwrap();
        assert_eq!(r, Request { op: Op::Write { fua: true }, off: 4096, len: 8192 });
        let r = decode(&iod(sys::UBLK_IO_OP_WRITE, 0, 0, 1)).unwrap();
        assert_eq!(r.op, Op::Write { fua: false });
        let flush = Request { op: Op::Flush, off: 0, len: 0 };
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_FLUSH, 0, u64::MAX, 0)), Ok(flush));
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_DISCARD, 0, 2, 4)).unwrap().len, 2048);
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 0, 8)).unwrap().op, Op::WriteZeroes);
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_ZONE_OPEN, 0, 0, 8)), Err(-libc::EOPNOTSUPP));
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_READ, 0, u64::MAX, 8)), Err(-libc::EINVAL));
    }

    fn image(dir: &std::path::Path) -> Image {
        let p = dir.join("t.fvd");
        let opts = CreateOptions {
            size: Some(8 << 20),
            base: None,
            block_size: 64 << 10,
            chunk_size: Some(1 << 20),
            journal_size: 1 << 20,
            ..Default::default()
        };
        create(&p, &opts).unwrap();
        Image::open(&p, &OpenOptions::default()).unwrap()
    }

    /// Writes, reads, discards and flushes through `execute`, on a host ring
    /// (the same code a queue runs on its ublk ring).
    #[test]
    fn executes_against_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let ring = Uring::new(64).unwrap();
        let pol = Policy::default();
        let run = |req: Request, buf: &mut [u8]| ring.block_on(execute(&img, &ring, req, buf, pol)).unwrap();

        let mut data = vec![0xabu8; 8192];
        let w = Request { op: Op::Write { fua: false }, off: 1 << 20, len: 8192 };
        assert_eq!(run(w, &mut data), 8192);
        // Allocation metadata was journaled before the write completed.
        assert_eq!(img.meta().persist.pending(), 0);

        let mut back = vec![0u8; 8192];
        assert_eq!(run(Request { op: Op::Read, off: 1 << 20, len: 8192 }, &mut back), 8192);
        assert_eq!(back, data);

        assert_eq!(run(Request { op: Op::Flush, off: 0, len: 0 }, &mut []), 0);
        assert_eq!(run(Request { op: Op::Discard, off: 1 << 20, len: 4096 }, &mut []), 0);
        assert_eq!(run(Request { op: Op::Read, off: 1 << 20, len: 8192 }, &mut back), 8192);
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..].iter().all(|&b| b == 0xab));

        // Past the end, and a buffer too small for the request.
        assert_eq!(run(Request { op: Op::Read, off: 8 << 20, len: 512 }, &mut back), -libc::EINVAL);
        assert_eq!(run(Request { op: Op::Read, off: 0, len: 16384 }, &mut back), -libc::EINVAL);
        img.close().unwrap();
    }

    /// The zero-copy path on a host ring, with a buffer of ours registered
    /// where a ublk queue has the kernel's (a user buffer's fixed-buffer
    /// address is its own address, a kernel buffer's an offset from 0).
    #[test]
    fn fixed_buffer_reads_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x5au8; 4 << 20]).unwrap();
        let p = dir.path().join("t.fvd");
        let opts = CreateOptions {
            size: Some(8 << 20),
            base: Some(base),
            block_size: 64 << 10,
            chunk_size: Some(1 << 20),
            journal_size: 1 << 20,
            ..Default::default()
        };
        create(&p, &opts).unwrap();
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        let ring = Uring::new(64).unwrap();
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let zfd = std::os::fd::AsRawFd::as_raw_fd(&zero);
        let mut reg = crate::io::AlignedBuf::zeroed(256 << 10);
        // SAFETY: `reg` outlives `ring` (declared before it is dropped below),
        // and is only read between the awaited operations.
        unsafe { ring.register_buffer(&mut reg) }.unwrap();
        let fb = crate::io::FixedBuf { index: 0, off: reg.as_ptr() as usize };
        macro_rules! run {
            ($f:expr) => {
                ring.block_on($f).unwrap()
            };
        }

        // Past the base (4 MiB): plain fixed writes and reads.
        reg[..128 << 10].fill(0xc3);
        assert!(run!(img.write_fixed(&ring, 6 << 20, 128 << 10, fb, false)).unwrap());
        reg.fill(0);
        assert!(run!(img.read_fixed(&ring, 6 << 20, 192 << 10, fb, zfd)).unwrap());
        assert!(reg[..128 << 10].iter().all(|&b| b == 0xc3));
        assert!(reg[128 << 10..192 << 10].iter().all(|&b| b == 0), "unallocated: zeros from /dev/zero");
        // Over the base: whole blocks are written fixed, part of a block is not
        // (copy-on-write merge), and a read through the base is not.
        reg[..64 << 10].fill(0x11);
        assert!(run!(img.write_fixed(&ring, 1 << 20, 64 << 10, fb, false)).unwrap());
        assert!(!run!(img.write_fixed(&ring, 2 << 20, 4096, fb, false)).unwrap());
        assert!(!run!(img.read_fixed(&ring, 0, 4096, fb, zfd)).unwrap());
        let mut back = vec![0u8; 128 << 10];
        run!(img.read(&ring, 1 << 20, &mut back)).unwrap();
        assert!(back[..64 << 10].iter().all(|&b| b == 0x11));
        assert!(back[64 << 10..].iter().all(|&b| b == 0x5a));
        drop(ring);
        img.close().unwrap();
    }

    #[test]
    fn read_only_image_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        image(dir.path()).close().unwrap();
        let img =
            Image::open(&dir.path().join("t.fvd"), &OpenOptions { read_only: true, ..Default::default() }).unwrap();
        let ring = Uring::new(8).unwrap();
        let mut buf = vec![1u8; 512];
        let req = Request { op: Op::Write { fua: false }, off: 0, len: 512 };
        let r = ring.block_on(execute(&img, &ring, req, &mut buf, Policy::default())).unwrap();
        assert_eq!(r, -libc::EROFS);
    }
}
