//! Chains of snapshot layers: snapshot, commit, rebase (qemu-img conventions).

use super::{fail, CliError};
use clap::Args;
use fvd::format::header::uuid_text;
use fvd::image::snapshot;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "Offline: fvd snapshot IMAGE NEW — IMAGE is frozen as the point-in-time copy and NEW, \
an empty overlay over it, is the live disk from then on.\n\
Online: fvd snapshot -n ID NEW — the same on the device a daemon serves: requests are held while the \
daemon flushes, freezes the current top and switches to NEW.")]
pub struct SnapshotArgs {
    /// The device ID of a running daemon (online snapshot).
    #[arg(short = 'n', long = "number")]
    pub id: Option<u32>,
    /// IMAGE NEW (offline), or NEW (with -n).
    #[arg(required = true, num_args = 1..=2)]
    pub paths: Vec<PathBuf>,
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

pub fn snapshot(a: SnapshotArgs) -> Result<i32, CliError> {
    match (a.id, a.paths.as_slice()) {
        (None, [image, new]) => {
            let t0 = std::time::Instant::now();
            let h = snapshot::snapshot(image, new)?;
            if a.output == "json" {
                let v = serde_json::json!({
                    "frozen": image.display().to_string(),
                    "frozen-uuid": uuid_text(&h.uuid),
                    "overlay": new.display().to_string(),
                    "seconds": t0.elapsed().as_secs_f64(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "Snapshot: {} is frozen (uuid {}); {} is the live disk over it",
                    image.display(),
                    uuid_text(&h.uuid),
                    new.display()
                );
            }
            Ok(0)
        }
        (Some(id), [new]) => super::daemon::snapshot_live(id, new, &a.output),
        (None, _) => Err(fail("give IMAGE NEW, or -n ID NEW for a device a daemon serves")),
        (Some(_), _) => Err(fail("with -n ID give only NEW")),
    }
}

#[derive(Args, Debug)]
#[command(after_help = "Writes IMAGE's data into its base (or into BASE, a layer further down its chain). \
Afterwards IMAGE reads the same and is empty (unless -d); layers between IMAGE and BASE are marked invalid. \
Crash-safe: after a crash the chain still reads what IMAGE read, and running the same command again \
(or plain 'fvd commit IMAGE') completes it.")]
pub struct CommitArgs {
    pub image: PathBuf,
    /// The layer to commit into (default: IMAGE's base).
    #[arg(short = 'b', long = "base")]
    pub base: Option<PathBuf>,
    /// Do not empty IMAGE afterwards.
    #[arg(short = 'd')]
    pub keep: bool,
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

/// Refuses when a device (served, or waiting for recovery) reads any of `paths`
/// through its chain: a commit or rebase changes layers under it.
pub(super) fn refuse_if_in_use(paths: &[PathBuf], what: &str) -> Result<(), CliError> {
    let rd = fvd::ublk::state::RunDir::system();
    for st in rd.list().unwrap_or_default() {
        let chain = snapshot::chain_paths(&st.image);
        if let Some(p) = paths.iter().find(|p| chain.contains(p)) {
            return Err(fail(format!(
                "{}: {what} would change it while device {} ({}) reads it through its chain; stop that device first",
                p.display(),
                st.id,
                st.device
            )));
        }
    }
    Ok(())
}

pub fn commit(a: CommitArgs) -> Result<i32, CliError> {
    let t0 = std::time::Instant::now();
    // The image and its layers down to (at most) the bottom: a commit writes into
    // the target and marks the layers between invalid.
    let mut chain = snapshot::chain_paths(&a.image);
    let depth = match (&a.base, snapshot::header_at(&a.image)) {
        (Some(b), _) => {
            let b = std::fs::canonicalize(b).unwrap_or_else(|_| b.clone());
            chain.iter().position(|p| *p == b).unwrap_or(chain.len())
        }
        (None, Ok(h)) if h.is_committing() && h.commit_depth > 0 => h.commit_depth as usize,
        _ => 1,
    };
    chain.truncate(depth + 1);
    refuse_if_in_use(&chain, "a commit")?;
    let r = super::with_progress(|p| fvd::image::fold::commit(&a.image, a.base.as_deref(), a.keep, p))?;
    // The target grew by steps as the commit wrote; an emptied image uses nothing.
    give_back(std::path::Path::new(&r.target));
    give_back(&a.image);
    if a.output == "json" {
        super::print_json_timed(&r, t0)?;
        return Ok(0);
    }
    println!(
        "Image committed into {} (depth {}): {} of data and {} of zeros written in {:.1}s",
        r.target,
        r.depth,
        fvd::units::human(r.copied_bytes),
        fvd::units::human(r.zeroed_bytes),
        t0.elapsed().as_secs_f64()
    );
    for l in &r.invalidated {
        println!("Marked invalid (a layer in between): {l}");
    }
    println!("{}", if r.emptied { "Image emptied." } else { "Image kept as it was (-d)." });
    Ok(0)
}

#[derive(Args, Debug)]
#[command(after_help = "Safe mode (the default) copies into IMAGE every block where the old and the new base \
differ, so IMAGE reads the same; then the base reference changes. -b \"\" makes IMAGE stand alone. \
-u only rewrites the reference and the recorded identity (the deliberate override after a base was \
moved, or replaced on purpose).")]
pub struct RebaseArgs {
    pub image: PathBuf,
    /// The new base ("" for none).
    #[arg(short = 'b', long = "base", required = true)]
    pub base: String,
    /// Unsafe: only rewrite the base reference and its recorded identity.
    #[arg(short = 'u')]
    pub unsafe_mode: bool,
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

pub fn rebase(a: RebaseArgs) -> Result<i32, CliError> {
    let t0 = std::time::Instant::now();
    refuse_if_in_use(&snapshot::chain_paths(&a.image)[..1], "a rebase")?;
    let new = (!a.base.is_empty()).then(|| std::path::Path::new(&a.base));
    let r = super::with_progress(|p| fvd::image::rebase::rebase(&a.image, new, a.unsafe_mode, p))?;
    give_back(&a.image);
    if a.output == "json" {
        super::print_json_timed(&r, t0)?;
        return Ok(0);
    }
    match (new, a.unsafe_mode) {
        (None, _) => println!("{} now stands alone", a.image.display()),
        (Some(b), true) => {
            println!("{} now records {} as its base (unsafe: nothing copied)", a.image.display(), b.display())
        }
        (Some(b), false) => println!("{} is now over {}", a.image.display(), b.display()),
    }
    if !a.unsafe_mode {
        println!(
            "{} copied into the image ({} compared) in {:.1}s",
            fvd::units::human(r.copied_bytes),
            fvd::units::human(r.compared_bytes),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(0)
}

/// After a commit or rebase: an FVD image on a linear LV gives back what it does not
/// use (logged; `fvd reduce` tries again). Other images and bases are left alone.
fn give_back(path: &std::path::Path) {
    if snapshot::header_at(path).is_ok() {
        fvd::image::slack::log_give_back(path, fvd::image::slack::give_back_at(path, fvd::storage::Slack::Asked));
    }
}
