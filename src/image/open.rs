//! Opening an image: header, geometry, metadata load, journal replay.

use super::base::open_base;
use super::{Base, Image, ImageError, JournalPos, Stats};
use crate::format::journal::Shape;
use crate::format::{self, Geometry, Header, HEADER_AREA, META_BLOCK};
use crate::meta::{self, Meta};
use crate::storage::{open_image_storage, OpenMode, Storage, StorageOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Make every write's data and metadata durable before it completes.
    pub writethrough: bool,
    /// Growth step of the storage (None: the storage's default, see [`crate::storage`]).
    pub grow_unit: Option<u64>,
    /// Grow an LV ahead of need, by whole grow units, as a serving daemon
    /// does so that writes rarely wait for lvextend. Without it (the one-shot
    /// commands: commit, rebase, prefetch, io, ...) an LV grows only as far
    /// as each write needs.
    pub grow_ahead: bool,
    /// Bypass the host page cache for data (O_DIRECT), as qemu's cache=none.
    pub direct: bool,
    /// Copy-on-read: None follows the image's default (set at create).
    pub copy_on_read: Option<bool>,
    /// A file on tmpfs for the volatile log (see [`super::volatile`]):
    /// records a previous daemon left there are replayed after the journal,
    /// then the file starts afresh.
    pub volatile_log: Option<std::path::PathBuf>,
    /// Opened as a layer of a chain: the chain reads below it, so it opens no
    /// base of its own (see [`super::base`]).
    pub chain_member: bool,
    /// Allow a write-open of a frozen layer (a commit into it).
    pub allow_frozen: bool,
    /// Allow a read-only open of a layer marked invalid (`fvd info`, to
    /// show it); everything else refuses such a layer.
    pub allow_invalid: bool,
}

/// Bytes of copy-on-read data queued at most.
const COR_QUEUE_LIMIT: u64 = 32 << 20;

/// The metadata as found on storage, before it goes live.
pub(crate) struct Loaded {
    pub header: Header,
    pub geo: Geometry,
    pub table: Vec<u32>,
    pub bitmap: format::BitmapBits,
    /// Journal blocks replayed (0 when the image was clean).
    pub replayed_blocks: u64,
    pub replayed_records: u64,
    /// The journal block the replay stopped at is damage, not the log's end.
    pub journal_damage: Option<crate::format::journal::Damage>,
    /// Stripes of the table and bitmap not good in one copy or in both (see
    /// [`crate::format::twin`]).
    pub meta_faults: Vec<crate::format::twin::StripeFault>,
    /// With repairable faults: the good metadata stream as checkpointed (before
    /// any replay), which a read-write open writes over the bad stripes.
    pub meta_stream: Option<Vec<u8>>,
}

fn io_err(s: &dyn Storage, what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = s.name().to_string();
    move |source| ImageError::Io { path, what, offset, source }
}

/// Why a header slot is not valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SlotError {
    #[error(transparent)]
    Decode(#[from] format::HeaderError),
    #[error("holds generation {generation}, which belongs in slot {} (slot = generation % 2)", generation % 2)]
    WrongSlot { generation: u64 },
}

/// Both header slots as found on storage.
#[derive(Debug)]
pub(crate) struct HeaderSlots {
    /// The valid slot with the highest generation: the header the image opens with.
    pub(crate) current: Header,
    /// Index (0 or 1) of the slot `current` came from.
    pub(crate) current_slot: usize,
    /// Slots that are not valid, by index: every image has two valid slots
    /// (create writes both), so each one here is damage or a torn header write.
    pub(crate) bad: Vec<(usize, SlotError)>,
    /// What the journal showed of a newer header that was lost with the bad
    /// slot, and how `current` was brought up to it (see [`roll_forward`]).
    pub(crate) rolled_forward: Option<String>,
}

