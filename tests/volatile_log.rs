//! The volatile log: a daemon that dies without a flush loses no completed
//! write when the next one replays the log (same machine, still running),
//! and without the log those writes' metadata would be gone.

use fvd::image::{create, CreateOptions, Image, OpenOptions};
use fvd::io::uring::Uring;
use std::path::Path;

fn tmpfs_dir() -> Option<tempfile::TempDir> {
    let d = tempfile::tempdir_in("/dev/shm").ok()?;
    fvd::image::volatile::on_tmpfs(d.path()).then_some(d)
}

/// The tests run one at a time: a forked child inherits every descriptor of
/// the process, so it would hold the other tests' image locks while it lives.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const WRITES: [u64; 5] = [0, 3 << 20, (5 << 20) + 8192, 9 << 20, 20 << 20];

fn data(i: usize) -> Vec<u8> {
    vec![i as u8 + 1; 8192]
}

/// A daemon that writes and dies (a child process that exits without flush
/// or close: its flock goes with it, its data writes stay in the page cache).
fn die_after_writes(img_path: &Path, log: Option<&Path>) {
    // SAFETY: the child only opens the image, writes and _exits; the parent
    // waits for it. The tests run one at a time (`serial`).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let opts = OpenOptions { volatile_log: log.map(Path::to_path_buf), ..Default::default() };
        let code = (|| -> Option<()> {
            let img = Image::open(img_path, &opts).ok()?;
            if img.has_volatile_log() != log.is_some() {
                return None;
            }
            let ring = Uring::new(64).ok()?;
            for (i, off) in WRITES.into_iter().enumerate() {
                ring.block_on(img.write(&ring, off, &data(i), false)).ok()?.ok()?;
            }
            std::mem::forget(img); // dies: no close
            Some(())
        })()
        .map(|_| 0)
        .unwrap_or(1);
        // SAFETY: ends the child at once, without destructors (no close).
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; status is a live local.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child failed: {status}");
}

#[test]
fn a_new_daemon_replays_what_the_dead_one_left_in_the_volatile_log() {
    let _s = serial();
    let Some(shm) = tmpfs_dir() else {
        eprintln!("SKIP: no tmpfs at /dev/shm for the volatile log");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("base.raw"), vec![0x42u8; 8 << 20]).unwrap();
    let p = d.path().join("img.fvd");
    create(
        &p,
        &CreateOptions { size: Some(32 << 20), base: Some("base.raw".into()), block_size: 4096, ..Default::default() },
    )
    .unwrap();
    let log = shm.path().join("1.vlog");
    die_after_writes(&p, Some(&log));
    let img = Image::open(&p, &OpenOptions { volatile_log: Some(log.clone()), ..Default::default() }).unwrap();
    assert!(img.was_recovered());
    let ring = Uring::new(64).unwrap();
    for (i, off) in WRITES.into_iter().enumerate() {
        let mut b = vec![0u8; 8192];
        ring.block_on(img.read(&ring, off, &mut b)).unwrap().unwrap();
        assert!(b == data(i), "write at {off:#x} lost");
    }
    img.close().unwrap();
}

#[test]
fn without_the_log_unjournaled_allocations_are_lost() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("img.fvd");
    create(&p, &CreateOptions { size: Some(32 << 20), ..Default::default() }).unwrap();
    die_after_writes(&p, None);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let ring = Uring::new(64).unwrap();
    let mut b = vec![1u8; 8192];
    ring.block_on(img.read(&ring, WRITES[1], &mut b)).unwrap().unwrap();
    assert!(b.iter().all(|&x| x == 0), "unflushed allocation survived without a log");
}

