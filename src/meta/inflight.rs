//! Requests in flight per guest chunk, so that a chunk a discard frees is not
//! handed to another guest chunk while a request that looked up the old
//! mapping still reads or writes it (crash rule 3 also holds at run time: a
//! read never returns another offset's data, a late write never lands in
//! another offset's chunk).
//!
//! A request enters its guest chunks before it plans (reads the table) and
//! leaves when its I/O is done. A discard clears the table entry first, and
//! the freed physical chunk returns to the allocator only after a commit and
//! only once no request is in its old guest chunk. Counters are striped (a
//! fixed number shared by all chunks), so a busy neighbour can only delay the
//! reuse, never allow it early.
//!
//! Ordering: enter = counter increment, then a SeqCst fence, then the table
//! read; free = table clear, then (later) a SeqCst fence, then the counter
//! read. Either the request reads the cleared entry, or the check sees it.

use crate::units::ChunkIdx;
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// Stripes: 16 KiB of counters, whatever the disk's size.
const STRIPES: u64 = 4096;

pub struct Inflight {
    stripes: Box<[AtomicU32]>,
}

impl Default for Inflight {
    fn default() -> Self {
        Inflight { stripes: (0..STRIPES).map(|_| AtomicU32::new(0)).collect() }
    }
}

/// Held while a request's I/O on chunks `[first, end)` is in flight.
pub struct InflightGuard<'a> {
    inflight: &'a Inflight,
    first: u64,
    end: u64,
}

/// The same hold as an [`InflightGuard`], kept where a borrow can't be (a
/// request on a queue's fast path, whose I/O is in flight between two calls
/// from the queue loop): it must be given back with [`Inflight::leave`]. Not
/// Clone or Copy, so it is given back at most once; dropped without being
/// given back, it keeps the chunk from reuse (never early reuse).
#[derive(Debug)]
#[must_use = "a ticket not given back holds its chunks until the image is closed"]
pub struct InflightTicket {
    first: u64,
    end: u64,
}

impl Inflight {
    /// As [`Inflight::enter`], for a hold given back with [`Inflight::leave`].
    pub fn enter_ticket(&self, first: ChunkIdx, end: ChunkIdx) -> InflightTicket {
        let g = self.enter(first, end);
        let t = InflightTicket { first: g.first, end: g.end };
        std::mem::forget(g);
        t
    }

    /// Gives back the hold of `t`.
    pub fn leave(&self, t: InflightTicket) {
        drop(InflightGuard { inflight: self, first: t.first, end: t.end });
    }

    /// The stripes of chunks `[first, end)`, each once.
    fn stripes_of(first: u64, end: u64) -> impl Iterator<Item = usize> {
        let (first, end) = if end - first >= STRIPES { (0, STRIPES) } else { (first, end) };
        (first..end).map(|c| (c % STRIPES) as usize)
    }

    /// Enters guest chunks `[first, end)`; plan the request after this.
    pub fn enter(&self, first: ChunkIdx, end: ChunkIdx) -> InflightGuard<'_> {
        let end = end.0.max(first.0);
        for s in Self::stripes_of(first.0, end) {
            self.stripes[s].fetch_add(1, Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
        InflightGuard { inflight: self, first: first.0, end }
    }

    /// Whether no request that entered guest chunk `c` is still in flight.
    pub fn is_idle(&self, c: ChunkIdx) -> bool {
        fence(Ordering::SeqCst);
        self.stripes[(c.0 % STRIPES) as usize].load(Ordering::SeqCst) == 0
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        for s in Inflight::stripes_of(self.first, self.end) {
            self.inflight.stripes[s].fetch_sub(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_and_release() {
        let f = Inflight::default();
        let a = f.enter(ChunkIdx(3), ChunkIdx(5));
        assert!(!f.is_idle(ChunkIdx(3)) && !f.is_idle(ChunkIdx(4)));
        assert!(f.is_idle(ChunkIdx(5)) && f.is_idle(ChunkIdx(2)));
        // Shares chunk 3's stripe: conservative, never early.
        assert!(!f.is_idle(ChunkIdx(3 + STRIPES)));
        let b = f.enter(ChunkIdx(4), ChunkIdx(5));
        drop(a);
        assert!(f.is_idle(ChunkIdx(3)) && !f.is_idle(ChunkIdx(4)));
        drop(b);
        assert!(f.is_idle(ChunkIdx(4)));
    }

    #[test]
    fn tickets_hold_like_guards() {
        let f = Inflight::default();
        let t = f.enter_ticket(ChunkIdx(3), ChunkIdx(5));
        assert!(!f.is_idle(ChunkIdx(3)) && !f.is_idle(ChunkIdx(4)) && f.is_idle(ChunkIdx(5)));
        f.leave(t);
        assert!(f.is_idle(ChunkIdx(3)) && f.is_idle(ChunkIdx(4)));
    }

    #[test]
    fn huge_ranges_take_each_stripe_once() {
        let f = Inflight::default();
        let g = f.enter(ChunkIdx(10), ChunkIdx(10 + 3 * STRIPES));
        assert!((0..STRIPES).all(|c| !f.is_idle(ChunkIdx(c))));
        assert_eq!(f.stripes[0].load(Ordering::SeqCst), 1);
        drop(g);
        assert!((0..STRIPES).all(|c| f.is_idle(ChunkIdx(c))));
        let _empty = f.enter(ChunkIdx(7), ChunkIdx(7));
        assert!(f.is_idle(ChunkIdx(7)));
    }
}
