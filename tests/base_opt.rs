//! FVD's base-image optimizations on real files: zero detection at create,
//! copy-on-read, prefetch (with resume) — and the bitmap updates they save.

mod common;

use common::data as noise;
use fvd::image::{create, CreateOptions, Image, MapKind, OpenOptions, PrefetchOptions};
use fvd::io::uring::Uring;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// A 16 MiB sparse base with data in [2M, 5M) and [9M, 10M); the rest holes,
/// plus an all-zero block written explicitly at 12M.
fn make_base(dir: &Path) -> Vec<u8> {
    let p = dir.join("base.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(16 * MIB).unwrap();
    let mut content = vec![0u8; 16 * MIB as usize];
    for (start, len) in [(2 * MIB, 3 * MIB), (9 * MIB, MIB)] {
        let d = noise(start, len as usize);
        f.write_all_at(&d, start).unwrap();
        content[start as usize..(start + len) as usize].copy_from_slice(&d);
    }
    f.write_all_at(&vec![0u8; 65536], 12 * MIB).unwrap();
    content
}

fn image(dir: &Path, opts: CreateOptions) -> std::path::PathBuf {
    let p = dir.join("img.fvd");
    let _ = std::fs::remove_file(&p);
    create(&p, &CreateOptions { base: Some("base.raw".into()), size: Some(32 * MIB), ..opts }).unwrap();
    p
}

fn read_all(ring: &Uring, img: &Image) -> Vec<u8> {
    let mut b = vec![0u8; img.size() as usize];
    ring.block_on(img.read(ring, 0, &mut b)).unwrap().unwrap();
    b
}

fn expected(base: &[u8], size: u64) -> Vec<u8> {
    let mut e = base.to_vec();
    e.resize(size as usize, 0);
    e
}

#[test]
fn zero_blocks_and_writes_beyond_the_base_need_no_bitmap_update() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path());
    let p = image(d.path(), CreateOptions { block_size: 65536, ..Default::default() });
    let ring = Uring::new(64).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    // 16 MiB of base in 64 KiB blocks: 256 blocks, 64 with data.
    assert_eq!(img.meta().recorded.count_set(), 256 - 64, "zero blocks preset");
    assert_eq!(read_all(&ring, &img), expected(&base, 32 * MIB));
    let w = vec![0xA5u8; 4096];
    // Over holes of the base, over the explicitly zero block, beyond the base.
    for off in [0, 6 * MIB + 4096, 12 * MIB + 512 * 8, 20 * MIB] {
        ring.block_on(img.write(&ring, off, &w, false)).unwrap().unwrap();
    }
    ring.block_on(img.flush(&ring)).unwrap().unwrap();
    assert_eq!(img.meta().persist.bits_recorded(), 0, "no bitmap update for zero blocks or beyond the base");
    assert_eq!(img.stats.snapshot().bitmap_records, 0);
    // Over data of the base: copy-on-write records one bit.
    ring.block_on(img.write(&ring, 2 * MIB + 4096, &w, false)).unwrap().unwrap();
    ring.block_on(img.flush(&ring)).unwrap().unwrap();
    assert_eq!(img.meta().persist.bits_recorded(), 1);
    assert_eq!(img.stats.snapshot().bitmap_records, 1);
    let mut want = expected(&base, 32 * MIB);
    for off in [0, 6 * MIB + 4096, 12 * MIB + 4096, 20 * MIB, 2 * MIB + 4096] {
        want[off as usize..off as usize + 4096].fill(0xA5);
    }
    assert_eq!(read_all(&ring, &img), want);
    img.close().unwrap();
    drop(img);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert_eq!(read_all(&ring, &img), want);
    // Without zero detection every base block would have needed a bit.
    let p2 = image(d.path(), CreateOptions { block_size: 65536, zero_detect: false, ..Default::default() });
    let img2 = Image::open(&p2, &OpenOptions::default()).unwrap();
    assert_eq!(img2.meta().recorded.count_set(), 0);
    ring.block_on(img2.write(&ring, 0, &w, false)).unwrap().unwrap();
    assert_eq!(img2.meta().persist.bits_recorded(), 1);
}