/// With one header slot bad, the valid one may be a generation behind what
/// was last written. Two such losses would lose flushed writes, and the
/// journal tells both apart from every other case:
/// - the valid header is clean, yet journal block 0 is a valid block of its
///   own log: the lost header was the next session's dirty mark, written
///   before that block. The log is replayed (the header is taken as dirty).
/// - journal block 0 is a valid block of the next log (sequence + the
///   journal's length in blocks): the lost header was a checkpoint (its table
///   and bitmap are on storage, written before it), and commits followed.
///   The header takes that log's sequence, dirty, and its log is replayed.
///
/// Every other header write carries nothing a replay needs (a lower prefetch
/// cursor or initialised end only repeats work). Returns what was done.
fn roll_forward(s: &dyn Storage, h: &mut Header) -> Option<String> {
    let cap = h.journal_len / META_BLOCK;
    let shape = Shape::of(h.incompat);
    let first = shape.offset(1);
    if cap == 0 || h.journal_offset.checked_add(first).is_none_or(|end| end > s.size()) {
        return None;
    }
    // Block 0, in every copy the journal keeps.
    let mut b0 = vec![0u8; first as usize];
    s.read_at(&mut b0, h.journal_offset).ok()?;
    let decodes = |seq: u64| shape.decode(&b0, 0, seq).is_ok();
    if !h.is_dirty() && decodes(h.journal_seq) {
        h.flags |= format::header::FLAG_DIRTY;
        return Some(format!(
            "the valid header says clean, but the journal holds commits of a later session (generation {} was lost \
             with the bad slot): they are replayed",
            h.generation + 1
        ));
    }
    let next = h.journal_seq.checked_add(cap)?;
    if decodes(next) {
        h.journal_seq = next;
        h.flags |= format::header::FLAG_DIRTY;
        return Some(format!(
            "the journal holds commits made after a checkpoint whose header (generation {}) was lost with the bad \
             slot: that checkpoint's log is replayed",
            h.generation + 1
        ));
    }
    None
}

/// Byte offset of header slot `i`.
pub(crate) fn slot_offset(i: usize) -> u64 {
    i as u64 * META_BLOCK
}

/// Reads both header slots: the current header, and which slots are not
/// valid and why. Fails only when neither slot holds a header.
pub(crate) fn read_header_slots(s: &dyn Storage) -> Result<HeaderSlots, ImageError> {
    let path = s.name().to_string();
    let size = s.size();
    if size < META_BLOCK {
        return Err(ImageError::Header { path, source: format::HeaderError::Truncated(size as usize) });
    }
    let mut buf = vec![0u8; HEADER_AREA as usize];
    let n = (size.min(HEADER_AREA)) as usize;
    s.read_at(&mut buf[..n], 0).map_err(io_err(s, "header read", 0))?;
    let block = META_BLOCK as usize;
    let decoded = [Header::decode(&buf[..block]), Header::decode(&buf[block..n])];
    let mut bad = Vec::new();
    let mut valid = Vec::new();
    for (i, d) in decoded.into_iter().enumerate() {
        match d {
            Ok(h) => {
                if h.generation % 2 != i as u64 {
                    bad.push((i, SlotError::WrongSlot { generation: h.generation }));
                }
                valid.push((i, h));
            }
            Err(e) => bad.push((i, SlotError::Decode(e))),
        }
    }
    // The highest generation wins; on a tie, slot 0.
    let newest = valid.into_iter().reduce(|a, b| if b.1.generation > a.1.generation { b } else { a });
    let Some((current_slot, mut current)) = newest else {
        // Neither slot decodes: the error is slot 0's.
        let source = match bad.into_iter().next() {
            Some((_, SlotError::Decode(e))) => e,
            _ => format::HeaderError::BadMagic,
        };
        return Err(ImageError::Header { path, source });
    };
    let rolled_forward = if bad.is_empty() { None } else { roll_forward(s, &mut current) };
    Ok(HeaderSlots { current, current_slot, bad, rolled_forward })
}

/// Reads both header slots and returns the valid one with the highest generation.
pub(crate) fn read_header(s: &dyn Storage) -> Result<Header, ImageError> {
    read_header_slots(s).map(|h| h.current)
}

