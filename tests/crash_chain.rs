//! Crash sequences: crash → recover → more work → crash, several deep, with crashes
//! during the recovery itself (its wipe of unreferenced chunks and its checkpoint).
//!
//! A stage opens a disk image (recovering it when it is dirty) on a simulated disk
//! that captures, before every write, punch and sync, the disk as a power cut at that
//! instant could leave it (see `SimStorage`: unsynced sectors, punches and growth kept
//! or lost at random). Every capture is recovered and verified:
//!
//! - each sector reads a value it may hold: the value it had when the last completed
//!   flush began, or one written since (never another offset's data, never garbage);
//! - a crash during recovery leaves exactly what the recovery was recovering;
//! - `fvd check` is clean after the recovered image is closed.
//!
//! A few captures per stage (recovery crashes among them) become the next stage's disk,
//! down to `DEPTH` crashes in a row. The seed of every stage is printed on failure.

mod common;

use common::*;
use fvd::io::SyncOnly;
use fvd::storage::SimStorage;
use rand::{Rng, SeedableRng};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Crashes in a row after the first stage.
const DEPTH: u32 = 3;
/// Captures of each stage that become stages of their own.
const FANOUT: usize = 2;
/// Operations per stage.
const OPS: usize = 24;

fn h(sector: &[u8]) -> u64 {
    let mut s = DefaultHasher::new();
    sector.hash(&mut s);
    s.finish()
}

/// Per sector: the hashes of the values a crash may leave.
#[derive(Clone)]
struct Allowed(Vec<Vec<u64>>);

impl Allowed {
    fn exactly(content: &[u8]) -> Allowed {
        Allowed(content.chunks(SECTOR).map(|c| vec![h(c)]).collect())
    }

    fn add(&mut self, off: u64, bytes: &[u8]) {
        for (i, c) in bytes.chunks(SECTOR).enumerate() {
            let set = &mut self.0[off as usize / SECTOR + i];
            let v = h(c);
            if !set.contains(&v) {
                set.push(v);
            }
        }
    }

    fn settle(&mut self, off: u64, bytes: &[u8]) {
        for (i, c) in bytes.chunks(SECTOR).enumerate() {
            self.0[off as usize / SECTOR + i] = vec![h(c)];
        }
    }

    fn check(&self, content: &[u8], what: &str) {
        for (i, c) in content.chunks(SECTOR).enumerate() {
            assert!(
                self.0[i].contains(&h(c)),
                "{what}: sector {i} (offset {:#x}) holds a value it never held since the last flush{}",
                i * SECTOR,
                if c.iter().all(|&b| b == 0) { " (zeros: a flushed write lost?)" } else { "" }
            );
        }
    }
}

#[derive(Default)]
struct Counts {
    stages: usize,
    captures: usize,
    recovery_captures: usize,
    deepest: u32,
}

/// Recovers `image`, checks what it reads against `allowed`, closes it and runs check.
fn verify(t: &TestImage, image: Vec<u8>, allowed: &Allowed, what: &str) {
    let s = Arc::new(SimStorage::from_bytes("crashed", image));
    let img = t.open_on(s.clone(), false).unwrap_or_else(|e| panic!("{what}: reopen after crash failed: {e}"));
    allowed.check(&read_all(&img), what);
    img.close().unwrap_or_else(|e| panic!("{what}: close after recovery failed: {e}"));
    drop(img);
    let report = fvd::image::check(s.as_ref());
    assert_eq!(report.exit_code(), 0, "{what}: check after recovery: {report:?}");
}

