//! An image directly on an LVM logical volume (linear or thin), grown
//! automatically through lvm2 as the image allocates chunks.
//!
//! # How growth works
//!
//! Allocation asks for space through [`Storage::ensure_size`] (the one place,
//! see `Image::try_allocate_range`) before it records a chunk. Here that call
//! only notes how far the image uses the LV (`used`) and returns at once when
//! the space exists. A background thread (`fvd-lv-grow`, never an I/O thread)
//! keeps between one and two grow units free past `used` (see
//! [`super::lvm::policy`]): when less than one unit is free it runs
//! `lvextend --size <bytes>b VG/LV`, confirms the new size from the block
//! device itself (BLKGETSIZE64 on the open descriptor), makes the new space
//! read as zeros when the LV does not guarantee it (a linear LV's new extents
//! hold whatever the disk held; a thin LV's read as zeros), and only then
//! publishes the new size.
//!
//! A write that needs space that is not there yet waits (on a condition
//! variable) for that growth. When the volume group cannot give a whole unit,
//! the growth falls back to the least size that holds what the write needs;
//! when it cannot give even that, the waiting writes fail with ENOSPC
//! ([`StorageError::NoSpace`]) and so do new ones for a second; everything
//! else (reads, overwrites, writes into allocated chunks) goes on. The grower
//! retries on the next need after that second, and in the background with a
//! back-off, so writing resumes by itself once the administrator adds space
//! (`vgextend`, or `lvextend` of a thin pool).
//!
//! # Crash safety
//!
//! Growth only ever extends the LV, and the engine records a chunk only after
//! `ensure_size` returned, so a crash at any point of a growth leaves an image
//! whose table names only space that existed; recovery punches everything past
//! the highest used chunk, which also covers new space whose zeroing was cut
//! short. `lvextend` runs with an absolute size, so a retry never grows twice.
//!
//! # Status
//!
//! [`Storage::status`] gives the LV, the sizes, the growth and wait counters,
//! the ENOSPC condition and (thin LVs) the pool's data usage. A writable
//! instance also publishes it in `<run dir>/lv/<dm name>.json` (the run dir
//! is $FVD_RUN_DIR or /run/fvd), so that `fvd info` in another process shows
//! the serving daemon's counters ([`published_status`]).
//!
//! # Files
//!
//! `volume`: the LV and lvm2's facts about it; `shared`: the state writers
//! and the grower share; `wait`: a write waiting for space; `grower`: the
//! growth thread; `growth`: one growth and the zeroing of new space;
//! `reduce`: giving back what a frozen or closed image does not use;
//! `status`: the status and its publication.

#[cfg(test)]
mod fake;
mod grower;
mod growth;
mod reduce;
mod shared;
mod status;
mod volume;
mod wait;

pub use grower::MAX_BACKOFF;
pub use status::published_status;
pub use volume::{LvmVolume, Volume, VolumeReport};
pub use wait::{GROWTH_WAIT_MAX, HARD_RETRY};

use super::file::FileStorage;
use super::lvm::policy::{self, Growth, Policy};
use super::lvm::LvName;
use super::{blockdev, GaveBack, Slack, Storage, StorageError};
use serde_json::Value;
use shared::{Shared, State};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Image storage on an LVM logical volume.
pub struct LvStorage {
    inner: FileStorage,
    sh: Arc<Shared>,
    grower: Option<JoinHandle<()>>,
    /// The LV's tag `fvd-keep-slack`: a stop leaves its size alone.
    keep_slack: bool,
}

/// How an [`LvStorage`] is set up.
#[derive(Debug, Clone)]
pub struct LvOptions {
    pub writable: bool,
    /// Grow unit from the caller; else $FVD_GROW_UNIT, the LV's
    /// `fvd-grow-unit=SIZE` tag, or 1 GiB.
    pub grow_unit: Option<u64>,
    /// Publish the status in the run dir (the real daemon and tools).
    pub publish: bool,
    /// How far the LV grows: ahead of need for the serving daemon; in steps
    /// for the one-shot commands (room for what they write), exactly for
    /// `fvd create` (room for the metadata); those should not take a volume
    /// group's free space ahead.
    pub growth: Growth,
    pub hard_retry: Duration,
}

