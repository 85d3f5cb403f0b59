//! The volume under an [`super::LvStorage`]: what it must do ([`Volume`]), the
//! facts lvm2 gives about it ([`VolumeReport`]), and the real LV found behind an
//! open block device ([`LvmVolume`]).

use crate::storage::blockdev::{self, ZeroMethod};
use crate::storage::lvm::{ExtendError, LvName, LvReport, Lvm};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

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
    /// Shrinks the LV to `bytes` (a multiple of the extent size); nothing past it
    /// is needed (the caller's word).
    fn reduce_to(&self, bytes: u64) -> Result<(), String>;
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
        let Some((vg, lv)) = crate::storage::lvm::names::split_dm_name(&dm) else {
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

    fn reduce_to(&self, bytes: u64) -> Result<(), String> {
        self.lvm.reduce_to(&self.name, bytes).map_err(|e| e.to_string())
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
