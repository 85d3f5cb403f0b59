//! Crash sequences for `fvd resize` (growing an image offline), in the style of
//! `tests/crash_layers.rs`: one power cut shared by the image's and the base's
//! simulated disks (`PowerCut`), after which each keeps a random subset of
//! what it had not synced (`SimStorage::crash`).
//!
//! For every case, from its starting state:
//! - a power cut at **every** write, punch and sync event of the resize;
//! - after each cut the image is opened as its header says (recovering it)
//!   and must have the old size or the new one, read the old content, and
//!   read zeros past the old end; `check` finds it clean;
//! - then the resize is run again from that state (recovery first), itself cut
//!   at random points, `DEPTH` cuts in a row, and at the end run to
//!   completion: the image has the new size, reads the old content and zeros
//!   after it, and checks clean;
//! - then writes all over the grown disk (past the old end too) and a flush,
//!   a last cut, and the flushed writes must be there.
//!
//! Cases: sizes within the table's room (header only) and past it (the
//! metadata moves), table and raw layout, with and without a base, and a full
//! image (every chunk allocated), whose chunks must go past the old size's
//! chunks while the resize is under way (`INCOMPAT_RESIZING`).

mod common;

use common::world::*;
use common::*;
use fvd::format::layout::CreateParams;
use fvd::format::{BaseFormat, Geometry};
use fvd::image::resize::{grow_on, recover_on, upgrade_on, ResizeKind};
use fvd::image::{check, create_on, header_of, Base, Image, ImageError, Layer, OpenOptions};
use fvd::io::SyncOnly;
use fvd::storage::{PowerCut, SimStorage, Storage};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const SIZE: u64 = 2 << 20;
const BASE: u64 = 1 << 20;
const BLOCK: u32 = 16 << 10;
/// Cuts in a row after the first.
const DEPTH: u32 = 2;
/// Random cut points tried at each deeper level.
const FANOUT: usize = 2;

#[derive(Clone, Copy, Debug)]
struct Case {
    table: bool,
    base: bool,
    /// Every chunk written before the resize.
    full: bool,
    /// Grown to this size (cleanly) before the resize under test.
    pre: Option<u64>,
    target: u64,
    /// What the completed resize must have done.
    kind: ResizeKind,
    /// An image made before the twin, upgraded (`fvd upgrade`) instead of resized.
    upgrade: bool,
}

fn base_of(d: &Disks) -> Option<Base> {
    d.get("base").map(|b| Base::single(Layer::Raw(Box::new(b.clone()) as Box<dyn Storage>)))
}

fn open(d: &Disks, rw: bool) -> Result<Image, ImageError> {
    let opts = OpenOptions { read_only: !rw, ..OpenOptions::default() };
    Image::open_on(Path::new("img"), Box::new(d["img"].clone()), base_of(d), &opts)
}

/// The starting world, the image closed cleanly, and what it reads.
fn start(case: &Case, seed: u64) -> (World, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w: World = BTreeMap::new();
    let mut model = vec![0u8; SIZE as usize];
    if case.base {
        let b = data(seed ^ 0xBA5E, BASE as usize);
        model[..BASE as usize].copy_from_slice(&b);
        w.insert("base".into(), b);
    }
    let geo = Geometry::new(&CreateParams {
        virtual_size: SIZE,
        block_size: BLOCK,
        chunk_size: case.table.then_some(BLOCK),
        base_size: if case.base { BASE } else { 0 },
        journal_len: 64 << 10,
    })
    .expect("geometry");
    let s = SimStorage::new("img");
    create_on(&s, &geo, "base", if case.base { BaseFormat::Raw } else { BaseFormat::None }).expect("create");
    let mut bytes = s.durable_bytes();
    if case.upgrade {
        make_legacy(&mut bytes);
    }
    w.insert("img".into(), bytes);
    let never = PowerCut::after(i64::MAX);
    let d = disks(&w, &never);
    let img = open(&d, true).expect("open");
    if case.full {
        let bytes = data(seed ^ 0xF011, SIZE as usize);
        run(img.write(&SyncOnly, 0, &bytes, false)).expect("write");
        model.copy_from_slice(&bytes);
    } else {
        scribble(&img, &mut model, &mut rng, BLOCK, 2, 12).expect("write");
    }
    run(img.close_async(&SyncOnly)).expect("close");
    drop(img);
    if let Some(pre) = case.pre {
        grow(&d, pre).expect("the first resize");
        model.resize(pre as usize, 0);
    }
    w.insert("img".into(), d["img"].durable_bytes());
    (w, model)
}