impl Default for LvOptions {
    fn default() -> Self {
        LvOptions { writable: true, grow_unit: None, publish: true, growth: Growth::Ahead, hard_retry: HARD_RETRY }
    }
}

impl LvStorage {
    /// Storage on the LV behind `inner` (an open block device), or `Ok(None)`
    /// when that device is not an LVM logical volume.
    pub fn detect(inner: FileStorage, o: &LvOptions) -> Result<Result<LvStorage, FileStorage>, StorageError> {
        let fd = match inner.raw_fd() {
            Some(fd) if inner.is_block_device() => fd,
            _ => return Ok(Err(inner)),
        };
        let name = inner.name().to_string();
        match LvmVolume::identify(fd) {
            Ok(None) => Ok(Err(inner)),
            Ok(Some((vol, rep))) => {
                let tag = rep.grow_unit_tag();
                let env = std::env::var("FVD_GROW_UNIT").ok();
                let (unit, from) = policy::choose_unit(o.grow_unit, env.as_deref(), tag)
                    .map_err(|e| StorageError::Open { path: name.clone(), source: io::Error::other(e) })?;
                if !rep.is_active() {
                    tracing::warn!(lv = %vol.lv(), "the LV is not marked active");
                }
                let o = LvOptions { grow_unit: Some(unit), ..o.clone() };
                let mut s = LvStorage::with_volume(inner, Box::new(vol), rep.extent_size, &o, from)?;
                s.keep_slack = rep.keeps_slack();
                Ok(Ok(s))
            }
            Err(e) => {
                // Served at its current size, like any block device.
                tracing::warn!(
                    device = %name,
                    error = %e,
                    "the device is an LVM logical volume but lvm2 could not describe it: it will not grow"
                );
                Ok(Err(inner))
            }
        }
    }

    /// Storage on `inner` with `vol` as its volume (tests pass a stand-in).
    pub fn with_volume(
        inner: FileStorage,
        vol: Box<dyn Volume>,
        extent: u64,
        o: &LvOptions,
        unit_from: &'static str,
    ) -> Result<LvStorage, StorageError> {
        let path = inner.name().to_string();
        let size = vol.device_size().map_err(|source| StorageError::Open { path: path.clone(), source })?;
        let policy = Policy::new(o.grow_unit.unwrap_or(policy::DEFAULT_GROW_UNIT), extent);
        let status_file = (o.writable && o.publish).then(|| status::status_path(vol.lv()));
        let sh = Arc::new(Shared {
            path,
            vol,
            policy: Mutex::new(policy),
            unit_from,
            initial: size,
            size: AtomicU64::new(size),
            st: Mutex::new(State { backoff: Duration::from_secs(1), ..Default::default() }),
            work: Condvar::new(),
            done: Condvar::new(),
            hard_retry: o.hard_retry,
            growth: o.growth,
            status_file,
        });
        let grower = if o.writable {
            let g = sh.clone();
            let h = std::thread::Builder::new()
                .name("fvd-lv-grow".into())
                .spawn(move || g.run_grower())
                .map_err(|source| StorageError::Open { path: sh.path.clone(), source })?;
            Some(h)
        } else {
            None
        };
        tracing::info!(
            device = %sh.path,
            lv = %sh.vol.lv(),
            kind = if sh.vol.is_thin() { "thin" } else { "linear" },
            size,
            grow_unit = sh.policy().unit,
            grow_unit_from = unit_from,
            zeroing = %sh.vol.zero_method(),
            "image storage on an LVM logical volume"
        );
        let s = LvStorage { inner, sh, grower, keep_slack: false };
        s.sh.publish();
        Ok(s)
    }

