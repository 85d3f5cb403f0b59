//! Crash test: a workload runs on a simulated disk that keeps volatile and
//! durable bytes apart. Before every write, punch and sync the disk is
//! captured as a power cut at that instant could leave it (any subset of the
//! unsynced sectors). Each capture is reopened (journal replay) and must obey:
//!
//! 1. no metadata is durable before the data it makes visible, and
//! 3. every sector reads as a value it held since the last completed flush or
//!    a value written since (never another offset's data, never garbage), and
//! 2. everything acknowledged before a completed flush, or written with FUA,
//!    or in writethrough mode, is there;
//!
//! and `check` must report the recovered image clean. Reads with copy-on-read
//! and prefetch run in the same workloads: neither may change what a crash
//! leaves visible.

mod common;

use common::*;
use fvd::io::SyncOnly;
use fvd::storage::SimStorage;
use rand::{Rng, SeedableRng};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

fn h(sector: &[u8]) -> u64 {
    let mut s = DefaultHasher::new();
    sector.hash(&mut s);
    s.finish()
}

struct Allowed {
    /// Per sector: the hashes of the values a crash may leave.
    sets: Vec<Vec<u64>>,
}

impl Allowed {
    fn new(content: &[u8]) -> Allowed {
        Allowed { sets: content.chunks(SECTOR).map(|c| vec![h(c)]).collect() }
    }

    fn add(&mut self, off: u64, bytes: &[u8]) {
        for (i, c) in bytes.chunks(SECTOR).enumerate() {
            let set = &mut self.sets[off as usize / SECTOR + i];
            let v = h(c);
            if !set.contains(&v) {
                set.push(v);
            }
        }
    }

    fn settle(&mut self, off: u64, bytes: &[u8]) {
        for (i, c) in bytes.chunks(SECTOR).enumerate() {
            self.sets[off as usize / SECTOR + i] = vec![h(c)];
        }
    }
}

fn verify(t: &TestImage, image: Vec<u8>, allowed: &Allowed, what: &str) {
    let s = Arc::new(SimStorage::from_bytes("crashed", image));
    let img = t.open_on(s.clone(), false).unwrap_or_else(|e| panic!("{what}: reopen after crash failed: {e}"));
    let content = read_all(&img);
    for (i, c) in content.chunks(SECTOR).enumerate() {
        assert!(
            allowed.sets[i].contains(&h(c)),
            "{what}: sector {i} (offset {:#x}) holds a value it never held since the last flush",
            i * SECTOR
        );
    }
    img.close().unwrap_or_else(|e| panic!("{what}: close after recovery failed: {e}"));
    drop(img);
    let report = fvd::image::check(s.as_ref());
    assert_eq!(report.exit_code(), 0, "{what}: check after recovery: {report:?}");
}

fn workload(cfg: Config, writethrough: bool, seed: u64, ops: usize) -> usize {
    let t = TestImage::new(cfg);
    let img = t.open(writethrough);
    let mut model = t.initial();
    let mut allowed = Allowed::new(&model);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    t.storage.start_capture(seed, 1.0);
    let sectors = cfg.size / 512;
    let mut checked = 0;
    for i in 0..ops {
        let s = rng.gen_range(0..sectors);
        let n = rng.gen_range(1..=256u64).min(sectors - s);
        let (off, len) = (s * 512, n * 512);
        let kind = if i == ops / 2 { 60 } else { rng.gen_range(0..100) };
        let what = format!("cfg {cfg:?} wt={writethrough} seed {seed} op {i}");
        let mut durable_now = None;
        match kind {
            0..=57 => {
                let d = data(seed * 1000 + i as u64 + 1, len as usize);
                let fua = kind < 8;
                allowed.add(off, &d);
                run(img.write(&SyncOnly, off, &d, fua)).expect("write");
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                if fua || writethrough {
                    durable_now = Some((off, d));
                }
            }
            58..=64 => {
                // A read (copy-on-read queues what came from the base), then
                // the background copies; occasionally a whole prefetch.
                let mut b = vec![0u8; len as usize];
                run(img.read(&SyncOnly, off, &mut b)).expect("read");
                assert!(b == model[off as usize..(off + len) as usize], "{what}: read differs");
                run(img.run_background_copies(&SyncOnly));
                if kind == 64 || i == ops / 2 {
                    run(img.prefetch(&SyncOnly, &Default::default())).expect("prefetch");
                }
            }
            65..=79 => {
                let z = vec![0u8; len as usize];
                allowed.add(off, &z);
                if kind < 72 {
                    run(img.discard(&SyncOnly, off, len)).expect("discard");
                } else {
                    run(img.write_zeroes(&SyncOnly, off, len)).expect("zero");
                }
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                run(img.flush(&SyncOnly)).expect("flush");
            }
        }
        for cap in t.storage.take_captured() {
            verify(&t, cap, &allowed, &what);
            checked += 1;
        }
        if let Some((off, d)) = durable_now {
            allowed.settle(off, &d);
        }
        if kind >= 80 {
            allowed = Allowed::new(&model);
        }
    }
    // And a crash at the very end, after the last operation.
    let mut rng2 = rand::rngs::StdRng::seed_from_u64(seed ^ 0xFF);
    verify(&t, t.storage.crash(&mut rng2), &allowed, "final crash");
    checked + 1
}

fn configs() -> Vec<Config> {
    let size = 2 << 20;
    vec![
        // table, 4 KiB blocks, base covering part of the disk (unaligned end)
        Config { size, block: 4096, chunk: Some(65536), base_size: (5 << 18) + 512, journal: 4 * 4096, cor: true },
        // table, 64 KiB blocks (copy-on-write reads the rest of the block)
        Config { size, block: 65536, chunk: Some(262144), base_size: 1 << 20, journal: 4 * 4096, cor: false },
        // raw layout over a base
        Config { size, block: 16384, chunk: None, base_size: size, journal: 4 * 4096, cor: true },
        // table, no base
        Config { size, block: 4096, chunk: Some(65536), base_size: 0, journal: 4 * 4096, cor: false },
    ]
}

#[test]
fn crash_at_every_io_point_writeback() {
    let mut total = 0;
    for (i, cfg) in configs().into_iter().enumerate() {
        total += workload(cfg, false, 11 + i as u64, 60);
    }
    println!("writeback: {total} crash images recovered and verified");
    assert!(total > 100);
}

#[test]
fn crash_at_every_io_point_writethrough() {
    let mut total = 0;
    for (i, cfg) in configs().into_iter().enumerate() {
        total += workload(cfg, true, 101 + i as u64, 40);
    }
    println!("writethrough: {total} crash images recovered and verified");
    assert!(total > 100);
}
