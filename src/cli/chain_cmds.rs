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
