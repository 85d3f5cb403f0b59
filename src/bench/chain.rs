//! `fvd bench --chain N`: 4 KiB random reads through the top of a chain of N
//! read-only layers against the same load through the top of a chain of one,
//! in one run. The chain's one depth index (see `fvd::meta::depth`) must make
//! the depth cost next to nothing.
//!
//! Both chains are built in the scratch folder the same way: an fvd bottom
//! whose data covers the whole disk; for the deep chain, N-1 snapshot layers
//! over it, layer k (0 at the bottom) holding each block with probability
//! 1/(k+1), which leaves every block's newest copy in each of the N layers
//! with the same probability 1/N; and an empty top. Every layer writes its own
//! byte pattern, and a sample of reads through each top is checked against
//! the layer that must answer it before anything is timed.

use super::load::{self, Job, JobResult, Pattern, Target};
use super::{median, Ctx, XorShift};
use fvd::image::snapshot::snapshot;
use fvd::image::{self, CreateOptions, Image, OpenOptions};
use fvd::io::uring::Uring;
use fvd::io::AlignedBuf;
use fvd::units::human;
use std::path::{Path, PathBuf};
use std::time::Instant;

const BLOCK: u32 = 64 << 10;
const CHUNK: u32 = 1 << 20;
/// Reads checked against the expected layer before timing.
const CHECKS: usize = 2000;

/// The byte every block of layer `k` holds.
fn pattern(chain: u8, k: usize) -> u8 {
    chain.wrapping_mul(0x40).wrapping_add(0x11 + k as u8)
}

struct Chain {
    name: String,
    depth: usize,
    top: PathBuf,
    files: Vec<PathBuf>,
    /// Per block: the layer (0 = bottom) whose copy the top reads.
    holder: Vec<u8>,
    chain_id: u8,
}

fn e2s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Writes `pattern` over the blocks of `img` for which `pick` is true, in runs
/// of up to one chunk.
fn write_blocks(ring: &Uring, img: &Image, byte: u8, pick: &dyn Fn(u64) -> bool) -> Result<(), String> {
    let bs = BLOCK as u64;
    let blocks = img.size() / bs;
    let per_run = (CHUNK as u64 / bs).max(1);
    let buf = AlignedBuf::from_slice(&vec![byte; CHUNK as usize]);
    let mut b = 0;
    while b < blocks {
        if !pick(b) {
            b += 1;
            continue;
        }
        let mut end = b + 1;
        while end < blocks && end - b < per_run && pick(end) {
            end += 1;
        }
        let len = ((end - b) * bs) as usize;
        ring.block_on(img.write(ring, b * bs, &buf[..len], false)).map_err(e2s)?.map_err(e2s)?;
        b = end;
    }
    ring.block_on(img.flush(ring)).map_err(e2s)?.map_err(e2s)?;
    Ok(())
}

fn build(dir: &Path, ring: &Uring, size: u64, depth: usize, chain_id: u8) -> Result<Chain, String> {
    let name = format!("chain{depth}");
    let layer = |k: usize| dir.join(format!("{name}-{k}.fvd"));
    let top = dir.join(format!("{name}-top.fvd"));
    let mut files: Vec<PathBuf> = (0..depth).map(layer).collect();
    files.push(top.clone());
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    let blocks = size / BLOCK as u64;
    let mut holder = vec![0u8; blocks as usize];
    let opts = CreateOptions { size: Some(size), block_size: BLOCK, chunk_size: Some(CHUNK), ..Default::default() };
    image::create(&files[0], &opts).map_err(e2s)?;
    let mut rng = XorShift::new(0xC4A1_0000 + depth as u64);
    for k in 0..depth {
        if k > 0 {
            snapshot(&files[k - 1], &files[k]).map_err(e2s)?;
        }
        // Layer k takes each block with probability 1/(k+1): the newest copy
        // of a block is then in each of the `depth` layers with probability 1/depth.
        let take: Vec<bool> = (0..blocks).map(|_| k == 0 || rng.next() % (k as u64 + 1) == 0).collect();
        for (h, _) in holder.iter_mut().zip(&take).filter(|(_, &t)| t) {
            *h = k as u8;
        }
        let img = Image::open(&files[k], &OpenOptions::default()).map_err(e2s)?;
        write_blocks(ring, &img, pattern(chain_id, k), &|b| take[b as usize])?;
        img.close().map_err(e2s)?;
    }
    snapshot(&files[depth - 1], &top).map_err(e2s)?;
    Ok(Chain { name: format!("{depth}-deep"), depth, top, files, holder, chain_id })
}

