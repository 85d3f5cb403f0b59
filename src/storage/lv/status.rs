//! The LV's status: built from the shared state and lvm2's report, published
//! in `<run dir>/lv/<dm name>.json` by a writable instance, and read back by
//! other processes ([`published_status`]).

use super::shared::{Shared, State};
use super::volume::VolumeReport;
use crate::storage::lvm::LvName;
use serde_json::{json, Value};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

impl Shared {
    /// The status for [`crate::storage::Storage::status`]. `serving`: this
    /// instance grows the LV; otherwise (read-only) the counters that matter are
    /// those a serving process published, with this process's fresh sizes.
    pub(super) fn status(&self, serving: bool) -> Value {
        let report = self.vol.report().ok();
        let mine = {
            let st = self.lock();
            self.status_locked(&st, report)
        };
        if serving {
            return mine;
        }
        // Read-only here: the counters that matter are the serving process's.
        let mut v = match published_status(Path::new(&self.path)) {
            Some(p) => p,
            None => return mine,
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
        v
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

    pub(super) fn status_locked(&self, st: &State, report: Option<VolumeReport>) -> Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let size = self.size();
        let policy = self.policy();
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
            "grow-unit": policy.unit,
            "grow-unit-from": self.unit_from,
            "low-water": policy.low_water,
            // The most the image can need: growth stops there (unknown before the image opened).
            "growth-limit": (policy.limit != u64::MAX).then(|| policy.cap()),
            "growths": st.growths,
            "grown-bytes": st.grown_bytes,
            "units-added": st.grown_bytes / policy.unit,
            "growth-ms-total": ms(st.growth_time),
            "growth-ms-last": ms(st.last_growth_time),
            "waits": st.waits,
            "wait-ms-total": ms(st.wait_time),
            "wait-ms-max": ms(st.wait_max),
            "late-waits": st.late_waits,
            "enospc-errors": st.enospc,
            "reductions": st.reductions,
            "reduced-bytes": st.reduced_bytes,
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
    pub(super) fn publish_soon(&self, mut st: MutexGuard<'_, State>) {
        if st.published.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        st.published = Some(Instant::now());
        let snap = self.status_locked(&st, st.report.clone());
        drop(st);
        self.write_status(&snap);
    }

    pub(super) fn publish(&self) {
        let snap = {
            let st = self.lock();
            self.status_locked(&st, st.report.clone())
        };
        self.write_status(&snap);
    }

    pub(super) fn write_status(&self, v: &Value) {
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

/// Where a writable instance publishes the status of `lv`.
pub(super) fn status_path(lv: &LvName) -> PathBuf {
    crate::rundir::path().join("lv").join(format!("{}.json", lv.dm_name()))
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
    let file = crate::rundir::path().join("lv").join(format!("{}.json", dm.trim()));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
    let pid = v.get("pid").and_then(Value::as_u64)?;
    (pid_alive(pid) && pid != std::process::id() as u64).then_some(v)
}
