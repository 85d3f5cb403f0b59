//! Looking at an image without changing it: info, check, map.

use super::open::{load, read_header, read_header_slots, slot_offset, HeaderSlots};
use super::{Image, ImageError};
use crate::format::{Geometry, Header};
use crate::meta::{self, MetaError};

use crate::storage::Storage;
use crate::units::{BlockIdx, Bytes, ChunkIdx, PhysChunk};
use serde::Serialize;

/// What `fvd check` found.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub image: String,
    /// Structural damage: the image cannot be trusted.
    pub corruptions: Vec<String>,
    /// Space that nothing references (harmless, reclaimable).
    pub leaks: Vec<String>,
    pub leaked_chunks: Vec<u32>,
    /// What is neither damage nor a leak, but worth saying (a dirty image's
    /// chunks that recovery wipes).
    pub notes: Vec<String>,
    pub journal_blocks_replayed: u64,
    pub journal_records_replayed: u64,
    pub dirty: bool,
    pub allocated_chunks: u64,
    pub total_chunks: u64,
    /// Header slots that are not valid (each one is also in `corruptions`):
    /// damage, or what a torn header write left. The image opens from the
    /// other slot, and `--repair` rewrites the bad one from it.
    pub bad_header_slots: Vec<BadHeaderSlot>,
    /// Neither header slot is valid: nothing else could be read, and
    /// `--repair` has no header to rebuild the rest from.
    pub no_valid_header: bool,
    pub repaired: bool,
    /// What `--repair` did, one line each.
    pub repairs: Vec<String>,
}

/// A header slot that is not valid. Every image has two valid slots (create
/// writes both; see the format docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadHeaderSlot {
    /// 0 or 1.
    pub slot: usize,
    /// Byte offset of the slot in the image.
    pub offset: u64,
    /// Why the slot is not valid.
    pub error: String,
    /// The slot the image opens from, and its generation.
    pub current_slot: usize,
    pub current_generation: u64,
}

impl BadHeaderSlot {
    /// One line for a report, without the image name.
    pub fn describe(&self) -> String {
        format!(
            "header slot {} at {:#x}: {} (the image opens from slot {}, generation {}; \
             `fvd check --repair` rewrites the bad slot from it)",
            self.slot, self.offset, self.error, self.current_slot, self.current_generation
        )
    }
}

fn bad_slots(slots: &HeaderSlots) -> Vec<BadHeaderSlot> {
    slots
        .bad
        .iter()
        .map(|(i, e)| BadHeaderSlot {
            slot: *i,
            offset: slot_offset(*i),
            error: e.to_string(),
            current_slot: slots.current_slot,
            current_generation: slots.current.generation,
        })
        .collect()
}

impl CheckReport {
    /// qemu-img check's convention: 0 clean, 2 corrupt, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if !self.corruptions.is_empty() {
            2
        } else if !self.leaks.is_empty() {
            3
        } else {
            0
        }
    }
}

