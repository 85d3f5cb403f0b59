//! The commands that act on running devices: stop, recover, list.

use super::kernel::{self, KernelState};
use super::options::{Mode, ServeOptions};
use super::serve::serve;
use super::spawn::detach;
use super::state::{DeviceState, RunDir};
use super::DaemonError;
use crate::image::{Image, ImageError, OpenOptions};
use crate::storage::StorageError;
use std::time::{Duration, Instant};

/// How a stop went.
#[derive(Debug)]
pub enum Stopped {
    /// The daemon stopped the device and closed the image clean.
    Clean(DeviceState),
    /// The daemon was gone: the device was deleted here and the image's
    /// journal replayed and closed clean (`false`: another daemon serves the
    /// image by now and looks after it).
    Repaired(DeviceState, bool),
}

fn wait_exit(pid: i32, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while kernel::daemon_alive(pid) {
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Stops device `id`: SIGTERM to its daemon, which flushes, checkpoints,
/// marks the image clean and deletes the device; or, when the daemon is
/// gone, does that cleanup here.
pub fn stop(rd: &RunDir, id: u32, timeout: Duration, force: bool) -> Result<Stopped, DaemonError> {
    let st = rd.read(id)?.ok_or(DaemonError::UnknownId(id))?;
    let users = kernel::device_users(&st.device);
    if !force && !users.is_empty() {
        // Stopping deletes the disk under the file system: refuse by default.
        return Err(DaemonError::Busy { device: st.device.clone(), by: users.join(", ") });
    }
    if kernel::daemon_alive(st.pid) {
        tracing::info!(id, pid = st.pid, "sending SIGTERM");
        let pid = nix::unistd::Pid::from_raw(st.pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| DaemonError::Sys { what: "signalling the daemon", source: e.into() })?;
        if !wait_exit(st.pid, timeout) {
            return Err(DaemonError::StopTimeout { id, pid: st.pid, secs: timeout.as_secs() });
        }
        // A daemon that finished its stop removed the state file. A state
        // file of another daemon is a device that reused the id after this one
        // had gone (a start while the stop waited): it is not this stop's.
        match rd.read(id)? {
            None => return Ok(Stopped::Clean(st)),
            Some(now) if now.pid != st.pid => {
                tracing::info!(id, pid = now.pid, "the device's id serves another daemon by now; left to it");
                return Ok(Stopped::Clean(st));
            }
            Some(_) => {}
        }
        tracing::warn!(id, "the daemon exited without finishing the stop; cleaning up");
    }
    repair(rd, st)
}

/// The daemon is gone: delete the device and bring the image back to clean.
fn repair(rd: &RunDir, mut st: DeviceState) -> Result<Stopped, DaemonError> {
    if kernel::device_exists(st.id) {
        kernel::delete_device(st.id)?;
    }
    // An online snapshot the daemon did not finish: which top is the image.
    super::snapshot::resolve_pending(rd, &mut st)?;
    let mut closed = false;
    if !st.read_only {
        // Opening read-write replays the journal; closing checkpoints and
        // marks the image clean. An image another daemon serves by now is
        // that daemon's to look after.
        // The dead daemon's volatile log holds what it never journaled.
        let vlog = rd.volatile_log(&st.image);
        match Image::open(&st.image, &OpenOptions { volatile_log: vlog.clone(), ..Default::default() }) {
            Ok(img) => {
                img.close()?;
                closed = true;
                if let Some(v) = vlog {
                    let _ = std::fs::remove_file(v);
                }
            }
            Err(ImageError::Storage(StorageError::Locked { .. })) => {
                tracing::info!(image = %st.image.display(), "image is served by another daemon now; left to it");
            }
            Err(e) => return Err(e.into()),
        }
    }
    rd.remove(st.id)?;
    Ok(Stopped::Repaired(st, closed))
}

/// Starts a new daemon that takes device `id` back after its daemon died
/// (ublk user recovery: queued and in-flight requests are reissued to it).
pub fn recover(rd: &RunDir, id: u32) -> Result<String, DaemonError> {
    let mut st = rd.read(id)?.ok_or(DaemonError::UnknownId(id))?;
    if st.unprivileged {
        return Err(DaemonError::NoRecoveryUnprivileged(id));
    }
    // A daemon killed a moment ago may still be tearing down its rings.
    if !wait_exit(st.pid, Duration::from_secs(5)) {
        return Err(DaemonError::StillRunning { id, pid: st.pid });
    }
    if !kernel::device_exists(id) {
        return Err(DaemonError::Gone(id));
    }
    // An online snapshot the daemon did not finish: completed (the old top
    // was frozen) or rolled back, so the new daemon serves the right top.
    super::snapshot::resolve_pending(rd, &mut st)?;
    let o = ServeOptions {
        image: st.image.clone(),
        mode: Mode::Recover { id },
        queues: st.queues,
        depth: st.depth,
        writethrough: st.writethrough,
        read_only: st.read_only,
        logical_block: st.logical_block_size,
        lazy_metadata: st.lazy_metadata,
        copy_on_read: None,
        prefetch: st.prefetch,
        prefetch_rate: st.prefetch_rate,
        commit_interval: (st.commit_interval_ms > 0).then(|| Duration::from_millis(st.commit_interval_ms)),
        grow_unit: st.grow_unit,
        unprivileged: false,
        zero_copy: super::zc::ZeroCopy::Auto,
        run_dir: rd.clone(),
        log: Some(rd.log_path(id)),
        recoveries: st.recoveries + 1,
        snapshots: st.snapshots,
        last_snapshot_held_ms: st.last_snapshot_held_ms,
    };
    detach(rd, rd.log_path(id), true, move |rep| serve(o, rep))
}

/// A device as `fvd list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Listed {
    #[serde(flatten)]
    pub st: DeviceState,
    /// Whether the daemon process is running.
    pub daemon_running: bool,
    /// The driver's view: live, quiesced, ... or absent.
    pub kernel_state: String,
    /// One word: live, starting, stopping, recovering, crashed, gone.
    pub status: &'static str,
    /// Storage state the daemon publishes (LV growth, waits, pool usage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<serde_json::Value>,
    /// What the running daemon last published: prefetch progress, metadata
    /// writes per guest write, commits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<crate::image::LiveStatus>,
}

impl Listed {
    /// One word for humans: live, starting, stopping, crashed (recoverable), gone.
    fn status_of(st: &DeviceState, running: bool, kernel_state: &str) -> &'static str {
        match (running, kernel_state) {
            (true, _) if st.state == "starting" => "starting",
            (true, _) if st.state == "stopping" => "stopping",
            (true, "live") | (true, "unknown") => "live",
            (true, _) => "recovering",
            (false, "absent") => "gone",
            (false, _) => "crashed",
        }
    }
}

