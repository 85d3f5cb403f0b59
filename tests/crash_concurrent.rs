//! Crashes with requests in flight: four threads (as the ublk queues are) issue
//! writes, discards, write-zeroes, reads and flushes on one image at once, while commits,
//! checkpoints and chunk frees run under them. The simulated disk captures a power cut at
//! random I/O points, whatever thread is at which step.
//!
//! Each thread owns every fourth chunk-sized stripe, so what each sector may hold is known
//! per thread: a value from before the thread's last completed flush, or one written since
//! (its write may be in flight at the capture). Every capture is recovered and checked
//! against the sets as they stood when it was taken (the disk's event count orders both),
//! and `fvd check` must be clean. After the threads end, a flush and more power cuts: every
//! sector reads exactly its last value.

mod common;

use common::*;
use fvd::io::SyncOnly;
use fvd::storage::SimStorage;
use rand::{Rng, SeedableRng};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

const THREADS: usize = 4;

fn h(sector: &[u8]) -> u64 {
    let mut s = DefaultHasher::new();
    sector.hash(&mut s);
    s.finish()
}

/// What happened to one sector, each step stamped with the disk's event count.
#[derive(Clone)]
enum Step {
    /// A value written (or zeroed) from here on may be there.
    Add(u64),
    /// A flush completed: only this value (and later adds) may be there.
    Settle(u64),
}

struct History {
    initial: Vec<u64>,
    /// Per sector; each sector has one writer thread, so each list is in order.
    steps: Vec<Mutex<Vec<(u64, Step)>>>,
}

impl History {
    fn allowed(&self, sector: usize, at: u64) -> Vec<u64> {
        let mut set = vec![self.initial[sector]];
        for (when, step) in self.steps[sector].lock().unwrap().iter() {
            match step {
                Step::Add(v) if *when <= at => set.push(*v),
                Step::Settle(v) if *when <= at => set = vec![*v],
                _ => {}
            }
        }
        set
    }

    fn push(&self, off: u64, bytes: &[u8], at: u64, settle: bool) {
        for (i, c) in bytes.chunks(SECTOR).enumerate() {
            let v = h(c);
            let step = if settle { Step::Settle(v) } else { Step::Add(v) };
            self.steps[off as usize / SECTOR + i].lock().unwrap().push((at, step));
        }
    }
}

fn verify(t: &TestImage, image: Vec<u8>, at: u64, hist: &History, what: &str) {
    let s = Arc::new(SimStorage::from_bytes("crashed", image));
    let img = t.open_on(s.clone(), false).unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
    let content = read_all(&img);
    for (i, c) in content.chunks(SECTOR).enumerate() {
        assert!(
            hist.allowed(i, at).contains(&h(c)),
            "{what}: sector {i} (offset {:#x}) holds a value it was not allowed to keep{}",
            i * SECTOR,
            if c.iter().all(|&b| b == 0) { " (zeros)" } else { "" }
        );
    }
    img.close().unwrap_or_else(|e| panic!("{what}: close after recovery failed: {e}"));
    drop(img);
    let report = fvd::image::check(s.as_ref());
    assert_eq!(report.exit_code(), 0, "{what}: check after recovery: {report:?}");
}

