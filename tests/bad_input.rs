//! Bad input of every kind: one clear error line naming the file and the
//! problem, a non-zero exit, no panic, and the image's bytes untouched.

mod common;

use common::bin::{fvd, s};
use std::path::{Path, PathBuf};

/// Runs `fvd args`, expects failure with one stderr line containing all of
/// `needles`, and the file at `image` unchanged.
fn expect_error(image: Option<&Path>, args: &[&str], needles: &[&str]) {
    let before = image.map(|p| std::fs::read(p).unwrap_or_default());
    let (code, _out, err) = fvd(args);
    assert_ne!(code, 0, "fvd {args:?} succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "fvd {args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "fvd {args:?}: expected one error line, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "fvd {args:?}: '{}' does not mention '{n}'", lines[0]);
    }
    if let (Some(p), Some(b)) = (image, before) {
        assert!(std::fs::read(p).unwrap_or_default() == b, "fvd {args:?} changed {}", p.display());
    }
}

fn make_image(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "--size", "16M", s(&p)];
    args.extend_from_slice(extra);
    let (code, _, err) = fvd(&args);
    assert_eq!(code, 0, "create failed: {err}");
    p
}

fn write_some(p: &Path) {
    let (code, _, err) = fvd(&["io", s(p), "-c", "write -P 0x5a 0 2M", "-c", "write -P 0x33 8M 1M"]);
    assert_eq!(code, 0, "io failed: {err}");
}

fn patch(p: &Path, off: usize, bytes: &[u8]) {
    let mut b = std::fs::read(p).unwrap();
    b[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(p, b).unwrap();
}

/// Rewrites both header slots through a closure, with valid checksums.
fn patch_header(p: &Path, f: impl Fn(&mut fvd::format::Header)) {
    let mut b = std::fs::read(p).unwrap();
    for slot in 0..2 {
        let off = slot * 4096;
        let mut h = fvd::format::Header::decode(&b[off..off + 4096]).unwrap();
        f(&mut h);
        b[off..off + 4096].copy_from_slice(&h.encode());
    }
    std::fs::write(p, b).unwrap();
}

#[test]
fn bad_magic() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("junk.img");
    std::fs::write(&p, vec![0x42u8; 65536]).unwrap();
    for cmd in ["info", "map"] {
        expect_error(Some(&p), &[cmd, s(&p)], &[s(&p), "not an FVD image"]);
    }
    // check reports on stdout and exits 2 (corrupt), as qemu-img check does.
    let (code, out, err) = fvd(&["check", s(&p)]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains("not an FVD image"), "{out}");
    expect_error(Some(&p), &["io", s(&p), "-c", "read 0 4k"], &[s(&p), "not an FVD image"]);
}

#[test]
fn bad_checksum_in_both_header_slots() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "a.fvd", &[]);
    patch(&p, 40, &[0xff]);
    patch(&p, 4096 + 40, &[0xff]);
    expect_error(Some(&p), &["info", s(&p)], &[s(&p), "checksum mismatch"]);
    expect_error(Some(&p), &["io", s(&p), "-c", "write 0 4k"], &[s(&p), "checksum mismatch"]);
}

#[test]
fn truncated_file() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "a.fvd", &[]);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(100).unwrap();
    expect_error(Some(&p), &["info", s(&p)], &[s(&p), "truncated"]);
    let p2 = make_image(d.path(), "b.fvd", &[]);
    let f = std::fs::OpenOptions::new().write(true).open(&p2).unwrap();
    f.set_len(16384).unwrap();
    expect_error(Some(&p2), &["info", s(&p2)], &[s(&p2), "beyond the end of the storage"]);
}

#[test]
fn overlapping_regions() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "a.fvd", &["--base-free-dummy-never-used"][..0]);
    patch_header(&p, |h| h.journal_offset = h.table_offset);
    expect_error(Some(&p), &["info", s(&p)], &[s(&p), "journal region", "overlaps"]);
    let (code, out, _) = fvd(&["check", s(&p)]);
    assert_eq!(code, 2, "check of an overlapping layout: {out}");
}

