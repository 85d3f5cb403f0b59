//! A damaged journal block is told from the torn end of the log (issue 21):
//! damage followed by a later, completed commit refuses every open and makes
//! `fvd check` exit 2; `--repair` replays the later commits past it; a torn
//! last block is the normal end. Through the binary, on an image a killed
//! `fvd io` left dirty with three one-block commits.

mod common;

use common::bin::{fvd, fvd_merged, ok, s};
use std::path::Path;

/// A dirty image over a raw base whose journal holds three commits, one block
/// each: 64 KiB of 1 at 0, of 2 at 1 MiB, of 3 at 2 MiB (each flushed), and a
/// fourth write (4 at 3 MiB, not flushed). Returns the journal's offset.
fn dirty_image(dir: &Path) -> (String, u64) {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x5au8; 8 << 20]).unwrap();
    let img = s(&dir.join("img.fvd")).to_string();
    ok(&["create", "--base", s(&base), &img]);
    let cmds = ["write -P 1 0 64k", "flush", "write -P 2 1M 64k", "flush", "write -P 3 2M 64k", "flush"];
    let mut cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    cmds.push("write -P 4 3M 64k".into());
    common::bin::kill_writer_at_pipe(Path::new(&img), dir, &cmds, "4M");
    let h = fvd::image::snapshot::header_at(Path::new(&img)).unwrap();
    assert!(h.is_dirty());
    assert_ne!(h.incompat & fvd::format::header::INCOMPAT_JOURNAL_POS, 0);
    assert_ne!(h.incompat & fvd::format::header::INCOMPAT_JOURNAL_DUP, 0);
    (img, h.journal_offset)
}

fn patch(path: &str, off: u64, f: impl Fn(&mut [u8])) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b[off as usize..off as usize + 4096]);
    std::fs::write(path, b).unwrap();
}

fn reads(img: &str, cmds: &[&str]) -> (i32, String) {
    let mut a = vec!["io", "-r", img];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    fvd_merged(&a)
}

#[test]
fn damage_before_a_later_commit_is_refused_reported_and_repaired() {
    for damage in ["flip", "zero"] {
        let d = tempfile::tempdir().unwrap();
        let (img, j) = dirty_image(d.path());
        let all = ["read -P 1 0 64k", "read -P 2 1M 64k", "read -P 3 2M 64k"];
        assert_eq!(reads(&img, &all).0, 0, "the three flushed writes read back before any damage");
        let hit = |off: u64| {
            patch(&img, off, |b| match damage {
                "flip" => b[100] ^= 0x40,
                _ => b.fill(0),
            })
        };
        // One copy of block 0 damaged: the other holds it (INCOMPAT_JOURNAL_DUP),
        // nothing is lost and check has nothing to say of the log.
        hit(j);
        assert_eq!(reads(&img, &all).0, 0, "{damage}: one damaged copy lost a commit");
        // Both copies: the block is gone, and a later commit shows it was damage.
        hit(j + 4096);
        let (code, out) = reads(&img, &["read -P 2 1M 64k"]);
        assert_ne!(code, 0, "{damage}: a damaged journal opened: {out}");
        assert!(out.contains("journal block 0") && out.contains("is damaged"), "{out}");
        let (code, out, _) = fvd(&["check", &img]);
        assert_eq!(code, 2, "{damage}: check: {out}");
        assert!(out.contains("journal block 0"), "{out}");
        let (code, out, err) = fvd(&["check", "--repair", &img]);
        assert_eq!(code, 0, "{damage}: repair: {out}{err}");
        assert!(out.contains("journal block 0") && out.contains("records are lost"), "{out}");
        // The later commits are there; the damaged one's write reads as before it or as written.
        assert_eq!(reads(&img, &all[1..]).0, 0, "{damage}: later commits replayed");
        let (a, _) = reads(&img, &["read -P 1 0 64k"]);
        let (b, _) = reads(&img, &["read -P 0x5a 0 64k"]);
        assert!(a == 0 || b == 0, "{damage}: the lost write's range reads one of its two states");
        assert_eq!(fvd(&["check", &img]).0, 0);
        ok(&["io", &img, "-c", "write -P 9 5M 64k"]);
    }
}

#[test]
fn a_torn_last_block_is_the_normal_end() {
    let d = tempfile::tempdir().unwrap();
    let (img, j) = dirty_image(d.path());
    // Block 2 is the last commit's only block, in slots 4 and 5: torn (both
    // copies, written together), it was never acknowledged.
    patch(&img, j + 4 * 4096, |b| b[2048..].fill(0));
    patch(&img, j + 5 * 4096, |b| b[2048..].fill(0));
    let (code, out) = reads(&img, &["read -P 1 0 64k", "read -P 2 1M 64k"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = fvd(&["check", &img]);
    assert_eq!(code, 0, "{out}");
    ok(&["io", &img, "-c", "write -P 9 5M 64k", "-c", "read -P 2 1M 64k"]);
}

/// Issue 21's third finding: the newest header slot damaged on a dirty image
/// must not roll it back. Here the newest is the dirty mark written before
/// three flushed commits; the older slot says clean. The journal shows the
/// lost generation, and its commits are replayed.
#[test]
fn a_lost_newest_header_does_not_roll_the_image_back() {
    let d = tempfile::tempdir().unwrap();
    let (img, _) = dirty_image(d.path());
    let h = fvd::image::snapshot::header_at(Path::new(&img)).unwrap();
    let newest = (h.generation % 2) * 4096;
    patch(&img, newest, |b| b[200] ^= 0x01);
    let all = ["read -P 1 0 64k", "read -P 2 1M 64k", "read -P 3 2M 64k"];
    let (code, out) = reads(&img, &all);
    assert_eq!(code, 0, "flushed writes lost with the newest header slot: {out}");
    let (code, out, _) = fvd(&["check", &img]);
    assert_eq!(code, 2, "the bad slot is still reported: {out}");
    assert!(out.contains("later session"), "{out}");
    let (code, out, err) = fvd(&["check", "--repair", &img]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(reads(&img, &all).0, 0);
    assert_eq!(fvd(&["check", &img]).0, 0);
}
