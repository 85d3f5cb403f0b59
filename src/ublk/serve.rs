//! The daemon's body: open the image, add (or take back) the ublk device,
//! serve it until told to stop, then close the image clean and delete the
//! device.

use super::background::{Background, Housekeeping};
use super::channel;
use super::error::{ublk, ublk_errno};
use super::gate::Gate;
use super::options::{Mode, ServeOptions};
use super::params::{device_params, ParamsInput};
use super::report::{take, Reporter, Slot};
use super::request::Policy;
use super::setup::make_ctrl;
use super::signals::{block_stop_signals, spawn_signal_thread, stop_device, StopLatch};
use super::snapshot::Snapshotter;
use super::state::DeviceState;
use super::DaemonError;
use crate::image::{Image, OpenOptions};
use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Runs the daemon until the device is stopped. Start-up failures are
/// reported through `rep` as well as returned.
pub fn serve(o: ServeOptions, rep: Reporter) -> Result<(), DaemonError> {
    let slot: Slot = Arc::new(Mutex::new(Some(rep)));
    let r = serve_inner(&o, &slot);
    if let Err(e) = &r {
        tracing::error!(error = %e, "daemon failed");
        if let Some(rep) = take(&slot) {
            rep.failed(&e.to_string());
        }
    }
    r
}

fn serve_inner(o: &ServeOptions, slot: &Slot) -> Result<(), DaemonError> {
    // Before any thread exists (see there).
    block_stop_signals()?;
    let img = Arc::new(Image::open(&o.image, &open_options(o, &o.image))?);
    if img.was_recovered() {
        tracing::info!(image = %o.image.display(), "image was not closed cleanly: journal replayed");
    }
    // With a volatile log, a new daemon finds every metadata update a dead
    // one made; without it, updates are journaled before writes complete.
    let how = match (img.has_volatile_log(), o.lazy_metadata) {
        (true, _) => "kept in the volatile log",
        (false, true) => "lost (--lazy-metadata)",
        (false, false) => "journaled before writes complete",
    };
    tracing::info!("metadata of completed writes if this daemon dies: {how}");
    let ctrl = make_ctrl(o)?;
    let info = ctrl.dev_info();
    let id = info.dev_id;
    tracing::info!(
        id,
        queues = info.nr_hw_queues,
        depth = info.queue_depth,
        image = %o.image.display(),
        mode = ?o.mode,
        "device set up"
    );
    if info.nr_hw_queues < o.queues {
        // The driver gives a device at most one queue per CPU.
        tracing::warn!(asked = o.queues, got = info.nr_hw_queues, "the driver lowered the number of queues");
    }
    let log = place_log(o, id);
    let st = DeviceState {
        id,
        device: ctrl.get_bdev_path(),
        image: o.image.clone(),
        base: img.base().map(|b| b.name()),
        virtual_size: img.size(),
        block_size: img.block_size(),
        logical_block_size: o.logical_block,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        read_only: o.read_only,
        writethrough: o.writethrough,
        lazy_metadata: o.lazy_metadata,
        pid: std::process::id() as i32,
        state: "starting".into(),
        recoveries: o.recoveries,
        log,
        commit_interval_ms: o.commit_interval.map_or(0, |d| d.as_millis() as u64),
        prefetch: o.prefetch,
        prefetch_rate: o.prefetch_rate,
        grow_unit: o.grow_unit,
        unprivileged: o.unprivileged,
        snapshot_pending: None,
        snapshots: o.snapshots,
        zero_copy: info.flags & u64::from(libublk::sys::UBLK_F_AUTO_BUF_REG) != 0,
        last_snapshot_held_ms: o.last_snapshot_held_ms,
    };
    tracing::info!(
        zero_copy = st.zero_copy,
        "data path: {}",
        if st.zero_copy { "zero copy (auto buffer registration)" } else { "copy" }
    );
    // Written before the device appears: udev's helper reads it on "add".
    o.run_dir.write(&st)?;
    // A stop signal that comes while the device is still being set up
    // must not stop it yet: it is noted, and the device stopped once live.
    let latch = Arc::new(StopLatch::default());
    spawn_signal_thread(id, latch.clone())?;
    let params = device_params(&ParamsInput {
        size: img.size(),
        block_size: img.block_size(),
        logical_block: o.logical_block,
        read_only: o.read_only,
        writethrough: o.writethrough,
        max_io_bytes: info.max_io_buf_bytes,
    })?;
    let target = serde_json::json!({ "image": o.image, "read_only": o.read_only });
    let tgt_init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = params.basic.dev_sectors << 9;
        dev.tgt.params = params;
        dev.set_target_json(target);
        Ok(())
    };
    // Per image, see Policy::for_image.
    let pol = Policy { lazy_metadata: o.lazy_metadata };
    let bg = Background {
        prefetch: super::background::wants_prefetch(&img, o.prefetch),
        prefetch_rate: o.prefetch_rate,
        housekeeping: Some(Housekeeping { run_dir: o.run_dir.clone(), id, commit_interval: o.commit_interval }),
    };
    // From here on the gate holds the image: an online snapshot may put
    // another one in its place.
    let gate = Arc::new(Gate::new(usize::from(info.nr_hw_queues), img));
    let snap = Arc::new(Snapshotter::new(gate.clone(), o.run_dir.clone(), id, open_options(o, &o.image)));
    if let Err(e) = channel::listen(&o.run_dir, id, snap.clone()) {
        tracing::warn!(error = %e, "no control socket: online snapshots are not available");
    }
    let qgate = gate.clone();
    // Queue 0 prefetches, commits on the timer and publishes the status;
    // every queue stores its own copy-on-read blocks.
    let q_fn = move |qid: u16, dev: &UblkDev| {
        let bg = if qid == 0 { bg.clone() } else { Background { prefetch: false, housekeeping: None, ..bg.clone() } };
        if super::hybrid::chosen() {
            super::hybrid::serve_queue(qid, dev, qgate.clone(), pol, bg)
        } else {
            super::queue::serve_queue(qid, dev, qgate.clone(), pol, bg)
        }
    };
    let (rd, dev_path, rslot) = (o.run_dir.clone(), st.device.clone(), slot.clone());
    let live = move |_: &UblkCtrl| {
        if let Err(e) = rd.update(id, |s| s.state = "live".into()) {
            tracing::warn!(error = %e, "could not record the device as live");
        }
        tracing::info!(device = %dev_path, "device live");
        if let Some(rep) = take(&rslot) {
            rep.live(&dev_path);
        }
        if latch.went_live() {
            tracing::info!(id, "a stop signal came during start-up: stopping the device");
            stop_device(id);
        }
    };
    let ran = ctrl.run_target(tgt_init, q_fn, live);
    tracing::info!(device = %st.device, "queues stopped");
    // No snapshot starts from here on (one under way finishes first).
    snap.stop();
    finish(o, &ctrl, &gate, id, ran)
}

