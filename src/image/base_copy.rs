//! Storing base data in the image off the guest's critical path (for
//! copy-on-read and prefetch), without bitmap updates on storage.
//!
//! Copies set only the live bitmap: on storage the block still reads from
//! the base, which holds the same bytes, so a crash at any point loses
//! nothing and never exposes a half-copied block. Chunk allocations they need
//! are journaled as usual. Prefetch records its progress as the header's
//! cursor at checkpoints, after the copies below it are durable.

use super::{Image, ImageError};
use crate::io::{self, IoEngine};
use crate::units::{BlockIdx, Bytes};

impl Image {
    /// Stores base data for blocks `first..first+count` that are not yet in
    /// the image. Returns how many blocks it stored.
    pub(super) async fn copy_blocks<E: IoEngine>(
        &self,
        e: &E,
        first: BlockIdx,
        count: u64,
        data: &[u8],
    ) -> Result<u64, ImageError> {
        if self.meta.all_present() || self.read_only() {
            return Ok(0);
        }
        let bs = self.meta.geo.block_size as u64;
        let off = first.0 * bs;
        let zero = data.iter().all(|&b| b == 0);
        let chunk_missing = self.meta.geo.has_table()
            && self.meta.chunk_spans(Bytes(off), count * bs).iter().any(|(c, _, _)| self.meta.table.get(*c).is_none());
        if zero && chunk_missing && self.meta.chunk_spans(Bytes(off), count * bs).len() == 1 {
            // All zeros into an unallocated chunk: it reads zeros already.
            let _g = self.lock_blocks(first, count).await;
            let fresh: Vec<u64> =
                (first.0..first.0 + count).filter(|&b| !self.meta.block_in_image(BlockIdx(b))).collect();
            if self.meta.table.get(self.meta.geo.chunk_of(Bytes(off))).is_none() {
                for &b in &fresh {
                    self.meta.set_blocks_copied(BlockIdx(b), 1);
                }
                return Ok(fresh.len() as u64);
            }
        }
        self.ensure_dirty(e).await?;
        self.allocate_range(e, off, count * bs).await?;
        let _g = self.lock_blocks(first, count).await;
        let mut stored = 0;
        let mut b = first.0;
        while b < first.0 + count {
            if self.meta.block_in_image(BlockIdx(b)) {
                b += 1;
                continue;
            }
            // A run of missing blocks inside one chunk: one write.
            let mut end = b + 1;
            let chunk = self.meta.geo.chunk_of(Bytes(b * bs));
            while end < first.0 + count
                && !self.meta.block_in_image(BlockIdx(end))
                && self.meta.geo.chunk_of(Bytes(end * bs)) == chunk
            {
                end += 1;
            }
            let so = self.meta.storage_offset(Bytes(b * bs)).ok_or_else(|| ImageError::Invalid {
                path: self.name(),
                why: format!("chunk of block {b:#x} vanished during a copy"),
            })?;
            let piece = &data[((b - first.0) * bs) as usize..((end - first.0) * bs) as usize];
            io::write_at(e, self.storage.as_ref(), piece, so).await.map_err(|source| ImageError::Io {
                path: self.name(),
                what: "copy from base",
                offset: so,
                source,
            })?;
            self.meta.set_blocks_copied(BlockIdx(b), end - b);
            stored += end - b;
            b = end;
        }
        self.sync_volatile()?;
        Ok(stored)
    }
}