#[test]
fn table_entries_out_of_range_or_duplicated() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "a.fvd", &[]);
    write_some(&p);
    let h = fvd::format::Header::decode(&std::fs::read(&p).unwrap()[..4096]).unwrap();
    let t = h.table_offset as usize;
    // Damage (one copy, checksums not matching) is taken from the twin, and check says so.
    patch(&p, t + 5 * 4, &0x00ff_0000u32.to_le_bytes());
    let (code, out, err) = fvd(&["info", s(&p)]);
    assert_eq!(code, 0, "the twin holds the table: {err}");
    let (code, out2, _) = fvd(&["check", s(&p)]);
    assert_eq!(code, 2, "{out}{out2}");
    assert!(out2.contains("does not match its checksum") && out2.contains("the other copy holds it"), "{out2}");
    // A table a writer got wrong, with checksums that match it (both copies):
    // entry 5 points far past the end of the file.
    common::patch_table_sealed(&p, 5, 0x00ff_0000);
    expect_error(Some(&p), &["info", s(&p)], &[s(&p), "table entry 0x5", "beyond"]);
    let (code, out, _) = fvd(&["check", s(&p)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("table entry 0x5"), "{out}");
    // Entries 0 and 9 both name physical chunk 0.
    common::patch_table_sealed(&p, 5, 0);
    let first = u32::from_le_bytes(std::fs::read(&p).unwrap()[t..t + 4].try_into().unwrap());
    common::patch_table_sealed(&p, 9, first);
    expect_error(Some(&p), &["io", s(&p), "-c", "read 0 4k"], &[s(&p), "both point at chunk"]);
    let (code, out, _) = fvd(&["check", s(&p)]);
    assert_eq!(code, 2, "{out}");
}

#[test]
fn base_missing_or_resized() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![7u8; 4 << 20]).unwrap();
    let p = d.path().join("a.fvd");
    let (code, _, err) = fvd(&["create", "--base", "base.raw", s(&p)]);
    assert_eq!(code, 0, "{err}");
    // Resized.
    std::fs::write(&base, vec![7u8; 5 << 20]).unwrap();
    expect_error(Some(&p), &["info", s(&p)], &[s(&p), "base.raw", "size changed"]);
    expect_error(Some(&p), &["io", s(&p), "-c", "write 0 4k"], &["size changed"]);
    // Missing.
    std::fs::remove_file(&base).unwrap();
    expect_error(Some(&p), &["info", s(&p)], &[s(&p), "base.raw", "No such file"]);
    // Creating over a missing base names it.
    let q = d.path().join("b.fvd");
    expect_error(None, &["create", "--base", "nope.raw", s(&q)], &["nope.raw", "No such file"]);
    assert!(!q.exists(), "a failed create left a file behind");
}

#[test]
fn bad_arguments() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.fvd");
    let args_errors: Vec<(Vec<&str>, &str)> = vec![
        (vec!["create", "--size", "12X", s(&p)], "12X"),
        (vec!["create", s(&p)], "--size"),
        (vec!["create", "--size", "1000", s(&p)], "multiple of 512"),
        (vec!["create", "--size", "1G", "--block-size", "3000", s(&p)], "block size"),
        (vec!["create", "--size", "1G", "--chunk-size", "4k", s(&p)], "chunk size"),
        (vec!["create", "--size", "1G", "--journal-size", "5000", s(&p)], "journal size"),
    ];
    for (args, needle) in args_errors {
        let (code, _, err) = fvd(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"));
        assert!(!p.exists(), "{args:?} left a file");
    }
    let p = make_image(d.path(), "b.fvd", &[]);
    expect_error(Some(&p), &["io", s(&p), "-c", "frobnicate 0 1"], &["unknown command"]);
    expect_error(Some(&p), &["io", s(&p), "-c", "read 100 4k"], &[s(&p), "not aligned"]);
    expect_error(Some(&p), &["io", s(&p), "-c", "read 0 32M"], &[s(&p), "outside the disk"]);
    expect_error(None, &["info", "/nonexistent/x.fvd"], &["/nonexistent/x.fvd", "No such file"]);
    // An existing file is never overwritten by create.
    expect_error(Some(&p), &["create", "--size", "1M", s(&p)], &[s(&p), "exists"]);
}

