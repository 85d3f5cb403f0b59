//! Daemon commands: start, stop, list, recover (rublk / ublksrv conventions).

use super::{fail, CliError};
use clap::Args;
use fvd::ublk::control::{self, Stopped};
use fvd::ublk::options::{Mode, ServeOptions};
use fvd::ublk::report::Reporter;
use fvd::ublk::serve::serve;
use fvd::ublk::spawn::{detach, startup_log};
use fvd::ublk::state::RunDir;
use fvd::ublk::zc::ZeroCopy;
use fvd::ublk::{kernel, DaemonError};
use fvd::units::human;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct StartArgs {
    /// The image file or block device.
    pub image: PathBuf,
    /// Device ID (N in /dev/ublkbN); the kernel picks one when omitted.
    #[arg(short = 'n', long = "number", allow_negative_numbers = true)]
    pub id: Option<i32>,
    /// Number of queues (default: min(cores, 4)).
    #[arg(long)]
    pub queues: Option<u16>,
    /// Queue depth.
    #[arg(long, default_value_t = 128)]
    pub depth: u16,
    /// Make every write durable before completing it.
    #[arg(long)]
    pub writethrough: bool,
    /// Serve the image read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Copy-on-read: reads served from the base are also stored in the image
    /// (the image's default when not given).
    #[arg(long)]
    pub copy_on_read: bool,
    /// Prefetch the whole base into the image in the background.
    #[arg(long)]
    pub prefetch: bool,
    /// Upper bound on the prefetch rate, bytes per second (k/M/G suffixes).
    #[arg(long, value_parser = fvd::units::parse_rate)]
    pub prefetch_rate: Option<u64>,
    /// Stay in the foreground instead of detaching.
    #[arg(long)]
    pub foreground: bool,
    /// Logical block size of the device: 512 or 4096.
    #[arg(long, default_value_t = 512, value_parser = logical_block_arg)]
    pub logical_block_size: u32,
    /// Complete writes that allocate or copy before their metadata is
    /// journaled (faster first writes; a daemon crash then loses them, so
    /// `fvd recover` can't hide the crash from applications).
    #[arg(long)]
    pub lazy_metadata: bool,
    /// Writeback mode: journal a metadata update (with its data) once it has
    /// waited this long without a flush from the guest ("5s", "500ms"; 0: only
    /// on flush).
    #[arg(long, default_value = "5s", value_parser = interval_arg)]
    pub commit_interval: Duration,
    /// Growth step of the image's storage: the file, or the logical volume
    /// (default: 1 GiB, or an LV's fvd-grow-unit=SIZE tag; k/M/G suffixes).
    #[arg(long, value_parser = |s: &str| fvd::units::parse_size(s).map(|b| b.0))]
    pub grow_unit: Option<u64>,
    /// Zero copy: request data moves between the kernel's pages and the
    /// image's storage without passing through the daemon (UBLK_F_AUTO_BUF_REG,
    /// Linux 6.16 and later). auto: when the driver has it; on: fail without it.
    /// Default: $FVD_ZERO_COPY, else auto.
    #[arg(long, value_name = "auto|on|off")]
    pub zero_copy: Option<ZeroCopy>,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    #[arg(short = 'n', long = "number", allow_negative_numbers = true)]
    pub id: Option<i32>,
    #[arg(long)]
    pub all: bool,
    /// Stop the device that serves this image (what fvd@.service's ExecStop uses).
    #[arg(long, conflicts_with_all = ["id", "all"])]
    pub image: Option<std::path::PathBuf>,
    /// Seconds to wait for a daemon to finish its stop.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Stop even if the device is mounted or held (the file system then sees I/O errors).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    #[arg(short = 'n', long = "number", allow_negative_numbers = true)]
    pub id: i32,
}

fn logical_block_arg(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" | "4k" | "4K" => Ok(4096),
        _ => Err(format!("'{s}': the logical block size is 512 or 4096")),
    }
}

