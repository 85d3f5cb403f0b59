//! Giving back slack: a linear LV reduced to what an image that will not allocate
//! again uses.
//!
//! A layer frozen by a snapshot, or an image a stop has closed, needs its LV only
//! up to its used end (the end of the last chunk its table names; see
//! `Image::used_end`). The rest is slack the volume group can use elsewhere.
//! `lvreduce` to that end, rounded up to the extent, is safe at any moment for such
//! an image: nothing it names lies past the used end, and lvm2 commits the new
//! size in one metadata write, so a crash leaves the LV at its old size or at its
//! new one, both of which hold the whole image. No header changes with it.
//!
//! After a reduce the instance does not grow ahead again (a frozen layer never
//! allocates; a closed image is about to be dropped); a need past the new size
//! still grows it, as for any write.
//!
//! A thin LV is left as it is: its size past what it uses costs the pool nothing
//! (the image discards the chunks it frees), so there is nothing to give back.

use super::LvStorage;
use crate::storage::{GaveBack, StorageError};
use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl LvStorage {
    /// See [`crate::storage::Storage::give_back`].
    pub(super) fn reduce(&self, keep: u64) -> Result<Option<GaveBack>, StorageError> {
        let sh = &self.sh;
        if sh.vol.is_thin() {
            return Ok(None);
        }
        let extent = sh.policy().extent.max(1);
        let to = keep.div_ceil(extent).max(1) * extent;
        let mut st = sh.lock();
        // First, so that the grower does not grow it back meanwhile.
        st.reduced = true;
        while st.growing {
            st = sh.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let from = sh.size();
        if to >= from {
            return Ok(None);
        }
        let err = |why: String| StorageError::Reduce { path: sh.path.clone(), to, source: io::Error::other(why) };
        let t0 = Instant::now();
        // Under the lock: no growth may start until the new size is known.
        sh.vol.reduce_to(to).map_err(err)?;
        let now = sh.vol.device_size().map_err(|e| err(format!("the size after lvreduce: {e}")))?;
        if now != to {
            return Err(err(format!("lvreduce left the device at {now:#x} bytes")));
        }
        sh.size.store(to, Ordering::Release);
        st.used = st.used.min(to);
        st.reductions += 1;
        st.reduced_bytes += from - to;
        drop(st);
        sh.publish();
        tracing::info!(
            lv = %sh.vol.lv(),
            from,
            to,
            ms = t0.elapsed().as_millis() as u64,
            "LV reduced to what the image uses"
        );
        Ok(Some(GaveBack { from, to }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{rig, status, M};
    use crate::storage::{GaveBack, Slack, Storage, StorageError};
    use std::time::Duration;

    #[test]
    fn a_linear_lv_gives_back_what_the_image_does_not_use() {
        let r = rig(16 * M, 1 << 30);
        let s = r.open(8 * M, Duration::ZERO, false);
        s.ensure_size(20 * M).unwrap();
        assert!(s.wait_idle(Duration::from_secs(5)));
        let before = s.size();
        assert!(before >= 28 * M, "{before}");
        let free0 = *r.vg_free.lock().unwrap();
        // Rounded up to the extent (1 MiB here).
        let g = s.give_back(20 * M + 5, Slack::Asked).unwrap();
        assert_eq!(g, Some(GaveBack { from: before, to: 21 * M }));
        assert_eq!(s.size(), 21 * M);
        assert_eq!(std::fs::metadata(&r.path).unwrap().len(), 21 * M);
        assert_eq!(*r.vg_free.lock().unwrap(), free0 + before - 21 * M);
        // It does not grow ahead again.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(s.size(), 21 * M);
        assert_eq!(s.give_back(20 * M + 5, Slack::Frozen).unwrap(), None, "nothing more to give");
        let v = status(&s);
        assert_eq!(v["reductions"], 1, "{v}");
        assert_eq!(v["reduced-bytes"].as_u64().unwrap(), before - 21 * M);
        // A need past the new size still grows it.
        s.ensure_size(22 * M).unwrap();
        assert!(s.size() >= 22 * M);
    }

    #[test]
    fn a_thin_lv_keeps_its_size_and_a_failed_lvreduce_says_so() {
        let r = rig(16 * M, 1 << 30);
        let s = r.open(8 * M, Duration::ZERO, true);
        assert_eq!(s.give_back(4 * M, Slack::Asked).unwrap(), None);
        assert_eq!(s.size(), 16 * M);
        let r = rig(16 * M, 1 << 30);
        let s = r.open(8 * M, Duration::ZERO, false);
        *r.fail_reduce.lock().unwrap() = true;
        match s.give_back(4 * M, Slack::Stopped) {
            Err(StorageError::Reduce { to, .. }) => assert_eq!(to, 4 * M),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.size(), 16 * M, "the size it had");
    }
}
