//! The persist view: what the journal and the next checkpoint write.
//!
//! Updates are merged here between commits: many writes into one chunk give one
//! table record, neighbouring copied blocks give one bitmap run.

use super::Table;
use crate::format::{BitmapBits, Record};
use crate::units::{ChunkIdx, PhysChunk};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

struct Inner {
    table: Vec<u32>,
    bitmap: BitmapBits,
    dirty_chunks: BTreeMap<u32, ()>,
    /// Bitmap word index -> bits newly set since the last commit.
    new_bits: BTreeMap<u64, u64>,
    /// Chunks freed since the last commit: reusable once that commit is
    /// durable and no request is in flight in their old guest chunk.
    freed: Vec<FreedChunk>,
    /// Every update in order, for the volatile log (None when it is off),
    /// until the log takes them: only under its own lock, which it holds
    /// until they are written (see [`crate::image::volatile::VolatileLog`]).
    volatile: Option<Vec<Record>>,
    /// When the oldest update not yet taken by a commit was made.
    pending_since: Option<std::time::Instant>,
}

pub struct Persist {
    inner: Mutex<Inner>,
    /// Updates made so far (table entries set or cleared, bits set), each
    /// counted under the lock before anyone can see it: the volatile log
    /// compares it with what it has written (`VolatileLog::covers`).
    updates: std::sync::atomic::AtomicU64,
    /// Bitmap bits newly recorded since open (each one a metadata update).
    bits_recorded: std::sync::atomic::AtomicU64,
}

/// A physical chunk a discard took from guest chunk `vchunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedChunk {
    pub phys: PhysChunk,
    pub vchunk: ChunkIdx,
}

/// What one commit writes.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    pub freed: Vec<FreedChunk>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.freed.is_empty()
    }
}

/// The whole persist view, for a checkpoint.
pub struct Snapshot {
    pub table: Vec<u32>,
    pub bitmap: BitmapBits,
}

