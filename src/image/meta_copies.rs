//! The table and the bitmap on storage: read from both copies and checked
//! against the header's stripe checksums (see [`crate::format::twin`]), and the
//! writes that put a new table and bitmap into one copy.

use super::ImageError;
use crate::format::twin::{self, StripeFault};
use crate::format::{self, BitmapBits, Geometry, Header};
use crate::storage::Storage;

/// What [`read`] found.
pub(crate) struct MetaRead {
    pub table: Vec<u32>,
    pub bitmap: BitmapBits,
    /// Stripes not good in one copy (repairable) or in both (lost).
    pub faults: Vec<StripeFault>,
    /// With a header slot lost and stripes taken because both copies agree:
    /// the checksums of what was taken, for the header (so that the lost slot,
    /// rewritten from it, describes the copies again).
    pub resummed: Option<Vec<u32>>,
}

/// The metadata stream of a table and bitmap (table bytes, then bitmap bytes,
/// each padded to its region's length).
pub(crate) fn stream(geo: &Geometry, table: &[u32], bitmap: &BitmapBits) -> Vec<u8> {
    let mut m = format::encode_table(table, geo.table_len as usize);
    m.extend_from_slice(&format::encode_bitmap(bitmap, geo.bitmap_len as usize));
    m
}

/// The writes that put `stream` into copy `copy`: (storage offset, byte range
/// of the stream), the table's then the bitmap's.
pub(crate) fn copy_writes(geo: &Geometry, copy: u32, len: usize) -> Vec<(u64, std::ops::Range<usize>)> {
    let (t, b) = geo.copy_offsets(copy);
    let tl = geo.table_len as usize;
    let mut w = Vec::with_capacity(2);
    if tl > 0 {
        w.push((t, 0..tl));
    }
    if len > tl {
        w.push((b, tl..len));
    }
    w
}

/// Where bytes `r` of the metadata stream lie in copy `copy`: (storage
/// offset, byte range of the stream), split where `r` crosses from the table
/// into the bitmap.
pub(crate) fn extents(geo: &Geometry, copy: u32, r: std::ops::Range<usize>) -> Vec<(u64, std::ops::Range<usize>)> {
    let tl = geo.table_len as usize;
    let (t, b) = geo.copy_offsets(copy);
    let mut w = Vec::with_capacity(2);
    if r.start < tl {
        let end = r.end.min(tl);
        w.push((t + r.start as u64, r.start..end));
    }
    if r.end > tl {
        let start = r.start.max(tl);
        w.push((b + (start - tl) as u64, start..r.end));
    }
    w
}

/// The writes that repair the stripes `faults` names in their copies, from
/// `stream` (the chosen, good bytes): (storage offset, byte range of the stream).
pub(crate) fn repair_writes(geo: &Geometry, faults: &[StripeFault]) -> Vec<(u64, std::ops::Range<usize>)> {
    faults.iter().filter(|f| f.repairable).flat_map(|f| extents(geo, f.copy, f.range.clone())).collect()
}

/// Where a stripe lies on storage, for messages: "table block at 0x…" or
/// "bitmap block at 0x…" (its first byte, in the copy the fault is in).
pub(crate) fn describe(geo: &Geometry, f: &StripeFault) -> String {
    let (t, b) = geo.copy_offsets(f.copy);
    let tl = geo.table_len as usize;
    let copy = if f.copy == 0 { "the first copy" } else { "the twin copy" };
    if f.range.start < tl {
        format!("table stripe {} at {:#x} ({copy})", f.stripe, t + f.range.start as u64)
    } else {
        format!("bitmap stripe {} at {:#x} ({copy})", f.stripe, b + (f.range.start - tl) as u64)
    }
}

/// The guest bytes whose metadata a lost stripe held: [start, end).
pub(crate) fn guest_range(geo: &Geometry, f: &StripeFault) -> (u64, u64) {
    let tl = geo.table_len as usize;
    let clamp = |v: u64| v.min(geo.virtual_size.0);
    let mut lo = u64::MAX;
    let mut hi = 0;
    if f.range.start < tl && geo.has_table() {
        let c = geo.chunk_bytes();
        lo = lo.min(clamp(f.range.start as u64 / 4 * c));
        hi = hi.max(clamp(f.range.end.min(tl) as u64 / 4 * c));
    }
    if f.range.end > tl {
        let bs = geo.block_size as u64;
        let from = (f.range.start.max(tl) - tl) as u64 * 8;
        let to = (f.range.end - tl) as u64 * 8;
        lo = lo.min(clamp(from * bs));
        hi = hi.max(clamp(to * bs).min(geo.base_size.0));
    }
    (lo.min(hi), hi)
}

