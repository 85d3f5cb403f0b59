//! `fvd bench`: drives the same `Image` code as the daemon with an fio-like
//! load, and the same load through the same io_uring harness on raw files in
//! the matching state, in one run, and prints the ratios.

mod base_cost;
mod chain;
mod load;
mod meta_cost;
mod request_cost;

use clap::Args;
use fvd::image::{self, CreateOptions, Image, OpenOptions};
use fvd::io::uring::Uring;
use fvd::storage::{FileStorage, OpenMode};
use fvd::units::parse_size;
use load::{Job, JobResult, Pattern, Target};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Folder for the scratch files (on the file system to measure).
    #[arg(long, default_value = "target/bench")]
    pub dir: PathBuf,
    /// Size of each disk under test.
    #[arg(long, default_value = "1G", value_parser = |s: &str| parse_size(s).map(|b| b.0))]
    pub size: u64,
    /// Seconds per job.
    #[arg(long, default_value_t = 2.0)]
    pub runtime: f64,
    /// Use the host page cache instead of O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
    /// Runs per job and disk (raw and fvd alternate); the median is shown.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Only the metadata figures (sizes, open and replay time), no load.
    #[arg(long)]
    pub meta_only: bool,
    /// Only the chain comparison: 4 KiB random reads through the top of a
    /// chain of N read-only layers against a chain of one, in one run.
    #[arg(long, value_name = "N")]
    pub chain: Option<usize>,
    /// Only `--count` requests of one kind, one after another, through the
    /// code a queue runs per request, for an instruction count under callgrind
    /// (scripts/request-cost): read, overwrite or first-write, 4 KiB each.
    #[arg(long, value_enum, value_name = "KIND")]
    pub request_cost: Option<request_cost::Kind>,
    /// The image layout for --request-cost.
    #[arg(long, value_enum, default_value = "default")]
    pub layout: request_cost::Layout,
    /// Requests for --request-cost.
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
}

struct Ctx {
    dir: PathBuf,
    size: u64,
    runtime: f64,
    direct: bool,
    repeat: usize,
    ring: Uring,
    rows: Vec<Row>,
}

struct Row {
    group: &'static str,
    disk: String,
    job: String,
    r: JobResult,
    raw: Option<JobResult>,
}

impl Ctx {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn fresh_raw(&self, name: &str) -> Result<Target, String> {
        let p = self.path(name);
        let _ = std::fs::remove_file(&p);
        let f = std::fs::File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        f.set_len(self.size).map_err(|e| format!("{}: {e}", p.display()))?;
        drop(f);
        let mut s = FileStorage::open(&p, OpenMode::ReadWrite).map_err(|e| e.to_string())?;
        if self.direct {
            s = s.with_direct_io().map_err(|e| e.to_string())?;
        }
        Ok(Target::Raw(Box::new(s)))
    }

    fn fresh_image(&self, name: &str, block: u32, chunk: Option<u32>, base: Option<&str>) -> Result<Target, String> {
        let p = self.path(name);
        let _ = std::fs::remove_file(&p);
        let opts = CreateOptions {
            size: Some(self.size),
            base: base.map(PathBuf::from),
            block_size: block,
            chunk_size: chunk,
            ..Default::default()
        };
        image::create(&p, &opts).map_err(|e| e.to_string())?;
        let o = OpenOptions { direct: self.direct, ..Default::default() };
        Ok(Target::Fvd(Box::new(Image::open(&p, &o).map_err(|e| e.to_string())?)))
    }

    fn run(&self, t: &Target, job: &Job) -> Result<JobResult, String> {
        load::run(&self.ring, t, job, self.size, self.runtime)
    }

    /// Runs `job` `repeat` times on raw and fvd alternately (fresh targets
    /// from the closures when first writes are measured) and keeps the run
    /// with the median IOPS of each, so that drift in the host hits both.
    fn paired(
        &self,
        job: &Job,
        raw: &mut dyn FnMut() -> Result<Target, String>,
        fvd: &mut dyn FnMut() -> Result<Target, String>,
    ) -> Result<(JobResult, JobResult, String), String> {
        let mut raws = Vec::new();
        let mut fvds = Vec::new();
        let mut note = String::new();
        for _ in 0..self.repeat {
            let r = raw()?;
            raws.push(self.run(&r, job)?);
            drop(r);
            let f = fvd()?;
            fvds.push(self.run(&f, job)?);
            note = f.records_per_write(&self.ring);
        }
        Ok((median(fvds), median(raws), note))
    }

    /// Runs `job` on fresh raw files and fresh images (first writes).
    fn first_writes(
        &mut self,
        job: Job,
        disks: &[(&str, u32, Option<u32>, Option<&str>)],
        group: &'static str,
    ) -> Result<(), String> {
        for (name, block, chunk, base) in disks {
            let (r, raw, note) = self.paired(&job, &mut || self.fresh_raw("raw-fresh"), &mut || {
                self.fresh_image("fvd-fresh", *block, *chunk, *base)
            })?;
            self.rows.push(Row { group, disk: format!("{name}{note}"), job: job.name(), r, raw: Some(raw) });
        }
        Ok(())
    }
}

/// The benchmark's pseudo-random numbers (xorshift64): fast, and the same
/// sequence for the same seed in every run.
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Fills `buf` with one byte per step.
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

fn median(mut v: Vec<JobResult>) -> JobResult {
    v.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    v.swap_remove(v.len() / 2)
}

fn fill(ring: &Uring, t: &Target, size: u64) -> Result<(), String> {
    let job = Job { write: true, pattern: Pattern::Sequential, bs: 1 << 20, qd: 8 };
    load::run_once_over(ring, t, &job, size)
}