/// Recovers what a crash left and runs the resize (again) to its end.
fn grow(d: &Disks, target: u64) -> Result<fvd::image::resize::ResizeOutcome, ImageError> {
    recover_on(Path::new("img"), Box::new(d["img"].clone()))?;
    run(grow_on(&SyncOnly, d["img"].as_ref(), target))
}

/// The case's operation (a resize, or an upgrade), from what a crash left.
fn step(case: &Case, d: &Disks) -> Result<fvd::image::resize::ResizeOutcome, ImageError> {
    if !case.upgrade {
        return grow(d, case.target);
    }
    recover_on(Path::new("img"), Box::new(d["img"].clone()))?;
    run(upgrade_on(&SyncOnly, d["img"].as_ref()))
}

/// After a cut: the old size or the new one, the old content, zeros after it,
/// and clean once recovered.
fn verify(d: &Disks, case: &Case, model: &[u8], what: &str) {
    let img = open(d, true).unwrap_or_else(|e| panic!("{what}: the image does not open: {e}"));
    let size = img.size();
    let old = model.len();
    assert!(size == old as u64 || size == case.target, "{what}: size {size:#x}");
    let got = read_all_of(&img).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert!(got[..old] == *model, "{what}: the image no longer reads what it read before the resize");
    assert!(got[old..].iter().all(|&b| b == 0), "{what}: past the old end is not zeros");
    run(img.close_async(&SyncOnly)).unwrap_or_else(|e| panic!("{what}: close: {e}"));
    drop(img);
    let r = check(d["img"].as_ref());
    assert!(r.corruptions.is_empty() && r.leaks.is_empty(), "{what}: check: {:?} {:?}", r.corruptions, r.leaks);
}

#[derive(Default)]
struct Counts {
    cuts: usize,
    sequences: usize,
    events: i64,
    /// Cuts that left the image with `INCOMPAT_RESIZING` (chunks past the old size's).
    resizing: usize,
}

fn events(case: &Case, w: &World) -> i64 {
    const BIG: i64 = 1 << 40;
    let cut = PowerCut::after(BIG);
    let d = disks(w, &cut);
    step(case, &d).expect("an uncut run completes");
    drop(d);
    BIG - cut.left()
}

fn explore(case: &Case, w: &World, model: &[u8], level: u32, rng: &mut rand::rngs::StdRng, c: &mut Counts, path: &str) {
    let total = events(case, w);
    if level == 0 {
        c.events = total;
    }
    let cuts: Vec<i64> =
        if level == 0 { (0..total).collect() } else { (0..FANOUT).map(|_| rng.gen_range(0..total.max(1))).collect() };
    for cut_at in cuts {
        let what = format!("{path} cut at event {cut_at} of {total}");
        let cut = PowerCut::after(cut_at);
        let d = disks(w, &cut);
        let r = step(case, &d);
        assert!(r.is_err() || !cut.happened(), "{what}: a cut run reported success");
        let after = crash_all(&d, rng);
        drop(d);
        c.cuts += 1;
        let h = header_of(&SimStorage::from_bytes("img", after["img"].clone())).expect("header");
        c.resizing += h.is_resizing() as usize;
        let never = PowerCut::after(i64::MAX);
        verify(&disks(&after, &never), case, model, &what);
        if level < DEPTH {
            explore(case, &after, model, level + 1, rng, c, &what);
        } else {
            finish(case, &after, model, rng, &what);
            c.sequences += 1;
        }
    }
}

