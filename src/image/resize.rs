//! `fvd resize IMAGE SIZE`: growing a closed image.
//!
//! The virtual size is a header field; what else has to change depends on the
//! layout:
//! - **Raw layout** (no table): guest offset X lives at `data_offset + X`, so a
//!   larger disk is one header write. Storage past the old end is punched first
//!   (it reads zeros already unless something left bytes there).
//! - **Table, room left**: the table needs one entry per chunk of the new size.
//!   When `table_offset + table_len(new)` still ends at or before the next region
//!   (the bitmap, or the journal without a base), the table grows in place: its
//!   new entries (zeros) are written, then one header write switches the size.
//! - **Table, no room**: the metadata moves to the start of the data area. The
//!   new table goes at the old `data_offset`, followed by room for the table to
//!   double (so the next growths up to twice the new size are header writes),
//!   the bitmap (copied), and the journal (zeroed), all in the first `k` data
//!   chunks; the new `data_offset` is `k` chunks further, so physical chunk
//!   `p` becomes `p - k`. The chunks that sit in the first `k` slots (or, after
//!   an interrupted resize, past the new table's reach) are copied to free
//!   slots first.
//!
//! Crash safety. The image is made clean first (a dirty one is recovered). A
//! resize that moves chunks or metadata then marks the header dirty, so a crash
//! from there on is recovered as any crash: unreferenced chunks (copies whose
//! entries did not become durable, the half-written new metadata) are wiped.
//! The steps, each made durable before the next:
//! 1. header: dirty; when a chunk must go to a slot past the old size's chunks
//!    (an image with fewer free chunks than the metadata needs), also the
//!    incompatible feature `INCOMPAT_RESIZING` with `resize_chunks`, which lets
//!    table entries name those slots;
//! 2. the chunks are copied to their new slots, then synced;
//! 3. the old table is rewritten in place with the new slots (each 4-byte entry
//!    names the old slot or the new one, both holding the same data);
//! 4. the new metadata is written (table, bitmap copy, zeroed journal), the
//!    slots chunks moved out of are punched, then synced;
//! 5. one header write switches to the new geometry, clean, without
//!    `INCOMPAT_RESIZING`.
//!
//! Then the old metadata area (below the new table) is punched: it is no
//! longer part of any region. A crash before step 5 leaves the image reading
//! what it read (the old size); running the resize again starts from what the
//! recovery left and completes it. After step 5 the image has the new size:
//! the old content, and zeros past the old end.
//!
//! Not done: shrinking (the guest's partitions and file systems would have to be
//! shrunk first, and fvd cannot know what lies past the new end), frozen
//! snapshot layers (their overlays read through them and record their size),
//! invalid layers, images with an unfinished commit, and growth past the end of
//! fixed-size storage (a plain block device).

use super::meta_copies;
use super::open::{load, read_header_slots, slot_offset};
use super::{Image, ImageError, OpenOptions};
use crate::format::header::{FLAG_DIRTY, INCOMPAT_RESIZING};
use crate::format::layout::MAX_VIRTUAL;
use crate::format::{self, Geometry, Header, META_BLOCK};
use crate::io::{self, IoEngine};
use crate::storage::{open_image_storage, OpenMode, Storage, StorageOptions};
use std::path::Path;
use std::sync::Arc;

/// How a resize changed the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeKind {
    /// Already that size.
    Unchanged,
    /// A header write (and the table's new entries, written in place).
    Header,
    /// The metadata moved to the start of the data area.
    MovedMetadata,
}

/// What a resize did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ResizeOutcome {
    pub old_size: u64,
    pub new_size: u64,
    pub kind: ResizeKind,
    /// Data chunks copied to another slot.
    pub moved_chunks: u64,
    /// The largest size a later resize reaches with a header write alone
    /// (the raw layout: the largest the format allows).
    pub room: u64,
    /// The image was not closed cleanly (or a resize was interrupted) and was
    /// recovered first.
    pub recovered: bool,
}

impl ResizeOutcome {
    /// What this run did (not a recovery of an earlier one).
    fn of(old_size: u64, new_size: u64, kind: ResizeKind, moved_chunks: u64, room: u64) -> ResizeOutcome {
        ResizeOutcome { old_size, new_size, kind, moved_chunks, room, recovered: false }
    }
}

