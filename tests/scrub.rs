//! `fvd scrub`: every copy of the metadata read and verified, a damaged copy
//! rewritten from a good one; offline (the command) and online (the scrub a
//! daemon runs on its open image, here on an image opened in the test).

mod common;

use common::bin::{fvd, ok, s};
use fvd::format::Header;
use fvd::image::scrub::ScrubReport;
use fvd::image::{Image, OpenOptions};
use fvd::io::uring::Uring;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Overwrites `len` bytes at `off` of the file at `p` with `byte`, in place
/// (an image may be open on it).
fn smash(p: &Path, off: u64, len: usize, byte: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_at(&vec![byte; len], off).unwrap();
    f.sync_all().unwrap();
}

fn header(p: &Path) -> Header {
    fvd::image::snapshot::header_at(p).unwrap()
}

/// Offsets of the two copies of the table and of the bitmap: (table, bitmap) per copy.
fn copies(h: &Header) -> [(u64, u64); 2] {
    let twin = h.journal_offset + h.journal_len;
    [(h.table_offset, h.bitmap_offset), (twin, twin + (h.bitmap_offset - h.table_offset))]
}

/// An 8 MiB image over a 4 MiB raw base with data in both.
fn image(dir: &Path) -> std::path::PathBuf {
    std::fs::write(dir.join("base.raw"), common::data(3, 4 << 20)).unwrap();
    let img = dir.join("img.fvd");
    ok(&["create", "-s", "8M", "--journal-size", "64k", "--base", s(&dir.join("base.raw")), s(&img)]);
    ok(&["io", s(&img), "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 128k", "-c", "write -P 0x44 5M 1M"]);
    img
}

fn content(p: &Path) -> Vec<u8> {
    let img = Image::open(p, &OpenOptions { read_only: true, ..Default::default() }).unwrap();
    let ring = Uring::new(64).unwrap();
    let mut buf = vec![0u8; img.size() as usize];
    ring.block_on(img.read(&ring, 0, &mut buf)).unwrap().unwrap();
    buf
}

fn scrub_json(args: &[&str]) -> (i32, ScrubReport) {
    let mut a = vec!["scrub", "--output", "json"];
    a.extend_from_slice(args);
    let (code, out, err) = fvd(&a);
    let r = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    (code, r)
}

#[test]
fn offline_scrub_rewrites_each_damaged_copy_from_the_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let want = content(&img);
    let (code, r) = scrub_json(&[s(&img)]);
    assert_eq!((code, r.repaired.len(), r.unrepaired.len()), (0, 0, 0), "{r:?}");
    assert_eq!((r.header_slots, r.stripes), (2, 2), "{r:?}"); // table, bitmap
    let h = header(&img);
    let [(t0, _), (_, b1)] = copies(&h);
    smash(&img, t0 + 512, 512, 0x5a); // the table, first copy (past its entries)
    smash(&img, b1, 8, 0xa5); // the bitmap, twin copy
    smash(&img, 4096 * (1 - h.generation % 2) + 100, 1, 0xff); // the spare header slot
    let (code, r) = scrub_json(&[s(&img)]);
    assert_eq!(code, 0, "{r:?}");
    assert_eq!(r.repaired.len(), 3, "{r:?}");
    assert!(r.repaired.iter().any(|x| x.contains("header slot")), "{r:?}");
    assert!(r.repaired.iter().any(|x| x.contains("table stripe 0") && x.contains("(the first copy)")), "{r:?}");
    assert!(r.repaired.iter().any(|x| x.contains("bitmap stripe 1") && x.contains("(the twin copy)")), "{r:?}");
    // Every copy is good again: a second scrub finds nothing, check is clean.
    let (code, r) = scrub_json(&[s(&img)]);
    assert_eq!((code, r.repaired.len()), (0, 0), "{r:?}");
    let (code, out, _) = fvd(&["check", s(&img)]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Note"), "{out}");
    assert_eq!(content(&img), want);
    // Human output names what it did.
    smash(&img, copies(&header(&img))[1].0, 4, 7);
    let out = ok(&["scrub", s(&img)]);
    assert!(
        out.contains("Repaired: ") && out.contains("(the twin copy)") && out.contains("1 repaired, 0 left"),
        "{out}"
    );
}

#[test]
fn offline_scrub_leaves_metadata_no_copy_holds_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let [(t0, _), (t1, _)] = copies(&header(&img));
    smash(&img, t0, 16, 0x5a);
    smash(&img, t1, 16, 0x5a);
    let before = std::fs::read(&img).unwrap();
    let (code, r) = scrub_json(&[s(&img)]);
    assert_eq!(code, 2, "{r:?}");
    assert!(r.unrepaired.iter().any(|x| x.contains("both copies") && x.contains("nothing was written")), "{r:?}");
    assert_eq!(std::fs::read(&img).unwrap(), before, "a scrub that cannot repair writes nothing");
}

#[test]
fn offline_scrub_of_an_image_not_closed_cleanly_takes_the_good_journal_copy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), common::data(8, 4 << 20)).unwrap();
    let img = dir.path().join("img.fvd");
    ok(&["create", "-s", "8M", "--journal-size", "64k", "--base", s(&dir.path().join("base.raw")), s(&img)]);
    common::bin::kill_writer_after_flushes(&img, dir.path());
    let want = content(&img);
    let h = header(&img);
    // Block 1's second copy (slots: block i at 2i and 2i+1).
    let at = h.journal_offset + 3 * 4096;
    smash(&img, at + 40, 4, 0xff);
    let (code, r) = scrub_json(&[s(&img)]);
    assert_eq!(code, 0, "{r:?}");
    let line = format!("journal block 1, copy 1 at {at:#x}");
    assert!(r.repaired.iter().any(|x| x.contains(&line)), "{r:?}");
    assert!(r.notes.iter().any(|x| x.contains("was not closed cleanly")), "{r:?}");
    assert!(!header(&img).is_dirty());
    assert_eq!(content(&img), want);
    assert_eq!(fvd(&["check", s(&img)]).0, 0);
}

