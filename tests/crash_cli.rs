//! Crashes through the real binary: `fvd io` killed with SIGKILL while it waits on a
//! named pipe nobody writes (after its earlier commands completed), then opened again,
//! several times in a row. The first test is issue 9's reproduction: a second crash
//! after a recovery used to replay journal blocks the recovery had already applied.

mod common;

use common::bin::{fvd_merged, ok};
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `fvd io IMAGE -c ... -c 'write -s FIFO OFF'`, waits until the commands before the
/// pipe have printed `done` lines, then kills it with SIGKILL: a crash with every
/// earlier command completed and the image dirty.
fn crash_after(dir: &Path, img: &str, cmds: &[&str], done: usize) {
    let fifo = dir.join("fifo");
    if !fifo.exists() {
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    }
    let out_path = dir.join("io.out");
    let out = File::create(&out_path).unwrap();
    let mut args = vec!["io".to_string(), img.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push("-c".into());
    args.push(format!("write -s {} 3M", fifo.display()));
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_fvd"))
        .args(&args)
        .stdout(out)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn fvd io");
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if text.lines().count() >= done {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("fvd io exited ({st}) before reaching the pipe: {text}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "fvd io did not reach the pipe: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The pipe's open blocks: the process sits there with every command before it done.
    std::thread::sleep(Duration::from_millis(100));
    child.kill().expect("kill -9");
    child.wait().unwrap();
    wait_unlocked(Path::new(img));
}

/// Waits (up to 10 s) until nothing holds the image's lock: a process another test
/// thread forks at this moment holds a copy of the killed child's descriptors only
/// until it execs, but on a loaded machine that can outlast the next spawn.
fn wait_unlocked(img: &Path) {
    use std::os::fd::AsRawFd;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let Ok(f) = File::open(img) else { return };
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return; // released when `f` closes
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn second_crash_after_recovery_keeps_the_image_openable() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img.fvd");
    let img = img.to_str().unwrap();
    ok(&["create", "--size", "64M", img]);
    crash_after(
        d.path(),
        img,
        &["write -P 1 0 1M", "flush", "write -P 2 1M 1M", "flush", "write -P 3 2M 1M", "flush"],
        3,
    );
    crash_after(d.path(), img, &["discard 2M 1M", "flush", "write -P 4 5M 1M", "flush"], 2);
    ok(&["io", img, "-c", "read -P 4 5M 1M", "-c", "read -P 1 0 1M", "-c", "read -P 2 1M 1M", "-c", "read -P 0 2M 1M"]);
    let (code, out) = fvd_merged(&["check", img]);
    assert_eq!(code, 0, "{out}");
}

/// Five crash rounds in a row, each on the dirty image the previous one left (no clean
/// open in between): the round first reads back every flushed write of the rounds before,
/// then writes, zeroes and discards over a base, flushes, and is killed with SIGKILL.
#[test]
fn flushed_writes_survive_five_crash_rounds_over_a_base() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![0x5au8; 8 << 20]).unwrap();
    let img = d.path().join("img.fvd");
    let img = img.to_str().unwrap();
    ok(&["create", "--base", "base.raw", "--size", "32M", img]);
    // (pattern, offset, length) that must read back: rounds 0 and 1 are inside the base.
    let mut expect: Vec<(u8, u64, u64)> = Vec::new();
    for round in 0..6u64 {
        let mut cmds: Vec<String> = expect.iter().map(|(p, off, len)| format!("read -P {p} {off} {len}")).collect();
        let reads = cmds.len();
        if round < 5 {
            let p = 0x10 + round as u8;
            let r = round * (4 << 20);
            let (a, b, c, dsc) = (r, r + (1 << 20) + 65536 * round, r + (2 << 20), r + (3 << 20));
            cmds.extend([
                format!("write -P {p} {a} 64k"),
                format!("write -P {p} {b} 192k"),
                format!("zero {c} 64k"),
                format!("discard {dsc} 1M"),
                "flush".to_string(),
            ]);
            expect.extend([(p, a, 64 << 10), (p, b, 192 << 10), (0, c, 64 << 10)]);
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            crash_after(d.path(), img, &refs, reads + 4);
        } else {
            // The last round only reads, and closes cleanly.
            let mut args = vec!["io".to_string(), img.to_string()];
            for c in cmds {
                args.extend(["-c".to_string(), c]);
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            ok(&refs);
        }
    }
    let (code, out) = fvd_merged(&["check", img]);
    assert_eq!(code, 0, "{out}");
}

/// A crash can leave a chunk that holds data no durable record names (the data write
/// landed, its record did not). On the dirty image `fvd check` says so in a note and
/// exits 0: the recovery at the next read-write open wipes such chunks, so they are not
/// leaks. `--repair` (which recovers) leaves a clean image without the chunk's data.
#[test]
fn check_of_a_dirty_image_notes_chunks_recovery_wipes() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img.fvd");
    let img = img.to_str().unwrap();
    ok(&["create", "--size", "64M", img]);
    // Chunks 0..2 in use, then chunk 1 freed: the next allocation takes it again.
    ok(&["io", img, "-c", "write -P 1 0 1M", "-c", "write -P 2 4M 1M", "-c", "write -P 3 8M 1M", "-c", "flush"]);
    ok(&["io", img, "-c", "discard 4M 1M", "-c", "flush"]);
    let before = std::fs::read(img).unwrap();
    ok(&["io", img, "-c", "write -P 7 20M 1M", "-c", "flush"]);
    // The crash: the metadata as it was before the second write, the data after it,
    // and the header marked dirty.
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", "--output", "json", img])).unwrap();
    let data_off = info["regions"]["data"].as_u64().unwrap() as usize;
    let mut after = std::fs::read(img).unwrap();
    assert_eq!(info["allocated-chunks"].as_u64(), Some(3), "{info}");
    assert!(after.len() >= data_off + (3 << 20), "chunks not allocated");
    after[..data_off].copy_from_slice(&before[..data_off]);
    let slot = |b: &[u8], i: usize| fvd::format::Header::decode(&b[i * 4096..(i + 1) * 4096]).unwrap();
    let cur = if slot(&after, 0).generation > slot(&after, 1).generation { 0 } else { 1 };
    let mut h = slot(&after, cur);
    h.flags |= fvd::format::header::FLAG_DIRTY;
    after[cur * 4096..(cur + 1) * 4096].copy_from_slice(&h.encode());
    std::fs::write(img, after).unwrap();

    let (code, out) = fvd_merged(&["check", img]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Note:") && out.contains("1 chunk(s) hold data that no durable record names"), "{out}");
    assert!(!out.contains("Leaked"), "{out}");
    let (code, out) = fvd_merged(&["check", "--output", "json", img]);
    assert_eq!(code, 0, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["leaks"].as_array().map(Vec::len), Some(0), "{out}");
    assert_eq!(j["leaked_chunks"].as_array().map(Vec::len), Some(1), "{out}");

    let (code, out) = fvd_merged(&["check", "--repair", img]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = fvd_merged(&["check", img]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Note:") && !out.contains("not closed cleanly"), "{out}");
    ok(&[
        "io",
        img,
        "-c",
        "read -P 1 0 1M",
        "-c",
        "read -P 0 4M 1M",
        "-c",
        "read -P 3 8M 1M",
        "-c",
        "read -P 0 20M 1M",
    ]);
}
