//! Looking at an image without changing it: info, check, map.

use super::open::{load, read_header};
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
    pub journal_blocks_replayed: u64,
    pub journal_records_replayed: u64,
    pub dirty: bool,
    pub allocated_chunks: u64,
    pub total_chunks: u64,
    pub repaired: bool,
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
    let loaded = match load(s) {
        Ok(l) => l,
        Err(e) => {
            r.corruptions.push(e.to_string());
            return r;
        }
    };
    r.dirty = loaded.header.is_dirty();
    r.journal_blocks_replayed = loaded.replayed_blocks;
    r.journal_records_replayed = loaded.replayed_records;
    let geo = &loaded.geo;
    r.total_chunks = geo.chunks();
    let problems = table_problems(geo, &loaded.table, s.size());
    r.corruptions.extend(problems.iter().map(|e| format!("{}: {e}", s.name())));
    r.allocated_chunks = loaded.table.iter().filter(|&&e| e != 0).count() as u64;
    if geo.has_table() && problems.is_empty() {
        {
            let mut used = vec![false; geo.chunks() as usize];
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
            if !r.leaked_chunks.is_empty() {
                r.leaks.push(format!(
                    "{}: {} unreferenced chunk(s) still occupy storage ({} bytes)",
                    s.name(),
                    r.leaked_chunks.len(),
                    r.leaked_chunks.len() as u64 * cb
                ));
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
}

impl Image {
    /// Classifies the whole guest disk into ranges.
    pub fn map(&self) -> Vec<MapRange> {
        let geo = &self.meta.geo;
        let bs = geo.block_size as u64;
        let size = geo.virtual_size.0;
        let mut out: Vec<MapRange> = Vec::new();
        let mut push = |start: u64, length: u64, kind: MapKind, offset: Option<u64>| {
            if let Some(l) = out.last_mut() {
                let contiguous = match (l.offset, offset) {
                    (Some(a), Some(b)) => a + l.length == b,
                    (None, None) => true,
                    _ => false,
                };
                if l.kind == kind && l.start + l.length == start && contiguous {
                    l.length += length;
                    return;
                }
            }
            out.push(MapRange { start, length, kind, offset });
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