/// Checks an image's metadata on `s`. Writes nothing.
pub fn check(s: &dyn Storage) -> CheckReport {
    let mut r = CheckReport { image: s.name().to_string(), ..Default::default() };
    match read_header_slots(s) {
        Ok(slots) => {
            r.bad_header_slots = bad_slots(&slots);
            r.notes.extend(slots.rolled_forward.map(|why| format!("{}: {why}", s.name())));
        }
        Err(e) => {
            r.corruptions.push(e.to_string());
            r.no_valid_header = true;
            return r;
        }
    }
    r.corruptions.extend(r.bad_header_slots.iter().map(|b| format!("{}: {}", s.name(), b.describe())));
    let loaded = match load(s) {
        Ok(l) => l,
        Err(e) => {
            r.corruptions.push(e.to_string());
            return r;
        }
    };
    r.dirty = loaded.header.is_dirty();
    if let Some(e) = super::open::journal_damage_error(s.name(), &loaded) {
        r.corruptions.push(e.to_string());
    }
    for f in &loaded.meta_faults {
        if f.repairable && f.copy != loaded.header.meta_copy && loaded.header.is_dirty() {
            // A checkpoint cut before it brought the twin up to date (or damage
            // to it): the recovery at the next read-write open rewrites it.
            r.notes.push(format!(
                "{}: the {} is out of date or damaged; the current copy is intact, and the next read-write \
                 open rewrites it",
                s.name(),
                super::meta_copies::describe(&loaded.geo, f)
            ));
        } else if f.repairable {
            r.corruptions.push(format!(
                "{}: the {} does not match its checksum; the other copy holds it: 'fvd check --repair' (or a \
                 read-write open) rewrites it",
                s.name(),
                super::meta_copies::describe(&loaded.geo, f)
            ));
        } else {
            r.corruptions.push(super::meta_copies::lost_error(s, &loaded.geo, f).to_string());
        }
    }
    let h = &loaded.header;
    if h.is_committing() {
        r.notes.push(format!(
            "{}: a commit into layer {} of its chain was interrupted; its chain still reads the same. \
             Run 'fvd commit' on it again to complete it",
            s.name(),
            h.commit_depth
        ));
    }
    if h.is_invalid() {
        r.notes.push(format!(
            "{}: marked invalid: a commit wrote into a layer below it (or a convert into it did not finish), \
             so it does not read what it should; nothing opens it or a chain through it",
            s.name()
        ));
    }
    if h.is_resizing() {
        r.notes.push(format!(
            "{}: a resize that moves the metadata was interrupted; the image reads as before it. \
             Run 'fvd resize' on it again to complete it",
            s.name()
        ));
    }
    if h.is_frozen() {
        r.notes.push(format!("{}: a frozen snapshot layer (write-opens are refused)", s.name()));
    }
    r.journal_blocks_replayed = loaded.replayed_blocks;
    r.journal_records_replayed = loaded.replayed_records;
    let geo = &loaded.geo;
    r.total_chunks = geo.chunks();
    let problems = table_problems(geo, &loaded.table, s.size());
    r.corruptions.extend(problems.iter().map(|e| format!("{}: {e}", s.name())));
    r.allocated_chunks = loaded.table.iter().filter(|&&e| e != 0).count() as u64;
    if geo.has_table() && problems.is_empty() {
        {
            let mut used = vec![false; geo.phys_chunks as usize];
            let mut hwm = 0usize;
            for &e in &loaded.table {
                if e != 0 {
                    used[(e - 1) as usize] = true;
                    hwm = hwm.max(e as usize);
                }
            }
            let cb = geo.chunk_bytes();
            for (p, u) in used.iter().enumerate().take(hwm) {
                let off = geo.data_offset + p as u64 * cb;
                if !u && s.has_data(off, cb) {
                    r.leaked_chunks.push(p as u32);
                }
            }
            let n = r.leaked_chunks.len();
            let bytes = n as u64 * cb;
            if n > 0 && r.dirty {
                // What a crash leaves: data written before its record was
                // durable. The recovery at the next read-write open wipes
                // every such chunk, so it is not a leak of a closed image.
                r.notes.push(format!(
                    "{}: {n} chunk(s) hold data that no durable record names ({bytes} bytes); \
                     the recovery at the next read-write open wipes them",
                    s.name()
                ));
            } else if n > 0 {
                r.leaks.push(format!("{}: {n} unreferenced chunk(s) still occupy storage ({bytes} bytes)", s.name()));
            }
        }
    }
    r
}

/// Every table problem (not only the first).
fn table_problems(geo: &Geometry, table: &[u32], storage_size: u64) -> Vec<MetaError> {
    let mut out = Vec::new();
    let mut t = table.to_vec();
    while let Err(e) = meta::validate_table(geo, &t, storage_size) {
        match &e {
            MetaError::EntryOutOfRange { vchunk, .. } | MetaError::DuplicateEntry { second: vchunk, .. } => {
                t[*vchunk as usize] = 0;
            }
            _ => {
                out.push(e);
                break;
            }
        }
        out.push(e);
        if out.len() > 100 {
            break;
        }
    }
    out
}

/// Reads just the header (for `info` on images that fail to open).
pub fn header_of(s: &dyn Storage) -> Result<Header, ImageError> {
    read_header(s)
}

impl Image {
    /// The header slots of this image's storage that are not valid.
    pub fn bad_header_slots(&self) -> Result<Vec<BadHeaderSlot>, ImageError> {
        read_header_slots(self.storage.as_ref()).map(|slots| bad_slots(&slots))
    }

