//! The command line: qemu-img / qemu-io conventions for image commands,
//! rublk / ublksrv conventions for the daemon commands.

mod chain_cmds;
mod convert;
pub mod daemon;
mod image_cmds;
mod io_cmd;
mod prefetch;
mod reduce;
mod resize;
mod scrub;
mod shell;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "fvd", version, about = "Fast Virtual Disk: FVD images served as Linux block devices through ublk")]
pub struct Cli {
    /// Log line format on stderr (a daemon's log file): human-readable text, or one JSON
    /// object per line for log shippers. RUST_LOG selects what is logged.
    #[arg(long, global = true, value_enum, default_value_t = crate::logging::LogFormat::Text)]
    log_format: crate::logging::LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create an image (a thin copy-on-write overlay when --base is given).
    Create(image_cmds::CreateArgs),
    /// Show an image's geometry, sizes, base, allocation and state.
    Info(image_cmds::InfoArgs),
    /// Check an image's metadata (exit 0 clean, 2 corrupt, 3 leaks only).
    Check(image_cmds::CheckArgs),
    /// Show which ranges are data in the image, in the base, or zero.
    Map(image_cmds::MapArgs),
    /// Freeze an image as a snapshot layer under a new empty overlay (offline, or -n ID online).
    Snapshot(chain_cmds::SnapshotArgs),
    /// Write an image's data into its base, or into a layer further down (-b).
    Commit(chain_cmds::CommitArgs),
    /// Move an image onto another base (safe: it reads the same), or make it stand alone (-b "").
    Rebase(chain_cmds::RebaseArgs),
    /// Grow an image (offline, or -n ID: a live device, where the kernel allows it).
    Resize(resize::ResizeArgs),
    /// Give back the space an image's LV holds past what the image uses (offline; snapshots and stops do it themselves).
    Reduce(reduce::ReduceArgs),
    /// Verify every copy of an image's metadata and rewrite damaged ones from a good copy (offline, or -n ID online).
    Scrub(scrub::ScrubArgs),
    /// Give an image made before the metadata was kept twice its second, checksummed copy (offline).
    Upgrade(resize::UpgradeArgs),
    /// Run qemu-io style commands against an image.
    Io(io_cmd::IoArgs),
    /// Convert between raw and fvd, sparse-aware.
    Convert(convert::ConvertArgs),
    /// Copy the whole base into the image, after which the base is not needed.
    Prefetch(prefetch::PrefetchArgs),
    /// Benchmark the engine against raw files with an fio-like load.
    Bench(crate::bench::BenchArgs),
    /// Serve an image as /dev/ublkbN.
    Start(daemon::StartArgs),
    /// Stop a device: flush, checkpoint, mark clean, delete.
    Stop(daemon::StopArgs),
    /// List fvd devices.
    List(daemon::ListArgs),
    /// Take over a device whose daemon died (ublk user recovery).
    Recover(daemon::RecoverArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(shell::CompletionsArgs),
    /// Write the manual pages (fvd.1 and one per command) into a folder.
    Manpages(shell::ManpagesArgs),
}

/// A failed command: one line for the user, and the exit status.
#[derive(Debug)]
pub struct CliError {
    pub msg: String,
    pub code: i32,
}

impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError { msg: e.to_string(), code: 1 }
    }
}

/// A byte-count progress bar on stderr when it is a terminal, hidden otherwise.
pub(crate) fn progress_bar(total: u64) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    let pb = ProgressBar::new(total);
    if std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} ({eta})") {
            pb.set_style(style);
        }
    } else {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb
}

/// Runs `f` with a progress callback `(done, total)` that draws a bar on a
/// terminal (see [`progress_bar`]), created at the first call and cleared at the end.
pub(crate) fn with_progress<T, E>(f: impl FnOnce(&dyn Fn(u64, u64)) -> Result<T, E>) -> Result<T, E> {
    let bar = std::cell::RefCell::new(None::<indicatif::ProgressBar>);
    let progress = |done: u64, total: u64| {
        bar.borrow_mut().get_or_insert_with(|| progress_bar(total)).set_position(done);
    };
    let r = f(&progress);
    if let Some(b) = bar.borrow_mut().take() {
        b.finish_and_clear();
    }
    r
}

/// Prints `report` as pretty JSON with the command's run time added as `seconds`.
pub(crate) fn print_json_timed(report: &impl serde::Serialize, t0: std::time::Instant) -> Result<(), CliError> {
    let mut v = serde_json::to_value(report)?;
    if let Some(o) = v.as_object_mut() {
        o.insert("seconds".into(), serde_json::json!(t0.elapsed().as_secs_f64()));
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

pub fn fail(msg: impl Into<String>) -> CliError {
    CliError { msg: msg.into(), code: 1 }
}

/// Runs the command line; returns the exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let daemon = matches!(cli.cmd, Cmd::Start(_) | Cmd::Recover(_));
    let detaching = match &cli.cmd {
        Cmd::Start(a) => !a.foreground,
        Cmd::Recover(_) => true,
        _ => false,
    };
    crate::logging::init(detaching, cli.log_format);
    if !daemon {
        // A closed pipe (`fvd info | head`) ends a tool quietly, as it does
        // any other command-line tool, instead of a panic in println!.
        // SAFETY: resetting a signal disposition to its default; no handler runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let r = match cli.cmd {
        Cmd::Create(a) => image_cmds::create(a),
        Cmd::Info(a) => image_cmds::info(a),
        Cmd::Check(a) => image_cmds::check(a),
        Cmd::Map(a) => image_cmds::map(a),
        Cmd::Snapshot(a) => chain_cmds::snapshot(a),
        Cmd::Commit(a) => chain_cmds::commit(a),
        Cmd::Rebase(a) => chain_cmds::rebase(a),
        Cmd::Resize(a) => resize::run(a),
        Cmd::Reduce(a) => reduce::run(a),
        Cmd::Scrub(a) => scrub::run(a),
        Cmd::Upgrade(a) => resize::upgrade(a),
        Cmd::Io(a) => io_cmd::run(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Prefetch(a) => prefetch::run(a),
        Cmd::Bench(a) => crate::bench::run(a).map_err(fail),
        Cmd::Start(a) => daemon::start(a),
        Cmd::Stop(a) => daemon::stop(a),
        Cmd::List(a) => daemon::list(a),
        Cmd::Recover(a) => daemon::recover(a),
        Cmd::Completions(a) => shell::completions(a),
        Cmd::Manpages(a) => shell::manpages(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fvd: {}", e.msg);
            e.code
        }
    }
}

/// Warns on stderr when another process holds `image` open for writing:
/// what a read-only look (check, info, map, convert) then sees may already
/// be out of date.
pub(crate) fn warn_if_written(image: &std::path::Path) {
    if fvd::storage::held_by_writer(image) {
        eprintln!(
            "fvd: warning: {}: another process has it open for writing (a daemon or an fvd command); \
             what follows may be out of date",
            image.display()
        );
    }
}
