//! Which layer of a chain holds each block: one index for the whole chain.
//!
//! An image over a chain of layers (snapshots, then perhaps a raw bottom) must
//! not look a block up once per layer. At open, the layers under the image are
//! all read-only, so which of them holds each block is fixed: this index
//! records it once, one byte per block of the finest block size in the chain,
//! and a read asks it once, whatever the depth. The image's own bitmap still
//! comes first (it is the only layer that changes).
//!
//! Memory: one byte per block, whatever the number of layers: 16 MiB per TiB
//! of disk at the default 64 KiB block, 256 MiB per TiB at 4 KiB blocks. A
//! chain of one layer needs no index and has none.

/// Layers an index can name: a depth is one byte, 0 meaning "zeros".
pub const MAX_LAYERS: usize = 254;

pub struct DepthIndex {
    /// log2 of the granularity in bytes.
    shift: u32,
    /// Per block: 1 + the index of the layer that holds it, or 0 (zeros).
    depth: Vec<u8>,
}

impl DepthIndex {
    /// Builds the index of `size` bytes at granularity `gran` (a power of two):
    /// for each block, the first layer `k` in `0..layers` for which
    /// `holds(k, offset)` is true. One call per block and layer asked; see
    /// [`DepthIndex::build_masked`] for the fast way.
    pub fn build(size: u64, gran: u32, layers: usize, holds: impl Fn(usize, u64) -> bool) -> DepthIndex {
        let shift = gran.trailing_zeros();
        DepthIndex::build_masked(size, gran, layers, |k, w| {
            (0..64).filter(|j| holds(k, (w * 64 + j) << shift)).fold(0, |m, j| m | 1 << j)
        })
    }

    /// Builds the index of `size` bytes at granularity `gran` (a power of two)
    /// from `mask(k, w)`: the blocks `64w..64w+64` layer `k` holds, one bit each
    /// (bit j for block 64w+j; bits past the end are ignored). Layers are asked
    /// top first, and only for words that still have blocks no layer above
    /// holds: each block is assigned once, and a layer that holds nothing of a
    /// word costs one call for 64 blocks.
    pub fn build_masked(size: u64, gran: u32, layers: usize, mask: impl Fn(usize, u64) -> u64) -> DepthIndex {
        debug_assert!(gran.is_power_of_two() && layers <= MAX_LAYERS);
        let shift = gran.trailing_zeros();
        let blocks = size.div_ceil(gran as u64);
        let mut depth = vec![0u8; blocks as usize];
        let words = blocks.div_ceil(64);
        let mut open: Vec<u64> = (0..words)
            .map(|w| match blocks - w * 64 {
                n if n >= 64 => u64::MAX,
                n => (1u64 << n) - 1,
            })
            .collect();
        for k in 0..layers {
            let mut left = false;
            for (w, o) in open.iter_mut().enumerate() {
                if *o == 0 {
                    continue;
                }
                let mut m = mask(k, w as u64) & *o;
                *o &= !m;
                left |= *o != 0;
                while m != 0 {
                    let j = m.trailing_zeros() as u64;
                    depth[(w as u64 * 64 + j) as usize] = k as u8 + 1;
                    m &= m - 1;
                }
            }
            if !left {
                break;
            }
        }
        DepthIndex { shift, depth }
    }

    /// Blocks the index covers.
    pub fn blocks(&self) -> u64 {
        self.depth.len() as u64
    }

    /// Bytes of memory the index holds.
    pub fn bytes(&self) -> usize {
        self.depth.len()
    }

    /// The layer (0-based) holding the block of `off`, or None for zeros.
    pub fn layer_at(&self, off: u64) -> Option<usize> {
        match self.depth.get((off >> self.shift) as usize).copied().unwrap_or(0) {
            0 => None,
            d => Some(d as usize - 1),
        }
    }

    /// Splits `[off, off+len)` into runs held by one layer each:
    /// `(offset, length, layer)`, layer None meaning zeros.
    pub fn runs(&self, off: u64, len: u64) -> impl Iterator<Item = (u64, u64, Option<usize>)> + '_ {
        let end = off + len;
        let mut pos = off;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let layer = self.layer_at(pos);
            let start = pos;
            let gran = 1u64 << self.shift;
            loop {
                pos = ((pos >> self.shift) + 1) << self.shift;
                if pos >= end || self.layer_at(pos) != layer {
                    break;
                }
            }
            let stop = pos.min(end);
            pos = stop;
            debug_assert!(stop > start && gran > 0);
            Some((start, stop - start, layer))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_follow_the_first_layer_that_holds_each_block() {
        // Layer 0 holds block 1, layer 1 blocks 0..3, layer 2 (the bottom) everything.
        let holds = |k: usize, off: u64| match k {
            0 => off / 4096 == 1,
            1 => off / 4096 < 3,
            _ => true,
        };
        let idx = DepthIndex::build(6 * 4096, 4096, 3, holds);
        assert_eq!(idx.bytes(), 6);
        let r: Vec<_> = idx.runs(512, 5 * 4096).collect();
        assert_eq!(
            r,
            vec![
                (512, 4096 - 512, Some(1)),
                (4096, 4096, Some(0)),
                (8192, 4096, Some(1)),
                (12288, 2 * 4096 + 512, Some(2))
            ]
        );
        // Across words, with a partial last word.
        let big = DepthIndex::build(200 * 4096, 4096, 3, |k, off| match k {
            0 => (off / 4096) % 7 == 0,
            1 => (off / 4096) % 3 == 0,
            _ => (off / 4096) < 150,
        });
        for b in 0..200u64 {
            let want = if b % 7 == 0 {
                Some(0)
            } else if b % 3 == 0 {
                Some(1)
            } else if b < 150 {
                Some(2)
            } else {
                None
            };
            assert_eq!(big.layer_at(b * 4096), want, "block {b}");
        }
        let none = DepthIndex::build(2 * 4096, 4096, 1, |_, off| off == 0);
        assert_eq!(none.runs(0, 8192).collect::<Vec<_>>(), vec![(0, 4096, Some(0)), (4096, 4096, None)]);
    }
}
