//! End-to-end engine checks on real files through io_uring.

use fvd::image::{create, CreateOptions, Image, OpenOptions};
use fvd::io::uring::Uring;
use std::path::Path;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 512) as u8).wrapping_mul(31)).collect()
}

/// Runs a queue thread's tasks on its ring until all are done.
fn run_tasks(ring: &Uring, exe: &smol::LocalExecutor<'_>, tasks: Vec<smol::Task<()>>) {
    ring.run(exe, async move {
        for t in tasks {
            t.await;
        }
    })
    .unwrap();
}

fn join_threads(handles: Vec<std::thread::JoinHandle<()>>) {
    for h in handles {
        h.join().unwrap();
    }
}

fn open(p: &Path) -> Image {
    Image::open(p, &OpenOptions::default()).unwrap()
}

#[test]
fn write_read_reopen_over_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_data = pattern(7, 3 << 20);
    std::fs::write(&base, &base_data).unwrap();
    let img = dir.path().join("img.fvd");
    let opts =
        CreateOptions { size: Some(8 << 20), base: Some("base.raw".into()), block_size: 4096, ..Default::default() };
    create(&img, &opts).unwrap();
    let ring = Uring::new(64).unwrap();
    let i = open(&img);
    let mut buf = vec![0u8; 1 << 20];
    ring.block_on(i.read(&ring, 1 << 20, &mut buf)).unwrap().unwrap();
    assert_eq!(buf, base_data[1 << 20..2 << 20]);
    // A partial-block write over the base: copy-on-write keeps the rest.
    let w = vec![0xAB; 1024];
    ring.block_on(i.write(&ring, 4096 + 512, &w, false)).unwrap().unwrap();
    // A write beyond the base.
    let w2 = pattern(3, 65536);
    ring.block_on(i.write(&ring, 5 << 20, &w2, false)).unwrap().unwrap();
    ring.block_on(i.flush(&ring)).unwrap().unwrap();
    let mut b = vec![0u8; 8192];
    ring.block_on(i.read(&ring, 4096, &mut b)).unwrap().unwrap();
    let mut expect = base_data[4096..12288].to_vec();
    expect[512..1536].fill(0xAB);
    assert_eq!(b, expect);
    i.close().unwrap();
    drop(i);
    let i = open(&img);
    assert!(!i.was_recovered());
    let mut b = vec![0u8; 8192];
    ring.block_on(i.read(&ring, 4096, &mut b)).unwrap().unwrap();
    assert_eq!(b, expect);
    let mut b = vec![0u8; 65536];
    ring.block_on(i.read(&ring, 5 << 20, &mut b)).unwrap().unwrap();
    assert_eq!(b, w2);
    // The base was never written.
    assert_eq!(std::fs::read(&base).unwrap(), base_data);
}

#[test]
fn discard_frees_chunks_and_reuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.fvd");
    create(&img, &CreateOptions { size: Some(64 << 20), ..Default::default() }).unwrap();
    let ring = Uring::new(64).unwrap();
    let i = open(&img);
    let data = pattern(1, 1 << 20);
    for c in 0..4u64 {
        ring.block_on(i.write(&ring, c << 20, &data, false)).unwrap().unwrap();
    }
    assert_eq!(i.allocated_chunks(), 4);
    ring.block_on(i.discard(&ring, 1 << 20, 2 << 20)).unwrap().unwrap();
    assert_eq!(i.allocated_chunks(), 2);
    let mut b = vec![1u8; 1 << 20];
    ring.block_on(i.read(&ring, 1 << 20, &mut b)).unwrap().unwrap();
    assert!(b.iter().all(|&x| x == 0));
    ring.block_on(i.flush(&ring)).unwrap().unwrap();
    // Freed chunks come back before the image grows.
    let hwm = i.meta().alloc.hwm();
    ring.block_on(i.write(&ring, 10 << 20, &data, false)).unwrap().unwrap();
    assert_eq!(i.meta().alloc.hwm(), hwm);
}

