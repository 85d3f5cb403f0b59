//! The daemon's body: open the image, add (or take back) the ublk device,
//! serve it until told to stop, then close the image clean and delete the
//! device.

use super::background::{Background, Housekeeping};
use super::error::{ublk, ublk_errno};
use super::params::{device_params, ParamsInput};
use super::queue::serve_queue;
use super::request::Policy;
use super::state::{DeviceState, RunDir};
use super::{kernel, DaemonError};
use crate::image::{Image, OpenOptions};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use nix::sys::signal::{SigSet, Signal};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Largest request, and each tag's buffer.
pub const IO_BUF_BYTES: u32 = 512 << 10;

/// A new device (`fvd start`) or taking back one whose daemon died (`fvd recover`).
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Add { id: Option<u32> },
    Recover { id: u32 },
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Absolute path of the image.
    pub image: PathBuf,
    pub mode: Mode,
    pub queues: u16,
    pub depth: u16,
    pub writethrough: bool,
    pub read_only: bool,
    pub logical_block: u32,
    pub lazy_metadata: bool,
    /// Copy-on-read (None: the image's default).
    pub copy_on_read: Option<bool>,
    /// Prefetch the base in the background (also when the image asks by default).
    pub prefetch: bool,
    /// Upper bound on the prefetch rate, bytes per second.
    pub prefetch_rate: Option<u64>,
    /// Writeback mode: commit metadata at least this often (None: only on
    /// flush and under pressure).
    pub commit_interval: Option<std::time::Duration>,
    /// Growth step of the image's storage (None: the storage's default).
    pub grow_unit: Option<u64>,
    /// Add the device as an unprivileged one (the caller lacks CAP_SYS_ADMIN).
    pub unprivileged: bool,
    pub run_dir: RunDir,
    /// The daemon's log file when detached (renamed to `<id>.log` once the ID is known).
    pub log: Option<PathBuf>,
    /// Recoveries so far (kept in the state file).
    pub recoveries: u32,
}

/// Tells whoever started the daemon that the device is live, or why not.
pub enum Reporter {
    /// `--foreground`: print the device path on stdout.
    Stdout,
    /// Detached: one line on the pipe the waiting `fvd start` reads.
    Pipe(std::fs::File),
}

impl Reporter {
    fn live(self, dev: &str) {
        let r = match self {
            Reporter::Stdout => {
                let mut out = std::io::stdout();
                writeln!(out, "{dev}").and_then(|_| out.flush())
            }
            Reporter::Pipe(mut f) => writeln!(f, "live {dev}"),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not report the device as live");
        }
    }

    fn failed(self, msg: &str) {
        if let Reporter::Pipe(mut f) = self {
            let _ = writeln!(f, "error {msg}");
        }
    }
}

type Slot = Arc<Mutex<Option<Reporter>>>;

fn take(slot: &Slot) -> Option<Reporter> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

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

fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

fn serve_inner(o: &ServeOptions, slot: &Slot) -> Result<(), DaemonError> {
    // Before any thread exists, so that every thread inherits the mask and
    // the stop signals reach only the signal thread's sigwait.
    stop_signals().thread_block().map_err(|e| DaemonError::Sys { what: "blocking signals", source: e.into() })?;
    let vlog = o.run_dir.volatile_log(&o.image);
    let img = Arc::new(Image::open(
        &o.image,
        &OpenOptions {
            read_only: o.read_only,
            writethrough: o.writethrough,
            volatile_log: vlog.clone(),
            copy_on_read: o.copy_on_read,
            grow_unit: o.grow_unit,
            ..Default::default()
        },
    )?);
    if img.was_recovered() {
        tracing::info!(image = %o.image.display(), "image was not closed cleanly: journal replayed");
    }
    // With a volatile log, a new daemon finds every metadata update a dead
    // one made; without it, updates are journaled before writes complete.
    let lazy_metadata = o.lazy_metadata || img.has_volatile_log();
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
    };
    // Written before the device appears: udev's helper reads it on "add".
    o.run_dir.write(&st)?;
    // A stop signal that comes while the device is still being set up can't
    // stop it yet: it is remembered, and the device stopped once live.
    let stop_asked = Arc::new(AtomicBool::new(false));
    spawn_signal_thread(id, stop_asked.clone())?;
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
    let qimg = img.clone();
    let pol = Policy { lazy_metadata };
    let bg = Background {
        prefetch: super::background::wants_prefetch(&img, o.prefetch),
        prefetch_rate: o.prefetch_rate,
        housekeeping: Some(Housekeeping { run_dir: o.run_dir.clone(), id, commit_interval: o.commit_interval }),
    };
    // Queue 0 prefetches, commits on the timer and publishes the status;
    // every queue stores its own copy-on-read blocks.
    let q_fn = move |qid: u16, dev: &UblkDev| {
        let bg = if qid == 0 { bg.clone() } else { Background { prefetch: false, housekeeping: None, ..bg.clone() } };
        serve_queue(qid, dev, qimg.clone(), pol, bg)
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
        if stop_asked.load(Ordering::SeqCst) {
            tracing::info!(id, "a stop signal came during start-up: stopping the device");
            stop_device(id);
        }
    };
    let ran = ctrl.run_target(tgt_init, q_fn, live);
    tracing::info!(device = %st.device, "queues stopped");
    finish(o, &ctrl, img, id, ran, vlog)
}

