//! `fvd check --repair` on metadata that does not open, through the real binary: two
//! table entries naming one chunk (in the checkpointed table, and one set by a journal
//! record over the table: the state issue 9's stale replay left), and a journal whose
//! replay fails part-way. Each is reported by `check` (exit 2), repaired, and the image
//! then opens, checks clean and reads what the repair kept.

mod common;

use common::bin::{fvd_merged, ok};
use fvd::format::{Header, JournalBlock, Record};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The current header and its slot offset.
fn header(p: &Path) -> (Header, u64) {
    let f = std::fs::File::open(p).unwrap();
    let mut b = vec![0u8; 8192];
    f.read_exact_at(&mut b, 0).unwrap();
    let a = Header::decode(&b[..4096]).ok();
    let c = Header::decode(&b[4096..]).ok();
    match (a, c) {
        (Some(a), Some(c)) if c.generation > a.generation => (c, 4096),
        (Some(a), _) => (a, 0),
        (None, Some(c)) => (c, 4096),
        _ => panic!("no valid header"),
    }
}

fn write_at(p: &Path, bytes: &[u8], off: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
    f.sync_all().unwrap();
}

/// An image with chunks 0, 1, 2 holding patterns 1, 2, 3, closed cleanly.
fn image(dir: &Path) -> (std::path::PathBuf, Header) {
    let img = dir.join("img.fvd");
    let s = img.to_str().unwrap();
    ok(&["create", "--size", "64M", s]);
    ok(&["io", s, "-c", "write -P 1 0 1M", "-c", "write -P 2 1M 1M", "-c", "write -P 3 2M 1M"]);
    let (h, _) = header(&img);
    (img, h)
}

/// Marks the image dirty with one journal block holding `records`.
fn dirty_with(img: &Path, records: Vec<Record>) {
    let (mut h, slot) = header(img);
    let blk = JournalBlock { seq: h.journal_seq, pos: 0, records };
    write_at(img, &blk.encode(), h.journal_offset);
    h.flags |= fvd::format::header::FLAG_DIRTY;
    write_at(img, &h.encode(), slot);
}

/// Table entry `vchunk` as stored in the checkpointed table.
fn table_entry(img: &Path, h: &Header, vchunk: u64) -> u32 {
    let mut e = [0u8; 4];
    std::fs::File::open(img).unwrap().read_exact_at(&mut e, h.table_offset + 4 * vchunk).unwrap();
    u32::from_le_bytes(e)
}

/// `check` finds the damage (exit 2, its report containing `found`), `check
/// --repair` repairs it (exit 0, its report containing `repaired`), after which
/// `check` is clean and every `-c` command of `reads` succeeds.
fn check_repair_read(s: &str, found: &str, repaired: &str, reads: &[&str]) {
    let (code, out) = fvd_merged(&["check", s]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(found), "{out}");
    let (code, out) = fvd_merged(&["check", "--repair", s]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(repaired), "{out}");
    ok(&["check", s]);
    let mut args = vec!["io", s];
    for r in reads {
        args.extend(["-c", r]);
    }
    ok(&args);
}

#[test]
fn duplicate_entries_in_the_table_keep_one_and_report_the_other() {
    let d = tempfile::tempdir().unwrap();
    let (img, h) = image(d.path());
    let s = img.to_str().unwrap();
    // Entry 1 now names entry 0's chunk.
    common::patch_table_sealed(&img, 1, table_entry(&img, &h, 0));
    check_repair_read(
        s,
        "both point at chunk",
        "guest range 0x100000..0x200000 (table entry 0x1) lost",
        &["read -P 1 0 1M", "read -P 0 1M 1M", "read -P 3 2M 1M"],
    );
}

#[test]
fn a_journal_record_over_the_table_wins_its_chunk() {
    let d = tempfile::tempdir().unwrap();
    let (img, h) = image(d.path());
    let s = img.to_str().unwrap();
    // The table has entry 2 -> the chunk holding pattern 3; a durable record moves it to entry 5.
    dirty_with(&img, vec![Record::TableSet { vchunk: 5, entry: table_entry(&img, &h, 2) }]);
    let (code, out) = fvd_merged(&["io", s, "-c", "read -P 3 5M 1M"]);
    assert_ne!(code, 0, "such an image does not open: {out}");
    check_repair_read(
        s,
        "",
        "(table entry 0x2) lost",
        &["read -P 1 0 1M", "read -P 2 1M 1M", "read -P 0 2M 1M", "read -P 3 5M 1M"],
    );
}

#[test]
fn a_journal_that_replays_part_way_is_kept_up_to_the_bad_record() {
    let d = tempfile::tempdir().unwrap();
    let (img, _) = image(d.path());
    let s = img.to_str().unwrap();
    // First record frees entry 1; the second names a guest chunk past the disk's end.
    dirty_with(&img, vec![Record::TableSet { vchunk: 1, entry: 0 }, Record::TableSet { vchunk: 10_000, entry: 2 }]);
    check_repair_read(
        s,
        "",
        "journal replay stopped at block 0",
        &["read -P 1 0 1M", "read -P 0 1M 1M", "read -P 3 2M 1M"],
    );
}
