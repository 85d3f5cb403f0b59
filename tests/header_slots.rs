//! One damaged header slot (issue 9, defect 4), through the real binary:
//! `fvd check` reports it (exit 2, naming the slot and its offset), `fvd info`
//! warns, `fvd check --repair` rewrites it from the intact slot, after which
//! check is clean and the data reads back. Both slots damaged stays an error.

mod common;

use common::bin::{fvd, ok, s};
use std::path::Path;

fn flip(p: &Path, off: u64) {
    let mut b = std::fs::read(p).unwrap();
    b[off as usize] ^= 0x5a;
    std::fs::write(p, b).unwrap();
}

fn slot(p: &Path, i: usize) -> Result<fvd::format::Header, fvd::format::HeaderError> {
    let b = std::fs::read(p).unwrap();
    fvd::format::Header::decode(&b[i * 4096..(i + 1) * 4096])
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn image_with_data(dir: &Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    ok(&["create", "--size", "64M", s(&img)]);
    ok(&["io", s(&img), "-c", "write -P 0x22 0 1M", "-c", "write -P 0x33 8M 1M", "-c", "flush"]);
    img
}

fn read_back(img: &Path) {
    ok(&["io", s(img), "-c", "read -P 0x22 0 1M", "-c", "read -P 0x33 8M 1M", "-c", "read -P 0 2M 1M"]);
}

#[test]
fn fresh_image_has_two_valid_slots_and_checks_clean() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.fvd");
    ok(&["create", "--size", "16M", s(&img)]);
    for i in 0..2 {
        let h = slot(&img, i).unwrap_or_else(|e| panic!("slot {i} of a fresh image: {e}"));
        assert_eq!(h.generation % 2, i as u64, "slot {i} holds generation {}", h.generation);
    }
    let out = ok(&["check", s(&img)]);
    assert!(out.contains("No errors"), "{out}");
    let (code, _, err) = fvd(&["info", s(&img)]);
    assert_eq!(code, 0);
    assert!(!err.contains("warning"), "{err}");
    let v = json(&ok(&["info", "--output", "json", s(&img)]));
    assert_eq!(v["bad-header-slots"], serde_json::json!([]));
}

