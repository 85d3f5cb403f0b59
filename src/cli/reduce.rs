//! `fvd reduce IMAGE`: give back the slack of an image on a linear LV.

use super::CliError;
use clap::Args;
use fvd::storage::Slack;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "The LV of an image that no daemon writes (stopped, or a frozen snapshot layer, which may be \
read through a running device's chain) is reduced to the end of the last chunk the image uses, rounded up to the \
volume group's extent: the space the daemon grew ahead goes back to the volume group. Nothing the image uses moves \
and no header changes, so a crash at any point leaves the image whole. Snapshots and stops do this by themselves \
(an LV tagged fvd-keep-slack keeps its slack at a stop); this command is for images left larger (an older fvd, a \
commit or rebase into a layer, a failed lvreduce). Files, plain block devices and thin LVs have nothing to give \
back. An image not closed cleanly is refused: recover it first.")]
pub struct ReduceArgs {
    pub image: PathBuf,
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

pub fn run(a: ReduceArgs) -> Result<i32, CliError> {
    let t0 = std::time::Instant::now();
    let g = fvd::image::slack::give_back_at(&a.image, Slack::Asked)?;
    if a.output == "json" {
        let v = serde_json::json!({
            "image": a.image,
            "reduced": g.is_some(),
            "size-before": g.map(|g| g.from),
            "size": g.map(|g| g.to),
        });
        super::print_json_timed(&v, t0)?;
        return Ok(0);
    }
    match g {
        Some(g) => println!(
            "{}: reduced from {} to {} bytes ({} MiB given back)",
            a.image.display(),
            g.from,
            g.to,
            (g.from - g.to) >> 20
        ),
        None => println!("{}: nothing to give back", a.image.display()),
    }
    Ok(0)
}