/// Loads header, table and bitmap, and replays the journal in memory when the
/// image is dirty. Writes nothing.
pub(crate) fn load(s: &dyn Storage) -> Result<Loaded, ImageError> {
    let path = s.name().to_string();
    let slots = read_header_slots(s)?;
    let mut header = slots.current;
    let geo =
        Geometry::from_header(&header, s.size()).map_err(|source| ImageError::Layout { path: path.clone(), source })?;
    // With a header slot lost, the valid one may describe an older copy than
    // both copies now hold: copies that agree are then taken (see `meta_copies`).
    let read = super::meta_copies::read(s, &geo, &header, !slots.bad.is_empty())?;
    let meta_stream =
        read.faults.iter().any(|f| f.repairable).then(|| super::meta_copies::stream(&geo, &read.table, &read.bitmap));
    let meta_faults = read.faults;
    if let Some(sums) = read.resummed {
        header.meta_sums = sums;
    }
    let (mut table, mut bitmap) = (read.table, read.bitmap);
    let mut replayed_blocks = 0;
    let mut replayed_records = 0;
    let mut journal_damage = None;
    if header.is_dirty() {
        let mut jbytes = vec![0u8; geo.journal_len as usize];
        s.read_at(&mut jbytes, geo.journal_offset).map_err(io_err(s, "journal read", geo.journal_offset))?;
        let shape = Shape::of(header.incompat);
        for i in 0..shape.capacity(geo.journal_len) {
            let Ok(block) = shape.decode(&jbytes, i, header.journal_seq + i) else {
                if header.incompat & format::header::INCOMPAT_JOURNAL_POS != 0 {
                    journal_damage = format::journal::find_damage(shape, &jbytes, header.journal_seq, i);
                }
                break;
            };
            for r in &block.records {
                meta::apply_record(&geo, &mut table, &mut bitmap, r)
                    .map_err(|source| ImageError::Meta { path: path.clone(), source })?;
            }
            replayed_blocks += 1;
            replayed_records += block.records.len() as u64;
        }
    }
    Ok(Loaded {
        header,
        geo,
        table,
        bitmap,
        replayed_blocks,
        replayed_records,
        journal_damage,
        meta_faults,
        meta_stream,
    })
}

/// The error for a journal that is damaged before its end (see [`Loaded`]).
pub(crate) fn journal_damage_error(name: &str, l: &Loaded) -> Option<ImageError> {
    l.journal_damage.as_ref().map(|d| ImageError::JournalDamaged {
        path: name.to_string(),
        block: d.block,
        offset: l.geo.journal_offset + Shape::of(l.header.incompat).offset(d.block),
        why: d.error.to_string(),
        later: d.later,
    })
}

/// The initialised end to hand a plain block device at open (see
/// [`crate::storage::device`]): the header's mark, raised past every chunk a durable
/// record names (a chunk is zeroed and written, and synced, before its record is
/// journaled, so such a chunk lies below a mark the header may not show yet). An image
/// from before the mark existed (0) gets the whole device, as it always had.
fn initialised_end(l: &Loaded) -> u64 {
    if l.header.initialised_end == 0 {
        return u64::MAX;
    }
    let used = l.table.iter().max().copied().unwrap_or(0) as u64;
    l.header.initialised_end.max(l.geo.data_offset.saturating_add(used.saturating_mul(l.geo.chunk_bytes())))
}

fn invalid_error(name: &str) -> ImageError {
    ImageError::Invalid {
        path: name.to_string(),
        why: "marked invalid: a commit wrote into a layer below it (or a convert into it did not finish), \
              so it no longer reads what it should"
            .into(),
    }
}

