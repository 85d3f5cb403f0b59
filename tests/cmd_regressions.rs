//! One test per defect found by trying the image commands as a new user would
//! (issue 20): each reproduces the report through the binary and fails on the
//! code before its fix.

mod common;

use common::bin::{fvd, fvd_merged, ok, s};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn p(dir: &Path, name: &str) -> String {
    s(&dir.join(name)).to_string()
}

/// Report 1: A safe rebase onto an fvd layer with its own base keeps what the image
/// reads: the new chain is read through, not the new base's own blocks alone.
#[test]
fn safe_rebase_onto_a_layer_with_a_base_keeps_the_content() {
    let d = tempfile::tempdir().unwrap();
    let (b, a, bb, c) = (p(d.path(), "b.fvd"), p(d.path(), "A.fvd"), p(d.path(), "B.fvd"), p(d.path(), "C.fvd"));
    ok(&["create", "--size", "8M", &b]);
    ok(&["io", &b, "-c", "write -P 1 0 8M"]);
    ok(&["create", "--base", &b, &a]);
    ok(&["snapshot", &a, &bb]);
    ok(&["io", &bb, "-c", "zero 0 1M"]);
    ok(&["snapshot", &bb, &c]);
    ok(&["io", "-r", &c, "-c", "read -P 0 0 1M", "-c", "read -P 1 1M 7M"]);
    let out = ok(&["rebase", "-b", &a, &c]);
    assert!(out.contains("1.0 MiB copied"), "{out}");
    ok(&["io", "-r", &c, "-c", "read -P 0 0 1M", "-c", "read -P 1 1M 7M"]);
    // And onto the bottom, and standing alone.
    ok(&["rebase", "-b", &b, &c]);
    ok(&["io", "-r", &c, "-c", "read -P 0 0 1M", "-c", "read -P 1 1M 7M"]);
    ok(&["rebase", "-b", "", &c]);
    ok(&["io", "-r", &c, "-c", "read -P 0 0 1M", "-c", "read -P 1 1M 7M"]);
}

/// Report 2: A failed offline snapshot (NEW exists, or its folder does not) leaves
/// the image live.
#[test]
fn a_failed_snapshot_leaves_the_image_as_it_was() {
    let d = tempfile::tempdir().unwrap();
    let img = p(d.path(), "img.fvd");
    let taken = p(d.path(), "taken.fvd");
    ok(&["create", "--size", "8M", &img]);
    std::fs::write(&taken, b"").unwrap();
    let (code, out) = fvd_merged(&["snapshot", &img, &taken]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("already exists"), "{out}");
    ok(&["io", &img, "-c", "write -P 3 0 64k"]);
    let (code, out) = fvd_merged(&["snapshot", &img, &p(d.path(), "nodir/x.fvd")]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("does not exist"), "{out}");
    ok(&["io", &img, "-c", "write -P 4 0 64k"]);
    assert!(!d.path().join("nodir").exists());
    let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "no temporary file is left: {left:?}");
    // A snapshot that works still freezes.
    ok(&["snapshot", &img, &p(d.path(), "new.fvd")]);
    let (code, _) = fvd_merged(&["io", &img, "-c", "write -P 4 0 64k"]);
    assert_ne!(code, 0);
}

