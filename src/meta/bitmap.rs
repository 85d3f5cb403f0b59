//! The live copy-on-write bitmap: atomic words, read without locks.

use crate::units::BlockIdx;
use bitvec::order::Lsb0;
use bitvec::slice::BitSlice;
use std::sync::atomic::{AtomicU64, Ordering};

/// The bitmap the data path tests and sets concurrently, through `&self`.
///
/// Plain `AtomicU64` words rather than bitvec's atomic storage
/// (`BitSlice<AtomicU64>`): a set bit publishes the block's data (a reader
/// that sees it reads the image, so it must also see the completed write),
/// which needs Release on set and Acquire on test, and bitvec performs every
/// atomic access with `Ordering::Relaxed`. Its shared-reference writes are
/// also one bit at a time (`set_aliased`), where a range here is one
/// `fetch_or` per word. The persisted copy ([`crate::format::BitmapBits`]),
/// only ever changed under a lock, is a bitvec.
pub struct Bitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl Bitmap {
    pub fn new(words: &[u64], bits: u64) -> Bitmap {
        let mut w: Vec<AtomicU64> = words.iter().map(|&x| AtomicU64::new(x)).collect();
        w.resize_with(bits.div_ceil(64) as usize, || AtomicU64::new(0));
        Bitmap { words: w, bits }
    }

    /// Bits `64w..64w+64` (0 past the end).
    pub fn word(&self, w: u64) -> u64 {
        self.words.get(w as usize).map_or(0, |x| x.load(Ordering::Acquire))
    }

    pub fn bits(&self) -> u64 {
        self.bits
    }

    pub fn test(&self, b: BlockIdx) -> bool {
        if b.0 >= self.bits {
            return false;
        }
        self.words[(b.0 / 64) as usize].load(Ordering::Acquire) & (1 << (b.0 % 64)) != 0
    }

    /// Sets bits `first..first+count`, clipped to the bitmap.
    pub fn set_range(&self, first: BlockIdx, count: u64) {
        let end = first.0.saturating_add(count).min(self.bits);
        for (w, mask) in word_masks(first.0, end) {
            self.words[w].fetch_or(mask, Ordering::AcqRel);
        }
    }

    pub fn count_set(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }
}

/// The words that bits `first..end` touch, each with the mask of those bits
/// in it: whole words are `u64::MAX`, the partial first and last words are
/// masked. One step per word, never one per bit.
pub fn word_masks(first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let mut b = first;
    std::iter::from_fn(move || {
        if b >= end {
            return None;
        }
        let w = b / 64;
        let lo = b % 64;
        let hi = if end - w * 64 >= 64 { 64 } else { end - w * 64 };
        let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
        b = w * 64 + hi;
        Some((w as usize, mask))
    })
}

/// Sets bits `first..first+count` of a persisted bitmap, a word at a time
/// (bitvec fills whole words). A range that does not end within `bits` (or
/// within the bitmap) is refused before anything is set: Err carries the
/// number of bits the range was checked against.
pub fn set_range_in(map: &mut BitSlice<u64, Lsb0>, bits: u64, first: u64, count: u64) -> Result<(), u64> {
    let limit = bits.min(map.len() as u64);
    match first.checked_add(count) {
        Some(end) if end <= limit => {
            map[first as usize..end as usize].fill(true);
            Ok(())
        }
        _ => Err(limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_set_across_words() {
        let b = Bitmap::new(&[], 200);
        b.set_range(BlockIdx(60), 70);
        assert!(!b.test(BlockIdx(59)));
        assert!(b.test(BlockIdx(60)));
        assert!(b.test(BlockIdx(129)));
        assert!(!b.test(BlockIdx(130)));
        assert_eq!(b.count_set(), 70);
        b.set_range(BlockIdx(190), 50);
        assert_eq!(b.count_set(), 80);
        assert!(!b.test(BlockIdx(500)));
    }

    #[test]
    fn word_masks_cover_exactly_the_range() {
        assert_eq!(word_masks(5, 5).count(), 0);
        assert_eq!(word_masks(3, 7).collect::<Vec<_>>(), vec![(0, 0b111_1000)]);
        assert_eq!(word_masks(0, 64).collect::<Vec<_>>(), vec![(0, u64::MAX)]);
        assert_eq!(word_masks(63, 65).collect::<Vec<_>>(), vec![(0, 1 << 63), (1, 1)]);
        assert_eq!(
            word_masks(60, 200).collect::<Vec<_>>(),
            vec![(0, 0xf << 60), (1, u64::MAX), (2, u64::MAX), (3, 0xff)]
        );
        // The largest record (2^32 bits) is 2^26 steps, not 2^32.
        assert_eq!(word_masks(1, 1 + u32::MAX as u64).count(), 1 << 26);
    }

    #[test]
    fn persisted_ranges_set_and_refuse_the_end() {
        use crate::format::BitmapBits;
        let naive = |first: u64, count: u64, words: usize| {
            let mut v = vec![0u64; words];
            for b in first..first + count {
                v[(b / 64) as usize] |= 1 << (b % 64);
            }
            v
        };
        let bits = 200;
        for (first, count) in [(0, 0), (3, 4), (0, 64), (64, 64), (10, 54), (60, 70), (1, 198), (0, 200), (150, 50)] {
            let mut v = BitmapBits::repeat(false, 200);
            assert_eq!(set_range_in(&mut v, bits, first, count), Ok(()), "{first}+{count}");
            assert_eq!(v.as_raw_slice(), naive(first, count, 4), "{first}+{count}");
        }
        // Ending exactly at the bit count is fine, one past is refused and
        // sets nothing; so is a range whose end overflows.
        let mut v = BitmapBits::repeat(false, 200);
        assert_eq!(set_range_in(&mut v, bits, 199, 1), Ok(()));
        assert_eq!(v.as_raw_slice()[3], 1 << 7);
        let mut v = BitmapBits::repeat(false, 200);
        assert_eq!(set_range_in(&mut v, bits, 150, 51), Err(200));
        assert_eq!(set_range_in(&mut v, bits, 200, 1), Err(200));
        assert_eq!(set_range_in(&mut v, bits, u64::MAX, 2), Err(200));
        assert!(v.not_any());
        // A shorter bitmap than the bit count: bounded by the bitmap, never
        // indexed past it.
        let mut v = BitmapBits::repeat(false, 64);
        assert_eq!(set_range_in(&mut v, bits, 60, 10), Err(64));
        assert!(v.not_any());
    }
}