    /// Rewrites every header slot that is not valid from the current header,
    /// durably, and returns what it did. Each write goes to the slot the image
    /// does not open from, with the next generation that belongs in that slot,
    /// so the current header stays intact until the new one is durable. Does
    /// nothing when the current header's layout is invalid (there is nothing
    /// trustworthy to copy). The caller holds the storage exclusively.
    pub fn repair_header_slots(s: &dyn Storage) -> Result<Vec<String>, ImageError> {
        let mut done = Vec::new();
        // With a slot lost, the valid one may be older than the copies of the
        // table and bitmap (a lost checkpoint header): the rewritten slot takes
        // the checksums a load reads the copies with (see `meta_copies::read`).
        let sums = read_header_slots(s)
            .ok()
            .filter(|slots| !slots.bad.is_empty())
            .and_then(|_| super::open::load(s).ok())
            .map(|l| l.header.meta_sums);
        // A current header in the wrong slot takes two writes: first to the
        // other slot, which then is current, then back.
        for _ in 0..2 {
            let slots = read_header_slots(s)?;
            if slots.bad.is_empty() || Geometry::from_header(&slots.current, s.size()).is_err() {
                break;
            }
            let target = 1 - slots.current_slot;
            let mut h = slots.current.clone();
            if let Some(sums) = &sums {
                h.meta_sums = sums.clone();
            }
            h.generation += 1;
            if h.generation % 2 != target as u64 {
                h.generation += 1;
            }
            let off = slot_offset(target);
            let io = |what: &'static str| {
                move |source| ImageError::Io { path: s.name().to_string(), what, offset: off, source }
            };
            s.write_at(&h.encode(), off).map_err(io("header slot write"))?;
            s.sync().map_err(io("header slot sync"))?;
            done.push(format!(
                "header slot {target} at {off:#x} rewritten from slot {} (generation {} -> {})",
                slots.current_slot, slots.current.generation, h.generation
            ));
        }
        Ok(done)
    }
}

/// What a range of the guest disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MapKind {
    /// Data held in the image.
    Data,
    /// Data still in the base.
    Base,
    /// Reads as zeros.
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapRange {
    pub start: u64,
    pub length: u64,
    pub kind: MapKind,
    /// Where the data lives in the image's storage (Data only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The layer the data comes from: 0 this image, 1 its base, 2 the base's
    /// base, and so on (Zero: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<usize>,
}

impl Image {
    /// Classifies the whole guest disk into ranges.
    pub fn map(&self) -> Vec<MapRange> {
        let geo = &self.meta.geo;
        let bs = geo.block_size as u64;
        let size = geo.virtual_size.0;
        let mut out: Vec<MapRange> = Vec::new();
        let mut push = |start: u64, length: u64, kind: MapKind, offset: Option<u64>| {
            let depth = match kind {
                MapKind::Data => Some(0),
                MapKind::Base => Some(self.base.as_ref().and_then(|b| b.layer_at(start)).map_or(1, |l| l + 1)),
                MapKind::Zero => None,
            };
            if let Some(l) = out.last_mut() {
                let contiguous = match (l.offset, offset) {
                    (Some(a), Some(b)) => a + l.length == b,
                    (None, None) => true,
                    _ => false,
                };
                if l.kind == kind && l.start + l.length == start && contiguous && l.depth == depth {
                    l.length += length;
                    return;
                }
            }
            out.push(MapRange { start, length, kind, offset, depth });
        };
        let base_blocks = geo.base_blocks();
        let mut pos = 0u64;
        while pos < size {
            let b = BlockIdx(pos / bs);
            let chunk_alloc = !geo.has_table() || self.meta.table.get(geo.chunk_of(Bytes(pos))).is_some();
            if geo.has_table() && !chunk_alloc && b.0 >= base_blocks {
                // Skip a whole unallocated chunk beyond the base at once.
                let cb = geo.chunk_bytes();
                let end = ((pos / cb + 1) * cb).min(size);
                push(pos, end - pos, MapKind::Zero, None);
                pos = end;
                continue;
            }
            let end = ((b.0 + 1) * bs).min(size);
            if !self.meta.block_in_image(b) {
                let base_end = end.min(geo.base_size.0);
                if pos < base_end {
                    push(pos, base_end - pos, MapKind::Base, None);
                }
                if base_end < end {
                    push(base_end.max(pos), end - base_end.max(pos), MapKind::Zero, None);
                }
            } else {
                match self.meta.storage_offset(Bytes(pos)) {
                    Some(so) if self.storage.has_data(so, end - pos) => push(pos, end - pos, MapKind::Data, Some(so)),
                    _ => push(pos, end - pos, MapKind::Zero, None),
                }
            }
            pos = end;
        }
        out
    }

    /// Guest chunks that have storage.
    pub fn allocated_chunks(&self) -> u64 {
        if self.meta.geo.has_table() {
            self.meta.table.allocated()
        } else {
            0
        }
    }

