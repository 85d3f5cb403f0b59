//! What the kernel says: privileges, the driver, devices and their states,
//! and whether a daemon process still lives.

use super::error::{ublk, ublk_errno};
use super::DaemonError;
use libublk::ctrl::UblkCtrl;
use libublk::sys;
use std::path::Path;

pub const CONTROL: &str = "/dev/ublk-control";

/// CAP_SYS_ADMIN's bit in the capability sets.
const CAP_SYS_ADMIN: u32 = 21;

/// Fails unless the process may add and remove ublk devices as root.
pub fn check_root(cmd: &'static str) -> Result<(), DaemonError> {
    match privilege(cmd)? {
        Privilege::Admin => Ok(()),
        Privilege::Unprivileged => Err(DaemonError::NeedsAdmin(cmd)),
    }
}

/// How this process may use ublk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// Root or CAP_SYS_ADMIN: every device, with user recovery.
    Admin,
    /// Read-write access to /dev/ublk-control without CAP_SYS_ADMIN (the
    /// udev rules give it to a group): the kernel lets such a user add
    /// unprivileged devices (`UBLK_F_UNPRIVILEGED_DEV`) and control the ones
    /// whose /dev/ublkcN it may open, but gives them no user recovery.
    Unprivileged,
}

/// Fails unless the process may add ublk devices one way or the other.
pub fn privilege(cmd: &'static str) -> Result<Privilege, DaemonError> {
    if nix::unistd::geteuid().is_root() || has_sys_admin() {
        return Ok(Privilege::Admin);
    }
    let rw = nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK;
    if Path::new(CONTROL).exists() && nix::unistd::access(CONTROL, rw).is_ok() {
        Ok(Privilege::Unprivileged)
    } else {
        Err(DaemonError::NotRoot(cmd))
    }
}

fn has_sys_admin() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Fails with the modprobe hint when the driver is not loaded.
pub fn check_driver() -> Result<(), DaemonError> {
    if Path::new(CONTROL).exists() {
        Ok(())
    } else {
        Err(DaemonError::NoDriver)
    }
}

/// Whether the kernel has ublk device `id` (live, quiesced or stopped).
pub fn device_exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

/// A device's state as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelState {
    Live,
    /// The daemon died; I/O waits for a new one (`fvd recover`).
    Quiesced,
    FailIo,
    Dead,
    Unknown(u16),
}

impl KernelState {
    fn from_raw(s: u16) -> KernelState {
        match u32::from(s) {
            sys::UBLK_S_DEV_LIVE => KernelState::Live,
            sys::UBLK_S_DEV_QUIESCED => KernelState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => KernelState::FailIo,
            sys::UBLK_S_DEV_DEAD => KernelState::Dead,
            _ => KernelState::Unknown(s),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KernelState::Live => "live",
            KernelState::Quiesced => "quiesced",
            KernelState::FailIo => "fail-io",
            KernelState::Dead => "dead",
            KernelState::Unknown(_) => "unknown",
        }
    }
}

/// A control handle on an existing device.
pub fn open_device(id: u32) -> Result<UblkCtrl, DaemonError> {
    check_driver()?;
    if !device_exists(id) {
        return Err(DaemonError::Gone(id));
    }
    let sid = i32::try_from(id).map_err(|_| DaemonError::BadId(i64::from(id)))?;
    UblkCtrl::new_simple(sid).map_err(|e| match ublk_errno(&e) {
        Some(libc::ENODEV) | Some(libc::ENOENT) => DaemonError::Gone(id),
        Some(libc::EACCES) | Some(libc::EPERM) => DaemonError::Control(super::error::ublk_why(&e)),
        _ => ublk(format!("device {id}"))(e),
    })
}

/// The device's state, or None when it does not exist or can't be asked.
pub fn device_state(id: u32) -> Option<KernelState> {
    if !device_exists(id) || !Path::new(CONTROL).exists() {
        return None;
    }
    let ctrl = open_device(id).ok()?;
    ctrl.read_dev_info().ok()?;
    Some(KernelState::from_raw(ctrl.dev_info().state))
}

/// Deletes a device (its daemon is gone or done).
pub fn delete_device(id: u32) -> Result<(), DaemonError> {
    match open_device(id) {
        Ok(ctrl) => ctrl.del_dev().map(|_| ()).map_err(ublk(format!("deleting device {id}"))),
        Err(DaemonError::Gone(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `pid` is a running fvd process (not a zombie, not a reused pid).
pub fn daemon_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm may hold spaces and parentheses; the state
    // follows the last ')'.
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let state = stat[close + 1..].trim_start().chars().next();
    let comm = stat.find('(').map(|open| &stat[open + 1..close]).unwrap_or("");
    !matches!(state, Some('Z') | Some('X') | None) && comm.starts_with("fvd")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_only_if_named_fvd() {
        let me = std::process::id() as i32;
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(daemon_alive(me), comm.starts_with("fvd"));
        assert!(!daemon_alive(0));
        assert!(!daemon_alive(i32::MAX));
    }

    #[test]
    fn state_names() {
        assert_eq!(KernelState::from_raw(sys::UBLK_S_DEV_QUIESCED as u16), KernelState::Quiesced);
        assert_eq!(KernelState::from_raw(9).name(), "unknown");
    }
}

/// What keeps a block device busy: a mount, or a holder (device-mapper, md).
pub fn device_users(dev: &str) -> Vec<String> {
    let mut users = Vec::new();
    let name = dev.rsplit('/').next().unwrap_or(dev);
    if let Ok(holders) = std::fs::read_dir(format!("/sys/block/{name}/holders")) {
        users.extend(holders.flatten().map(|h| format!("held by {}", h.file_name().to_string_lossy())));
    }
    let canon = std::fs::canonicalize(dev).unwrap_or_else(|_| dev.into());
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for line in mounts.lines() {
            let mut f = line.split_whitespace();
            let (Some(src), Some(at)) = (f.next(), f.next()) else { continue };
            if src.starts_with('/') && std::fs::canonicalize(src).is_ok_and(|p| p == canon) {
                users.push(format!("mounted on {}", unescape_mount(at)));
            }
        }
    }
    users
}

/// /proc/mounts writes spaces and such as octal escapes (\040).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod mount_tests {
    #[test]
    fn unescapes_mount_points() {
        assert_eq!(super::unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(super::unescape_mount("/plain"), "/plain");
        assert!(super::device_users("/dev/nonexistent-fvd-test").is_empty());
    }
}
