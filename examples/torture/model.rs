//! What each 4 KiB block of a device's checked region may hold, and the bytes that say
//! which write put them there.
//!
//! Every sector a writer writes is a *stamp*: it names the device, the block and the
//! write (a value unique in the run), so a read tells exactly which write it sees, and
//! bytes from another block, another device or nowhere are caught as such.
//!
//! Stamp grammar (one 512-byte sector):
//! `b"FVDT" | device: u32le | block: u64le | value: u64le | fill: 488 bytes, fill[i] = value as u8 + i`.
//! A sector of zeros is the value 0 (never written, discarded or zeroed).
//!
//! Per block the model keeps `cur`, what a read may return now (one value, or several
//! after a write that failed or a crash), `durable`, what it may return after a crash
//! (exact after a completed flush) and the events since the last flush. A completed
//! flush makes every event that completed before it was issued durable.

pub const BLOCK: usize = 4096;
pub const SECTOR: usize = 512;
const MAGIC: &[u8; 4] = b"FVDT";

/// A base image's stamp value for `block`: never equal to a writer's (those count up from 1).
pub fn base_value(block: u64) -> u64 {
    (1 << 62) | block
}

/// encode: sector = MAGIC | dev u32le | block u64le | value u64le | fill
pub fn stamp(sector: &mut [u8], dev: u32, block: u64, value: u64) {
    if value == 0 {
        sector.fill(0);
        return;
    }
    sector[0..4].copy_from_slice(MAGIC);
    sector[4..8].copy_from_slice(&dev.to_le_bytes());
    sector[8..16].copy_from_slice(&block.to_le_bytes());
    sector[16..24].copy_from_slice(&value.to_le_bytes());
    for (i, b) in sector[24..].iter_mut().enumerate() {
        *b = (value as u8).wrapping_add(i as u8);
    }
}

/// Fills a whole block (8 sectors) with its stamp.
pub fn stamp_block(buf: &mut [u8], dev: u32, block: u64, value: u64) {
    for s in buf.chunks_mut(SECTOR) {
        stamp(s, dev, block, value);
    }
}

/// What one sector read says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Value(u64),
    /// A stamp of another device or block: misplaced data.
    Elsewhere {
        dev: u32,
        block: u64,
        value: u64,
    },
    /// Neither zeros nor a whole stamp: bytes nobody wrote here.
    Garbage,
}

pub fn decode(sector: &[u8], dev: u32, block: u64) -> Seen {
    if sector.iter().all(|&b| b == 0) {
        return Seen::Value(0);
    }
    if &sector[0..4] != MAGIC {
        return Seen::Garbage;
    }
    let d = u32::from_le_bytes(sector[4..8].try_into().unwrap_or_default());
    let b = u64::from_le_bytes(sector[8..16].try_into().unwrap_or_default());
    let v = u64::from_le_bytes(sector[16..24].try_into().unwrap_or_default());
    let fill_ok = sector[24..].iter().enumerate().all(|(i, &x)| x == (v as u8).wrapping_add(i as u8));
    if !fill_ok {
        return Seen::Garbage;
    }
    if d != dev || b != block {
        return Seen::Elsewhere { dev: d, block: b, value: v };
    }
    Seen::Value(v)
}

#[derive(Debug, Clone)]
enum Event {
    Wrote(u64),
    Failed(u64),
    Observed(Vec<u64>),
}

#[derive(Debug, Clone)]
pub struct Block {
    pub cur: Vec<u64>,
    durable: Vec<u64>,
    since: Vec<(u64, Event)>,
}

fn add(set: &mut Vec<u64>, v: u64) {
    if !set.contains(&v) {
        set.push(v);
    }
}

impl Block {
    fn apply(set: &mut Vec<u64>, e: &Event) {
        match e {
            Event::Wrote(v) => *set = vec![*v],
            Event::Failed(v) => add(set, *v),
            Event::Observed(vs) => *set = vs.clone(),
        }
    }
}

/// One device's checked region.
#[derive(Debug)]
pub struct Model {
    pub blocks: Vec<Block>,
    seq: u64,
    /// Requests under way, per writer thread: (block, value) each may leave behind. A
    /// power cut may catch them half done; a completed request clears its own.
    pending: Vec<Vec<(u64, u64)>>,
}

impl Model {
    pub fn new(blocks: u64, initial: impl Fn(u64) -> u64) -> Model {
        let blocks = (0..blocks)
            .map(|b| {
                let v = initial(b);
                Block { cur: vec![v], durable: vec![v], since: Vec::new() }
            })
            .collect();
        Model { blocks, seq: 0, pending: Vec::new() }
    }

    /// A model whose blocks may each hold any of `sets` (what a power cut left).
    pub fn from_sets(sets: Vec<Vec<u64>>) -> Model {
        let blocks = sets.into_iter().map(|s| Block { cur: s.clone(), durable: s, since: Vec::new() }).collect();
        Model { blocks, seq: 0, pending: Vec::new() }
    }

    /// Writer `thread` is about to send a request that may leave `value` in each of `blocks`.
    pub fn begin(&mut self, thread: usize, blocks: impl Iterator<Item = (u64, u64)>) {
        if self.pending.len() <= thread {
            self.pending.resize(thread + 1, Vec::new());
        }
        self.pending[thread].clear();
        self.pending[thread].extend(blocks);
    }

    /// Writer `thread`'s request completed (and is in the model, or changed nothing).
    pub fn end(&mut self, thread: usize) {
        if let Some(p) = self.pending.get_mut(thread) {
            p.clear();
        }
    }

