//! The FVD on-disk format (normative specification).
//!
//! This module turns bytes into validated structs and back. It does no I/O.
//!
//! # Layout
//!
//! All integers are little-endian. An image is one file or block device:
//!
//! | region  | offset                 | length                                   |
//! |---------|------------------------|------------------------------------------|
//! | header  | 0 and 4096 (two slots) | 2 × 4096                                 |
//! | table   | `table_offset`         | `table_len` (0 when the table is off)    |
//! | bitmap  | `bitmap_offset`        | `bitmap_len` (0 without a base)          |
//! | journal | `journal_offset`       | `journal_len`, a multiple of 4096, 8 KiB to 1 GiB |
//! | twin    | `journal_offset + journal_len` (incompatible bit 4 only) | `journal_offset - table_offset`: a second copy of the table and bitmap (see [`twin`]) |
//! | data    | `data_offset`          | to the end of the storage                |
//!
//! Regions are 4096-aligned, start at or after 8192, in this order, and do not overlap; `data_offset` is
//! aligned to the chunk size (to 1 MiB when the table is off) so that chunks and
//! guest blocks sit on host-filesystem block boundaries.
//!
//! There may be unused space before the table and between the table and the
//! bitmap (the journal without a base); nothing reads it. Create leaves none;
//! a resize that moves the metadata (see Resize below) leaves the old metadata
//! area before the table, and room for the table to grow after it.
//!
//! Every region is bounded by what the geometry (virtual size, block size,
//! chunk size, base size) needs, and open refuses a header that says
//! otherwise, before reading any region:
//!
//! - `table_len` is exactly `align_up(4 × chunks, 4096)`;
//! - `bitmap_len` is exactly `align_up(⌈base blocks / 8⌉, 4096)`;
//! - `journal_len` is a multiple of 4096 from 8 KiB to 1 GiB (open reads the
//!   whole journal into memory when the image is dirty);
//! - `data_offset` is exactly the journal's end (with incompatible bit 4, the
//!   twin's end) rounded up to the chunk size (to 1 MiB when the table is off);
//! - with incompatible bit 4, `meta_sums` holds exactly as many checksums as the
//!   table and bitmap have stripes (see [`twin`]);
//! - `data_offset` is at most the size of the storage.
//!
//! These are the lengths create has always written, so every image satisfies them.
//!
//! # Header (two 4096-byte slots at offsets 0 and 4096)
//!
//! A header write goes to the slot the current one is not in, with the
//! generation incremented; open uses the valid slot with the highest
//! generation. A torn header write therefore leaves the previous header intact.
//!
//! Create writes both slots (generation 0 in slot 0, generation 1 in slot 1),
//! so an image always has two valid slots, and a valid header sits in slot
//! `generation % 2`. A slot that fails to decode (magic, checksum, version,
//! fields) or holds a generation that belongs in the other slot is not valid:
//! a header write a crash tore, or damage. The image then opens from the other
//! slot, and the next header write goes to the bad one and replaces it; until
//! then `fvd check` reports it as corruption (exit status 2), and `fvd check
//! --repair` writes the current header into it with the next generation that
//! belongs in that slot, never over the current one. With neither slot valid
//! the image does not open.
//!
//! | off  | size | field                 | meaning                                              |
//! |------|------|-----------------------|------------------------------------------------------|
//! | 0    | 8    | magic                 | `b"FVD\0img\x01"`                                    |
//! | 8    | 4    | version               | 1                                                    |
//! | 12   | 4    | header_len            | 4096                                                 |
//! | 16   | 8    | incompatible features | bit 0: table present; bit 1: resizing (a resize that moves the metadata is under way: table entries may name physical chunks below `resize_chunks`); bit 2: journal positions (journal blocks carry their position within their commit, so damage is told from a torn end; set at create and by every header write of a writer that has it); bit 3: journal in two copies (every journal block written twice, side by side: see [`journal`]; set at create and at a checkpoint, where a new log starts); bit 4: twin (the table and bitmap in two checksummed copies, see [`twin`]; set at create, or by `fvd upgrade`, which moves the metadata of an older image into a layout with the twin as a resize moves it); other bits must be 0 to open |
//! | 24   | 8    | compatible features   | bit 0 prefetched (base fully copied: never opened again), bit 1 copy-on-read by default, bit 2 prefetch by default; unknown bits ignored |
//! | 32   | 8    | flags                 | bit 0: dirty (not cleanly closed: replay the journal); bit 1: frozen (a snapshot layer: write-opens refused); bit 2: invalid (a commit changed a layer below it: never opened again); bit 3: committing (a commit from this image down its chain is under way: identity checks of the layers below are relaxed) |
//! | 40   | 8    | virtual_size          | guest-visible bytes, multiple of 512                 |
//! | 48   | 4    | block_size            | copy-on-write block, power of two, 4 KiB–1 MiB        |
//! | 52   | 4    | chunk_size            | allocation unit, power-of-two multiple of the block, ≤ 64 MiB; 0 when the table is off |
//! | 56   | 8    | table_offset          |                                                      |
//! | 64   | 8    | table_len             | 4 × number of chunks, rounded up to 4096             |
//! | 72   | 8    | bitmap_offset         |                                                      |
//! | 80   | 8    | bitmap_len            | ⌈base blocks / 8⌉, rounded up to 4096                |
//! | 88   | 8    | journal_offset        |                                                      |
//! | 96   | 8    | journal_len           | multiple of 4096, 8192 to 2^30                       |
//! | 104  | 8    | data_offset           | journal end rounded up to the chunk size (1 MiB without a table) |
//! | 112  | 8    | journal_seq           | sequence number of the first valid journal block      |
//! | 120  | 8    | base_size             | the base's size at create time (0: no base)          |
//! | 128  | 4    | base_format           | 0 none, 1 raw, 2 fvd                                 |
//! | 132  | 2    | base_path_len         | ≤ 1024                                               |
//! | 134  | 2    | reserved              | 0                                                    |
//! | 136  | 4    | reserved              | written 0, ignored on read (writers before this rule stored the chunk high-water mark of the last checkpoint; it is recomputed from the table at open) |
//! | 140  | 4    | reserved              | 0                                                    |
//! | 144  | 8    | generation            | header write counter; slot = generation % 2           |
//! | 152  | ≤1024| base_path             | UTF-8; relative paths are relative to the image's folder |
//! | 1176 | 8    | prefetch_cursor       | every base block below this index is in the image, whatever the bitmap says |
//! | 1184 | 8    | session               | the writer whose volatile log (in RAM, see `image::volatile`) may extend the journal; 0 none |
//! | 1192 | 8    | initialised_end       | plain block devices: every storage byte below this that the image has not written reads as zeros (zeroed as first used, or punched at recovery); bytes at or past it are never read (they read as zeros); 0: not kept (files and LVs read unused space as zeros) |
//! | 1200 | 16   | uuid                  | this image's identity, random at create (RFC 4122 v4); zeros: an image from before identities |
//! | 1216 | 16   | base_uuid             | an fvd base's `uuid` as recorded at create or rebase; zeros: a raw base, or none recorded |
//! | 1232 | 8    | base_fingerprint      | a raw base's fingerprint (CRC-32 of its size and 16 sampled 4 KiB blocks, see `image::identity`) as recorded; 0: none recorded |
//! | 1240 | 4    | commit_depth          | with flag bit 3: the layer a commit writes into (1 the base, 2 the base's base, ...); 0 otherwise |
//! | 1244 | 4    | resize_chunks         | with incompatible bit 1: how many physical chunks table entries may name (at least the number of chunks, below 2^32); 0 otherwise |
//! | 1248 | 4    | meta_copy             | with incompatible bit 4: the current copy of the table and bitmap (0 the regions at `table_offset`/`bitmap_offset`, 1 the twin); 0 otherwise |
//! | 1252 | 2    | meta_stripes          | with incompatible bit 4: the number `n` of stripe checksums that follow (≤ 704); 0 otherwise |
//! | 1254 | 2    | reserved              | 0                                                    |
//! | 1256 | 4×n  | meta_sums             | CRC-32 (IEEE) of each stripe of the current copy's table and bitmap (see [`twin`]) |
//! | 4092 | 4    | crc32                 | CRC-32 (IEEE) of bytes 0..4092                       |
//!
//! # Table
//!
//! (With incompatible bit 4 the table and the bitmap below are kept twice and
//! checked against the header's stripe checksums: see [`twin`].)
//!
//! One `u32` per virtual chunk: 0 means unallocated, `p + 1` means the chunk's
//! data lives at `data_offset + p × chunk_size`. No two entries may name the same
//! `p`, and `p` is below the number of chunks (below `resize_chunks` while
//! incompatible bit 1 is set). Without a table, guest offset X lives at
//! `data_offset + X` (raw layout).
//!
//! # Bitmap
//!
//! One bit per block of the base (`⌈base_size / block_size⌉` bits), bit `i` at
//! byte `i / 8`, bit `i % 8` (least significant first). A set bit means the
//! block's current data is in the image; a clear bit means it is still in the
//! base. Blocks at or beyond the base's size have no bit: they are always in the
//! image (zeros when never written or unallocated). Bits are only ever set. A
//! set bit whose chunk is unallocated reads as zeros: create presets the bits
//! of base blocks that are holes or all zeros, so they never need a copy.
//! Copy-on-read and prefetch never set bits on storage (the base does not
//! change, so "in the base" stays true); prefetch progress is the header's
//! `prefetch_cursor`, written at checkpoints after the copied data is durable.
//!
//! # Journal
//!
//! A ring-less log of 4096-byte blocks that starts at block 0 of the region after
//! every checkpoint (with incompatible bit 3, every block twice: block `i` in
//! the region's slots `2i` and `2i + 1`). Block `i` is valid when its magic and
//! CRC match (in either copy) and its sequence number is `journal_seq + i`; replay stops at the first block that is
//! not valid, so a torn, stale or never-written block is never applied. See
//! [`journal`] for the block and record tables.
//!
//! Every checkpoint advances `journal_seq` by the number of blocks in the region
//! (`journal_len / 4096`), never by fewer. A block written under the old value
//! carries a sequence below the new one, so no block left in the region (one a
//! replay applied, or one past a torn block that a replay never reached) is ever
//! valid again: replay after a later crash sees only blocks written since.

