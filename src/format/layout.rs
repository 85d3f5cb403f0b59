//! Geometry: the validated shape of an image, computed from a header (open) or
//! from create-time choices, with the unit conversions the rest of the crate uses.

use super::header::{Header, INCOMPAT_JOURNAL_DUP, INCOMPAT_JOURNAL_POS, INCOMPAT_META_TWIN, INCOMPAT_TABLE};
use super::{HEADER_AREA, META_BLOCK};
use crate::units::{BlockIdx, Bytes, ChunkIdx};
use thiserror::Error;

pub const MIN_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 1 << 20;
pub const MAX_CHUNK: u32 = 64 << 20;
pub const MIN_JOURNAL: u64 = 2 * META_BLOCK;
/// The largest journal accepted (1 GiB): open reads the whole region into
/// memory when the image is dirty.
pub const MAX_JOURNAL: u64 = 1 << 30;
/// Data alignment when the table is off.
const RAW_DATA_ALIGN: u64 = 1 << 20;
/// The largest virtual size accepted (64 PiB).
pub const MAX_VIRTUAL: u64 = 1 << 56;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("virtual size {0:#x} must be a non-zero multiple of 512 up to 64 PiB")]
    BadVirtualSize(u64),
    #[error("block size {0} must be a power of two from 4 KiB to 1 MiB")]
    BadBlockSize(u32),
    #[error("chunk size {chunk} must be a power-of-two multiple of the block size {block}, at most 64 MiB")]
    BadChunkSize { chunk: u32, block: u32 },
    #[error("the table would need {0} entries, more than a 32-bit table can address")]
    TooManyChunks(u64),
    #[error("journal size {0:#x} must be a multiple of 4096 from 8 KiB to 1 GiB")]
    BadJournalSize(u64),
    #[error("base size {base:#x} is larger than the virtual size {virt:#x}")]
    BaseTooLarge { base: u64, virt: u64 },
    #[error("{region} region at {offset:#x}+{len:#x} is misaligned, too small, or overlaps the previous region")]
    BadRegion { region: &'static str, offset: u64, len: u64 },
    #[error("{region} region at {offset:#x}+{len:#x} must be {need:#x} bytes long, what the geometry needs")]
    BadRegionLength { region: &'static str, offset: u64, len: u64, need: u64 },
    #[error("data region at {offset:#x} must start at {expected:#x}, the aligned end of the journal")]
    BadDataOffset { offset: u64, expected: u64 },
    #[error("resize_chunks {chunks:#x} of an interrupted resize must be at least the {need:#x} chunks of the virtual size, below 2^32, with a table")]
    BadResizeChunks { chunks: u64, need: u64 },
    #[error(
        "the header holds {found} stripe checksums of the table and bitmap where their {need} stripes need {need}"
    )]
    BadStripeSums { found: usize, need: usize },
    #[error("{region} region ends at {end:#x}, beyond the end of the storage at {size:#x}")]
    BeyondStorage { region: &'static str, end: u64, size: u64 },
}

/// The validated shape of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub virtual_size: Bytes,
    pub block_size: u32,
    /// `None` for the raw layout (no table).
    pub chunk_size: Option<u32>,
    pub base_size: Bytes,
    pub table_offset: u64,
    pub table_len: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub journal_offset: u64,
    pub journal_len: u64,
    pub data_offset: u64,
    /// How many physical chunks table entries may name: the number of chunks,
    /// or more while a resize that moves the metadata is under way (the header's
    /// `resize_chunks`).
    pub phys_chunks: u64,
    /// With `INCOMPAT_META_TWIN`: where the twin copy of the table and bitmap
    /// starts (the journal's end; see [`super::twin`]).
    pub twin_offset: Option<u64>,
}

