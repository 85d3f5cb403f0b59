//! `fvd scrub`: verifying every copy of an image's metadata and rewriting
//! what is damaged from a good copy.

use super::{fail, CliError};
use clap::Args;
use fvd::units::parse_size;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "Reads both header slots, both copies of the table and bitmap (each stripe against the \
checksum the header keeps) and every copy of the journal's current blocks. A damaged copy is rewritten from a \
good one; online, metadata no copy holds good is rewritten from the daemon's memory (a checkpoint). Exit 0: \
every copy is good (or was rewritten); 2: damage is left (the lines say where; 'fvd check --repair' keeps what \
can be trusted).\n\
Offline: fvd scrub IMAGE (no daemon may serve it; an image not closed cleanly is recovered first).\n\
Online: fvd scrub -n ID scrubs the image the daemon of device ID serves, one stripe or block at a time, with \
requests going on between them, at no more than --rate (16M per second by default).")]
pub struct ScrubArgs {
    /// The device ID of a running daemon (online scrub).
    #[arg(short = 'n', long = "number", conflicts_with = "image")]
    pub id: Option<u32>,
    /// The image (offline scrub).
    #[arg(required_unless_present = "id")]
    pub image: Option<PathBuf>,
    /// Most metadata bytes read per second (k/M/G suffixes; 0: no limit).
    /// Default: 16M online, no limit offline.
    #[arg(long)]
    pub rate: Option<String>,
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

/// The default pace of an online scrub, in bytes/s.
const ONLINE_RATE: u64 = 16 << 20;

pub fn run(a: ScrubArgs) -> Result<i32, CliError> {
    let rate = match &a.rate {
        Some(t) => Some(parse_size(t).map_err(|e| fail(format!("bad rate '{t}': {e}")))?.0),
        None => a.id.map(|_| ONLINE_RATE),
    }
    .filter(|&r| r > 0);
    let (device, r) = match (a.id, &a.image) {
        (Some(id), _) => {
            let (dev, r) = super::daemon::scrub_live(id, rate)?;
            (Some(dev), r)
        }
        (None, Some(image)) => {
            super::chain_cmds::refuse_if_in_use(std::slice::from_ref(image), "a scrub")?;
            (None, fvd::image::scrub::scrub_offline(image, rate)?)
        }
        (None, None) => return Err(fail("give IMAGE, or -n ID for a device a daemon serves")),
    };
    if a.output == "json" {
        let mut v = serde_json::to_value(&r)?;
        if let (Some(o), Some(d)) = (v.as_object_mut(), device) {
            o.insert("device".into(), serde_json::json!(d));
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(r.exit_code());
    }
    for x in &r.unrepaired {
        println!("ERROR {x}");
    }
    for x in &r.repaired {
        println!("Repaired: {x}");
    }
    for n in &r.notes {
        println!("Note: {n}");
    }
    println!(
        "Scrubbed {}{}: {} header slot(s), {} stripe(s) of the table and bitmap in both copies, {} journal \
         block(s); {} bytes read in {:.3} s; {} repaired, {} left",
        r.image,
        device.map(|d| format!(" ({d})")).unwrap_or_default(),
        r.header_slots,
        r.stripes,
        r.journal_blocks,
        r.bytes_read,
        r.seconds,
        r.repaired.len(),
        r.unrepaired.len()
    );
    Ok(r.exit_code())
}
