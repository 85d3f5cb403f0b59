//! Test rig: a file standing in for an LV in a volume group.

use super::{LvOptions, LvStorage, Volume, VolumeReport};
use crate::storage::blockdev;
use crate::storage::lvm::{ExtendError, LvName};
use crate::storage::{FileStorage, OpenMode, Storage};
use serde_json::Value;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const M: u64 = 1 << 20;

/// A file standing in for an LV in a volume group with `vg_free` bytes.
pub struct FakeVolume {
    name: LvName,
    file: File,
    vg_free: Arc<Mutex<u64>>,
    extends: Arc<Mutex<Vec<u64>>>,
    reduces: Arc<Mutex<Vec<u64>>>,
    fail_reduce: Arc<Mutex<bool>>,
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
    fn reduce_to(&self, bytes: u64) -> Result<(), String> {
        let cur = self.device_size().unwrap();
        if bytes >= cur || bytes % M != 0 {
            return Err(format!("bad reduce from {cur} to {bytes}"));
        }
        if *self.fail_reduce.lock().unwrap() {
            return Err("lvreduce failed (test)".into());
        }
        self.file.set_len(bytes).unwrap();
        *self.vg_free.lock().unwrap() += cur - bytes;
        self.reduces.lock().unwrap().push(bytes);
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

pub struct Rig {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub vg_free: Arc<Mutex<u64>>,
    pub extends: Arc<Mutex<Vec<u64>>>,
    pub reduces: Arc<Mutex<Vec<u64>>>,
    pub fail_reduce: Arc<Mutex<bool>>,
    pub zeroed: Arc<Mutex<Vec<(u64, u64)>>>,
    pub lose: Arc<Mutex<u32>>,
}

pub fn rig(initial: u64, vg_free: u64) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lv");
    let f = File::create(&path).unwrap();
    f.set_len(initial).unwrap();
    Rig {
        _dir: dir,
        path,
        vg_free: Arc::new(Mutex::new(vg_free)),
        extends: Default::default(),
        reduces: Default::default(),
        fail_reduce: Default::default(),
        zeroed: Default::default(),
        lose: Default::default(),
    }
}

impl Rig {
    /// The stand-in volume over the rig's file, opened for writing when `write`.
    pub fn volume(&self, write: bool, delay: Duration, thin: bool) -> FakeVolume {
        FakeVolume {
            name: LvName::new("vg", "lv").unwrap(),
            file: File::options().read(true).write(write).open(&self.path).unwrap(),
            vg_free: self.vg_free.clone(),
            extends: self.extends.clone(),
            reduces: self.reduces.clone(),
            fail_reduce: self.fail_reduce.clone(),
            zeroed: self.zeroed.clone(),
            lose_answers: self.lose.clone(),
            delay,
            thin,
        }
    }

    /// Writable storage on the rig with a grow unit of `unit`.
    pub fn open(&self, unit: u64, delay: Duration, thin: bool) -> LvStorage {
        let inner = FileStorage::open(&self.path, OpenMode::ReadWrite).unwrap();
        let vol = self.volume(true, delay, thin);
        let o = LvOptions {
            grow_unit: Some(unit),
            publish: false,
            hard_retry: Duration::from_millis(50),
            ..Default::default()
        };
        LvStorage::with_volume(inner, Box::new(vol), M, &o, "test").unwrap()
    }
}

pub fn status(s: &LvStorage) -> Value {
    s.status().unwrap()
}
