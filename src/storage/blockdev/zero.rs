//! How a range of a block device is made to read as zeros: write-zeroes with
//! unmap, discard of whole thin-pool blocks, or zero-out.

use super::sysfs::{read_sys, sysfs_dir};
use super::{discard, punch_hole, zero_out};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// How a range of the device is made to read as zeros.
#[derive(Debug)]
pub struct ZeroMethod {
    /// fallocate(PUNCH_HOLE) is worth trying (the queue offers write-zeroes);
    /// cleared after it answers EOPNOTSUPP.
    punch_hole: AtomicBool,
    /// A thin LV with discards on: ranges of whole pool blocks read as zeros
    /// once discarded (the pool unmaps them, and gets the space back).
    thin_block: Option<u64>,
}

impl ZeroMethod {
    pub fn new(write_zeroes: bool, thin_block: Option<u64>) -> ZeroMethod {
        ZeroMethod { punch_hole: AtomicBool::new(write_zeroes), thin_block: thin_block.filter(|&g| g >= 512) }
    }

    /// From the device's queue limits; `thin` when it is a thin LV.
    pub fn probe(fd: RawFd, thin: bool) -> ZeroMethod {
        let dir = sysfs_dir(fd).ok();
        let num =
            |rel: &str| dir.as_ref().and_then(|d| read_sys(d, rel)).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let write_zeroes = num("queue/write_zeroes_max_bytes") > 0;
        let discard = num("queue/discard_max_bytes") > 0;
        let gran = num("queue/discard_granularity");
        ZeroMethod::new(write_zeroes, (thin && discard).then_some(gran))
    }

    pub fn describe(&self) -> String {
        let mut v = Vec::new();
        if self.punch_hole.load(Ordering::Relaxed) {
            v.push("write-zeroes".to_string());
        }
        if let Some(g) = self.thin_block {
            v.push(format!("discard of {g}-byte pool blocks"));
        }
        v.push("zero-out".into());
        v.join(", then ")
    }

    /// Makes `[off, off+len)` read as zeros, giving space back where the
    /// device can: write-zeroes with unmap, else (thin LV) discard of the
    /// whole pool blocks plus zero-out of the partial ones at the edges, else
    /// zero-out.
    pub fn zero(&self, fd: RawFd, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.punch_hole.load(Ordering::Relaxed) {
            match punch_hole(fd, off, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::debug!("write-zeroes with unmap not supported by the device; using the next method");
                    self.punch_hole.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(g) = self.thin_block {
            let (a, b) = aligned_inside(off, len, g);
            if a < b {
                match discard(fd, a, b - a) {
                    Ok(()) => {
                        zero_out(fd, off, a - off)?;
                        return zero_out(fd, b, off + len - b);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        zero_out(fd, off, len)
    }
}

/// The largest `[a, b)` inside `[off, off+len)` whose ends are multiples of `g`
/// (`a >= b` when there is none).
pub fn aligned_inside(off: u64, len: u64, g: u64) -> (u64, u64) {
    let a = off.div_ceil(g) * g;
    let b = (off + len) / g * g;
    (a, b.max(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_inside_a_range() {
        assert_eq!(aligned_inside(0, 1 << 20, 65536), (0, 1 << 20));
        assert_eq!(aligned_inside(4096, 65536, 65536), (65536, 65536));
        assert_eq!(aligned_inside(4096, 3 * 65536, 65536), (65536, 3 * 65536));
        assert_eq!(aligned_inside(65536 + 512, 1024, 65536), (131072, 131072));
    }

    #[test]
    fn describes_the_methods_in_order() {
        assert_eq!(ZeroMethod::new(false, None).describe(), "zero-out");
        assert_eq!(
            ZeroMethod::new(true, Some(65536)).describe(),
            "write-zeroes, then discard of 65536-byte pool blocks, then zero-out"
        );
        assert_eq!(ZeroMethod::new(false, Some(0)).describe(), "zero-out");
    }
}
