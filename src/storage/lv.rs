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

use super::file::FileStorage;
use super::blockdev::{self, ZeroMethod};
use super::lvm::policy::{self, Policy};
use super::lvm::{ExtendError, LvName, LvReport, Lvm};
use super::{Storage, StorageError};
use serde_json::{json, Value};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// After a growth failed even at its least size, new writes that need space
/// fail at once for this long; the first one after it tries again.
pub const HARD_RETRY: Duration = Duration::from_secs(1);
/// The longest a write waits for a growth that neither finishes nor fails.
pub const GROWTH_WAIT_MAX: Duration = Duration::from_secs(30);
/// Background retries after a failure back off from 1 s to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a growth may take to show in the device's size after lvextend.
const CONFIRM_WAIT: Duration = Duration::from_secs(10);
/// A thin pool above this share of data space in use is warned about.
const POOL_WARN_PERCENT: f64 = 90.0;

/// Facts from the volume manager.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeReport {
    pub lv_size: u64,
    pub vg_free: u64,
    /// Thin LV: the share of its own size it occupies in the pool.
    pub lv_data_percent: Option<f64>,
    pub pool_size: Option<u64>,
    pub pool_data_percent: Option<f64>,
    /// The pool zeroes newly provisioned blocks.
    pub pool_zero: Option<bool>,
    pub pool_discards: Option<String>,
}

/// The volume under an [`LvStorage`]: the real LV ([`LvmVolume`]) or, in
/// tests, a file standing in for one.
pub trait Volume: Send + Sync + 'static {
    fn lv(&self) -> &LvName;
    fn pool(&self) -> Option<&str>;
    fn is_thin(&self) -> bool;
    /// The device's size as the kernel sees it now.
    fn device_size(&self) -> io::Result<u64>;
    /// Grows the LV to `bytes` (an absolute size, a multiple of the extent size).
    fn extend_to(&self, bytes: u64) -> Result<(), ExtendError>;
    fn report(&self) -> Result<VolumeReport, String>;
    /// Makes a range read as zeros, giving the space back where the device can.
    fn zero(&self, off: u64, len: u64) -> io::Result<()>;
    /// Whether space the LV gains reads as zeros already.
    fn new_space_is_zero(&self) -> bool;
    /// How [`Volume::zero`] works on this device, for the status.
    fn zero_method(&self) -> String;
}

/// A real logical volume: lvm2's tools and the block device.
pub struct LvmVolume {
    lvm: Lvm,
    name: LvName,
    pool: Option<LvName>,
    fd: OwnedFd,
    zero: ZeroMethod,
    thin: bool,
}

impl LvmVolume {
    /// Finds the LV behind an open block device: its device-mapper name (from
    /// sysfs) gives VG and LV, which `lvs` then confirms. `Ok(None)` when the
    /// device is not an LV that lvm2 made.
    pub fn identify(fd: RawFd) -> Result<Option<(LvmVolume, LvReport)>, String> {
        let Some(dm) = blockdev::lvm_dm_name(fd) else {
            return Ok(None);
        };
        let Some((vg, lv)) = super::lvm::names::split_dm_name(&dm) else {
            return Ok(None); // an internal layer (vg-pool-tpool)
        };
        let name = LvName::new(&vg, &lv)?;
        let lvm = Lvm::find();
        let rep = lvm.report(&[&name]).map_err(|e| e.to_string())?;
        let rep =
            rep.into_iter().find(|r| r.vg == vg && r.lv == lv).ok_or_else(|| format!("lvs does not list {name}"))?;
        let thin = rep.is_thin();
        let pool = match &rep.pool {
            Some(p) if thin => Some(name.sibling(p)?),
            _ => None,
        };
        // SAFETY: the caller keeps `fd` open for this call; we take our own
        // duplicate (close-on-exec) for the volume's lifetime.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().map_err(|e| format!("dup: {e}"))?;
        let zero = ZeroMethod::probe(fd.as_raw_fd(), thin);
        Ok(Some((LvmVolume { lvm, name, pool, fd, zero, thin }, rep)))
    }
}

impl Volume for LvmVolume {
    fn lv(&self) -> &LvName {
        &self.name
    }

    fn pool(&self) -> Option<&str> {
        self.pool.as_ref().map(|p| p.lv())
    }

