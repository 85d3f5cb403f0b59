//! Property test: random sequences of write / read / discard / zero / flush /
//! reopen / power cut, across geometries, table on and off, with and without a base,
//! checked read by read against a flat in-memory model of the disk.
//!
//! A power cut keeps a random subset of the unsynced sectors, punches and growth
//! (see `SimStorage::crash`) and recovers the image. Then every sector must read a
//! value it was allowed to keep: what it held when the last completed flush began
//! (or a FUA write settled it), or a value written since; never anything else. The
//! recovered content becomes the model, and the sequence goes on from there.

mod common;

use common::*;
use fvd::io::SyncOnly;
use fvd::storage::SimStorage;
use proptest::prelude::*;
use rand::SeedableRng;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

fn h(sector: &[u8]) -> u64 {
    let mut s = DefaultHasher::new();
    sector.hash(&mut s);
    s.finish()
}

/// Per sector, the values (hashed) a power cut may leave.
fn exactly(content: &[u8]) -> Vec<Vec<u64>> {
    content.chunks(SECTOR).map(|c| vec![h(c)]).collect()
}

fn allow(allowed: &mut [Vec<u64>], off: u64, bytes: &[u8]) {
    for (i, c) in bytes.chunks(SECTOR).enumerate() {
        let set = &mut allowed[off as usize / SECTOR + i];
        let v = h(c);
        if !set.contains(&v) {
            set.push(v);
        }
    }
}

fn configs() -> impl Strategy<Value = Config> {
    let size = 4u64 << 20;
    (
        prop_oneof![Just(4096u32), Just(16384), Just(65536)],
        prop_oneof![Just(None), Just(Some(1u32)), Just(Some(4)), Just(Some(16))],
        prop_oneof![Just(0u64), Just(1 << 20), Just((5 << 19) + 1536), Just(size)],
        any::<bool>(),
    )
        .prop_map(move |(block, mult, base, cor)| Config {
            cor,
            size,
            block,
            chunk: mult.map(|m| (block * m).max(65536)),
            base_size: base,
            journal: 8 * 4096,
        })
}

fn run_sequence(cfg: Config, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut t = TestImage::new(cfg);
    let mut model = t.initial();
    let mut allowed = exactly(&model);
    let mut img = t.open(false);
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { off, len, fua } => {
                let d = data(i as u64 + 1, len as usize);
                allow(&mut allowed, off, &d);
                run(img.write(&SyncOnly, off, &d, fua)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                if fua {
                    for (k, c) in d.chunks(SECTOR).enumerate() {
                        allowed[off as usize / SECTOR + k] = vec![h(c)];
                    }
                }
            }
            Op::Read { off, len } => {
                let mut b = vec![0u8; len as usize];
                run(img.read(&SyncOnly, off, &mut b)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let want = &model[off as usize..(off + len) as usize];
                if b != want {
                    let at = b.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                    return Err(TestCaseError::fail(format!("op {i} {op:?}: mismatch at +{at:#x}")));
                }
            }
            Op::Discard { off, len } | Op::Zero { off, len } => {
                allow(&mut allowed, off, &vec![0u8; len as usize]);
                if matches!(op, Op::Discard { .. }) {
                    run(img.discard(&SyncOnly, off, len))
                } else {
                    run(img.write_zeroes(&SyncOnly, off, len))
                }
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => {
                run(img.flush(&SyncOnly)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                allowed = exactly(&model);
            }
            Op::Drain => run(img.run_background_copies(&SyncOnly)),
            Op::Prefetch => {
                run(img.prefetch(&SyncOnly, &Default::default())).map_err(|e| TestCaseError::fail(e.to_string()))?
            }
            Op::Reopen => {
                img.close().map_err(|e| TestCaseError::fail(e.to_string()))?;
                drop(img);
                img = t.open(false);
                prop_assert!(!img.was_recovered());
                allowed = exactly(&model);
            }
            Op::Crash { seed } => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let disk = t.storage.crash(&mut rng);
                // The process dies: no close, no drop that would write.
                std::mem::forget(img);
                t.storage = Arc::new(SimStorage::from_bytes("image", disk));
                img = t
                    .open_on(t.storage.clone(), false)
                    .map_err(|e| TestCaseError::fail(format!("op {i}: recovery failed: {e}")))?;
                let got = read_all(&img);
                for (k, c) in got.chunks(SECTOR).enumerate() {
                    if !allowed[k].contains(&h(c)) {
                        return Err(TestCaseError::fail(format!(
                            "op {i} {op:?}: sector {k} (offset {:#x}) holds a value it never held since the last flush",
                            k * SECTOR
                        )));
                    }
                }
                model = got;
                allowed = exactly(&model);
            }
        }
    }
    prop_assert!(read_all(&img) == model, "final content differs from the model");
    img.close().map_err(|e| TestCaseError::fail(e.to_string()))?;
    drop(img);
    let report = fvd::image::check(t.storage.as_ref());
    prop_assert_eq!(report.exit_code(), 0, "check: {:?}", report);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn image_matches_flat_model(cfg in configs(), ops in proptest::collection::vec(op_strategy(4 << 20), 1..40)) {
        run_sequence(cfg, ops)?;
    }
}