/// "5s", "500ms", "2" (seconds), "0" (off).
fn interval_arg(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}': give an interval such as 5s, 500ms or 0");
    let (num, scale) = match s.trim() {
        t if t.ends_with("ms") => (&t[..t.len() - 2], 1),
        t if t.ends_with('s') => (&t[..t.len() - 1], 1000),
        t => (t, 1000),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(scale).map(Duration::from_millis).ok_or_else(bad)
}

fn err(e: DaemonError) -> CliError {
    fail(e.to_string())
}

fn device_id(id: i32) -> Result<u32, CliError> {
    u32::try_from(id).map_err(|_| err(DaemonError::BadId(i64::from(id))))
}

fn default_queues() -> u16 {
    std::thread::available_parallelism().map(|n| n.get().min(4) as u16).unwrap_or(1)
}

pub fn start(a: StartArgs) -> Result<i32, CliError> {
    kernel::check_driver().map_err(err)?;
    let unprivileged = kernel::privilege("fvd start").map_err(err)? == kernel::Privilege::Unprivileged;
    let image = std::fs::canonicalize(&a.image).map_err(|_| err(DaemonError::NoImage(a.image.clone())))?;
    let id = a.id.map(device_id).transpose()?;
    let queues = a.queues.unwrap_or_else(default_queues);
    if queues == 0 || queues > libublk::sys::UBLK_MAX_NR_QUEUES as u16 {
        return Err(fail(format!("--queues must be 1 to {}", libublk::sys::UBLK_MAX_NR_QUEUES)));
    }
    if a.depth == 0 || u32::from(a.depth) > libublk::sys::UBLK_MAX_QUEUE_DEPTH {
        return Err(fail(format!("--depth must be 1 to {}", libublk::sys::UBLK_MAX_QUEUE_DEPTH)));
    }
    let zero_copy = match a.zero_copy {
        Some(z) => z,
        None => match std::env::var("FVD_ZERO_COPY") {
            Ok(v) if !v.is_empty() => v.parse().map_err(|e: String| fail(format!("FVD_ZERO_COPY: {e}")))?,
            _ => ZeroCopy::Auto,
        },
    };
    let rd = RunDir::system();
    rd.check_writable().map_err(err)?;
    let log = (!a.foreground).then(|| startup_log(&rd));
    let o = ServeOptions {
        image,
        mode: Mode::Add { id },
        queues,
        depth: a.depth,
        writethrough: a.writethrough,
        read_only: a.read_only,
        logical_block: a.logical_block_size,
        lazy_metadata: a.lazy_metadata,
        copy_on_read: a.copy_on_read.then_some(true),
        prefetch: a.prefetch,
        prefetch_rate: a.prefetch_rate,
        commit_interval: (!a.commit_interval.is_zero()).then_some(a.commit_interval),
        grow_unit: a.grow_unit,
        unprivileged,
        zero_copy,
        run_dir: rd.clone(),
        log: log.clone(),
        recoveries: 0,
        snapshots: 0,
        last_snapshot_held_ms: None,
    };
    match log {
        None => serve(o, Reporter::Stdout).map_err(err)?,
        Some(log) => println!("{}", detach(&rd, log, false, move |rep| serve(o, rep)).map_err(err)?),
    }
    Ok(0)
}

pub fn stop(a: StopArgs) -> Result<i32, CliError> {
    // Unprivileged users stop their own devices: the kernel checks that
    // they may open the device's /dev/ublkcN, and signals reach only their
    // own daemons.
    kernel::privilege("fvd stop").map_err(err)?;
    let rd = RunDir::system();
    let ids: Vec<u32> = match (a.id, a.all, &a.image) {
        (Some(id), false, None) => vec![device_id(id)?],
        (None, true, None) => rd.list().map_err(err)?.iter().map(|s| s.id).collect(),
        (None, false, Some(img)) => {
            let want = std::fs::canonicalize(img).map_err(|e| fail(format!("{}: {e}", img.display())))?;
            let ids: Vec<u32> = rd
                .list()
                .map_err(err)?
                .iter()
                .filter(|s| std::fs::canonicalize(&s.image).is_ok_and(|p| p == want))
                .map(|s| s.id)
                .collect();
            if ids.is_empty() {
                return Err(fail(format!("no device serves {}", img.display())));
            }
            ids
        }
        _ => return Err(fail("fvd stop: give -n ID, --image IMAGE or --all")),
    };
    let mut failed = None;
    for id in ids {
        match control::stop(&rd, id, Duration::from_secs(a.timeout), a.force) {
            Ok(Stopped::Clean(st)) => println!("stopped {} ({})", st.device, st.image.display()),
            Ok(Stopped::Repaired(st, closed)) => println!(
                "stopped {} ({}): its daemon had died; device deleted, {}",
                st.device,
                st.image.display(),
                if closed {
                    "image journal replayed and closed clean"
                } else {
                    "image left to the daemon now serving it"
                }
            ),
            Err(e) => {
                eprintln!("fvd: {e}");
                failed = Some(1);
            }
        }
    }
    Ok(failed.unwrap_or(0))
}

