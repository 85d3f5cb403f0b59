//! Crash sequences for the operations on chains of layers: snapshot, commit and
//! rebase. Each touches several images, so one power cut is shared by all their
//! simulated disks (`PowerCut`): after N write, punch and sync events across
//! them, everything fails, and each disk keeps a random subset of what it had
//! not synced (`SimStorage::crash`).
//!
//! For every operation, from its starting state:
//! - a power cut at **every** event of the whole operation (the crash points);
//! - after each cut: the chain is opened as its headers say (recovering dirty
//!   images) and must read exactly what the image read before the operation;
//! - then the operation is run again from that state, itself cut at a few
//!   random points (crashes during the recovery and the resumed operation),
//!   `DEPTH` cuts in a row, and at the end run to completion: the result must
//!   be the operation's (a commit's target reads what the image read, a
//!   rebased image reads the same over its new base, a snapshot's layer reads
//!   the point in time and its overlay takes writes);
//! - then more work (writes and a flush on the top), a last cut, and the
//!   flushed writes must be there.

mod common;

use common::world::*;
use common::*;
use fvd::format::layout::CreateParams;
use fvd::format::{BaseFormat, Geometry};
use fvd::image::fold::{self, Target};
use fvd::image::rebase::{self, NewBase};
use fvd::image::{create_on, header_of, Base, Image, ImageError, Layer, OpenOptions};
use fvd::io::SyncOnly;
use fvd::storage::{PowerCut, SimStorage, Storage};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;

const SIZE: u64 = 2 << 20;
const BLOCK: u32 = 16 << 10;
const CHUNK: u32 = 64 << 10;
/// Cuts in a row after the first.
const DEPTH: u32 = 2;
/// Random cut points tried at each deeper level.
const FANOUT: usize = 2;

fn geo(base_size: u64) -> Geometry {
    Geometry::new(&CreateParams {
        virtual_size: SIZE,
        block_size: BLOCK,
        chunk_size: Some(CHUNK),
        base_size,
        journal_len: 64 << 10,
    })
    .expect("geometry")
}

/// Opens `name` as a layer (read-only, no base of its own).
fn layer(d: &Disks, name: &str) -> Result<Image, ImageError> {
    let opts = OpenOptions { read_only: true, chain_member: true, ..OpenOptions::default() };
    Image::open_on(Path::new(name), Box::new(d[name].clone()), None, &opts)
}

/// The chain under `name`, following the headers, as `open_base` does with paths.
fn chain(d: &Disks, name: &str) -> Result<Option<Base>, ImageError> {
    let mut layers = Vec::new();
    let mut h = header_of(d[name].as_ref())?;
    while h.base_format != BaseFormat::None && !h.is_prefetched() {
        let b = h.base_path.clone();
        if h.base_format == BaseFormat::Raw {
            layers.push(Layer::Raw(Box::new(d[&b].clone()) as Box<dyn Storage>));
            break;
        }
        let img = layer(d, &b)?;
        h = img.header();
        layers.push(Layer::Fvd(Box::new(img)));
    }
    Ok((!layers.is_empty()).then(|| Base::from_layers(layers)))
}

/// Opens `name` over its chain; read-write opens recover a dirty image.
fn open(d: &Disks, name: &str, rw: bool) -> Result<Image, ImageError> {
    let opts = OpenOptions { read_only: !rw, allow_frozen: true, ..OpenOptions::default() };
    Image::open_on(Path::new(name), Box::new(d[name].clone()), chain(d, name)?, &opts)
}

