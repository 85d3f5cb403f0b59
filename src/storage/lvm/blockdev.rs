//! Block device facts and operations: size, identity in sysfs, discard and
//! zeroing by ioctl.

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blk_zeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// The device's size now, from the kernel (BLKGETSIZE64): after `lvextend`
/// reloads the device-mapper table, the open descriptor sees the new size.
pub fn size(fd: RawFd) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at
    // a live local; the caller keeps the descriptor open for the call.
    unsafe { blk_getsize64(fd, &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// BLKDISCARD: tells the device the range is unused. What it then reads
/// depends on the device (a thin LV: zeros for whole pool blocks).
pub fn discard(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let range = [off, len];
    // SAFETY: BLKDISCARD reads two u64 from the pointer, a live local.
    unsafe { blk_discard(fd, &range) }.map(|_| ()).map_err(io::Error::from)
}

/// BLKZEROOUT: the range reads as zeros afterwards; the kernel offloads it
/// (write-zeroes) when the device can, and writes zero pages otherwise.
pub fn zero_out(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let range = [off, len];
    // SAFETY: BLKZEROOUT reads two u64 from the pointer, a live local.
    unsafe { blk_zeroout(fd, &range) }.map(|_| ()).map_err(io::Error::from)
}

/// fallocate(PUNCH_HOLE|KEEP_SIZE) on a block device: write-zeroes that may
/// unmap, never falling back to writing zeros (EOPNOTSUPP instead).
pub fn punch_hole(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    crate::storage::file::punch_fd(fd, off, len)
}

/// The sysfs folder of the block device behind `fd`, `/sys/dev/block/MAJ:MIN`.
pub fn sysfs_dir(fd: RawFd) -> io::Result<PathBuf> {
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFBLK {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a block device"));
    }
    let (maj, min) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
    Ok(PathBuf::from(format!("/sys/dev/block/{maj}:{min}")))
}

fn read_sys(dir: &std::path::Path, rel: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(rel)).ok().map(|s| s.trim().to_string())
}

/// When the device is a device-mapper device made by lvm2: its dm name.
/// (lvm2's dm UUIDs are `LVM-` + VG UUID + LV UUID, 68 characters for a
/// top-level LV; internal layers carry a suffix.)
pub fn lvm_dm_name(fd: RawFd) -> Option<String> {
    let dir = sysfs_dir(fd).ok()?;
    let uuid = read_sys(&dir, "dm/uuid")?;
    if !uuid.starts_with("LVM-") || uuid.len() != 68 {
        return None;
    }
    read_sys(&dir, "dm/name")
}

/// Whether the device is a thin LV: lvm2 stacks a thin LV on its pool's
/// `VG-POOL-tpool` device, which shows among its sysfs slaves.
pub fn is_lvm_thin(fd: RawFd) -> bool {
    let Ok(dir) = sysfs_dir(fd) else {
        return false;
    };
    let Ok(rd) = std::fs::read_dir(dir.join("slaves")) else {
        return false;
    };
    rd.flatten().any(|e| read_sys(&e.path(), "dm/name").is_some_and(|n| n.ends_with("-tpool")))
}

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

/// `has_data` for a block device, which has no holes to ask about: a range
/// counts as data when it holds a non-zero byte (punched ranges read as
/// zeros). Ranges above 8 MiB are not read and count as data.
pub fn has_nonzero(s: &dyn crate::storage::Storage, off: u64, len: u64) -> bool {
    if len > 8 << 20 {
        return true;
    }
    let mut buf = vec![0u8; len as usize];
    match s.read_at(&mut buf, off) {
        Ok(()) => buf.iter().any(|&b| b != 0),
        Err(_) => true,
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
    fn files_are_not_lvs() {
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsRawFd;
        assert!(sysfs_dir(f.as_raw_fd()).is_err());
        assert_eq!(lvm_dm_name(f.as_raw_fd()), None);
        assert!(size(f.as_raw_fd()).is_err());
    }
}