/// Four threads, each with its own io_uring (as the ublk queues have), write
/// interleaved blocks of the same chunks over a base and read them back.
#[test]
fn queues_share_one_image_safely() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_data = pattern(9, 8 << 20);
    std::fs::write(&base, &base_data).unwrap();
    let img_path = dir.path().join("img.fvd");
    let opts =
        CreateOptions { size: Some(16 << 20), base: Some("base.raw".into()), block_size: 4096, ..Default::default() };
    create(&img_path, &opts).unwrap();
    let img = Arc::new(open(&img_path));
    const THREADS: u64 = 4;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let ring = Uring::new(64).unwrap();
                let exe = smol::LocalExecutor::new();
                let img = &img;
                let ring_ref = &ring;
                // Thread t owns every block b with b % THREADS == t; 16 writes in flight.
                let tasks: Vec<_> = (0..16u64)
                    .map(|w| {
                        exe.spawn(async move {
                            let mut b = t + w * THREADS;
                            while b < (16 << 20) / 4096 {
                                // Half-block writes force copy-on-write of the rest.
                                let d = vec![(b % 251) as u8 + 1; 2048];
                                img.write(ring_ref, b * 4096 + 1024, &d, false).await.unwrap();
                                b += 16 * THREADS;
                            }
                        })
                    })
                    .collect();
                run_tasks(&ring, &exe, tasks);
            })
        })
        .collect();
    join_threads(handles);
    let ring = Uring::new(64).unwrap();
    let mut all = vec![0u8; 16 << 20];
    ring.block_on(img.read(&ring, 0, &mut all)).unwrap().unwrap();
    for b in 0..(16u64 << 20) / 4096 {
        let blk = &all[(b * 4096) as usize..((b + 1) * 4096) as usize];
        let base_part = |r: std::ops::Range<usize>| {
            let start = b as usize * 4096;
            if start + r.end <= base_data.len() {
                base_data[start + r.start..start + r.end].to_vec()
            } else {
                vec![0u8; r.len()]
            }
        };
        assert_eq!(&blk[..1024], &base_part(0..1024)[..], "block {b} head");
        assert!(blk[1024..3072].iter().all(|&x| x == (b % 251) as u8 + 1), "block {b} data");
        assert_eq!(&blk[3072..], &base_part(3072..4096)[..], "block {b} tail");
    }
    img.close().unwrap();
}