/// The device whose running daemon serves `image` (an absolute path), if any.
pub fn serving(rd: &RunDir, image: &std::path::Path) -> Option<Listed> {
    list(rd).ok()?.into_iter().find(|d| d.daemon_running && d.st.image == image)
}

pub fn list(rd: &RunDir) -> Result<Vec<Listed>, DaemonError> {
    Ok(rd
        .list()?
        .into_iter()
        .map(|st| {
            let kernel_state = if kernel::device_exists(st.id) {
                kernel::device_state(st.id).map(KernelState::name).unwrap_or("unknown")
            } else {
                "absent"
            };
            let running = kernel::daemon_alive(st.pid);
            let status = Listed::status_of(&st, running, kernel_state);
            let storage = crate::storage::lv::published_status(&st.image);
            let live = if running { rd.read_live(st.id) } else { None };
            Listed { daemon_running: running, kernel_state: kernel_state.into(), status, storage, live, st }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Found by the torture run (issue 23): `fvd stop -n 1` waited for its daemon,
    /// which deleted the device, removed its state and then gave back its LV's
    /// slack; meanwhile `fvd start` of another image took id 1. The stop then read
    /// the new daemon's state, took it for a stop left unfinished, and deleted
    /// that device. A state file of another pid is now left to its daemon.
    #[test]
    fn a_stop_leaves_alone_a_device_that_reused_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let rd = RunDir::new(dir.path().join("run"));
        // The new daemon's state, put in place by the old daemon as it exits (the
        // start that raced the stop), and a stand-in daemon whose name starts with fvd.
        let next = dir.path().join("next.json");
        let new = DeviceState { pid: i32::MAX - 1, read_only: true, ..crate::ublk::state::tests::sample(1) };
        std::fs::write(&next, serde_json::to_string_pretty(&new).unwrap()).unwrap();
        let fake = dir.path().join("fvd-stand-in");
        std::fs::copy("/bin/sh", &fake).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = format!(
            "trap 'mv {} {}; exit 0' TERM; while :; do sleep 0.05; done",
            next.display(),
            rd.state_path(1).display()
        );
        let mut child = std::process::Command::new(&fake).args(["-c", &script]).spawn().unwrap();
        let old = DeviceState { pid: child.id() as i32, read_only: true, ..crate::ublk::state::tests::sample(1) };
        rd.write(&old).unwrap();
        let t0 = Instant::now();
        while !kernel::daemon_alive(old.pid) && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100)); // the trap is set
        let r = stop(&rd, 1, Duration::from_secs(10), true);
        let _ = child.wait();
        assert!(matches!(r, Ok(Stopped::Clean(_))), "{r:?}");
        let left = rd.read(1).unwrap().expect("the other daemon's state is still there");
        assert_eq!(left.pid, new.pid);
    }
}