#[test]
fn corrupt_journal_is_not_applied() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "a.fvd", &[]);
    write_some(&p);
    // Mark dirty and put garbage in the journal: open replays nothing and the
    // image reads as it was at its last checkpoint.
    let h = fvd::format::Header::decode(&std::fs::read(&p).unwrap()[..4096]).unwrap();
    patch_header(&p, |h| h.flags |= 1);
    patch(&p, h.journal_offset as usize, b"FVDJ garbage that fails its checksum");
    let (code, out, err) = fvd(&["io", s(&p), "-c", "read -P 0x5a 0 2M", "-c", "read -P 0x33 8M 1M"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = fvd(&["check", s(&p)]);
    assert_eq!(code, 0, "{out}");
}

/// Field offsets of the header (see the table in `fvd::format`).
const H_FLAGS: usize = 32;
const H_TABLE_OFF: usize = 56;
const H_TABLE_LEN: usize = 64;
const H_BITMAP_OFF: usize = 72;
const H_BITMAP_LEN: usize = 80;
const H_JOURNAL_OFF: usize = 88;
const H_JOURNAL_LEN: usize = 96;
const H_DATA_OFF: usize = 104;
const H_CRC: usize = 4092;

fn get64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Rewrites fields of both header slots in place, without reading the rest
/// of the (possibly huge, sparse) file, and recomputes each slot's CRC-32.
fn forge_header(p: &Path, f: impl Fn(&mut [u8])) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
    for slot in 0..2u64 {
        let mut b = vec![0u8; 4096];
        file.read_exact_at(&mut b, slot * 4096).unwrap();
        f(&mut b);
        let crc = crc32fast::hash(&b[..H_CRC]);
        b[H_CRC..].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&b, slot * 4096).unwrap();
    }
}

/// The header area and the regions right after it, to see a command wrote nothing.
fn head_bytes(p: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut b = Vec::new();
    std::fs::File::open(p).unwrap().take(4 << 20).read_to_end(&mut b).unwrap();
    b
}

/// A forged header on a large sparse file: `info` and `check` fail at once
/// with one error line, and never abort on an allocation of header-given size.
fn expect_forged_rejected(p: &Path, needles: &[&str]) {
    let before = head_bytes(p);
    let t = std::time::Instant::now();
    let (code, out, err) = fvd(&["info", s(p)]);
    assert!(code > 0 && code != 134, "info exited with {code} (a signal or an abort?): {out}{err}");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "info: expected one error line, got: {err}");
    for n in needles.iter().chain([&s(p)]) {
        assert!(lines[0].contains(n), "info: '{}' does not mention '{n}'", lines[0]);
    }
    let (code, out, err) = fvd(&["check", s(p)]);
    assert_eq!(code, 2, "check exited with {code}: {out}{err}");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{err}");
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("ERROR")).collect();
    assert_eq!(errors.len(), 1, "check: expected one ERROR line, got: {out}");
    for n in needles {
        assert!(errors[0].contains(n), "check: '{}' does not mention '{n}'", errors[0]);
    }
    assert!(t.elapsed() < std::time::Duration::from_secs(20), "took {:?}", t.elapsed());
    assert!(head_bytes(p) == before, "a forged image was written to");
}

#[test]
fn forged_region_lengths_on_a_large_sparse_file() {
    const TIB: u64 = 1 << 40;
    const HUGE: u64 = 1 << 39;
    let d = tempfile::tempdir().unwrap();
    let align = |v: u64| v.div_ceil(1 << 20) * (1 << 20);

    // A 512 GiB journal in a dirty image (so open reads it), the data after it.
    let p = make_image(d.path(), "journal.fvd", &[]);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(TIB).unwrap();
    forge_header(&p, |b| {
        put64(b, H_FLAGS, get64(b, H_FLAGS) | 1);
        put64(b, H_JOURNAL_LEN, HUGE);
        put64(b, H_DATA_OFF, align(get64(b, H_JOURNAL_OFF) + HUGE));
    });
    expect_forged_rejected(&p, &["journal size 0x8000000000"]);

    // A 512 GiB table, the other regions moved up behind it.
    let p = make_image(d.path(), "table.fvd", &[]);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(TIB).unwrap();
    forge_header(&p, |b| {
        let bitmap = get64(b, H_TABLE_OFF) + HUGE;
        let journal = bitmap + get64(b, H_BITMAP_LEN);
        put64(b, H_TABLE_LEN, HUGE);
        put64(b, H_BITMAP_OFF, bitmap);
        put64(b, H_JOURNAL_OFF, journal);
        put64(b, H_DATA_OFF, align(journal + get64(b, H_JOURNAL_LEN)));
    });
    expect_forged_rejected(&p, &["table region", "0x8000000000"]);
}

#[test]
fn journal_size_over_the_limit() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.fvd");
    for size in ["2G", "1025M"] {
        expect_error(None, &["create", "--size", "1G", "--journal-size", size, s(&p)], &["journal size", "1 GiB"]);
        assert!(!p.exists(), "a refused create left a file");
    }
    let (code, _, err) = fvd(&["create", "--size", "1G", "--journal-size", "1G", s(&p)]);
    assert_eq!(code, 0, "{err}");
}