    /// The power is cut now: what a crash allows, and each request under way may have
    /// reached its blocks too. Returns each block's allowed values.
    pub fn power_cut(&mut self) -> Vec<Vec<u64>> {
        self.crashed();
        for p in std::mem::take(&mut self.pending) {
            for (b, v) in p {
                let blk = &mut self.blocks[b as usize];
                add(&mut blk.cur, v);
                add(&mut blk.durable, v);
            }
        }
        self.blocks.iter().map(|b| b.cur.clone()).collect()
    }

    /// The sequence number a flush issued now covers.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// A write (or zeroes, value 0) to `block` completed: `ok` says if it succeeded.
    pub fn wrote(&mut self, block: u64, value: u64, ok: bool) {
        self.seq += 1;
        let b = &mut self.blocks[block as usize];
        let e = if ok { Event::Wrote(value) } else { Event::Failed(value) };
        Block::apply(&mut b.cur, &e);
        b.since.push((self.seq, e));
    }

    /// A write with FUA completed: durable at once (only the block's owner writes it,
    /// so every earlier event of the block is older).
    pub fn wrote_durable(&mut self, block: u64, value: u64) {
        self.seq += 1;
        let b = &mut self.blocks[block as usize];
        b.cur = vec![value];
        b.durable = vec![value];
        b.since.clear();
    }

    /// A flush issued when `seq()` was `upto` completed.
    pub fn flushed(&mut self, upto: u64) {
        for b in &mut self.blocks {
            let k = b.since.iter().take_while(|(s, _)| *s <= upto).count();
            if k == 0 {
                continue;
            }
            let mut set = b.durable.clone();
            for (_, e) in &b.since[..k] {
                Block::apply(&mut set, e);
            }
            b.durable = set;
            b.since.drain(..k);
        }
    }

    /// The daemon is about to die: until a check says otherwise, a block may hold what
    /// it held at the last flush or anything written since.
    pub fn crashed(&mut self) {
        for b in &mut self.blocks {
            let mut set = b.durable.clone();
            for (_, e) in &b.since {
                match e {
                    Event::Wrote(v) | Event::Failed(v) => add(&mut set, *v),
                    Event::Observed(vs) => vs.iter().for_each(|v| add(&mut set, *v)),
                }
            }
            b.cur.iter().for_each(|v| add(&mut set, *v));
            b.cur = set.clone();
            b.durable = set;
            b.since.clear();
        }
    }

    /// A full check read `values` (each allowed) from `block`: what it holds now.
    pub fn observed(&mut self, block: u64, values: Vec<u64>) {
        self.seq += 1;
        let b = &mut self.blocks[block as usize];
        if b.cur == values {
            return;
        }
        let e = Event::Observed(values);
        Block::apply(&mut b.cur, &e);
        b.since.push((self.seq, e));
    }
}

/// Checks one block's bytes against the values allowed: `Ok(values seen)` or what is wrong.
pub fn check_block(buf: &[u8], dev: u32, block: u64, allowed: &[u64]) -> Result<Vec<u64>, String> {
    let mut seen = Vec::new();
    for (i, s) in buf.chunks(SECTOR).enumerate() {
        match decode(s, dev, block) {
            Seen::Value(v) if allowed.contains(&v) => add(&mut seen, v),
            Seen::Value(v) => {
                return Err(format!("block {block} sector {i}: holds write {v:#x}, allowed {}", fmt_set(allowed)))
            }
            Seen::Elsewhere { dev: d, block: b, value } => {
                return Err(format!(
                    "block {block} sector {i}: holds device {d} block {b}'s write {value:#x} (misplaced), allowed {}",
                    fmt_set(allowed)
                ))
            }
            Seen::Garbage => {
                return Err(format!(
                    "block {block} sector {i}: bytes nobody wrote there ({:02x?}...), allowed {}",
                    &s[..16],
                    fmt_set(allowed)
                ))
            }
        }
    }
    Ok(seen)
}

fn fmt_set(s: &[u64]) -> String {
    let v: Vec<String> = s.iter().map(|x| format!("{x:#x}")).collect();
    format!("{{{}}}", v.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_catch_misplacement() {
        let mut b = vec![0u8; BLOCK];
        stamp_block(&mut b, 3, 17, 99);
        assert_eq!(check_block(&b, 3, 17, &[99]), Ok(vec![99]));
        assert!(check_block(&b, 3, 18, &[99]).unwrap_err().contains("misplaced"));
        assert!(check_block(&b, 3, 17, &[0]).is_err());
        b[600] ^= 1;
        assert!(check_block(&b, 3, 17, &[99]).unwrap_err().contains("nobody"));
    }

    #[test]
    fn a_flush_makes_what_completed_before_it_durable() {
        let mut m = Model::new(2, |_| 0);
        m.wrote(0, 5, true);
        let s = m.seq();
        m.wrote(0, 6, true);
        m.flushed(s);
        m.crashed();
        assert_eq!(m.blocks[0].cur, vec![5, 6]);
        m.observed(0, vec![6]);
        m.flushed(m.seq());
        m.crashed();
        assert_eq!(m.blocks[0].cur, vec![6]);
        assert_eq!(m.blocks[1].cur, vec![0]);
    }

    #[test]
    fn a_power_cut_allows_what_was_under_way() {
        let mut m = Model::new(3, |_| 0);
        m.wrote(0, 5, true);
        m.flushed(m.seq());
        m.begin(0, [(0, 7), (1, 7)].into_iter());
        m.begin(1, [(2, 9)].into_iter());
        m.end(1);
        let sets = m.power_cut();
        assert_eq!(sets, vec![vec![5, 7], vec![0, 7], vec![0]]);
        let m2 = Model::from_sets(sets);
        assert_eq!(m2.blocks[0].cur, vec![5, 7]);
    }
}
