//! In-memory metadata: the table, the bitmap, what must be journaled, and the
//! chunk allocator. This layer decides *plans* (where each piece of a request
//! lives) and does no I/O.
//!
//! Two views are kept. The *live* view (atomics, read without locks on the data
//! path) is what requests see. The *persist* view is what the journal and the
//! next checkpoint will write: a table entry enters it when the chunk is
//! allocated (a fresh chunk reads as zeros, exactly like an unallocated one), a
//! bitmap bit only once the copied block's data write has completed, so a
//! record never describes data that has not been written (crash rule 1).

pub mod alloc;
pub mod bitmap;
pub mod depth;
pub mod inflight;
pub mod locks;
pub mod persist;
pub mod plan;
pub mod table;

pub use alloc::Allocator;
pub use bitmap::Bitmap;
pub use inflight::{Inflight, InflightGuard, InflightTicket};
pub use locks::BlockLocks;
pub use persist::{Batch, FreedChunk, Persist, Snapshot};
pub use plan::{Piece, Plan, Source};
pub use table::Table;

use crate::format::{BitmapBits, Geometry, Record};
use crate::units::{BlockIdx, Bytes, ChunkIdx, PhysChunk};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MetaError {
    #[error("table entry {vchunk:#x} points at chunk {phys:#x}, beyond the {limit:#x} chunks the image can hold")]
    EntryOutOfRange { vchunk: u64, phys: u32, limit: u64 },
    #[error("table entries {first:#x} and {second:#x} both point at chunk {phys:#x}")]
    DuplicateEntry { first: u64, second: u64, phys: u32 },
    #[error("journal record for table entry {0:#x} is beyond the table")]
    RecordOutOfRange(u64),
    #[error("journal record sets bitmap bits {first:#x}+{count:#x} beyond the {bits:#x} bits")]
    BitsOutOfRange { first: u64, count: u32, bits: u64 },
    #[error("block {block:#x} is marked as in the image but its chunk {vchunk:#x} is unallocated")]
    BitWithoutChunk { block: u64, vchunk: u64 },
    #[error("request {off:#x}+{len:#x} is outside the disk of {size:#x} bytes")]
    OutOfRange { off: u64, len: u64, size: u64 },
}

/// All metadata of an open image.
pub struct Meta {
    pub geo: Geometry,
    pub table: Table,
    /// Live: which base blocks have their data in the image (guest writes,
    /// copy-on-read, prefetch, zero blocks).
    pub bitmap: Bitmap,
    /// Which of those are recorded on storage (guest writes and zero blocks
    /// only): a guest write to a block that is live but not recorded must
    /// still record it.
    pub recorded: Bitmap,
    /// Every base block below this is live (prefetch progress).
    pub prefetch_cursor: std::sync::atomic::AtomicU64,
    /// The whole base is in the image and that is durable: the bitmap is
    /// neither consulted nor updated any more.
    pub all_present: std::sync::atomic::AtomicBool,
    pub persist: Persist,
    pub alloc: Allocator,
    pub locks: BlockLocks,
    /// Requests in flight per guest chunk (see [`inflight`]).
    pub inflight: Inflight,
}

/// Applies journal records to plain vectors (used by replay before the live
/// structures exist).
pub fn apply_record(geo: &Geometry, table: &mut [u32], bitmap: &mut BitmapBits, r: &Record) -> Result<(), MetaError> {
    match *r {
        Record::TableSet { vchunk, entry, .. } => {
            let slot = table.get_mut(vchunk as usize).ok_or(MetaError::RecordOutOfRange(vchunk as u64))?;
            *slot = entry;
        }
        Record::BitmapSet { first, count } => {
            // Checked against the bit count before anything is set, then
            // set a word at a time (a record may name 2^32 bits).
            self::bitmap::set_range_in(bitmap, geo.base_blocks(), first, count as u64)
                .map_err(|bits| MetaError::BitsOutOfRange { first, count, bits })?;
        }
    }
    Ok(())
}

/// Checks table entries: in range and unique. Returns the high-water mark.
pub fn validate_table(geo: &Geometry, table: &[u32], storage_size: u64) -> Result<u32, MetaError> {
    let chunk = geo.chunk_bytes();
    let by_storage = storage_size.saturating_sub(geo.data_offset) / chunk.max(1);
    let limit = geo.phys_chunks.min(by_storage);
    let mut owner: Vec<u32> = vec![u32::MAX; limit as usize];
    let mut hwm = 0u32;
    for (v, &e) in table.iter().enumerate() {
        if e == 0 {
            continue;
        }
        let p = e - 1;
        if p as u64 >= limit {
            return Err(MetaError::EntryOutOfRange { vchunk: v as u64, phys: p, limit });
        }
        if owner[p as usize] != u32::MAX {
            return Err(MetaError::DuplicateEntry { first: owner[p as usize] as u64, second: v as u64, phys: p });
        }
        owner[p as usize] = v as u32;
        hwm = hwm.max(p + 1);
    }
    Ok(hwm)
}