fn io_error(s: &dyn Storage, what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = s.name().to_string();
    move |source| ImageError::Io { path, what, offset, source }
}

fn invalid(s: &dyn Storage, why: impl Into<String>) -> ImageError {
    ImageError::Invalid { path: s.name().to_string(), why: why.into() }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn table_len_for(chunks: u64) -> u64 {
    align_up(chunks * 4, META_BLOCK)
}

/// The largest number of chunks a table may have with chunk size `c`.
fn max_chunks(c: u64) -> u64 {
    (MAX_VIRTUAL / c).min(u32::MAX as u64 - 1)
}

/// `fvd resize IMAGE SIZE` on an image no daemon serves: recovers it when it was
/// not closed cleanly, then grows it to `new_size` bytes.
pub fn grow(image: &Path, new_size: u64) -> Result<ResizeOutcome, ImageError> {
    reshape(image, Some(new_size), false)
}

/// `fvd upgrade IMAGE`: gives an image made before the twin
/// (`INCOMPAT_META_TWIN`) its checksummed second copy of the table and bitmap,
/// and its journal two copies of each block, in place: the metadata moves to
/// the start of the data area as a resize moves it (with the same crash
/// safety), laid out with the twin. The size stays. An image that has the twin
/// already is left as it is (`Unchanged`).
pub fn upgrade(image: &Path) -> Result<ResizeOutcome, ImageError> {
    reshape(image, None, true)
}

fn reshape(image: &Path, new_size: Option<u64>, add_twin: bool) -> Result<ResizeOutcome, ImageError> {
    let storage: Arc<dyn Storage> = Arc::from(open_image_storage(image, &StorageOptions::new(OpenMode::ReadWrite))?);
    let name = storage.name().to_string();
    let recovered = recover_on(image, Box::new(storage.clone()))?;
    let ring = super::offline_ring(&name)?;
    let size = match new_size {
        Some(n) => n,
        None => read_header_slots(storage.as_ref())?.current.virtual_size,
    };
    let mut out = ring.block_on(reshape_on(&ring, storage.as_ref(), size, add_twin)).map_err(|source| {
        ImageError::Io { path: name, what: if add_twin { "upgrade" } else { "resize" }, offset: 0, source }
    })??;
    out.recovered |= recovered;
    Ok(out)
}

/// Makes a closed image clean before a resize: when its header says dirty (a
/// crash, an interrupted resize) or a header slot is not valid, it is opened
/// read-write (which recovers it, without its base: recovery reads none) and
/// closed, each on a ring of its own (not from within an executor). Returns
/// whether it was dirty.
pub fn recover_on(path: &Path, s: Box<dyn Storage>) -> Result<bool, ImageError> {
    let slots = read_header_slots(s.as_ref())?;
    let h = &slots.current;
    if !h.is_dirty() && slots.bad.is_empty() {
        return Ok(false);
    }
    refuse_layer(s.as_ref(), h)?;
    let opts = OpenOptions { chain_member: true, ..OpenOptions::default() };
    let img = Image::open_on(path, s, None, &opts)?;
    img.close()?;
    Ok(h.is_dirty())
}

/// The layers a resize refuses, whatever the size.
fn refuse_layer(s: &dyn Storage, h: &Header) -> Result<(), ImageError> {
    if h.is_frozen() {
        return Err(invalid(
            s,
            "is a frozen snapshot layer: its overlays read through it and record its size, so it is not \
             resized (resize the live overlay at the top of the chain instead)",
        ));
    }
    if h.is_invalid() {
        return Err(invalid(s, "is marked invalid (a commit wrote into a layer below it); it is never opened again"));
    }
    if h.is_committing() {
        return Err(invalid(s, "a commit from it is not finished: run 'fvd commit' on it again first"));
    }
    Ok(())
}

/// Writes `h` as the next header generation into its slot and syncs.
async fn write_header<E: IoEngine>(e: &E, s: &dyn Storage, mut h: Header) -> Result<Header, ImageError> {
    h.generation = read_header_slots(s)?.current.generation + 1;
    let off = slot_offset((h.generation % 2) as usize);
    let bytes = io::AlignedBuf::from_slice(&h.encode());
    io::write_at(e, s, &bytes, off).await.map_err(io_error(s, "header write", off))?;
    io::sync(e, s).await.map_err(io_error(s, "fdatasync", off))?;
    Ok(h)
}

/// Writes `stream` into copy `copy` of geometry `g` (see `meta_copies`), synced.
async fn write_copy<E: IoEngine>(
    e: &E,
    s: &dyn Storage,
    g: &Geometry,
    copy: u32,
    stream: &[u8],
) -> Result<(), ImageError> {
    for (off, r) in meta_copies::copy_writes(g, copy, stream.len()) {
        write(e, s, &stream[r], off, "metadata write").await?;
    }
    sync(e, s).await
}

/// Twin images: a new table and bitmap (`stream`, laid out as `g`, the
/// geometry `h` gives) go into the copy `h` does not name current, then `h`
/// switches to it (written, synced), then the other copy is brought up to
/// date: the current copy is never written (see `format::twin`).
async fn switch_copies<E: IoEngine>(
    e: &E,
    s: &dyn Storage,
    g: &Geometry,
    mut h: Header,
    stream: &[u8],
) -> Result<Header, ImageError> {
    let next = 1 - h.meta_copy;
    write_copy(e, s, g, next, stream).await?;
    meta_copies::point_header_at(&mut h, next, stream);
    // Dirty until the other copy is up to date: a cut before leaves an image
    // whose next open rewrites it, never a clean one with a stale twin.
    let clean = !h.is_dirty();
    h.flags |= FLAG_DIRTY;
    let mut h = write_header(e, s, h).await?;
    write_copy(e, s, g, 1 - next, stream).await?;
    if clean {
        h.flags &= !FLAG_DIRTY;
        h = write_header(e, s, h).await?;
    }
    Ok(h)
}

async fn sync<E: IoEngine>(e: &E, s: &dyn Storage) -> Result<(), ImageError> {
    io::sync(e, s).await.map_err(io_error(s, "fdatasync", 0))
}

async fn write<E: IoEngine>(
    e: &E,
    s: &dyn Storage,
    bytes: &[u8],
    off: u64,
    what: &'static str,
) -> Result<(), ImageError> {
    let b = io::AlignedBuf::from_slice(bytes);
    io::write_at(e, s, &b, off).await.map_err(io_error(s, what, off))
}

async fn punch<E: IoEngine>(e: &E, s: &dyn Storage, off: u64, len: u64, what: &'static str) -> Result<(), ImageError> {
    if len == 0 {
        return Ok(());
    }
    io::punch(e, s, off, len).await.map_err(io_error(s, what, off))
}

/// Refuses a geometry fixed-size storage cannot hold; otherwise lets the storage's
/// growth reach what the grown image can need (an LV's growth ahead stops at the
/// old image's need until told; raising it before the resize writes is safe: the
/// limit only bounds growth ahead of need).
fn admit_geometry(s: &dyn Storage, g: &Geometry, size: u64) -> Result<(), ImageError> {
    match s.capacity() {
        Some(cap) if g.max_storage_size() > cap => Err(invalid(
            s,
            format!(
                "the storage holds {cap} bytes ({}) and cannot grow; an image of {size} bytes needs up to {} \
                 (the metadata and every chunk)",
                crate::units::human(cap),
                g.max_storage_size()
            ),
        )),
        _ => {
            s.set_size_limit(g.max_storage_size());
            Ok(())
        }
    }
}

/// Punches what lies below the table (the metadata area a resize moved away
/// from, no longer part of any region). Idempotent: a resize cut before it
/// completes it when run again.
async fn punch_old_metadata<E: IoEngine>(e: &E, s: &dyn Storage, h: &Header) -> Result<(), ImageError> {
    if h.table_offset > format::HEADER_AREA {
        punch(e, s, format::HEADER_AREA, h.table_offset - format::HEADER_AREA, "punch the old metadata").await?;
        sync(e, s).await?;
    }
    Ok(())
}

/// Grows the clean image on `s` to `new_size` bytes (see the module docs).
/// A dirty image is refused: [`recover_on`] first.
pub async fn grow_on<E: IoEngine>(e: &E, s: &dyn Storage, new_size: u64) -> Result<ResizeOutcome, ImageError> {
    reshape_on(e, s, new_size, false).await
}

/// [`upgrade`] on storage no one else writes, the image clean.
pub async fn upgrade_on<E: IoEngine>(e: &E, s: &dyn Storage) -> Result<ResizeOutcome, ImageError> {
    let size = read_header_slots(s)?.current.virtual_size;
    reshape_on(e, s, size, true).await
}

/// [`grow_on`]; with `add_twin`, on an image without the twin, the metadata
/// moves (whatever the size) and the new layout has the twin.
async fn reshape_on<E: IoEngine>(
    e: &E,
    s: &dyn Storage,
    new_size: u64,
    add_twin: bool,
) -> Result<ResizeOutcome, ImageError> {
    let l = load(s)?;
    if let Some(f) = l.meta_faults.iter().find(|f| !f.repairable) {
        return Err(meta_copies::lost_error(s, &l.geo, f));
    }
    let h = l.header.clone();
    refuse_layer(s, &h)?;
    if h.is_dirty() {
        return Err(invalid(
            s,
            "was not closed cleanly: open it read-write once (or run 'fvd resize', which does) first",
        ));
    }
    let geo = l.geo.clone();
    let old = geo.virtual_size.0;
    let add_twin = add_twin && !h.has_twin();
    if add_twin && geo.chunk_size.is_none() {
        return Err(invalid(
            s,
            "has the raw layout (guest data at fixed offsets right after its metadata), so its metadata cannot \
             move to make room for a second copy: 'fvd convert' makes a copy that has it",
        ));
    }
    if new_size < old {
        return Err(invalid(
            s,
            format!(
                "shrinking is not supported ({new_size} bytes is less than the current {old}): the guest's \
                 partitions and file systems would have to be shrunk first, and fvd cannot tell whether \
                 anything still lies past the new end; fvd resize only grows images"
            ),
        ));
    }
    if new_size % 512 != 0 {
        return Err(invalid(s, format!("the new size {new_size} is not a multiple of 512 bytes")));
    }
    // Hand a plain block device the mark kept in the header (as open does): it
    // reads as zeros past it, growth zeroes from it, and the new header keeps it.
    if s.initialised_end().is_some() {
        let used = l.table.iter().max().copied().unwrap_or(0) as u64;
        let used_end = geo.data_offset + used * geo.chunk_bytes();
        s.set_initialised_end(if h.initialised_end == 0 { u64::MAX } else { h.initialised_end.max(used_end) });
    }
    let layout_err = |source| ImageError::Layout { path: s.name().to_string(), source };
    let Some(c) = geo.chunk_size.map(u64::from) else {
        // Raw layout: guest offset X at data_offset + X.
        let room = MAX_VIRTUAL;
        if new_size == old {
            return Ok(ResizeOutcome::of(old, new_size, ResizeKind::Unchanged, 0, room));
        }
        let mut nh = h.clone();
        nh.virtual_size = new_size;
        nh.session = 0;
        let ng = Geometry::from_header(&nh, u64::MAX).map_err(layout_err)?;
        admit_geometry(s, &ng, new_size)?;
        // A plain block device reads zeros past the old end already: below its
        // mark is only what it zeroed or the image wrote (never past the end).
        let from = geo.data_offset + old;
        let to = if s.initialised_end().is_some() { from } else { s.size().min(geo.data_offset + new_size) };
        if to > from {
            punch(e, s, from, to - from, "zeroing past the old end").await?;
            sync(e, s).await?;
        }
        write_header(e, s, nh).await?;
        return Ok(ResizeOutcome::of(old, new_size, ResizeKind::Header, 0, room));
    };
    let mut table = l.table.clone();
    crate::meta::validate_table(&geo, &table, s.size())
        .map_err(|source| ImageError::Meta { path: s.name().to_string(), source })?;
    let next_region = |h: &Header| if h.bitmap_len > 0 { h.bitmap_offset } else { h.journal_offset };
    let room_of = |h: &Header| ((next_region(h) - h.table_offset) / 4).min(max_chunks(c)) * c;
    if new_size == old && !h.is_resizing() && !add_twin {
        // An earlier resize may have been cut before this.
        punch_old_metadata(e, s, &h).await?;
        let room = room_of(&h).max(old);
        return Ok(ResizeOutcome::of(old, new_size, ResizeKind::Unchanged, 0, room));
    }
    let chunks1 = new_size.div_ceil(c);
    if chunks1 > max_chunks(c) {
        return Err(layout_err(format::LayoutError::TooManyChunks(chunks1)));
    }
    let t1 = table_len_for(chunks1);
    // The new geometry: in place when the table has room, else at the start
    // of the data area, `k` chunks long.
    let d0 = geo.data_offset;
    let mut nh = h.clone();
    nh.virtual_size = new_size;
    nh.table_len = t1;
    nh.flags &= !FLAG_DIRTY;
    nh.incompat &= !INCOMPAT_RESIZING;
    nh.resize_chunks = 0;
    nh.journal_seq = h.journal_seq + h.journal_len / META_BLOCK;
    // The new log (after the switch) is kept in two copies.
    nh.incompat |= format::header::INCOMPAT_JOURNAL_DUP;
    // No volatile log of an earlier writer may extend this image's journal: its
    // records would name the old layout's chunks.
    nh.session = 0;
    // The new layout's twin; the old layout's is `h.has_twin()`.
    let twin = h.has_twin() || add_twin;
    if add_twin {
        nh.incompat |= format::header::INCOMPAT_META_TWIN;
        nh.meta_copy = 0;
    }
    let k = if h.table_offset + t1 <= next_region(&h) && !add_twin {
        if h.bitmap_len == 0 {
            nh.bitmap_offset = nh.bitmap_offset.max(h.table_offset + t1);
        }
        0
    } else if twin {
        // Table, room, bitmap, journal, and the twin of the first three, packed
        // from the old data offset (see `format::twin`).
        let reserve = table_len_for((chunks1 * 2).min(max_chunks(c)));
        let span = reserve + h.bitmap_len;
        let k = (2 * span + h.journal_len).div_ceil(c);
        nh.data_offset = d0 + k * c;
        nh.table_offset = d0;
        nh.bitmap_offset = d0 + reserve;
        nh.journal_offset = nh.bitmap_offset + h.bitmap_len;
        k
    } else {
        let reserve = table_len_for((chunks1 * 2).min(max_chunks(c)));
        let k = (reserve + h.bitmap_len + h.journal_len).div_ceil(c);
        nh.data_offset = d0 + k * c;
        nh.journal_offset = nh.data_offset - h.journal_len;
        nh.bitmap_offset = nh.journal_offset - h.bitmap_len;
        nh.table_offset = d0;
        k
    };
    if twin {
        // As many checksums as the new geometry has stripes; their values come
        // with the new table (below).
        nh.meta_sums = vec![0; format::twin::stripes(t1 + h.bitmap_len).1];
    }
    let ng = Geometry::from_header(&nh, u64::MAX).map_err(layout_err)?;
    admit_geometry(s, &ng, new_size)?;
    // Chunks outside the new table's reach [k, k + chunks1) move to free slots in it.
    let window = k..k + chunks1;
    let mut used = vec![false; (k + chunks1).max(geo.phys_chunks) as usize];
    for &en in &table {
        if en != 0 {
            used[(en - 1) as usize] = true;
        }
    }
    let mut free = window.clone().filter(|&p| !used[p as usize]);
    let mut moves: Vec<(usize, u64, u64)> = Vec::new();
    for (v, en) in table.iter().enumerate() {
        if *en != 0 && !window.contains(&((en - 1) as u64)) {
            let q = free.next().ok_or_else(|| invalid(s, "no free chunk for a resize (the table is inconsistent)"))?;
            moves.push((v, (en - 1) as u64, q));
        }
    }
    let interim = k > 0 || !moves.is_empty();
    // The header on storage, as the steps below change it.
    let mut cur_h = h.clone();
    // Step 1.
    if interim {
        let mut ih = h.clone();
        ih.flags |= FLAG_DIRTY;
        ih.session = 0;
        let limit = moves.iter().map(|m| m.2 + 1).max().unwrap_or(0).max(geo.phys_chunks);
        if limit > geo.chunks() {
            ih.incompat |= INCOMPAT_RESIZING;
            ih.resize_chunks = limit as u32;
        }
        cur_h = write_header(e, s, ih).await?;
    }
    // Step 2: copies, with the storage grown to hold them and the new metadata.
    let need = moves.iter().map(|m| d0 + (m.2 + 1) * c).max().unwrap_or(0).max(nh.data_offset);
    s.ensure_size(need)?;
    if !moves.is_empty() {
        let mut buf = io::AlignedBuf::zeroed(c as usize);
        for &(_, p, q) in &moves {
            let (from, to) = (d0 + p * c, d0 + q * c);
            io::read_at(e, s, &mut buf, from).await.map_err(io_error(s, "chunk read", from))?;
            io::write_at(e, s, &buf, to).await.map_err(io_error(s, "chunk copy", to))?;
        }
        sync(e, s).await?;
        for &(v, _, q) in &moves {
            table[v] = q as u32 + 1;
        }
    }
    // Step 3 (moving the metadata; in place, step 4's table write does it).
    if k > 0 && !moves.is_empty() {
        if h.has_twin() {
            let stream = meta_copies::stream(&geo, &table, &l.bitmap);
            cur_h = switch_copies(e, s, &geo, cur_h, &stream).await?;
        } else {
            write(e, s, &format::encode_table(&table, h.table_len as usize), h.table_offset, "table write").await?;
            sync(e, s).await?;
        }
    }
    // Step 4.
    // With a twin: the new table and bitmap, and the header that goes with them.
    let mut new_stream = None;
    if k > 0 {
        let shifted: Vec<u32> = table.iter().map(|&en| if en == 0 { 0 } else { en - k as u32 }).collect();
        if twin {
            // Both copies of the new layout: no header names them yet.
            let stream = meta_copies::stream(&ng, &shifted, &l.bitmap);
            for copy in 0..2 {
                for (off, r) in meta_copies::copy_writes(&ng, copy, stream.len()) {
                    write(e, s, &stream[r], off, "metadata write").await?;
                }
            }
            meta_copies::point_header_at(&mut nh, 0, &stream);
        } else {
            let len = nh.bitmap_offset - nh.table_offset;
            write(e, s, &format::encode_table(&shifted, len as usize), nh.table_offset, "table write").await?;
            if h.bitmap_len > 0 {
                let b = format::encode_bitmap(&l.bitmap, h.bitmap_len as usize);
                write(e, s, &b, nh.bitmap_offset, "bitmap write").await?;
            }
        }
        punch(e, s, nh.journal_offset, h.journal_len, "journal clear").await?;
    } else if twin {
        // In place: chunks moved are named by the current copy before their old
        // slots are punched below (the old size's table); the new size's table
        // goes in with the header switch (step 5).
        if !moves.is_empty() {
            let stream = meta_copies::stream(&geo, &table, &l.bitmap);
            cur_h = switch_copies(e, s, &geo, cur_h, &stream).await?;
        }
        new_stream = Some(meta_copies::stream(&ng, &table, &l.bitmap));
    } else if t1 > h.table_len || !moves.is_empty() {
        write(e, s, &format::encode_table(&table, t1 as usize), h.table_offset, "table write").await?;
    }
    if moves.iter().any(|m| m.1 >= k) {
        // Only once no durable entry names them any more.
        sync(e, s).await?;
        for &(_, p, _) in moves.iter().filter(|m| m.1 >= k) {
            punch(e, s, d0 + p * c, c, "punch a moved chunk's old slot").await?;
        }
    }
    // The old last chunk's bytes past the old end become guest-visible.
    if old % c != 0 {
        if let Some(&en) = table.get((old / c) as usize).filter(|&&en| en != 0) {
            let at = d0 + (en as u64 - 1) * c + old % c;
            punch(e, s, at, c - old % c, "zeroing past the old end").await?;
        }
    }
    sync(e, s).await?;
    // Step 5.
    if h.initialised_end != 0 {
        if let Some(m) = s.initialised_end() {
            nh.initialised_end = nh.initialised_end.max(m);
        }
    }
    match &new_stream {
        Some(stream) => {
            nh.meta_copy = cur_h.meta_copy;
            switch_copies(e, s, &ng, nh.clone(), stream).await?;
        }
        None => {
            write_header(e, s, nh.clone()).await?;
        }
    }
    punch_old_metadata(e, s, &nh).await?;
    Ok(ResizeOutcome::of(
        old,
        new_size,
        if k > 0 { ResizeKind::MovedMetadata } else { ResizeKind::Header },
        moves.len() as u64,
        room_of(&nh).max(new_size),
    ))
}
