//! Journal blocks and records.
//!
//! # Journal block (4096 bytes)
//!
//! | off  | size | field       | meaning                                        |
//! |------|------|-------------|------------------------------------------------|
//! | 0    | 4    | magic       | `b"FVDJ"`                                      |
//! | 4    | 2    | payload_len | bytes of records that follow, ≤ 4076           |
//! | 6    | 2    | commit_pos  | this block's position within its commit (0: its first block; saturates at 65535). Written 0 before `INCOMPAT_JOURNAL_POS` (bytes 4..8 were one u32 length) |
//! | 8    | 8    | seq         | `journal_seq + index of the block in the region`|
//! | 16   | n    | records     | back to back, see below                        |
//! | 4092 | 4    | crc32       | CRC-32 (IEEE) of bytes 0..4092                 |
//!
//! # Records
//!
//! | tag  | name      | body (after the 1-byte tag)                             | size |
//! |------|-----------|---------------------------------------------------------|------|
//! | 0x01 | TableSet  | vchunk u32, entry u32 (0 free, p+1 allocated), reserved u32 (written 0, ignored; writers before this rule stored a chunk high-water mark there) | 13 |
//! | 0x02 | BitmapSet | first block u64, count u32: set bits first..first+count  | 13 |
//!
//! Records are absolute (set an entry, set bits), so replaying a record twice
//! gives the same state: a crash during a checkpoint is repaired by replaying
//! the whole journal again.
//!
//! # The end of the log, and damage
//!
//! A commit writes its blocks together and syncs; the next commit starts only
//! after that. The log ends at the first block that does not decode with its
//! expected sequence: normally the blocks a crash tore from the last commit,
//! which was never acknowledged. With `INCOMPAT_JOURNAL_POS` a valid block
//! further on whose commit began after the bad block (`index - commit_pos` past
//! it) proves the bad block's commit completed: the bad block is damage, not
//! the end (see [`find_damage`]).
//!
//! # Two copies of every block (`INCOMPAT_JOURNAL_DUP`)
//!
//! The last commit has no later one to tell its damage from a tear: a damaged
//! sector in it would end the log there, and its acknowledged records would be
//! lost without a word. With incompatible feature bit 3 every block is written
//! twice, side by side: block `i` of the log (sequence `journal_seq + i`) sits
//! in the region's 4096-byte slots `2i` and `2i + 1`, the same bytes in both,
//! written in one write before the commit's sync. Block `i` is valid when
//! either copy decodes; a single damaged sector therefore never loses a
//! block, and a torn commit (both copies of a block bad) is still the end of
//! the log. The log holds `journal_len / 8192` blocks. See [`Shape`].

use super::{le_u16, le_u32, le_u64, META_BLOCK};
use thiserror::Error;

pub const MAGIC: [u8; 4] = *b"FVDJ";
const HDR: usize = 16;
const CRC_OFF: usize = META_BLOCK as usize - 4;
/// Bytes available for records in one block.
pub const PAYLOAD_MAX: usize = CRC_OFF - HDR;
pub const RECORD_LEN: usize = 13;
const TAG_TABLE: u8 = 1;
const TAG_BITMAP: u8 = 2;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("journal block has bad magic")]
    BadMagic,
    #[error("journal block checksum mismatch")]
    BadChecksum,
    #[error("journal block sequence {found} where {expected} was expected")]
    WrongSequence { expected: u64, found: u64 },
    #[error("journal block payload length {0} exceeds {PAYLOAD_MAX}")]
    BadLength(u32),
    #[error("journal record at payload byte {offset:#x}: {why}")]
    BadRecord { offset: usize, why: &'static str },
}

/// One metadata update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Table slot `vchunk` now holds `entry` (0 free, p+1 physical chunk p).
    TableSet { vchunk: u32, entry: u32 },
    /// Bits `first .. first+count` of the bitmap are now set.
    BitmapSet { first: u64, count: u32 },
}

