//! create, info, check, map.

use super::{fail, CliError};
use clap::Args;
use fvd::format::Geometry;
use fvd::image::{self, CreateOptions, Image, OpenOptions};
use fvd::storage::{FileStorage, OpenMode, Storage};
use fvd::units::{human, parse_size};
use serde_json::json;
use std::path::PathBuf;

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map(|b| b.0)
}

fn size32_arg(s: &str) -> Result<u32, String> {
    let v = parse_size(s)?.0;
    u32::try_from(v).map_err(|_| format!("'{s}' is too large"))
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The new image file, or an existing block device to format.
    pub image: PathBuf,
    /// Virtual disk size (k/M/G/T suffixes); defaults to the base's size.
    #[arg(short, long, value_parser = size_arg)]
    pub size: Option<u64>,
    /// Read-only base image (raw or fvd); relative paths are relative to the image's folder.
    #[arg(short, long)]
    pub base: Option<PathBuf>,
    /// Copy-on-write block size, 4k to 1M.
    #[arg(long, value_parser = size32_arg, default_value = "64k")]
    pub block_size: u32,
    /// Allocation chunk size (power-of-two multiple of the block, up to 64M).
    #[arg(long, value_parser = size32_arg, default_value = "1M", conflicts_with = "no_table")]
    pub chunk_size: u32,
    /// No table: raw layout, guest offset X at data offset + X.
    #[arg(long)]
    pub no_table: bool,
    /// Journal size.
    #[arg(long, value_parser = size_arg, default_value = "16M")]
    pub journal_size: u64,
    /// Do not scan the base for holes and zero blocks (by default their bits
    /// are preset, so they never cost a copy or a bitmap update).
    #[arg(long)]
    pub no_zero_detect: bool,
    /// Serve with copy-on-read by default (reads from the base are stored in the image).
    #[arg(long)]
    pub copy_on_read: bool,
    /// Prefetch the whole base into the image in the background by default.
    #[arg(long)]
    pub prefetch: bool,
}

