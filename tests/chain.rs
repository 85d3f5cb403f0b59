//! Chains of read-only layers under an image (issue 11): a 16-deep chain of
//! snapshots against a flat model, a raw bottom under fvd layers of mixed
//! block sizes, base identity (a replaced middle layer, a changed raw bottom),
//! frozen layers, prefetch and copy-on-read through a chain, and a chain that
//! loops. Real files, no ublk.

mod common;

use common::bin::{fvd, ok, s};
use common::data;
use fvd::image::snapshot::{self, snapshot};
use fvd::image::{create, CreateOptions, Image, ImageError, OpenOptions};
use fvd::io::uring::Uring;
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The tests of this file run one at a time: an image's lock (flock) lives as
/// long as any copy of its descriptor, and a child one test spawns (`fvd …`)
/// holds copies of every descriptor open in this process until it execs, so
/// another test reopening an image it just closed could find it locked.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn read_all(ring: &Uring, img: &Image) -> Vec<u8> {
    let mut b = vec![0u8; img.size() as usize];
    ring.block_on(img.read(ring, 0, &mut b)).unwrap().unwrap();
    b
}

fn open(p: &Path) -> Image {
    Image::open(p, &OpenOptions::default()).unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

fn open_ro(p: &Path) -> Image {
    Image::open(p, &OpenOptions { read_only: true, ..Default::default() })
        .unwrap_or_else(|e| panic!("open read-only {}: {e}", p.display()))
}

/// Compares a whole read with the model, naming the first differing byte.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i:#x}: {:#04x}, {:#04x} expected", got[i], want[i]);
    }
}

/// Random writes (and a few discards) on `img`, mirrored in `model`.
fn random_writes(ring: &Uring, img: &Image, model: &mut [u8], rng: &mut rand::rngs::StdRng, n: usize, id: u64) {
    let sectors = model.len() as u64 / 512;
    for i in 0..n {
        let s0 = rng.gen_range(0..sectors);
        let len = rng.gen_range(1..=64u64).min(sectors - s0) * 512;
        let off = s0 * 512;
        let r = &mut model[off as usize..(off + len) as usize];
        if rng.gen_ratio(1, 10) {
            ring.block_on(img.discard(ring, off, len)).unwrap().unwrap();
            r.fill(0);
        } else {
            let d = data(id * 1000 + i as u64, len as usize);
            ring.block_on(img.write(ring, off, &d, false)).unwrap().unwrap();
            r.copy_from_slice(&d);
        }
    }
    ring.block_on(img.flush(ring)).unwrap().unwrap();
}

/// Small reads at random offsets through `img`, each against the model.
fn random_reads(ring: &Uring, img: &Image, model: &[u8], rng: &mut rand::rngs::StdRng, what: &str) {
    let sectors = model.len() as u64 / 512;
    for _ in 0..200 {
        let s0 = rng.gen_range(0..sectors);
        let len = (rng.gen_range(1..=40u64).min(sectors - s0) * 512) as usize;
        let mut b = vec![0u8; len];
        ring.block_on(img.read(ring, s0 * 512, &mut b)).unwrap().unwrap();
        assert_same(&b, &model[s0 as usize * 512..s0 as usize * 512 + len], what);
    }
}

fn layer(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("l{k:02}.fvd"))
}

/// Builds `l00 ← l01 ← … ← l{depth}` with snapshots, random writes at every
/// level; returns the model of each frozen layer and of the top.
fn build_chain(dir: &Path, depth: usize, size: u64, seed: u64) -> Vec<Vec<u8>> {
    let ring = Uring::new(64).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let opts = CreateOptions {
        size: Some(size),
        block_size: 4096,
        chunk_size: Some(64 * KIB as u32),
        journal_size: 256 * KIB,
        ..Default::default()
    };
    create(&layer(dir, 0), &opts).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut models = Vec::new();
    for k in 0..=depth {
        let img = open(&layer(dir, k));
        random_writes(&ring, &img, &mut model, &mut rng, 40, k as u64 + 1);
        assert_same(&read_all(&ring, &img), &model, &format!("level {k} after its writes"));
        random_reads(&ring, &img, &model, &mut rng, &format!("level {k}, small reads"));
        img.close().unwrap();
        drop(img);
        models.push(model.clone());
        if k < depth {
            snapshot(&layer(dir, k), &layer(dir, k + 1)).unwrap();
        }
    }
    models
}