#[test]
fn a_log_left_behind_is_stale_once_someone_else_recovers_the_image() {
    let _s = serial();
    let Some(shm) = tmpfs_dir() else {
        eprintln!("SKIP: no tmpfs at /dev/shm for the volatile log");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("img.fvd");
    create(&p, &CreateOptions { size: Some(32 << 20), ..Default::default() }).unwrap();
    let log = shm.path().join("2.vlog");
    die_after_writes(&p, Some(&log));
    // A host tool recovers the image without the log (losing the unjournaled
    // allocations, as a crash without the log would) and writes elsewhere.
    {
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        let ring = Uring::new(8).unwrap();
        ring.block_on(img.write(&ring, 30 << 20, &[9u8; 4096], false)).unwrap().unwrap();
        img.close().unwrap();
    }
    // The dead daemon's log must not be replayed over that.
    let img = Image::open(&p, &OpenOptions { volatile_log: Some(log), ..Default::default() }).unwrap();
    let ring = Uring::new(8).unwrap();
    let mut b = vec![1u8; 8192];
    ring.block_on(img.read(&ring, WRITES[1], &mut b)).unwrap().unwrap();
    assert!(b.iter().all(|&x| x == 0), "a stale volatile log was replayed");
    let mut b = vec![0u8; 4096];
    ring.block_on(img.read(&ring, 30 << 20, &mut b)).unwrap().unwrap();
    assert!(b.iter().all(|&x| x == 9));
    img.close().unwrap();
    drop(img);
    let s = fvd::storage::FileStorage::open(&p, fvd::storage::OpenMode::ReadOnly).unwrap();
    assert_eq!(fvd::image::check(&s).exit_code(), 0);
}

/// A daemon that writes, checkpoints (which empties the log), writes again
/// and dies: the log holds only what came after the checkpoint, and a new
/// daemon finds every write.
#[test]
fn a_checkpoint_empties_the_log_and_what_follows_it_is_replayed() {
    let _s = serial();
    let Some(shm) = tmpfs_dir() else {
        eprintln!("SKIP: no tmpfs at /dev/shm for the volatile log");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("img.fvd");
    create(&p, &CreateOptions { size: Some(32 << 20), ..Default::default() }).unwrap();
    let log = shm.path().join("3.vlog");
    // SAFETY: as in `die_after_writes`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let opts = OpenOptions { volatile_log: Some(log.clone()), ..Default::default() };
        let code = (|| -> Option<()> {
            let img = Image::open(&p, &opts).ok()?;
            let ring = Uring::new(64).ok()?;
            ring.block_on(img.write(&ring, 0, &data(0), false)).ok()?.ok()?;
            ring.block_on(img.save_progress(&ring)).ok()?.ok()?;
            ring.block_on(img.write(&ring, 3 << 20, &data(1), false)).ok()?.ok()?;
            std::mem::forget(img);
            Some(())
        })()
        .map(|_| 0)
        .unwrap_or(1);
        // SAFETY: ends the child at once, without destructors (no close).
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; status is a live local.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child failed: {status}");
    let session = {
        let s = fvd::storage::FileStorage::open(&p, fvd::storage::OpenMode::ReadOnly).unwrap();
        fvd::image::header_of(&s).unwrap().session
    };
    // One record: the second write's chunk (the first one's is checkpointed).
    let recs = fvd::image::volatile::read(&log, &p, session);
    assert_eq!(recs, vec![fvd::format::Record::TableSet { vchunk: 3, entry: 2 }]);
    let img = Image::open(&p, &OpenOptions { volatile_log: Some(log), ..Default::default() }).unwrap();
    let ring = Uring::new(8).unwrap();
    for (i, off) in [0, 3 << 20].into_iter().enumerate() {
        let mut b = vec![0u8; 8192];
        ring.block_on(img.read(&ring, off, &mut b)).unwrap().unwrap();
        assert!(b == data(i), "write at {off:#x} lost");
    }
    img.close().unwrap();
}

/// The volatile log against its persist view, with no image around them:
/// threads allocating, freeing and reallocating the same few chunks, and a
/// checkpoint taken and truncating the log meanwhile.
mod races {
    use fvd::format::Record;
    use fvd::image::volatile::{self, VolatileLog};
    use fvd::meta::{Persist, Table};
    use fvd::units::{ChunkIdx, PhysChunk};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, RwLock};

    const CHUNKS: usize = 16;
    const SESSION: u64 = 7;

    struct Setup {
        _dir: tempfile::TempDir,
        image: PathBuf,
        log: PathBuf,
    }

    fn setup() -> Option<Setup> {
        let dir = super::tmpfs_dir()?;
        let image = dir.path().join("img");
        std::fs::write(&image, b"x").unwrap();
        let log = dir.path().join("v.vlog");
        Some(Setup { _dir: dir, image, log })
    }

    fn fresh() -> (Table, Persist) {
        let p = Persist::new(vec![0; CHUNKS], fvd::format::BitmapBits::new());
        p.enable_volatile();
        (Table::new(&[0; CHUNKS]), p)
    }

    /// Replays `recs` onto `base` the way a new daemon does, and counts the
    /// records that cannot follow what comes before them: every change the
    /// live table makes maps an unmapped chunk or frees a mapped one, so a
    /// record that maps a mapped chunk or frees a free one is out of order.
    fn replay(base: &[u32], recs: &[Record]) -> (Vec<u32>, usize) {
        let mut t = base.to_vec();
        let mut out_of_order = 0;
        for r in recs {
            if let Record::TableSet { vchunk, entry, .. } = *r {
                let cur = &mut t[vchunk as usize];
                if (*cur == 0) == (entry == 0) {
                    out_of_order += 1;
                }
                *cur = entry;
            }
        }
        (t, out_of_order)
    }

    fn live(t: &Table) -> Vec<u32> {
        (0..t.len()).map(|c| t.get(ChunkIdx(c as u64)).map_or(0, |p| p.0 + 1)).collect()
    }

    /// One request: frees chunk `c` if mapped, maps it to a chunk of its own
    /// if not, then syncs the log as a request does before it completes.
    fn request(table: &Table, persist: &Persist, v: &VolatileLog, c: ChunkIdx, p: PhysChunk) {
        let changed = match table.get(c) {
            Some(old) => persist.unmap(table, c, old),
            None => persist.install(table, c, p).is_ok(),
        };
        if changed {
            v.sync(persist).unwrap();
        }
    }

    fn worker(t: u32, iters: u32, mut each: impl FnMut(ChunkIdx, PhysChunk)) {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
        for i in 0..iters {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            each(ChunkIdx(x % CHUNKS as u64), PhysChunk(t * 1_000_000 + i));
        }
    }

    /// A request that made no update of its own but landed in a chunk another
    /// request just mapped skips the log's lock when `covers` says the file
    /// holds every update made so far: then the file must hold that mapping.
    /// Writers map chunks and sync a moment later (their I/O in between); a
    /// reader looks up chunks, and for each one it finds mapped checks the
    /// file after `covers` (or a sync when it says no).
    #[test]
    fn covers_means_the_file_holds_every_update_seen() {
        let _s = super::serial();
        let Some(s) = setup() else {
            eprintln!("SKIP: no tmpfs at /dev/shm for the volatile log");
            return;
        };
        let v = VolatileLog::create(&s.log, &s.image, SESSION).unwrap();
        let (table, persist) = fresh();
        assert!(v.covers(&persist), "nothing made yet");
        persist.install(&table, ChunkIdx(0), PhysChunk(100)).unwrap();
        assert!(!v.covers(&persist), "a mapping not yet in the file");
        v.sync(&persist).unwrap();
        assert!(v.covers(&persist));
        let done = AtomicBool::new(false);
        let (mut covered, mut checked) = (0u32, 0u32);
        std::thread::scope(|sc| {
            let writers: Vec<_> = (1..3)
                .map(|t| {
                    let (table, persist, v) = (&table, &persist, &v);
                    sc.spawn(move || {
                        worker(t, 3_000, |c, p| {
                            if persist.install(table, c, p).is_ok() {
                                std::thread::yield_now();
                                v.sync(persist).unwrap();
                            } else if let Some(old) = table.get(c) {
                                if persist.unmap(table, c, old) {
                                    v.sync(persist).unwrap();
                                }
                            }
                        })
                    })
                })
                .collect();
            let (table, persist, v, done) = (&table, &persist, &v, &done);
            let reader = sc.spawn(move || {
                let (mut covered, mut checked, mut c) = (0u32, 0u32, 0u64);
                while !done.load(Ordering::Acquire) && checked < 3_000 {
                    c = (c + 7) % CHUNKS as u64;
                    let Some(p) = table.get(ChunkIdx(c)) else { continue };
                    if v.covers(persist) {
                        covered += 1;
                    } else {
                        v.sync(persist).unwrap();
                    }
                    let recs = volatile::read(&s.log, &s.image, SESSION);
                    let entry = p.0 + 1;
                    assert!(
                        recs.contains(&Record::TableSet { vchunk: c as u32, entry }),
                        "chunk {c} seen mapped to {} but the log lacks it",
                        p.0
                    );
                    checked += 1;
                }
                (covered, checked)
            });
            for w in writers {
                w.join().unwrap();
            }
            done.store(true, Ordering::Release);
            (covered, checked) = reader.join().unwrap();
        });
        eprintln!("covers: {checked} mappings seen and checked, {covered} of them without a sync");
        assert!(checked > 0);
    }

    /// Before the fix, each thread took its records from the persist view and
    /// appended them under another lock: a free and a reallocation of the
    /// same chunk reached the file in either order (tens to hundreds of
    /// records out of order in every round here).
    #[test]
    fn records_reach_the_log_in_the_order_they_were_made() {
        let _s = super::serial();
        let Some(s) = setup() else {
            eprintln!("SKIP: no tmpfs at /dev/shm for the volatile log");
            return;
        };
        for _round in 0..5 {
            let v = VolatileLog::create(&s.log, &s.image, SESSION).unwrap();
            let (table, persist) = fresh();
            std::thread::scope(|sc| {
                for t in 0..4 {
                    let (table, persist, v) = (&table, &persist, &v);
                    sc.spawn(move || worker(t, 20_000, |c, p| request(table, persist, v, c, p)));
                }
            });
            let recs = volatile::read(&s.log, &s.image, SESSION);
            let (replayed, out_of_order) = replay(&[0; CHUNKS], &recs);
            assert_eq!(out_of_order, 0, "{out_of_order} of {} records out of order", recs.len());
            assert_eq!(replayed, live(&table));
        }
    }

    /// A checkpoint runs while requests go on, and every moment between
    /// requests is a crash: the log replayed over what is durable then (the
    /// last checkpoint, or the one under way if its header may be written)
    /// must give the live table. Before the fix, the checkpoint read the
    /// append counter after its snapshot and could truncate records made in
    /// between, which no checkpoint held.
    #[test]
    fn a_checkpoint_drops_only_the_records_it_holds() {
        let _s = super::serial();
        let Some(s) = setup() else {
            eprintln!("SKIP: no tmpfs at /dev/shm for the volatile log");
            return;
        };
        for _round in 0..5 {
            let v = VolatileLog::create(&s.log, &s.image, SESSION).unwrap();
            let (table, persist) = fresh();
            // Requests and checkpoint steps take it shared; a crash check
            // takes it alone, between them.
            let gate = RwLock::new(());
            // What a crash leaves durable: the last checkpoint, and the one
            // under way (its header may or may not be written yet).
            let durable = Mutex::new((vec![0u32; CHUNKS], None::<Vec<u32>>));
            let done = AtomicBool::new(false);
            let (mut checkpoints, mut checks) = (0u32, 0u32);
            std::thread::scope(|sc| {
                let workers: Vec<_> = (0..3)
                    .map(|t| {
                        let (table, persist, v, gate) = (&table, &persist, &v, &gate);
                        sc.spawn(move || {
                            worker(t, 20_000, |c, p| {
                                let _g = gate.read().unwrap();
                                request(table, persist, v, c, p)
                            })
                        })
                    })
                    .collect();
                let (persist, v, gate, durable, done_r) = (&persist, &v, &gate, &durable, &done);
                let checkpointer = sc.spawn(move || {
                    let mut n = 0u32;
                    while !done_r.load(Ordering::Acquire) {
                        let covered = {
                            let _g = gate.read().unwrap();
                            let (_batch, snap, covered) = volatile::snapshot(Some(v), persist).unwrap();
                            durable.lock().unwrap().1 = Some(snap.table);
                            covered.unwrap()
                        };
                        std::thread::yield_now(); // the checkpoint's writes
                        let _g = gate.read().unwrap();
                        let mut d = durable.lock().unwrap();
                        d.0 = d.1.take().unwrap();
                        v.drop_covered(covered);
                        n += 1;
                    }
                    n
                });
                let (table, s, done_r) = (&table, &s, &done);
                let checker = sc.spawn(move || {
                    let mut n = 0u32;
                    while !done_r.load(Ordering::Acquire) {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        let _g = gate.write().unwrap();
                        let recs = volatile::read(&s.log, &s.image, SESSION);
                        let want = live(table);
                        let d = durable.lock().unwrap();
                        // The log starts where the last checkpoint's snapshot
                        // ends: each record follows the one before it.
                        let (replayed, out_of_order) = replay(&d.0, &recs);
                        assert_eq!(out_of_order, 0, "{out_of_order} of {} records out of order", recs.len());
                        assert_eq!(replayed, want, "the log over the last checkpoint lost updates");
                        // The one under way holds some of the log's records
                        // already: replayed again, they change nothing.
                        if let Some(next) = &d.1 {
                            assert_eq!(replay(next, &recs).0, want, "the log over the new checkpoint lost updates");
                        }
                        n += 1;
                    }
                    n
                });
                for w in workers {
                    w.join().unwrap();
                }
                done.store(true, Ordering::Release);
                checkpoints = checkpointer.join().unwrap();
                checks = checker.join().unwrap();
            });
            assert!(checkpoints > 0 && checks > 0, "{checkpoints} checkpoints, {checks} crash checks");
            let recs = volatile::read(&s.log, &s.image, SESSION);
            let (replayed, out_of_order) = replay(&durable.lock().unwrap().0, &recs);
            assert_eq!(out_of_order, 0);
            assert_eq!(replayed, live(&table));
        }
    }

    /// Updates made but not yet synced by their request when a checkpoint
    /// or a journal commit takes them reach the log first: a commit never
    /// makes durable an update the log lacks (the log, replayed after the
    /// journal, would otherwise undo it with an older update of the chunk).
    #[test]
    fn a_commit_puts_what_it_takes_into_the_log_first() {
        let _s = super::serial();
        let Some(s) = setup() else {
            eprintln!("SKIP: no tmpfs at /dev/shm for the volatile log");
            return;
        };
        let v = VolatileLog::create(&s.log, &s.image, SESSION).unwrap();
        let (table, persist) = fresh();
        let read = || volatile::read(&s.log, &s.image, SESSION);
        let set = |vchunk, entry| Record::TableSet { vchunk, entry };
        persist.install(&table, ChunkIdx(1), PhysChunk(0)).unwrap();
        v.sync(&persist).unwrap();
        assert!(persist.unmap(&table, ChunkIdx(1), PhysChunk(0))); // not synced
        let b = volatile::batch(Some(&v), &persist).unwrap();
        assert_eq!(b.records, vec![set(1, 0)]);
        assert_eq!(read(), vec![set(1, 1), set(1, 0)]);
        persist.install(&table, ChunkIdx(2), PhysChunk(0)).unwrap(); // not synced
        let (_b, snap, covered) = volatile::snapshot(Some(&v), &persist).unwrap();
        assert_eq!(read(), vec![set(1, 1), set(1, 0), set(2, 1)]);
        assert_eq!(snap.table[2], 1);
        assert_eq!(covered, Some(3));
        // After the checkpoint: what came after its snapshot stays, alone.
        persist.install(&table, ChunkIdx(3), PhysChunk(1)).unwrap();
        v.sync(&persist).unwrap();
        v.drop_covered(3);
        assert_eq!(read(), vec![set(3, 2)]);
        assert_eq!(replay(&snap.table, &read()).0, live(&table));
        // Nothing after the snapshot: the log is empty.
        let (_b, snap, covered) = volatile::snapshot(Some(&v), &persist).unwrap();
        v.drop_covered(covered.unwrap());
        assert_eq!(read(), vec![]);
        assert_eq!(std::fs::metadata(&s.log).unwrap().len(), 32);
        assert_eq!(snap.table, live(&table));
        // Appends go on after a truncation and a compaction alike.
        assert!(persist.unmap(&table, ChunkIdx(3), PhysChunk(1)));
        v.sync(&persist).unwrap();
        assert_eq!(read(), vec![set(3, 0)]);
        assert_eq!(v.written(), 5);
    }
}