/// Create-time choices.
#[derive(Debug, Clone)]
pub struct CreateParams {
    pub virtual_size: u64,
    pub block_size: u32,
    pub chunk_size: Option<u32>,
    pub base_size: u64,
    pub journal_len: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn check_shape(vsize: u64, block: u32, chunk: Option<u32>, base: u64) -> Result<(), LayoutError> {
    if vsize == 0 || vsize % 512 != 0 || vsize > MAX_VIRTUAL {
        return Err(LayoutError::BadVirtualSize(vsize));
    }
    if !block.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block) {
        return Err(LayoutError::BadBlockSize(block));
    }
    if let Some(c) = chunk {
        if !c.is_power_of_two() || c < block || c > MAX_CHUNK {
            return Err(LayoutError::BadChunkSize { chunk: c, block });
        }
        let n = vsize.div_ceil(c as u64);
        if n >= u32::MAX as u64 {
            return Err(LayoutError::TooManyChunks(n));
        }
    }
    if base > vsize {
        return Err(LayoutError::BaseTooLarge { base, virt: vsize });
    }
    Ok(())
}

fn check_journal(len: u64) -> Result<(), LayoutError> {
    if len % META_BLOCK != 0 || !(MIN_JOURNAL..=MAX_JOURNAL).contains(&len) {
        return Err(LayoutError::BadJournalSize(len));
    }
    Ok(())
}

impl Geometry {
    /// Lays out a new image.
    pub fn new(p: &CreateParams) -> Result<Geometry, LayoutError> {
        check_shape(p.virtual_size, p.block_size, p.chunk_size, p.base_size)?;
        check_journal(p.journal_len)?;
        let mut g = Geometry {
            virtual_size: Bytes(p.virtual_size),
            block_size: p.block_size,
            chunk_size: p.chunk_size,
            base_size: Bytes(p.base_size),
            table_offset: HEADER_AREA,
            table_len: 0,
            bitmap_offset: 0,
            bitmap_len: 0,
            journal_offset: 0,
            journal_len: p.journal_len,
            data_offset: 0,
            phys_chunks: 0,
            twin_offset: None,
        };
        g.phys_chunks = g.chunks();
        g.table_len = g.table_need();
        g.bitmap_offset = g.table_offset + g.table_len;
        g.bitmap_len = g.bitmap_need();
        g.journal_offset = g.bitmap_offset + g.bitmap_len;
        let mut meta_end = g.journal_offset + g.journal_len;
        // A twin whenever there is a table or a bitmap to keep.
        if g.meta_len() > 0 {
            g.twin_offset = Some(meta_end);
            meta_end += g.span_len();
        }
        g.data_offset = align_up(meta_end, g.data_align());
        Ok(g)
    }

    /// Validates a header's geometry against the storage size.
    ///
    /// Every region is bounded by what the geometry needs (see the module
    /// docs of [`crate::format`]): the table and the bitmap are exactly as long
    /// as create makes them, the journal is at most [`MAX_JOURNAL`], and the
    /// data starts at the aligned end of the journal. Nothing of a size the
    /// header gives is allocated before this passes.
    pub fn from_header(h: &Header, storage_size: u64) -> Result<Geometry, LayoutError> {
        let chunk = if h.incompat & INCOMPAT_TABLE != 0 { Some(h.chunk_size) } else { None };
        check_shape(h.virtual_size, h.block_size, chunk, h.base_size)?;
        check_journal(h.journal_len)?;
        let mut g = Geometry {
            virtual_size: Bytes(h.virtual_size),
            block_size: h.block_size,
            chunk_size: chunk,
            base_size: Bytes(h.base_size),
            table_offset: h.table_offset,
            table_len: h.table_len,
            bitmap_offset: h.bitmap_offset,
            bitmap_len: h.bitmap_len,
            journal_offset: h.journal_offset,
            journal_len: h.journal_len,
            data_offset: h.data_offset,
            phys_chunks: 0,
            twin_offset: None,
        };
        g.phys_chunks = g.chunks();
        if h.is_resizing() {
            let n = h.resize_chunks as u64;
            if !g.has_table() || n < g.chunks() || n >= u32::MAX as u64 {
                return Err(LayoutError::BadResizeChunks { chunks: n, need: g.chunks() });
            }
            g.phys_chunks = n;
        }
        let regions = [
            ("table", g.table_offset, g.table_len, g.table_need()),
            ("bitmap", g.bitmap_offset, g.bitmap_len, g.bitmap_need()),
            ("journal", g.journal_offset, g.journal_len, g.journal_len),
        ];
        let mut prev_end = HEADER_AREA;
        for (region, offset, len, need) in regions {
            if len != need {
                return Err(LayoutError::BadRegionLength { region, offset, len, need });
            }
            let end = match offset.checked_add(len) {
                Some(end) if offset % META_BLOCK == 0 && offset >= prev_end => end,
                _ => return Err(LayoutError::BadRegion { region, offset, len }),
            };
            prev_end = end;
        }
        if h.has_twin() {
            let need = super::twin::stripes(g.meta_len()).1;
            if h.meta_sums.len() != need {
                return Err(LayoutError::BadStripeSums { found: h.meta_sums.len(), need });
            }
            g.twin_offset = Some(prev_end);
            prev_end = prev_end.checked_add(g.span_len()).ok_or(LayoutError::BadRegion {
                region: "twin",
                offset: prev_end,
                len: g.span_len(),
            })?;
        }
        let expected = prev_end.checked_next_multiple_of(g.data_align());
        if expected != Some(g.data_offset) {
            return Err(LayoutError::BadDataOffset { offset: g.data_offset, expected: expected.unwrap_or(u64::MAX) });
        }
        if g.data_offset > storage_size {
            return Err(LayoutError::BeyondStorage { region: "metadata", end: g.data_offset, size: storage_size });
        }
        Ok(g)
    }