/// The starting world: raw `r`, frozen `a` over it, frozen `b` over `a`, and the
/// live top `c` over `b`, each layer with writes of its own; `c` closed cleanly.
/// Returns it and what `c` reads.
fn start(seed: u64) -> (World, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = data(seed ^ 0xBA5E, SIZE as usize);
    let never = PowerCut::after(i64::MAX);
    let mut w: World = BTreeMap::new();
    w.insert("r".into(), model.clone());
    for (name, below, fmt, id) in
        [("a", "r", BaseFormat::Raw, 2u64), ("b", "a", BaseFormat::Fvd, 3), ("c", "b", BaseFormat::Fvd, 4)]
    {
        let s = SimStorage::new(name);
        create_on(&s, &geo(SIZE), below, fmt).expect("create");
        s.sync().expect("sync");
        w.insert(name.into(), s.durable_bytes());
        let d = disks(&w, &never);
        let img = open(&d, name, true).expect("open");
        scribble(&img, &mut model, &mut rng, BLOCK, id, 6).expect("write");
        if name == "c" {
            run(img.close_async(&SyncOnly)).expect("close");
        } else {
            run(img.freeze(&SyncOnly)).expect("freeze");
        }
        drop(img);
        w.insert(name.into(), d[name].durable_bytes());
    }
    let d = disks(&w, &never);
    assert_eq!(read_all_of(&open(&d, "c", false).expect("open")).expect("read"), model, "the chain reads its model");
    (w, model)
}

/// One multi-image operation under test.
trait Operation {
    /// Recovers what a crash left and runs the operation (again) to its end.
    fn step(&self, d: &Disks) -> Result<(), ImageError>;
    /// After a cut: what the chain must read.
    fn verify(&self, d: &Disks, model: &[u8], what: &str);
    /// After a completed run.
    fn finished(&self, d: &Disks, model: &[u8], what: &str);
    /// The image that takes more work afterwards.
    fn live(&self) -> &str;
}

#[derive(Default)]
struct Counts {
    cuts: usize,
    sequences: usize,
}

/// Events a full run of `op` takes from world `w`.
fn events(op: &dyn Operation, w: &World) -> i64 {
    const BIG: i64 = 1 << 40;
    let cut = PowerCut::after(BIG);
    let d = disks(w, &cut);
    op.step(&d).expect("an uncut run completes");
    drop(d);
    BIG - cut.left()
}

fn explore(
    op: &dyn Operation,
    w: &World,
    model: &[u8],
    level: u32,
    rng: &mut rand::rngs::StdRng,
    c: &mut Counts,
    path: &str,
) {
    let total = events(op, w);
    let cuts: Vec<i64> =
        if level == 0 { (0..total).collect() } else { (0..FANOUT).map(|_| rng.gen_range(0..total.max(1))).collect() };
    for cut_at in cuts {
        let what = format!("{path} cut at event {cut_at} of {total}");
        let cut = PowerCut::after(cut_at);
        let d = disks(w, &cut);
        let r = op.step(&d);
        assert!(r.is_err() || !cut.happened(), "{what}: a cut run reported success");
        let after = crash_all(&d, rng);
        drop(d);
        c.cuts += 1;
        let never = PowerCut::after(i64::MAX);
        op.verify(&disks(&after, &never), model, &what);
        if level < DEPTH {
            explore(op, &after, model, level + 1, rng, c, &what);
        } else {
            finish(op, &after, model, rng, &what);
            c.sequences += 1;
        }
    }
}

/// Runs the operation to its end, then more work on the live image and one more
/// cut: when the flush completed before it, every write is there.
fn finish(op: &dyn Operation, w: &World, model: &[u8], rng: &mut rand::rngs::StdRng, what: &str) {
    let never = PowerCut::after(i64::MAX);
    let d = disks(w, &never);
    op.step(&d).unwrap_or_else(|e| panic!("{what}: the resumed operation failed: {e}"));
    op.finished(&d, model, what);
    let w2: World = d.iter().map(|(n, s)| (n.clone(), s.durable_bytes())).collect();
    drop(d);
    let cut = PowerCut::after(rng.gen_range(20..400));
    let d = disks(&w2, &cut);
    let mut m2 = model.to_vec();
    let flushed = (|| -> Result<(), ImageError> {
        let img = open(&d, op.live(), true)?;
        scribble(&img, &mut m2, rng, BLOCK, 77, 4)?;
        run(img.flush(&SyncOnly))
    })();
    let after = crash_all(&d, rng);
    drop(d);
    let d = disks(&after, &never);
    let img = open(&d, op.live(), true).unwrap_or_else(|e| panic!("{what}: reopen after more work: {e}"));
    let got = read_all_of(&img).unwrap_or_else(|e| panic!("{what}: read after more work: {e}"));
    if flushed.is_ok() {
        assert!(got == m2, "{what}: a flushed write after the operation was lost");
    } else {
        // Cut before the flush completed: each sector holds the old or the new value.
        for (i, ((g, old), new)) in got.chunks(512).zip(model.chunks(512)).zip(m2.chunks(512)).enumerate() {
            assert!(g == old || g == new, "{what}: sector {i} holds neither its old nor its new value");
        }
    }
}

