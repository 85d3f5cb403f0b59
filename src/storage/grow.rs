//! Growth in steps, one at a time: the size a storage publishes, the step it
//! grows by and the limit it never passes. Files (by `set_len`) and plain block
//! devices (by zeroing) differ only in the growth step itself.

use super::StorageError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug)]
pub struct SteppedSize {
    size: AtomicU64,
    unit: u64,
    /// Growth never goes past this (the image's largest possible extent).
    limit: AtomicU64,
    lock: Mutex<()>,
}

impl SteppedSize {
    /// Starts at `size`, growing by `unit` (at least 4 KiB), with no limit.
    pub fn new(size: u64, unit: u64) -> SteppedSize {
        SteppedSize {
            size: AtomicU64::new(size),
            unit: unit.max(4096),
            limit: AtomicU64::new(u64::MAX),
            lock: Mutex::new(()),
        }
    }

    pub fn with_unit(self, unit: u64) -> SteppedSize {
        SteppedSize { unit: unit.max(4096), ..self }
    }

    pub fn get(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Sets the size outright (a mark handed back at open).
    pub fn set(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    pub fn set_limit(&self, max: u64) {
        self.limit.store(max, Ordering::Release);
    }

    /// Makes the size at least `min`. When it is not, `grow(have, want)` runs
    /// under the lock (so one growth at a time, and none when a concurrent one
    /// already covered `min`), with `want` = `min` rounded up to the unit, then
    /// capped at the limit and at `cap`, never below `min`; on success the size
    /// becomes `want`.
    pub fn ensure(
        &self,
        min: u64,
        cap: u64,
        grow: impl FnOnce(u64, u64) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        if self.get() >= min {
            return Ok(());
        }
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let have = self.get();
        if have >= min {
            return Ok(());
        }
        let want = (min.div_ceil(self.unit) * self.unit).min(self.limit.load(Ordering::Acquire)).min(cap).max(min);
        grow(have, want)?;
        self.set(want);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_whole_units_within_the_limit() {
        let s = SteppedSize::new(0, 1000);
        let mut calls = Vec::new();
        s.ensure(1, u64::MAX, |h, w| {
            calls.push((h, w));
            Ok(())
        })
        .unwrap();
        assert_eq!(s.get(), 4096, "the unit is at least 4 KiB");
        s.ensure(4096, u64::MAX, |_, _| panic!("no growth needed")).unwrap();
        s.set_limit(10_000);
        s.ensure(9000, u64::MAX, |h, w| {
            calls.push((h, w));
            Ok(())
        })
        .unwrap();
        s.ensure(11_000, u64::MAX, |h, w| {
            calls.push((h, w));
            Ok(())
        })
        .unwrap();
        s.ensure(11_500, 11_200, |h, w| {
            calls.push((h, w));
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, vec![(0, 4096), (4096, 10_000), (10_000, 11_000), (11_000, 11_500)]);
        let e = s.ensure(20_000, u64::MAX, |h, w| Err(StorageError::NoSpace { path: "x".into(), want: w, have: h }));
        assert!(matches!(e, Err(StorageError::NoSpace { want: 20_000, have: 11_500, .. })));
        assert_eq!(s.get(), 11_500, "a failed growth leaves the size");
    }
}
