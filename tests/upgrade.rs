//! `fvd upgrade`: an image made before the twin gains it (and the journal's two
//! copies) in place, reading the same; crash cuts during it are in
//! `tests/crash_resize.rs`.

mod common;

use common::bin::{fvd, ok, s};
use fvd::format::header::INCOMPAT_JOURNAL_DUP;
use std::path::{Path, PathBuf};

/// A new image at `dir/name` made legacy before anything is written to it.
fn legacy(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-s", "24M", "--journal-size", "64k"];
    args.extend_from_slice(extra);
    args.push(s(&p));
    ok(&args);
    let mut b = std::fs::read(&p).unwrap();
    common::make_legacy(&mut b);
    std::fs::write(&p, b).unwrap();
    let h = fvd::image::snapshot::header_at(&p).unwrap();
    assert!(!h.has_twin() && h.incompat & INCOMPAT_JOURNAL_DUP == 0);
    p
}

fn raw(p: &Path) -> Vec<u8> {
    let out = p.with_extension("raw");
    let _ = std::fs::remove_file(&out);
    ok(&["convert", "-O", "raw", s(p), s(&out)]);
    std::fs::read(&out).unwrap()
}

#[test]
fn an_old_image_gains_the_twin_and_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), common::data(5, 8 << 20)).unwrap();
    let base = dir.path().join("base.raw");
    let img = legacy(dir.path(), "old.fvd", &["--base", s(&base)]);
    ok(&["io", s(&img), "-c", "write -P 0x31 0 1M", "-c", "write -P 0x32 5M 200k", "-c", "write -P 0x33 23M 1M"]);
    let want = raw(&img);
    let (_, r) = scrub(&img);
    assert_eq!(r["stripes"], 0, "{r}");

    let out = ok(&["upgrade", s(&img)]);
    assert!(out.contains("now kept twice"), "{out}");
    let h = fvd::image::snapshot::header_at(&img).unwrap();
    assert!(h.has_twin() && h.incompat & INCOMPAT_JOURNAL_DUP != 0, "{h:?}");
    assert_eq!(raw(&img), want);
    let (code, out, _) = fvd(&["check", s(&img)]);
    assert_eq!(code, 0, "{out}");
    let (code, r) = scrub(&img);
    assert_eq!(code, 0);
    assert!(r["stripes"].as_u64().unwrap() > 0 && r["repaired"].as_array().unwrap().is_empty(), "{r}");
    // The protection is real: a damaged table sector reads from the twin.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, &[0u8; 512], h.table_offset).unwrap();
    drop(f);
    assert_eq!(fvd(&["check", s(&img)]).0, 2);
    assert_eq!(raw(&img), want);
    // Again: nothing to do.
    let out = ok(&["upgrade", s(&img)]);
    assert!(out.contains("nothing to do"), "{out}");
    // More writes after it land and stay.
    ok(&["io", s(&img), "-c", "write -P 0x34 10M 64k"]);
    ok(&["io", s(&img), "-c", "read -P 0x34 10M 64k", "-c", "read -P 0x31 0 1M", "-c", "read -P 0x33 23M 1M"]);
}

#[test]
fn an_old_image_not_closed_cleanly_is_recovered_then_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let img = legacy(dir.path(), "old.fvd", &[]);
    common::bin::kill_writer_after_flushes(&img, dir.path());
    // What a recovery reads (a copy, opened read-write once).
    let copy = dir.path().join("copy.fvd");
    std::fs::copy(&img, &copy).unwrap();
    ok(&["check", "--repair", s(&copy)]);
    let want = raw(&copy);
    let out = ok(&["upgrade", s(&img)]);
    assert!(out.contains("recovered first") && out.contains("now kept twice"), "{out}");
    assert_eq!(raw(&img), want);
    assert_eq!(fvd(&["check", s(&img)]).0, 0);
    // The flushed writes of the killed writer are there.
    ok(&["io", s(&img), "-c", "read -P 1 0 64k", "-c", "read -P 5 5M 64k"]);
}

#[test]
fn the_raw_layout_is_refused_in_one_line_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, common::data(6, 4 << 20)).unwrap();
    let img = legacy(dir.path(), "raw.fvd", &["--no-table", "--base", s(&base)]);
    let before = std::fs::read(&img).unwrap();
    let (code, out, err) = fvd(&["upgrade", s(&img)]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("raw layout") && err.contains("fvd convert"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

fn scrub(p: &Path) -> (i32, serde_json::Value) {
    let (code, out, err) = fvd(&["scrub", "--output", "json", s(p)]);
    (code, serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}")))
}
