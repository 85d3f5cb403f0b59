//! Block device primitives shared by every storage kind: size (BLKGETSIZE64),
//! discard and zero-out by ioctl, hole punching, identity in sysfs
//! ([`sysfs`]: lvm2's LVs, thin detection) and how a range is made to read as
//! zeros ([`zero`]). The lowest storage module: it uses no other but the
//! [`Storage`] trait.

pub mod sysfs;
pub mod zero;

pub use sysfs::{is_lvm_thin, lvm_dm_name, stable_path, sysfs_dir};
pub use zero::{aligned_inside, ZeroMethod};

use super::Storage;
use std::io;
use std::os::fd::RawFd;

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

/// fallocate(PUNCH_HOLE|KEEP_SIZE): the range then reads as zeros and the size
/// stays. On a file it makes a hole; on a block device it is a write-zeroes
/// that may unmap, never falling back to writing zeros (EOPNOTSUPP instead).
pub fn punch_hole(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor the caller owns; no memory is passed.
    let r = unsafe { libc::fallocate(fd, mode, off as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `has_data` for a block device, which has no holes to ask about: a range
/// counts as data when it holds a non-zero byte (punched ranges read as
/// zeros). Ranges above 8 MiB are not read and count as data.
pub fn has_nonzero(s: &dyn Storage, off: u64, len: u64) -> bool {
    if len > 8 << 20 {
        return true;
    }
    let mut buf = vec![0u8; len as usize];
    match s.read_at(&mut buf, off) {
        Ok(()) => buf.iter().any(|&b| b != 0),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_dm_node_is_named_by_its_dm_name() {
        let root = tempfile::tempdir().unwrap();
        let (sys, dev) = (root.path().join("sys"), root.path().join("dev"));
        std::fs::create_dir_all(sys.join("block/dm-5/dm")).unwrap();
        std::fs::write(sys.join("block/dm-5/dm/name"), "vg-thin\n").unwrap();
        let stable = |p: &str| sysfs::stable_path_in(&dev.join(p), &sys, &dev);
        assert_eq!(stable("dm-5"), dev.join("mapper/vg-thin"));
        // No dm name to be had, or not a dm node: the path as it is.
        assert_eq!(stable("dm-6"), dev.join("dm-6"));
        assert_eq!(stable("loop0"), dev.join("loop0"));
        assert_eq!(stable("dm-"), dev.join("dm-"));
        assert_eq!(stable("dm-5x"), dev.join("dm-5x"));
        let file = root.path().join("img.fvd");
        assert_eq!(sysfs::stable_path_in(&file, &sys, &dev), file);
    }

    #[test]
    fn files_are_not_block_devices() {
        let f = tempfile::tempfile().unwrap();
        assert!(size(f.as_raw_fd()).is_err());
    }

    #[test]
    fn punch_hole_in_a_file_reads_as_zeros() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        punch_hole(f.as_raw_fd(), 0, 4096).unwrap();
        let mut b = [1u8; 8192];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 7));
        assert_eq!(f.metadata().unwrap().len(), 8192);
    }
}
