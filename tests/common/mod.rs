//! Shared pieces of the model and crash tests: images on simulated storage,
//! deterministic data, and a flat model of the disk.
#![allow(dead_code)]

pub mod bin;
pub mod world;

use fvd::format::layout::CreateParams;
use fvd::format::{BaseFormat, Geometry};
use fvd::image::{create_on, Base, Image, Layer, OpenOptions};
use fvd::io::SyncOnly;
use fvd::storage::{SimStorage, Storage};
use std::path::Path;
use std::sync::Arc;

pub const SECTOR: usize = 512;

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub size: u64,
    pub block: u32,
    pub chunk: Option<u32>,
    pub base_size: u64,
    pub journal: u64,
    /// Serve with copy-on-read.
    pub cor: bool,
}

/// Bytes that identify the write they came from, different in every sector.
pub fn data(id: u64, len: usize) -> Vec<u8> {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub struct TestImage {
    pub cfg: Config,
    pub storage: Arc<SimStorage>,
    pub base: Option<Arc<SimStorage>>,
    pub base_bytes: Vec<u8>,
}

impl TestImage {
    pub fn new(cfg: Config) -> TestImage {
        let base_bytes = data(0xBA5E, cfg.base_size as usize);
        let base = (cfg.base_size > 0).then(|| Arc::new(SimStorage::from_bytes("base", base_bytes.clone())));
        let storage = Arc::new(SimStorage::new("image"));
        let geo = Geometry::new(&CreateParams {
            virtual_size: cfg.size,
            block_size: cfg.block,
            chunk_size: cfg.chunk,
            base_size: cfg.base_size,
            journal_len: cfg.journal,
        })
        .expect("geometry");
        let fmt = if base.is_some() { BaseFormat::Raw } else { BaseFormat::None };
        create_on(storage.as_ref(), &geo, "base", fmt).expect("create");
        TestImage { cfg, storage, base, base_bytes }
    }

    pub fn base_handle(&self) -> Option<Base> {
        self.base.as_ref().map(|b| Base::single(Layer::Raw(Box::new(b.clone()) as Box<dyn Storage>)))
    }

    pub fn open(&self, writethrough: bool) -> Image {
        self.open_on(self.storage.clone(), writethrough).expect("open")
    }

    pub fn open_on(&self, s: Arc<SimStorage>, writethrough: bool) -> Result<Image, fvd::image::ImageError> {
        let opts = OpenOptions { writethrough, copy_on_read: Some(self.cfg.cor), ..Default::default() };
        Image::open_on(Path::new("image"), Box::new(s), self.base_handle(), &opts)
    }

    /// The disk's initial content.
    pub fn initial(&self) -> Vec<u8> {
        let mut m = vec![0u8; self.cfg.size as usize];
        m[..self.base_bytes.len()].copy_from_slice(&self.base_bytes);
        m
    }
}

pub fn run<F: std::future::Future>(f: F) -> F::Output {
    fvd::io::block_on_sync(f)
}

pub fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    run(img.read(&SyncOnly, 0, &mut buf)).expect("read");
    buf
}

#[derive(Debug, Clone)]
pub enum Op {
    Write {
        off: u64,
        len: u64,
        fua: bool,
    },
    Read {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Flush,
    Reopen,
    /// Store queued copy-on-read blocks.
    Drain,
    /// Copy the whole base into the image.
    Prefetch,
    /// A power cut: the disk keeps a random subset (from this seed) of what was not
    /// synced, the image is dropped without a close and recovered.
    Crash {
        seed: u64,
    },
}

/// A random op generator shaped to hit block and chunk edges often.
pub fn op_strategy(size: u64) -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let sectors = size / 512;
    let range = (0..sectors, 1u64..=2048).prop_map(move |(s, n)| {
        let n = n.min(sectors - s);
        (s * 512, n * 512)
    });
    prop_oneof![
        6 => (range.clone(), any::<bool>()).prop_map(|((off, len), f)| Op::Write { off, len, fua: f && len % 3 == 0 }),
        4 => range.clone().prop_map(|(off, len)| Op::Read { off, len }),
        1 => range.clone().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => range.prop_map(|(off, len)| Op::Zero { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Drain),
        1 => (0..8u8).prop_map(|x| if x == 0 { Op::Prefetch } else { Op::Drain }),
        1 => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

/// Sets table entry `entry` to `value` in both copies of the table of the image
/// file at `p` and reseals the header's stripe checksums (both slots): metadata
/// that is consistent on storage but wrong, as a writer's bug would leave it.
pub fn patch_table_sealed(p: &std::path::Path, entry: usize, value: u32) {
    let mut b = std::fs::read(p).unwrap();
    let h = fvd::format::Header::decode(&b[..4096]).unwrap();
    let twin = (h.journal_offset + h.journal_len) as usize;
    let copies: &[usize] = if h.has_twin() { &[h.table_offset as usize, twin] } else { &[h.table_offset as usize] };
    for &c in copies {
        b[c + entry * 4..c + entry * 4 + 4].copy_from_slice(&value.to_le_bytes());
    }
    if h.has_twin() {
        let (t, l) = (h.table_offset as usize, (h.table_len + h.bitmap_len) as usize);
        let sums = fvd::format::twin::sums(&b[t..t + l]);
        for slot in 0..2 {
            let off = slot * 4096;
            if let Ok(mut h) = fvd::format::Header::decode(&b[off..off + 4096]) {
                h.meta_sums = sums.clone();
                b[off..off + 4096].copy_from_slice(&h.encode());
            }
        }
    }
    std::fs::write(p, b).unwrap();
}

/// Turns the image bytes `b` (a clean image) into one made before the twin and the
/// journal's two copies: both header slots without `INCOMPAT_META_TWIN` and
/// `INCOMPAT_JOURNAL_DUP`, the data region starting at the aligned end of the
/// journal (as such images had it), and the bytes between that and the old data
/// offset zeroed.
pub fn make_legacy(b: &mut [u8]) {
    use fvd::format::header::{INCOMPAT_JOURNAL_DUP, INCOMPAT_META_TWIN};
    use fvd::format::{Header, LayoutError};
    let old_data = Header::decode(&b[..4096]).map(|h| h.data_offset).unwrap_or(0);
    let mut new_data = old_data;
    for slot in 0..2 {
        let Ok(mut h) = Header::decode(&b[slot * 4096..(slot + 1) * 4096]) else { continue };
        h.incompat &= !(INCOMPAT_META_TWIN | INCOMPAT_JOURNAL_DUP);
        h.meta_sums.clear();
        h.meta_copy = 0;
        if let Err(LayoutError::BadDataOffset { expected, .. }) = Geometry::from_header(&h, u64::MAX) {
            h.data_offset = expected;
        }
        Geometry::from_header(&h, u64::MAX).expect("a legacy layout");
        new_data = h.data_offset;
        b[slot * 4096..(slot + 1) * 4096].copy_from_slice(&h.encode());
    }
    let end = (old_data as usize).min(b.len());
    if (new_data as usize) < end {
        b[new_data as usize..end].fill(0);
    }
}