pub fn create(a: CreateArgs) -> Result<i32, CliError> {
    if a.size.is_none() && a.base.is_none() {
        return Err(fail(format!("{}: give --size, or --base to take the base's size", a.image.display())));
    }
    let opts = CreateOptions {
        size: a.size,
        base: a.base.clone(),
        block_size: a.block_size,
        chunk_size: (!a.no_table).then_some(a.chunk_size),
        journal_size: a.journal_size,
        zero_detect: !a.no_zero_detect,
        copy_on_read: a.copy_on_read,
        prefetch: a.prefetch,
    };
    // An fvd base is frozen by the create (see `image::create`): say so.
    let base_to_freeze = a.base.as_ref().and_then(|b| {
        let p = if b.is_absolute() { b.clone() } else { a.image.parent().unwrap_or(std::path::Path::new(".")).join(b) };
        image::snapshot::header_at(&p).ok().filter(|h| !h.is_frozen()).map(|_| p)
    });
    let geo = image::create(&a.image, &opts)?;
    println!(
        "Formatting '{}', fmt=fvd size={} block_size={} {}{}",
        a.image.display(),
        geo.virtual_size.0,
        geo.block_size,
        match geo.chunk_size {
            Some(c) => format!("chunk_size={c}"),
            None => "table=off".into(),
        },
        a.base.map(|b| format!(" base={}", b.display())).unwrap_or_default()
    );
    if let Some(b) = base_to_freeze {
        println!(
            "{} is now frozen: it is the base of {}, and writes to it are refused",
            b.display(),
            a.image.display()
        );
    }
    if geo.base_blocks() > 0 && !a.no_zero_detect {
        let img = Image::open(&a.image, &OpenOptions { read_only: true, ..Default::default() })?;
        println!("zero blocks of the base preset: {} of {}", img.meta().recorded.count_set(), geo.base_blocks());
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    pub image: PathBuf,
    /// Show every layer of the chain, top to bottom (JSON: an array).
    #[arg(long)]
    pub backing_chain: bool,
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

fn geometry_json(g: &Geometry) -> serde_json::Value {
    json!({
        "virtual-size": g.virtual_size.0,
        "block-size": g.block_size,
        "chunk-size": g.chunk_size,
        "table": g.has_table(),
        "chunks": g.chunks(),
        "base-blocks": g.base_blocks(),
        "metadata-bytes": g.metadata_bytes(),
        "regions": {
            "table": [g.table_offset, g.table_len],
            "bitmap": [g.bitmap_offset, g.bitmap_len],
            "journal": [g.journal_offset, g.journal_len],
            "twin": g.twin_offset.map(|t| [t, g.span_len()]),
            "data": g.data_offset,
        },
    })
}

pub fn info(a: InfoArgs) -> Result<i32, CliError> {
    if !a.backing_chain {
        if let Some(v) = info_of(&a.image, &a.output, 0)? {
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        return Ok(0);
    }
    let img = Image::open(&a.image, &OpenOptions { read_only: true, allow_invalid: true, ..Default::default() })?;
    let mut layers: Vec<(PathBuf, bool)> = vec![(a.image.clone(), true)];
    if let Some(b) = img.base() {
        for l in b.layers() {
            layers.push((PathBuf::from(l.name()), l.format() == fvd::format::BaseFormat::Fvd));
        }
    }
    drop(img);
    let mut all = Vec::new();
    for (depth, (path, is_fvd)) in layers.iter().enumerate() {
        if depth > 0 && a.output != "json" {
            println!();
        }
        if *is_fvd {
            if let Some(v) = info_of(path, &a.output, depth)? {
                all.push(v);
            }
        } else {
            let s = FileStorage::open(path, OpenMode::ReadOnly)?;
            let v = json!({"filename": path.display().to_string(), "format": "raw", "virtual-size": s.size(),
                "depth": depth, "storage-allocated": s.allocated_bytes()});
            if a.output == "json" {
                all.push(v);
            } else {
                println!(
                    "image: {}\nfile format: raw\nvirtual size: {} ({} bytes)\ndepth: {depth}",
                    path.display(),
                    human(s.size()),
                    s.size()
                );
            }
        }
    }
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(0)
}

/// One image's info: printed for people, or returned as JSON.
fn info_of(path: &std::path::Path, output: &str, depth: usize) -> Result<Option<serde_json::Value>, CliError> {
    let a = InfoArgs { image: path.to_path_buf(), backing_chain: false, output: output.to_string() };
    let img = Image::open(&a.image, &OpenOptions { read_only: true, allow_invalid: true, ..Default::default() })?;
    let g = img.geometry();
    let h = img.header();
    let s = img.storage();
    let map = img.map();
    // The image opened from the other slot; it has no spare header until repaired.
    let bad_slots = img.bad_header_slots()?;
    for b in &bad_slots {
        eprintln!("fvd: warning: {}: {}", a.image.display(), b.describe());
    }
    let sum = |k: image::MapKind| map.iter().filter(|r| r.kind == k).map(|r| r.length).sum::<u64>();
    // A daemon serving the image knows more than the header: live prefetch
    // progress, its metadata write counters, and (LV) the growth it drives.
    let served = std::fs::canonicalize(&a.image)
        .ok()
        .and_then(|p| fvd::ublk::control::serving(&fvd::ublk::state::RunDir::system(), &p));
    if served.is_none() {
        super::warn_if_written(&a.image);
    }
    let storage_status = served.as_ref().and_then(|d| d.storage.clone()).or_else(|| img.storage().status());
    // Where the image's use of its storage ends, and the space past it (the slack a
    // stop or `fvd reduce` gives back on a linear LV): from the table on storage, or
    // from the serving daemon, whose table is ahead of it.
    let used_end = match served.as_ref().and_then(|d| d.storage.as_ref()) {
        Some(st) => st.get("used").and_then(|u| u.as_u64()),
        None => img.used_end(),
    };
    let slack = used_end.map(|u| s.size().saturating_sub(u));
    let mut v = json!({
        "filename": a.image.display().to_string(),
        "format": "fvd",
        "clean": !h.is_dirty(),
        "frozen": h.is_frozen(),
        "storage-size": s.size(),
        "storage-allocated": s.allocated_bytes(),
        "storage-used-end": used_end,
        "storage-slack": slack,
        "allocated-chunks": img.allocated_chunks(),
        "copied-blocks": img.meta().bitmap.count_set(),
        "data-bytes": sum(image::MapKind::Data),
        "base-bytes": sum(image::MapKind::Base),
        "zero-bytes": sum(image::MapKind::Zero),
        "journal-seq": h.journal_seq,
        "prefetched": h.is_prefetched(),
        "prefetch-cursor": h.prefetch_cursor,
        "copy-on-read": h.compat & fvd::format::header::COMPAT_COPY_ON_READ != 0,
        "prefetch": h.compat & fvd::format::header::COMPAT_PREFETCH != 0,
        "storage-status": storage_status,
        "bad-header-slots": bad_slots,
        "uuid": fvd::format::header::uuid_text(&h.uuid),
        "frozen": h.is_frozen(),
        "invalid": h.is_invalid(),
        "committing": h.is_committing(),
        "depth": depth,
        "chain-layers": img.base().map_or(0, |b| b.layers().len()),
        "chain-index-bytes": img.base().map_or(0, |b| b.index_bytes()),
    });
    let obj = v.as_object_mut().ok_or_else(|| fail("internal: info is not an object"))?;
    for (k, val) in geometry_json(g).as_object().into_iter().flatten() {
        obj.insert(k.clone(), val.clone());
    }
    if let Some(b) = img.base() {
        obj.insert(
            "base".into(),
            json!({"filename": h.base_path, "resolved": b.name(), "format": b.format().name(), "size": h.base_size}),
        );
    }
    if let Some(d) = &served {
        obj.insert("served-by".into(), json!({"id": d.st.id, "device": d.st.device, "pid": d.st.pid}));
        if let Some(l) = &d.live {
            obj.insert("live".into(), serde_json::to_value(l)?);
        }
    }
    if a.output == "json" {
        return Ok(Some(v));
    }
    println!("image: {}", a.image.display());
    println!("file format: fvd");
    println!("uuid: {}", fvd::format::header::uuid_text(&h.uuid));
    if depth > 0 {
        println!("depth: {depth}");
    }
    if h.is_frozen() {
        println!("frozen: yes (a snapshot layer; overlays read through it)");
    }
    if h.is_invalid() {
        println!("invalid: yes (a commit wrote into a layer below it)");
    }
    if h.is_committing() {
        println!("commit: under way or interrupted (run 'fvd commit' again to complete it)");
    }
    if let Some(b) = img.base().filter(|b| b.layers().len() > 1) {
        println!("chain: {} layers below, index {}", b.layers().len(), human(b.index_bytes() as u64));
    }
    println!("virtual size: {} ({} bytes)", human(g.virtual_size.0), g.virtual_size.0);
    println!(
        "storage size: {} ({} allocated{})",
        human(s.size()),
        s.allocated_bytes().map(human).unwrap_or("n/a".into()),
        match (used_end, slack) {
            (Some(u), Some(k)) => format!(", used to {}, slack {}", human(u), human(k)),
            _ => String::new(),
        }
    );
    println!("block size: {}", g.block_size);
    match g.chunk_size {
        Some(c) => println!("chunk size: {c} ({} chunks, {} allocated)", g.chunks(), img.allocated_chunks()),
        None => println!("table: off (raw layout)"),
    }
    println!("metadata: {} (header + table + bitmap), journal {}", human(g.metadata_bytes()), human(g.journal_len));
    if let Some(b) = img.base() {
        println!("base: {} ({}, {}, resolved to {})", h.base_path, b.format().name(), human(h.base_size), b.name());
        println!(
            "base blocks in the image (written or zero): {} of {}",
            img.meta().bitmap.count_set(),
            g.base_blocks()
        );
    }
    if h.base_size > 0 {
        let pct = |c: u64| 100.0 * c as f64 / g.base_blocks().max(1) as f64;
        if h.is_prefetched() {
            println!("prefetch: done (the base is no longer opened)");
        } else {
            println!("prefetch: {:.1}% ({} of {} blocks)", pct(h.prefetch_cursor), h.prefetch_cursor, g.base_blocks());
        }
    }
    if let Some(st) = &storage_status {
        println!("storage status: {st}");
    }
    println!(
        "data in image: {}, in base: {}, zero: {}",
        human(sum(image::MapKind::Data)),
        human(sum(image::MapKind::Base)),
        human(sum(image::MapKind::Zero))
    );
    match &served {
        Some(d) => {
            println!("clean: no (served by {}, daemon pid {})", d.st.device, d.st.pid);
            if let Some(l) = &d.live {
                print_live(l);
            }
        }
        None => println!("clean: {}", if h.is_dirty() { "no (journal will be replayed at next open)" } else { "yes" }),
    }
    Ok(None)
}

/// The serving daemon's counters, under `fvd info`.
fn print_live(l: &fvd::image::LiveStatus) {
    if let Some(p) = &l.prefetch {
        let cell = super::daemon::prefetch_cell(p);
        println!(
            "prefetch (live): {cell}, {} of {} blocks, {} copied by this daemon, {} back-offs",
            p.cursor_blocks,
            p.base_blocks,
            human(p.copied_bytes),
            p.backoffs
        );
    }
    let s = &l.stats;
    println!(
        "metadata writes (this daemon): {} journal records for {} guest writes ({:.3} per write), \
         {} bitmap records ({:.3} per write), {} commits ({} on the timer), {} records pending",
        s.journal_records,
        s.guest_writes,
        l.records_per_write,
        s.bitmap_records,
        l.bitmap_records_per_write,
        s.journal_commits,
        s.timer_commits,
        l.pending_records
    );
}

#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 clean; 2 corrupt (layout or table damage, or a damaged header slot, \
which --repair rewrites from the intact one); 3 leaked chunks only; 1 the check could not run. \
A dirty image (not closed cleanly) whose journal replays is not an error, nor are its chunks that hold \
data no durable record names (a note: the recovery at the next read-write open wipes them).")]
pub struct CheckArgs {
    pub image: PathBuf,
    /// Rewrite a damaged header slot from the intact one, replay the journal and reclaim leaked chunks.
    #[arg(short, long)]
    pub repair: bool,
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

/// Why the image, whole metadata notwithstanding, does not open as a disk
/// (its base chain, or a header that names no usable base), or None. A layer
/// marked invalid is left out: it is refused on purpose, and noted as such.
fn open_problem(path: &std::path::Path) -> Option<String> {
    if image::snapshot::header_at(path).map(|h| h.is_invalid()).unwrap_or(false) {
        return None;
    }
    Image::open(path, &OpenOptions { read_only: true, ..Default::default() })
        .err()
        .map(|e| format!("{}: does not open as a disk: {e}", path.display()))
}

/// The metadata of every fvd layer under the image, each checked as the
/// image itself is: damage there is damage to what the image reads. Returns
/// (corruptions, notes), each line naming its layer. Layers are frozen and
/// may be shared by other overlays, so `--repair` of the top leaves them to a
/// repair of their own.
fn lower_layer_problems(path: &std::path::Path) -> (Vec<String>, Vec<String>) {
    let (mut bad, mut notes) = (Vec::new(), Vec::new());
    for layer in image::snapshot::chain_paths(path).iter().skip(1) {
        let Ok(s) = FileStorage::open(layer, OpenMode::ReadOnly) else { continue };
        let magic_at = |off: u64| {
            let mut m = [0u8; 8];
            s.size() >= off + 8 && s.read_at(&mut m, off).is_ok() && m == fvd::format::header::MAGIC
        };
        if !magic_at(0) && !magic_at(fvd::format::META_BLOCK) {
            continue; // a raw bottom: no metadata of its own
        }
        let r = image::check(&s);
        let hint = format!(
            "(a layer of the chain of {}: 'fvd check --repair {}' repairs it)",
            path.display(),
            layer.display()
        );
        bad.extend(r.corruptions.iter().map(|c| format!("{c} {hint}")));
        notes.extend(r.leaks.iter().map(|l| format!("{l} {hint}")));
    }
    (bad, notes)
}

pub fn check(a: CheckArgs) -> Result<i32, CliError> {
    let mode = if a.repair { OpenMode::ReadWrite } else { OpenMode::ReadOnly };
    if !a.repair {
        super::warn_if_written(&a.image);
    }
    let s = FileStorage::open(&a.image, mode)?;
    let mut r = image::check(&s);
    if r.corruptions.is_empty() {
        r.corruptions.extend(open_problem(&a.image));
    }
    let mut repairs = Vec::new();
    if a.repair && !r.bad_header_slots.is_empty() {
        // First, so that the header the rest relies on has its spare again.
        repairs = Image::repair_header_slots(&s)?;
        if !repairs.is_empty() {
            r = image::check(&s);
        }
    }
    // With no valid header there is nothing to rebuild from; the image is
    // left exactly as it was.
    if a.repair && !r.no_valid_header && !r.corruptions.is_empty() {
        // Table entries out of range or shared, a journal that replays only part-way.
        let fixed = image::repair_metadata(&s)?;
        if !fixed.is_empty() {
            repairs.extend(fixed);
            r = image::check(&s);
        }
    }
    if a.repair && r.corruptions.is_empty() && (!r.leaks.is_empty() || r.dirty) {
        let cb = image::header_of(&s).map(|h| h.chunk_size as u64).unwrap_or(0);
        let data_off = image::header_of(&s).map(|h| h.data_offset).unwrap_or(0);
        for &p in &r.leaked_chunks {
            s.punch(data_off + p as u64 * cb, cb)?;
        }
        if !r.leaked_chunks.is_empty() {
            repairs.push(format!("{} leaked chunk(s) punched", r.leaked_chunks.len()));
        }
        s.sync()?;
        drop(s);
        // Opening read-write replays the journal and checkpoints it.
        let img = Image::open(&a.image, &OpenOptions::default())?;
        img.close()?;
        drop(img);
        if r.dirty {
            repairs.push(format!("journal replayed ({} record(s)) and checkpointed", r.journal_records_replayed));
        }
        let s = FileStorage::open(&a.image, OpenMode::ReadOnly)?;
        r = image::check(&s);
    }
    if a.repair && r.corruptions.is_empty() {
        r.corruptions.extend(open_problem(&a.image));
    }
    let (lower_bad, lower_notes) = lower_layer_problems(&a.image);
    r.corruptions.splice(0..0, lower_bad);
    r.notes.extend(lower_notes);
    if !repairs.is_empty() {
        r.repaired = true;
        r.repairs = repairs;
    }
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for c in &r.corruptions {
            println!("ERROR {c}");
        }
        for l in &r.leaks {
            println!("Leaked: {l}");
        }
        for n in &r.notes {
            println!("Note: {n}");
        }
        for x in &r.repairs {
            println!("Repaired: {x}");
        }
        if a.repair && r.no_valid_header {
            println!("Not repaired: neither header slot is valid, so there is no geometry to rebuild from.");
        }
        if r.dirty {
            println!(
                "The image was not closed cleanly; its journal holds {} valid block(s), {} record(s), replayable.",
                r.journal_blocks_replayed, r.journal_records_replayed
            );
        }
        if r.exit_code() == 0 {
            println!("No errors were found on the image.");
        }
        if r.total_chunks > 0 {
            println!("{}/{} chunks allocated", r.allocated_chunks, r.total_chunks);
        }
        if r.repaired {
            println!("Repair done.");
        }
    }
    Ok(r.exit_code())
}

#[derive(Args, Debug)]
pub struct MapArgs {
    pub image: PathBuf,
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

pub fn map(a: MapArgs) -> Result<i32, CliError> {
    super::warn_if_written(&a.image);
    let img = Image::open(&a.image, &OpenOptions { read_only: true, ..Default::default() })?;
    let m = img.map();
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(0);
    }
    println!("{:<20}{:<20}{:<8}{:<7}Storage offset", "Offset", "Length", "Kind", "Depth");
    for r in &m {
        let so = r.offset.map(|o| format!("{o:#x}")).unwrap_or_default();
        let kind = match r.kind {
            image::MapKind::Data => "data",
            image::MapKind::Base => "base",
            image::MapKind::Zero => "zero",
        };
        let depth = r.depth.map(|d| d.to_string()).unwrap_or_else(|| "-".into());
        println!("{:<20}{:<20}{:<8}{:<7}{}", format!("{:#x}", r.start), format!("{:#x}", r.length), kind, depth, so);
    }
    Ok(0)
}
