//! One device under torture: its storage, its chain of layers, its daemon, its block
//! device's file and its model; and the commands (fvd, lvm, dmsetup) run with a bound.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::log::Log;
use crate::model::Model;

/// How long any one command may take before it counts as a hang (software emulation).
pub const COMMAND_BOUND: Duration = Duration::from_secs(240);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An image file on the guest's tmpfs.
    File,
    /// A linear LV in a volume group close to full; the daemon grows it.
    Lv,
    /// A thin LV in a small thin pool.
    Thin,
    /// A loop device full of old random bytes, behind a device-mapper table that
    /// turns into dm-flakey's error_writes during a fault window.
    Flakey,
    /// An overlay over a raw base image that holds stamps of its own.
    Overlay,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "file" => Kind::File,
            "lv" => Kind::Lv,
            "thin" => Kind::Thin,
            "flakey" => Kind::Flakey,
            "overlay" => Kind::Overlay,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Lv => "lv",
            Kind::Thin => "thin",
            Kind::Flakey => "flakey",
            Kind::Overlay => "overlay",
        }
    }
}

/// The daemon's state as the controller left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Running {
        id: u32,
        pid: i32,
    },
    /// Killed or stopped on purpose: its death is expected.
    Away,
}

pub struct Device {
    pub index: u32,
    pub kind: Kind,
    /// Where the first layer lives (a file path, an LV or a dm device).
    pub storage: String,
    /// Every layer, bottom first; the last one is served.
    pub layers: Mutex<Vec<String>>,
    pub daemon: Mutex<Daemon>,
    /// The open block device; writers hold it shared per request, the controller
    /// takes it whole to stop, start or check the device.
    pub io: RwLock<Option<File>>,
    pub model: Mutex<Model>,
    /// Crashes so far (kills, forced stops).
    pub crashes: AtomicU64,
    /// While set, requests may fail (a fault window, a full volume group).
    pub trouble: AtomicBool,
    /// While non-zero, requests may wait without bound (daemon stopped by SIGSTOP or dead).
    pub paused: AtomicU32,
    /// When the last pause ended (ms since start): the hang bound starts again there.
    pub unpaused_ms: AtomicU64,
    /// A controller operation is under way on this device.
    pub busy: AtomicBool,
    /// The device's virtual size now.
    pub size: AtomicU64,
}

impl Device {
    /// A device no daemon serves yet, its chain `layers` (bottom first), its model `model`.
    pub fn new(index: u32, kind: Kind, layers: Vec<String>, model: Model, size: u64) -> Device {
        Device {
            index,
            kind,
            storage: layers.first().cloned().unwrap_or_default(),
            layers: Mutex::new(layers),
            daemon: Mutex::new(Daemon::Away),
            io: RwLock::new(None),
            model: Mutex::new(model),
            crashes: AtomicU64::new(0),
            trouble: AtomicBool::new(false),
            paused: AtomicU32::new(0),
            unpaused_ms: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            size: AtomicU64::new(size),
        }
    }

    pub fn top(&self) -> String {
        self.layers.lock().map(|l| l.last().cloned().unwrap_or_default()).unwrap_or_default()
    }
}

/// The result of a command run with a bound.
pub struct Out {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `prog args` with COMMAND_BOUND; `Err` only when it hung (was killed) or could not start.
pub fn run(log: &Log, prog: &str, args: &[&str]) -> Result<Out, String> {
    let t0 = Instant::now();
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| format!("cannot run {prog}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(COMMAND_BOUND) {
        Ok(r) => r.map_err(|e| format!("{prog}: {e}"))?,
        Err(_) => {
            // SAFETY: kill(2) on a pid we spawned and have not reaped; no memory is involved.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Err(format!("HANG: `{prog} {}` took more than {} s", args.join(" "), COMMAND_BOUND.as_secs()));
        }
    };
    let o = Out {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    };
    log.line(&format!(
        "  $ {prog} {} -> {} in {} ms{}",
        args.join(" "),
        o.code.map_or("signal".to_string(), |c| c.to_string()),
        t0.elapsed().as_millis(),
        if o.ok { String::new() } else { format!(": {}", last_line(&o.stderr)) }
    ));
    Ok(o)
}

pub fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

/// Opens a block device for direct I/O.
pub fn open_direct(path: &str) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))
}

/// The pid a device's state file names.
pub fn daemon_pid(id: u32) -> Option<i32> {
    let run = std::env::var("FVD_RUN_DIR").unwrap_or_else(|_| "/run/fvd".into());
    let text = std::fs::read_to_string(format!("{run}/{id}.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("pid")?.as_i64().map(|p| p as i32)
}

pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; no memory is involved.
    unsafe { libc::kill(pid, 0) == 0 }
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid read from the daemon's state file; no memory is involved.
    unsafe { libc::kill(pid, sig) };
}

/// Waits up to `secs` for `path` to exist.
pub fn wait_path(path: &str, secs: u64) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if std::path::Path::new(path).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn now_ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64
}