/// After the queues are done: close the image clean, delete the device,
/// forget its state. A failed recovery leaves the device for another try.
fn finish(
    o: &ServeOptions,
    ctrl: &UblkCtrl,
    img: Arc<Image>,
    id: u32,
    ran: Result<i32, libublk::UblkError>,
    vlog: Option<PathBuf>,
) -> Result<(), DaemonError> {
    let _ = o.run_dir.update(id, |s| s.state = "stopping".into());
    let closed = img.close();
    drop(img);
    match &closed {
        Ok(()) => {
            tracing::info!(image = %o.image.display(), "image closed clean");
            // Everything in it is durable in the image now.
            if let Some(v) = vlog.filter(|_| !o.read_only) {
                let _ = std::fs::remove_file(v);
            }
        }
        Err(e) => tracing::error!(image = %o.image.display(), error = %e, "closing the image failed"),
    }
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
    ran.map_err(ublk("serving the device"))?;
    Ok(closed?)
}

fn make_ctrl(o: &ServeOptions) -> Result<UblkCtrl, DaemonError> {
    // The kernel gives unprivileged devices no user recovery.
    let flags = if o.unprivileged {
        u64::from(sys::UBLK_F_UNPRIVILEGED_DEV)
    } else {
        u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE)
    };
    match o.mode {
        Mode::Add { id } => {
            // Checked here because libublk, when adding with an ID that is
            // taken, deletes the device that has it while cleaning up.
            if let Some(id) = id.filter(|&i| kernel::device_exists(i)) {
                return Err(DaemonError::IdInUse(id as i32));
            }
            let want = id.map(|i| i as i32).unwrap_or(-1);
            UblkCtrlBuilder::default()
                .name("fvd")
                .id(want)
                .nr_queues(o.queues)
                .depth(o.depth)
                .io_buf_bytes(IO_BUF_BYTES)
                .ctrl_flags(flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(|e| match ublk_errno(&e) {
                    Some(libc::EEXIST) => DaemonError::IdInUse(want),
                    Some(libc::EACCES) | Some(libc::EPERM) => DaemonError::Control(super::error::ublk_why(&e)),
                    _ => ublk("adding the ublk device")(e),
                })
        }
        Mode::Recover { id } => {
            let old = kernel::open_device(id)?;
            let info = old.dev_info();
            // Waits (up to 30 s) for the driver to notice the old daemon's exit.
            match old.start_user_recover() {
                Ok(r) if r >= 0 => {}
                Ok(r) => {
                    let why = std::io::Error::from_raw_os_error(-r).to_string();
                    return Err(DaemonError::NotRecoverable { id, why });
                }
                Err(e) => return Err(DaemonError::NotRecoverable { id, why: super::error::ublk_why(&e) }),
            }
            drop(old);
            UblkCtrlBuilder::default()
                .name("fvd")
                .id(id as i32)
                .nr_queues(info.nr_hw_queues)
                .depth(info.queue_depth)
                .io_buf_bytes(info.max_io_buf_bytes)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(ublk(format!("taking back device {id}")))
        }
    }
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

/// SIGTERM, SIGINT, SIGHUP: stop the device. The queues then see their
/// commands aborted and end, and `run_target` returns to [`finish`].
fn spawn_signal_thread(id: u32, stop_asked: Arc<AtomicBool>) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name("fvd-signals".into())
        .spawn(move || {
            let set = stop_signals();
            while let Ok(sig) = set.wait() {
                tracing::info!(signal = %sig, id, "stopping the device");
                // Set first: if the device is not live yet, the live callback
                // sees it after the start and stops the device then.
                stop_asked.store(true, Ordering::SeqCst);
                stop_device(id);
            }
        })
        .map(|_| ())
        .map_err(|e| DaemonError::Sys { what: "spawning the signal thread", source: e })
}

/// Asks the driver to stop the device; the queues then end and the daemon
/// closes the image. Before the device is live the driver has nothing to stop.
fn stop_device(id: u32) {
    match kernel::open_device(id) {
        Ok(ctrl) => {
            if let Err(e) = ctrl.kill_dev() {
                tracing::error!(id, error = %super::error::ublk_why(&e), "stopping the device failed");
            }
        }
        Err(e) => tracing::error!(id, error = %e, "stopping the device failed"),
    }
}