struct Commit {
    /// "r" (raw, depth 3, through a and b) or "a" (fvd, depth 2, through b).
    target: &'static str,
    keep: bool,
}

impl Operation for Commit {
    fn step(&self, d: &Disks) -> Result<(), ImageError> {
        let top = open(d, "c", true)?;
        let h = top.header();
        let names: Vec<String> = top.base().map(|b| b.layers().iter().map(|l| l.name()).collect()).unwrap_or_default();
        let depth = if h.is_committing() && h.commit_depth > 0 {
            h.commit_depth as usize
        } else {
            names.iter().position(|n| n == self.target).map(|i| i + 1).expect("the target is in the chain")
        };
        let between: Vec<&dyn Storage> = names[..depth - 1].iter().map(|n| d[n].as_ref() as &dyn Storage).collect();
        let fmt = if self.target == "r" { BaseFormat::Raw } else { BaseFormat::Fvd };
        let rebase_to = (depth > 1).then(|| (self.target.to_string(), fmt, SIZE));
        let progress = |_| {};
        if self.target == "r" {
            let t = d["r"].as_ref();
            run(fold::run(&SyncOnly, &top, depth, Target::Raw(t), &between, rebase_to, self.keep, &progress))?;
        } else {
            let t = open(d, "a", true)?;
            run(fold::run(&SyncOnly, &top, depth, Target::Fvd(&t), &between, rebase_to, self.keep, &progress))?;
            run(t.close_async(&SyncOnly))?;
        }
        Ok(())
    }

    fn verify(&self, d: &Disks, model: &[u8], what: &str) {
        let top = open(d, "c", true).unwrap_or_else(|e| panic!("{what}: the chain does not open: {e}"));
        let got = read_all_of(&top).unwrap_or_else(|e| panic!("{what}: read: {e}"));
        assert!(got == model, "{what}: the image no longer reads what it read before the commit");
    }

    fn finished(&self, d: &Disks, model: &[u8], what: &str) {
        let h = header_of(d["c"].as_ref()).expect("header");
        assert!(!h.is_committing(), "{what}: still committing");
        assert_eq!(h.base_path, self.target, "{what}: rebased onto the target");
        self.verify(d, model, what);
        let target = if self.target == "r" {
            d["r"].current_bytes()
        } else {
            read_all_of(&open(d, "a", false).expect("open target")).expect("read target")
        };
        assert!(target == model, "{what}: the target does not read what the image read");
        let between: &[&str] = if self.target == "r" { &["b", "a"] } else { &["b"] };
        for n in between {
            assert!(header_of(d[*n].as_ref()).expect("header").is_invalid(), "{what}: {n} is not marked invalid");
        }
        let top = open(d, "c", false).expect("open");
        let held = top.map().iter().filter(|r| r.kind == fvd::image::MapKind::Data).count();
        assert_eq!(held == 0, !self.keep, "{what}: emptied unless kept");
    }

    fn live(&self) -> &str {
        "c"
    }
}

struct Rebase {
    /// The new base ("r"), or None: stand alone.
    onto: Option<&'static str>,
}

impl Operation for Rebase {
    fn step(&self, d: &Disks) -> Result<(), ImageError> {
        let top = open(d, "c", true)?;
        let new = self.onto.map(|n| NewBase {
            chain: Base::single(Layer::Raw(Box::new(d[n].clone()) as Box<dyn Storage>)),
            reference: n.to_string(),
            id: Default::default(),
        });
        let progress = |_| {};
        run(async {
            rebase::copy_differences(&SyncOnly, &top, new.as_ref().map(|n| &n.chain), &progress).await?;
            rebase::switch_base(&SyncOnly, &top, new.as_ref()).await?;
            top.close_async(&SyncOnly).await
        })
    }

