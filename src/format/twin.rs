//! Checksummed twin copies of the table and the bitmap (`INCOMPAT_META_TWIN`).
//!
//! # Copies
//!
//! Copy 0 is the table at `table_offset` and the bitmap at `bitmap_offset`.
//! Copy 1, the twin, mirrors the span from `table_offset` to `journal_offset`
//! (table, room for it to grow, bitmap) byte for byte, starting right after the
//! journal at `twin_offset = journal_offset + journal_len`; `data_offset` is the
//! twin's end rounded up as without it. The header's `meta_copy` says which copy
//! is current.
//!
//! # Stripes and their checksums
//!
//! The *metadata stream* of a copy is its table bytes (`table_len`) followed by
//! its bitmap bytes (`bitmap_len`): `n = (table_len + bitmap_len) / 4096`
//! blocks. It is cut into stripes of `per = ⌈n / 704⌉` blocks (the last may be
//! shorter): `⌈n / per⌉` stripes, at most 704, so that their CRC-32s fit the
//! header's `meta_sums` (bytes 1256 on, see the header table). `meta_sums[i]` is
//! the CRC-32 (IEEE) of stripe `i` of the current copy. A stripe is good in a
//! copy when its bytes there have that CRC.
//!
//! # Reading
//!
//! Every stripe is taken from the current copy when good there, else from the
//! twin when good there (the same bytes: a damaged block is repaired from its
//! twin). A stripe good in neither copy is damage the image cannot repair: an
//! open refuses the image, naming the region and offset; `fvd check` reports
//! it. A twin stripe that is not good is out of date (a checkpoint was cut
//! before it brought the twin up to date) or damaged: a read-write open
//! rewrites it.
//!
//! # Writing (a checkpoint)
//!
//! 1. the new table and bitmap go to the copy that is not current; sync;
//! 2. one header write makes that copy current, with the new checksums (and
//!    the checkpoint's new journal sequence); sync;
//! 3. the other copy is brought up to date; sync.
//!
//! A crash before 2 leaves the old current copy and its checksums untouched; a
//! crash during 3 leaves the new one intact and a twin that 3 finishes at the
//! next read-write open. A copy is never written while it is current.

/// Stripes of the metadata stream of `meta_len` bytes: (blocks per stripe, count).
pub fn stripes(meta_len: u64) -> (u64, usize) {
    let n = meta_len.div_ceil(super::META_BLOCK);
    if n == 0 {
        return (1, 0);
    }
    let per = n.div_ceil(super::header::MAX_META_STRIPES as u64);
    (per, n.div_ceil(per) as usize)
}

/// Byte range of stripe `i` in a stream of `meta_len` bytes.
pub fn stripe_range(meta_len: u64, i: usize) -> std::ops::Range<usize> {
    let (per, _) = stripes(meta_len);
    let len = (per * super::META_BLOCK) as usize;
    let start = i * len;
    start.min(meta_len as usize)..(start + len).min(meta_len as usize)
}

/// The checksum of every stripe of `meta`.
pub fn sums(meta: &[u8]) -> Vec<u32> {
    let (_, n) = stripes(meta.len() as u64);
    (0..n).map(|i| crc32fast::hash(&meta[stripe_range(meta.len() as u64, i)])).collect()
}

/// Whether stripe `i` of `meta` has checksum `sum`.
pub fn good(meta: &[u8], i: usize, sum: u32) -> bool {
    crc32fast::hash(&meta[stripe_range(meta.len() as u64, i)]) == sum
}

/// Where one stripe of one copy was found wanting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeFault {
    /// The copy (0 or 1) whose stripe is not good.
    pub copy: u32,
    pub stripe: usize,
    /// The stripe's byte range in the metadata stream.
    pub range: std::ops::Range<usize>,
    /// True when the other copy has it good (repairable); false when no copy
    /// does (the stripe is lost).
    pub repairable: bool,
}

/// Chooses every stripe of the stream from the copy that has it good: the
/// current copy's bytes, with its bad stripes taken from the twin where the twin
/// has them good. Returns the chosen stream, and every stripe not good in a copy.
/// Stripes good in neither copy keep the current copy's bytes.
pub fn choose(current: &[u8], twin: &[u8], current_copy: u32, sums: &[u32]) -> (Vec<u8>, Vec<StripeFault>) {
    let mut out = current.to_vec();
    let mut faults = Vec::new();
    let len = current.len() as u64;
    for (i, &sum) in sums.iter().enumerate() {
        let r = stripe_range(len, i);
        let cur_ok = good(current, i, sum);
        let twin_ok = twin.len() == current.len() && good(twin, i, sum);
        if !cur_ok {
            if twin_ok {
                out[r.clone()].copy_from_slice(&twin[r.clone()]);
            }
            faults.push(StripeFault { copy: current_copy, stripe: i, range: r.clone(), repairable: twin_ok });
        }
        if !twin_ok && cur_ok {
            faults.push(StripeFault { copy: 1 - current_copy, stripe: i, range: r, repairable: true });
        }
    }
    (out, faults)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_cover_the_stream_in_at_most_704() {
        assert_eq!(stripes(0), (1, 0));
        assert_eq!(stripes(4096), (1, 1));
        assert_eq!(stripes(704 * 4096), (1, 704));
        assert_eq!(stripes(705 * 4096), (2, 353));
        // 1 TiB with 1 MiB chunks and a 1 TiB base in 64 KiB blocks: 6 MiB.
        let (per, n) = stripes(6 << 20);
        assert_eq!((per, n), (3, 512));
        assert_eq!(stripe_range(6 << 20, 511), (511 * 3 * 4096)..(6 << 20));
        let (per, n) = stripes(705 * 4096);
        assert_eq!(stripe_range(705 * 4096, n - 1).len(), 4096, "the last stripe is shorter: {per}");
    }

    #[test]
    fn a_bad_stripe_is_taken_from_the_twin_and_one_bad_in_both_is_lost() {
        let meta: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let s = sums(&meta);
        assert_eq!(s.len(), 3);
        let mut cur = meta.clone();
        let mut twin = meta.clone();
        cur[5000] ^= 1; // stripe 1 of the current copy
        twin[100] = 0xee; // stripe 0 of the twin
        let (got, faults) = choose(&cur, &twin, 1, &s);
        assert_eq!(got, meta);
        assert_eq!(
            faults,
            vec![
                StripeFault { copy: 0, stripe: 0, range: 0..4096, repairable: true },
                StripeFault { copy: 1, stripe: 1, range: 4096..8192, repairable: true },
            ]
        );
        twin[5000] ^= 2;
        let (_, faults) = choose(&cur, &twin, 1, &s);
        assert!(faults.contains(&StripeFault { copy: 1, stripe: 1, range: 4096..8192, repairable: false }));
    }
}
