//! The writeback timer's commit (`Image::commit_pending`): a guest that never
//! flushes still gets its completed writes made durable, data before
//! metadata, once the timer fires; before it, a power cut may drop them.

mod common;

use common::{data, read_all, run, Config, TestImage};
use fvd::io::SyncOnly;
use fvd::storage::SimStorage;
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn config() -> Config {
    Config { size: 8 * MIB, block: 64 << 10, chunk: Some(1 << 20), base_size: 2 * MIB, journal: 256 << 10, cor: false }
}

/// Reopens what a power cut at this moment would leave.
fn after_power_cut(t: &TestImage) -> Vec<u8> {
    let s = Arc::new(SimStorage::from_bytes("crashed", t.storage.durable_bytes()));
    read_all(&t.open_on(s, false).expect("reopen after the power cut"))
}

#[test]
fn timer_commit_makes_unflushed_writes_durable() {
    let t = TestImage::new(config());
    let img = t.open(false);
    // A partial write over the base (copy-on-write, a bitmap bit) and a
    // first write beyond it (a chunk allocation).
    let (cow_off, cow) = (MIB + 4096, data(1, 8192));
    let (new_off, new) = (5 * MIB, data(2, 65536));
    run(img.write(&SyncOnly, cow_off, &cow, false)).expect("write over the base");
    run(img.write(&SyncOnly, new_off, &new, false)).expect("write beyond the base");
    let mut want = t.initial();
    want[cow_off as usize..][..cow.len()].copy_from_slice(&cow);
    want[new_off as usize..][..new.len()].copy_from_slice(&new);

    // Nothing made the writes durable yet: a power cut shows the old disk.
    assert_eq!(after_power_cut(&t), t.initial(), "unflushed writes durable before any commit");

    assert!(img.meta().persist.pending() > 0);
    // Younger than the interval: the timer leaves them to the guest's flush.
    assert!(!run(img.commit_pending(&SyncOnly, Duration::from_secs(3600))).expect("young records"));
    assert_eq!(after_power_cut(&t), t.initial(), "a young record was committed");
    std::thread::sleep(Duration::from_millis(20));
    assert!(img.meta().persist.pending_age().expect("records wait") >= Duration::from_millis(20));
    assert!(run(img.commit_pending(&SyncOnly, Duration::from_millis(20))).expect("periodic commit"), "had old records");
    assert_eq!(img.meta().persist.pending(), 0);
    assert_eq!(img.stats.snapshot().timer_commits, 1);
    assert_eq!(after_power_cut(&t), want, "the periodic commit did not make the writes durable");

    // Nothing new: the next tick does no I/O.
    let syncs = img.stats.snapshot().data_syncs;
    assert!(!run(img.commit_pending(&SyncOnly, Duration::ZERO)).expect("idle tick"));
    assert_eq!(img.stats.snapshot().data_syncs, syncs, "an idle tick synced");
    assert_eq!(img.stats.snapshot().timer_commits, 1);
}

#[test]
fn timer_commit_is_idle_in_writethrough_and_read_only() {
    let t = TestImage::new(config());
    {
        let img = t.open(true);
        run(img.write(&SyncOnly, 3 * MIB, &data(3, 4096), false)).expect("write");
        assert!(
            !run(img.commit_pending(&SyncOnly, Duration::ZERO)).expect("tick"),
            "writethrough left records pending"
        );
        run(img.flush(&SyncOnly)).expect("flush");
    }
    let opts = fvd::image::OpenOptions { read_only: true, ..Default::default() };
    let ro =
        fvd::image::Image::open_on(std::path::Path::new("image"), Box::new(t.storage.clone()), t.base_handle(), &opts)
            .expect("read-only open");
    assert!(!run(ro.commit_pending(&SyncOnly, Duration::ZERO)).expect("tick"));
}

#[test]
fn live_status_counts_records_per_write_and_prefetch() {
    let t = TestImage::new(config());
    let img = t.open(false);
    for i in 0..4u64 {
        // Beyond the base, within one chunk: one allocation record in all.
        run(img.write(&SyncOnly, 4 * MIB + i * 65536, &data(10 + i, 65536), false)).expect("write");
    }
    run(img.flush(&SyncOnly)).expect("flush");
    let l = img.live_status();
    assert_eq!(l.stats.guest_writes, 4);
    assert_eq!(l.stats.bitmap_records, 0, "writes beyond the base set bitmap bits");
    assert_eq!(l.stats.journal_records, 1, "one chunk allocation");
    assert!((l.records_per_write - 0.25).abs() < 1e-9, "{}", l.records_per_write);
    assert_eq!(l.pending_records, 0);
    let p = l.prefetch.expect("an image with a base reports prefetch");
    assert_eq!(p.base_blocks, 32);
    assert_eq!(p.cursor_blocks, 0);
    run(img.prefetch(&SyncOnly, &Default::default())).expect("prefetch");
    let p = img.live_status().prefetch.expect("prefetch");
    assert_eq!((p.cursor_blocks, p.percent), (32, 100.0));
    assert_eq!(p.state, fvd::image::PrefetchState::Done);
    assert_eq!(p.copied_bytes, 2 * MIB);
}