//!
//! # Resize
//!
//! A resize only grows the virtual size; the bitmap (the base's blocks) and the
//! journal keep their lengths. The raw layout changes the header alone. With a
//! table, `table_len` follows the new number of chunks: in place while
//! `table_offset + table_len` stays at or before the next region, else the
//! metadata moves to the start of the data area: the new `table_offset` is the
//! old `data_offset`, the bitmap and the journal end `k` chunks later at the new
//! `data_offset`, and every entry `p + 1` becomes `p + 1 - k` (chunks in the
//! first `k` slots are copied to free slots first). Until the one header write
//! that switches the geometry, the image keeps its old geometry and is marked
//! dirty, so a crash is recovered as any other; when it has fewer than `k` free
//! chunks, the copies go past its number of chunks and the header carries
//! incompatible bit 1 with `resize_chunks` meanwhile, which a reader without
//! it refuses rather than misread the table. Images without bit 1 are what
//! every earlier writer wrote, and read as before.

pub mod header;
pub mod journal;
pub mod layout;
pub mod twin;

use bitvec::order::Lsb0;
use bitvec::vec::BitVec;

pub use header::{BaseFormat, Header, HeaderError};
pub use journal::{JournalBlock, JournalError, Record};
pub use layout::{Geometry, LayoutError};

