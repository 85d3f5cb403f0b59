//! A simulated disk that keeps volatile and durable bytes apart, for crash tests.
//!
//! Writes, punches and growth land in a volatile state; `sync` makes all of it
//! durable. [`SimStorage::crash`] returns the disk as it could look after a
//! power cut, as on a real file system:
//! - the durable bytes plus an arbitrary subset of the volatile writes, chosen
//!   per 512-byte sector (a sector is the unit the device writes atomically),
//!   applied in issue order;
//! - each volatile punch kept or lost per 4096-byte block;
//! - the size: the durable size, or anything up to the current size (growth
//!   not yet synced may be lost, wholly or partly); bytes past the kept size
//!   are gone.

use super::{Storage, StorageError};
use rand::Rng;
use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

const SECTOR: usize = 512;
const PUNCH_BLOCK: usize = 4096;

#[derive(Clone)]
enum Pending {
    Write { off: u64, data: Vec<u8> },
    Punch { off: u64, len: u64 },
}

#[derive(Clone, Default)]
struct State {
    durable: Vec<u8>,
    pending: Vec<Pending>,
    /// The size as the running system sees it, and as the last sync left it.
    size: u64,
    durable_size: u64,
}

pub struct SimStorage {
    name: String,
    state: Mutex<State>,
    /// Fails `ensure_size` beyond this many bytes (simulates a full device).
    limit: u64,
    /// Counts I/O events (writes, punches, syncs) for crash-point selection.
    events: Mutex<u64>,
    /// When set, a crash image is captured before each event with this probability.
    capture: Mutex<Option<Capture>>,
    /// A power cut shared with other simulated disks (see [`PowerCut`]).
    cut: Option<std::sync::Arc<PowerCut>>,
}

/// One power cut for several simulated disks: after the given number of write,
/// punch and sync events across all of them, every further one fails with EIO
/// and changes nothing. Each disk's [`SimStorage::crash`] then gives what the
/// cut left of it: one consistent instant across the disks of a multi-file
/// operation (a commit down a chain, a snapshot).
#[derive(Debug)]
pub struct PowerCut {
    left: std::sync::atomic::AtomicI64,
}

impl PowerCut {
    /// A cut after `events` events (`i64::MAX`: never).
    pub fn after(events: i64) -> std::sync::Arc<PowerCut> {
        std::sync::Arc::new(PowerCut { left: std::sync::atomic::AtomicI64::new(events) })
    }

    /// Whether the cut has happened.
    pub fn happened(&self) -> bool {
        self.left.load(std::sync::atomic::Ordering::SeqCst) < 0
    }

    /// Events left before the cut (negative once it happened).
    pub fn left(&self) -> i64 {
        self.left.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Takes one event; false when the power is already cut.
    fn take(&self) -> bool {
        self.left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0
    }
}

struct Capture {
    rng: rand::rngs::StdRng,
    probability: f64,
    /// Each with the number of events before it (see [`SimStorage::events`]).
    images: Vec<(u64, Vec<u8>)>,
}

impl SimStorage {
    pub fn new(name: &str) -> SimStorage {
        SimStorage::from_bytes(name, Vec::new())
    }

    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> SimStorage {
        let size = bytes.len() as u64;
        SimStorage {
            name: name.to_string(),
            state: Mutex::new(State { durable: bytes, pending: Vec::new(), size, durable_size: size }),
            limit: u64::MAX,
            events: Mutex::new(0),
            capture: Mutex::new(None),
            cut: None,
        }
    }

    /// Shares a power cut with other disks (see [`PowerCut`]).
    pub fn with_power_cut(mut self, cut: std::sync::Arc<PowerCut>) -> Self {
        self.cut = Some(cut);
        self
    }

    /// Fails the event when the shared power is cut.
    fn powered(&self) -> io::Result<()> {
        match &self.cut {
            Some(c) if !c.take() => Err(io::Error::other("simulated power cut")),
            _ => Ok(()),
        }
    }

    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        *self.events.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    /// From now on, before each write, punch or sync, capture with the given
    /// probability the disk as a power cut at that instant could leave it.
    pub fn start_capture(&self, seed: u64, probability: f64) {
        use rand::SeedableRng;
        *self.capture.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Capture { rng: rand::rngs::StdRng::seed_from_u64(seed), probability, images: Vec::new() });
    }

    /// The crash images captured since the last call.
    pub fn take_captured(&self) -> Vec<Vec<u8>> {
        self.take_captured_at().into_iter().map(|(_, img)| img).collect()
    }

    /// The crash images captured since the last call, each with [`SimStorage::events`]
    /// as it was when the image was taken: every event counted by then may be in the
    /// image (or lost, if unsynced), and a sync counted by then is in it.
    pub fn take_captured_at(&self) -> Vec<(u64, Vec<u8>)> {
        let mut c = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        c.as_mut().map(|c| std::mem::take(&mut c.images)).unwrap_or_default()
    }

    fn maybe_capture(&self) {
        let mut c = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = c.as_mut() {
            if c.rng.gen_bool(c.probability) {
                let at = self.events();
                let img = self.crash(&mut c.rng);
                c.images.push((at, img));
            }
        }
    }