#[test]
fn copy_on_read_stores_blocks_without_recording_them() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path());
    let p = image(d.path(), CreateOptions { block_size: 4096, ..Default::default() });
    let ring = Uring::new(64).unwrap();
    let img = Image::open(&p, &OpenOptions { copy_on_read: Some(true), ..Default::default() }).unwrap();
    let mut b = vec![0u8; MIB as usize];
    ring.block_on(img.read(&ring, 2 * MIB, &mut b)).unwrap().unwrap();
    assert!(img.background_pending());
    ring.block_on(img.run_background_copies(&ring)).unwrap();
    let q = img.copy_on_read_queue().unwrap();
    assert_eq!(q.copied_blocks.load(std::sync::atomic::Ordering::Relaxed), 256);
    assert_eq!(img.meta().persist.bits_recorded(), 0, "copy-on-read must not update the bitmap");
    assert!(
        img.map().iter().any(|r| r.kind == MapKind::Data && r.start == 2 * MIB),
        "copied data is served from the image"
    );
    // A guest write into a copied block must still be recorded.
    let w = vec![0x3Cu8; 512];
    ring.block_on(img.write(&ring, 2 * MIB + 8192, &w, false)).unwrap().unwrap();
    assert_eq!(img.meta().persist.bits_recorded(), 1);
    let mut want = expected(&base, 32 * MIB);
    want[(2 * MIB + 8192) as usize..(2 * MIB + 8192 + 512) as usize].fill(0x3C);
    assert_eq!(read_all(&ring, &img), want);
    img.close().unwrap();
    drop(img);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert_eq!(read_all(&ring, &img), want, "after reopen: copies read from the base again, the write from the image");
}

#[test]
fn prefetch_resumes_and_frees_the_base() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path());
    let p = image(d.path(), CreateOptions { block_size: 65536, chunk_size: Some(MIB as u32), ..Default::default() });
    let ring = Uring::new(64).unwrap();
    let w = vec![0x77u8; 65536];
    // First run: stopped part-way (the task is dropped), progress saved often.
    {
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        ring.block_on(img.write(&ring, 9 * MIB, &w, false)).unwrap().unwrap();
        let opts = PrefetchOptions {
            piece: 256 << 10,
            save_every: 256 << 10,
            rate_limit: Some(MIB),
            floor: 0,
            ..Default::default()
        };
        let exe = smol::LocalExecutor::new();
        let img_ref = &img;
        let ring_ref = &ring;
        let work = exe.spawn(async move { img_ref.prefetch(ring_ref, &opts).await });
        ring.run(&exe, async move {
            fvd::io::sleep(ring_ref, std::time::Duration::from_millis(1200)).await;
            drop(work);
        })
        .unwrap();
        let (cursor, total, _) = img.prefetch_progress();
        assert!(cursor > 0 && cursor < total, "cursor {cursor} of {total}");
        img.close().unwrap();
    }
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let (cursor, total, _) = img.prefetch_progress();
    assert!(cursor > 0 && cursor < total, "progress survives a restart: {cursor} of {total}");
    ring.block_on(img.prefetch(&ring, &PrefetchOptions::default())).unwrap().unwrap();
    assert_eq!(img.prefetch_progress().0, total);
    let bits_before = img.meta().persist.bits_recorded();
    // After prefetch: no bitmap updates at all.
    ring.block_on(img.write(&ring, 3 * MIB, &w, false)).unwrap().unwrap();
    ring.block_on(img.flush(&ring)).unwrap().unwrap();
    assert_eq!(img.meta().persist.bits_recorded(), bits_before);
    img.close().unwrap();
    drop(img);
    let mut want = expected(&base, 32 * MIB);
    want[9 * MIB as usize..(9 * MIB + 65536) as usize].fill(0x77);
    want[3 * MIB as usize..(3 * MIB + 65536) as usize].fill(0x77);
    std::fs::rename(d.path().join("base.raw"), d.path().join("moved.raw")).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert!(img.base().is_none(), "a prefetched image does not open its base");
    assert_eq!(read_all(&ring, &img), want);
    drop(img);
    let s = fvd::storage::FileStorage::open(&p, fvd::storage::OpenMode::ReadOnly).unwrap();
    assert_eq!(fvd::image::check(&s).exit_code(), 0);
}

/// A prefetch held to a rate limit under the back-off floor (2 MiB/s against
/// the default 4 MiB/s) runs at its limit and never backs off: its own limit
/// is not contention.
#[test]
fn a_rate_limited_prefetch_does_not_back_off() {
    let d = tempfile::tempdir().unwrap();
    make_base(d.path());
    let p = image(d.path(), CreateOptions { block_size: 65536, chunk_size: Some(MIB as u32), ..Default::default() });
    let ring = Uring::new(64).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let opts = PrefetchOptions { piece: 256 << 10, rate_limit: Some(2 * MIB), ..Default::default() };
    assert!(opts.floor > 2 * MIB, "the default floor is above this limit");
    ring.block_on(img.prefetch(&ring, &opts)).unwrap().unwrap();
    let (cursor, total, _) = img.prefetch_progress();
    assert_eq!(cursor, total);
    let live = img.live_status();
    let pf = live.prefetch.expect("prefetch status");
    assert_eq!(pf.backoffs, 0, "backed off {} times under its own rate limit", pf.backoffs);
    assert_eq!(pf.copied_bytes, 4 * MIB, "the base's 4 MiB of data copied");
    img.close().unwrap();
}