/// One stage: recover `disk`, verify, work with a crash captured at every I/O, and go
/// deeper into a few of the captures.
#[allow(clippy::too_many_arguments)]
fn stage(t: &TestImage, disk: Vec<u8>, allowed: &Allowed, wt: bool, seed: u64, depth: u32, path: &str, n: &mut Counts) {
    n.stages += 1;
    n.deepest = n.deepest.max(depth);
    let what = format!("cfg {:?} wt={wt} chain {path} (seed {seed})", t.cfg);
    let storage = Arc::new(SimStorage::from_bytes("image", disk));
    // Crashes during the recovery itself: its punches, table, bitmap and header writes.
    storage.start_capture(seed, 1.0);
    let img = t.open_on(storage.clone(), wt).unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    let mut model = read_all(&img);
    allowed.check(&model, &format!("{what}: after recovery"));
    let exact = Allowed::exactly(&model);
    let mut next: Vec<(Vec<u8>, Allowed, String)> = Vec::new();
    for (k, cap) in storage.take_captured().into_iter().enumerate() {
        verify(t, cap.clone(), &exact, &format!("{what}: crash {k} during recovery"));
        n.recovery_captures += 1;
        next.push((cap, exact.clone(), format!("{path}/r{k}")));
    }

    let mut allowed = exact;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sectors = t.cfg.size / 512;
    for i in 0..OPS {
        let s = rng.gen_range(0..sectors);
        let len_sectors = rng.gen_range(1..=256u64).min(sectors - s);
        let (off, len) = (s * 512, len_sectors * 512);
        let kind = rng.gen_range(0..100);
        let op = format!("{what} op {i}");
        let mut durable_now = None;
        match kind {
            0..=54 => {
                let d = data(seed.wrapping_mul(1000).wrapping_add(i as u64 + 1), len as usize);
                let fua = kind < 8;
                allowed.add(off, &d);
                run(img.write(&SyncOnly, off, &d, fua)).unwrap_or_else(|e| panic!("{op}: write: {e}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                if fua || wt {
                    durable_now = Some((off, d));
                }
            }
            55..=62 => {
                let mut b = vec![0u8; len as usize];
                run(img.read(&SyncOnly, off, &mut b)).unwrap_or_else(|e| panic!("{op}: read: {e}"));
                assert!(b == model[off as usize..(off + len) as usize], "{op}: read differs");
                run(img.run_background_copies(&SyncOnly));
                if kind == 62 {
                    run(img.prefetch(&SyncOnly, &Default::default())).unwrap_or_else(|e| panic!("{op}: prefetch: {e}"));
                }
            }
            63..=79 => {
                let z = vec![0u8; len as usize];
                allowed.add(off, &z);
                if kind < 72 {
                    run(img.discard(&SyncOnly, off, len)).unwrap_or_else(|e| panic!("{op}: discard: {e}"));
                } else {
                    run(img.write_zeroes(&SyncOnly, off, len)).unwrap_or_else(|e| panic!("{op}: zero: {e}"));
                }
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => run(img.flush(&SyncOnly)).unwrap_or_else(|e| panic!("{op}: flush: {e}")),
        }
        for (k, cap) in storage.take_captured().into_iter().enumerate() {
            verify(t, cap.clone(), &allowed, &format!("{op}, crash {k}"));
            n.captures += 1;
            next.push((cap, allowed.clone(), format!("{path}/{i}.{k}")));
        }
        if let Some((off, d)) = durable_now {
            allowed.settle(off, &d);
        }
        if kind >= 80 {
            allowed = Allowed::exactly(&model);
        }
    }
    // A crash after the last operation, requests all completed but not flushed.
    let mut crng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xC0FFEE);
    let last = storage.crash(&mut crng);
    verify(t, last.clone(), &allowed, &format!("{what}: crash after the last op"));
    n.captures += 1;
    next.push((last, allowed.clone(), format!("{path}/end")));
    // The image is dropped without a close: the workload's own process dies here.
    std::mem::forget(img);

    if depth >= DEPTH {
        return;
    }
    // Go deeper into a few captures: always the last one (work not yet flushed), one
    // taken during the recovery when there are some, and random others.
    let mut picks = vec![next.len() - 1];
    if n.recovery_captures > 0 {
        if let Some(r) = next.iter().position(|(_, _, p)| p.starts_with(&format!("{path}/r"))) {
            picks.push(r);
        }
    }
    while picks.len() < FANOUT + 1 && picks.len() < next.len() {
        let k = rng.gen_range(0..next.len());
        if !picks.contains(&k) {
            picks.push(k);
        }
    }
    for (j, k) in picks.into_iter().enumerate() {
        let (disk, allowed, p) = next[k].clone();
        let child_seed = seed.wrapping_mul(31).wrapping_add(j as u64 + 1);
        stage(t, disk, &allowed, wt, child_seed, depth + 1, &p, n);
    }
}

fn chains(cfg: Config, wt: bool, seed: u64) -> Counts {
    let t = TestImage::new(cfg);
    let disk = t.storage.current_bytes();
    let allowed = Allowed::exactly(&t.initial());
    let mut n = Counts::default();
    stage(&t, disk, &allowed, wt, seed, 0, "0", &mut n);
    n
}

fn configs() -> Vec<Config> {
    let size = 1 << 20;
    vec![
        // table, 4 KiB blocks, base covering part of the disk (unaligned end), copy-on-read
        Config { size, block: 4096, chunk: Some(65536), base_size: (5 << 17) + 512, journal: 3 * 4096, cor: true },
        // table, 64 KiB blocks (copy-on-write reads the rest of the block)
        Config { size, block: 65536, chunk: Some(262144), base_size: 1 << 19, journal: 3 * 4096, cor: false },
        // raw layout over a base
        Config { size, block: 16384, chunk: None, base_size: size, journal: 3 * 4096, cor: true },
        // table, no base
        Config { size, block: 4096, chunk: Some(65536), base_size: 0, journal: 3 * 4096, cor: false },
    ]
}

fn run_all(wt: bool, seed0: u64) {
    let mut lines = Vec::new();
    for (i, cfg) in configs().into_iter().enumerate() {
        let n = chains(cfg, wt, seed0 + i as u64);
        lines.push(format!(
            "  cfg {i}: {} stages, {} crash images verified (+{} during recovery), {} crashes deep",
            n.stages, n.captures, n.recovery_captures, n.deepest
        ));
        assert!(n.deepest >= DEPTH, "cfg {i}: chains reached only {} crashes deep", n.deepest);
        assert!(n.recovery_captures > 0, "cfg {i}: no crash during a recovery was tried");
    }
    println!("crash chains ({}):\n{}", if wt { "writethrough" } else { "writeback" }, lines.join("\n"));
}

#[test]
fn crash_chains_writeback() {
    run_all(false, 7001);
}

#[test]
fn crash_chains_writethrough() {
    run_all(true, 9001);
}