    fn is_thin(&self) -> bool {
        self.thin
    }

    fn device_size(&self) -> io::Result<u64> {
        blockdev::size(self.fd.as_raw_fd())
    }

    fn extend_to(&self, bytes: u64) -> Result<(), ExtendError> {
        self.lvm.extend_to(&self.name, bytes)
    }

    fn report(&self) -> Result<VolumeReport, String> {
        let mut names = vec![&self.name];
        names.extend(self.pool.as_ref());
        let reps = self.lvm.report(&names).map_err(|e| e.to_string())?;
        let me =
            reps.iter().find(|r| r.lv == self.name.lv()).ok_or_else(|| format!("lvs does not list {}", self.name))?;
        let pool = self.pool.as_ref().and_then(|p| reps.iter().find(|r| r.lv == p.lv()));
        Ok(VolumeReport {
            lv_size: me.size,
            vg_free: me.vg_free,
            lv_data_percent: me.data_percent.filter(|_| self.thin),
            pool_size: pool.map(|p| p.size),
            pool_data_percent: pool.and_then(|p| p.data_percent),
            pool_zero: pool.map(|p| p.zero),
            pool_discards: pool.map(|p| p.discards.clone()),
        })
    }

    fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        self.zero.zero(self.fd.as_raw_fd(), off, len)
    }

    fn new_space_is_zero(&self) -> bool {
        self.thin
    }

    fn zero_method(&self) -> String {
        self.zero.describe()
    }
}

#[derive(Debug, Clone)]
struct Failure {
    no_space: bool,
    msg: String,
    /// The `used` the failed attempt tried to serve.
    covered: u64,
    /// Even the least size holding `covered` could not be had.
    hard: bool,
}

#[derive(Default)]
struct State {
    /// How far the image uses the LV: the largest size asked of ensure_size.
    used: u64,
    stop: bool,
    growing: bool,
    /// Failed attempts so far; a waiter fails when it changes under it.
    epoch: u64,
    failure: Option<Failure>,
    last_attempt: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    growths: u64,
    grown_bytes: u64,
    growth_time: Duration,
    last_growth_time: Duration,
    waits: u64,
    wait_time: Duration,
    wait_max: Duration,
    /// Waits that began after the first growth had completed.
    late_waits: u64,
    enospc: u64,
    failed_attempts: u64,
    report: Option<VolumeReport>,
    pool_warned: bool,
    /// When the status was last published (ENOSPC counts publish at most once a second).
    published: Option<Instant>,
}

struct Shared {
    path: String,
    vol: Box<dyn Volume>,
    policy: Policy,
    unit_from: &'static str,
    initial: u64,
    size: AtomicU64,
    st: Mutex<State>,
    /// Wakes the grower.
    work: Condvar,
    /// Wakes writers waiting for space.
    done: Condvar,
    hard_retry: Duration,
    grow_ahead: bool,
    status_file: Option<PathBuf>,
}

/// Image storage on an LVM logical volume.
pub struct LvStorage {
    inner: FileStorage,
    sh: Arc<Shared>,
    grower: Option<JoinHandle<()>>,
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
    /// Grow ahead of need (off for `fvd create`, which only needs room for
    /// the metadata: the serving daemon grows ahead once writes come).
    pub grow_ahead: bool,
    pub hard_retry: Duration,
}