/// Size of a header slot and of a journal block.
pub const META_BLOCK: u64 = 4096;
/// The two header slots.
pub const HEADER_AREA: u64 = 2 * META_BLOCK;

pub(crate) fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Decodes a table region into entries (4 bytes each).
pub fn decode_table(bytes: &[u8], entries: usize) -> Vec<u32> {
    bytes.chunks_exact(4).take(entries).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Encodes table entries, padded with zeros to `len` bytes.
pub fn encode_table(entries: &[u32], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, e) in entries.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&e.to_le_bytes());
    }
    out
}

/// The persisted bitmap, one bit per base block (bit i is block i). Held in
/// `u64` words, least significant bit first, so that word w written little
/// endian is bytes `8w..8w+8` of the region: bit i is byte i/8, bit i%8.
/// Bits past the length are kept zero in the last word.
pub type BitmapBits = BitVec<u64, Lsb0>;

/// Decodes a bitmap region holding `bits` bits. Bytes missing from the region
/// read as zeros; bits stored past `bits` are not part of the bitmap and are
/// ignored.
pub fn decode_bitmap(bytes: &[u8], bits: u64) -> BitmapBits {
    let words = bits.div_ceil(64) as usize;
    let mut out = vec![0u64; words];
    for (i, w) in out.iter_mut().enumerate() {
        let mut a = [0u8; 8];
        let start = i * 8;
        let end = (start + 8).min(bytes.len());
        if start < end {
            a[..end - start].copy_from_slice(&bytes[start..end]);
        }
        *w = u64::from_le_bytes(a);
    }
    let mut out = BitmapBits::from_vec(out);
    out.truncate(bits as usize);
    // Whatever is stored past the end is not part of the bitmap.
    out.set_uninitialized(false);
    out
}