/// Asks the kernel to drop the (clean) cached pages of `p`.
fn drop_cached(p: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    f.sync_all().map_err(|e| format!("{}: {e}", p.display()))?;
    // SAFETY: an advice call on an open descriptor; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(format!("{}: posix_fadvise: {}", p.display(), std::io::Error::from_raw_os_error(r)));
    }
    Ok(())
}

struct Opened {
    target: Target,
    open_ms: f64,
    index_bytes: usize,
    layer_meta: Vec<u64>,
}

fn open(c: &Ctx, ch: &Chain) -> Result<Opened, String> {
    let t0 = Instant::now();
    let o = OpenOptions { direct: c.direct, copy_on_read: Some(false), ..Default::default() };
    let img = Image::open(&ch.top, &o).map_err(e2s)?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    let base = img.base().ok_or_else(|| format!("{}: no base", ch.top.display()))?;
    if base.layers().len() != ch.depth {
        return Err(format!("{}: {} layers under the top, {} built", ch.top.display(), base.layers().len(), ch.depth));
    }
    let layer_meta = base
        .layers()
        .iter()
        .map(|l| match l {
            fvd::image::Layer::Fvd(i) => i.meta().memory_bytes(),
            fvd::image::Layer::Raw(_) => 0,
        })
        .collect();
    let index_bytes = base.index_bytes();
    // Every read checked here must come from the layer the build put last over it.
    let mut rng = XorShift::new(0x5EED);
    let mut buf = AlignedBuf::zeroed(4096);
    let slots = img.size() / 4096;
    for _ in 0..CHECKS {
        let off = (rng.next() % slots) * 4096;
        c.ring.block_on(img.read(&c.ring, off, &mut buf)).map_err(e2s)?.map_err(e2s)?;
        let k = ch.holder[(off / BLOCK as u64) as usize] as usize;
        let want = pattern(ch.chain_id, k);
        if let Some(bad) = buf.iter().position(|&b| b != want) {
            return Err(format!(
                "{}: read at {off:#x} gave {:#04x} at byte {bad}, layer {k}'s pattern {want:#04x} expected",
                ch.name, buf[bad]
            ));
        }
    }
    Ok(Opened { target: Target::Fvd(Box::new(img)), open_ms, index_bytes, layer_meta })
}

/// Opens the top of a chain of `depth` sparse 1 TiB layers (a few written
/// blocks each, so that most blocks fall to the bottom: every layer is asked
/// at build) and returns the open's time, the index's bytes and one layer's
/// table and bitmap bytes.
fn tib_open(dir: &Path, ring: &Uring, depth: usize) -> Result<(f64, usize, u64), String> {
    let tib = 1u64 << 40;
    let files: Vec<PathBuf> = (0..=depth).map(|k| dir.join(format!("tib-chain-{k}.fvd"))).collect();
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    let opts = CreateOptions { size: Some(tib), block_size: BLOCK, chunk_size: Some(CHUNK), ..Default::default() };
    image::create(&files[0], &opts).map_err(e2s)?;
    let buf = AlignedBuf::from_slice(&vec![0x77u8; BLOCK as usize]);
    let mut rng = XorShift::new(0x71B);
    for k in 0..depth {
        if k > 0 {
            snapshot(&files[k - 1], &files[k]).map_err(e2s)?;
        }
        let img = Image::open(&files[k], &OpenOptions::default()).map_err(e2s)?;
        for _ in 0..16 {
            let off = rng.next() % (tib / BLOCK as u64) * BLOCK as u64;
            ring.block_on(img.write(ring, off, &buf, false)).map_err(e2s)?.map_err(e2s)?;
        }
        img.close().map_err(e2s)?;
    }
    snapshot(&files[depth - 1], &files[depth]).map_err(e2s)?;
    let t0 = Instant::now();
    let img = Image::open(&files[depth], &OpenOptions::default()).map_err(e2s)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let base = img.base().ok_or("1 TiB chain: no base")?;
    let index = base.index_bytes();
    let layer = match &base.layers()[0] {
        fvd::image::Layer::Fvd(i) => i.meta().memory_bytes(),
        fvd::image::Layer::Raw(_) => 0,
    };
    drop(img);
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    Ok((ms, index, layer))
}

/// Reads every 64 KiB block of `t` once, in a shuffled order (the same for
/// every disk of a size), eight at a time.
fn warm(c: &Ctx, t: &Target, size: u64) -> Result<(), String> {
    let Target::Fvd(img) = t else { return Ok(()) };
    let blocks = size / BLOCK as u64;
    let mut order: Vec<u64> = (0..blocks).collect();
    let mut rng = XorShift::new(0x3A5E);
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    for group in order.chunks(8) {
        let mut bufs: Vec<AlignedBuf> = group.iter().map(|_| AlignedBuf::zeroed(BLOCK as usize)).collect();
        let reads = group.iter().zip(bufs.iter_mut()).map(|(&b, buf)| img.read(&c.ring, b * BLOCK as u64, buf));
        let done = c.ring.block_on(futures::future::join_all(reads)).map_err(e2s)?;
        done.into_iter().collect::<Result<Vec<()>, _>>().map_err(e2s)?;
    }
    Ok(())
}