#[test]
fn one_damaged_slot_is_reported_and_repaired() {
    let d = tempfile::tempdir().unwrap();
    for bad in 0..2usize {
        let img = image_with_data(d.path(), &format!("slot{bad}.fvd"));
        let off = bad as u64 * 4096;
        let good = slot(&img, 1 - bad).unwrap();
        // A byte in the middle of the header (virtual_size): the checksum fails.
        flip(&img, off + 40);
        assert!(slot(&img, bad).is_err());
        let name = format!("header slot {bad} at {off:#x}");

        // check: exit 2 (corrupt), the slot, its offset and why.
        let (code, out, err) = fvd(&["check", s(&img)]);
        assert_eq!(code, 2, "slot {bad}: {out}{err}");
        assert!(out.contains(&name) && out.contains("checksum mismatch"), "slot {bad}: {out}");
        assert!(!out.contains("No errors"), "{out}");
        let (code, out, _) = fvd(&["check", "--output", "json", s(&img)]);
        assert_eq!(code, 2);
        let v = json(&out);
        assert_eq!(v["bad_header_slots"][0]["slot"], bad);
        assert_eq!(v["bad_header_slots"][0]["offset"], off);
        assert_eq!(v["bad_header_slots"][0]["current_slot"], 1 - bad);
        assert!(v["corruptions"][0].as_str().unwrap().contains(&name), "{out}");

        // info: opens from the good slot, and warns.
        let (code, out, err) = fvd(&["info", s(&img)]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(err.contains("warning") && err.contains(&name), "slot {bad}: info said: {err}");
        let (code, out, _) = fvd(&["info", "--output", "json", s(&img)]);
        assert_eq!(code, 0);
        let v = json(&out);
        assert_eq!(v["bad-header-slots"][0]["slot"], bad, "{out}");
        assert_eq!(v["virtual-size"], 64u64 << 20);

        // check --repair rewrites the slot from the good one; then clean.
        let (code, out, err) = fvd(&["check", "--repair", s(&img)]);
        assert_eq!(code, 0, "slot {bad}: repair: {out}{err}");
        assert!(out.contains("Repair done") && out.contains(&format!("slot {bad} at {off:#x} rewritten")), "{out}");
        let fixed = slot(&img, bad).unwrap_or_else(|e| panic!("slot {bad} after repair: {e}"));
        assert_eq!(fixed.generation % 2, bad as u64);
        assert!(fixed.generation > good.generation);
        let other = slot(&img, 1 - bad).unwrap_or_else(|e| panic!("slot {} after repair: {e}", 1 - bad));
        if good.is_dirty() {
            // Damage to the newest slot: the image fell back to the header
            // before it, a dirty one, and repair also replayed the journal
            // (which wrote both slots afresh).
            assert!(out.contains("journal replayed"), "{out}");
            assert!(!fixed.is_dirty() || !other.is_dirty(), "{fixed:?} {other:?}");
        } else {
            assert_eq!(fixed, fvd::format::Header { generation: fixed.generation, ..good.clone() });
            assert_eq!(other, good, "the good slot was touched");
        }
        let out = ok(&["check", s(&img)]);
        assert!(out.contains("No errors"), "{out}");
        let (_, _, err) = fvd(&["info", s(&img)]);
        assert!(!err.contains("warning"), "{err}");
        read_back(&img);
        // And it keeps working: more writes, more header generations.
        ok(&["io", s(&img), "-c", "write -P 0x44 4M 1M"]);
        ok(&["io", s(&img), "-c", "read -P 0x44 4M 1M"]);
        read_back(&img);
        assert!(ok(&["check", s(&img)]).contains("No errors"));
    }
}

#[test]
fn repair_json_lists_what_it_did() {
    let d = tempfile::tempdir().unwrap();
    let img = image_with_data(d.path(), "a.fvd");
    flip(&img, 4096 + 4000);
    let (code, out, err) = fvd(&["check", "--repair", "--output", "json", s(&img)]);
    assert_eq!(code, 0, "{out}{err}");
    let v = json(&out);
    assert_eq!(v["repaired"], true);
    assert_eq!(v["bad_header_slots"], serde_json::json!([]), "the report after repair: {out}");
    assert!(v["repairs"][0].as_str().unwrap().contains("header slot 1 at 0x1000 rewritten"), "{out}");
    read_back(&img);
}

#[test]
fn damaged_slot_of_a_dirty_image_is_repaired_with_the_journal() {
    let d = tempfile::tempdir().unwrap();
    let img = image_with_data(d.path(), "a.fvd");
    // Mark the current header dirty (the journal has nothing valid to replay),
    // and damage the other slot.
    let cur = if slot(&img, 0).unwrap().generation > slot(&img, 1).unwrap().generation { 0 } else { 1 };
    let mut h = slot(&img, cur).unwrap();
    h.flags |= 1;
    let mut b = std::fs::read(&img).unwrap();
    b[cur * 4096..(cur + 1) * 4096].copy_from_slice(&h.encode());
    b[(1 - cur) * 4096] ^= 0xff; // bad magic
    std::fs::write(&img, b).unwrap();
    let (code, out, _) = fvd(&["check", s(&img)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not an FVD image (bad magic)") && out.contains("not closed cleanly"), "{out}");
    let (code, out, err) = fvd(&["check", "--repair", s(&img)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("No errors"), "{out}");
    for i in 0..2 {
        assert!(slot(&img, i).is_ok(), "slot {i} after repair");
    }
    read_back(&img);
}

#[test]
fn both_slots_damaged_is_still_an_error() {
    let d = tempfile::tempdir().unwrap();
    let img = image_with_data(d.path(), "a.fvd");
    flip(&img, 40);
    flip(&img, 4096 + 40);
    let (code, _, err) = fvd(&["info", s(&img)]);
    assert_ne!(code, 0);
    assert!(err.contains("checksum mismatch"), "{err}");
    let (code, out, _) = fvd(&["check", s(&img)]);
    assert_eq!(code, 2, "{out}");
    let before = std::fs::read(&img).unwrap();
    let (code, out, _) = fvd(&["check", "--repair", s(&img)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("Not repaired: neither header slot is valid"), "{out}");
    assert!(std::fs::read(&img).unwrap() == before, "repair wrote to an image with no valid header");
}

/// The newest slot of an image not closed cleanly, lost after a checkpoint (a
/// small journal fills, so the writer checkpoints between its flushes) whose
/// header it was: the older slot's stripe checksums describe the copies before
/// that checkpoint. `fvd check --repair` rewrote the lost slot from the older
/// header with those checksums, after which both copies of the table and bitmap
/// failed them: the repair left the image refused ("damaged in both copies") and
/// reading other bytes, where a plain open read it whole.
#[test]
fn repairing_a_lost_checkpoint_header_keeps_the_checksums_of_its_copies() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, common::data(4, 4 << 20)).unwrap();
    let img = dir.path().join("img.fvd");
    ok(&["create", "-s", "8M", "--journal-size", "8k", "--base", s(&base), s(&img)]);
    common::bin::kill_writer_after_flushes(&img, dir.path());
    let want = dir.path().join("want.raw");
    ok(&["convert", "-O", "raw", s(&img), s(&want)]);
    let newest = (0..2).max_by_key(|&i| slot(&img, i).map(|h| h.generation).unwrap_or(0)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, &[0u8; 512], newest as u64 * 4096).unwrap();
    drop(f);
    let (code, out, err) = fvd(&["check", "--repair", s(&img)]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = fvd(&["check", s(&img)]);
    assert_eq!(code, 0, "{out}");
    let got = dir.path().join("got.raw");
    ok(&["convert", "-O", "raw", s(&img), s(&got)]);
    assert!(std::fs::read(&got).unwrap() == std::fs::read(&want).unwrap(), "the repaired image reads other bytes");
}