fn worker(t: &TestImage, img: &fvd::image::Image, hist: &History, me: usize, seed: u64, ops: usize) -> Vec<u8> {
    let stripe = t.cfg.chunk.unwrap_or(65536) as u64;
    let stripes: Vec<u64> = (0..t.cfg.size / stripe).filter(|k| *k as usize % THREADS == me).collect();
    let mut model = t.initial();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let events = || t.storage.events();
    for i in 0..ops {
        let base = stripes[rng.gen_range(0..stripes.len())] * stripe;
        let s = rng.gen_range(0..stripe / 512);
        let n = rng.gen_range(1..=(stripe / 512 - s));
        let (off, len) = (base + s * 512, n * 512);
        let what = format!("thread {me} op {i}");
        match rng.gen_range(0..100) {
            0..=54 => {
                let d = data(seed.wrapping_mul(10_000).wrapping_add(i as u64 + 1), len as usize);
                hist.push(off, &d, events(), false);
                run(img.write(&SyncOnly, off, &d, false)).unwrap_or_else(|e| panic!("{what}: write: {e}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            55..=69 => {
                // Often a whole stripe (a whole chunk: freed), else a part.
                let (off, len) = if rng.gen_bool(0.5) { (base, stripe) } else { (off, len) };
                hist.push(off, &vec![0u8; len as usize], events(), false);
                if rng.gen_bool(0.6) {
                    run(img.discard(&SyncOnly, off, len)).unwrap_or_else(|e| panic!("{what}: discard: {e}"));
                } else {
                    run(img.write_zeroes(&SyncOnly, off, len)).unwrap_or_else(|e| panic!("{what}: zero: {e}"));
                }
                model[off as usize..(off + len) as usize].fill(0);
            }
            70..=84 => {
                let mut b = vec![0u8; len as usize];
                run(img.read(&SyncOnly, off, &mut b)).unwrap_or_else(|e| panic!("{what}: read: {e}"));
                assert!(b == model[off as usize..(off + len) as usize], "{what}: read differs from what it wrote");
            }
            _ => {
                run(img.flush(&SyncOnly)).unwrap_or_else(|e| panic!("{what}: flush: {e}"));
                let at = events();
                for &k in &stripes {
                    let (o, l) = ((k * stripe) as usize, stripe as usize);
                    hist.push(o as u64, &model[o..o + l], at, true);
                }
            }
        }
    }
    model
}

fn run_config(cfg: Config, seed: u64, ops: usize) -> (usize, usize) {
    let t = TestImage::new(cfg);
    let img = t.open(false);
    let initial = t.initial();
    let hist = History {
        initial: initial.chunks(SECTOR).map(h).collect(),
        steps: (0..initial.len() / SECTOR).map(|_| Mutex::new(Vec::new())).collect(),
    };
    t.storage.start_capture(seed, 0.15);
    let models: Vec<Vec<u8>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..THREADS)
            .map(|me| {
                let (t, img, hist) = (&t, &img, &hist);
                sc.spawn(move || worker(t, img, hist, me, seed * 100 + me as u64, ops))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("worker panicked")).collect()
    });
    let caps = t.storage.take_captured_at();
    let n = caps.len();
    for (k, (at, cap)) in caps.into_iter().enumerate() {
        verify(&t, cap, at, &hist, &format!("cfg {cfg:?} seed {seed}: capture {k} at event {at}"));
    }
    // Every thread's last values, flushed: a power cut now loses nothing.
    let stripe = cfg.chunk.unwrap_or(65536) as usize;
    let mut last = initial.clone();
    for (k, piece) in last.chunks_mut(stripe).enumerate() {
        piece.copy_from_slice(&models[k % THREADS][k * stripe..(k + 1) * stripe]);
    }
    run(img.flush(&SyncOnly)).expect("final flush");
    let at = t.storage.events();
    hist.push(0, &last, at, true);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xF1);
    for k in 0..4 {
        verify(
            &t,
            t.storage.crash(&mut rng),
            at,
            &hist,
            &format!("cfg {cfg:?} seed {seed}: after the final flush {k}"),
        );
    }
    std::mem::forget(img);
    (n, 4)
}

#[test]
fn crashes_with_requests_in_flight() {
    let size = 2 << 20;
    let configs = [
        // table, 64 KiB chunks, no base: whole-chunk discards free chunks for reuse
        Config { size, block: 4096, chunk: Some(65536), base_size: 0, journal: 3 * 4096, cor: false },
        // table over a base, copy-on-write of 16 KiB blocks
        Config { size, block: 16384, chunk: Some(65536), base_size: 1 << 20, journal: 3 * 4096, cor: false },
        // raw layout over a base
        Config { size, block: 16384, chunk: None, base_size: size, journal: 3 * 4096, cor: false },
    ];
    let mut lines = Vec::new();
    for (i, cfg) in configs.into_iter().enumerate() {
        for round in 0..3u64 {
            let seed = 500 + i as u64 * 10 + round;
            let (caps, after) = run_config(cfg, seed, 300);
            lines.push(format!(
                "  cfg {i} seed {seed}: {caps} crash images with requests in flight, {after} after the final flush"
            ));
        }
    }
    println!("crashes with {THREADS} threads in flight:\n{}", lines.join("\n"));
}