struct ChainRow {
    job: String,
    shallow: JobResult,
    deep: JobResult,
}

pub fn run(c: &Ctx, depth: usize) -> Result<(), String> {
    if !(2..=fvd::meta::depth::MAX_LAYERS).contains(&depth) {
        return Err(format!("--chain: a depth from 2 to {} is needed", fvd::meta::depth::MAX_LAYERS));
    }
    let size = c.size / BLOCK as u64 * BLOCK as u64;
    if size == 0 {
        return Err("--size: at least one 64 KiB block is needed".into());
    }
    let t0 = Instant::now();
    let shallow = build(&c.dir, &c.ring, size, 1, 1)?;
    let deep = build(&c.dir, &c.ring, size, depth, 2)?;
    let build_s = t0.elapsed().as_secs_f64();
    // Out of the host page cache: both chains then hold in it what reads put
    // there, not what the build's writes of different sizes left.
    for f in shallow.files.iter().chain(&deep.files) {
        drop_cached(f)?;
    }
    let s = open(c, &shallow)?;
    let d = open(c, &deep)?;
    // Every block read once first, in the same shuffled order on both: the
    // layers are read through the host page cache (as the daemon reads them),
    // so both chains start warm, their cache filled by the same reads.
    warm(c, &s.target, size)?;
    warm(c, &d.target, size)?;
    let jobs = [
        Job { write: false, pattern: Pattern::Random, bs: 4096, qd: 1 },
        Job { write: false, pattern: Pattern::Random, bs: 4096, qd: 32 },
    ];
    let mut rows = Vec::new();
    for job in &jobs {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..c.repeat {
            a.push(load::run(&c.ring, &s.target, job, size, c.runtime)?);
            b.push(load::run(&c.ring, &d.target, job, size, c.runtime)?);
        }
        rows.push(ChainRow { job: job.name(), shallow: median(a), deep: median(b) });
    }
    let per_layer = d.layer_meta.iter().copied().max().unwrap_or(0);
    let layers_total: u64 = d.layer_meta.iter().sum();
    println!();
    println!(
        "chain: {} per disk, 64 KiB blocks, 1 MiB chunks; a {depth}-deep chain (each block's newest copy in any of \
         its {depth} layers alike) against a 1-deep one, empty tops; built in {build_s:.1} s; {} reads per top checked \
         against the layer that holds them",
        human(size),
        CHECKS
    );
    println!(
        "load: {:.1} s per job, median of {}, alternating; the top {}, the layers through the host page cache \
         (warmed by reading every block once, in one shuffled order)",
        c.runtime,
        c.repeat,
        if c.direct { "O_DIRECT" } else { "buffered" }
    );
    println!("open of the top: 1-deep {:.1} ms, {depth}-deep {:.1} ms (index built at open)", s.open_ms, d.open_ms);
    println!(
        "chain index: 1-deep {} bytes, {depth}-deep {} bytes (1 byte per 64 KiB block: {} per TiB, whatever the depth)",
        s.index_bytes,
        d.index_bytes,
        human((1u64 << 40) / BLOCK as u64)
    );
    println!(
        "layer metadata in memory (table + bitmap): {} bytes per layer, {} bytes for the {depth} layers",
        per_layer, layers_total
    );
    let (tib_ms, tib_index, tib_layer) = tib_open(&c.dir, &c.ring, depth)?;
    println!(
        "a 1 TiB top over {depth} layers of 1 TiB (a few blocks each): open {tib_ms:.0} ms with the index built; \
         index {} ({tib_index} bytes), table + bitmap {} per layer",
        human(tib_index as u64),
        human(tib_layer)
    );
    println!(
        "{:<18} {:>12} {:>12} {:>8} {:>12} {:>12}",
        "job",
        "1-deep IOPS",
        format!("{depth}-deep IOPS"),
        "ratio",
        "1-deep p99us",
        format!("{depth}-deep p99us")
    );
    for r in &rows {
        println!(
            "{:<18} {:>12.0} {:>12.0} {:>8.2} {:>12} {:>12}",
            r.job,
            r.shallow.iops,
            r.deep.iops,
            r.deep.iops / r.shallow.iops.max(1e-9),
            r.shallow.p99_us,
            r.deep.p99_us
        );
    }
    drop(s);
    drop(d);
    for f in shallow.files.iter().chain(&deep.files) {
        let _ = std::fs::remove_file(f);
    }
    Ok(())
}
