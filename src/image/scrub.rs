//! Scrubbing: reading every copy of an open image's metadata, verifying it,
//! and rewriting what is damaged from a good copy (`fvd scrub`).
//!
//! A scrub walks three kinds of unit, each under the commit lock (so no commit
//! or checkpoint runs beside it, and requests go on between units):
//! - **the header slots**: the current slot holds the image's header; the other
//!   an older generation that belongs there. A bad slot is rewritten with one or
//!   two header writes of the header in memory (each goes to the other slot).
//! - **one stripe of the table and bitmap** (see [`crate::format::twin`]), in
//!   both copies, against the header's checksum. A stripe bad in one copy is
//!   rewritten from the other. One bad in both is rewritten from memory, where
//!   the daemon holds the whole table and bitmap: a checkpoint writes both copies.
//! - **one block of the current journal log**, every copy it is kept in. A bad
//!   copy is rewritten from a good one; a block no copy of which decodes is
//!   superseded by a checkpoint (memory holds its records' effect).
//!
//! Images made before the twin (`INCOMPAT_META_TWIN`) have no checksums on the
//! table and bitmap: those are not verified, and the report says so. A
//! read-only image is verified and nothing is written.
//!
//! The pace is a byte rate of metadata read; the caller's `enter` runs before
//! each unit and may end the scrub (a daemon stopping, an image swapped by an
//! online snapshot or resize).

use super::{Image, ImageError};
use crate::format::{twin, Header, META_BLOCK};
use crate::io::{self, IoEngine};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// What a scrub did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ScrubReport {
    pub image: String,
    /// Metadata bytes read (every copy).
    pub bytes_read: u64,
    /// Header slots verified (2).
    pub header_slots: u64,
    /// Stripes of the table and bitmap verified, each in both copies.
    pub stripes: u64,
    /// Blocks of the current journal log verified, each in every copy.
    pub journal_blocks: u64,
    /// Damage found and rewritten, one line each.
    pub repaired: Vec<String>,
    /// Damage found and not rewritten (a read-only image, or no good copy
    /// offline), one line each.
    pub unrepaired: Vec<String>,
    pub notes: Vec<String>,
    /// The scrub ended before its last unit (asked to stop).
    pub stopped: bool,
    pub seconds: f64,
}

impl ScrubReport {
    /// 0: every copy good (or rewritten); 2: damage left.
    pub fn exit_code(&self) -> i32 {
        if self.unrepaired.is_empty() {
            0
        } else {
            2
        }
    }
}

/// One unit of a scrub (see the module docs).
#[derive(Debug, Clone, Copy)]
enum Unit {
    Header,
    Stripe(usize),
    Journal(u64),
}

/// Spaces units so that metadata is read at no more than `rate` bytes/s.
struct Pace {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Pace {
    async fn after<E: IoEngine>(&mut self, e: &E, n: u64) {
        self.bytes += n;
        let Some(rate) = self.rate.filter(|&r| r > 0) else { return };
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            io::sleep(e, wait).await;
        }
    }
}

impl Image {
    /// Scrubs this image's metadata (see the module docs) at no more than
    /// `rate` bytes/s. `enter` runs before each unit and is held through it;
    /// `None` ends the scrub early.
    pub async fn scrub<E: IoEngine, G>(
        &self,
        e: &E,
        rate: Option<u64>,
        mut enter: impl FnMut() -> Option<G>,
    ) -> Result<ScrubReport, ImageError> {
        let t0 = Instant::now();
        let mut r = ScrubReport { image: self.name(), ..Default::default() };
        if !self.header().has_twin() && self.meta.geo.meta_len() > 0 {
            r.notes.push(format!(
                "{}: made before the twin, its table and bitmap have no checksums and no second copy, so they \
                 are not verified; 'fvd upgrade IMAGE' (offline) gives it both",
                self.name()
            ));
        }
        let stripes = twin::stripes(self.meta.geo.meta_len()).1;
        let mut pace = Pace { rate, start: Instant::now(), bytes: 0 };
        let units = std::iter::once(Unit::Header).chain((0..stripes).map(Unit::Stripe)).chain((0..).map(Unit::Journal));
        for unit in units {
            let Some(guard) = enter() else {
                r.stopped = true;
                break;
            };
            self.check_not_failed()?;
            let before = r.bytes_read;
            let more = self.scrub_unit(e, unit, &mut r).await?;
            drop(guard);
            if !more {
                break;
            }
            pace.after(e, r.bytes_read - before).await;
        }
        r.seconds = t0.elapsed().as_secs_f64();
        Ok(r)
    }