pub fn list(a: ListArgs) -> Result<i32, CliError> {
    let devs = control::list(&RunDir::system()).map_err(err)?;
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&devs)?);
        return Ok(0);
    }
    if devs.is_empty() {
        return Ok(0);
    }
    println!(
        "{:<4} {:<13} {:<9} {:>7} {:>6} {:>9} {:>17} {:>9} {:>7}  {:<30} BASE",
        "ID", "DEVICE", "STATE", "PID", "QUEUES", "SIZE", "LV USED/SIZE", "PREFETCH", "REC/WR", "IMAGE"
    );
    for d in &devs {
        let live = d.live.as_ref();
        // An LV's use and size (the difference is the room grown ahead).
        let lv = d.storage.as_ref().filter(|v| v["kind"] == "lvm").map_or("-".into(), |v| {
            let n = |k: &str| v[k].as_u64().map_or("?".into(), human);
            format!("{}/{}", n("used"), n("size"))
        });
        println!(
            "{:<4} {:<13} {:<9} {:>7} {:>6} {:>9} {:>17} {:>9} {:>7}  {:<30} {}",
            d.st.id,
            d.st.device,
            d.status,
            d.st.pid,
            d.st.queues,
            human(d.st.virtual_size),
            lv,
            live.and_then(|l| l.prefetch.as_ref()).map_or("-".into(), prefetch_cell),
            live.map_or("-".into(), |l| format!("{:.3}", l.records_per_write)),
            d.st.image.display(),
            d.st.base.as_deref().unwrap_or("-")
        );
    }
    Ok(0)
}

/// "done", "42.0%", "42.0%~" (backing off), "failed", "off" (not running).
pub fn prefetch_cell(p: &fvd::image::LivePrefetch) -> String {
    use fvd::image::PrefetchState as S;
    match p.state {
        S::Done => "done".into(),
        S::Failed => "failed".into(),
        S::BackingOff => format!("{:.1}%~", p.percent),
        S::Running => format!("{:.1}%", p.percent),
        S::Idle => "off".into(),
    }
}

pub fn recover(a: RecoverArgs) -> Result<i32, CliError> {
    kernel::check_root("fvd recover").map_err(err)?;
    let id = device_id(a.id)?;
    kernel::check_driver().map_err(err)?;
    println!("{}", control::recover(&RunDir::system(), id).map_err(err)?);
    Ok(0)
}

/// How long `fvd snapshot -n` waits for the daemon's answer.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(300);