#[test]
fn sixteen_deep_chain_reads_as_the_model() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let depth = 16;
    let size = 2 * MIB;
    let models = build_chain(d.path(), depth, size, 11);
    let ring = Uring::new(64).unwrap();
    let top = layer(d.path(), depth);
    let want = models.last().unwrap();
    let img = open(&top);
    let base = img.base().expect("a base");
    assert_eq!(base.layers().len(), depth, "every layer under the top is in the chain");
    // One byte per 4 KiB block of the chain, whatever its depth.
    assert_eq!(base.index_bytes() as u64, size / 4096);
    assert_same(&read_all(&ring, &img), want, "top of 16");
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    random_reads(&ring, &img, want, &mut rng, "top of 16, small reads");
    img.close().unwrap();
    drop(img);
    // Reopened, and read-only.
    assert_same(&read_all(&ring, &open(&top)), want, "top of 16 after reopen");
    assert_same(&read_all(&ring, &open_ro(&top)), want, "top of 16 read-only");
    // Each frozen layer still reads as it was when it was frozen.
    for (k, m) in models.iter().enumerate().take(depth) {
        let img = open_ro(&layer(d.path(), k));
        assert_eq!(img.base().map_or(0, |b| b.layers().len()), k, "layer {k}'s chain");
        assert_same(&read_all(&ring, &img), m, &format!("frozen layer {k}"));
    }
    // The command line reads through the whole chain too.
    let p = d.path().join("out.raw");
    ok(&["convert", "-O", "raw", s(&top), s(&p)]);
    assert_same(&std::fs::read(&p).unwrap(), want, "fvd convert of the top");
    let (code, out, err) = fvd(&["check", s(&top)]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A raw bottom with random content, `size` bytes.
fn raw_bottom(p: &Path, size: u64) -> Vec<u8> {
    let b = data(0xB0770, size as usize);
    std::fs::write(p, &b).unwrap();
    b
}

/// raw ← a (64 KiB blocks) ← b (64 KiB) ← c (4 KiB blocks, created by hand) ←
/// top (4 KiB): every fvd layer written at random, the whole chain frozen.
fn mixed_chain(dir: &Path, size: u64, rng: &mut rand::rngs::StdRng) -> (PathBuf, Vec<u8>) {
    let ring = Uring::new(64).unwrap();
    let mut model = raw_bottom(&dir.join("bottom.raw"), size);
    let big = CreateOptions {
        base: Some("bottom.raw".into()),
        block_size: 64 * KIB as u32,
        chunk_size: Some(MIB as u32),
        journal_size: 256 * KIB,
        ..Default::default()
    };
    create(&dir.join("a.fvd"), &big).unwrap();
    let img = open(&dir.join("a.fvd"));
    random_writes(&ring, &img, &mut model, rng, 30, 101);
    img.close().unwrap();
    drop(img);
    snapshot(&dir.join("a.fvd"), &dir.join("b.fvd")).unwrap();
    let img = open(&dir.join("b.fvd"));
    random_writes(&ring, &img, &mut model, rng, 30, 102);
    img.close().unwrap();
    drop(img);
    // Freeze b (its overlay `c0` is thrown away), then a 4 KiB-block layer over it.
    snapshot(&dir.join("b.fvd"), &dir.join("c0.fvd")).unwrap();
    std::fs::remove_file(dir.join("c0.fvd")).unwrap();
    let small = CreateOptions {
        base: Some("b.fvd".into()),
        block_size: 4096,
        chunk_size: Some(64 * KIB as u32),
        journal_size: 256 * KIB,
        ..Default::default()
    };
    create(&dir.join("c.fvd"), &small).unwrap();
    let img = open(&dir.join("c.fvd"));
    random_writes(&ring, &img, &mut model, rng, 30, 103);
    img.close().unwrap();
    drop(img);
    let top = dir.join("top.fvd");
    snapshot(&dir.join("c.fvd"), &top).unwrap();
    (top, model)
}

#[test]
fn raw_bottom_under_fvd_layers_of_mixed_block_sizes() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let (top, mut model) = mixed_chain(d.path(), 4 * MIB, &mut rng);
    let ring = Uring::new(64).unwrap();
    let img = open(&top);
    let base = img.base().unwrap();
    let formats: Vec<_> = base.layers().iter().map(|l| l.format()).collect();
    use fvd::format::BaseFormat::{Fvd, Raw};
    assert_eq!(formats, vec![Fvd, Fvd, Fvd, Raw], "c, b, a, then the raw bottom");
    assert_eq!(base.index_bytes() as u64, 4 * MIB / 4096, "the finest block size of the chain");
    assert_same(&read_all(&ring, &img), &model, "top over raw + fvd");
    random_reads(&ring, &img, &model, &mut rng, "top over raw + fvd, small reads");
    // Writes at the top (copy-on-write of 4 KiB blocks from every layer).
    random_writes(&ring, &img, &mut model, &mut rng, 60, 104);
    assert_same(&read_all(&ring, &img), &model, "after writes at the top");
    img.close().unwrap();
    drop(img);
    assert_same(&read_all(&ring, &open(&top)), &model, "after reopen");
    // The raw bottom never changed.
    assert_same(&std::fs::read(d.path().join("bottom.raw")).unwrap(), &data(0xB0770, 4 * MIB as usize), "bottom");
}