    /// One unit; false once the journal's log has no more blocks.
    async fn scrub_unit<E: IoEngine>(&self, e: &E, unit: Unit, r: &mut ScrubReport) -> Result<bool, ImageError> {
        let mut j = self.journal_lock().await;
        let writable = !self.opts.read_only;
        let h = self.header();
        match unit {
            Unit::Header => {
                let mut buf = io::AlignedBuf::zeroed(2 * META_BLOCK as usize);
                self.scrub_read(e, &mut buf, 0, r).await?;
                r.header_slots = 2;
                let bad: Vec<(usize, String)> = (0..2usize)
                    .filter_map(|i| slot_problem(&buf[i * META_BLOCK as usize..][..META_BLOCK as usize], i, &h))
                    .collect();
                let current_bad = bad.iter().any(|(i, _)| *i as u64 == h.generation % 2);
                for (i, why) in &bad {
                    let at = *i as u64 * META_BLOCK;
                    let what = format!("{}: header slot {i} at {at:#x}: {why}", self.name());
                    if writable {
                        r.repaired.push(format!("{what}: rewritten from the header in memory"));
                    } else {
                        r.unrepaired.push(format!("{what} (read-only: not rewritten)"));
                    }
                }
                if writable && !bad.is_empty() {
                    // Each write goes to the slot not current: a bad current
                    // slot takes two.
                    self.write_header(e, |_| {}).await?;
                    if current_bad {
                        self.write_header(e, |_| {}).await?;
                    }
                }
                Ok(true)
            }
            Unit::Stripe(i) => {
                if !h.has_twin() {
                    return Ok(true);
                }
                let geo = &self.meta.geo;
                let range = twin::stripe_range(geo.meta_len(), i);
                let Some(&sum) = h.meta_sums.get(i) else { return Ok(true) };
                let mut copies = Vec::with_capacity(2);
                for copy in 0..2u32 {
                    let mut b = io::AlignedBuf::zeroed(range.len());
                    for (off, part) in super::meta_copies::extents(geo, copy, range.clone()) {
                        let at = part.start - range.start;
                        self.scrub_read(e, &mut b[at..at + part.len()], off, r).await?;
                    }
                    let good = crc32fast::hash(&b) == sum;
                    copies.push((b, good));
                }
                r.stripes += 1;
                let fault =
                    |copy: u32, repairable| twin::StripeFault { copy, stripe: i, range: range.clone(), repairable };
                let good: Vec<u32> = (0..2u32).filter(|&c| copies[c as usize].1).collect();
                match good.as_slice() {
                    [_, _] => {}
                    [g] => {
                        let bad = 1 - g;
                        let what = super::meta_copies::describe(geo, &fault(bad, true));
                        if writable {
                            for (off, part) in super::meta_copies::extents(geo, bad, range.clone()) {
                                let at = part.start - range.start;
                                let b = io::AlignedBuf::from_slice(&copies[*g as usize].0[at..at + part.len()]);
                                io::write_at(e, self.storage.as_ref(), &b, off)
                                    .await
                                    .map_err(self.io_error("metadata repair", off))?;
                            }
                            io::sync(e, self.storage.as_ref()).await.map_err(self.io_error("fdatasync", 0))?;
                            r.repaired.push(format!(
                                "{}: the {what} did not match its checksum: rewritten from the other copy",
                                self.name()
                            ));
                        } else {
                            r.unrepaired.push(format!(
                                "{}: the {what} does not match its checksum (read-only: not rewritten)",
                                self.name()
                            ));
                        }
                    }
                    _ => {
                        let what = super::meta_copies::describe(geo, &fault(h.meta_copy, false));
                        if writable {
                            self.checkpoint_locked(e, &mut j).await?;
                            r.repaired.push(format!(
                                "{}: the {what} matched its checksum in neither copy: both copies rewritten from \
                                 memory (a checkpoint)",
                                self.name()
                            ));
                        } else {
                            r.unrepaired.push(format!(
                                "{}: the {what} matches its checksum in neither copy (read-only: not rewritten)",
                                self.name()
                            ));
                        }
                    }
                }
                Ok(true)
            }
            Unit::Journal(i) => {
                if i >= j.next {
                    return Ok(false);
                }
                let shape = j.shape;
                let geo = &self.meta.geo;
                let off = geo.journal_offset + shape.offset(i);
                let mut group = io::AlignedBuf::zeroed((shape.copies() * META_BLOCK) as usize);
                self.scrub_read(e, &mut group, off, r).await?;
                r.journal_blocks += 1;
                let errs = shape.copy_errors(&group, h.journal_seq + i);
                let good = errs.iter().position(Option::is_none);
                for (c, err) in errs.iter().enumerate() {
                    let Some(err) = err else { continue };
                    let at = off + c as u64 * META_BLOCK;
                    let what = format!("{}: journal block {i}, copy {c} at {at:#x}: {err}", self.name());
                    match (writable, good) {
                        (false, _) => r.unrepaired.push(format!("{what} (read-only: not rewritten)")),
                        (true, Some(g)) => {
                            let from = g * META_BLOCK as usize;
                            let b = io::AlignedBuf::from_slice(&group[from..from + META_BLOCK as usize]);
                            io::write_at(e, self.storage.as_ref(), &b, at)
                                .await
                                .map_err(self.io_error("journal repair", at))?;
                            r.repaired.push(format!("{what}: rewritten from copy {g}"));
                        }
                        (true, None) => {
                            r.repaired.push(format!(
                                "{what}: no copy decodes; the log is superseded by a checkpoint from memory"
                            ));
                        }
                    }
                }
                if writable && good.is_none() {
                    self.checkpoint_locked(e, &mut j).await?;
                    return Ok(false);
                }
                if writable && errs.iter().any(Option::is_some) {
                    io::sync(e, self.storage.as_ref()).await.map_err(self.io_error("fdatasync", 0))?;
                }
                Ok(true)
            }
        }
    }