impl Default for LvOptions {
    fn default() -> Self {
        LvOptions { writable: true, grow_unit: None, publish: true, grow_ahead: true, hard_retry: HARD_RETRY }
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
                LvStorage::with_volume(inner, Box::new(vol), rep.extent_size, &o, from).map(Ok)
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
        let status_file = (o.writable && o.publish).then(|| status_path(vol.lv()));
        let sh = Arc::new(Shared {
            path,
            vol,
            policy,
            unit_from,
            initial: size,
            size: AtomicU64::new(size),
            st: Mutex::new(State { backoff: Duration::from_secs(1), ..Default::default() }),
            work: Condvar::new(),
            done: Condvar::new(),
            hard_retry: o.hard_retry,
            grow_ahead: o.grow_ahead,
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
            grow_unit = sh.policy.unit,
            grow_unit_from = unit_from,
            zeroing = %sh.vol.zero_method(),
            "image storage on an LVM logical volume"
        );
        let s = LvStorage { inner, sh, grower };
        s.sh.publish();
        Ok(s)
    }

    pub fn policy(&self) -> Policy {
        self.sh.policy
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
                    || (self.sh.grow_ahead
                        && st.failure.is_none()
                        && self.sh.policy.wants_growth(size, st.used)
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

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn error(&self, f: &Failure, want: u64) -> StorageError {
        if f.no_space {
            StorageError::NoSpace { path: self.path.clone(), want, have: self.size() }
        } else {
            StorageError::Grow { path: self.path.clone(), want, source: io::Error::other(f.msg.clone()) }
        }
    }

    fn run_grower(&self) {
        let mut st = self.lock();
        loop {
            if st.stop {
                return;
            }
            let size = self.size();
            let hard = st.used > size;
            let want = hard || (self.grow_ahead && st.used > 0 && self.policy.wants_growth(size, st.used));
            if !want {
                st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if let Some(t) = st.retry_at {
                let now = Instant::now();
                if now < t {
                    st = self.work.wait_timeout(st, t - now).unwrap_or_else(|p| p.into_inner()).0;
                    continue;
                }
            }
            let used = st.used;
            st.growing = true;
            st.last_attempt = Some(Instant::now());
            let snap = self.status_locked(&st, st.report.clone());
            drop(st);
            self.write_status(&snap);
            let t0 = Instant::now();
            let r = self.grow_once(size, used);
            let took = t0.elapsed();
            let report = self.vol.report().ok();
            st = self.lock();
            st.growing = false;
            if report.is_some() {
                st.report = report;
            }
            match r {
                Ok(new) => {
                    self.size.store(new, Ordering::Release);
                    st.growths += 1;
                    st.grown_bytes += new - size;
                    st.growth_time += took;
                    st.last_growth_time = took;
                    st.retry_at = None;
                    st.backoff = Duration::from_secs(1);
                    if let Some(f) = st.failure.take().filter(|f| f.hard) {
                        tracing::info!(lv = %self.vol.lv(), after = %f.msg, "the LV grows again");
                    }
                    tracing::info!(
                        lv = %self.vol.lv(),
                        from = size,
                        to = new,
                        used = st.used,
                        ms = took.as_millis() as u64,
                        "LV grown"
                    );
                    self.check_pool(&mut st);
                }
                Err(f) => {
                    st.failed_attempts += 1;
                    st.epoch += 1;
                    let first = st.failure.is_none();
                    if st.used > f.covered {
                        st.retry_at = None; // new needs arrived meanwhile: try for them now
                    } else {
                        st.retry_at = Some(Instant::now() + st.backoff);
                        st.backoff = (st.backoff * 2).min(MAX_BACKOFF);
                    }
                    match (first, f.no_space, f.hard) {
                        (true, true, true) => tracing::error!(
                            lv = %self.vol.lv(),
                            error = %f.msg,
                            "volume group full: writes that need new space fail with ENOSPC until space is added \
                             (vgextend); everything else keeps working"
                        ),
                        (true, true, false) => tracing::warn!(
                            lv = %self.vol.lv(),
                            error = %f.msg,
                            "the volume group cannot give a whole grow unit; growing only as writes need"
                        ),
                        (true, false, _) => {
                            tracing::error!(lv = %self.vol.lv(), error = %f.msg, "growing the LV failed")
                        }
                        _ => tracing::debug!(lv = %self.vol.lv(), error = %f.msg, "growing the LV failed again"),
                    }
                    st.failure = Some(f);
                }
            }
            self.done.notify_all();
            let snap = self.status_locked(&st, st.report.clone());
            drop(st);
            self.write_status(&snap);
            st = self.lock();
        }
    }

    /// One growth: to the policy's target, or when the volume group cannot
    /// give that and a write needs space, to the least size holding it.
    /// Returns the confirmed new size, with any new space reading as zeros.
    fn grow_once(&self, size: u64, used: u64) -> Result<u64, Failure> {
        let fail = |no_space: bool, msg: String, covered: u64, hard: bool| Failure { no_space, msg, covered, hard };
        let now = self.vol.device_size().map_err(|e| fail(false, format!("BLKGETSIZE64: {e}"), used, true))?;
        if now > size {
            // Grown already: an earlier answer got lost, or the administrator did it.
            return self.adopt(size, now).map_err(|m| fail(false, m, used, true));
        }
        // Without growth ahead (`fvd create`), only as far as the need: the
        // metadata of a new image, not a grow unit past it.
        let target = if self.grow_ahead { self.policy.target(size, used) } else { self.policy.minimal(used) };
        let asked = match self.vol.extend_to(target) {
            Ok(()) => target,
            Err(ExtendError::NoSpace(m)) => {
                // Take what the volume group still has when that holds what
                // writes need (one step instead of one per waiting write),
                // else the least size that holds it.
                let need = self.lock().used;
                let all = super::lvm::tool::available_extents(&m)
                    .map(|n| size + n * self.policy.extent)
                    .filter(|&t| t > size && t < target);
                let least = self.policy.minimal(need);
                let to = match all {
                    Some(t) if t >= least => t,
                    _ if need > size => least,
                    // Only the growth ahead failed and nothing is left; no write waits yet.
                    _ => return Err(fail(true, m, need, false)),
                };
                if to >= target || to <= size {
                    return Err(fail(true, m, need, need > size));
                }
                match self.vol.extend_to(to) {
                    Ok(()) => to,
                    Err(ExtendError::NoSpace(m)) => return Err(fail(true, m, need, need > size)),
                    Err(ExtendError::Failed(m)) => return Err(fail(false, m, need, need > size)),
                }
            }
            Err(ExtendError::Failed(m)) => {
                // The LV may have grown all the same (a lost answer, a timeout).
                match self.vol.device_size() {
                    Ok(n) if n > size => return self.adopt(size, n).map_err(|m| fail(false, m, used, true)),
                    _ => return Err(fail(false, m, used.max(size + 1), true)),
                }
            }
        };
        let got = self.confirm(size, asked).map_err(|m| fail(false, m, used, true))?;
        self.adopt(size, got).map_err(|m| fail(false, m, used, true))
    }

    /// Waits for the device to show the size lvextend reported.
    fn confirm(&self, old: u64, want: u64) -> Result<u64, String> {
        let t0 = Instant::now();
        loop {
            let n = self.vol.device_size().map_err(|e| format!("BLKGETSIZE64: {e}"))?;
            if n >= want {
                return Ok(n);
            }
            if t0.elapsed() > CONFIRM_WAIT {
                if n > old {
                    return Ok(n);
                }
                return Err(format!(
                    "lvextend reported success but the device still holds {n} bytes (asked for {want})"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes `[old, new)` read as zeros unless the LV guarantees it.
    fn adopt(&self, old: u64, new: u64) -> Result<u64, String> {
        if !self.vol.new_space_is_zero() {
            self.vol.zero(old, new - old).map_err(|e| format!("zeroing the new space {old:#x}..{new:#x}: {e}"))?;
        }
        Ok(new)
    }

    fn check_pool(&self, st: &mut State) {
        let Some(p) = st.report.as_ref().and_then(|r| r.pool_data_percent) else {
            return;
        };
        if p >= POOL_WARN_PERCENT && !st.pool_warned {
            tracing::warn!(
                lv = %self.vol.lv(),
                pool = self.vol.pool().unwrap_or(""),
                data_percent = p,
                "the thin pool is nearly full: extend it (lvextend of the pool, or thin_pool_autoextend_threshold)"
            );
            st.pool_warned = true;
        } else if p < POOL_WARN_PERCENT {
            st.pool_warned = false;
        }
    }

    fn state_word(&self, st: &State) -> &'static str {
        match &st.failure {
            Some(f) if f.hard && f.no_space => "no-space",
            Some(f) if f.hard => "grow-failed",
            Some(_) => "low-space",
            None if st.growing => "growing",
            None => "ok",
        }
    }

    fn status_locked(&self, st: &State, report: Option<VolumeReport>) -> Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let size = self.size();
        let mut v = json!({
            "kind": "lvm",
            "vg": self.vol.lv().vg(),
            "lv": self.vol.lv().lv(),
            "type": if self.vol.is_thin() { "thin" } else { "linear" },
            "state": self.state_word(st),
            "size": size,
            "initial-size": self.initial,
            // Unknown until the first allocation in this process.
            "used": (st.used > 0).then_some(st.used),
            "free-ahead": (st.used > 0).then(|| size.saturating_sub(st.used)),
            "grow-unit": self.policy.unit,
            "grow-unit-from": self.unit_from,
            "low-water": self.policy.low_water,
            "growths": st.growths,
            "grown-bytes": st.grown_bytes,
            "units-added": st.grown_bytes / self.policy.unit,
            "growth-ms-total": ms(st.growth_time),
            "growth-ms-last": ms(st.last_growth_time),
            "waits": st.waits,
            "wait-ms-total": ms(st.wait_time),
            "wait-ms-max": ms(st.wait_max),
            "late-waits": st.late_waits,
            "enospc-errors": st.enospc,
            "failed-attempts": st.failed_attempts,
            "last-error": st.failure.as_ref().map(|f| f.msg.clone()),
            "zeroing": self.vol.zero_method(),
        });
        if let Some(p) = self.vol.pool() {
            v["pool"] = json!(p);
        }
        if let Some(r) = report {
            v["vg-free"] = json!(r.vg_free);
            if let Some(p) = r.lv_data_percent {
                v["lv-data-percent"] = json!(p);
            }
            if let Some(p) = r.pool_data_percent {
                v["pool-data-percent"] = json!(p);
            }
            if let Some(s) = r.pool_size {
                v["pool-size"] = json!(s);
                if let Some(p) = r.pool_data_percent {
                    v["pool-data-used"] = json!((s as f64 * p / 100.0) as u64);
                }
            }
            if let Some(z) = r.pool_zero {
                v["pool-zeroes-new-blocks"] = json!(z);
            }
            if let Some(d) = r.pool_discards {
                v["pool-discards"] = json!(d);
            }
        }
        v
    }

    /// Publishes the status unless that was done less than a second ago.
    fn publish_soon(&self, mut st: MutexGuard<'_, State>) {
        if st.published.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        st.published = Some(Instant::now());
        let snap = self.status_locked(&st, st.report.clone());
        drop(st);
        self.write_status(&snap);
    }

    fn publish(&self) {
        let snap = {
            let st = self.lock();
            self.status_locked(&st, st.report.clone())
        };
        self.write_status(&snap);
    }

    fn write_status(&self, v: &Value) {
        let Some(path) = &self.status_file else {
            return;
        };
        let mut v = v.clone();
        v["pid"] = json!(std::process::id());
        v["device"] = json!(self.path);
        let r = (|| -> io::Result<()> {
            let dir = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let tmp =
                dir.join(format!(".{}.{}", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
            std::fs::write(&tmp, serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = r {
            tracing::debug!(file = %path.display(), error = %e, "could not publish the LV status");
        }
    }
}

/// The run dir as the daemon uses it: $FVD_RUN_DIR, else /run/fvd.
fn run_dir() -> PathBuf {
    match std::env::var_os("FVD_RUN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("/run/fvd"),
    }
}

/// lvm2's device-mapper name of an LV (`-` doubled inside names).
fn dm_name(lv: &LvName) -> String {
    format!("{}-{}", lv.vg().replace('-', "--"), lv.lv().replace('-', "--"))
}

fn status_path(lv: &LvName) -> PathBuf {
    run_dir().join("lv").join(format!("{}.json", dm_name(lv)))
}

fn pid_alive(pid: u64) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// The status a live process that has `image` (an LV's device path) open
/// for writing publishes (`fvd start`'s daemon, `fvd io`), if there is one.
pub fn published_status(image: &Path) -> Option<Value> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(image).ok()?.rdev();
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev)));
    let dm = std::fs::read_to_string(sys.join("dm/name")).ok()?;
    let file = run_dir().join("lv").join(format!("{}.json", dm.trim()));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
    let pid = v.get("pid").and_then(Value::as_u64)?;
    (pid_alive(pid) && pid != std::process::id() as u64).then_some(v)
}

impl Storage for LvStorage {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn size(&self) -> u64 {
        self.sh.size()
    }

    fn ensure_size(&self, min: u64) -> Result<(), StorageError> {
        let sh = &self.sh;
        let mut st = sh.lock();
        st.used = st.used.max(min);
        let size = sh.size();
        if min <= size {
            if self.grower.is_some() && sh.policy.wants_growth(size, st.used) && !st.growing {
                sh.work.notify_one();
            }
            return Ok(());
        }
        if self.grower.is_none() {
            return Err(StorageError::NoSpace { path: sh.path.clone(), want: min, have: size });
        }
        if let Some(f) = st.failure.clone() {
            let recent = st.last_attempt.is_some_and(|t| t.elapsed() < sh.hard_retry);
            if f.hard && recent {
                st.enospc += 1;
                sh.publish_soon(st);
                return Err(sh.error(&f, min));
            }
            st.retry_at = None;
        }
        let t0 = Instant::now();
        let late = st.growths > 0;
        let epoch = st.epoch;
        sh.work.notify_one();
        let r = loop {
            if sh.size() >= min {
                break Ok(());
            }
            if st.epoch != epoch {
                match st.failure.clone() {
                    Some(f) if f.hard => {
                        st.enospc += 1;
                        break Err(sh.error(&f, min));
                    }
                    // Only the growth ahead failed; the grower tries for this need next.
                    _ => {}
                }
            }
            if st.stop {
                break Err(StorageError::NoSpace { path: sh.path.clone(), want: min, have: sh.size() });
            }
            if t0.elapsed() >= GROWTH_WAIT_MAX {
                // The grower is stuck (an lvm command or a zeroing the kernel
                // does not finish): the write fails instead of hanging.
                let f = Failure {
                    no_space: false,
                    msg: format!("the LV did not grow within {} s", GROWTH_WAIT_MAX.as_secs()),
                    covered: min,
                    hard: true,
                };
                st.enospc += 1;
                break Err(sh.error(&f, min));
            }
            st = sh.done.wait_timeout(st, GROWTH_WAIT_MAX / 10).unwrap_or_else(|p| p.into_inner()).0;
        };
        let waited = t0.elapsed();
        st.waits += 1;
        st.wait_time += waited;
        st.wait_max = st.wait_max.max(waited);
        if late {
            st.late_waits += 1;
        }
        if r.is_ok() {
            drop(st);
            tracing::debug!(want = min, ms = waited.as_millis() as u64, "a write waited for the LV to grow");
        } else {
            sh.publish_soon(st);
        }
        r
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
        let report = self.sh.vol.report().ok();
        let mine = {
            let st = self.sh.lock();
            self.sh.status_locked(&st, report.clone())
        };
        if self.grower.is_some() {
            return Some(mine);
        }
        // Read-only here: the counters that matter are the serving process's.
        let mut v = match published_status(Path::new(&self.sh.path)) {
            Some(p) => p,
            None => return Some(mine),
        };
        v["size"] = mine["size"].clone();
        for k in ["vg-free", "lv-data-percent", "pool-data-percent", "pool-size", "pool-data-used"] {
            if let Some(x) = mine.get(k) {
                v[k] = x.clone();
            }
        }
        v["served-by-pid"] = v["pid"].take();
        if let Some(o) = v.as_object_mut() {
            o.remove("pid");
        }
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::OpenMode;
    use std::fs::File;

    const M: u64 = 1 << 20;

    /// A file standing in for an LV in a volume group with `vg_free` bytes.
    struct FakeVolume {
        name: LvName,
        file: File,
        vg_free: Arc<Mutex<u64>>,
        extends: Arc<Mutex<Vec<u64>>>,
        zeroed: Arc<Mutex<Vec<(u64, u64)>>>,
        /// Extends but reports a failure, this many times.
        lose_answers: Arc<Mutex<u32>>,
        delay: Duration,
        thin: bool,
    }

    impl Volume for FakeVolume {
        fn lv(&self) -> &LvName {
            &self.name
        }
        fn pool(&self) -> Option<&str> {
            self.thin.then_some("pool")
        }
        fn is_thin(&self) -> bool {
            self.thin
        }
        fn device_size(&self) -> io::Result<u64> {
            Ok(self.file.metadata()?.len())
        }
        fn extend_to(&self, bytes: u64) -> Result<(), ExtendError> {
            std::thread::sleep(self.delay);
            let cur = self.device_size().unwrap();
            if bytes <= cur {
                return Err(ExtendError::Failed("New size matches existing size".into()));
            }
            let mut free = self.vg_free.lock().unwrap();
            if bytes - cur > *free {
                return Err(ExtendError::NoSpace(format!(
                    "Insufficient free space: {} extents needed, but only {} available",
                    (bytes - cur) / M,
                    *free / M
                )));
            }
            *free -= bytes - cur;
            self.file.set_len(bytes).unwrap();
            self.extends.lock().unwrap().push(bytes);
            let mut lose = self.lose_answers.lock().unwrap();
            if *lose > 0 {
                *lose -= 1;
                return Err(ExtendError::Failed("timed out".into()));
            }
            Ok(())
        }
        fn report(&self) -> Result<VolumeReport, String> {
            Ok(VolumeReport {
                lv_size: self.device_size().unwrap(),
                vg_free: *self.vg_free.lock().unwrap(),
                ..Default::default()
            })
        }
        fn zero(&self, off: u64, len: u64) -> io::Result<()> {
            self.zeroed.lock().unwrap().push((off, len));
            blockdev::punch_hole(self.file.as_raw_fd(), off, len)
        }
        fn new_space_is_zero(&self) -> bool {
            self.thin
        }
        fn zero_method(&self) -> String {
            "punch".into()
        }
    }

    struct Rig {
        _dir: tempfile::TempDir,
        path: PathBuf,
        vg_free: Arc<Mutex<u64>>,
        extends: Arc<Mutex<Vec<u64>>>,
        zeroed: Arc<Mutex<Vec<(u64, u64)>>>,
        lose: Arc<Mutex<u32>>,
    }

    fn rig(initial: u64, vg_free: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lv");
        let f = File::create(&path).unwrap();
        f.set_len(initial).unwrap();
        Rig {
            _dir: dir,
            path,
            vg_free: Arc::new(Mutex::new(vg_free)),
            extends: Default::default(),
            zeroed: Default::default(),
            lose: Default::default(),
        }
    }

    impl Rig {
        fn open(&self, unit: u64, delay: Duration, thin: bool) -> LvStorage {
            let inner = FileStorage::open(&self.path, OpenMode::ReadWrite).unwrap();
            let vol = FakeVolume {
                name: LvName::new("vg", "lv").unwrap(),
                file: File::options().read(true).write(true).open(&self.path).unwrap(),
                vg_free: self.vg_free.clone(),
                extends: self.extends.clone(),
                zeroed: self.zeroed.clone(),
                lose_answers: self.lose.clone(),
                delay,
                thin,
            };
            let o = LvOptions {
                grow_unit: Some(unit),
                publish: false,
                hard_retry: Duration::from_millis(50),
                ..Default::default()
            };
            LvStorage::with_volume(inner, Box::new(vol), M, &o, "test").unwrap()
        }
    }

    fn status(s: &LvStorage) -> Value {
        s.status().unwrap()
    }

    #[test]
    fn grows_ahead_without_waiting() {
        let r = rig(16 * M, 1 << 30);
        let s = r.open(8 * M, Duration::ZERO, false);
        assert_eq!(s.size(), 16 * M);
        // Sequential allocation, one 1 MiB chunk at a time, waiting for the
        // grower between steps as a writer's own I/O would give it time.
        for used in (5..=100).map(|m| m * M) {
            s.ensure_size(used).unwrap();
            assert!(s.wait_idle(Duration::from_secs(5)));
            let free = s.size() - used;
            assert!((8 * M..16 * M).contains(&free), "free {free} at {used}");
        }
        let v = status(&s);
        assert_eq!(v["waits"], 0, "{v}");
        assert_eq!(v["growths"].as_u64().unwrap(), (s.size() - 16 * M) / (8 * M));
        assert_eq!(v["units-added"], v["growths"]);
        assert_eq!(v["state"], "ok");
        // Linear: every new range was zeroed before use, exactly once.
        let z = r.zeroed.lock().unwrap().clone();
        let mut at = 16 * M;
        for (off, len) in z {
            assert_eq!(off, at);
            at += len;
        }
        assert_eq!(at, s.size());
    }

    #[test]
    fn a_write_past_the_end_waits_for_the_growth() {
        let r = rig(4 * M, 1 << 30);
        let s = r.open(4 * M, Duration::from_millis(30), true);
        s.ensure_size(20 * M).unwrap();
        assert!(s.size() >= 24 * M);
        let v = status(&s);
        assert_eq!(v["waits"], 1);
        assert!(v["wait-ms-total"].as_f64().unwrap() >= 25.0, "{v}");
        assert!(r.zeroed.lock().unwrap().is_empty(), "thin: new space needs no zeroing");
        // Growth happened in whole units from the initial size.
        assert_eq!((s.size() - 4 * M) % (4 * M), 0);
    }

    #[test]
    fn full_volume_group_gives_enospc_then_resumes() {
        let r = rig(8 * M, 6 * M);
        let s = r.open(4 * M, Duration::ZERO, false);
        s.ensure_size(6 * M).unwrap();
        assert!(s.wait_idle(Duration::from_secs(5)));
        // 4 MiB unit: one growth to 12 MiB, then the VG has 2 MiB left.
        assert_eq!(s.size(), 12 * M);
        // Needs 13 MiB: a unit does not fit; the grower takes all the VG
        // has left (2 MiB) in one step.
        s.ensure_size(13 * M).unwrap();
        assert_eq!(s.size(), 14 * M);
        assert_eq!(r.extends.lock().unwrap().last(), Some(&(14 * M)));
        s.ensure_size(14 * M).unwrap();
        // Now the VG is empty.
        match s.ensure_size(15 * M) {
            Err(StorageError::NoSpace { want, have, .. }) => assert_eq!((want, have), (15 * M, 14 * M)),
            e => panic!("{e:?}"),
        }
        // Space that exists keeps working.
        s.ensure_size(14 * M).unwrap();
        assert!(matches!(s.ensure_size(16 * M), Err(StorageError::NoSpace { .. })));
        let v = status(&s);
        assert_eq!(v["state"], "no-space");
        assert!(v["enospc-errors"].as_u64().unwrap() >= 2);
        // The administrator adds space; after the retry interval writing resumes.
        *r.vg_free.lock().unwrap() += 64 * M;
        std::thread::sleep(Duration::from_millis(60));
        s.ensure_size(16 * M).unwrap();
        assert!(s.wait_idle(Duration::from_secs(5)));
        assert_eq!(status(&s)["state"], "ok");
    }

    #[test]
    fn a_lost_answer_does_not_grow_twice() {
        let r = rig(8 * M, 1 << 30);
        *r.lose.lock().unwrap() = 1;
        let s = r.open(4 * M, Duration::ZERO, false);
        s.ensure_size(9 * M).unwrap();
        assert!(s.wait_idle(Duration::from_secs(5)));
        // lvextend ran once; its success was reported as a failure, and the
        // grower adopted the size the device shows instead of growing again.
        assert_eq!(r.extends.lock().unwrap().clone(), vec![16 * M]);
        assert_eq!(s.size(), 16 * M);
    }

    #[test]
    fn background_retry_after_backoff() {
        let r = rig(8 * M, 0);
        let s = r.open(4 * M, Duration::ZERO, false);
        s.ensure_size(6 * M).unwrap(); // wants growth ahead; the VG is empty
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(status(&s)["state"], "low-space");
        *r.vg_free.lock().unwrap() = 64 * M;
        // The first back-off is one second.
        let t0 = Instant::now();
        while s.size() == 8 * M && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.size(), 12 * M);
        assert_eq!(status(&s)["state"], "ok");
    }

    #[test]
    fn read_only_never_grows() {
        let r = rig(8 * M, 1 << 30);
        let inner = FileStorage::open(&r.path, OpenMode::ReadOnly).unwrap();
        let vol = FakeVolume {
            name: LvName::new("vg", "lv").unwrap(),
            file: File::open(&r.path).unwrap(),
            vg_free: r.vg_free.clone(),
            extends: r.extends.clone(),
            zeroed: r.zeroed.clone(),
            lose_answers: r.lose.clone(),
            delay: Duration::ZERO,
            thin: false,
        };
        let o = LvOptions { writable: false, grow_unit: Some(4 * M), publish: false, ..Default::default() };
        let s = LvStorage::with_volume(inner, Box::new(vol), M, &o, "test").unwrap();
        s.ensure_size(8 * M).unwrap();
        assert!(matches!(s.ensure_size(9 * M), Err(StorageError::NoSpace { .. })));
        assert!(r.extends.lock().unwrap().is_empty());
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