impl Image {
    /// Opens an image file or block device, and its base.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image, ImageError> {
        let mode = if opts.read_only { OpenMode::ReadOnly } else { OpenMode::ReadWrite };
        let so = StorageOptions {
            grow_unit: opts.grow_unit,
            direct: opts.direct,
            grow_ahead: opts.grow_ahead,
            ..StorageOptions::new(mode)
        };
        let storage = open_image_storage(path, &so)?;
        let header = read_header(storage.as_ref())?;
        if header.is_invalid() {
            if !opts.allow_invalid && !opts.chain_member {
                return Err(invalid_error(storage.name()));
            }
            // Shown, not read: its chain may no longer open (a commit renewed
            // the identity of the layer it wrote into).
            let opts = OpenOptions { chain_member: true, ..opts.clone() };
            return Image::open_on(path, storage, None, &opts);
        }
        // Once the whole base is in the image the base is never opened again:
        // it may have been moved away.
        let base = if header.is_prefetched() { None } else { open_base(path, &header)? };
        Image::open_on(path, storage, base, opts)
    }

    /// Opens an image on given storage with an already opened base.
    pub fn open_on(
        path: &Path,
        storage: Box<dyn Storage>,
        base: Option<Base>,
        opts: &OpenOptions,
    ) -> Result<Image, ImageError> {
        let name = storage.name().to_string();
        let mut loaded = load(storage.as_ref())?;
        if let Some(e) = journal_damage_error(&name, &loaded) {
            return Err(e);
        }
        // Metadata no copy holds good is never used.
        if let Some(f) = loaded.meta_faults.iter().find(|f| !f.repairable) {
            return Err(super::meta_copies::lost_error(storage.as_ref(), &loaded.geo, f));
        }
        if !opts.read_only && !loaded.meta_faults.is_empty() {
            super::meta_copies::repair(storage.as_ref(), &loaded)?;
        }
        let mut replayed_volatile = 0;
        if let (Some(log), false) = (&opts.volatile_log, opts.read_only) {
            for r in super::volatile::read(log, path, loaded.header.session) {
                meta::apply_record(&loaded.geo, &mut loaded.table, &mut loaded.bitmap, &r)
                    .map_err(|source| ImageError::Meta { path: name.clone(), source })?;
                replayed_volatile += 1;
            }
            if replayed_volatile > 0 {
                tracing::info!(image = %name, records = replayed_volatile, "volatile log of the previous daemon replayed");
                loaded.header.flags |= format::header::FLAG_DIRTY;
            }
        }
        if !opts.read_only && loaded.header.is_frozen() && !opts.allow_frozen {
            return Err(ImageError::Frozen { path: name });
        }
        // Never opened again to read or write its data; a chain member only
        // while a commit through it is completed, and `fvd info` to say so.
        if loaded.header.is_invalid() && !opts.chain_member && !opts.allow_invalid {
            return Err(invalid_error(&name));
        }
        if loaded.header.base_size > 0 && base.is_none() && !loaded.header.is_prefetched() && !opts.chain_member {
            return Err(ImageError::Base {
                path: name,
                base: loaded.header.base_path.clone(),
                why: "the image needs its base and none was given".into(),
            });
        }
        storage.set_size_limit(loaded.geo.max_storage_size());
        if storage.initialised_end().is_some() {
            storage.set_initialised_end(initialised_end(&loaded));
        }
        let hwm = meta::validate_table(&loaded.geo, &loaded.table, storage.size())
            .map_err(|source| ImageError::Meta { path: name.clone(), source })?;
        let recovered = loaded.header.is_dirty();
        if recovered && opts.read_only {
            // A read-only look (`fvd info` while a daemon serves the image)
            // sees a dirty header all the time; replaying into memory is the
            // normal way to read it, not news for the operator.
            tracing::debug!(
                image = %name,
                records = loaded.replayed_records,
                "image is open elsewhere or was not closed cleanly: journal replayed in memory only"
            );
        } else if recovered {
            tracing::info!(
                image = %name,
                blocks = loaded.replayed_blocks,
                records = loaded.replayed_records,
                "image was not closed cleanly: journal replayed"
            );
        }
        // This writer's session: a fresh one with a volatile log, none
        // without. It reaches storage with the first header write (the first
        // change, or the recovery checkpoint), which makes every older log stale.
        let session = match (&opts.volatile_log, opts.read_only) {
            (Some(_), false) => rand::random::<u64>() | 1,
            (None, false) => 0,
            (_, true) => loaded.header.session,
        };
        loaded.header.session = session;
        let cor_default = loaded.header.compat & format::header::COMPAT_COPY_ON_READ != 0;
        let journal_shape = Shape::of(loaded.header.incompat);
        let cor_on = opts.copy_on_read.unwrap_or(cor_default)
            && !opts.read_only
            && base.is_some()
            && !loaded.header.is_prefetched();
        let mut img = Image {
            volatile: None,
            cor: cor_on.then(|| super::CorQueue::new(COR_QUEUE_LIMIT)),
            prefetch: Default::default(),
            path: path.to_path_buf(),
            meta: if opts.chain_member && opts.read_only {
                Meta::for_layer(
                    loaded.geo,
                    loaded.table,
                    loaded.bitmap,
                    loaded.header.prefetch_cursor,
                    loaded.header.is_prefetched(),
                )
            } else {
                Meta::with_progress(
                    loaded.geo,
                    loaded.table,
                    loaded.bitmap,
                    hwm,
                    loaded.header.prefetch_cursor,
                    loaded.header.is_prefetched(),
                )
            },
            storage,
            base,
            header: Mutex::new(loaded.header),
            journal: async_lock::Mutex::new(JournalPos { next: 0, shape: journal_shape }),
            opts: opts.clone(),
            completed: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            committing: AtomicBool::new(false),
            freeing: std::sync::atomic::AtomicUsize::new(0),
            // A recovered image stays marked dirty until it is closed.
            marked_dirty: AtomicBool::new(recovered),
            closed: AtomicBool::new(opts.read_only),
            recovered,
            stats: Stats::default(),
        };
        if !opts.read_only {
            img.start_writing()?;
            if let Some(log) = &opts.volatile_log {
                match super::volatile::VolatileLog::create(log, path, session) {
                    Ok(v) => {
                        img.meta.persist.enable_volatile();
                        img.volatile = Some(v);
                    }
                    Err(e) => {
                        tracing::warn!(log = %log.display(), error = %e, "no volatile log: metadata is journaled before writes complete instead")
                    }
                }
            }
        }
        Ok(img)
    }

    /// After a crash: wipe chunks that no durable record names (a write may
    /// have reached them without its record) and write the replayed state as
    /// a checkpoint. A clean image is not written to until its first change.
    ///
    /// A header slot that does not hold a valid header (a header write a crash
    /// tore, or damage) is rewritten from the current header before anything
    /// else: the next header write goes to that slot, and this one writes the
    /// current header there unchanged, with the next generation.
    fn start_writing(&self) -> Result<(), ImageError> {
        // Only the slot the next header write goes to: a current header found in
        // the wrong slot is left to `fvd check --repair`, never written over here.
        let bad_slot = read_header_slots(self.storage.as_ref())
            .map(|h| h.bad.iter().any(|(i, _)| *i as u64 == (h.current.generation + 1) % 2))
            .unwrap_or(false);
        if !self.recovered && !bad_slot {
            return Ok(());
        }
        let ring = super::offline_ring(&self.name())?;
        ring.block_on(async {
            if bad_slot {
                tracing::info!(image = %self.name(), "a header slot was not valid: rewritten from the current header");
                self.write_header(&ring, |_| {}).await?;
            }
            if !self.recovered {
                return Ok(());
            }
            self.wipe_unreferenced(&ring).await?;
            let mut j = self.journal_lock().await;
            self.checkpoint_locked(&ring, &mut j).await
        })
        .map_err(|source| ImageError::Io { path: self.name(), what: "open", offset: 0, source })?
    }

    pub(crate) fn name(&self) -> String {
        self.storage.name().to_string()
    }
}