    async fn scrub_read<E: IoEngine>(
        &self,
        e: &E,
        buf: &mut [u8],
        off: u64,
        r: &mut ScrubReport,
    ) -> Result<(), ImageError> {
        io::read_at(e, self.storage.as_ref(), buf, off).await.map_err(self.io_error("scrub read", off))?;
        r.bytes_read += buf.len() as u64;
        Ok(())
    }
}

/// Why header slot `i` (its bytes `b`) is not what an image whose current
/// header is `h` has there, if it is not.
fn slot_problem(b: &[u8], i: usize, h: &Header) -> Option<(usize, String)> {
    let current = h.generation % 2 == i as u64;
    let why = match Header::decode(b) {
        Err(e) => e.to_string(),
        Ok(s) if current && s.generation != h.generation => {
            format!("holds generation {}, where the image's header is generation {}", s.generation, h.generation)
        }
        Ok(s) if !current && (s.generation % 2 != i as u64 || s.generation > h.generation) => {
            format!("holds generation {}, which does not belong in it", s.generation)
        }
        Ok(_) => return None,
    };
    Some((i, why))
}

/// `fvd scrub IMAGE`, for an image no daemon serves: notes what a read-write
/// open rewrites (a bad header slot, stripes bad in one copy, journal block
/// copies of an image not closed cleanly), opens it read-write without its base
/// (which rewrites those, and recovers an image not closed cleanly), scrubs
/// it, and closes it. An image the open refuses (metadata no copy holds good,
/// a damaged journal) is left exactly as it was, and the report says why.
pub fn scrub_offline(path: &std::path::Path, rate: Option<u64>) -> Result<ScrubReport, ImageError> {
    use super::open::{load, read_header_slots, slot_offset};
    use crate::storage::{open_image_storage, OpenMode, StorageOptions};
    let storage = open_image_storage(path, &StorageOptions::new(OpenMode::ReadWrite))?;
    let s = storage.as_ref();
    let name = s.name().to_string();
    let mut found = Vec::new();
    let slots = read_header_slots(s)?;
    for (i, e) in &slots.bad {
        found.push(format!("{name}: header slot {i} at {:#x}: {e}: rewritten from the other slot", slot_offset(*i)));
    }
    let l = load(s)?;
    for f in l.meta_faults.iter().filter(|f| f.repairable) {
        found.push(format!(
            "{name}: the {} did not match its checksum: rewritten from the other copy",
            super::meta_copies::describe(&l.geo, f)
        ));
    }
    let dirty = l.header.is_dirty();
    if dirty {
        let mut region = vec![0u8; l.geo.journal_len as usize];
        s.read_at(&mut region, l.geo.journal_offset).map_err(|source| ImageError::Io {
            path: name.clone(),
            what: "journal read",
            offset: l.geo.journal_offset,
            source,
        })?;
        let shape = crate::format::journal::Shape::of(l.header.incompat);
        for b in crate::format::journal::bad_copies(shape, &region, l.header.journal_seq) {
            let at = l.geo.journal_offset + shape.offset(b.block) + b.copy * META_BLOCK;
            found.push(format!(
                "{name}: journal block {}, copy {} at {at:#x}: {}: replayed from the other copy, and superseded by \
                 the recovery's checkpoint",
                b.block, b.copy, b.error
            ));
        }
    }
    let records = l.replayed_records;
    drop(l);
    let opts = super::OpenOptions { chain_member: true, allow_frozen: true, ..Default::default() };
    let img = match Image::open_on(path, storage, None, &opts) {
        Ok(img) => img,
        Err(e) => {
            found.push(format!(
                "{e}; nothing was written: 'fvd check --repair' keeps what can be trusted and names what may be lost"
            ));
            return Ok(ScrubReport { image: name, unrepaired: found, ..Default::default() });
        }
    };
    let ring = super::offline_ring(&name)?;
    let io_err = |source| ImageError::Io { path: name.clone(), what: "scrub", offset: 0, source };
    let mut r = ring.block_on(img.scrub(&ring, rate, || Some(()))).map_err(io_err)??;
    img.close()?;
    found.append(&mut r.repaired);
    r.repaired = found;
    if dirty {
        r.notes.push(format!(
            "{name}: was not closed cleanly: its journal was replayed ({records} record(s)) and checkpointed"
        ));
    }
    Ok(r)
}
