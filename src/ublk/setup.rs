//! Adding the ublk device (`fvd start`), or taking back one whose daemon
//! died (`fvd recover`).

use super::error::{ublk, ublk_errno};
use super::options::{Mode, ServeOptions};
use super::{kernel, DaemonError};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::{sys, UblkFlags};

/// Largest request, and each tag's buffer.
pub const IO_BUF_BYTES: u32 = 512 << 10;

/// The device's control handle: added, or taken back for recovery.
pub(super) fn make_ctrl(o: &ServeOptions) -> Result<UblkCtrl, DaemonError> {
    // The kernel gives unprivileged devices no user recovery.
    let mut flags = if o.unprivileged {
        u64::from(sys::UBLK_F_UNPRIVILEGED_DEV)
    } else {
        u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE)
    };
    match o.mode {
        Mode::Add { id } => {
            let features = UblkCtrl::get_features();
            if super::zc::resolve(o.zero_copy, features, o.unprivileged)? {
                flags |= super::zc::FLAGS;
            }
            tracing::info!(
                asked = ?o.zero_copy,
                driver_features = format!("{:#x}", features.unwrap_or(0)),
                zero_copy = flags & super::zc::FLAGS != 0,
                "zero copy"
            );
            // Checked here because libublk, when adding with an ID that is
            // taken, deletes the device that has it while cleaning up.
            if let Some(id) = id.filter(|&i| kernel::device_exists(i)) {
                return Err(DaemonError::IdInUse(id as i32));
            }
            let want = id.map(|i| i as i32).unwrap_or(-1);
            UblkCtrlBuilder::default()
                .name("fvd")
                .id(want)
                .nr_queues(o.queues)
                .depth(o.depth)
                .io_buf_bytes(IO_BUF_BYTES)
                .ctrl_flags(flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(|e| match ublk_errno(&e) {
                    Some(libc::EEXIST) => DaemonError::IdInUse(want),
                    Some(libc::EACCES) | Some(libc::EPERM) => DaemonError::Control(super::error::ublk_why(&e)),
                    _ => ublk("adding the ublk device")(e),
                })
        }
        Mode::Recover { id } => {
            let old = kernel::open_device(id)?;
            let info = old.dev_info();
            // Waits (up to 30 s) for the driver to notice the old daemon's exit.
            match old.start_user_recover() {
                Ok(r) if r >= 0 => {}
                Ok(r) => {
                    let why = std::io::Error::from_raw_os_error(-r).to_string();
                    return Err(DaemonError::NotRecoverable { id, why });
                }
                Err(e) => return Err(DaemonError::NotRecoverable { id, why: super::error::ublk_why(&e) }),
            }
            drop(old);
            UblkCtrlBuilder::default()
                .name("fvd")
                .id(id as i32)
                .nr_queues(info.nr_hw_queues)
                .depth(info.queue_depth)
                .io_buf_bytes(info.max_io_buf_bytes)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(ublk(format!("taking back device {id}")))
        }
    }
}