/// `fvd snapshot -n ID NEW`: an online snapshot of the device a daemon serves.
pub fn snapshot_live(id: u32, new: &std::path::Path, output: &str) -> Result<i32, CliError> {
    use fvd::ublk::channel::{ask, Reply, Request};
    let rd = RunDir::system();
    let st = rd.read(id).map_err(err)?.ok_or(DaemonError::UnknownId(id)).map_err(err)?;
    if !kernel::daemon_alive(st.pid) {
        return Err(fail(format!("device {id}: its daemon is not running; run 'fvd recover -n {id}' first")));
    }
    let new = absolute(new)?;
    match ask(&rd, id, &Request::Snapshot { new: new.clone() }, SNAPSHOT_WAIT).map_err(err)? {
        Reply::Snapshot(t) => {
            if output == "json" {
                let v = serde_json::json!({
                    "device": st.device,
                    "frozen": t.frozen,
                    "overlay": t.overlay,
                    "held-ms": t.held_ms,
                    "drain-ms": t.drain_ms,
                    "snapshots": t.snapshots,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "Snapshot of {}: {} is frozen; {} is the live disk over it (requests held {:.3} ms)",
                    st.device,
                    t.frozen.display(),
                    t.overlay.display(),
                    t.held_ms
                );
            }
            Ok(0)
        }
        Reply::Error(e) => Err(fail(format!("device {id}: online snapshot to {}: {e}", new.display()))),
        _ => Err(fail(format!("device {id}: the daemon answered a snapshot with something else"))),
    }
}

/// `fvd resize -n ID SIZE`: grows the image a daemon serves and the device with it.
pub fn resize_live(id: u32, size_arg: &str, output: &str) -> Result<i32, CliError> {
    use fvd::ublk::channel::{ask, Reply, Request};
    let rd = RunDir::system();
    let st = rd.read(id).map_err(err)?.ok_or(DaemonError::UnknownId(id)).map_err(err)?;
    if !kernel::daemon_alive(st.pid) {
        return Err(fail(format!("device {id}: its daemon is not running; run 'fvd recover -n {id}' first")));
    }
    let size = super::resize::new_size(size_arg, st.virtual_size)?;
    match ask(&rd, id, &Request::Resize { size }, SNAPSHOT_WAIT).map_err(err)? {
        Reply::Resized(r) => {
            if output == "json" {
                let mut v = serde_json::to_value(&r)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("device".into(), serde_json::json!(st.device));
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{} grown online: {} -> {} ({}; requests held {:.3} ms)",
                    st.device,
                    fvd::units::human(r.old_size),
                    fvd::units::human(r.new_size),
                    r.kind,
                    r.held_ms
                );
            }
            Ok(0)
        }
        Reply::Error(e) => Err(fail(format!("device {id}: online resize to {size} bytes: {e}"))),
        _ => Err(fail(format!("device {id}: the daemon answered a resize with something else"))),
    }
}

/// How long `fvd scrub -n` waits for the daemon's answer.
const SCRUB_WAIT: Duration = Duration::from_secs(3600);

/// `fvd scrub -n ID`: asks the daemon of device `id` to scrub its image.
pub fn scrub_live(id: u32, rate: Option<u64>) -> Result<(String, fvd::image::scrub::ScrubReport), CliError> {
    use fvd::ublk::channel::{ask, Reply, Request};
    let rd = RunDir::system();
    let st = rd.read(id).map_err(err)?.ok_or(DaemonError::UnknownId(id)).map_err(err)?;
    if !kernel::daemon_alive(st.pid) {
        return Err(fail(format!("device {id}: its daemon is not running; run 'fvd recover -n {id}' first")));
    }
    match ask(&rd, id, &Request::Scrub { rate }, SCRUB_WAIT).map_err(err)? {
        Reply::Scrubbed(r) => Ok((st.device, r)),
        Reply::Error(e) => Err(fail(format!("device {id}: scrub: {e}"))),
        _ => Err(fail(format!("device {id}: the daemon answered a scrub with something else"))),
    }
}

/// NEW as an absolute path (it does not exist yet: its folder is made absolute).
fn absolute(p: &std::path::Path) -> Result<PathBuf, CliError> {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| fail(format!("current folder: {e}")))?.join(p)
    };
    let name = joined.file_name().ok_or_else(|| fail(format!("{}: not a file name", p.display())))?;
    let dir = joined.parent().unwrap_or(std::path::Path::new("/"));
    let dir = std::fs::canonicalize(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(interval_arg("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(interval_arg("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(interval_arg("2"), Ok(Duration::from_secs(2)));
        assert_eq!(interval_arg("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "-1", "1.5s", "5m", "99999999999999999999"] {
            assert!(interval_arg(bad).is_err(), "{bad}");
        }
    }
}
