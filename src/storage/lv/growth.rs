//! One growth of the LV: `lvextend` to the policy's target (or, when the volume
//! group is short, to what it has or the least that holds the need), confirmed
//! from the device's own size, the new space zeroed unless the LV guarantees it.

use super::shared::{Failure, Shared};
use crate::storage::lvm::{tool, ExtendError};
use std::time::{Duration, Instant};

/// How long a growth may take to show in the device's size after lvextend.
const CONFIRM_WAIT: Duration = Duration::from_secs(10);

impl Shared {
    /// One growth: to the policy's target, or when the volume group cannot
    /// give that and a write needs space, to the least size holding it.
    /// Returns the confirmed new size, with any new space reading as zeros.
    pub(super) fn grow_once(&self, size: u64, used: u64) -> Result<u64, Failure> {
        let fail = |no_space: bool, msg: String, covered: u64, hard: bool| Failure { no_space, msg, covered, hard };
        let now = self.vol.device_size().map_err(|e| fail(false, format!("BLKGETSIZE64: {e}"), used, true))?;
        if now > size {
            // Grown already: an earlier answer got lost, or the administrator did it.
            return self.adopt(size, now).map_err(|m| fail(false, m, used, true));
        }
        let target = self.policy().goal(self.growth, size, used);
        let asked = match self.vol.extend_to(target) {
            Ok(()) => target,
            Err(ExtendError::NoSpace(m)) => {
                // Take what the volume group still has when that holds what
                // writes need (one step instead of one per waiting write),
                // else the least size that holds it.
                let need = self.lock().used;
                let all = tool::available_extents(&m)
                    .map(|n| size + n * self.policy().extent)
                    .filter(|&t| t > size && t < target);
                let least = self.policy().minimal(need);
                let to = match all {
                    Some(t) if t >= least => t,
                    _ if need > size => least,
                    // Only the growth ahead failed and nothing is left; no write waits yet.
                    _ => return Err(fail(true, m, need, false)),
                };
                if to >= target || to <= size {
                    return Err(fail(true, m, need, need > size));
                }
                match self.vol.extend_to(to) {
                    Ok(()) => to,
                    Err(ExtendError::NoSpace(m)) => return Err(fail(true, m, need, need > size)),
                    Err(ExtendError::Failed(m)) => return Err(fail(false, m, need, need > size)),
                }
            }
            Err(ExtendError::Failed(m)) => {
                // The LV may have grown all the same (a lost answer, a timeout).
                match self.vol.device_size() {
                    Ok(n) if n > size => return self.adopt(size, n).map_err(|m| fail(false, m, used, true)),
                    _ => return Err(fail(false, m, used.max(size + 1), true)),
                }
            }
        };
        let got = self.confirm(size, asked).map_err(|m| fail(false, m, used, true))?;
        self.adopt(size, got).map_err(|m| fail(false, m, used, true))
    }

    /// Waits for the device to show the size lvextend reported.
    fn confirm(&self, old: u64, want: u64) -> Result<u64, String> {
        let t0 = Instant::now();
        loop {
            let n = self.vol.device_size().map_err(|e| format!("BLKGETSIZE64: {e}"))?;
            if n >= want {
                return Ok(n);
            }
            if t0.elapsed() > CONFIRM_WAIT {
                if n > old {
                    return Ok(n);
                }
                return Err(format!(
                    "lvextend reported success but the device still holds {n} bytes (asked for {want})"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes `[old, new)` read as zeros unless the LV guarantees it.
    fn adopt(&self, old: u64, new: u64) -> Result<u64, String> {
        if !self.vol.new_space_is_zero() {
            self.vol.zero(old, new - old).map_err(|e| format!("zeroing the new space {old:#x}..{new:#x}: {e}"))?;
        }
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{rig, M};
    use crate::storage::Storage;
    use std::time::Duration;

    #[test]
    fn a_lost_answer_does_not_grow_twice() {
        let r = rig(8 * M, 1 << 30);
        *r.lose.lock().unwrap() = 1;
        let s = r.open(4 * M, Duration::ZERO, false);
        s.ensure_size(9 * M).unwrap();
        assert!(s.wait_idle(Duration::from_secs(5)));
        // lvextend ran once; its success was reported as a failure, and the
        // grower adopted the size the device shows instead of growing again.
        assert_eq!(r.extends.lock().unwrap().clone(), vec![16 * M]);
        assert_eq!(s.size(), 16 * M);
    }
}
