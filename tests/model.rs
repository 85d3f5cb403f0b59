//! Property test: random sequences of write / read / discard / zero / flush /
//! reopen, across geometries, table on and off, with and without a base,
//! checked read by read against a flat in-memory model of the disk.

mod common;

use common::*;
use fvd::io::SyncOnly;
use proptest::prelude::*;

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
    let t = TestImage::new(cfg);
    let mut model = t.initial();
    let mut img = t.open(false);
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { off, len, fua } => {
                let d = data(i as u64 + 1, len as usize);
                run(img.write(&SyncOnly, off, &d, fua)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
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
                if matches!(op, Op::Discard { .. }) {
                    run(img.discard(&SyncOnly, off, len))
                } else {
                    run(img.write_zeroes(&SyncOnly, off, len))
                }
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => run(img.flush(&SyncOnly)).map_err(|e| TestCaseError::fail(e.to_string()))?,
            Op::Drain => run(img.run_background_copies(&SyncOnly)),
            Op::Prefetch => {
                run(img.prefetch(&SyncOnly, &Default::default())).map_err(|e| TestCaseError::fail(e.to_string()))?
            }
            Op::Reopen => {
                img.close().map_err(|e| TestCaseError::fail(e.to_string()))?;
                drop(img);
                img = t.open(false);
                prop_assert!(!img.was_recovered());
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