fn make_base(p: &Path, size: u64) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut rng = XorShift::new(0x1234_5678_9abc_def1);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).map_err(|e| format!("{}: {e}", p.display()))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", p.display()))
}

pub fn run(a: BenchArgs) -> Result<i32, String> {
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    if let Some(kind) = a.request_cost {
        request_cost::run(&a.dir, kind, a.layout, a.count)?;
        return Ok(0);
    }
    if let Some(depth) = a.chain {
        let c = Ctx {
            dir: a.dir.clone(),
            size: a.size,
            runtime: a.runtime,
            direct: !a.buffered,
            repeat: a.repeat.max(1),
            ring: Uring::new(256).map_err(|e| format!("io_uring: {e}"))?,
            rows: Vec::new(),
        };
        chain::run(&c, depth)?;
        return Ok(0);
    }
    meta_cost::print(&a.dir)?;
    base_cost::print(&a.dir, a.size.min(1 << 30))?;
    if a.meta_only {
        return Ok(0);
    }
    let ring = Uring::new(256).map_err(|e| format!("io_uring: {e}"))?;
    let mut c = Ctx {
        dir: a.dir.clone(),
        size: a.size,
        runtime: a.runtime,
        direct: !a.buffered,
        repeat: a.repeat.max(1),
        ring,
        rows: Vec::new(),
    };
    let qd1 = |write, pattern, bs| Job { write, pattern, bs, qd: 1 };
    let qd32 = |write, pattern, bs| Job { write, pattern, bs, qd: 32 };
    let rand4k_w1 = qd1(true, Pattern::Random, 4096);
    let rand4k_w32 = qd32(true, Pattern::Random, 4096);
    let seq1m_w = Job { write: true, pattern: Pattern::Sequential, bs: 1 << 20, qd: 4 };
    let seq1m_r = Job { write: false, pattern: Pattern::Sequential, bs: 1 << 20, qd: 4 };

    // (a) first writes into a fresh image without base.
    let plain: [(&str, u32, Option<u32>, Option<&str>); 2] =
        [("fvd (table)", 65536, Some(1 << 20), None), ("fvd (no table)", 65536, None, None)];
    for job in [rand4k_w1.clone(), rand4k_w32.clone(), seq1m_w.clone()] {
        c.first_writes(job, &plain, "a: first writes, no base")?;
    }
    // (b) copy-on-write over a base of random content.
    make_base(&c.path("base.raw"), c.size)?;
    let cow: [(&str, u32, Option<u32>, Option<&str>); 3] = [
        ("fvd cow 4k blocks", 4096, Some(1 << 20), Some("base.raw")),
        ("fvd cow 64k blocks", 65536, Some(1 << 20), Some("base.raw")),
        ("fvd cow 64k no table", 65536, None, Some("base.raw")),
    ];
    for job in [rand4k_w1.clone(), rand4k_w32.clone()] {
        c.first_writes(job, &cow, "b: copy-on-write over a base")?;
    }
    // (c) fully written disks: reads and overwrites.
    let raw = c.fresh_raw("raw-full")?;
    fill(&c.ring, &raw, c.size)?;
    let full_img = |c: &Ctx, name: &str, chunk: Option<u32>| -> Result<Target, String> {
        let t = c.fresh_image(name, 65536, chunk, None)?;
        fill(&c.ring, &t, c.size)?;
        Ok(t)
    };
    let imgs = [
        ("fvd (table)", full_img(&c, "fvd-full", Some(1 << 20))?),
        ("fvd (no table)", full_img(&c, "fvd-full-raw", None)?),
    ];
    let jobs = [
        qd1(false, Pattern::Random, 4096),
        qd32(false, Pattern::Random, 4096),
        rand4k_w1,
        rand4k_w32,
        seq1m_r,
        seq1m_w,
    ];
    for job in jobs {
        for (name, t) in &imgs {
            let mut raws = Vec::new();
            let mut fvds = Vec::new();
            for _ in 0..c.repeat {
                raws.push(c.run(&raw, &job)?);
                fvds.push(c.run(t, &job)?);
            }
            let row = Row {
                group: "c: fully written",
                disk: name.to_string(),
                job: job.name(),
                r: median(fvds),
                raw: Some(median(raws)),
            };
            c.rows.push(row);
        }
    }
    drop(imgs);
    drop(raw);
    print_table(&c);
    for f in ["raw-fresh", "fvd-fresh", "raw-full", "fvd-full", "fvd-full-raw", "base.raw"] {
        let _ = std::fs::remove_file(c.path(f));
    }
    Ok(0)
}

fn print_table(c: &Ctx) {
    println!();
    println!(
        "load: {} per disk, {:.1} s per job, {}, one io_uring, same harness for fvd and raw",
        fvd::units::human(c.size),
        c.runtime,
        if c.direct { "O_DIRECT" } else { "buffered" }
    );
    println!(
        "{:<30} {:<34} {:<18} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "state", "disk", "job", "IOPS", "MiB/s", "p99 us", "raw IOPS", "ratio"
    );
    let mut last = "";
    for r in &c.rows {
        let group = if r.group == last { "" } else { r.group };
        last = r.group;
        let (raw_iops, ratio) = match &r.raw {
            Some(raw) => (format!("{:.0}", raw.iops), format!("{:.2}", r.r.iops / raw.iops.max(1e-9))),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<30} {:<34} {:<18} {:>9.0} {:>9.1} {:>9} {:>9} {:>7}",
            group, r.disk, r.job, r.r.iops, r.r.mibs, r.r.p99_us, raw_iops, ratio
        );
    }
}
