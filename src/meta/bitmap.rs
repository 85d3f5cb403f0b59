//! The live copy-on-write bitmap: atomic words, read without locks.

use crate::units::BlockIdx;
use std::sync::atomic::{AtomicU64, Ordering};

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

    pub fn bits(&self) -> u64 {
        self.bits
    }

    pub fn test(&self, b: BlockIdx) -> bool {
        if b.0 >= self.bits {
            return false;
        }
        self.words[(b.0 / 64) as usize].load(Ordering::Acquire) & (1 << (b.0 % 64)) != 0
    }

    pub fn set_range(&self, first: BlockIdx, count: u64) {
        let end = (first.0 + count).min(self.bits);
        let mut b = first.0;
        while b < end {
            let w = b / 64;
            let lo = b % 64;
            let hi = ((w + 1) * 64).min(end) - w * 64;
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            self.words[w as usize].fetch_or(mask, Ordering::AcqRel);
            b = w * 64 + hi;
        }
    }

    pub fn count_set(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
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
}