impl Persist {
    pub fn new(table: Vec<u32>, bitmap: BitmapBits) -> Persist {
        Persist {
            inner: Mutex::new(Inner {
                table,
                bitmap,
                dirty_chunks: BTreeMap::new(),
                new_bits: BTreeMap::new(),
                freed: Vec::new(),
                volatile: None,
                pending_since: None,
            }),
            bits_recorded: std::sync::atomic::AtomicU64::new(0),
            updates: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Bytes of memory its copies of the table and bitmap hold.
    pub fn memory_bytes(&self) -> u64 {
        let i = self.lock();
        i.table.len() as u64 * 4 + i.bitmap.as_raw_slice().len() as u64 * 8
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps guest chunk `c` to `p` in the live table if `c` is unmapped, and
    /// records it here, both under this view's lock: the two change in the
    /// same order for every chunk, whatever the threads. Returns the chunk
    /// that won when another request mapped `c` first.
    pub fn install(&self, table: &Table, c: ChunkIdx, p: PhysChunk) -> Result<(), PhysChunk> {
        let mut s = self.lock();
        self.count_update();
        table.install(c, p)?;
        set_entry_locked(&mut s, c.0, Some(p));
        Ok(())
    }

    /// Unmaps guest chunk `c` in the live table if it still maps to `p`, and
    /// records the free (see [`Persist::install`]). Returns whether it did.
    pub fn unmap(&self, table: &Table, c: ChunkIdx, p: PhysChunk) -> bool {
        let mut s = self.lock();
        self.count_update();
        if !table.clear_if(c, p) {
            return false;
        }
        set_entry_locked(&mut s, c.0, None);
        true
    }

    /// Records that guest chunk `vchunk` now maps to `p` (None: freed).
    #[cfg(test)]
    fn set_entry(&self, vchunk: u64, p: Option<PhysChunk>) {
        let mut s = self.lock();
        self.count_update();
        set_entry_locked(&mut s, vchunk, p);
    }

    /// Counts an update, under the lock, before it is visible: a reader
    /// that sees its effect (a table entry, a live bit) then reads a count
    /// that includes it. A count without an update (a lost race) is harmless.
    fn count_update(&self) {
        self.updates.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Updates made so far (see the field).
    pub fn updates(&self) -> u64 {
        self.updates.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records that bits `first..first+count` are set.
    pub fn set_bits(&self, first: u64, count: u64) {
        let mut s = self.lock();
        self.count_update();
        if let Some(vl) = s.volatile.as_mut() {
            let mut f = first;
            while f < first + count {
                let n = (first + count - f).min(u32::MAX as u64);
                vl.push(Record::BitmapSet { first: f, count: n as u32 });
                f += n;
            }
        }
        // Word by word, to note which bits are new (the next batch's runs).
        let end = first.saturating_add(count).min(s.bitmap.len() as u64);
        for (w, mask) in super::bitmap::word_masks(first, end) {
            if let Some(word) = s.bitmap.as_raw_mut_slice().get_mut(w) {
                let fresh = mask & !*word;
                *word |= mask;
                self.bits_recorded.fetch_add(fresh.count_ones() as u64, std::sync::atomic::Ordering::Relaxed);
                if fresh != 0 {
                    *s.new_bits.entry(w as u64).or_insert(0) |= fresh;
                    s.pending_since.get_or_insert_with(std::time::Instant::now);
                }
            }
        }
    }

    /// Takes the merged updates since the last commit.
    pub fn take_batch(&self) -> Batch {
        let mut s = self.lock();
        take_batch_locked(&mut s)
    }

    /// Takes the batch and a full snapshot at the same instant (checkpoint).
    pub fn take_snapshot(&self) -> (Batch, Snapshot) {
        let mut s = self.lock();
        let batch = take_batch_locked(&mut s);
        let snap = Snapshot { table: s.table.clone(), bitmap: s.bitmap.clone() };
        (batch, snap)
    }

    /// [`Persist::take_snapshot`] and [`Persist::take_volatile`] at the same
    /// instant: the records are the updates made before the snapshot that the
    /// volatile log has not taken yet, and every later update comes after it.
    pub(crate) fn take_snapshot_and_volatile(&self) -> (Batch, Snapshot, Vec<Record>) {
        let mut s = self.lock();
        let batch = take_batch_locked(&mut s);
        let snap = Snapshot { table: s.table.clone(), bitmap: s.bitmap.clone() };
        let recs = s.volatile.as_mut().map(std::mem::take).unwrap_or_default();
        (batch, snap, recs)
    }

    /// [`Persist::take_batch`] and [`Persist::take_volatile`] at the same
    /// instant (a journal commit with a volatile log).
    pub(crate) fn take_batch_and_volatile(&self) -> (Batch, Vec<Record>) {
        let mut s = self.lock();
        let batch = take_batch_locked(&mut s);
        let recs = s.volatile.as_mut().map(std::mem::take).unwrap_or_default();
        (batch, recs)
    }

    /// Gives back freed chunks a commit could not release yet (a request was
    /// still in flight in their old guest chunk): the next commit tries again.
    pub fn carry_freed(&self, chunks: Vec<FreedChunk>) {
        self.lock().freed.extend(chunks);
    }

    /// Whether chunks freed since the last commit wait for it.
    pub fn has_freed(&self) -> bool {
        !self.lock().freed.is_empty()
    }

    /// Starts keeping every update for the volatile log.
    pub fn enable_volatile(&self) {
        self.lock().volatile.get_or_insert_with(Vec::new);
    }

    /// The updates the volatile log has not taken yet, in order. Only the log
    /// calls this, under its lock (see its rules).
    pub(crate) fn take_volatile(&self) -> Vec<Record> {
        self.lock().volatile.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Puts back records taken for the volatile log that it could not write,
    /// in front of the updates made since: the next take returns them first,
    /// in the order they were made.
    pub(crate) fn give_back_volatile(&self, mut recs: Vec<Record>) {
        let mut s = self.lock();
        if let Some(vl) = s.volatile.as_mut() {
            recs.append(vl);
            *vl = recs;
        }
    }

    /// Bitmap bits newly recorded since open.
    pub fn bits_recorded(&self) -> u64 {
        self.bits_recorded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long the oldest update waiting for a commit has waited.
    pub fn pending_age(&self) -> Option<std::time::Duration> {
        let s = self.lock();
        let waiting = !s.dirty_chunks.is_empty() || !s.new_bits.is_empty();
        s.pending_since.filter(|_| waiting).map(|t| t.elapsed())
    }

    /// Records waiting to be committed (for stats).
    pub fn pending(&self) -> usize {
        let s = self.lock();
        s.dirty_chunks.len() + s.new_bits.len()
    }
}

/// Records that guest chunk `vchunk` now maps to `p` (None: freed).
fn set_entry_locked(s: &mut Inner, vchunk: u64, p: Option<PhysChunk>) {
    let v = vchunk as usize;
    let Some(old) = s.table.get(v).copied() else { return };
    if old != 0 && p.is_none() {
        s.freed.push(FreedChunk { phys: PhysChunk(old - 1), vchunk: ChunkIdx(vchunk) });
    }
    let entry = p.map(|p| p.0 + 1).unwrap_or(0);
    s.table[v] = entry;
    s.dirty_chunks.insert(vchunk as u32, ());
    s.pending_since.get_or_insert_with(std::time::Instant::now);
    if let Some(vl) = s.volatile.as_mut() {
        vl.push(Record::TableSet { vchunk: vchunk as u32, entry });
    }
}

fn take_batch_locked(s: &mut Inner) -> Batch {
    s.pending_since = None;
    let mut records = Vec::new();
    for (&v, _) in std::mem::take(&mut s.dirty_chunks).iter() {
        records.push(Record::TableSet { vchunk: v, entry: s.table[v as usize] });
    }
    // Turn new bits into runs, merging across word boundaries.
    let mut run: Option<(u64, u64)> = None;
    for (&w, &bits) in std::mem::take(&mut s.new_bits).iter() {
        let mut m = bits;
        while m != 0 {
            let lo = m.trailing_zeros() as u64;
            let len = (!(m >> lo)).trailing_zeros() as u64;
            let first = w * 64 + lo;
            run = match run {
                Some((f, n)) if f + n == first && n + len <= u32::MAX as u64 => Some((f, n + len)),
                Some((f, n)) => {
                    records.push(Record::BitmapSet { first: f, count: n as u32 });
                    Some((first, len))
                }
                None => Some((first, len)),
            };
            m &= if lo + len >= 64 { 0 } else { !((1u64 << (lo + len)) - 1) };
        }
    }
    if let Some((f, n)) = run {
        records.push(Record::BitmapSet { first: f, count: n as u32 });
    }
    Batch { records, freed: std::mem::take(&mut s.freed) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_merge_into_runs() {
        let p = Persist::new(vec![0; 4], BitmapBits::repeat(false, 256));
        p.set_bits(60, 10);
        p.set_bits(70, 2);
        p.set_bits(100, 1);
        p.set_bits(64, 3); // already set: no new record
        let b = p.take_batch();
        assert_eq!(
            b.records,
            vec![Record::BitmapSet { first: 60, count: 12 }, Record::BitmapSet { first: 100, count: 1 }]
        );
        assert!(p.take_batch().is_empty());
    }

    #[test]
    fn volatile_records_given_back_come_first() {
        let p = Persist::new(vec![0; 4], BitmapBits::repeat(false, 64));
        p.enable_volatile();
        p.set_entry(1, Some(PhysChunk(0)));
        let taken = p.take_volatile();
        p.set_bits(3, 1);
        p.give_back_volatile(taken);
        let (_, snap, recs) = p.take_snapshot_and_volatile();
        assert_eq!(recs, vec![Record::TableSet { vchunk: 1, entry: 1 }, Record::BitmapSet { first: 3, count: 1 }]);
        assert_eq!((snap.table[1], snap.bitmap.as_raw_slice()[0]), (1, 1 << 3));
        assert!(p.take_volatile().is_empty());
    }

    #[test]
    fn table_updates_merge_and_free_is_tracked() {
        let p = Persist::new(vec![0; 4], BitmapBits::new());
        p.set_entry(2, Some(PhysChunk(0)));
        p.set_entry(2, Some(PhysChunk(0)));
        p.set_entry(1, Some(PhysChunk(1)));
        let b = p.take_batch();
        assert_eq!(b.records.len(), 2);
        p.set_entry(2, None);
        let b = p.take_batch();
        assert_eq!(b.records, vec![Record::TableSet { vchunk: 2, entry: 0 }]);
        assert_eq!(b.freed, vec![FreedChunk { phys: PhysChunk(0), vchunk: ChunkIdx(2) }]);
    }
}
