//! A block device's identity in sysfs: its folder, whether lvm2 made it, and
//! whether it is a thin LV.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// The sysfs folder of the block device behind `fd`, `/sys/dev/block/MAJ:MIN`.
pub fn sysfs_dir(fd: RawFd) -> io::Result<PathBuf> {
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFBLK {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a block device"));
    }
    let (maj, min) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
    Ok(PathBuf::from(format!("/sys/dev/block/{maj}:{min}")))
}

/// A name for the device at canonical path `canon` that stays the same when the
/// device is made again: `/dev/dm-N` (whose N the kernel hands out in the order
/// devices are made, so another boot or activation gives it to another device)
/// becomes `/dev/mapper/NAME`, NAME being the device-mapper name (for an LV,
/// lvm2's `VG-LV`). Any other path is returned as it is. `sys` and `dev` are
/// the roots of sysfs and /dev (`/sys`, `/dev`; other roots in tests).
pub fn stable_path_in(canon: &Path, sys: &Path, dev: &Path) -> PathBuf {
    let dm = canon
        .strip_prefix(dev)
        .ok()
        .and_then(|rest| rest.to_str())
        .filter(|n| n.strip_prefix("dm-").is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())));
    let Some(dm) = dm else { return canon.to_path_buf() };
    match read_sys(&sys.join("block").join(dm), "dm/name") {
        Some(name) if !name.is_empty() && !name.contains('/') => dev.join("mapper").join(name),
        _ => canon.to_path_buf(),
    }
}

/// [`stable_path_in`] with the system's /sys and /dev.
pub fn stable_path(canon: &Path) -> PathBuf {
    stable_path_in(canon, Path::new("/sys"), Path::new("/dev"))
}

/// A sysfs attribute below `dir`, trimmed.
pub fn read_sys(dir: &Path, rel: &str) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn files_are_not_lvs() {
        let f = tempfile::tempfile().unwrap();
        assert!(sysfs_dir(f.as_raw_fd()).is_err());
        assert_eq!(lvm_dm_name(f.as_raw_fd()), None);
        assert!(!is_lvm_thin(f.as_raw_fd()));
    }
}