/// Four threads with their own rings write, discard, read and flush whole
/// chunks of one small image at random, 8 requests in flight each, so chunks
/// are freed and reused all the time. Every 4 KiB block read back, during the
/// run and at the end, is either zeros or stamped with its own chunk and
/// block: never another offset's data.
#[test]
fn discards_and_writes_race_without_crossing_chunks() {
    use std::sync::Arc;
    const CHUNK: u64 = 64 << 10;
    const CHUNKS: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("img.fvd");
    let opts = CreateOptions {
        size: Some(CHUNKS * CHUNK),
        block_size: 4096,
        chunk_size: Some(CHUNK as u32),
        ..Default::default()
    };
    create(&img_path, &opts).unwrap();
    let img = Arc::new(open(&img_path));
    // Block b of chunk c, written by request id: (c, b) in the first 16 bytes.
    let stamp = |c: u64, id: u64| -> Vec<u8> {
        let mut v = vec![0u8; CHUNK as usize];
        for (b, blk) in v.chunks_mut(4096).enumerate() {
            blk[..8].copy_from_slice(&c.to_le_bytes());
            blk[8..16].copy_from_slice(&(b as u64).to_le_bytes());
            blk[16..24].copy_from_slice(&id.to_le_bytes());
        }
        v
    };
    let check = |c: u64, data: &[u8]| {
        for (b, blk) in data.chunks(4096).enumerate() {
            if blk.iter().all(|&x| x == 0) {
                continue;
            }
            let got_c = u64::from_le_bytes(blk[..8].try_into().unwrap());
            let got_b = u64::from_le_bytes(blk[8..16].try_into().unwrap());
            assert_eq!((got_c, got_b), (c, b as u64), "chunk {c} block {b} holds another offset's data");
        }
    };
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let ring = Uring::new(64).unwrap();
                let exe = smol::LocalExecutor::new();
                let (img, ring_ref) = (&img, &ring);
                let tasks: Vec<_> = (0..8u64)
                    .map(|w| {
                        exe.spawn(async move {
                            let mut x = (t * 8 + w + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                            for i in 0..300u64 {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                let c = x % CHUNKS;
                                match (x >> 32) % 8 {
                                    0..=3 => {
                                        let d = stamp(c, (t << 32) | (w << 16) | i);
                                        if let Err(e) = img.write(ring_ref, c * CHUNK, &d, false).await {
                                            let m = img.meta();
                                            let map: Vec<_> = (0..CHUNKS)
                                                .map(|c| m.table.get(fvd::units::ChunkIdx(c)).map(|p| p.0))
                                                .collect();
                                            panic!(
                                                "write of chunk {c}: {e}; free {:?} hwm {} freed pending {} map {:?}",
                                                m.alloc.free_chunks(),
                                                m.alloc.hwm(),
                                                m.persist.has_freed(),
                                                map
                                            );
                                        }
                                    }
                                    4 | 5 => img.discard(ring_ref, c * CHUNK, CHUNK).await.unwrap(),
                                    6 => {
                                        let mut d = vec![0u8; CHUNK as usize];
                                        img.read(ring_ref, c * CHUNK, &mut d).await.unwrap();
                                        check(c, &d);
                                    }
                                    _ => img.flush(ring_ref).await.unwrap(),
                                }
                            }
                        })
                    })
                    .collect();
                run_tasks(&ring, &exe, tasks);
            })
        })
        .collect();
    join_threads(handles);
    let ring = Uring::new(64).unwrap();
    let mut all = vec![0u8; (CHUNKS * CHUNK) as usize];
    ring.block_on(img.read(&ring, 0, &mut all)).unwrap().unwrap();
    for c in 0..CHUNKS {
        check(c, &all[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize]);
    }
    ring.block_on(img.flush(&ring)).unwrap().unwrap();
    assert!(img.meta().alloc.hwm() <= CHUNKS as u32 + 4 * 8, "freed chunks were not reused");
    img.close().unwrap();
}

/// `Image::read` is a safe function whose future a caller may drop while the kernel
/// still reads into the caller's buffer: the ring's operation waits in its `Drop` for
/// the completion, so the buffer outlives it (see `fvd::io::IoEngine`). Dropped
/// mid-flight a hundred times, then the ring and image still serve reads correctly.
#[test]
fn a_read_dropped_mid_flight_waits_for_the_kernel() {
    use std::future::Future;
    use std::task::{Context, Poll};
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("drop.fvd");
    let o = fvd::image::CreateOptions {
        size: Some(16 << 20),
        base: None,
        block_size: 65536,
        chunk_size: Some(1 << 20),
        journal_size: 1 << 20,
        zero_detect: false,
        copy_on_read: false,
        prefetch: false,
    };
    fvd::image::create(&path, &o).unwrap();
    let img = fvd::image::Image::open(&path, &Default::default()).unwrap();
    let ring = fvd::io::uring::Uring::new(64).unwrap();
    let pattern = vec![0x5au8; 4 << 20];
    ring.block_on(img.write(&ring, 0, &pattern, false)).unwrap().unwrap();
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    for _ in 0..100 {
        let mut buf = vec![0u8; 4 << 20];
        let mut fut = Box::pin(img.read(&ring, 0, &mut buf));
        // Submitted (or done at once); dropped without being awaited.
        let _ = matches!(fut.as_mut().poll(&mut cx), Poll::Pending);
        drop(fut);
        drop(buf);
    }
    let mut back = vec![0u8; 4 << 20];
    ring.block_on(img.read(&ring, 0, &mut back)).unwrap().unwrap();
    assert!(back == pattern);
    img.close().unwrap();
}