/// The one error line of `fvd ARGS`, which must fail.
fn one_error_line(args: &[&str]) -> String {
    let (code, out, err) = fvd(args);
    assert_ne!(code, 0, "fvd {args:?} succeeded: {out}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    lines[0].to_string()
}

#[test]
fn a_replaced_middle_layer_is_refused_and_named() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let size = MIB;
    build_chain(d.path(), 4, size, 31);
    let top = layer(d.path(), 4);
    let mid = layer(d.path(), 2);
    // Another image of the same size and geometry in the middle layer's place.
    std::fs::remove_file(&mid).unwrap();
    let opts = CreateOptions {
        size: Some(size),
        block_size: 4096,
        chunk_size: Some(64 * KIB as u32),
        journal_size: 256 * KIB,
        ..Default::default()
    };
    create(&mid, &opts).unwrap();
    let line = one_error_line(&["info", s(&top)]);
    assert!(line.contains(s(&mid)), "the line names the replaced layer: {line}");
    assert!(line.contains("replaced or rebuilt"), "{line}");
    let line = one_error_line(&["io", s(&top), "-c", "read 0 4k"]);
    assert!(line.contains(s(&mid)), "{line}");
    // The library says the same, in one line.
    match Image::open(&top, &OpenOptions::default()) {
        Err(e @ ImageError::Base { .. }) => {
            let t = e.to_string();
            assert!(t.contains(s(&mid)) && !t.contains('\n'), "{t}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("opened over a replaced layer"),
    }
}

#[test]
fn a_raw_bottom_changed_in_a_sampled_block_is_refused_and_named() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let (top, _) = mixed_chain(d.path(), 4 * MIB, &mut rng);
    let ring = Uring::new(64).unwrap();
    drop(read_all(&ring, &open(&top)));
    // The first block is always sampled.
    let bottom = d.path().join("bottom.raw");
    let f = std::fs::OpenOptions::new().write(true).open(&bottom).unwrap();
    f.write_all_at(&[0x5A; 512], 0).unwrap();
    drop(f);
    let line = one_error_line(&["info", s(&top)]);
    assert!(line.contains(s(&bottom)), "the line names the raw bottom: {line}");
    assert!(line.contains("content changed"), "{line}");
    // Resized: named as such.
    std::fs::OpenOptions::new().write(true).open(&bottom).unwrap().set_len(5 * MIB).unwrap();
    let line = one_error_line(&["info", s(&top)]);
    assert!(line.contains(s(&bottom)) && line.contains("size changed"), "{line}");
}

#[test]
fn a_frozen_layer_refuses_writes_and_opens_read_only() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let models = build_chain(d.path(), 3, MIB, 51);
    let mid = layer(d.path(), 1);
    match Image::open(&mid, &OpenOptions::default()) {
        Err(e @ ImageError::Frozen { .. }) => assert!(e.to_string().contains("frozen"), "{e}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a frozen layer opened for writing"),
    }
    let line = one_error_line(&["io", s(&mid), "-c", "write 0 4k"]);
    assert!(line.contains(s(&mid)) && line.contains("frozen"), "{line}");
    // Read-only opens work, and read the layer as it was frozen.
    let ring = Uring::new(64).unwrap();
    assert_same(&read_all(&ring, &open_ro(&mid)), &models[1], "frozen layer read-only");
    let out = d.path().join("mid.raw");
    ok(&["convert", "-O", "raw", s(&mid), s(&out)]);
    assert_same(&std::fs::read(&out).unwrap(), &models[1], "convert of a frozen layer");
    ok(&["io", "-r", s(&mid), "-c", "read 0 4k"]);
    ok(&["info", s(&mid)]);
}

