//! Fuzzing of every parser, as property tests on random and mutated bytes:
//! no input may panic the header, journal or image-open code.

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