/// The online scrub: the image stays open and in use; damage done under it
/// (the table's first copy, a journal block's copy, both copies of a stripe,
/// the current header slot) is found and rewritten, and the image then reads
/// and reopens as before.
#[test]
fn online_scrub_repairs_under_an_open_image_from_a_copy_or_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path());
    let ring = Uring::new(64).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    macro_rules! run {
        ($f:expr) => {
            ring.block_on($f).unwrap()
        };
    }
    let mut model = content_of(&img, &ring);
    for (i, off) in [(1u8, 2u64 << 20), (2, 3 << 20), (3, 7 << 20)] {
        let d = vec![i; 64 << 10];
        run!(img.write(&ring, off, &d, false)).unwrap();
        run!(img.flush(&ring)).unwrap();
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    let scrub = |img: &Image| -> ScrubReport { run!(img.scrub(&ring, None, || Some(()))).unwrap() };
    let r = scrub(&img);
    assert_eq!((r.repaired.len(), r.unrepaired.len()), (0, 0), "{r:?}");
    assert!(r.journal_blocks >= 3, "three flushed commits: {r:?}");

    let h = img.header();
    let [(t0, _), (t1, _)] = copies(&h);
    smash(&p, t0 + 8, 8, 0xee);
    smash(&p, h.journal_offset + 4096 + 200, 1, 0x77); // block 0, copy 1
    let r = scrub(&img);
    assert_eq!(r.repaired.len(), 2, "{r:?}");
    assert!(r.repaired.iter().any(|x| x.contains("journal block 0, copy 1") && x.contains("from copy 0")), "{r:?}");
    assert!(r.repaired.iter().any(|x| x.contains("the first copy")), "{r:?}");

    // Both copies of the stripe, and the current header slot: memory holds them.
    smash(&p, t0 + 8, 8, 0xee);
    smash(&p, t1 + 8, 8, 0xee);
    smash(&p, 4096 * (img.header().generation % 2), 4096, 0);
    let r = scrub(&img);
    assert!(r.repaired.iter().any(|x| x.contains("header slot")), "{r:?}");
    assert!(r.repaired.iter().any(|x| x.contains("from memory (a checkpoint)")), "{r:?}");
    assert!(r.unrepaired.is_empty(), "{r:?}");
    assert_eq!(scrub(&img).repaired, Vec::<String>::new());

    let d = vec![9u8; 4096];
    run!(img.write(&ring, 6 << 20, &d, false)).unwrap();
    model[6 << 20..(6 << 20) + 4096].copy_from_slice(&d);
    assert_eq!(content_of(&img, &ring), model);
    run!(img.close_async(&ring)).unwrap();
    drop(img);
    let (code, out, _) = fvd(&["check", s(&p)]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(content(&p), model);
}

#[test]
fn a_read_only_scrub_reports_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path());
    let [(t0, _), _] = copies(&header(&p));
    smash(&p, t0 + 8, 8, 0xee);
    let before = std::fs::read(&p).unwrap();
    let ring = Uring::new(64).unwrap();
    let img = Image::open(&p, &OpenOptions { read_only: true, ..Default::default() }).unwrap();
    let r = ring.block_on(img.scrub(&ring, None, || Some(()))).unwrap().unwrap();
    assert_eq!(r.exit_code(), 2);
    assert!(r.unrepaired.iter().any(|x| x.contains("read-only: not rewritten")), "{r:?}");
    drop(img);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn a_scrub_keeps_to_its_rate_and_stops_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path());
    let ring = Uring::new(64).unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    // 8 KiB of header slots, then two stripes (table, bitmap) of 2 x 4 KiB:
    // at 8 KiB/s each unit waits a second behind the one before.
    let r = ring.block_on(img.scrub(&ring, Some(8 << 10), || Some(()))).unwrap().unwrap();
    assert_eq!(r.bytes_read, 24 << 10, "{r:?}");
    assert!(r.seconds >= 2.0, "read {} bytes at 8 KiB/s in {} s", r.bytes_read, r.seconds);
    let mut units = 0;
    let r = ring
        .block_on(img.scrub(&ring, None, || {
            units += 1;
            (units <= 1).then_some(())
        }))
        .unwrap()
        .unwrap();
    assert!(r.stopped && r.header_slots == 2 && r.stripes == 0, "{r:?}");
    drop(img);
}

/// An image made before the twin: nothing to verify the table against, said.
#[test]
fn an_image_without_the_twin_is_scrubbed_where_it_can_be_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path());
    let mut b = std::fs::read(&p).unwrap();
    common::make_legacy(&mut b);
    std::fs::write(&p, b).unwrap();
    let (code, r) = scrub_json(&[s(&p)]);
    assert_eq!((code, r.stripes), (0, 0), "{r:?}");
    assert!(r.notes.iter().any(|x| x.contains("made before the twin")), "{r:?}");
}

fn content_of(img: &Image, ring: &Uring) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    ring.block_on(img.read(ring, 0, &mut buf)).unwrap().unwrap();
    buf
}