#[test]
fn prefetch_through_a_chain_makes_the_top_stand_alone() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(61);
    let (top, mut model) = mixed_chain(d.path(), 4 * MIB, &mut rng);
    let ring = Uring::new(64).unwrap();
    {
        let img = open(&top);
        random_writes(&ring, &img, &mut model, &mut rng, 20, 105);
        img.close().unwrap();
    }
    ok(&["prefetch", s(&top)]);
    // Every lower layer gone: the top alone reads the same.
    for f in ["c.fvd", "b.fvd", "a.fvd", "bottom.raw"] {
        std::fs::remove_file(d.path().join(f)).unwrap();
    }
    let img = open(&top);
    assert!(img.base().is_none(), "a prefetched top opens no chain");
    assert_same(&read_all(&ring, &img), &model, "prefetched top alone");
    random_writes(&ring, &img, &mut model, &mut rng, 20, 106);
    img.close().unwrap();
    drop(img);
    assert_same(&read_all(&ring, &open(&top)), &model, "prefetched top after writes and reopen");
    let (code, out, err) = fvd(&["check", s(&top)]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn copy_on_read_at_the_top_of_a_chain() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(71);
    let (top, mut model) = mixed_chain(d.path(), 4 * MIB, &mut rng);
    let ring = Uring::new(64).unwrap();
    let img = Image::open(&top, &OpenOptions { copy_on_read: Some(true), ..Default::default() }).unwrap();
    // Reads in pieces, each queueing what it fetched from the chain.
    let piece = 256 * KIB as usize;
    for off in (0..model.len()).step_by(piece) {
        let mut b = vec![0u8; piece];
        ring.block_on(img.read(&ring, off as u64, &mut b)).unwrap().unwrap();
        assert_same(&b, &model[off..off + piece], "copy-on-read read");
        let () = ring.block_on(img.run_background_copies(&ring)).unwrap();
    }
    let q = img.copy_on_read_queue().expect("copy-on-read is on");
    assert!(q.copied_blocks.load(std::sync::atomic::Ordering::Relaxed) > 0, "blocks were copied up");
    // Writes over copied blocks, then everything again.
    random_writes(&ring, &img, &mut model, &mut rng, 40, 107);
    assert_same(&read_all(&ring, &img), &model, "after copy-on-read and writes");
    img.close().unwrap();
    drop(img);
    assert_same(&read_all(&ring, &open(&top)), &model, "after reopen");
    let (code, out, err) = fvd(&["check", s(&top)]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn a_chain_that_loops_is_refused() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let opts = CreateOptions { size: Some(MIB), block_size: 4096, journal_size: 256 * KIB, ..Default::default() };
    create(&dir.join("p.fvd"), &opts).unwrap();
    // c.fvd over "b.fvd", which is for now a link to p.fvd ...
    std::os::unix::fs::symlink("p.fvd", dir.join("b.fvd")).unwrap();
    let over = |base: &str| CreateOptions { base: Some(base.into()), zero_detect: false, ..opts.clone() };
    create(&dir.join("c.fvd"), &over("b.fvd")).unwrap();
    // ... then b.fvd becomes an image over c.fvd: b → c → b.
    create(&dir.join("b2.fvd"), &over("c.fvd")).unwrap();
    std::fs::remove_file(dir.join("b.fvd")).unwrap();
    std::fs::rename(dir.join("b2.fvd"), dir.join("b.fvd")).unwrap();
    // c recorded p's identity; forge b's into its header, so that only the
    // loop is left to catch (the header slot it came from, resealed).
    let b_uuid = snapshot::header_at(&dir.join("b.fvd")).unwrap().uuid;
    let mut h = snapshot::header_at(&dir.join("c.fvd")).unwrap();
    h.base_uuid = b_uuid;
    let f = std::fs::OpenOptions::new().write(true).open(dir.join("c.fvd")).unwrap();
    f.write_all_at(&h.encode(), h.generation % 2 * 4096).unwrap();
    drop(f);
    for img in ["b.fvd", "c.fvd"] {
        let p = dir.join(img);
        let line = one_error_line(&["info", s(&p)]);
        assert!(line.contains("loops"), "{line}");
        assert!(Image::open(&p, &OpenOptions { read_only: true, ..Default::default() }).is_err());
    }
}