impl Meta {
    /// Builds the in-memory metadata from validated table and bitmap contents.
    pub fn new(geo: Geometry, table: Vec<u32>, bitmap: BitmapBits, hwm: u32) -> Meta {
        Meta::with_progress(geo, table, bitmap, hwm, 0, false)
    }

    /// As [`Meta::new`], with prefetch progress from the header.
    pub fn with_progress(
        geo: Geometry,
        table: Vec<u32>,
        bitmap: BitmapBits,
        hwm: u32,
        cursor: u64,
        prefetched: bool,
    ) -> Meta {
        let used: Vec<bool> = {
            let mut u = vec![false; hwm as usize];
            for &e in &table {
                if e != 0 {
                    u[(e - 1) as usize] = true;
                }
            }
            u
        };
        let free = used.iter().enumerate().filter(|(_, &u)| !u).map(|(i, _)| i as u32).collect();
        let live = Bitmap::new(bitmap.as_raw_slice(), geo.base_blocks());
        let cursor = cursor.min(geo.base_blocks());
        live.set_range(BlockIdx(0), cursor);
        Meta {
            table: Table::new(&table),
            recorded: Bitmap::new(bitmap.as_raw_slice(), geo.base_blocks()),
            bitmap: live,
            prefetch_cursor: std::sync::atomic::AtomicU64::new(cursor),
            all_present: std::sync::atomic::AtomicBool::new(prefetched),
            persist: Persist::new(table, bitmap),
            alloc: Allocator::new(hwm, free),
            locks: BlockLocks::default(),
            inflight: Inflight::default(),
            geo,
        }
    }

    /// As [`Meta::with_progress`], for a read-only layer of a chain: only what
    /// reads need, the table and the live bitmap (4 bytes per chunk and one bit
    /// per block). The copies a writer keeps (the journal's view, the recorded
    /// bitmap) are left empty: a layer is never written through this image.
    pub fn for_layer(geo: Geometry, table: Vec<u32>, bitmap: BitmapBits, cursor: u64, prefetched: bool) -> Meta {
        let live = Bitmap::new(bitmap.as_raw_slice(), geo.base_blocks());
        drop(bitmap);
        let cursor = cursor.min(geo.base_blocks());
        live.set_range(BlockIdx(0), cursor);
        let t = Table::new(&table);
        drop(table);
        Meta {
            table: t,
            recorded: Bitmap::new(&[], 0),
            bitmap: live,
            prefetch_cursor: std::sync::atomic::AtomicU64::new(cursor),
            all_present: std::sync::atomic::AtomicBool::new(prefetched),
            persist: Persist::new(Vec::new(), BitmapBits::new()),
            alloc: Allocator::new(0, Vec::new()),
            locks: BlockLocks::default(),
            inflight: Inflight::default(),
            geo,
        }
    }

    /// Bytes of memory the table and the bitmaps hold.
    pub fn memory_bytes(&self) -> u64 {
        self.table.len() as u64 * 4
            + (self.bitmap.bits().div_ceil(64) + self.recorded.bits().div_ceil(64)) * 8
            + self.persist.memory_bytes()
    }