    /// Bytes of the metadata stream a checksum stripe covers: table and bitmap.
    pub fn meta_len(&self) -> u64 {
        self.table_len + self.bitmap_len
    }

    /// The span one copy takes: from the table to the journal (table, room
    /// for it to grow, bitmap), which the twin mirrors byte for byte.
    pub fn span_len(&self) -> u64 {
        self.journal_offset - self.table_offset
    }

    /// Where copy `copy` (0, or 1 the twin) keeps its table and its bitmap.
    pub fn copy_offsets(&self, copy: u32) -> (u64, u64) {
        match (copy, self.twin_offset) {
            (1, Some(t)) => (t, t + (self.bitmap_offset - self.table_offset)),
            _ => (self.table_offset, self.bitmap_offset),
        }
    }

    /// Length of the table region: 4 bytes per chunk, rounded up to 4096.
    fn table_need(&self) -> u64 {
        align_up(self.chunks() * 4, META_BLOCK)
    }

    /// Length of the bitmap region: one bit per base block, rounded up to 4096.
    fn bitmap_need(&self) -> u64 {
        align_up(self.base_blocks().div_ceil(8), META_BLOCK)
    }

    /// Alignment of the data region: the chunk, or 1 MiB without a table.
    fn data_align(&self) -> u64 {
        self.chunk_size.map(u64::from).unwrap_or(RAW_DATA_ALIGN)
    }

    pub fn has_table(&self) -> bool {
        self.chunk_size.is_some()
    }

    /// Number of table slots (0 without a table).
    pub fn chunks(&self) -> u64 {
        match self.chunk_size {
            Some(c) => self.virtual_size.0.div_ceil(c as u64),
            None => 0,
        }
    }

    /// Number of blocks that have a bitmap bit (the blocks the base covers).
    pub fn base_blocks(&self) -> u64 {
        self.base_size.0.div_ceil(self.block_size as u64)
    }

    pub fn block_of(&self, off: Bytes) -> BlockIdx {
        BlockIdx(off.0 / self.block_size as u64)
    }

    pub fn block_start(&self, b: BlockIdx) -> Bytes {
        Bytes(b.0 * self.block_size as u64)
    }

