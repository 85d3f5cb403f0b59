//! An fio-like load generator on one io_uring: `qd` workers, each with one
//! request in flight, random or sequential offsets, latency per request.

use fvd::image::Image;
use fvd::io::uring::Uring;
use fvd::io::{self, AlignedBuf};
use fvd::storage::FileStorage;
use std::cell::Cell;
use std::time::{Duration, Instant};

pub enum Target {
    Raw(Box<FileStorage>),
    Fvd(Box<Image>),
}

impl Target {
    async fn read(&self, ring: &Uring, off: u64, buf: &mut [u8]) -> Result<(), String> {
        match self {
            Target::Raw(s) => io::read_at(ring, s.as_ref(), buf, off).await.map_err(|e| e.to_string()),
            Target::Fvd(i) => i.read(ring, off, buf).await.map_err(|e| e.to_string()),
        }
    }

    async fn write(&self, ring: &Uring, off: u64, buf: &[u8]) -> Result<(), String> {
        match self {
            Target::Raw(s) => io::write_at(ring, s.as_ref(), buf, off).await.map_err(|e| e.to_string()),
            Target::Fvd(i) => i.write(ring, off, buf, false).await.map_err(|e| e.to_string()),
        }
    }

    /// For fvd: commits what is pending, then returns journal records
    /// written per guest write (after batching and merging), shown after the
    /// disk name.
    pub fn records_per_write(&self, ring: &Uring) -> String {
        match self {
            Target::Raw(_) => String::new(),
            Target::Fvd(i) => {
                if let Err(e) = ring.block_on(i.flush(ring)) {
                    return format!(" [flush failed: {e}]");
                }
                let s = i.stats.snapshot();
                format!(" [{:.3} rec/w]", s.journal_records as f64 / s.guest_writes.max(1) as f64)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Random,
    Sequential,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub write: bool,
    pub pattern: Pattern,
    pub bs: usize,
    pub qd: usize,
}

impl Job {
    pub fn name(&self) -> String {
        let p = match self.pattern {
            Pattern::Random => "rand",
            Pattern::Sequential => "seq",
        };
        let rw = if self.write { "write" } else { "read" };
        let bs = if self.bs >= 1 << 20 { format!("{}M", self.bs >> 20) } else { format!("{}k", self.bs >> 10) };
        format!("{p}{rw} {bs} qd{}", self.qd)
    }
}

#[derive(Debug, Clone)]
pub struct JobResult {
    pub iops: f64,
    pub mibs: f64,
    pub p99_us: u64,
}

struct Shared<'a> {
    ring: &'a Uring,
    target: &'a Target,
    job: &'a Job,
    size: u64,
    deadline: Option<Instant>,
    next: Cell<u64>,
}

async fn worker(sh: &Shared<'_>, seed: u64) -> Result<Vec<u32>, String> {
    let bs = sh.job.bs as u64;
    let slots = sh.size / bs;
    let mut buf = AlignedBuf::zeroed(sh.job.bs);
    let mut rng = super::XorShift::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.fill(&mut buf);
    let mut lats = Vec::new();
    loop {
        let off = match sh.job.pattern {
            Pattern::Random => (rng.next() % slots) * bs,
            Pattern::Sequential => {
                let o = sh.next.get();
                if sh.deadline.is_none() && o >= sh.size {
                    break;
                }
                sh.next.set(o + bs);
                o % (slots * bs)
            }
        };
        if let Some(d) = sh.deadline {
            if Instant::now() >= d {
                break;
            }
        }
        let t0 = Instant::now();
        if sh.job.write {
            sh.target.write(sh.ring, off, &buf).await?;
        } else {
            sh.target.read(sh.ring, off, &mut buf).await?;
        }
        lats.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    Ok(lats)
}

fn drive(sh: &Shared<'_>) -> Result<(Vec<u32>, Duration), String> {
    let exe = smol::LocalExecutor::new();
    let start = Instant::now();
    let tasks: Vec<_> = (0..sh.job.qd).map(|i| exe.spawn(worker(sh, i as u64 + 1))).collect();
    let all = async move {
        let mut lats = Vec::new();
        let mut err = None;
        for t in tasks {
            match t.await {
                Ok(l) => lats.extend(l),
                Err(e) => err = Some(e),
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(lats),
        }
    };
    let lats = sh.ring.run(&exe, all).map_err(|e| e.to_string())??;
    Ok((lats, start.elapsed()))
}

/// Runs `job` for `runtime` seconds over `[0, size)`.
pub fn run(ring: &Uring, t: &Target, job: &Job, size: u64, runtime: f64) -> Result<JobResult, String> {
    let sh = Shared {
        ring,
        target: t,
        job,
        size,
        deadline: Some(Instant::now() + Duration::from_secs_f64(runtime)),
        next: Cell::new(0),
    };
    let (mut lats, took) = drive(&sh)?;
    let n = lats.len() as f64;
    lats.sort_unstable();
    let p99 = lats.get(((lats.len() as f64) * 0.99) as usize).copied().unwrap_or(0) as u64;
    let secs = took.as_secs_f64().max(1e-9);
    Ok(JobResult { iops: n / secs, mibs: n * job.bs as f64 / secs / (1 << 20) as f64, p99_us: p99 })
}

/// Runs a sequential job exactly once over `[0, size)` (to fill a disk).
pub fn run_once_over(ring: &Uring, t: &Target, job: &Job, size: u64) -> Result<(), String> {
    let sh = Shared { ring, target: t, job, size, deadline: None, next: Cell::new(0) };
    drive(&sh).map(|_| ())
}