    /// Number of write, punch and sync events so far.
    pub fn events(&self) -> u64 {
        *self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything as the running system sees it (durable + volatile).
    pub fn current_bytes(&self) -> Vec<u8> {
        let s = self.lock();
        let mut d = s.durable.clone();
        d.resize(s.size as usize, 0);
        for p in &s.pending {
            apply::<rand::rngs::ThreadRng>(&mut d, p, None);
        }
        d
    }

    /// Only what has been made durable.
    pub fn durable_bytes(&self) -> Vec<u8> {
        let s = self.lock();
        let mut d = s.durable.clone();
        d.resize(s.durable_size as usize, 0);
        d
    }

    /// A disk image as it might be after a power cut now.
    pub fn crash<R: Rng>(&self, rng: &mut R) -> Vec<u8> {
        let s = self.lock();
        let mut d = s.durable.clone();
        d.resize(s.size as usize, 0);
        for p in &s.pending {
            apply(&mut d, p, Some(&mut *rng));
        }
        // Growth since the last sync: lost, kept, or kept in part.
        let kept = if s.size <= s.durable_size {
            s.size
        } else {
            match rng.gen_range(0..3) {
                0 => s.durable_size,
                1 => s.size,
                _ => rng.gen_range(s.durable_size..=s.size) / 4096 * 4096,
            }
        };
        d.truncate(kept as usize);
        d
    }
}

fn apply<R: Rng>(d: &mut Vec<u8>, p: &Pending, mut keep: Option<&mut R>) {
    match p {
        Pending::Write { off, data } => {
            let off = *off as usize;
            if d.len() < off + data.len() {
                d.resize(off + data.len(), 0);
            }
            let mut i = 0;
            while i < data.len() {
                // Sector boundaries in device terms.
                let end = ((off + i) / SECTOR + 1) * SECTOR - off;
                let end = end.min(data.len());
                let take = keep.as_mut().map(|r| r.gen_bool(0.5)).unwrap_or(true);
                if take {
                    d[off + i..off + end].copy_from_slice(&data[i..end]);
                }
                i = end;
            }
        }
        Pending::Punch { off, len } => {
            let start = (*off as usize).min(d.len());
            let end = ((*off + *len) as usize).min(d.len());
            let mut i = start;
            while i < end {
                // A file system frees (or fails to free) whole blocks.
                let next = ((i / PUNCH_BLOCK + 1) * PUNCH_BLOCK).min(end);
                if keep.as_mut().map(|r| r.gen_bool(0.5)).unwrap_or(true) {
                    d[i..next].fill(0);
                }
                i = next;
            }
        }
    }
}

impl Storage for SimStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.lock().size
    }

    fn ensure_size(&self, min: u64) -> Result<(), StorageError> {
        let mut s = self.lock();
        if s.size >= min {
            return Ok(());
        }
        if min > self.limit {
            return Err(StorageError::NoSpace { path: self.name.clone(), want: min, have: s.size });
        }
        s.size = min.div_ceil(1 << 20) * (1 << 20);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let s = self.lock();
        let off = off as usize;
        buf.fill(0);
        let copy = |src: &[u8], src_off: usize, buf: &mut [u8]| {
            // Overlap of [src_off, src_off+src.len()) with [off, off+buf.len()).
            let lo = src_off.max(off);
            let hi = (src_off + src.len()).min(off + buf.len());
            if lo < hi {
                buf[lo - off..hi - off].copy_from_slice(&src[lo - src_off..hi - src_off]);
            }
        };
        copy(&s.durable, 0, buf);
        for p in &s.pending {
            match p {
                Pending::Write { off: w, data } => copy(data, *w as usize, buf),
                Pending::Punch { off: p_off, len } => {
                    let lo = (*p_off as usize).max(off);
                    let hi = ((*p_off + *len) as usize).min(off + buf.len());
                    if lo < hi {
                        buf[lo - off..hi - off].fill(0);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.powered()?;
        self.maybe_capture();
        let mut s = self.lock();
        let end = off + buf.len() as u64;
        if end > s.size {
            s.size = end;
        }
        s.pending.push(Pending::Write { off, data: buf.to_vec() });
        drop(s);
        self.bump();
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.powered()?;
        self.maybe_capture();
        let mut s = self.lock();
        let pending = std::mem::take(&mut s.pending);
        let size = s.size as usize;
        let d = &mut s.durable;
        for p in &pending {
            apply::<rand::rngs::ThreadRng>(d, p, None);
        }
        d.resize(size, 0);
        s.durable_size = s.size;
        drop(s);
        self.bump();
        Ok(())
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.powered()?;
        self.maybe_capture();
        self.lock().pending.push(Pending::Punch { off, len });
        self.bump();
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    fn capacity(&self) -> Option<u64> {
        (self.limit != u64::MAX).then_some(self.limit)
    }

    /// A simulated disk has no holes: a range "has data" when it is not all zeros.
    fn has_data(&self, off: u64, len: u64) -> bool {
        let mut buf = vec![0u8; len as usize];
        self.read_at(&mut buf, off).is_ok() && buf.iter().any(|&b| b != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn unsynced_writes_may_vanish_synced_ones_never() {
        let s = SimStorage::new("t");
        s.write_at(&[1u8; 1024], 0).unwrap();
        s.sync().unwrap();
        s.write_at(&[2u8; 1024], 0).unwrap();
        let mut cur = vec![0u8; 1024];
        s.read_at(&mut cur, 0).unwrap();
        assert_eq!(cur, vec![2u8; 1024]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut saw_old = false;
        let mut saw_new = false;
        for _ in 0..64 {
            let d = s.crash(&mut rng);
            for sector in d[..1024].chunks(512) {
                assert!(sector.iter().all(|&b| b == sector[0]), "torn inside a sector");
                saw_old |= sector[0] == 1;
                saw_new |= sector[0] == 2;
            }
        }
        assert!(saw_old && saw_new);
        assert_eq!(s.durable_bytes()[..1024], [1u8; 1024]);
    }
}
