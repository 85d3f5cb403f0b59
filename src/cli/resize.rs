//! `fvd resize`: growing an image.

use super::{fail, CliError};
use clap::Args;
use fvd::image::resize::{self, ResizeKind};
use fvd::units::{human, parse_size};
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "Offline: fvd resize IMAGE SIZE grows IMAGE (no daemon may serve it) to SIZE bytes \
(k/M/G/T suffixes; +SIZE grows by that much). The guest sees the old content and zeros past the old end. \
The table grows in place while it has room; past that the metadata moves to the start of the data area \
(with room for the table to double). Crash-safe: after a crash the image reads as before, and running the \
same command again completes it. Shrinking is refused, and so are frozen snapshot layers.\n\
Online: fvd resize -n ID SIZE grows the image a daemon serves and the device with it (requests are held \
meanwhile); it needs a ublk driver with UBLK_F_UPDATE_SIZE (Linux 6.16 and later) and says so otherwise.")]
pub struct ResizeArgs {
    /// The device ID of a running daemon (online resize).
    #[arg(short = 'n', long = "number")]
    pub id: Option<u32>,
    /// IMAGE SIZE (offline), or SIZE (with -n).
    #[arg(required = true, num_args = 1..=2)]
    pub args: Vec<String>,
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

/// SIZE, or +SIZE added to `current`.
pub(super) fn new_size(arg: &str, current: u64) -> Result<u64, CliError> {
    let (plus, num) = match arg.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, arg),
    };
    let n = parse_size(num).map_err(|e| fail(format!("bad size '{arg}': {e}")))?.0;
    if plus {
        current.checked_add(n).ok_or_else(|| fail(format!("bad size '{arg}': too large")))
    } else {
        Ok(n)
    }
}

pub fn run(a: ResizeArgs) -> Result<i32, CliError> {
    let (image, size) = match (a.id, a.args.as_slice()) {
        (None, [image, size]) => (PathBuf::from(image), size.clone()),
        (Some(id), [size]) => return super::daemon::resize_live(id, size, &a.output),
        (None, _) => return Err(fail("give IMAGE SIZE, or -n ID SIZE for a device a daemon serves")),
        (Some(_), _) => return Err(fail("with -n ID give only SIZE")),
    };
    let t0 = std::time::Instant::now();
    super::chain_cmds::refuse_if_in_use(&fvd::image::snapshot::chain_paths(&image)[..1], "a resize")?;
    let current = fvd::image::snapshot::header_at(&image)?.virtual_size;
    let size = new_size(&size, current)?;
    let r = resize::grow(&image, size)?;
    if a.output == "json" {
        super::print_json_timed(&r, t0)?;
        return Ok(0);
    }
    if r.recovered {
        println!("{} was not closed cleanly (or a resize was interrupted): recovered first", image.display());
    }
    let how = match r.kind {
        ResizeKind::Unchanged => {
            println!("{} is already {} ({} bytes): nothing to do", image.display(), human(r.new_size), r.new_size);
            return Ok(0);
        }
        ResizeKind::Header => "header only".to_string(),
        ResizeKind::MovedMetadata => {
            format!("metadata moved to the start of the data area, {} chunk(s) moved", r.moved_chunks)
        }
    };
    println!(
        "Image resized: {} -> {} ({} bytes; {how}); growth up to {} needs no metadata move",
        human(r.old_size),
        human(r.new_size),
        r.new_size,
        human(r.room)
    );
    Ok(0)
}

#[derive(Args, Debug)]
#[command(after_help = "Gives an image made before fvd kept its metadata twice the protection new images \
have: a second, checksummed copy of the table and bitmap, and every journal block written twice. The \
metadata moves to the start of the data area as a resize moves it (crash-safe the same way: after a crash \
the image reads as before, and running the command again completes it); the size stays. No daemon may serve \
the image. Images with the raw layout (--no-table) cannot move their metadata: 'fvd convert' makes a \
protected copy of them.")]
pub struct UpgradeArgs {
    pub image: PathBuf,
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

pub fn upgrade(a: UpgradeArgs) -> Result<i32, CliError> {
    let t0 = std::time::Instant::now();
    super::chain_cmds::refuse_if_in_use(&fvd::image::snapshot::chain_paths(&a.image)[..1], "an upgrade")?;
    let r = resize::upgrade(&a.image)?;
    if a.output == "json" {
        super::print_json_timed(&r, t0)?;
        return Ok(0);
    }
    if r.recovered {
        println!("{} was not closed cleanly (or a resize was interrupted): recovered first", a.image.display());
    }
    match r.kind {
        ResizeKind::Unchanged => println!("{}: its metadata is kept twice already: nothing to do", a.image.display()),
        _ => println!(
            "{}: the table and bitmap are now kept twice with checksums, and the journal's blocks twice \
             (metadata moved to the start of the data area, {} chunk(s) moved)",
            a.image.display(),
            r.moved_chunks
        ),
    }
    Ok(0)
}