/// How the daemon opens a top: the one it starts with, and each new one an
/// online snapshot puts in its place (the volatile log is the image's own).
fn open_options(o: &ServeOptions, image: &Path) -> OpenOptions {
    OpenOptions {
        read_only: o.read_only,
        writethrough: o.writethrough,
        volatile_log: o.run_dir.volatile_log(image),
        copy_on_read: o.copy_on_read,
        grow_unit: o.grow_unit,
        grow_ahead: true,
        ..Default::default()
    }
}

/// After the queues are done: close the image clean, delete the device,
/// forget its state. A failed recovery leaves the device for another try.
fn finish(
    o: &ServeOptions,
    ctrl: &UblkCtrl,
    gate: &Gate<Image>,
    id: u32,
    ran: Result<i32, libublk::UblkError>,
) -> Result<(), DaemonError> {
    let _ = o.run_dir.update(id, |s| s.state = "stopping".into());
    super::notify::tell("STOPPING=1\nSTATUS=stopping: closing the image");
    let served = gate.current();
    let closed = match &served {
        Some(img) => {
            let vlog = o.run_dir.volatile_log(img.path());
            let r = img.close();
            match &r {
                Ok(()) => {
                    tracing::info!(image = %img.path().display(), "image closed clean");
                    // Everything in it is durable in the image now.
                    if let Some(v) = vlog.filter(|_| !o.read_only) {
                        let _ = std::fs::remove_file(v);
                    }
                }
                Err(e) => tracing::error!(image = %img.path().display(), error = %e, "closing the image failed"),
            }
            r
        }
        None => Ok(()),
    };
    let keep = ran.is_err() && matches!(o.mode, Mode::Recover { .. });
    if !keep {
        if let Err(e) = ctrl.del_dev() {
            if ublk_errno(&e) != Some(libc::ENOENT) && ublk_errno(&e) != Some(libc::ENODEV) {
                tracing::warn!(id, error = %super::error::ublk_why(&e), "deleting the device failed");
            }
        }
        o.run_dir.remove(id)?;
        tracing::info!(id, "device deleted");
    }
    // Closed clean and no device left over it (lvm2's udev wait is then never
    // behind a probe of the device): a linear LV gives back the room grown ahead.
    if let (Some(img), Ok(()), false) = (&served, &closed, o.read_only) {
        crate::image::slack::log_give_back(img.path(), img.give_back_slack(crate::storage::Slack::Stopped));
    }
    ran.map_err(ublk("serving the device"))?;
    Ok(closed?)
}

/// Moves a detached daemon's log to `<run dir>/<id>.log`; returns where it is.
fn place_log(o: &ServeOptions, id: u32) -> Option<PathBuf> {
    let cur = o.log.clone()?;
    let want = o.run_dir.log_path(id);
    if cur == want {
        return Some(cur);
    }
    match std::fs::rename(&cur, &want) {
        Ok(()) => Some(want),
        Err(e) => {
            tracing::warn!(log = %cur.display(), error = %e, "could not rename the log");
            Some(cur)
        }
    }
}
