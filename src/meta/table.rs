//! The live one-level table: one atomic entry per guest chunk, read without locks.

use crate::units::{ChunkIdx, PhysChunk};
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Table {
    entries: Vec<AtomicU32>,
}

impl Table {
    pub fn new(entries: &[u32]) -> Table {
        Table { entries: entries.iter().map(|&e| AtomicU32::new(e)).collect() }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The physical chunk of guest chunk `c`, if allocated.
    pub fn get(&self, c: ChunkIdx) -> Option<PhysChunk> {
        let e = self.entries.get(c.0 as usize)?.load(Ordering::Acquire);
        (e != 0).then(|| PhysChunk(e - 1))
    }

    /// Installs `p` for `c` if `c` is unallocated; returns the winner.
    pub fn install(&self, c: ChunkIdx, p: PhysChunk) -> Result<(), PhysChunk> {
        let slot = &self.entries[c.0 as usize];
        match slot.compare_exchange(0, p.0 + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(()),
            Err(e) => Err(PhysChunk(e - 1)),
        }
    }

    /// Unmaps `c` if it still maps to `p`; returns whether it did. (A
    /// discard frees only the chunk it punched, not one a write installed
    /// meanwhile.)
    pub fn clear_if(&self, c: ChunkIdx, p: PhysChunk) -> bool {
        self.entries
            .get(c.0 as usize)
            .is_some_and(|e| e.compare_exchange(p.0 + 1, 0, Ordering::AcqRel, Ordering::Acquire).is_ok())
    }

    pub fn allocated(&self) -> u64 {
        self.entries.iter().filter(|e| e.load(Ordering::Relaxed) != 0).count() as u64
    }
}
