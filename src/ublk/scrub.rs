//! `fvd scrub -n ID`: scrubbing the metadata of the image a daemon serves,
//! on the control thread, one unit at a time (see [`crate::image::scrub`]);
//! requests go on between units.

use super::snapshot::{ring, Snapshotter};
use crate::image::scrub::ScrubReport;
use std::sync::Arc;

impl Snapshotter {
    /// Scrubs the served image at no more than `rate` bytes/s. Ends early,
    /// saying so, when the daemon begins to stop or the image is swapped (an
    /// online snapshot or resize).
    pub fn scrub(&self, rate: Option<u64>) -> Result<ScrubReport, String> {
        let img = self.gate.current().ok_or("the device serves no image; stop it and start it again")?;
        let ring = ring().map_err(|e| e.to_string())?;
        let enter = || {
            let stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
            let same = self.gate.current().is_some_and(|c| Arc::ptr_eq(&c, &img));
            (!*stopping && same).then_some(stopping)
        };
        let mut r = ring
            .block_on(img.scrub(&ring, rate, enter))
            .map_err(|e| format!("scrub: {e}"))?
            .map_err(|e| e.to_string())?;
        if r.stopped {
            r.notes.push(format!(
                "{}: the scrub ended early: the daemon is stopping, or an online snapshot or resize changed the image",
                r.image
            ));
        }
        Ok(r)
    }
}