impl Record {
    // record := 0x01 vchunk:u32 entry:u32 reserved:u32(0) | 0x02 first:u64 count:u32
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match *self {
            Record::TableSet { vchunk, entry } => {
                out.push(TAG_TABLE);
                out.extend_from_slice(&vchunk.to_le_bytes());
                out.extend_from_slice(&entry.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Record::BitmapSet { first, count } => {
                out.push(TAG_BITMAP);
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
        }
    }

    pub fn decode(b: &[u8], offset: usize) -> Result<Record, JournalError> {
        if b.len() < RECORD_LEN {
            return Err(JournalError::BadRecord { offset, why: "truncated record" });
        }
        match b[0] {
            TAG_TABLE => Ok(Record::TableSet { vchunk: le_u32(b, 1), entry: le_u32(b, 5) }),
            TAG_BITMAP => Ok(Record::BitmapSet { first: le_u64(b, 1), count: le_u32(b, 9) }),
            _ => Err(JournalError::BadRecord { offset, why: "unknown record tag" }),
        }
    }
}

/// A decoded, validated journal block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalBlock {
    pub seq: u64,
    /// Position within its commit (0: the commit's first block).
    pub pos: u16,
    pub records: Vec<Record>,
}

impl JournalBlock {
    /// How many records fit in one block.
    pub const CAPACITY: usize = PAYLOAD_MAX / RECORD_LEN;

    // block := "FVDJ" payload_len:u16 commit_pos:u16 seq:u64 record{payload_len/13} zero-pad crc32:u32
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.records.len() <= Self::CAPACITY);
        let mut payload = Vec::with_capacity(PAYLOAD_MAX);
        for r in self.records.iter().take(Self::CAPACITY) {
            r.encode_into(&mut payload);
        }
        let mut b = vec![0u8; META_BLOCK as usize];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&(payload.len() as u16).to_le_bytes());
        b[6..8].copy_from_slice(&self.pos.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[HDR..HDR + payload.len()].copy_from_slice(&payload);
        let crc = crc32fast::hash(&b[..CRC_OFF]);
        b[CRC_OFF..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a block; `expected_seq` is the sequence the block must carry to
    /// be part of the current log.
    pub fn decode(b: &[u8], expected_seq: u64) -> Result<JournalBlock, JournalError> {
        if b.len() < META_BLOCK as usize || b[0..4] != MAGIC {
            return Err(JournalError::BadMagic);
        }
        if le_u32(b, CRC_OFF) != crc32fast::hash(&b[..CRC_OFF]) {
            return Err(JournalError::BadChecksum);
        }
        let seq = le_u64(b, 8);
        if seq != expected_seq {
            return Err(JournalError::WrongSequence { expected: expected_seq, found: seq });
        }
        let len = le_u16(b, 4) as u32;
        if len as usize > PAYLOAD_MAX || len as usize % RECORD_LEN != 0 {
            return Err(JournalError::BadLength(len));
        }
        let pos = le_u16(b, 6);
        let payload = &b[HDR..HDR + len as usize];
        let records = payload
            .chunks_exact(RECORD_LEN)
            .enumerate()
            .map(|(i, r)| Record::decode(r, i * RECORD_LEN))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(JournalBlock { seq, pos, records })
    }
}

/// Packs records into consecutive blocks starting at sequence `first_seq`,
/// each block once.
pub fn pack(records: &[Record], first_seq: u64) -> Vec<u8> {
    Shape::SINGLE.pack(records, first_seq)
}

/// How the journal region holds its blocks: once each, or twice
/// (`INCOMPAT_JOURNAL_DUP`, see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    copies: u64,
}

impl Shape {
    pub const SINGLE: Shape = Shape { copies: 1 };
    pub const DUP: Shape = Shape { copies: 2 };

    /// The shape a header's incompatible features give.
    pub fn of(incompat: u64) -> Shape {
        if incompat & super::header::INCOMPAT_JOURNAL_DUP != 0 {
            Shape::DUP
        } else {
            Shape::SINGLE
        }
    }

    /// How many copies of each block the region holds.
    pub fn copies(self) -> u64 {
        self.copies
    }

    /// Blocks of the log a region of `len` bytes holds.
    pub fn capacity(self, len: u64) -> u64 {
        len / META_BLOCK / self.copies
    }

    /// Offset within the region of block `i`'s first copy.
    pub fn offset(self, i: u64) -> u64 {
        i * self.copies * META_BLOCK
    }

