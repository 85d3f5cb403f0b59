//! `fvd check --repair` for metadata that does not open: table entries out of range
//! or naming a chunk another entry names, and a journal whose replay fails part-way.
//!
//! The repair never leaves an image worse, and never unopenable when a consistent
//! state can be recovered:
//! - the journal is replayed as far as its records apply; a record that does not
//!   (and every one after it) is dropped and reported; a damaged block that a
//!   later, completed commit follows is skipped and reported (its records are
//!   lost), and the later commits are replayed;
//! - of two entries that name one chunk, the one the newest durable record set is
//!   kept (a journal record is newer than the checkpointed table, a later record newer
//!   than an earlier one; between two checkpointed entries, the lower guest chunk),
//!   and the other entry's guest range is reported lost: it reads as zeros (or the
//!   base) afterwards;
//! - an entry past the storage's end is dropped, its range reported lost.
//!
//! The result is written as a checkpoint: the table, then the bitmap, a data sync,
//! then a clean header whose journal sequence is past every block in the region.

use super::open::{read_header, Loaded};
use super::ImageError;
use crate::format::journal::Shape;
use crate::format::{self, header::FLAG_DIRTY, Geometry, Record, META_BLOCK};
use crate::meta;
use crate::storage::Storage;

/// Replays the journal of a dirty image as far as its records apply, noting for
/// every table entry how new the record that set it is (0: the checkpointed table).
/// Returns the loaded state, the ages, and what was not replayed: damaged
/// blocks skipped (later commits follow them), and why the replay stopped early.
fn load_lenient(s: &dyn Storage) -> Result<(Loaded, Vec<u64>, Vec<String>), ImageError> {
    let path = s.name().to_string();
    let io = |what: &'static str, offset: u64| {
        let path = path.clone();
        move |source| ImageError::Io { path, what, offset, source }
    };
    let header = read_header(s)?;
    let geo =
        Geometry::from_header(&header, s.size()).map_err(|source| ImageError::Layout { path: path.clone(), source })?;
    // Both copies, checked: a stripe good in one is taken from it; one good in
    // neither keeps the current copy's bytes, and its guest range is named.
    let read = super::meta_copies::read(s, &geo, &header, true)?;
    let meta_faults = read.faults;
    let (mut table, mut bitmap) = (read.table, read.bitmap);
    let mut ages = vec![0u64; table.len()];
    let (mut blocks, mut records, mut stopped) = (0, 0, None);
    let mut damaged = Vec::new();
    if header.is_dirty() {
        let mut jbytes = vec![0u8; geo.journal_len as usize];
        s.read_at(&mut jbytes, geo.journal_offset).map_err(io("journal read", geo.journal_offset))?;
        let pos_known = header.incompat & format::header::INCOMPAT_JOURNAL_POS != 0;
        let shape = Shape::of(header.incompat);
        'blocks: for i in 0..shape.capacity(geo.journal_len) {
            let Ok(block) = shape.decode(&jbytes, i, header.journal_seq + i) else {
                // Damage, not the end: later commits are replayed past it.
                match format::journal::find_damage(shape, &jbytes, header.journal_seq, i).filter(|_| pos_known) {
                    Some(d) => {
                        let at = geo.journal_offset + shape.offset(i);
                        damaged.push(format!(
                            "journal block {i} (at {at:#x}) is damaged ({}): its records are lost, so the writes \
                             its commit made durable may read as before them (which guest ranges, only the block \
                             knew); the later commits from block {} on are replayed",
                            d.error, d.later
                        ));
                        continue;
                    }
                    None => break,
                }
            };
            for (k, r) in block.records.iter().enumerate() {
                if let Err(e) = meta::apply_record(&geo, &mut table, &mut bitmap, r) {
                    let at = geo.journal_offset + shape.offset(i);
                    stopped = Some(format!("journal replay stopped at block {i} (at {at:#x}), record {k}: {e}"));
                    break 'blocks;
                }
                records += 1;
                if let Record::TableSet { vchunk, .. } = *r {
                    ages[vchunk as usize] = records;
                }
            }
            blocks += 1;
        }
    }
    let loaded = Loaded {
        header,
        geo,
        table,
        bitmap,
        replayed_blocks: blocks,
        replayed_records: records,
        journal_damage: None,
        meta_faults,
        meta_stream: None,
    };
    let mut notes = damaged;
    notes.extend(stopped);
    Ok((loaded, ages, notes))
}

