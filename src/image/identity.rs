//! Base identity: what an overlay records about its base, and the check at open
//! that refuses a base rebuilt or replaced under it.
//!
//! An fvd base is known by the `uuid` in its header. A raw base has no header,
//! so it is known by its size and a fingerprint: the CRC-32 of its size and of
//! 16 blocks of 4 KiB sampled evenly across it (the first and the last among
//! them). A raw base changed only outside the sampled blocks passes the check;
//! one rebuilt, replaced, resized or written across (a file system, a new
//! install) does not.

use crate::format::header::uuid_text;
use crate::format::Header;
use crate::storage::Storage;
use std::io;

/// What an overlay records about its base.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BaseId {
    /// An fvd base's uuid (zeros for raw).
    pub uuid: [u8; 16],
    /// A raw base's fingerprint (0 for fvd).
    pub fingerprint: u64,
}

impl BaseId {
    /// Writes this identity into an overlay's header.
    pub fn record(&self, h: &mut Header) {
        h.base_uuid = self.uuid;
        h.base_fingerprint = self.fingerprint;
    }
}

/// Sampled blocks and their size.
const SAMPLES: u64 = 16;
const SAMPLE: u64 = 4096;

/// A raw base's fingerprint. Never 0 (0 means "not recorded").
pub fn raw_fingerprint(s: &dyn Storage) -> io::Result<u64> {
    let size = s.size();
    let mut h = crc32fast::Hasher::new();
    h.update(&size.to_le_bytes());
    let mut buf = vec![0u8; SAMPLE as usize];
    let last = size.saturating_sub(SAMPLE) / SAMPLE * SAMPLE;
    for i in 0..SAMPLES {
        let off = (last / (SAMPLES - 1) * i / SAMPLE * SAMPLE).min(last);
        let n = SAMPLE.min(size.saturating_sub(off)) as usize;
        buf.fill(0);
        if n > 0 {
            s.read_at(&mut buf[..n], off)?;
        }
        h.update(&off.to_le_bytes());
        h.update(&buf);
    }
    Ok((1u64 << 32) | h.finalize() as u64)
}

/// Why a layer does not match what the image above it recorded, or None.
pub fn fvd_mismatch(above: &Header, layer: &Header) -> Option<String> {
    if above.base_uuid == [0; 16] || above.base_uuid == layer.uuid {
        return None;
    }
    Some(format!(
        "is not the image this one was created over (its identity is {}, {} was recorded); \
         it was replaced or rebuilt. 'fvd rebase -u' records a new base deliberately",
        uuid_text(&layer.uuid),
        uuid_text(&above.base_uuid)
    ))
}

/// Why a raw base does not match its recorded fingerprint, or None.
pub fn raw_mismatch(above: &Header, s: &dyn Storage) -> io::Result<Option<String>> {
    if above.base_fingerprint == 0 {
        return Ok(None);
    }
    let now = raw_fingerprint(s)?;
    Ok((now != above.base_fingerprint).then(|| {
        format!(
            "its content changed since the image was created over it (fingerprint {now:#x}, {:#x} was recorded); \
             'fvd rebase -u' records a new base deliberately",
            above.base_fingerprint
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SimStorage;

    #[test]
    fn fingerprint_sees_sampled_blocks_and_size() {
        let s = SimStorage::from_bytes("b", vec![7u8; 1 << 20]);
        let a = raw_fingerprint(&s).unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, raw_fingerprint(&s).unwrap());
        s.write_at(&[1u8; 512], 0).unwrap();
        let b = raw_fingerprint(&s).unwrap();
        assert_ne!(a, b, "the first block is sampled");
        s.write_at(&[1u8; 512], (1 << 20) - 512).unwrap();
        assert_ne!(b, raw_fingerprint(&s).unwrap(), "the last block is sampled");
        let small = SimStorage::from_bytes("s", vec![7u8; 1000]);
        assert_ne!(raw_fingerprint(&small).unwrap(), 0);
    }
}