    /// The allocation unit: the chunk, or the whole disk without a table.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_size.map(u64::from).unwrap_or(self.virtual_size.0)
    }

    pub fn chunk_of(&self, off: Bytes) -> ChunkIdx {
        match self.chunk_size {
            Some(c) => ChunkIdx(off.0 / c as u64),
            None => ChunkIdx(0),
        }
    }

    /// The largest storage the image can ever need: every chunk allocated
    /// (with a table), or the whole disk at `data_offset` (without).
    pub fn max_storage_size(&self) -> u64 {
        let data = if self.has_table() { self.phys_chunks * self.chunk_bytes() } else { self.virtual_size.0 };
        self.data_offset + data
    }

    /// Bytes of metadata (header, table, bitmap), without the journal.
    pub fn metadata_bytes(&self) -> u64 {
        HEADER_AREA + self.table_len + self.bitmap_len
    }

    /// A fresh header for this geometry.
    pub fn header(&self, base_format: super::BaseFormat, base_path: &str) -> Header {
        Header {
            incompat: if self.has_table() { INCOMPAT_TABLE } else { 0 }
                | INCOMPAT_JOURNAL_POS
                | INCOMPAT_JOURNAL_DUP
                | if self.twin_offset.is_some() { INCOMPAT_META_TWIN } else { 0 },
            compat: 0,
            flags: 0,
            virtual_size: self.virtual_size.0,
            block_size: self.block_size,
            chunk_size: self.chunk_size.unwrap_or(0),
            table_offset: self.table_offset,
            table_len: self.table_len,
            bitmap_offset: self.bitmap_offset,
            bitmap_len: self.bitmap_len,
            journal_offset: self.journal_offset,
            journal_len: self.journal_len,
            data_offset: self.data_offset,
            journal_seq: 1,
            base_size: self.base_size.0,
            base_format,
            base_path: base_path.to_string(),
            generation: 0,
            prefetch_cursor: 0,
            session: 0,
            initialised_end: 0,
            uuid: super::header::new_uuid(),
            base_uuid: [0; 16],
            base_fingerprint: 0,
            commit_depth: 0,
            resize_chunks: 0,
            meta_copy: 0,
            // What an all-zero table and bitmap give (create's starting point).
            meta_sums: if self.twin_offset.is_some() {
                super::twin::sums(&vec![0u8; self.meta_len() as usize])
            } else {
                Vec::new()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BaseFormat;

    fn tib() -> CreateParams {
        CreateParams {
            virtual_size: 1 << 40,
            block_size: 64 << 10,
            chunk_size: Some(1 << 20),
            base_size: 1 << 40,
            journal_len: 16 << 20,
        }
    }

    #[test]
    fn one_tib_over_one_tib_base_needs_about_six_mib() {
        let g = Geometry::new(&tib()).unwrap();
        assert_eq!(g.table_len, 4 << 20);
        assert_eq!(g.bitmap_len, 2 << 20);
        assert!(g.metadata_bytes() <= (61 << 20) / 10, "{}", g.metadata_bytes());
    }

    #[test]
    fn header_geometry_round_trips() {
        let g = Geometry::new(&tib()).unwrap();
        let h = g.header(BaseFormat::Raw, "b");
        assert_eq!(Geometry::from_header(&h, g.data_offset).unwrap(), g);
    }

    #[test]
    fn overlapping_regions_are_rejected() {
        let g = Geometry::new(&tib()).unwrap();
        let mut h = g.header(BaseFormat::Raw, "b");
        h.bitmap_offset = h.table_offset + 4096;
        assert!(matches!(Geometry::from_header(&h, u64::MAX), Err(LayoutError::BadRegion { region: "bitmap", .. })));
        let h = g.header(BaseFormat::Raw, "b");
        assert!(matches!(Geometry::from_header(&h, 4096), Err(LayoutError::BeyondStorage { .. })));
    }

    #[test]
    fn bad_shapes_are_rejected() {
        let mut p = tib();
        p.block_size = 3000;
        assert!(Geometry::new(&p).is_err());
        let mut p = tib();
        p.chunk_size = Some(32 << 10);
        assert!(Geometry::new(&p).is_err());
        let mut p = tib();
        p.base_size = 2 << 40;
        assert!(Geometry::new(&p).is_err());
        let mut p = tib();
        p.virtual_size = 1000;
        assert!(Geometry::new(&p).is_err());
    }

    /// Every region length is what the geometry needs, nothing more: a forged
    /// length is refused before anything of that size is allocated.
    #[test]
    fn region_lengths_are_bounded_by_the_geometry() {
        let g = Geometry::new(&tib()).unwrap();
        let h = g.header(BaseFormat::Raw, "b");
        let err = |f: &dyn Fn(&mut Header)| {
            let mut h = h.clone();
            f(&mut h);
            Geometry::from_header(&h, u64::MAX).unwrap_err()
        };
        // Table: a huge length, and one block more or less than needed.
        for len in [1 << 39, (4 << 20) + 4096, (4 << 20) - 4096, u64::MAX - 4095] {
            assert_eq!(
                err(&|h| h.table_len = len),
                LayoutError::BadRegionLength { region: "table", offset: 8192, len, need: 4 << 20 }
            );
        }
        let off = g.bitmap_offset;
        for len in [1 << 39, (2 << 20) + 4096, 0] {
            assert_eq!(
                err(&|h| h.bitmap_len = len),
                LayoutError::BadRegionLength { region: "bitmap", offset: off, len, need: 2 << 20 }
            );
        }
        for len in [1 << 39, MAX_JOURNAL + META_BLOCK, u64::MAX, 4096, MIN_JOURNAL + 1] {
            assert_eq!(err(&|h| h.journal_len = len), LayoutError::BadJournalSize(len));
        }
        // The messages give the numbers in hex.
        let m = err(&|h| h.table_len = 1 << 39).to_string();
        assert!(m.contains("table region at 0x2000+0x8000000000") && m.contains("0x400000"), "{m}");
        let m = err(&|h| h.journal_len = 1 << 39).to_string();
        assert!(m.contains("journal size 0x8000000000") && m.contains("1 GiB"), "{m}");
        // No table, no base: both regions are empty.
        let raw = Geometry::new(&CreateParams { chunk_size: None, base_size: 0, ..tib() }).unwrap();
        assert_eq!((raw.table_len, raw.bitmap_len), (0, 0));
        let mut h = raw.header(BaseFormat::None, "");
        h.table_len = 4096;
        assert!(matches!(
            Geometry::from_header(&h, u64::MAX),
            Err(LayoutError::BadRegionLength { region: "table", .. })
        ));
    }

    #[test]
    fn journal_size_is_bounded_at_create_and_open() {
        let g = Geometry::new(&CreateParams { journal_len: MAX_JOURNAL, ..tib() }).unwrap();
        let h = g.header(BaseFormat::Raw, "b");
        assert_eq!(Geometry::from_header(&h, u64::MAX).unwrap(), g);
        for len in [MAX_JOURNAL + META_BLOCK, 1 << 40, 4096, 5000] {
            assert_eq!(
                Geometry::new(&CreateParams { journal_len: len, ..tib() }),
                Err(LayoutError::BadJournalSize(len))
            );
        }
    }

    /// The data starts exactly at the aligned end of the journal.
    #[test]
    fn data_offset_is_the_aligned_end_of_the_metadata() {
        let g = Geometry::new(&tib()).unwrap();
        let expected = g.data_offset;
        for off in [expected + (1 << 20), expected - (1 << 20), expected + 4096, 1 << 50, u64::MAX] {
            let mut h = g.header(BaseFormat::Raw, "b");
            h.data_offset = off;
            assert_eq!(
                Geometry::from_header(&h, u64::MAX),
                Err(LayoutError::BadDataOffset { offset: off, expected }),
                "{off:#x}"
            );
        }
        // Without a table the data is 1 MiB aligned.
        let raw = Geometry::new(&CreateParams { chunk_size: None, journal_len: 12288, ..tib() }).unwrap();
        assert_eq!(raw.data_offset % (1 << 20), 0);
        let mut h = raw.header(BaseFormat::Raw, "b");
        assert_eq!(Geometry::from_header(&h, u64::MAX).unwrap(), raw);
        h.data_offset = raw.journal_offset + raw.journal_len;
        assert!(matches!(Geometry::from_header(&h, u64::MAX), Err(LayoutError::BadDataOffset { .. })));
        let m = Geometry::from_header(&h, u64::MAX).unwrap_err().to_string();
        assert!(m.contains(&format!("{:#x}", raw.data_offset)), "{m}");
    }

    /// An image from before the twin: the same header without it.
    fn legacy(mut h: Header) -> Header {
        h.incompat &= !crate::format::header::INCOMPAT_META_TWIN;
        h.meta_sums.clear();
        h.data_offset = (h.journal_offset + h.journal_len).next_multiple_of(h.chunk_size.max(1 << 20) as u64);
        h
    }

    #[test]
    fn the_twin_follows_the_journal_and_its_checksums_match_the_stripes() {
        let g = Geometry::new(&CreateParams { virtual_size: 64 << 20, base_size: 32 << 20, ..tib() }).unwrap();
        let t = g.twin_offset.expect("a twin");
        assert_eq!(t, g.journal_offset + g.journal_len);
        assert_eq!(g.span_len(), g.table_len + g.bitmap_len);
        assert_eq!(g.data_offset, (t + g.span_len()).next_multiple_of(1 << 20));
        assert_eq!(g.copy_offsets(0), (g.table_offset, g.bitmap_offset));
        assert_eq!(g.copy_offsets(1), (t, t + g.table_len));
        let mut h = g.header(BaseFormat::Raw, "b");
        assert!(h.has_twin());
        assert_eq!(h.meta_sums.len(), 2, "one stripe each for the table's block and the bitmap's");
        assert_eq!(Geometry::from_header(&h, u64::MAX).unwrap(), g);
        h.meta_sums.push(0);
        assert_eq!(Geometry::from_header(&h, u64::MAX), Err(LayoutError::BadStripeSums { found: 3, need: 2 }));
        // Nothing to keep: no twin.
        let raw = Geometry::new(&CreateParams { chunk_size: None, base_size: 0, ..tib() }).unwrap();
        assert_eq!(raw.twin_offset, None);
        assert!(!raw.header(BaseFormat::None, "").has_twin());
    }

    /// A resize may leave room between regions (below the table, after it), and
    /// while one is under way `resize_chunks` extends the physical chunks.
    #[test]
    fn gaps_between_regions_and_an_interrupted_resize() {
        let g = Geometry::new(&CreateParams { virtual_size: 64 << 20, base_size: 32 << 20, ..tib() }).unwrap();
        let mut h = legacy(g.header(BaseFormat::Raw, "b"));
        let shift = 32u64 << 20;
        h.table_offset += shift;
        h.bitmap_offset += shift + (1 << 20);
        h.journal_offset += shift + (1 << 20);
        h.data_offset = (h.journal_offset + h.journal_len).next_multiple_of(1 << 20);
        let moved = Geometry::from_header(&h, u64::MAX).unwrap();
        assert_eq!((moved.phys_chunks, moved.table_len), (64, 4096));
        assert_eq!(moved.max_storage_size(), h.data_offset + (64 << 20));
        h.incompat |= crate::format::header::INCOMPAT_RESIZING;
        h.resize_chunks = 70;
        let resizing = Geometry::from_header(&h, u64::MAX).unwrap();
        assert_eq!(resizing.phys_chunks, 70);
        assert_eq!(resizing.max_storage_size(), h.data_offset + (70 << 20));
        for n in [0, 63, u32::MAX] {
            h.resize_chunks = n;
            assert!(matches!(Geometry::from_header(&h, u64::MAX), Err(LayoutError::BadResizeChunks { .. })), "{n}");
        }
    }

    /// Offsets near the top of the address space give an error, not an overflow.
    #[test]
    fn offsets_at_the_end_of_the_address_space_are_rejected() {
        let g = Geometry::new(&tib()).unwrap();
        let mut h = g.header(BaseFormat::Raw, "b");
        h.journal_offset = u64::MAX - 4095;
        assert!(matches!(Geometry::from_header(&h, u64::MAX), Err(LayoutError::BadRegion { region: "journal", .. })));
        let mut h = g.header(BaseFormat::Raw, "b");
        h.journal_offset = u64::MAX - (16 << 20) - 4095;
        assert!(matches!(Geometry::from_header(&h, u64::MAX), Err(LayoutError::BadRegion { region: "twin", .. })));
        let mut h = legacy(g.header(BaseFormat::Raw, "b"));
        h.journal_offset = u64::MAX - (16 << 20) - 4095;
        h.data_offset = 0;
        assert_eq!(
            Geometry::from_header(&h, u64::MAX),
            Err(LayoutError::BadDataOffset { offset: 0, expected: u64::MAX })
        );
    }
}