    /// Block `i` of `region`, expected at sequence `seq`: the first copy that
    /// decodes, else the first copy's error.
    pub fn decode(self, region: &[u8], i: u64, seq: u64) -> Result<JournalBlock, JournalError> {
        let slot = |c: u64| -> Option<&[u8]> {
            let at = usize::try_from(self.offset(i) + c * META_BLOCK).ok()?;
            region.get(at..at + META_BLOCK as usize)
        };
        let mut first = None;
        for c in 0..self.copies {
            let Some(b) = slot(c) else { break };
            match JournalBlock::decode(b, seq) {
                Ok(blk) => return Ok(blk),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or(JournalError::BadMagic))
    }

    /// For each copy of one block (`group`: its copies, laid out in a row),
    /// expected at sequence `seq`: `None` when that copy decodes, else why not.
    pub fn copy_errors(self, group: &[u8], seq: u64) -> Vec<Option<JournalError>> {
        (0..self.copies as usize)
            .map(|c| match group.get(c * META_BLOCK as usize..(c + 1) * META_BLOCK as usize) {
                Some(b) => JournalBlock::decode(b, seq).err(),
                None => Some(JournalError::BadMagic),
            })
            .collect()
    }

    /// Packs records into consecutive blocks starting at sequence `first_seq`,
    /// each block `copies` times in a row.
    // grammar: (block{copies})*  where block = JournalBlock at seq first_seq + i, pos i
    pub fn pack(self, records: &[Record], first_seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, group) in records.chunks(JournalBlock::CAPACITY).enumerate() {
            let pos = u16::try_from(i).unwrap_or(u16::MAX);
            let blk = JournalBlock { seq: first_seq + i as u64, pos, records: group.to_vec() }.encode();
            for _ in 0..self.copies {
                out.extend_from_slice(&blk);
            }
        }
        out
    }
}

/// A journal block that does not decode although the log goes on after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Index of the bad block in the region.
    pub block: u64,
    pub error: JournalError,
    /// Index of a valid block of a later commit.
    pub later: u64,
}

/// Given the journal region `region` (whole slots, laid out as `shape`) of a log starting at
/// sequence `first_seq`, whose block `bad` is the first that does not decode:
/// whether a valid block of a later commit follows, which makes `bad` damage
/// (its commit completed) rather than the torn end of the log.
pub fn find_damage(shape: Shape, region: &[u8], first_seq: u64, bad: u64) -> Option<Damage> {
    let n = shape.capacity(region.len() as u64);
    if bad >= n {
        return None;
    }
    let error = shape.decode(region, bad, first_seq + bad).err()?;
    (bad + 1..n).find_map(|j| {
        let b = shape.decode(region, j, first_seq + j).ok()?;
        (j - b.pos as u64 > bad).then(|| Damage { block: bad, error: error.clone(), later: j })
    })
}

/// A copy of a block of the log that does not decode while another copy of
/// the same block does (one good copy carries the block; the bad one is
/// damage a scrub rewrites).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadCopy {
    pub block: u64,
    pub copy: u64,
    pub error: JournalError,
}

/// Every bad copy of a block that has a good copy, in the log of `region`
/// (laid out as `shape`) starting at `first_seq`, up to its end (the first
/// block no copy of which decodes).
pub fn bad_copies(shape: Shape, region: &[u8], first_seq: u64) -> Vec<BadCopy> {
    let mut out = Vec::new();
    let group = (shape.copies * META_BLOCK) as usize;
    for i in 0..shape.capacity(region.len() as u64) {
        let at = shape.offset(i) as usize;
        let errs = shape.copy_errors(&region[at..at + group], first_seq + i);
        if errs.iter().all(Option::is_some) {
            break;
        }
        out.extend(
            errs.into_iter()
                .enumerate()
                .filter_map(|(c, e)| e.map(|error| BadCopy { block: i, copy: c as u64, error })),
        );
    }
    out
}

