//! Plans: where each piece of a guest request lives.

use super::{Meta, MetaError};
use crate::units::{BlockIdx, Bytes};

/// Where the bytes of a piece come from (reads) or go to (writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// In the image's storage at this offset.
    Image(u64),
    /// In the base at this offset.
    Base(u64),
    /// Zeros: never written and not in the base.
    Zero,
    /// A block still in the base that a write must copy first (writes only).
    Copy(BlockIdx),
}

/// The pieces of a request, held inline up to four (a request needs no
/// allocation to be planned unless it spans more).
pub type Plan = smallvec::SmallVec<[Piece; 4]>;

/// A contiguous piece of a request: `len` bytes at `buf_off` in the request buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub buf_off: usize,
    pub len: usize,
    pub src: Source,
}

fn push(out: &mut Plan, p: Piece) {
    if let Some(last) = out.last_mut() {
        let contiguous = match (last.src, p.src) {
            (Source::Image(a), Source::Image(b)) => a + last.len as u64 == b,
            (Source::Base(a), Source::Base(b)) => a + last.len as u64 == b,
            (Source::Zero, Source::Zero) => true,
            _ => false,
        };
        if contiguous && last.buf_off + last.len == p.buf_off {
            last.len += p.len;
            return;
        }
    }
    out.push(p);
}

impl Meta {
    /// Splits `[off, off+len)` into block-granular runs `(start, end, block)`.
    fn block_runs(&self, off: u64, len: u64) -> impl Iterator<Item = (u64, u64, BlockIdx)> + '_ {
        let bs = self.geo.block_size as u64;
        let end = off + len;
        let mut pos = off;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let b = pos / bs;
            let next = ((b + 1) * bs).min(end);
            let r = (pos, next, BlockIdx(b));
            pos = next;
            Some(r)
        })
    }

    /// Plans a read. Pieces are merged where they are contiguous.
    pub fn plan_read(&self, off: Bytes, len: u64) -> Result<Plan, MetaError> {
        self.check_range(off, len)?;
        let base_size = self.geo.base_size.0;
        let mut out = Plan::new();
        for (s, e, b) in self.block_runs(off.0, len) {
            let buf_off = (s - off.0) as usize;
            let n = (e - s) as usize;
            if !self.block_in_image(b) {
                // In the base; the base's tail past its size reads as zeros.
                let base_end = e.min(base_size);
                if s < base_end {
                    push(&mut out, Piece { buf_off, len: (base_end - s) as usize, src: Source::Base(s) });
                }
                if base_end < e {
                    let z = (e - base_end.max(s)) as usize;
                    push(&mut out, Piece { buf_off: buf_off + n - z, len: z, src: Source::Zero });
                }
                continue;
            }
            match self.storage_offset(Bytes(s)) {
                Some(so) => push(&mut out, Piece { buf_off, len: n, src: Source::Image(so) }),
                // Unallocated: never written, or a zero block of the base.
                None => push(&mut out, Piece { buf_off, len: n, src: Source::Zero }),
            }
        }
        Ok(out)
    }

    /// Plans a write whose chunks are all allocated: direct pieces, and the
    /// blocks that must be copied from the base first (one piece per block).
    pub fn plan_write(&self, off: Bytes, len: u64) -> Result<Plan, MetaError> {
        self.check_range(off, len)?;
        let mut out = Plan::new();
        for (s, e, b) in self.block_runs(off.0, len) {
            let buf_off = (s - off.0) as usize;
            let n = (e - s) as usize;
            if !self.block_in_image(b) {
                out.push(Piece { buf_off, len: n, src: Source::Copy(b) });
                continue;
            }
            let so = self
                .storage_offset(Bytes(s))
                .ok_or(MetaError::BitWithoutChunk { block: b.0, vchunk: self.geo.chunk_of(Bytes(s)).0 })?;
            push(&mut out, Piece { buf_off, len: n, src: Source::Image(so) });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::{CreateParams, Geometry};
    use crate::units::{ChunkIdx, PhysChunk};

    fn meta(base: u64, table: bool) -> Meta {
        let g = Geometry::new(&CreateParams {
            virtual_size: 1 << 24,
            block_size: 4096,
            chunk_size: table.then_some(1 << 20),
            base_size: base,
            journal_len: 1 << 16,
        })
        .unwrap();
        let chunks = g.chunks() as usize;
        let bits = crate::format::BitmapBits::repeat(false, g.base_blocks() as usize);
        Meta::new(g, vec![0; chunks], bits, 0)
    }

    #[test]
    fn read_plan_splits_base_image_and_zero() {
        let m = meta(10_000, true);
        m.table.install(ChunkIdx(0), PhysChunk(2)).unwrap();
        m.set_blocks_written(BlockIdx(1), 1);
        let p = m.plan_read(Bytes(0), 16384).unwrap();
        let d = m.geo.data_offset + 2 * (1 << 20);
        assert_eq!(
            p.to_vec(),
            vec![
                Piece { buf_off: 0, len: 4096, src: Source::Base(0) },
                Piece { buf_off: 4096, len: 4096, src: Source::Image(d + 4096) },
                Piece { buf_off: 8192, len: 10_000 - 8192, src: Source::Base(8192) },
                Piece { buf_off: 10_000, len: 12288 - 10_000, src: Source::Zero },
                // Beyond the base in an allocated chunk: the image (a hole reads zeros).
                Piece { buf_off: 12288, len: 4096, src: Source::Image(d + 12288) },
            ]
        );
    }

    #[test]
    fn raw_layout_maps_offsets_directly() {
        let m = meta(0, false);
        let p = m.plan_read(Bytes(8192), 8192).unwrap();
        assert_eq!(p.to_vec(), vec![Piece { buf_off: 0, len: 8192, src: Source::Image(m.geo.data_offset + 8192) }]);
        assert!(m.plan_read(Bytes(1 << 24), 512).is_err());
    }

    #[test]
    fn write_plan_marks_uncopied_blocks() {
        let m = meta(1 << 20, true);
        m.table.install(ChunkIdx(0), PhysChunk(0)).unwrap();
        m.set_blocks_written(BlockIdx(0), 1);
        let p = m.plan_write(Bytes(2048), 4096).unwrap();
        assert_eq!(p[0].src, Source::Image(m.geo.data_offset + 2048));
        assert_eq!(p[1], Piece { buf_off: 2048, len: 2048, src: Source::Copy(BlockIdx(1)) });
    }
}