    pub fn policy(&self) -> Policy {
        self.sh.policy()
    }

    pub fn lv(&self) -> &LvName {
        self.sh.vol.lv()
    }

    /// Waits until the grower has nothing left to do (tests, benchmarks).
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            {
                let st = self.sh.lock();
                let size = self.sh.size();
                let pending = st.growing
                    || st.used > size
                    || (self.sh.growth == Growth::Ahead
                        && !st.reduced
                        && st.failure.is_none()
                        && self.sh.policy().wants_growth(size, st.used)
                        && st.used > 0);
                if !pending {
                    return true;
                }
            }
            if t0.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for LvStorage {
    fn drop(&mut self) {
        self.sh.lock().stop = true;
        self.sh.work.notify_all();
        self.sh.done.notify_all();
        if let Some(h) = self.grower.take() {
            let _ = h.join();
        }
        if let Some(p) = &self.sh.status_file {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Storage for LvStorage {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn set_size_limit(&self, max: u64) {
        let bound_unit = self.sh.unit_from == policy::FROM_DEFAULT;
        let p = {
            let mut g = self.sh.policy.lock().unwrap_or_else(|p| p.into_inner());
            *g = g.bounded(max, bound_unit);
            *g
        };
        tracing::debug!(lv = %self.sh.vol.lv(), limit = max, grow_unit = p.unit, "growth bounded by the image's size");
        // The grower may be waiting on the old policy.
        self.sh.work.notify_all();
    }

    fn size(&self) -> u64 {
        self.sh.size()
    }

    fn ensure_size(&self, min: u64) -> Result<(), StorageError> {
        self.sh.ensure(min, self.grower.is_some())
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.sh.vol.zero(off, len)
    }

    fn sync_punch(&self) -> bool {
        true
    }

    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }

    /// A linear LV occupies its whole size; a thin LV what the pool maps for it.
    fn allocated_bytes(&self) -> Option<u64> {
        if !self.sh.vol.is_thin() {
            return Some(self.size());
        }
        let r = self.sh.vol.report().ok()?;
        r.lv_data_percent.map(|p| (r.lv_size as f64 * p / 100.0) as u64)
    }

    /// See [`blockdev::has_nonzero`].
    fn has_data(&self, off: u64, len: u64) -> bool {
        blockdev::has_nonzero(&self.inner, off, len)
    }

    fn status(&self) -> Option<Value> {
        Some(self.sh.status(self.grower.is_some()))
    }

    fn give_back(&self, keep: u64, why: Slack) -> Result<Option<GaveBack>, StorageError> {
        if why == Slack::Stopped && self.keep_slack {
            return Ok(None);
        }
        self.reduce(keep)
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{rig, M};
    use super::*;
    use crate::storage::OpenMode;

    #[test]
    fn read_only_never_grows() {
        let r = rig(8 * M, 1 << 30);
        let inner = FileStorage::open(&r.path, OpenMode::ReadOnly).unwrap();
        let vol = r.volume(false, Duration::ZERO, false);
        let o = LvOptions { writable: false, grow_unit: Some(4 * M), publish: false, ..Default::default() };
        let s = LvStorage::with_volume(inner, Box::new(vol), M, &o, "test").unwrap();
        s.ensure_size(8 * M).unwrap();
        assert!(matches!(s.ensure_size(9 * M), Err(StorageError::NoSpace { .. })));
        assert!(r.extends.lock().unwrap().is_empty());
    }

    /// Issue 26: a 2 GiB image on an LV with the default 1 GiB unit became as large as
    /// the whole disk on its first 8 MiB. Bounded by the image's size, the daemon keeps
    /// at most a quarter of the disk ahead, and never grows past what the image can need.
    #[test]
    fn the_default_unit_is_bounded_by_the_image() {
        let r = rig(20 * M, 8 << 30);
        let inner = FileStorage::open(&r.path, OpenMode::ReadWrite).unwrap();
        let vol = r.volume(true, Duration::ZERO, false);
        let o = LvOptions { publish: false, ..Default::default() };
        let s = LvStorage::with_volume(inner, Box::new(vol), 4 * M, &o, policy::FROM_DEFAULT).unwrap();
        s.set_size_limit(2068 * M);
        s.ensure_size(28 * M).unwrap();
        assert!(s.wait_idle(Duration::from_secs(5)));
        assert!(s.size() >= 28 * M + 256 * M, "a unit ahead: {}", s.size());
        assert!(s.size() <= 28 * M + 512 * M, "at most a quarter of the 2 GiB disk ahead: {} MiB", s.size() / M);
        s.ensure_size(2060 * M).unwrap();
        assert!(s.wait_idle(Duration::from_secs(5)));
        assert_eq!(s.size(), 2068 * M, "never past what the image can need");
        // A unit someone chose is kept (the cap still holds).
        let r = rig(20 * M, 8 << 30);
        let inner = FileStorage::open(&r.path, OpenMode::ReadWrite).unwrap();
        let vol = r.volume(true, Duration::ZERO, false);
        let o = LvOptions { publish: false, grow_unit: Some(1 << 30), ..Default::default() };
        let s = LvStorage::with_volume(inner, Box::new(vol), 4 * M, &o, "FVD_GROW_UNIT").unwrap();
        s.set_size_limit(2068 * M);
        s.ensure_size(28 * M).unwrap();
        assert!(s.wait_idle(Duration::from_secs(5)));
        assert_eq!(s.size(), 2068 * M, "one to two chosen units ahead, up to the cap: {} MiB", s.size() / M);
        assert_eq!(s.policy().unit, 1 << 30);
    }

    /// A one-shot command (no growth ahead) grows by about what it writes, a
    /// step at a time, and leaves the rest of the volume group alone; the
    /// daemon's storage grows by whole units ahead.
    #[test]
    fn without_growth_ahead_an_lv_grows_by_steps() {
        let r = rig(8 * M, 4 << 30);
        let inner = FileStorage::open(&r.path, OpenMode::ReadWrite).unwrap();
        let vol = r.volume(true, Duration::ZERO, false);
        let o = LvOptions { grow_unit: Some(1 << 30), publish: false, growth: Growth::Steps, ..Default::default() };
        let s = LvStorage::with_volume(inner, Box::new(vol), M, &o, "test").unwrap();
        s.ensure_size(9 * M).unwrap();
        assert_eq!(s.size(), 8 * M + policy::STEP, "one step past the size, not a 1 GiB unit");
        s.ensure_size(200 * M).unwrap();
        assert_eq!(s.size(), 200 * M, "a need past one step: exactly the need (whole extents)");
        assert_eq!(r.extends.lock().unwrap().len(), 2);
        assert_eq!(*r.vg_free.lock().unwrap(), (4 << 30) - 192 * M);
        let ahead = rig(8 * M, 4 << 30);
        let s = ahead.open(1 << 30, Duration::ZERO, false);
        s.ensure_size(9 * M).unwrap();
        assert!(s.size() >= 9 * M + (1 << 30), "the daemon's storage keeps a whole unit ahead: {}", s.size());
    }

    #[test]
    fn punch_and_has_data() {
        let r = rig(8 * M, 0);
        let s = r.open(4 * M, Duration::ZERO, false);
        assert!(s.sync_punch());
        s.write_at(&[7u8; 4096], 2 * M).unwrap();
        assert!(s.has_data(2 * M, M));
        assert!(!s.has_data(3 * M, M));
        s.punch(2 * M, M).unwrap();
        assert!(!s.has_data(2 * M, M));
        let mut b = [1u8; 16];
        s.read_at(&mut b, 2 * M).unwrap();
        assert_eq!(b, [0u8; 16]);
        assert!(s.has_data(0, 16 * M), "large ranges are not read");
    }

    /// Issue 26: an image closed (or frozen) gives back its slack, grows again when
    /// written, and all of it through crashes: write, close, reduce, write more, crash
    /// with the writes unflushed, recover, reduce, crash again right after a reduce,
    /// and so on. Every flushed write reads back, the rest reads as written or zeros,
    /// never anything else, and the image checks clean each time.
    #[test]
    fn reduce_then_grow_through_crashes() {
        use crate::format::{layout::CreateParams, BaseFormat, Geometry};
        use crate::image::{create_on, CreateOptions, Image, OpenOptions};
        use crate::storage::Slack;
        let r = rig(4 * M, 1 << 30);
        let unit = 8 * M;
        let d = CreateOptions::default();
        let geo = Geometry::new(&CreateParams {
            virtual_size: 256 * M,
            block_size: d.block_size,
            chunk_size: Some(M as u32),
            base_size: 0,
            journal_len: d.journal_size,
        })
        .unwrap();
        create_on(&r.open(unit, Duration::ZERO, false), &geo, "", BaseFormat::None).unwrap();
        let ring = crate::io::uring::Uring::new(64).unwrap();
        // A kill: the LV holds what the image wrote so far, and nothing of a close.
        let crash = |img: Image| {
            let held = r.path.with_extension("crash");
            std::fs::copy(&r.path, &held).unwrap();
            drop(img);
            std::fs::copy(&held, &r.path).unwrap();
        };
        // What each 1 MiB of the disk must read: Some(v) = flushed; pending: written, unflushed.
        let mut model: Vec<Option<u8>> = vec![None; 256];
        let mut rng = 0x2612_u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..6u8 {
            let s = r.open(unit, Duration::ZERO, false);
            let img =
                Image::open_on(&r.path, Box::new(s), None, &OpenOptions { grow_ahead: true, ..Default::default() })
                    .unwrap();
            // Everything flushed reads back; then the model is exact again.
            for (i, m) in model.iter().enumerate() {
                let mut b = crate::io::AlignedBuf::zeroed(4096);
                ring.block_on(img.read(&ring, i as u64 * M, &mut b)).unwrap().unwrap();
                assert!(b.iter().all(|&x| x == m.unwrap_or(0)), "round {round} MiB {i}: {} not {m:?}", b[0]);
            }
            // Flushed writes, then a discard of a whole chunk (it frees one).
            for _ in 0..12 {
                let i = (next() % 200) as usize;
                let v = 1 + (next() % 250) as u8;
                let buf = crate::io::AlignedBuf::from_slice(&vec![v; M as usize]);
                ring.block_on(img.write(&ring, i as u64 * M, &buf, false)).unwrap().unwrap();
                model[i] = Some(v);
            }
            let gone = (next() % 200) as usize;
            ring.block_on(img.discard(&ring, gone as u64 * M, M)).unwrap().unwrap();
            model[gone] = None;
            ring.block_on(img.flush(&ring)).unwrap().unwrap();
            let before = img.storage().size();
            if round % 2 == 0 {
                // A clean stop: closed, then its slack goes; sometimes a crash right after.
                img.close().unwrap();
                let g = img.give_back_slack(Slack::Stopped).unwrap();
                let used = img.used_end().unwrap();
                let g = g.expect("a linear LV grown ahead has slack");
                assert_eq!((g.from, g.to), (before, used), "reduced to the used end (1 MiB extents)");
                assert_eq!(std::fs::metadata(&r.path).unwrap().len(), used);
                if round % 4 == 0 {
                    crash(img); // right after the reduce
                } else {
                    drop(img);
                }
            } else {
                // Writes in flight at a crash: unflushed, each may or may not be there.
                for _ in 0..4 {
                    let i = 200 + (next() % 56) as usize;
                    let buf = crate::io::AlignedBuf::from_slice(&vec![0xee; M as usize]);
                    ring.block_on(img.write(&ring, i as u64 * M, &buf, false)).unwrap().unwrap();
                }
                crash(img);
                // Recovery (the journal) decides; read what it kept into the model.
                let s = r.open(unit, Duration::ZERO, false);
                let img = Image::open_on(&r.path, Box::new(s), None, &OpenOptions::default()).unwrap();
                for (i, m) in model.iter_mut().enumerate().skip(200) {
                    let mut b = crate::io::AlignedBuf::zeroed(M as usize);
                    ring.block_on(img.read(&ring, i as u64 * M, &mut b)).unwrap().unwrap();
                    assert!(b.iter().all(|&x| x == b[0]) && (b[0] == 0 || b[0] == 0xee), "MiB {i} after recovery");
                    *m = (b[0] == 0xee).then_some(0xee);
                }
                img.close().unwrap();
                // `fvd reduce` on the recovered image, then a crash at once.
                let g = img.give_back_slack(Slack::Asked).unwrap();
                assert!(g.is_none() || g.unwrap().to == img.used_end().unwrap());
                crash(img);
            }
            let rep = crate::image::check(&r.open(unit, Duration::ZERO, false));
            assert_eq!(rep.exit_code(), 0, "round {round}: {rep:?}");
        }
        assert!(!r.reduces.lock().unwrap().is_empty());
    }

    /// The whole engine over a growing LV: create on a volume smaller than
    /// the metadata, write sequentially, reopen, check.
    #[test]
    fn image_on_a_growing_volume() {
        use crate::format::{layout::CreateParams, BaseFormat, Geometry};
        use crate::image::{create_on, CreateOptions, Image, OpenOptions};
        let r = rig(4 * M, 1 << 30);
        let unit = 8 * M;
        let geo = {
            let d = CreateOptions::default();
            Geometry::new(&CreateParams {
                virtual_size: 1 << 30,
                block_size: d.block_size,
                chunk_size: d.chunk_size,
                base_size: 0,
                journal_len: d.journal_size,
            })
            .unwrap()
        };
        {
            let s = r.open(unit, Duration::ZERO, false);
            assert!(geo.data_offset > s.size());
            create_on(&s, &geo, "", BaseFormat::None).unwrap();
            assert!(s.size() >= geo.data_offset);
        }
        let data: Vec<u8> = (0..48 * M).map(|i| (i * 7 + i / 4096) as u8).collect();
        {
            let s = r.open(unit, Duration::from_millis(2), false);
            let img = Image::open_on(&r.path, Box::new(s), None, &OpenOptions::default()).unwrap();
            let ring = crate::io::uring::Uring::new(64).unwrap();
            for (i, piece) in data.chunks(M as usize).enumerate() {
                let buf = crate::io::AlignedBuf::from_slice(piece);
                ring.block_on(img.write(&ring, i as u64 * M, &buf, false)).unwrap().unwrap();
            }
            ring.block_on(img.flush(&ring)).unwrap().unwrap();
            let v = img.storage().status().unwrap();
            let size = img.storage().size();
            let used = v["used"].as_u64().unwrap();
            assert!(size - used >= unit && size - used < 2 * unit, "{v}");
            assert_eq!(v["units-added"].as_u64().unwrap() * unit, size - v["initial-size"].as_u64().unwrap(), "{v}");
            img.close().unwrap();
        }
        let s = r.open(unit, Duration::ZERO, false);
        let rep = crate::image::check(&s);
        assert_eq!(rep.exit_code(), 0, "{rep:?}");
        let img =
            Image::open_on(&r.path, Box::new(s), None, &OpenOptions { read_only: true, ..Default::default() }).unwrap();
        let ring = crate::io::uring::Uring::new(64).unwrap();
        let mut back = crate::io::AlignedBuf::zeroed(data.len());
        ring.block_on(img.read(&ring, 0, &mut back)).unwrap().unwrap();
        assert!(back[..] == data[..]);
    }
}
