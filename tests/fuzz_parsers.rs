//! Fuzzing of every parser, as property tests on random and mutated bytes:
//! no input may panic the header, journal, volatile-log or image-open code,
//! nor the parsers of what other programs hand us (lvs reports, ublk I/O
//! descriptors, device-mapper names, size arguments).

mod common;

use common::*;
use fvd::format::{Header, JournalBlock, HEADER_AREA};
use fvd::image::{Image, OpenOptions};
use fvd::storage::SimStorage;
use proptest::prelude::*;
use std::path::Path;
use std::sync::Arc;

/// A small valid image (table, base) with some data and an unflushed journal.
fn valid_image() -> (TestImage, Vec<u8>) {
    let t = TestImage::new(Config {
        size: 1 << 20,
        block: 4096,
        chunk: Some(65536),
        base_size: 1 << 19,
        journal: 4 * 4096,
        cor: true,
    });
    let img = t.open(false);
    for i in 0..8u64 {
        run(img.write(&fvd::io::SyncOnly, i * 98304, &data(i, 8192), false)).unwrap();
        if i % 3 == 0 {
            run(img.flush(&fvd::io::SyncOnly)).unwrap();
        }
    }
    // Leave it dirty, with a journal to replay: take the durable bytes now.
    let bytes = t.storage.current_bytes();
    std::mem::forget(img);
    (t, bytes)
}

/// Re-seals both header slots' checksums so mutations reach field validation.
fn reseal(bytes: &mut [u8]) {
    for slot in 0..2 {
        let s = slot * 4096;
        if bytes.len() >= s + 4096 {
            let crc = crc32fast::hash(&bytes[s..s + 4092]);
            bytes[s + 4092..s + 4096].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

fn open_must_not_panic(t: &TestImage, bytes: Vec<u8>, read_only: bool) {
    let s = Arc::new(SimStorage::from_bytes("fuzzed", bytes));
    let opts = OpenOptions { read_only, ..Default::default() };
    if let Ok(img) = Image::open_on(Path::new("fuzzed"), Box::new(s.clone()), t.base_handle(), &opts) {
        let mut buf = vec![0u8; 65536];
        let mut off = 0;
        while off < img.size() {
            let _ = run(img.read(&fvd::io::SyncOnly, off, &mut buf));
            off += 65536;
        }
        let _ = run(img.write(&fvd::io::SyncOnly, 0, &buf[..4096], false));
        let _ = img.map();
    }
    let _ = fvd::image::check(s.as_ref());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let _ = Header::decode(&bytes);
    }

    #[test]
    fn journal_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000), seq in any::<u64>()) {
        let _ = JournalBlock::decode(&bytes, seq);
    }

    #[test]
    fn sealed_random_header_fields_never_panic(fields in proptest::collection::vec(any::<u8>(), 4092)) {
        let mut b = fields;
        b[0..8].copy_from_slice(b"FVD\0img\x01");
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&4096u32.to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
        if let Ok(h) = Header::decode(&b) {
            let _ = fvd::format::Geometry::from_header(&h, u64::MAX);
            let _ = fvd::format::Geometry::from_header(&h, 1 << 20);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..24),
        in_header in any::<bool>(),
        read_only in any::<bool>(),
    ) {
        let (t, mut bytes) = valid_image();
        let data_start = bytes.len().min(HEADER_AREA as usize + 3 * 65536);
        for (i, v) in flips {
            let range = if in_header { 8192 } else { data_start };
            let at = i.index(range);
            bytes[at] = v;
        }
        reseal(&mut bytes);
        open_must_not_panic(&t, bytes, read_only);
    }

    #[test]
    fn truncated_images_never_panic(cut in 0usize..300_000) {
        let (t, bytes) = valid_image();
        let n = cut.min(bytes.len());
        open_must_not_panic(&t, bytes[..n].to_vec(), false);
    }
}