/// Number of blocks [`pack`] produces for `n` records.
pub fn blocks_for(n: usize) -> u64 {
    n.div_ceil(JournalBlock::CAPACITY) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_round_trips() {
        let b = JournalBlock {
            seq: 42,
            pos: 3,
            records: vec![Record::TableSet { vchunk: 3, entry: 9 }, Record::BitmapSet { first: 1 << 40, count: 17 }],
        };
        assert_eq!(JournalBlock::decode(&b.encode(), 42).unwrap(), b);
    }

    #[test]
    fn table_record_reserved_word_is_written_zero_and_ignored() {
        let mut b = Vec::new();
        Record::TableSet { vchunk: 3, entry: 9 }.encode_into(&mut b);
        assert_eq!(b[9..], [0u8; 4]);
        // Writers before the rule stored the chunk high-water mark there.
        b[9..].copy_from_slice(&77u32.to_le_bytes());
        assert_eq!(Record::decode(&b, 0), Ok(Record::TableSet { vchunk: 3, entry: 9 }));
    }

    #[test]
    fn dup_blocks_survive_one_bad_copy_and_end_when_both_are_bad() {
        let recs: Vec<Record> =
            (0..JournalBlock::CAPACITY as u32 + 1).map(|v| Record::TableSet { vchunk: v, entry: v + 1 }).collect();
        let mut r = Shape::DUP.pack(&recs, 50);
        assert_eq!(r.len(), 4 * META_BLOCK as usize, "two blocks, each twice");
        assert_eq!(Shape::DUP.capacity(r.len() as u64), 2);
        assert_eq!(Shape::DUP.offset(1), 2 * META_BLOCK);
        // One copy of each block damaged: both blocks still decode.
        r[100] ^= 1;
        r[3 * META_BLOCK as usize + 200] ^= 0x80;
        assert_eq!(Shape::DUP.decode(&r, 0, 50).unwrap().records.len(), JournalBlock::CAPACITY);
        assert_eq!(Shape::DUP.decode(&r, 1, 51).unwrap().pos, 1);
        // Both copies of block 1 bad: the log ends there, with the first copy's error.
        r[2 * META_BLOCK as usize + 9] ^= 1;
        assert_eq!(Shape::DUP.decode(&r, 1, 51), Err(JournalError::BadChecksum));
        // Past the region: nothing decodes.
        assert!(Shape::DUP.decode(&r, 2, 52).is_err());
    }

    #[test]
    fn stale_and_torn_blocks_are_rejected() {
        let b = JournalBlock { seq: 5, pos: 0, records: vec![Record::BitmapSet { first: 0, count: 1 }] };
        let enc = b.encode();
        assert_eq!(JournalBlock::decode(&enc, 6), Err(JournalError::WrongSequence { expected: 6, found: 5 }));
        let mut torn = enc.clone();
        torn[2048..].fill(0);
        assert!(JournalBlock::decode(&torn, 5).is_err());
        assert_eq!(JournalBlock::decode(&[0u8; 4096], 5), Err(JournalError::BadMagic));
    }

    #[test]
    fn old_blocks_read_as_position_zero() {
        // Before commit_pos, bytes 4..8 were one u32 length.
        let mut enc = JournalBlock { seq: 7, pos: 0, records: vec![Record::BitmapSet { first: 1, count: 2 }] }.encode();
        enc[4..8].copy_from_slice(&(RECORD_LEN as u32).to_le_bytes());
        let crc = crc32fast::hash(&enc[..CRC_OFF]);
        enc[CRC_OFF..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(JournalBlock::decode(&enc, 7).unwrap().pos, 0);
    }

    /// Two commits of two blocks each (positions 0 1 0 1), then free space.
    fn two_commits() -> Vec<u8> {
        let recs: Vec<_> =
            (0..JournalBlock::CAPACITY as u64 * 2).map(|i| Record::BitmapSet { first: i, count: 1 }).collect();
        let mut region = pack(&recs, 100);
        region.extend(pack(&recs, 102));
        region.extend(vec![0u8; 4096 * 2]);
        region
    }

    #[test]
    fn a_bad_block_before_a_later_commit_is_damage() {
        let mut r = two_commits();
        r[4096 + 100] ^= 1; // block 1: the second block of the first commit
        let d = find_damage(Shape::SINGLE, &r, 100, 1).expect("damage");
        assert_eq!((d.block, d.later, d.error), (1, 2, JournalError::BadChecksum));
        let mut r = two_commits();
        r[..4096].fill(0); // block 0
        assert_eq!(find_damage(Shape::SINGLE, &r, 100, 0).map(|d| d.later), Some(2));
    }

    #[test]
    fn a_torn_last_commit_is_the_end() {
        // The second commit torn: its first block lost, its second landed.
        let mut r = two_commits();
        r[2 * 4096..3 * 4096].fill(0);
        assert_eq!(find_damage(Shape::SINGLE, &r, 100, 2), None);
        // Its second block lost: the end, too.
        let mut r = two_commits();
        r[3 * 4096..4 * 4096].fill(0);
        assert_eq!(find_damage(Shape::SINGLE, &r, 100, 3), None);
        // Within the first commit, torn with nothing after: the end.
        let mut r = two_commits();
        r[2 * 4096..].fill(0);
        r[4096..2 * 4096].fill(0);
        assert_eq!(find_damage(Shape::SINGLE, &r, 100, 1), None);
    }

    #[test]
    fn pack_fills_blocks() {
        let recs: Vec<_> = (0..700).map(|i| Record::BitmapSet { first: i, count: 1 }).collect();
        let bytes = pack(&recs, 10);
        assert_eq!(bytes.len() as u64, blocks_for(700) * 4096);
        let mut all = Vec::new();
        for (i, blk) in bytes.chunks(4096).enumerate() {
            all.extend(JournalBlock::decode(blk, 10 + i as u64).unwrap().records);
        }
        assert_eq!(all, recs);
    }
}
