//! Giving back slack: an image that allocates no more (a layer a snapshot froze, an
//! image a stop closed) hands back the space of its storage past its used end. On a
//! linear LV that is an `lvreduce` (see `crate::storage::lv`), which changes no byte
//! the image uses and no header: a crash before, during or after it leaves a valid
//! image. Files, plain block devices and thin LVs have nothing to give back.

use super::{Image, ImageError, OpenOptions};
use crate::storage::{GaveBack, Slack};
use crate::units::ChunkIdx;
use std::path::Path;
use std::sync::atomic::Ordering;

impl Image {
    /// Where the image's use of its storage ends: past the last chunk its table
    /// names (the data region's start when it names none). `None` for the raw
    /// layout, whose data may lie anywhere up to its virtual size.
    pub fn used_end(&self) -> Option<u64> {
        let geo = &self.meta.geo;
        if !geo.has_table() {
            return None;
        }
        let top = (0..geo.chunks()).filter_map(|c| self.meta.table.get(ChunkIdx(c))).map(|p| p.0 as u64 + 1).max();
        Some(geo.data_offset + top.unwrap_or(0) * geo.chunk_bytes())
    }

    /// Gives back the storage's space past [`Image::used_end`]. Only for an image
    /// that allocates no more: closed, frozen, or open read-only; anything else is
    /// refused. `Ok(None)`: nothing given back (no table, a resize or commit under
    /// way, storage that holds no slack, or the stop of an image whose LV asks to
    /// keep it).
    pub fn give_back_slack(&self, why: Slack) -> Result<Option<GaveBack>, ImageError> {
        let h = self.header();
        let settled = self.closed.load(Ordering::Acquire) || self.read_only() || h.is_frozen();
        if !settled {
            return Err(ImageError::Invalid {
                path: self.name(),
                why: "is open for writes: its slack is given back once it is frozen or closed".into(),
            });
        }
        if h.is_resizing() || h.is_committing() || h.is_dirty() {
            return Ok(None);
        }
        let Some(end) = self.used_end() else {
            return Ok(None);
        };
        Ok(self.storage.give_back(end, why)?)
    }
}

/// Gives back the slack of the image at `path` (`fvd reduce`, and a layer an online
/// snapshot froze): opened for writing, so that no writer holds it meanwhile, with
/// nothing written. An image not closed cleanly is refused: its recovery
/// (`fvd recover`) may need the space.
pub fn give_back_at(path: &Path, why: Slack) -> Result<Option<GaveBack>, ImageError> {
    let h = super::snapshot::header_at(path)?;
    if h.is_dirty() {
        return Err(ImageError::Invalid {
            path: path.display().to_string(),
            why: "was not closed cleanly: run `fvd recover` (or start it) first".into(),
        });
    }
    let opts = OpenOptions { allow_frozen: true, chain_member: true, allow_invalid: false, ..OpenOptions::default() };
    let img = Image::open(path, &opts)?;
    img.close()?;
    img.give_back_slack(why)
}

/// Logs what giving back a layer's slack did.
pub fn log_give_back(image: &Path, r: Result<Option<crate::storage::GaveBack>, ImageError>) {
    match r {
        Ok(Some(g)) => tracing::info!(image = %image.display(), from = g.from, to = g.to, "slack given back"),
        Ok(None) => {}
        Err(e) => tracing::warn!(
            image = %image.display(),
            error = %e,
            "the slack of the image could not be given back (`fvd reduce` tries again)"
        ),
    }
}
