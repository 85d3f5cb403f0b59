//! `fvd resize -n ID SIZE`: growing the image a daemon serves, and the device
//! with it, without stopping it.
//!
//! With requests held at the gate (see [`super::gate`]): the image is closed
//! cleanly and handed to the offline resize ([`crate::image::resize::grow`],
//! crash-safe on its own), opened again at its new size and switched in; then
//! the kernel is told the device's new capacity (`UBLK_U_CMD_UPDATE_SIZE`,
//! Linux 6.16 and later) and the requests are released. On a kernel without
//! the command nothing is held or changed and the answer says so.

use super::snapshot::{ms, ring, sys, Snapshotter, DRAIN_LIMIT};
use super::{kernel, DaemonError};
use crate::image::Image;
use libublk::ctrl::UblkCtrl;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What an online resize did (the control socket's answer).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Resized {
    pub image: std::path::PathBuf,
    pub old_size: u64,
    pub new_size: u64,
    /// How the image grew: "header" or "moved-metadata".
    pub kind: String,
    /// Requests were held this long.
    pub held_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error(
        "this kernel's ublk driver cannot change a live device's size (UBLK_F_UPDATE_SIZE, Linux 6.16 and later): \
         stop the device, run 'fvd resize IMAGE SIZE', and start it again"
    )]
    NoKernelSupport,
    #[error("the device is served read-only")]
    ReadOnly,
    #[error("the daemon is stopping")]
    Stopping,
    #[error("the device serves no image; stop it and start it again")]
    NoImage,
    #[error("{new:#x} bytes is not larger than the device's {old:#x}: only growing is supported")]
    NotLarger { old: u64, new: u64 },
    #[error("{0}; nothing changed")]
    Drain(#[from] super::gate::DrainTimeout),
    #[error("{why}; the device goes on with the image as it is now ({size:#x} bytes)")]
    Failed { why: String, size: u64 },
    #[error(
        "{why}; reopening the image failed too ({reopen}): the device now fails requests, stop it and start it again"
    )]
    Broken { why: String, reopen: String },
    #[error("the image grew to {size:#x} bytes, but the kernel refused the device's new size: {why}")]
    Kernel { why: String, size: u64 },
}

/// Whether the loaded ublk driver can change a live device's size.
pub fn kernel_can_resize() -> bool {
    UblkCtrl::get_features().is_some_and(|f| f & u64::from(libublk::sys::UBLK_F_UPDATE_SIZE) != 0)
}

impl Snapshotter {
    /// `fvd resize -n ID SIZE`.
    pub fn resize(&self, new_size: u64) -> Result<Resized, ResizeError> {
        let stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
        if *stopping {
            return Err(ResizeError::Stopping);
        }
        if !kernel_can_resize() {
            return Err(ResizeError::NoKernelSupport);
        }
        let (path, old_size) = {
            let img = self.gate.current().ok_or(ResizeError::NoImage)?;
            if img.read_only() {
                return Err(ResizeError::ReadOnly);
            }
            (img.path().to_path_buf(), img.size())
        };
        if new_size <= old_size {
            return Err(ResizeError::NotLarger { old: old_size, new: new_size });
        }
        let mut closed = self.gate.close(DRAIN_LIMIT)?;
        tracing::info!(image = %path.display(), old_size, new_size, "online resize: requests held");
        let grown = (|| -> Result<crate::image::resize::ResizeOutcome, DaemonError> {
            let old = closed.current().ok_or_else(|| DaemonError::Invalid("no image is served".into()))?;
            let r = ring()?;
            r.block_on(old.close_async(&r)).map_err(sys("closing the image"))??;
            // The last references go (with the image's lock) before the resize opens it.
            drop(closed.switch(None));
            drop(old);
            Ok(crate::image::resize::grow(&path, new_size)?)
        })();
        // Whatever happened, what storage holds is served: the grown image, or
        // the old one (a failed resize leaves it as it was, or recoverable).
        let reopened = Image::open(&path, &self.options_for(&path));
        let outcome = match (grown, reopened) {
            (Ok(g), Ok(img)) => {
                closed.switch(Some(Arc::new(img)));
                let told = kernel::open_device(self.id)
                    .and_then(|c| c.update_size(new_size).map_err(super::error::ublk("UPDATE_SIZE")));
                match told {
                    Ok(_) => Ok(g),
                    Err(e) => Err(ResizeError::Kernel { why: e.to_string(), size: new_size }),
                }
            }
            (Err(e), Ok(img)) => {
                let size = img.size();
                closed.switch(Some(Arc::new(img)));
                Err(ResizeError::Failed { why: e.to_string(), size })
            }
            (g, Err(reopen)) => Err(ResizeError::Broken {
                why: g.err().map_or_else(|| "the image grew".to_string(), |e| e.to_string()),
                reopen: reopen.to_string(),
            }),
        };
        let held = closed.open();
        let g = outcome?;
        if let Err(e) = self.run_dir.update(self.id, |s| s.virtual_size = new_size) {
            tracing::warn!(error = %e, "could not record the new size in the run dir");
        }
        tracing::info!(image = %path.display(), old_size, new_size, held_ms = ms(held), "online resize done; requests released");
        Ok(Resized {
            image: path,
            old_size,
            new_size,
            kind: serde_json::to_value(g.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            held_ms: ms(held),
        })
    }
}
