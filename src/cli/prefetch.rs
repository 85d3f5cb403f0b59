//! `fvd prefetch`: copy the whole base into the image offline, after which
//! the base is no longer needed.

use super::CliError;
use clap::Args;
use fvd::image::{Image, OpenOptions, PrefetchOptions};
use fvd::io::uring::Uring;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct PrefetchArgs {
    pub image: PathBuf,
    /// Upper bound on the copy rate, bytes per second (k/M/G suffixes).
    #[arg(long, value_parser = fvd::units::parse_rate)]
    pub rate: Option<u64>,
}

pub fn run(a: PrefetchArgs) -> Result<i32, CliError> {
    let img = Image::open(&a.image, &OpenOptions { copy_on_read: Some(false), ..Default::default() })?;
    let (done, total, _) = img.prefetch_progress();
    if total == 0 {
        println!("{}: no base, nothing to prefetch", a.image.display());
        return Ok(0);
    }
    let bs = img.block_size() as u64;
    let pb = super::progress_bar(total * bs);
    pb.set_position(done * bs);
    let ring = Uring::new(64)?;
    let exe = smol::LocalExecutor::new();
    // No competing guest offline: no floor, only the optional rate limit.
    let opts = PrefetchOptions { rate_limit: a.rate, floor: 0, ..Default::default() };
    let img_ref = &img;
    let ring_ref = &ring;
    let pb_ref = &pb;
    let work = exe.spawn(async move { img_ref.prefetch(ring_ref, &opts).await });
    let ticker = exe.spawn(async move {
        loop {
            let (c, t, _) = img_ref.prefetch_progress();
            pb_ref.set_position(c * bs);
            if c >= t {
                break;
            }
            fvd::io::sleep(ring_ref, Duration::from_millis(200)).await;
        }
    });
    ring.run(&exe, async move {
        let r = work.await;
        ticker.cancel().await;
        r
    })??;
    pb.finish_and_clear();
    img.close()?;
    let copied = img.prefetch.copied_bytes.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{}: prefetch done, {} copied from the base; the base is no longer needed",
        a.image.display(),
        fvd::units::human(copied)
    );
    Ok(0)
}