/// Waits until `file` holds `text`, at most 20 s.
fn wait_for(file: &Path, text: &str) {
    let t0 = Instant::now();
    while !std::fs::read_to_string(file).unwrap_or_default().contains(text) {
        assert!(t0.elapsed() < Duration::from_secs(20), "{text:?} never appeared in {}", file.display());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Report 3: Writethrough: a completed zero (or discard) over base data survives a
/// SIGKILL right after it, like a completed write.
#[test]
fn writethrough_zero_and_discard_survive_a_kill() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    let bytes: Vec<u8> = (0..(16u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&base, &bytes).unwrap();
    let fifo = d.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (i, op) in ["zero", "discard"].iter().enumerate() {
        let img = p(d.path(), &format!("img{i}.fvd"));
        ok(&["create", "--base", s(&base), &img]);
        let out_path = d.path().join(format!("out{i}.txt"));
        let out = std::fs::File::create(&out_path).unwrap();
        // The second command waits on a pipe nobody writes: killed there,
        // the first has completed.
        let mut child = Command::new(env!("CARGO_BIN_EXE_fvd"))
            .args(["io", "--writethrough", &img, "-c", &format!("{op} 0 64k"), "-c"])
            .arg(format!("write -s {} 1M 64k", s(&fifo)))
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&out_path, "65536/65536 bytes at offset 0");
        child.kill().unwrap();
        child.wait().unwrap();
        ok(&["io", "-r", &img, "-c", "read -P 0 0 64k"]);
    }
}

/// Report 4-7: `fvd io`: a source with an odd length keeps the disk's bytes after
/// it; a source without a size needs a length and is never read whole; a
/// range past the end, or one that wraps, is refused before anything is done.
#[test]
fn io_write_from_a_file_and_out_of_range_requests() {
    let d = tempfile::tempdir().unwrap();
    let img = p(d.path(), "s.fvd");
    ok(&["create", "--size", "8M", &img]);
    ok(&["io", &img, "-c", "write -P 9 0 4k"]);
    let one = p(d.path(), "one.bin");
    std::fs::write(&one, b"A").unwrap();
    assert!(ok(&["io", &img, "-c", &format!("write -s {one} 0")]).contains("wrote 1/1 bytes"));
    let got = p(d.path(), "got.bin");
    ok(&["io", "-r", &img, "-c", &format!("read -o {got} 0 512")]);
    let g = std::fs::read(&got).unwrap();
    assert_eq!(g[0], b'A');
    assert!(g[1..].iter().all(|&b| b == 9), "the 511 bytes after a 1-byte file stay");
    // /dev/zero has no size: refused at once without LEN, streamed with it.
    let t0 = Instant::now();
    let (code, out) = fvd_merged(&["io", &img, "-c", "write -s /dev/zero 0"]);
    assert_ne!(code, 0);
    assert!(out.contains("give LEN"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    ok(&["io", &img, "-c", "write -s /dev/zero 0 64k", "-c", "read -P 0 0 64k"]);
    // Past the end: nothing of it is written.
    ok(&["io", &img, "-c", "write -P 5 7M 1M"]);
    let nine = p(d.path(), "nine.bin");
    std::fs::write(&nine, vec![0x77u8; 9 << 20]).unwrap();
    let (code, out) = fvd_merged(&["io", &img, "-c", &format!("write -s {nine} 0")]);
    assert_ne!(code, 0);
    assert!(out.contains("outside the disk"), "{out}");
    ok(&["io", "-r", &img, "-c", "read -P 5 7M 1M", "-c", "read -P 0 0 64k"]);
    // An offset that wraps.
    for c in [
        "write -P 7 18446744073709551104 1024",
        "read -P 0 18446744073709551104 1024",
        "zero 18446744073709551104 1024",
    ] {
        let (code, out) = fvd_merged(&["io", &img, "-c", c]);
        assert_ne!(code, 0, "{c}: {out}");
        assert!(out.contains("outside the disk"), "{c}: {out}");
    }
    let (code, out) = fvd_merged(&["io", "-r", &img, "-c", &format!("read -o {got} 18446744073709551104 1024")]);
    assert_ne!(code, 0, "{out}");
}

/// Report 8: Layers a commit marked invalid never open again for their data.
#[test]
fn invalid_layers_do_not_open() {
    let d = tempfile::tempdir().unwrap();
    let (l0, l1, l2) = (p(d.path(), "l0.fvd"), p(d.path(), "l1.fvd"), p(d.path(), "l2.fvd"));
    ok(&["create", "--size", "4M", &l0]);
    ok(&["io", &l0, "-c", "write -P 1 0 4M"]);
    ok(&["create", "-b", &l0, &l1]);
    ok(&["io", &l1, "-c", "write -P 2 0 1M"]);
    ok(&["snapshot", &l1, &l2]);
    ok(&["io", &l2, "-c", "write -P 3 1M 1M"]);
    let out = ok(&["commit", "-b", &l0, &l2]);
    assert!(out.contains("Marked invalid"), "{out}");
    for args in [
        vec!["io", "-r", l1.as_str(), "-c", "read 0 1M"],
        vec!["convert", l1.as_str(), "x.raw"],
        vec!["map", l1.as_str()],
        vec!["snapshot", l1.as_str(), "y.fvd"],
    ] {
        let (code, out) = fvd_merged(&args);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(out.contains("invalid"), "{args:?}: {out}");
    }
    // info still says what it is; check notes it and is clean.
    assert!(ok(&["info", &l1]).contains("image:"));
    assert!(ok(&["check", &l1]).contains("marked invalid"));
    ok(&["io", "-r", &l2, "-c", "read -P 2 0 1M", "-c", "read -P 3 1M 1M", "-c", "read -P 1 2M 2M"]);
}

/// Report 9: An fvd base is frozen when an overlay is created over it: a write to
/// it, which would change what the overlay reads, is refused.
#[test]
fn a_base_is_frozen_by_an_overlay_over_it() {
    let d = tempfile::tempdir().unwrap();
    let (b, o) = (p(d.path(), "b.fvd"), p(d.path(), "o.fvd"));
    ok(&["create", "--size", "4M", &b]);
    ok(&["io", &b, "-c", "write -P 1 0 4M"]);
    let out = ok(&["create", "--base", &b, &o]);
    assert!(out.contains("is now frozen"), "{out}");
    let (code, out) = fvd_merged(&["io", &b, "-c", "write -P 5 0 1M"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("frozen"), "{out}");
    ok(&["io", "-r", &o, "-c", "read -P 1 0 4M"]);
    // A base another process writes is refused, and left alone.
    let b2 = p(d.path(), "b2.fvd");
    ok(&["create", "--size", "4M", &b2]);
    let fifo = d.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut writer = Command::new(env!("CARGO_BIN_EXE_fvd"))
        .args(["io", &b2, "-c"])
        .arg(format!("write -s {} 0 512", s(&fifo)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !fvd::storage::held_by_writer(Path::new(&b2)) {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, out) = fvd_merged(&["create", "--base", &b2, &p(d.path(), "o2.fvd")]);
    assert_ne!(code, 0, "{out}");
    let (_, out) = fvd_merged(&["check", &b2]);
    assert!(out.contains("open for writing"), "check warns of the writer: {out}");
    writer.kill().unwrap();
    writer.wait().unwrap();
    assert!(!d.path().join("o2.fvd").exists());
    ok(&["io", &b2, "-c", "write -P 1 0 512"]);
}

/// Report 10: A rebase that would make the chain loop is refused, safe or unsafe.
#[test]
fn rebase_refuses_loops() {
    let d = tempfile::tempdir().unwrap();
    let (o, t) = (p(d.path(), "o.fvd"), p(d.path(), "t.fvd"));
    let base = p(d.path(), "b.fvd");
    ok(&["create", "--size", "4M", &base]);
    ok(&["create", "-b", &base, &o]);
    ok(&["snapshot", &o, &t]);
    // o is frozen (t is over it), t is live.
    for args in [
        vec!["rebase", "-b", t.as_str(), t.as_str()],
        vec!["rebase", "-u", "-b", t.as_str(), t.as_str()],
        vec!["rebase", "-b", o.as_str(), o.as_str()],
        vec!["rebase", "-b", t.as_str(), o.as_str()],
    ] {
        let (code, out) = fvd_merged(&args);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(out.contains("loops"), "{args:?}: {out}");
    }
    // An unsafe rebase of a frozen layer is refused before any loop is looked at.
    let (code, out) = fvd_merged(&["rebase", "-u", "-b", &t, &o]);
    assert!(code != 0 && out.contains("frozen"), "{out}");
    ok(&["io", "-r", &t, "-c", "read -P 0 0 4M"]);
    ok(&["check", &t]);
}

/// Report 11: A prefetch rate of 0 is refused at once.
#[test]
fn prefetch_rate_zero_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (b, o) = (p(d.path(), "b.raw"), p(d.path(), "o.fvd"));
    std::fs::write(&b, vec![1u8; 1 << 20]).unwrap();
    ok(&["create", "-b", &b, &o]);
    let t0 = Instant::now();
    let (code, out) = fvd_merged(&["prefetch", "--rate", "0", &o]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("rate of 0"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    ok(&["prefetch", "--rate", "64M", &o]);
}

/// Report 12: An interrupted convert leaves no output that looks whole, and the same
/// command again completes; a killed create leaves no image either.
#[test]
fn interrupted_convert_and_create_leave_nothing_half_made() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    let bytes: Vec<u8> = (0..(96u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    std::fs::write(&src, &bytes).unwrap();
    let out = p(d.path(), "out.fvd");
    let mut killed = 0;
    for delay_ms in [0u64, 20, 60, 150] {
        let _ = std::fs::remove_file(&out);
        let mut child = Command::new(env!("CARGO_BIN_EXE_fvd"))
            .args(["convert", s(&src), &out])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        if child.wait().unwrap().code().is_none() {
            killed += 1;
        }
        if Path::new(&out).exists() {
            // Only ever whole.
            ok(&["check", &out]);
            let back = p(d.path(), "back.raw");
            let _ = std::fs::remove_file(&back);
            ok(&["convert", "-O", "raw", &out, &back]);
            assert!(std::fs::read(&back).unwrap() == bytes);
            continue;
        }
        let (code, o) = fvd_merged(&["check", &out]);
        assert_ne!(code, 0, "no image, no clean check: {o}");
        ok(&["convert", s(&src), &out]);
        let back = p(d.path(), "back.raw");
        let _ = std::fs::remove_file(&back);
        ok(&["convert", "-O", "raw", &out, &back]);
        assert!(std::fs::read(&back).unwrap() == bytes, "the rerun's output reads the source");
    }
    assert!(killed > 0, "at least one convert was killed part-way");
    // A 0-byte source and a folder are refused with their names.
    let empty = p(d.path(), "empty.raw");
    std::fs::write(&empty, b"").unwrap();
    let (code, o) = fvd_merged(&["convert", &empty, &p(d.path(), "e.fvd")]);
    assert!(code != 0 && o.contains("empty"), "{o}");
    let (code, o) = fvd_merged(&["convert", s(d.path()), &p(d.path(), "f.fvd")]);
    assert!(code != 0 && o.contains("is a folder"), "{o}");
    // A killed create: the name holds a whole image or nothing.
    for delay_us in [0u64, 300, 1000, 3000] {
        let img = p(d.path(), "c.fvd");
        let _ = std::fs::remove_file(&img);
        let mut child = Command::new(env!("CARGO_BIN_EXE_fvd"))
            .args(["create", "--size", "1G", "--journal-size", "64M", &img])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(delay_us));
        let _ = child.kill();
        child.wait().unwrap();
        if Path::new(&img).exists() {
            ok(&["check", &img]);
        } else {
            ok(&["create", "--size", "1G", &img]);
        }
    }
}

/// The smaller ones: check does not call an image clean that does not open;
/// commit of a prefetched overlay says why it cannot.
#[test]
fn check_sees_images_that_do_not_open_and_commit_after_prefetch_says_why() {
    let d = tempfile::tempdir().unwrap();
    let (b, o) = (p(d.path(), "b.raw"), p(d.path(), "o.fvd"));
    std::fs::write(&b, vec![1u8; 1 << 20]).unwrap();
    ok(&["create", "-b", &b, &o]);
    ok(&["check", &o]);
    std::fs::remove_file(&b).unwrap();
    let (code, out, _) = fvd(&["check", &o]);
    assert_eq!(code, 2, "a missing base: {out}");
    assert!(out.contains("does not open"), "{out}");
    std::fs::write(&b, vec![1u8; 1 << 20]).unwrap();
    ok(&["check", &o]);
    // A truncated lower fvd layer (issue 21's fourth finding): the top's check sees it.
    let (l, t) = (p(d.path(), "l.fvd"), p(d.path(), "t.fvd"));
    ok(&["create", "--size", "8M", &l]);
    ok(&["io", &l, "-c", "write -P 1 0 8M"]);
    ok(&["create", "-b", &l, &t]);
    ok(&["check", &t]);
    let len = std::fs::metadata(&l).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&l).unwrap().set_len(len - (4 << 20)).unwrap();
    let (code, out, _) = fvd(&["check", &t]);
    assert_eq!(code, 2, "a truncated lower layer: {out}");
    assert!(out.contains("does not open") && out.contains("l.fvd"), "{out}");
    assert!(out.contains("a layer of the chain of"), "the layer's own problems are reported: {out}");
    ok(&["prefetch", &o]);
    ok(&["io", &o, "-c", "write -P 2 0 64k"]);
    let (code, out) = fvd_merged(&["commit", &o]);
    assert_ne!(code, 0);
    assert!(out.contains("no base to commit into"), "{out}");
}

/// Found by the model test: a commit into a layer that another overlay also
/// reads through changed what that overlay read, without a word. The target
/// now takes a new identity first, so the other overlay is refused instead.
#[test]
fn commit_into_a_shared_base_refuses_its_other_overlays() {
    let d = tempfile::tempdir().unwrap();
    let (b, x, y) = (p(d.path(), "b.fvd"), p(d.path(), "x.fvd"), p(d.path(), "y.fvd"));
    ok(&["create", "--size", "4M", &b]);
    ok(&["io", &b, "-c", "write -P 1 0 4M"]);
    ok(&["create", "-b", &b, &x]);
    ok(&["create", "-b", &b, &y]);
    ok(&["io", &x, "-c", "write -P 2 0 1M"]);
    ok(&["commit", &x]);
    ok(&["io", "-r", &x, "-c", "read -P 2 0 1M", "-c", "read -P 1 1M 3M"]);
    let (code, out) = fvd_merged(&["io", "-r", &y, "-c", "read -P 1 0 1M"]);
    assert_ne!(code, 0, "y would read x's data through the changed base: {out}");
    assert!(out.contains("is not the image this one was created over"), "{out}");
    let (code, _, _) = fvd(&["check", &y]);
    assert_eq!(code, 2);
}

/// Found by the model test: a rebase onto a live layer let that layer be
/// written afterwards, changing what the rebased image read. The new base is
/// frozen now, as `create --base` does.
#[test]
fn rebase_freezes_the_new_base() {
    let d = tempfile::tempdir().unwrap();
    let (b, o, n) = (p(d.path(), "b.fvd"), p(d.path(), "o.fvd"), p(d.path(), "n.fvd"));
    ok(&["create", "--size", "4M", &b]);
    ok(&["create", "-b", &b, &o]);
    ok(&["create", "--size", "4M", &n]);
    ok(&["io", &n, "-c", "write -P 6 0 1M"]);
    ok(&["rebase", "-b", &n, &o]);
    ok(&["io", "-r", &o, "-c", "read -P 0 0 4M"]);
    let (code, out) = fvd_merged(&["io", &n, "-c", "write -P 7 0 1M"]);
    assert!(code != 0 && out.contains("frozen"), "{out}");
    ok(&["io", "-r", &o, "-c", "read -P 0 0 4M"]);
}

/// The smaller ones, continued: `check` of an image whose header names no
/// usable base (base format 0 with a base size, an empty base path) is not
/// clean; `convert` says when it takes a file without an fvd header as raw.
#[test]
fn check_of_a_header_without_its_base_and_convert_of_a_headerless_file() {
    let d = tempfile::tempdir().unwrap();
    let (b, o) = (p(d.path(), "b.raw"), p(d.path(), "o.fvd"));
    std::fs::write(&b, vec![1u8; 1 << 20]).unwrap();
    ok(&["create", "-b", &b, &o]);
    let patch_header = |f: &dyn Fn(&mut fvd::format::Header)| {
        let mut bytes = std::fs::read(&o).unwrap();
        for slot in 0..2 {
            let off = slot * 4096;
            let mut h = fvd::format::Header::decode(&bytes[off..off + 4096]).unwrap();
            f(&mut h);
            bytes[off..off + 4096].copy_from_slice(&h.encode());
        }
        std::fs::write(&o, bytes).unwrap();
    };
    let good = std::fs::read(&o).unwrap();
    patch_header(&|h| h.base_format = fvd::format::BaseFormat::None);
    let (code, out, _) = fvd(&["check", &o]);
    assert_eq!(code, 2, "base format 0 with a base size: {out}");
    std::fs::write(&o, &good).unwrap();
    patch_header(&|h| h.base_path.clear());
    let (code, out, _) = fvd(&["check", &o]);
    assert_eq!(code, 2, "an empty base path: {out}");
    // Both magics gone: converted as raw, and said so.
    let mut bytes = good.clone();
    bytes[..8].fill(0);
    bytes[4096..4104].fill(0);
    let damaged = p(d.path(), "damaged.fvd");
    std::fs::write(&damaged, &bytes).unwrap();
    let (code, out) = fvd_merged(&["convert", &damaged, &p(d.path(), "x.fvd")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no fvd header"), "{out}");
}

/// Found by the torture run (issue 23, seed 5 on 7.3.4): after a snapshot, the live top
/// grew (online or offline) and a commit into its frozen base was refused with "grow it
/// first", which fvd resize refuses for a frozen layer: advice that cannot be followed.
/// The refusal now says what works, and that works: the top stands alone with every byte.
#[test]
fn commit_into_a_smaller_frozen_base_names_what_works() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = (p(d.path(), "base.fvd"), p(d.path(), "top.fvd"));
    ok(&["create", "--size", "8M", &base]);
    ok(&["io", &base, "-c", "write -P 1 0 8M"]);
    ok(&["snapshot", &base, &top]);
    ok(&["resize", &top, "+8M"]);
    ok(&["io", &top, "-c", "write -P 2 8M 8M"]);
    let (code, out) = fvd_merged(&["resize", &base, "+8M"]);
    assert_ne!(code, 0, "a frozen layer is not resized: {out}");
    let (code, out) = fvd_merged(&["commit", &top]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("is smaller") && out.contains("rebase -b"), "{out}");
    assert!(!out.contains("grow it first"), "{out}");
    // Nothing changed, and the advice works.
    ok(&["io", "-r", &top, "-c", "read -P 1 0 8M", "-c", "read -P 2 8M 8M"]);
    ok(&["check", &base]);
    ok(&["rebase", "-b", "", &top]);
    ok(&["io", "-r", &top, "-c", "read -P 1 0 8M", "-c", "read -P 2 8M 8M"]);
    ok(&["check", &top]);
}
