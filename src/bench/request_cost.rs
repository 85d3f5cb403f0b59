//! `fvd bench --request-cost KIND --count N`: N requests of one kind, one after
//! another, through the code a queue runs for each request (the hybrid
//! queue's: `Image::fast_begin`, its one SQE and `Image::fast_end` when the
//! fast path takes it, else `ublk::request::execute`; with
//! `FVD_QUEUE_PATH=async`, `execute` always), on the image as the daemon
//! opens it (with a volatile log), for an instruction count under callgrind. `scripts/request-cost`
//! runs it twice with different N and divides the difference of the two counts
//! by the difference of the Ns: the user-space instructions of one request,
//! free of the set-up and of timing noise (the same binary gives the same count
//! on a busy machine). The engine is the crate's own io_uring
//! (`io::uring::Uring`), where a queue uses libublk's ring: the seam differs,
//! the image path is the same.
//!
//! Kinds (4 KiB each, at pseudo-random 4 KiB-aligned offsets):
//! - `read`, `overwrite`: within 64 chunks written at set-up;
//! - `first-write`: each into a chunk not yet allocated (the set-up is the same
//!   for every N: the image is large enough for any N up to 3,000).
//!
//! Layouts: `default` (1 MiB chunks, 64 KiB blocks) and `no-table`.

use super::XorShift;
use fvd::image::{self, CreateOptions, Image, OpenOptions};
use fvd::io::uring::Uring;
use fvd::ublk::hybrid::execute_host;
use fvd::ublk::request::{execute, Op, Policy, Request};
use std::path::Path;

const CHUNK: u64 = 1 << 20;
/// Chunks written at set-up (reads and overwrites fall in them).
const WARM: u64 = 64;
/// The image: room for `WARM` chunks and 3,000 first writes.
const SIZE: u64 = 4 << 30;
const BS: u64 = 4096;

/// What `--request-cost` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Read,
    Overwrite,
    FirstWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    Default,
    NoTable,
}

/// Runs `count` requests of `kind` on a fresh image of `layout` in `dir`.
pub fn run(dir: &Path, kind: Kind, layout: Layout, count: u64) -> Result<(), String> {
    if kind == Kind::FirstWrite && count > (SIZE / CHUNK - WARM) {
        return Err(format!("--count {count}: at most {} first writes", SIZE / CHUNK - WARM));
    }
    let p = dir.join("request-cost.fvd");
    let _ = std::fs::remove_file(&p);
    // The daemon keeps its volatile log in its run folder on tmpfs.
    let vlog = Path::new("/dev/shm").join(format!("fvd-request-cost-{}.vlog", std::process::id()));
    let opts = CreateOptions {
        size: Some(SIZE),
        block_size: 64 << 10,
        chunk_size: (layout == Layout::Default).then_some(CHUNK as u32),
        ..Default::default()
    };
    image::create(&p, &opts).map_err(|e| e.to_string())?;
    let img = Image::open(&p, &OpenOptions { volatile_log: Some(vlog.clone()), ..Default::default() })
        .map_err(|e| e.to_string())?;
    let ring = Uring::new(64).map_err(|e| format!("io_uring: {e}"))?;
    let pol = Policy::default().for_image(&img);
    let mut buf = vec![0x5au8; BS as usize];
    let hybrid = fvd::ublk::hybrid::chosen();
    // One task runs every request in turn, as a queue's tag task does (it
    // lives as long as the queue; nothing is spawned per request).
    let all = async {
        let mut one = async |op: Op, off: u64| -> Result<(), String> {
            let req = Request { op, off, len: BS };
            let r = if hybrid {
                execute_host(&img, &ring, req, &mut buf, pol).await
            } else {
                execute(&img, &ring, req, &mut buf, pol).await
            };
            if r != BS as i32 {
                return Err(format!("{op:?} at {off:#x}: {r}"));
            }
            Ok(())
        };
        // The same set-up for every count.
        for c in 0..WARM {
            one(Op::Write { fua: false }, c * CHUNK).await?;
        }
        let mut rng = XorShift::new(0x0fd0_0c05_7000_0001);
        let warm_off = |r: u64| (r % (WARM * CHUNK / BS)) * BS;
        for i in 0..count {
            let r = rng.next();
            match kind {
                Kind::Read => one(Op::Read, warm_off(r)).await?,
                Kind::Overwrite => one(Op::Write { fua: false }, warm_off(r)).await?,
                Kind::FirstWrite => one(Op::Write { fua: false }, (WARM + i) * CHUNK + (r % (CHUNK / BS)) * BS).await?,
            }
        }
        Ok::<(), String>(())
    };
    ring.block_on(all).map_err(|e| format!("ring: {e}"))??;
    if !img.has_volatile_log() {
        eprintln!(
            "request-cost: no volatile log (no tmpfs at /dev/shm): metadata was journaled before each write completed"
        );
    }
    drop(img);
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::remove_file(&vlog);
    Ok(())
}