/// Runs the resize to its end, then writes all over the grown disk and one
/// more cut: when the flush completed before it, every write is there.
fn finish(case: &Case, w: &World, model: &[u8], rng: &mut rand::rngs::StdRng, what: &str) {
    let never = PowerCut::after(i64::MAX);
    let d = disks(w, &never);
    step(case, &d).unwrap_or_else(|e| panic!("{what}: the resumed resize failed: {e}"));
    let h = header_of(d["img"].as_ref()).expect("header");
    assert!(h.virtual_size == case.target && !h.is_dirty() && !h.is_resizing(), "{what}: header {h:?}");
    let dup = h.incompat & fvd::format::header::INCOMPAT_JOURNAL_DUP != 0;
    assert!(!case.upgrade || (h.has_twin() && dup), "{what}: not upgraded: {h:?}");
    let r = check(d["img"].as_ref());
    assert!(r.corruptions.is_empty() && r.leaks.is_empty(), "{what}: check: {:?} {:?}", r.corruptions, r.leaks);
    let mut grown = model.to_vec();
    grown.resize(case.target as usize, 0);
    {
        let img = open(&d, false).expect("open");
        assert!(read_all_of(&img).expect("read") == grown, "{what}: the grown image does not read old content + zeros");
    }
    let w2: World = d.iter().map(|(n, s)| (n.clone(), s.durable_bytes())).collect();
    drop(d);
    let cut = PowerCut::after(rng.gen_range(20..400));
    let d = disks(&w2, &cut);
    let mut m2 = grown.clone();
    let flushed = (|| -> Result<(), ImageError> {
        let img = open(&d, true)?;
        scribble(&img, &mut m2, rng, BLOCK, 77, 6)?;
        // At least one write past the old end (an upgrade keeps the size).
        let old = model.len() as u64;
        if case.target > old {
            let bytes = data(7777, BLOCK as usize);
            let off = old + rng.gen_range(0..(case.target - old) / BLOCK as u64) * BLOCK as u64;
            run(img.write(&SyncOnly, off, &bytes, false))?;
            m2[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
        }
        run(img.flush(&SyncOnly))
    })();
    let after = crash_all(&d, rng);
    drop(d);
    let d = disks(&after, &never);
    let img = open(&d, true).unwrap_or_else(|e| panic!("{what}: reopen after more work: {e}"));
    let got = read_all_of(&img).unwrap_or_else(|e| panic!("{what}: read after more work: {e}"));
    if flushed.is_ok() {
        assert!(got == m2, "{what}: a flushed write after the resize was lost");
    } else {
        for (i, ((g, old), new)) in got.chunks(512).zip(grown.chunks(512)).zip(m2.chunks(512)).enumerate() {
            assert!(g == old || g == new, "{what}: sector {i} holds neither its old nor its new value");
        }
    }
}

fn sequences(case: Case, seed: u64, name: &str) {
    let (w, model) = start(&case, seed);
    // The completed resize does what the case is about.
    {
        let d = disks(&w, &PowerCut::after(i64::MAX));
        let out = step(&case, &d).expect("resize");
        assert_eq!(out.kind, case.kind, "{name}: {out:?}");
        if case.full {
            assert!(out.moved_chunks > 0, "{name}: {out:?}");
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut c = Counts::default();
    explore(&case, &w, &model, 0, &mut rng, &mut c, &format!("{name} (seed {seed})"));
    eprintln!(
        "{name}: {} events per resize, {} power cuts ({} left it resizing), {} sequences of {} cuts",
        c.events,
        c.cuts,
        c.resizing,
        c.sequences,
        DEPTH + 1
    );
    assert!(c.cuts > 0);
    assert_eq!(c.resizing > 0, case.full, "{name}: only a full image needs slots past the old size's chunks");
}

/// `fvd upgrade` of an image made before the twin: the metadata moves (the
/// size stays) into a layout with the twin and the journal's two copies.
#[test]
fn upgrade_of_an_image_from_before_the_twin() {
    let case = Case {
        table: true,
        base: true,
        full: false,
        pre: None,
        target: SIZE,
        kind: ResizeKind::MovedMetadata,
        upgrade: true,
    };
    sequences(case, 29, "upgrade, table, base");
}

#[test]
fn upgrade_of_a_full_image_from_before_the_twin() {
    let case = Case {
        table: true,
        base: false,
        full: true,
        pre: None,
        target: SIZE,
        kind: ResizeKind::MovedMetadata,
        upgrade: true,
    };
    sequences(case, 30, "upgrade, table, every chunk written");
}

/// 128 chunks of 16 KiB: the table's 4 KiB hold 1024 entries (16 MiB).
const ROOM: u64 = 16 << 20;

#[test]
fn table_within_its_room() {
    let case = Case {
        table: true,
        base: false,
        full: false,
        pre: None,
        target: ROOM,
        kind: ResizeKind::Header,
        upgrade: false,
    };
    sequences(case, 21, "table, no base, within the room");
}

#[test]
fn table_within_its_room_over_a_base() {
    let case = Case {
        table: true,
        base: true,
        full: false,
        pre: None,
        target: 5 << 20,
        kind: ResizeKind::Header,
        upgrade: false,
    };
    sequences(case, 22, "table, base, within the room");
}

#[test]
fn table_past_its_room() {
    let case = Case {
        table: true,
        base: false,
        full: false,
        pre: None,
        target: 2 * ROOM,
        kind: ResizeKind::MovedMetadata,
        upgrade: false,
    };
    sequences(case, 23, "table, no base, past the room");
}

#[test]
fn table_past_its_room_over_a_base() {
    let case = Case {
        table: true,
        base: true,
        full: false,
        pre: None,
        target: ROOM + (3 << 20),
        kind: ResizeKind::MovedMetadata,
        upgrade: false,
    };
    sequences(case, 24, "table, base, past the room");
}

#[test]
fn full_image_past_its_room() {
    let case = Case {
        table: true,
        base: true,
        full: true,
        pre: None,
        target: 2 * ROOM,
        kind: ResizeKind::MovedMetadata,
        upgrade: false,
    };
    sequences(case, 25, "table, base, every chunk written, past the room");
}

/// After a resize that moved the metadata, the table has room to double: the
/// next resize writes the table's new entries in place.
#[test]
fn table_within_the_room_a_move_left() {
    let case = Case {
        table: true,
        base: true,
        full: false,
        pre: Some(2 * ROOM),
        target: 3 * ROOM,
        kind: ResizeKind::Header,
        upgrade: false,
    };
    sequences(case, 28, "table, base, within the room a move left");
}

#[test]
fn raw_layout() {
    let case = Case {
        table: false,
        base: false,
        full: false,
        pre: None,
        target: 7 << 20,
        kind: ResizeKind::Header,
        upgrade: false,
    };
    sequences(case, 26, "raw layout, no base");
}

#[test]
fn raw_layout_over_a_base() {
    let case = Case {
        table: false,
        base: true,
        full: false,
        pre: None,
        target: 7 << 20,
        kind: ResizeKind::Header,
        upgrade: false,
    };
    sequences(case, 27, "raw layout, base");
}

/// What a resize refuses, with the image left as it was.
#[test]
fn refusals_leave_the_image_alone() {
    let case = Case {
        table: true,
        base: false,
        full: false,
        pre: None,
        target: ROOM,
        kind: ResizeKind::Header,
        upgrade: false,
    };
    let (w, _) = start(&case, 29);
    let bytes = w["img"].clone();
    let refused = |s: &SimStorage, size: u64, says: &str| {
        let before = s.current_bytes();
        let e = run(grow_on(&SyncOnly, s, size)).expect_err("refused").to_string();
        assert!(e.contains(says), "{e}");
        assert!(s.current_bytes() == before, "{says}: the image changed");
    };
    let s = SimStorage::from_bytes("img", bytes.clone());
    refused(&s, SIZE - 512, "shrinking is not supported");
    refused(&s, SIZE + 100, "not a multiple of 512");
    refused(&s, 1 << 60, "more than a 32-bit table can address");
    // Fixed-size storage (a plain block device) that cannot hold every chunk.
    let s = SimStorage::from_bytes("img", bytes.clone()).with_limit(8 << 20);
    refused(&s, ROOM, "cannot grow");
    // A frozen layer.
    let s = Arc::new(SimStorage::from_bytes("img", bytes));
    let img = Image::open_on(Path::new("img"), Box::new(s.clone()), None, &OpenOptions::default()).expect("open");
    run(img.freeze(&SyncOnly)).expect("freeze");
    drop(img);
    refused(&s, ROOM, "frozen snapshot layer");
    // Already that size: nothing written.
    let (w, _) = start(&case, 30);
    let s = SimStorage::from_bytes("img", w["img"].clone());
    let out = run(grow_on(&SyncOnly, &s, SIZE)).expect("no-op");
    assert_eq!((out.kind, s.events()), (ResizeKind::Unchanged, 0));
}