/// A volatile log (header valid for `img_path` and the image's session) whose
/// records are `records`; None where no tmpfs is at hand.
fn image_with_volatile_log(records: &[u8]) -> Option<(TestImage, tempfile::TempDir)> {
    use std::io::Write;
    let dir = tempfile::tempdir_in("/dev/shm").ok()?;
    if !fvd::image::volatile::on_tmpfs(dir.path()) {
        return None;
    }
    let (img_path, log) = (dir.path().join("image"), dir.path().join("vlog"));
    std::fs::write(&img_path, b"identity").ok()?;
    let (t, _) = valid_image();
    let opts = OpenOptions { volatile_log: Some(log.clone()), ..Default::default() };
    let img = Image::open_on(&img_path, Box::new(t.storage.clone()), t.base_handle(), &opts).expect("open");
    run(img.write(&fvd::io::SyncOnly, 0, &data(99, 4096), false)).expect("write");
    img.close().expect("close");
    drop(img);
    let session = fvd::image::header_of(t.storage.as_ref()).expect("header").session;
    assert_ne!(session, 0, "a writer with a volatile log stamps a session");
    drop(fvd::image::volatile::VolatileLog::create(&log, &img_path, session).expect("vlog"));
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).expect("vlog reopen");
    f.write_all(records).expect("vlog append");
    Some((t, dir))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Records a dead daemon left on tmpfs are input too: replaying random
    /// ones either opens a consistent image or fails with an error.
    #[test]
    fn volatile_log_replay_never_panics(records in proptest::collection::vec(any::<u8>(), 0..700)) {
        let Some((t, dir)) = image_with_volatile_log(&records) else { return Ok(()) };
        let opts = OpenOptions { volatile_log: Some(dir.path().join("vlog")), ..Default::default() };
        let img_path = dir.path().join("image");
        if let Ok(img) = Image::open_on(&img_path, Box::new(t.storage.clone()), t.base_handle(), &opts) {
            let _ = read_all(&img);
            let _ = img.map();
            let _ = img.close();
        }
        let _ = fvd::image::check(t.storage.as_ref());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn lvs_report_parsers_never_panic(text in "[ -~|\\n]{0,400}") {
        let _ = fvd::storage::lvm::report::parse_report(&text);
        let _ = fvd::storage::lvm::filter::parse_string_list(&text);
    }

    #[test]
    fn lvs_json_rows_never_panic(vals in proptest::collection::vec("\\PC{0,12}", 12)) {
        let keys = fvd::storage::lvm::report::REPORT_FIELDS.split(',');
        let row: serde_json::Map<String, serde_json::Value> =
            keys.zip(vals).map(|(k, v)| (k.to_string(), serde_json::Value::String(v))).collect();
        let text = serde_json::json!({"report": [{"lv": [row]}]}).to_string();
        let _ = fvd::storage::lvm::report::parse_report(&text);
    }

    #[test]
    fn lvm_name_checks_never_panic(name in "\\PC{0,140}") {
        let _ = fvd::storage::lvm::names::check_vg_name(&name);
        let _ = fvd::storage::lvm::names::check_lv_name(&name);
        let _ = fvd::storage::lvm::names::split_dm_name(&name);
    }

    #[test]
    fn size_arguments_never_panic(text in "\\PC{0,40}") {
        let _ = fvd::units::parse_size(&text);
    }

    #[test]
    fn size_arguments_in_range_are_exact(n in 0u64..(1 << 40), unit in 0usize..5) {
        let (suffix, shift) = [("", 0), ("k", 10), ("M", 20), ("G", 30), ("T", 40)][unit];
        match fvd::units::parse_size(&format!("{n}{suffix}")) {
            Ok(b) => prop_assert_eq!(Some(b.0), n.checked_mul(1u64 << shift)),
            Err(_) => prop_assert!(n.checked_mul(1u64 << shift).is_none()),
        }
    }

    /// The kernel's I/O descriptors: any op and range decodes to a request or
    /// an errno; ranges never overflow.
    #[test]
    fn ublk_descriptors_never_panic(
        op_flags in any::<u32>(),
        nr in any::<u32>(),
        sector in prop_oneof![any::<u64>(), (0u64..1 << 24).prop_map(|d| (u64::MAX >> 9) - d)],
    ) {
        let iod = libublk::sys::ublksrv_io_desc { op_flags, nr_sectors: nr, start_sector: sector, addr: 0 };
        if let Ok(r) = fvd::ublk::request::decode(&iod) {
            prop_assert!(r.off.checked_add(r.len).is_some());
        }
    }

    #[test]
    fn table_and_bitmap_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), n in 0usize..300, bits in 0u64..5000) {
        prop_assert!(fvd::format::decode_table(&bytes, n).len() <= n);
        let _ = fvd::format::decode_bitmap(&bytes, bits);
    }
}