    fn verify(&self, d: &Disks, model: &[u8], what: &str) {
        let top = open(d, "c", true).unwrap_or_else(|e| panic!("{what}: the chain does not open: {e}"));
        let got = read_all_of(&top).unwrap_or_else(|e| panic!("{what}: read: {e}"));
        assert!(got == model, "{what}: the image no longer reads what it read before the rebase");
    }

    fn finished(&self, d: &Disks, model: &[u8], what: &str) {
        let h = header_of(d["c"].as_ref()).expect("header");
        match self.onto {
            Some(n) => assert_eq!(h.base_path, n, "{what}"),
            None => assert!(h.base_format == BaseFormat::None && h.is_prefetched(), "{what}: stands alone"),
        }
        self.verify(d, model, what);
    }

    fn live(&self) -> &str {
        "c"
    }
}

/// `c` (live, with writes) is frozen and `n` created over it.
struct Snapshot;

impl Operation for Snapshot {
    fn step(&self, d: &Disks) -> Result<(), ImageError> {
        let h = header_of(d["c"].as_ref())?;
        if !h.is_frozen() {
            let img = open(d, "c", true)?;
            run(img.freeze(&SyncOnly))?;
        }
        // The overlay is written whole again unless its header is valid (the
        // path-based snapshot creates it under a temporary name instead).
        if header_of(d["n"].as_ref()).is_err() {
            create_on(d["n"].as_ref(), &geo(SIZE), "c", BaseFormat::Fvd)?;
        }
        Ok(())
    }

    fn verify(&self, d: &Disks, model: &[u8], what: &str) {
        // The frozen (or not yet frozen) image reads the point in time.
        let img = open(d, "c", false).unwrap_or_else(|e| panic!("{what}: c does not open: {e}"));
        assert!(read_all_of(&img).expect("read") == model, "{what}: c changed");
        if header_of(d["n"].as_ref()).is_ok() {
            let n = open(d, "n", false).unwrap_or_else(|e| panic!("{what}: n does not open: {e}"));
            assert!(read_all_of(&n).expect("read") == model, "{what}: the overlay does not read the point in time");
        }
    }

    fn finished(&self, d: &Disks, model: &[u8], what: &str) {
        assert!(header_of(d["c"].as_ref()).expect("header").is_frozen(), "{what}: c frozen");
        let write_open = Image::open_on(
            Path::new("c"),
            Box::new(d["c"].clone()),
            chain(d, "c").expect("chain"),
            &OpenOptions::default(),
        );
        assert!(matches!(write_open, Err(ImageError::Frozen { .. })), "{what}: a frozen layer refuses a write-open");
        self.verify(d, model, what);
    }

    fn live(&self) -> &str {
        "n"
    }
}

fn sequences(op: &dyn Operation, w: &World, model: &[u8], seed: u64, name: &str) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut c = Counts::default();
    explore(op, w, model, 0, &mut rng, &mut c, &format!("{name} (seed {seed})"));
    eprintln!("{name}: {} power cuts, {} sequences of {} cuts", c.cuts, c.sequences, DEPTH + 1);
    assert!(c.cuts > 0);
}

#[test]
fn commit_into_a_raw_bottom_through_two_layers() {
    let (w, model) = start(11);
    sequences(&Commit { target: "r", keep: false }, &w, &model, 11, "commit -b r");
}

#[test]
fn commit_into_an_fvd_layer_keeping_the_image() {
    let (w, model) = start(12);
    sequences(&Commit { target: "a", keep: true }, &w, &model, 12, "commit -d -b a");
}

#[test]
fn rebase_onto_the_raw_bottom() {
    let (w, model) = start(13);
    sequences(&Rebase { onto: Some("r") }, &w, &model, 13, "rebase -b r");
}

#[test]
fn rebase_to_stand_alone() {
    let (w, model) = start(14);
    sequences(&Rebase { onto: None }, &w, &model, 14, "rebase -b ''");
}

#[test]
fn snapshot_of_a_live_image() {
    let (mut w, model) = start(15);
    w.insert("n".into(), Vec::new());
    sequences(&Snapshot, &w, &model, 15, "snapshot");
}