/// Reads the table and the bitmap: the current copy, and with a twin, the twin
/// too, every stripe checked (see [`crate::format::twin`]). Without a twin the
/// one copy is taken as it is (an image from before the twin).
///
/// `header_lost`: a header slot is not valid, so the header read may be older
/// than the last checkpoint, whose checksums went with the lost slot. A stripe
/// good in neither copy is then taken when both copies hold the same bytes
/// (both were written by that checkpoint) rather than refused.
pub(crate) fn read(s: &dyn Storage, geo: &Geometry, h: &Header, header_lost: bool) -> Result<MetaRead, ImageError> {
    let len = geo.meta_len() as usize;
    let read_copy = |copy: u32| -> Result<Vec<u8>, ImageError> {
        let mut m = vec![0u8; len];
        for (off, r) in copy_writes(geo, copy, len) {
            s.read_at(&mut m[r], off).map_err(|source| ImageError::Io {
                path: s.name().to_string(),
                what: "metadata read",
                offset: off,
                source,
            })?;
        }
        Ok(m)
    };
    let cur = if h.has_twin() { h.meta_copy } else { 0 };
    let mut resummed = None;
    let current = read_copy(cur)?;
    let (chosen, faults) = if h.has_twin() {
        let other = read_copy(1 - cur)?;
        let (chosen, mut faults) = twin::choose(&current, &other, cur, &h.meta_sums);
        if header_lost {
            let before = faults.len();
            faults.retain(|f| f.repairable || current[f.range.clone()] != other[f.range.clone()]);
            if faults.len() < before {
                resummed = Some(twin::sums(&chosen));
            }
        }
        (chosen, faults)
    } else {
        (current, Vec::new())
    };
    let tl = geo.table_len as usize;
    Ok(MetaRead {
        table: format::decode_table(&chosen[..tl], geo.chunks() as usize),
        bitmap: format::decode_bitmap(&chosen[tl..], geo.base_blocks()),
        faults,
        resummed,
    })
}

/// Sets the header fields of a twin image for a new current copy holding `stream`.
pub(crate) fn point_header_at(h: &mut Header, copy: u32, stream: &[u8]) {
    if h.has_twin() {
        h.meta_copy = copy;
        h.meta_sums = twin::sums(stream);
    }
}

/// The error for a stripe no copy has good.
pub(crate) fn lost_error(s: &dyn Storage, geo: &Geometry, f: &StripeFault) -> ImageError {
    let (lo, hi) = guest_range(geo, f);
    ImageError::Invalid {
        path: s.name().to_string(),
        why: format!(
            "the {} is damaged in both copies of the metadata (its checksum matches neither): the metadata of \
             guest bytes {lo:#x}..{hi:#x} is lost. 'fvd check' reports it; 'fvd check --repair' keeps what can be \
             trusted and names what may be lost",
            describe(geo, f)
        ),
    }
}

/// Writes `stream` into copy `copy` with plain storage calls (offline tools),
/// then syncs.
pub(crate) fn write_copy_sync(s: &dyn Storage, geo: &Geometry, copy: u32, stream: &[u8]) -> Result<(), ImageError> {
    for (off, r) in copy_writes(geo, copy, stream.len()) {
        s.write_at(&stream[r], off).map_err(|source| ImageError::Io {
            path: s.name().to_string(),
            what: "metadata write",
            offset: off,
            source,
        })?;
    }
    s.sync().map_err(|source| ImageError::Io { path: s.name().to_string(), what: "fdatasync", offset: 0, source })
}

/// A read-write open of an image with repairable faults: every stripe a copy
/// has bad is written from the good stream (as checkpointed), then synced.
pub(crate) fn repair(s: &dyn Storage, l: &super::open::Loaded) -> Result<(), ImageError> {
    let Some(stream) = &l.meta_stream else { return Ok(()) };
    for f in &l.meta_faults {
        tracing::warn!(image = %s.name(), "the {} did not match its checksum: rewritten from the other copy", describe(&l.geo, f));
    }
    for (off, r) in repair_writes(&l.geo, &l.meta_faults) {
        s.write_at(&stream[r], off).map_err(|source| ImageError::Io {
            path: s.name().to_string(),
            what: "metadata repair",
            offset: off,
            source,
        })?;
    }
    s.sync().map_err(|source| ImageError::Io { path: s.name().to_string(), what: "fdatasync", offset: 0, source })
}
