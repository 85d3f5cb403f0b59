//! The grower thread (`fvd-lv-grow`): keeps between one and two grow units free
//! past the image's need, retries failures with a back-off, warns about a nearly
//! full thin pool, and wakes the writers waiting for space.

use super::shared::{Shared, State};
use crate::storage::lvm::policy::Growth;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Background retries after a failure back off from 1 s to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A thin pool above this share of data space in use is warned about.
const POOL_WARN_PERCENT: f64 = 90.0;

impl Shared {
    pub(super) fn run_grower(&self) {
        let mut st = self.lock();
        loop {
            if st.stop {
                return;
            }
            let size = self.size();
            let hard = st.used > size;
            let ahead = self.growth == Growth::Ahead && !st.reduced;
            let want = hard || (ahead && st.used > 0 && self.policy().wants_growth(size, st.used));
            if !want {
                st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if let Some(t) = st.retry_at {
                let now = Instant::now();
                if now < t {
                    st = self.work.wait_timeout(st, t - now).unwrap_or_else(|p| p.into_inner()).0;
                    continue;
                }
            }
            let used = st.used;
            st.growing = true;
            st.last_attempt = Some(Instant::now());
            let snap = self.status_locked(&st, st.report.clone());
            drop(st);
            self.write_status(&snap);
            let t0 = Instant::now();
            let r = self.grow_once(size, used);
            let took = t0.elapsed();
            let report = self.vol.report().ok();
            st = self.lock();
            st.growing = false;
            if report.is_some() {
                st.report = report;
            }
            match r {
                Ok(new) => {
                    self.size.store(new, Ordering::Release);
                    st.growths += 1;
                    st.grown_bytes += new - size;
                    st.growth_time += took;
                    st.last_growth_time = took;
                    st.retry_at = None;
                    st.backoff = Duration::from_secs(1);
                    if let Some(f) = st.failure.take().filter(|f| f.hard) {
                        tracing::info!(lv = %self.vol.lv(), after = %f.msg, "the LV grows again");
                    }
                    tracing::info!(
                        lv = %self.vol.lv(),
                        from = size,
                        to = new,
                        used = st.used,
                        ms = took.as_millis() as u64,
                        "LV grown"
                    );
                    self.check_pool(&mut st);
                }
                Err(f) => {
                    st.failed_attempts += 1;
                    st.epoch += 1;
                    let first = st.failure.is_none();
                    if st.used > f.covered {
                        st.retry_at = None; // new needs arrived meanwhile: try for them now
                    } else {
                        st.retry_at = Some(Instant::now() + st.backoff);
                        st.backoff = (st.backoff * 2).min(MAX_BACKOFF);
                    }
                    match (first, f.no_space, f.hard) {
                        (true, true, true) => tracing::error!(
                            lv = %self.vol.lv(),
                            error = %f.msg,
                            "volume group full: writes that need new space fail with ENOSPC until space is added \
                             (vgextend); everything else keeps working"
                        ),
                        (true, true, false) => tracing::warn!(
                            lv = %self.vol.lv(),
                            error = %f.msg,
                            "the volume group cannot give a whole grow unit; growing only as writes need"
                        ),
                        (true, false, _) => {
                            tracing::error!(lv = %self.vol.lv(), error = %f.msg, "growing the LV failed")
                        }
                        _ => tracing::debug!(lv = %self.vol.lv(), error = %f.msg, "growing the LV failed again"),
                    }
                    st.failure = Some(f);
                }
            }
            self.done.notify_all();
            let snap = self.status_locked(&st, st.report.clone());
            drop(st);
            self.write_status(&snap);
            st = self.lock();
        }
    }

    fn check_pool(&self, st: &mut State) {
        let Some(p) = st.report.as_ref().and_then(|r| r.pool_data_percent) else {
            return;
        };
        if p >= POOL_WARN_PERCENT && !st.pool_warned {
            tracing::warn!(
                lv = %self.vol.lv(),
                pool = self.vol.pool().unwrap_or(""),
                data_percent = p,
                "the thin pool is nearly full: extend it (lvextend of the pool, or thin_pool_autoextend_threshold)"
            );
            st.pool_warned = true;
        } else if p < POOL_WARN_PERCENT {
            st.pool_warned = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{rig, status, M};
    use crate::storage::{Storage, StorageError};
    use std::time::{Duration, Instant};

    #[test]
    fn grows_ahead_without_waiting() {
        let r = rig(16 * M, 1 << 30);
        let s = r.open(8 * M, Duration::ZERO, false);
        assert_eq!(s.size(), 16 * M);
        // Sequential allocation, one 1 MiB chunk at a time, waiting for the
        // grower between steps as a writer's own I/O would give it time.
        for used in (5..=100).map(|m| m * M) {
            s.ensure_size(used).unwrap();
            assert!(s.wait_idle(Duration::from_secs(5)));
            let free = s.size() - used;
            assert!((8 * M..16 * M).contains(&free), "free {free} at {used}");
        }
        let v = status(&s);
        assert_eq!(v["waits"], 0, "{v}");
        assert_eq!(v["growths"].as_u64().unwrap(), (s.size() - 16 * M) / (8 * M));
        assert_eq!(v["units-added"], v["growths"]);
        assert_eq!(v["state"], "ok");
        // Linear: every new range was zeroed before use, exactly once.
        let z = r.zeroed.lock().unwrap().clone();
        let mut at = 16 * M;
        for (off, len) in z {
            assert_eq!(off, at);
            at += len;
        }
        assert_eq!(at, s.size());
    }

    #[test]
    fn full_volume_group_gives_enospc_then_resumes() {
        let r = rig(8 * M, 6 * M);
        let s = r.open(4 * M, Duration::ZERO, false);
        s.ensure_size(6 * M).unwrap();
        assert!(s.wait_idle(Duration::from_secs(5)));
        // 4 MiB unit: one growth to 12 MiB, then the VG has 2 MiB left.
        assert_eq!(s.size(), 12 * M);
        // Needs 13 MiB: a unit does not fit; the grower takes all the VG
        // has left (2 MiB) in one step.
        s.ensure_size(13 * M).unwrap();
        assert_eq!(s.size(), 14 * M);
        assert_eq!(r.extends.lock().unwrap().last(), Some(&(14 * M)));
        s.ensure_size(14 * M).unwrap();
        // Now the VG is empty.
        match s.ensure_size(15 * M) {
            Err(StorageError::NoSpace { want, have, .. }) => assert_eq!((want, have), (15 * M, 14 * M)),
            e => panic!("{e:?}"),
        }
        // Space that exists keeps working.
        s.ensure_size(14 * M).unwrap();
        assert!(matches!(s.ensure_size(16 * M), Err(StorageError::NoSpace { .. })));
        let v = status(&s);
        assert_eq!(v["state"], "no-space");
        assert!(v["enospc-errors"].as_u64().unwrap() >= 2);
        // The administrator adds space; after the retry interval writing resumes.
        *r.vg_free.lock().unwrap() += 64 * M;
        std::thread::sleep(Duration::from_millis(60));
        s.ensure_size(16 * M).unwrap();
        assert!(s.wait_idle(Duration::from_secs(5)));
        assert_eq!(status(&s)["state"], "ok");
    }

    #[test]
    fn background_retry_after_backoff() {
        let r = rig(8 * M, 0);
        let s = r.open(4 * M, Duration::ZERO, false);
        s.ensure_size(6 * M).unwrap(); // wants growth ahead; the VG is empty
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(status(&s)["state"], "low-space");
        *r.vg_free.lock().unwrap() = 64 * M;
        // The first back-off is one second.
        let t0 = Instant::now();
        while s.size() == 8 * M && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.size(), 12 * M);
        assert_eq!(status(&s)["state"], "ok");
    }
}
