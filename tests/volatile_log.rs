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