    /// Physical chunk of a guest chunk (for tests and tools).
    pub fn chunk_mapping(&self, c: ChunkIdx) -> Option<PhysChunk> {
        self.meta.table.get(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::CreateParams;
    use crate::format::{BaseFormat, META_BLOCK};
    use crate::storage::SimStorage;

    fn image() -> SimStorage {
        let s = SimStorage::new("img");
        let geo = Geometry::new(&CreateParams {
            virtual_size: 16 << 20,
            block_size: 64 << 10,
            chunk_size: Some(1 << 20),
            base_size: 0,
            journal_len: 1 << 20,
        })
        .unwrap();
        super::super::create_on(&s, &geo, "", BaseFormat::None).unwrap();
        s
    }

    fn slot(s: &SimStorage, i: usize) -> Result<Header, crate::format::HeaderError> {
        let mut b = vec![0u8; META_BLOCK as usize];
        s.read_at(&mut b, slot_offset(i)).unwrap();
        Header::decode(&b)
    }

    fn put(s: &SimStorage, i: usize, bytes: &[u8]) {
        s.write_at(bytes, slot_offset(i)).unwrap();
    }

    #[test]
    fn create_writes_two_valid_slots() {
        let s = image();
        for i in 0..2 {
            assert_eq!(slot(&s, i).unwrap().generation, i as u64);
        }
        let r = check(&s);
        assert_eq!(r.exit_code(), 0, "{r:?}");
        assert!(r.bad_header_slots.is_empty());
        assert!(Image::repair_header_slots(&s).unwrap().is_empty(), "nothing to repair");
    }

    #[test]
    fn a_damaged_slot_is_corrupt_and_repaired_from_the_other() {
        for bad in 0..2 {
            let s = image();
            let good = slot(&s, 1 - bad).unwrap();
            let mut b = good.encode();
            b[100] ^= 1;
            put(&s, bad, &b);
            let r = check(&s);
            assert_eq!(r.exit_code(), 2, "{r:?}");
            assert_eq!(r.bad_header_slots.len(), 1);
            assert_eq!(r.bad_header_slots[0].slot, bad);
            let want = format!("header slot {bad} at {:#x}: header checksum mismatch", bad as u64 * 4096);
            assert!(r.corruptions[0].contains(&want), "{:?}", r.corruptions);
            let done = Image::repair_header_slots(&s).unwrap();
            assert_eq!(done.len(), 1, "{done:?}");
            let fixed = slot(&s, bad).unwrap();
            assert_eq!(fixed.generation, good.generation + 1);
            assert_eq!(Header { generation: good.generation, ..fixed }, good);
            assert_eq!(slot(&s, 1 - bad).unwrap(), good);
            assert_eq!(check(&s).exit_code(), 0);
        }
    }

    #[test]
    fn a_header_in_the_wrong_slot_is_moved_without_touching_the_current_one_first() {
        // Generation 3 in slot 0 (current, but the next header write would go
        // over it), generation 1 in slot 1.
        let s = image();
        let mut h = slot(&s, 0).unwrap();
        h.generation = 3;
        h.journal_seq += 7;
        put(&s, 0, &h.encode());
        let r = check(&s);
        assert_eq!(r.exit_code(), 2, "{r:?}");
        assert!(
            r.corruptions[0].contains("header slot 0 at 0x0: holds generation 3, which belongs in slot 1"),
            "{r:?}"
        );
        let done = Image::repair_header_slots(&s).unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        assert!(done[0].contains("slot 1 at 0x1000") && done[0].contains("3 -> 5"), "{done:?}");
        assert!(done[1].contains("slot 0 at 0x0") && done[1].contains("5 -> 6"), "{done:?}");
        assert_eq!(slot(&s, 1).unwrap(), Header { generation: 5, ..h.clone() });
        assert_eq!(slot(&s, 0).unwrap(), Header { generation: 6, ..h });
        assert_eq!(check(&s).exit_code(), 0);
    }

    #[test]
    fn both_slots_damaged_is_an_error_and_not_repaired() {
        let s = image();
        put(&s, 0, &[0u8; 4096]);
        put(&s, 1, &[0xffu8; 4096]);
        let r = check(&s);
        assert_eq!(r.exit_code(), 2);
        assert!(r.corruptions[0].contains("bad magic"), "{r:?}");
        assert!(Image::repair_header_slots(&s).is_err());
        assert!(slot(&s, 0).is_err() && slot(&s, 1).is_err());
    }

    #[test]
    fn a_bad_slot_beside_an_invalid_layout_is_left_alone() {
        let s = image();
        let mut h = slot(&s, 1).unwrap();
        h.journal_offset = h.table_offset;
        put(&s, 1, &h.encode());
        put(&s, 0, &[0u8; 4096]);
        let r = check(&s);
        assert_eq!(r.exit_code(), 2);
        assert_eq!(r.corruptions.len(), 2, "{r:?}");
        assert!(Image::repair_header_slots(&s).unwrap().is_empty());
        assert!(slot(&s, 0).is_err());
    }
}
