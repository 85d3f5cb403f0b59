//! A write's side of growth: [`Shared::ensure`] notes the need, and when the
//! space is not there yet waits for the grower, failing with ENOSPC after a
//! failure that even the least growth could not overcome.

use super::shared::{Failure, Shared};
use crate::storage::StorageError;
use std::time::{Duration, Instant};

/// After a growth failed even at its least size, new writes that need space
/// fail at once for this long; the first one after it tries again.
pub const HARD_RETRY: Duration = Duration::from_secs(1);
/// The longest a write waits for a growth that neither finishes nor fails.
pub const GROWTH_WAIT_MAX: Duration = Duration::from_secs(30);

impl Shared {
    /// See [`crate::storage::Storage::ensure_size`]; `can_grow`: a grower runs.
    pub(super) fn ensure(&self, min: u64, can_grow: bool) -> Result<(), StorageError> {
        let sh = self;
        let mut st = sh.lock();
        st.used = st.used.max(min);
        let size = sh.size();
        if min <= size {
            if can_grow && sh.policy().wants_growth(size, st.used) && !st.growing {
                sh.work.notify_one();
            }
            return Ok(());
        }
        if !can_grow {
            return Err(StorageError::NoSpace { path: sh.path.clone(), want: min, have: size });
        }
        if let Some(f) = st.failure.clone() {
            let recent = st.last_attempt.is_some_and(|t| t.elapsed() < sh.hard_retry);
            if f.hard && recent {
                st.enospc += 1;
                sh.publish_soon(st);
                return Err(sh.error(&f, min));
            }
            st.retry_at = None;
        }
        let t0 = Instant::now();
        let late = st.growths > 0;
        let epoch = st.epoch;
        sh.work.notify_one();
        let r = loop {
            if sh.size() >= min {
                break Ok(());
            }
            if st.epoch != epoch {
                match st.failure.clone() {
                    Some(f) if f.hard => {
                        st.enospc += 1;
                        break Err(sh.error(&f, min));
                    }
                    // Only the growth ahead failed; the grower tries for this need next.
                    _ => {}
                }
            }
            if st.stop {
                break Err(StorageError::NoSpace { path: sh.path.clone(), want: min, have: sh.size() });
            }
            if t0.elapsed() >= GROWTH_WAIT_MAX {
                // The grower is stuck (an lvm command or a zeroing the kernel
                // does not finish): the write fails instead of hanging.
                let f = Failure {
                    no_space: false,
                    msg: format!("the LV did not grow within {} s", GROWTH_WAIT_MAX.as_secs()),
                    covered: min,
                    hard: true,
                };
                st.enospc += 1;
                break Err(sh.error(&f, min));
            }
            st = sh.done.wait_timeout(st, GROWTH_WAIT_MAX / 10).unwrap_or_else(|p| p.into_inner()).0;
        };
        let waited = t0.elapsed();
        st.waits += 1;
        st.wait_time += waited;
        st.wait_max = st.wait_max.max(waited);
        if late {
            st.late_waits += 1;
        }
        if r.is_ok() {
            drop(st);
            tracing::debug!(want = min, ms = waited.as_millis() as u64, "a write waited for the LV to grow");
        } else {
            sh.publish_soon(st);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{rig, status, M};
    use crate::storage::Storage;
    use std::time::Duration;

    #[test]
    fn a_write_past_the_end_waits_for_the_growth() {
        let r = rig(4 * M, 1 << 30);
        let s = r.open(4 * M, Duration::from_millis(30), true);
        s.ensure_size(20 * M).unwrap();
        assert!(s.size() >= 24 * M);
        let v = status(&s);
        assert_eq!(v["waits"], 1);
        assert!(v["wait-ms-total"].as_f64().unwrap() >= 25.0, "{v}");
        assert!(r.zeroed.lock().unwrap().is_empty(), "thin: new space needs no zeroing");
        // Growth happened in whole units from the initial size.
        assert_eq!((s.size() - 4 * M) % (4 * M), 0);
    }
}
