//! The chunk allocator: reuses freed chunks (lowest first) before growing.

use crate::units::PhysChunk;
use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

struct Inner {
    hwm: u32,
    free: BTreeSet<u32>,
}

pub struct Allocator {
    inner: Mutex<Inner>,
}

impl Allocator {
    pub fn new(hwm: u32, free: Vec<u32>) -> Allocator {
        Allocator { inner: Mutex::new(Inner { hwm, free: free.into_iter().collect() }) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a free chunk, or the next one past the high-water mark after
    /// `grow(new_hwm)` confirmed the storage can hold it.
    pub fn allocate<E>(&self, limit: u64, grow: impl FnOnce(u32) -> Result<(), E>) -> Result<Option<PhysChunk>, E> {
        let mut s = self.lock();
        if let Some(p) = s.free.pop_first() {
            return Ok(Some(PhysChunk(p)));
        }
        if s.hwm as u64 >= limit {
            return Ok(None);
        }
        let p = s.hwm;
        grow(p + 1)?;
        s.hwm = p + 1;
        Ok(Some(PhysChunk(p)))
    }

    /// Returns chunks that are free for reuse (their free record is durable, or
    /// they were never published).
    pub fn release(&self, chunks: impl IntoIterator<Item = PhysChunk>) {
        let mut s = self.lock();
        for c in chunks {
            s.free.insert(c.0);
        }
    }

    pub fn hwm(&self) -> u32 {
        self.lock().hwm
    }

    pub fn free_chunks(&self) -> Vec<u32> {
        self.lock().free.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_chunks_are_reused_before_growing() {
        let a = Allocator::new(3, vec![1]);
        let mut grown = Vec::new();
        let take = |grown: &mut Vec<u32>| {
            a.allocate::<()>(10, |n| {
                grown.push(n);
                Ok(())
            })
            .unwrap()
            .unwrap()
        };
        assert_eq!(take(&mut grown), PhysChunk(1));
        assert!(grown.is_empty());
        let p = take(&mut grown);
        assert_eq!((p, a.hwm()), (PhysChunk(3), 4));
        assert_eq!(grown, vec![4]);
        assert!(a.allocate::<()>(4, |_| Ok(())).unwrap().is_none());
        assert_eq!(a.allocate(10, |_| Err("full")), Err("full"));
    }
}
