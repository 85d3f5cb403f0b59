//! Header edits and emptying of a closed image, straight on its storage: what
//! commit and rebase do to layers they do not hold open.

use super::open::{read_header_slots, slot_offset};
use super::ImageError;
use crate::format::{Geometry, Header};
use crate::storage::Storage;

fn io_err(s: &dyn Storage, what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = s.name().to_string();
    move |source| ImageError::Io { path, what, offset, source }
}

/// Changes the header of a closed image: the next generation goes to the other
/// slot and is synced, so a crash leaves the old header or the new one.
pub fn edit_header(s: &dyn Storage, change: impl FnOnce(&mut Header)) -> Result<Header, ImageError> {
    let mut h = read_header_slots(s)?.current;
    change(&mut h);
    h.generation += 1;
    let off = slot_offset((h.generation % 2) as usize);
    s.write_at(&h.encode(), off).map_err(io_err(s, "header write", off))?;
    s.sync().map_err(io_err(s, "fdatasync", off))?;
    Ok(h)
}

/// Empties a closed image whose base holds everything it reads (after a commit):
/// every block reads from the base again and its storage is released.
///
/// Order: the bitmap first (a block whose bit is clear reads from the base,
/// whatever its chunk holds), then the header's prefetch progress, then the
/// table, then the data is punched. A crash between any two steps leaves an
/// image that reads the same; running it again completes it. With a twin, the
/// table and bitmap are emptied by one switch of copies instead.
pub fn empty(s: &dyn Storage) -> Result<(), ImageError> {
    let h = read_header_slots(s)?.current;
    let geo = Geometry::from_header(&h, s.size())
        .map_err(|source| ImageError::Layout { path: s.name().to_string(), source })?;
    let zero_region = |off: u64, len: u64, what: &'static str| -> Result<(), ImageError> {
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(zeros.len() as u64) as usize;
            s.write_at(&zeros[..n], pos).map_err(io_err(s, what, pos))?;
            pos += n as u64;
        }
        s.sync().map_err(io_err(s, "fdatasync", off))
    };
    if h.has_twin() {
        // The copy that is not current is emptied, then one header write makes
        // it current (with its checksums), then the other is emptied: a crash
        // leaves the old copy or the empty one (see `format::twin`).
        let empty = vec![0u8; geo.meta_len() as usize];
        let next = 1 - h.meta_copy;
        super::meta_copies::write_copy_sync(s, &geo, next, &empty)?;
        // Dirty until the other copy is emptied too: a cut before leaves an
        // image whose next open rewrites it, never a clean one with a stale twin.
        let was_dirty = h.is_dirty();
        edit_header(s, |h| {
            h.prefetch_cursor = 0;
            h.compat &= !crate::format::header::COMPAT_PREFETCHED;
            h.flags |= crate::format::header::FLAG_DIRTY;
            super::meta_copies::point_header_at(h, next, &empty);
        })?;
        super::meta_copies::write_copy_sync(s, &geo, 1 - next, &empty)?;
        if !was_dirty {
            edit_header(s, |h| h.flags &= !crate::format::header::FLAG_DIRTY)?;
        }
    } else {
        zero_region(geo.bitmap_offset, geo.bitmap_len, "bitmap clear")?;
        edit_header(s, |h| {
            h.prefetch_cursor = 0;
            h.compat &= !crate::format::header::COMPAT_PREFETCHED;
        })?;
        if geo.has_table() {
            zero_region(geo.table_offset, geo.table_len, "table clear")?;
        }
    }
    let size = s.size();
    if size > geo.data_offset {
        s.punch(geo.data_offset, size - geo.data_offset).map_err(io_err(s, "punch", geo.data_offset))?;
        s.sync().map_err(io_err(s, "fdatasync", geo.data_offset))?;
    }
    Ok(())
}