    /// Enters the guest chunks under `[off, off+len)` (none without a table:
    /// a raw layout never moves data). Take it before planning a request.
    pub fn enter(&self, off: Bytes, len: u64) -> Option<InflightGuard<'_>> {
        let cb = self.geo.chunk_size? as u64;
        Some(self.inflight.enter(ChunkIdx(off.0 / cb), ChunkIdx((off.0 + len).div_ceil(cb))))
    }

    /// As [`Meta::enter`], kept as a ticket (see [`InflightTicket`]).
    pub fn enter_ticket(&self, off: Bytes, len: u64) -> Option<InflightTicket> {
        let cb = self.geo.chunk_size? as u64;
        Some(self.inflight.enter_ticket(ChunkIdx(off.0 / cb), ChunkIdx((off.0 + len).div_ceil(cb))))
    }

    pub fn check_range(&self, off: Bytes, len: u64) -> Result<(), MetaError> {
        let size = self.geo.virtual_size.0;
        if off.0.checked_add(len).is_none_or(|end| end > size) {
            return Err(MetaError::OutOfRange { off: off.0, len, size });
        }
        Ok(())
    }

    /// Whether block `b` reads from the image (true) or from the base (false).
    pub fn block_in_image(&self, b: BlockIdx) -> bool {
        b.0 >= self.geo.base_blocks() || self.bitmap.test(b) || self.all_present()
    }

    pub fn all_present(&self) -> bool {
        self.all_present.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The storage offset of guest byte `off` when its chunk is allocated.
    pub fn storage_offset(&self, off: Bytes) -> Option<u64> {
        match self.geo.chunk_size {
            None => Some(self.geo.data_offset + off.0),
            Some(c) => {
                let p = self.table.get(self.geo.chunk_of(off))?;
                Some(self.geo.data_offset + p.0 as u64 * c as u64 + off.0 % c as u64)
            }
        }
    }

    /// Storage offset of physical chunk `p`.
    pub fn chunk_offset(&self, p: PhysChunk) -> u64 {
        self.geo.data_offset + p.0 as u64 * self.geo.chunk_bytes()
    }

    /// Guest chunks covered by `[off, off+len)`, as (chunk, start, end) ranges clipped to it.
    pub fn chunk_spans(&self, off: Bytes, len: u64) -> Vec<(ChunkIdx, u64, u64)> {
        let cb = self.geo.chunk_bytes();
        let mut out = Vec::new();
        let mut pos = off.0;
        let end = off.0 + len;
        while pos < end {
            let c = pos / cb;
            let next = ((c + 1) * cb).min(end);
            out.push((ChunkIdx(c), pos, next));
            pos = next;
        }
        out
    }

    /// Marks blocks `first..first+count` as in the image and recorded (a
    /// guest write). Call only after their data writes have completed.
    pub fn set_blocks_written(&self, first: BlockIdx, count: u64) {
        if count == 0 || self.all_present() {
            return;
        }
        self.persist.set_bits(first.0, count);
        self.recorded.set_range(first, count);
        self.bitmap.set_range(first, count);
    }

    /// Marks blocks as in the image in memory only (copy-on-read, prefetch):
    /// on storage they still read from the base, which holds the same bytes.
    pub fn set_blocks_copied(&self, first: BlockIdx, count: u64) {
        self.bitmap.set_range(first, count);
    }

    /// After a guest write to `[off, off+len)` completed: records the base
    /// blocks under it that are live but not yet recorded.
    pub fn record_written(&self, off: Bytes, len: u64) {
        let bb = self.geo.base_blocks();
        if len == 0 || self.all_present() || off.0 >= bb * self.geo.block_size as u64 {
            return;
        }
        let bs = self.geo.block_size as u64;
        let first = off.0 / bs;
        let end = ((off.0 + len).div_ceil(bs)).min(bb);
        let mut run: Option<(u64, u64)> = None;
        for b in first..end {
            if self.recorded.test(BlockIdx(b)) {
                if let Some((f, n)) = run.take() {
                    self.set_blocks_written(BlockIdx(f), n);
                }
            } else {
                run = match run {
                    Some((f, n)) => Some((f, n + 1)),
                    None => Some((b, 1)),
                };
            }
        }
        if let Some((f, n)) = run {
            self.set_blocks_written(BlockIdx(f), n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::CreateParams;

    #[test]
    fn bitmap_records_are_checked_then_set_a_word_at_a_time() {
        let p = CreateParams {
            virtual_size: 1 << 30,
            block_size: 4096,
            chunk_size: Some(1 << 20),
            base_size: 200 * 4096,
            journal_len: 1 << 20,
        };
        let geo = Geometry::new(&p).unwrap();
        assert_eq!(geo.base_blocks(), 200);
        let mut table = vec![0u32; geo.chunks() as usize];
        let mut bitmap = BitmapBits::repeat(false, 200);
        let set = |first, count| Record::BitmapSet { first, count };
        apply_record(&geo, &mut table, &mut bitmap, &set(60, 70)).unwrap();
        assert_eq!(bitmap.as_raw_slice(), [0xf << 60, u64::MAX, 0x3, 0]);
        apply_record(&geo, &mut table, &mut bitmap, &set(150, 50)).unwrap();
        assert_eq!(bitmap.as_raw_slice()[3], 0xff);
        assert_eq!(bitmap.as_raw_slice()[2], 0x3 | (u64::MAX << 22));
        let before = bitmap.clone();
        for (first, count) in [(150, 51), (200, 1), (u64::MAX, u32::MAX), (0, u32::MAX)] {
            assert_eq!(
                apply_record(&geo, &mut table, &mut bitmap, &set(first, count)),
                Err(MetaError::BitsOutOfRange { first, count, bits: 200 })
            );
        }
        assert_eq!(bitmap, before, "a refused record set nothing");
    }
}
