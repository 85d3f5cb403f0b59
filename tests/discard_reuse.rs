//! Chunks freed by a discard are reused before the image grows, also when the
//! storage can't grow at all, and never while a request that looked up the
//! old mapping is still in flight (it could land in, or read, another guest
//! chunk's data).

mod common;

use common::{data, run};
use fvd::format::layout::CreateParams;
use fvd::format::{BaseFormat, Geometry};
use fvd::image::{create_on, Image, OpenOptions};
use fvd::io::SyncOnly;
use fvd::storage::SimStorage;
use fvd::units::Bytes;
use std::path::Path;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// An 8 MiB image whose storage holds only four 1 MiB chunks.
fn full_image() -> Image {
    let geo = Geometry::new(&CreateParams {
        virtual_size: 8 * MIB,
        block_size: 64 << 10,
        chunk_size: Some(MIB as u32),
        base_size: 0,
        journal_len: 256 << 10,
    })
    .expect("geometry");
    let s = Arc::new(SimStorage::new("image").with_limit(geo.data_offset + 4 * MIB));
    create_on(s.as_ref(), &geo, "", BaseFormat::None).expect("create");
    let img = Image::open_on(Path::new("image"), Box::new(s), None, &OpenOptions::default()).expect("open");
    for c in 0..4 {
        run(img.write(&SyncOnly, c * MIB, &data(c, MIB as usize), false)).expect("fill");
    }
    img
}

fn read(img: &Image, off: u64) -> Vec<u8> {
    let mut b = vec![0u8; MIB as usize];
    run(img.read(&SyncOnly, off, &mut b)).expect("read");
    b
}

#[test]
fn freed_chunks_are_reused_when_storage_is_full() {
    let img = full_image();
    assert!(run(img.write(&SyncOnly, 4 * MIB, &data(4, MIB as usize), false)).is_err(), "storage holds 4 chunks");
    run(img.discard(&SyncOnly, MIB, MIB)).expect("discard chunk 1");
    // No flush in between: the allocation commits the free itself.
    run(img.write(&SyncOnly, 4 * MIB, &data(4, MIB as usize), false)).expect("write reusing chunk 1's storage");
    assert_eq!(read(&img, 4 * MIB), data(4, MIB as usize));
    assert_eq!(read(&img, MIB), vec![0u8; MIB as usize]);
    for c in [0, 2, 3] {
        assert_eq!(read(&img, c * MIB), data(c, MIB as usize), "chunk {c}");
    }
}

#[test]
fn freed_chunk_waits_for_requests_in_flight_in_its_old_chunk() {
    let img = full_image();
    // A request that looked up chunk 0's mapping and has not finished its I/O.
    let in_flight = img.meta().enter(Bytes(0), 4096);
    run(img.discard(&SyncOnly, 0, MIB)).expect("discard chunk 0");
    let early = run(img.write(&SyncOnly, 5 * MIB, &data(5, MIB as usize), false));
    assert!(early.is_err(), "chunk 0's storage was reused while a request was still in it");
    assert!(img.meta().persist.has_freed(), "the freed chunk must stay queued, not be lost");
    drop(in_flight);
    run(img.write(&SyncOnly, 5 * MIB, &data(5, MIB as usize), false)).expect("reuse once the request is done");
    assert_eq!(read(&img, 5 * MIB), data(5, MIB as usize));
    assert_eq!(read(&img, 0), vec![0u8; MIB as usize]);
    run(img.flush(&SyncOnly)).expect("flush");
    let report = fvd::image::check(img.storage());
    assert_eq!(report.exit_code(), 0, "{report:?}");
}
