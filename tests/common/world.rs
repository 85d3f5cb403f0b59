//! A world of named simulated disks for the crash tests of multi-disk operations
//! (commit, rebase, snapshot, resize): what each disk holds durably, the disks a test
//! runs on over it, one power cut shared by all of them, and the crash that gives the
//! next world.

use super::{data, run};
use fvd::image::{Image, ImageError};
use fvd::io::SyncOnly;
use fvd::storage::{PowerCut, SimStorage};
use rand::Rng;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Durable bytes of every disk, by name (a header's base path names a disk).
pub type World = BTreeMap<String, Vec<u8>>;
/// The disks of a world, all under one power cut.
pub type Disks = BTreeMap<String, Arc<SimStorage>>;

/// Disks holding `w`'s bytes, all cut off by `cut`.
pub fn disks(w: &World, cut: &Arc<PowerCut>) -> Disks {
    w.iter()
        .map(|(n, b)| (n.clone(), Arc::new(SimStorage::from_bytes(n, b.clone()).with_power_cut(cut.clone()))))
        .collect()
}

/// What every disk holds after a crash now (unflushed writes kept or lost at random).
pub fn crash_all(d: &Disks, rng: &mut rand::rngs::StdRng) -> World {
    d.iter().map(|(n, s)| (n.clone(), s.crash(rng))).collect()
}

/// The whole of what `img` reads.
pub fn read_all_of(img: &Image) -> Result<Vec<u8>, ImageError> {
    let mut buf = vec![0u8; img.size() as usize];
    run(img.read(&SyncOnly, 0, &mut buf))?;
    Ok(buf)
}

/// Writes `n` random 512-aligned extents of one to three half blocks, with pattern ids
/// from `id`, into the image and the model (grown to the image's size first).
pub fn scribble(
    img: &Image,
    model: &mut Vec<u8>,
    rng: &mut rand::rngs::StdRng,
    block: u32,
    id: u64,
    n: usize,
) -> Result<(), ImageError> {
    let size = img.size();
    model.resize(size as usize, 0);
    for i in 0..n {
        let len = rng.gen_range(1..=3) * u64::from(block) / 2;
        let off = rng.gen_range(0..(size - len) / 512) * 512;
        let bytes = data(id * 1000 + i as u64, len as usize);
        run(img.write(&SyncOnly, off, &bytes, false))?;
        model[off as usize..(off + len) as usize].copy_from_slice(&bytes);
    }
    Ok(())
}
