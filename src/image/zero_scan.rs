//! Zero detection at create time: base blocks that are holes or all zeros
//! get their bit preset, so they read as zeros from the image and neither
//! reads nor writes ever touch the base or the bitmap for them.

use super::{Image, ImageError, MapKind, OpenOptions};
use crate::format::{BaseFormat, BitmapBits, Geometry};
use crate::io::uring::Uring;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Ranges of a raw file that may hold data (everything between holes).
fn data_extents(f: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past pos
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size as i64 } else { hole };
        out.push((data as u64, (end.min(size as i64) - data) as u64));
        pos = end;
    }
    if out.is_empty() && size > 0 {
        // SEEK_DATA unsupported or a block device: scan it all.
        // SAFETY: as above.
        if unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) } < 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO)
        {
            out.push((0, size));
        }
    }
    out
}

/// Reads `[start, start+len)` through `read` and marks all-zero blocks;
/// blocks outside every scanned range are holes and marked as well.
fn scan(
    geo: &Geometry,
    extents: &[(u64, u64)],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), ImageError>,
) -> Result<(BitmapBits, u64), ImageError> {
    let bs = geo.block_size as u64;
    let blocks = geo.base_blocks();
    let base_size = geo.base_size.0;
    // Start from "everything is a hole", then clear what has data.
    let mut zeros = BitmapBits::repeat(true, blocks as usize);
    let mut buf = vec![0u8; (1 << 20).max(bs as usize)];
    for &(start, len) in extents {
        let first = start / bs;
        let end = (start + len).div_ceil(bs).min(blocks);
        let mut b = first;
        while b < end {
            let n = ((buf.len() as u64 / bs).min(end - b)) as usize;
            let off = b * bs;
            let want = ((n as u64 * bs).min(base_size - off)) as usize;
            buf[want..].fill(0);
            read(off, &mut buf[..want])?;
            for i in 0..n {
                let blk = &buf[i * bs as usize..(i + 1) * bs as usize];
                if blk.iter().any(|&x| x != 0) {
                    zeros.set((b + i as u64) as usize, false);
                }
            }
            b += n as u64;
        }
    }
    let zero = zeros.count_ones() as u64;
    Ok((zeros, zero))
}

/// A bitmap with the zero blocks of the base set, and their count.
pub fn zero_blocks(base: &Path, fmt: BaseFormat, geo: &Geometry) -> Result<(BitmapBits, u64), ImageError> {
    let name = base.display().to_string();
    let ioerr = |off: u64| {
        let name = name.clone();
        move |source| ImageError::Io { path: name, what: "zero scan", offset: off, source }
    };
    match fmt {
        BaseFormat::None => Ok((BitmapBits::new(), 0)),
        BaseFormat::Raw => {
            let f = File::open(base).map_err(ioerr(0))?;
            let extents = data_extents(&f, geo.base_size.0);
            scan(geo, &extents, |off, buf| f.read_exact_at(buf, off).map_err(ioerr(off)))
        }
        BaseFormat::Fvd => {
            let img = Image::open(base, &OpenOptions { read_only: true, ..Default::default() })?;
            let extents: Vec<(u64, u64)> =
                img.map().iter().filter(|r| r.kind != MapKind::Zero).map(|r| (r.start, r.length)).collect();
            let ring = Uring::new(8).map_err(ioerr(0))?;
            scan(geo, &extents, |off, buf| {
                let n = buf.len().div_ceil(512) * 512;
                if n == buf.len() {
                    ring.block_on(img.read(&ring, off, buf)).map_err(ioerr(off))?
                } else {
                    let mut tmp = vec![0u8; n];
                    ring.block_on(img.read(&ring, off, &mut tmp)).map_err(ioerr(off))??;
                    buf.copy_from_slice(&tmp[..buf.len()]);
                    Ok(())
                }
            })
        }
    }
}