// bitmap := word:u64{⌈bits/64⌉} zero-pad (word w holds bits 64w.., least significant first)
/// Encodes a bitmap, padded with zeros to `len` bytes (cut at `len`).
pub fn encode_bitmap(bits: &BitmapBits, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, w) in bits.as_raw_slice().iter().enumerate() {
        let b = w.to_le_bytes();
        let start = i * 8;
        let n = 8.min(len.saturating_sub(start));
        out[start..start + n].copy_from_slice(&b[..n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips() {
        let t = vec![0, 5, 1, u32::MAX];
        let b = encode_table(&t, 4096);
        assert_eq!(b.len(), 4096);
        assert_eq!(decode_table(&b, 4), t);
    }

    #[test]
    fn bitmap_round_trips_and_masks_tail() {
        let w = BitmapBits::from_vec(vec![u64::MAX, 0x5]);
        let b = encode_bitmap(&w, 16);
        assert_eq!(decode_bitmap(&b, 128), w);
        let cut = decode_bitmap(&b, 66);
        assert_eq!((cut.len(), cut.as_raw_slice()), (66, &[u64::MAX, 0x1][..]));
        // bit i is byte i/8, bit i%8
        assert_eq!(b[8], 0x5);
        // Too short a region reads as zeros past its end.
        assert_eq!(decode_bitmap(&b[..4], 100), {
            let mut v = BitmapBits::repeat(false, 100);
            v[..32].fill(true);
            v
        });
    }

    proptest::proptest! {
        #[test]
        fn bitmap_encode_decode_round_trips(
            set in proptest::collection::vec(0usize..5000, 0..64),
            bits in 0usize..5000,
            pad in 0usize..64,
        ) {
            let mut b = BitmapBits::repeat(false, bits);
            for i in set.into_iter().filter(|&i| i < bits) {
                b.set(i, true);
            }
            let len = bits.div_ceil(8) + pad;
            let bytes = encode_bitmap(&b, len);
            proptest::prop_assert_eq!(bytes.len(), len);
            for i in 0..bits {
                proptest::prop_assert_eq!(bytes[i / 8] >> (i % 8) & 1 == 1, b[i]);
            }
            proptest::prop_assert!(bytes[bits.div_ceil(8)..].iter().all(|&x| x == 0));
            proptest::prop_assert_eq!(decode_bitmap(&bytes, bits as u64), b);
        }
    }
}