/// Repairs what [`load_lenient`] and the table checks find, writing nothing when
/// there is nothing to repair. Returns one line per repair.
pub fn repair_metadata(s: &dyn Storage) -> Result<Vec<String>, ImageError> {
    let (mut l, ages, stopped) = load_lenient(s)?;
    let mut done: Vec<String> = stopped;
    let geo = l.geo.clone();
    // Stripes of the table and bitmap: rewritten from the good copy, or, good
    // in neither, kept as the current copy holds them (the table checks below
    // drop what of it cannot be right) with the guest range they cover named.
    for f in &l.meta_faults {
        let what = super::meta_copies::describe(&geo, f);
        if f.repairable {
            done.push(format!("{what} did not match its checksum: rewritten from the other copy"));
        } else {
            let (lo, hi) = super::meta_copies::guest_range(&geo, f);
            done.push(format!(
                "{what} is damaged in both copies: kept as it is, so guest bytes {lo:#x}..{hi:#x} may read other \
                 data than was written (check them)"
            ));
        }
    }
    let cb = geo.chunk_bytes();
    let limit = geo.phys_chunks.min(s.size().saturating_sub(geo.data_offset) / cb.max(1));
    // Newest first: the entry a newer record set wins its chunk.
    let mut order: Vec<usize> = (0..l.table.len()).filter(|&v| l.table[v] != 0).collect();
    order.sort_by_key(|&v| (std::cmp::Reverse(ages[v]), v));
    let mut owner = vec![usize::MAX; limit as usize];
    let lost = |v: usize| format!("guest range {:#x}..{:#x} (table entry {v:#x})", v as u64 * cb, (v as u64 + 1) * cb);
    for v in order {
        let p = (l.table[v] - 1) as usize;
        if p as u64 >= limit {
            done.push(format!("{} lost: it named chunk {p:#x}, past the storage's end", lost(v)));
            l.table[v] = 0;
        } else if owner[p] != usize::MAX {
            done.push(format!(
                "{} lost: chunk {p:#x} is also named by entry {:#x}, set by a newer record, which keeps it",
                lost(v),
                owner[p]
            ));
            l.table[v] = 0;
        } else {
            owner[p] = v;
        }
    }
    if done.is_empty() {
        return Ok(done);
    }
    meta::validate_table(&geo, &l.table, s.size())
        .map_err(|source| ImageError::Meta { path: s.name().to_string(), source })?;
    write_checkpoint(s, &l)?;
    Ok(done)
}

/// Writes table and bitmap (with a twin: into the copy that is not current),
/// syncs, then a clean header (next generation, its own slot) with the journal
/// sequence past every block in the region (and the new current copy and its
/// checksums), and syncs; with a twin, then the other copy, synced.
fn write_checkpoint(s: &dyn Storage, l: &Loaded) -> Result<(), ImageError> {
    let io = |what: &'static str, offset: u64| {
        let path = s.name().to_string();
        move |source| ImageError::Io { path, what, offset, source }
    };
    let geo = &l.geo;
    let stream = super::meta_copies::stream(geo, &l.table, &l.bitmap);
    // With a twin, the copy that is not current first (see `format::twin`).
    let cur = if l.header.has_twin() { l.header.meta_copy } else { 0 };
    let next = if l.header.has_twin() { 1 - cur } else { 0 };
    super::meta_copies::write_copy_sync(s, geo, next, &stream)?;
    let mut h = l.header.clone();
    super::meta_copies::point_header_at(&mut h, next, &stream);
    h.journal_seq += geo.journal_len / META_BLOCK;
    // A new log starts: in two copies from here on.
    h.incompat |= format::header::INCOMPAT_JOURNAL_DUP;
    h.flags &= !FLAG_DIRTY;
    h.generation += 1;
    // With a twin, dirty until the other copy is up to date (a cut before
    // leaves an image whose next open rewrites it).
    if l.header.has_twin() {
        h.flags |= FLAG_DIRTY;
    }
    let put = |h: &format::Header| -> Result<(), ImageError> {
        let off = (h.generation % 2) * META_BLOCK;
        s.write_at(&h.encode(), off).map_err(io("header write", off))?;
        s.sync().map_err(io("fdatasync", 0))
    };
    put(&h)?;
    if l.header.has_twin() {
        super::meta_copies::write_copy_sync(s, geo, cur, &stream)?;
        h.flags &= !FLAG_DIRTY;
        h.generation += 1;
        put(&h)?;
    }
    Ok(())
}
