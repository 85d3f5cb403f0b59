//! fvd torture: one seeded random schedule of every operation at once, over several
//! devices on every kind of storage, checked against a model after every step.
//!
//! Run inside a guest with ublk and device-mapper (tests/guest/scenarios/96-torture.sh
//! sets up the storage; scripts/torture boots the guest). Each device gets writers that
//! keep a model of every acknowledged write and flush (model.rs); a scheduler draws
//! operations from the seed (snapshot, online resize, stop / offline commit, resize,
//! check --repair / start, kill -9 and recover (sometimes twice in a row), SIGSTOP,
//! write faults, a full volume group) and runs up to two at once on different devices.
//! After every operation the device is read whole and checked; every image no daemon
//! holds must check clean; a request or command that takes longer than its bound, or a
//! daemon that dies unasked, fails the run. A failure prints the seed and the operation
//! log's tail; the same seed draws the same schedule.

mod dev;
mod log;
mod model;
mod ops;
mod powercut;
mod writer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use dev::{alive, run, Daemon, Device, Kind};
use log::Log;
use model::{base_value, stamp_block, Model, BLOCK};
use ops::{Ctx, Op};

#[derive(Parser)]
struct Args {
    /// The fvd binary.
    #[arg(long)]
    fvd: String,
    /// Scratch folder for image files.
    #[arg(long)]
    work: String,
    /// Where the operation log and the summary go.
    #[arg(long)]
    results: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long the schedule runs.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// A device: KIND:PATH, KIND one of file, lv, thin, flakey, overlay (PATH: the image
    /// file to create, the LV or the dm device).
    #[arg(long = "dev")]
    devs: Vec<String>,
    /// The thin pool (VG/POOL) new thin layers are made in.
    #[arg(long)]
    thin_pool: Option<String>,
    /// The flakey device's healthy dm table (its failing one is made from it).
    #[arg(long)]
    flakey_table: Option<String>,
    /// The overlay's base: a device or file that holds `--make-base`'s bytes (default: a
    /// raw file the run writes itself).
    #[arg(long)]
    overlay_base: Option<String>,
    /// A command that kills the overlay base's NBD server.
    #[arg(long)]
    nbd_down: Option<String>,
    /// A command that serves the base again and attaches it (the daemon is stopped then).
    #[arg(long)]
    nbd_up: Option<String>,
    /// Only write a base's bytes for device INDEX (the overlay, 5 in 96-torture) into
    /// this file, then exit.
    #[arg(long, value_name = "FILE:INDEX")]
    make_base: Option<String>,
    /// Virtual size of each image.
    #[arg(long, default_value = "256M")]
    size: String,
    /// The checked region at the start of each device, MiB.
    #[arg(long, default_value_t = 32)]
    region_mib: u64,
    /// Writer threads per device.
    #[arg(long, default_value_t = 2)]
    writers: u64,
    /// At most this many layers per device (online snapshots stop there).
    #[arg(long, default_value_t = 4)]
    max_layers: usize,
    /// At most this long a writer pauses after each request, µs.
    #[arg(long, default_value_t = 5000)]
    think_us: u64,
    /// The control: the model forgets one write on the first device, and the run must
    /// fail (it shows the checks see what the devices hold).
    #[arg(long)]
    control: bool,
    /// This phase of the run (each power cut starts the next).
    #[arg(long, default_value_t = 1)]
    phase: u32,
    /// End with the whole guest's power cut instead of killing every daemon
    /// (powercut.rs; the guest harness boots the next phase).
    #[arg(long)]
    power_cut: bool,
    /// Go on from the state the last power cut left in the results folder: every device
    /// recovered and read whole first.
    #[arg(long)]
    resume: bool,
    /// Only these operations (names as in the log, comma-separated; "restart-commit" is
    /// a restart that commits): a failure's replay, aimed.
    #[arg(long, value_delimiter = ',')]
    ops: Vec<String>,
    #[arg(long)]
    verbose: bool,
}

/// Operations under way at once (each on a different device).
const MAX_PARALLEL: u32 = 3;

/// A request that takes longer than this, outside a pause the controller made, is a hang.
const REQUEST_BOUND: Duration = Duration::from_secs(90);

fn main() {
    let a = Args::parse();
    if let Some(spec) = &a.make_base {
        let r = spec
            .rsplit_once(':')
            .and_then(|(f, i)| Some((f, i.parse::<u32>().ok()?)))
            .ok_or_else(|| format!("--make-base {spec}: want FILE:INDEX"))
            .and_then(|(f, i)| write_base(f, i, a.region_mib * (1 << 20) / BLOCK as u64, parse_size(&a.size)?));
        if let Err(e) = r {
            eprintln!("torture: {e}");
            std::process::exit(2);
        }
        std::process::exit(0);
    }
    let log = match Log::new(&format!("{}/torture-ops.log", a.results), a.seed, a.verbose, &a.fvd, a.resume) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("torture: {e}");
            std::process::exit(2);
        }
    };
    let code = match torture(&a, &log) {
        Ok(()) if !log.has_failed() => 0,
        Ok(()) => 1,
        Err(e) => {
            log.fail(&e);
            1
        }
    };
    std::process::exit(code);
}

/// The writers' counts, by their index in `writer::Writer::counts`.
const NAMES: [&str; 7] = ["writes", "fua-writes", "reads", "flushes", "discards", "write-zeroes", "request-errors"];

/// Every count of the run so far: the earlier phases', this one's operations and its
/// writers' requests.
fn totals(earlier: &BTreeMap<String, u64>, log: &Log, requests: &[AtomicU64; 7]) -> BTreeMap<String, u64> {
    let mut all = earlier.clone();
    for (k, v) in log.counts() {
        *all.entry(k).or_default() += v;
    }
    for (nm, c) in NAMES.iter().zip(requests) {
        *all.entry((*nm).to_string()).or_default() += c.load(SeqCst);
    }
    all
}

fn failing_table(healthy: &str) -> Result<String, String> {
    // "0 SECTORS linear DEV OFFSET" -> "0 SECTORS flakey DEV OFFSET 0 30 1 error_writes"
    let f: Vec<&str> = healthy.split_whitespace().collect();
    if f.len() != 5 || f[2] != "linear" {
        return Err(format!("--flakey-table must be a linear table, got {healthy:?}"));
    }
    Ok(format!("{} {} flakey {} {} 0 30 1 error_writes", f[0], f[1], f[3], f[4]))
}

fn setup(a: &Args, log: &Log, ctx: &Ctx) -> Result<Vec<Device>, String> {
    let region_blocks = a.region_mib * (1 << 20) / BLOCK as u64;
    let mut devs = Vec::new();
    for (i, spec) in a.devs.iter().enumerate() {
        let (k, path) = spec.split_once(':').ok_or_else(|| format!("--dev {spec}: want KIND:PATH"))?;
        let kind = Kind::parse(k).ok_or_else(|| format!("--dev {spec}: unknown kind {k}"))?;
        let index = i as u32 + 1;
        let size = parse_size(&a.size)?;
        if kind == Kind::Overlay {
            let base = match &a.overlay_base {
                Some(b) => b.clone(),
                None => {
                    let b = format!("{}/base{index}.raw", a.work);
                    write_base(&b, index, region_blocks, size)?;
                    b
                }
            };
            let o = run(log, &a.fvd, &["create", "--copy-on-read", "--prefetch", "-b", &base, path])?;
            if !o.ok {
                return Err(format!("fvd create -b {base} {path}: {}", o.stderr));
            }
        } else {
            let o = run(log, &a.fvd, &["create", "-s", &a.size, path])?;
            if !o.ok {
                return Err(format!("fvd create {path}: {}", o.stderr));
            }
        }
        let init = move |b: u64| if kind == Kind::Overlay { base_value(b) } else { 0 };
        let d = Device::new(index, kind, vec![path.to_string()], Model::new(region_blocks, init), size);
        ctx.start(&d)?;
        log.line(&format!("dev {index}: {} on {path}", kind.name()));
        devs.push(d);
    }
    Ok(devs)
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().map(|n| n * mul).map_err(|_| format!("bad size {s}"))
}

/// A raw base whose checked region holds the base's own stamps, the rest a hole.
fn write_base(path: &str, dev: u32, blocks: u64, size: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?;
    f.set_len(size).map_err(|e| format!("{path}: {e}"))?;
    let mut buf = vec![0u8; BLOCK];
    for b in 0..blocks {
        stamp_block(&mut buf, dev, b, base_value(b));
        f.write_all_at(&buf, b * BLOCK as u64).map_err(|e| format!("{path}: {e}"))?;
    }
    f.sync_all().map_err(|e| format!("{path}: {e}"))
}

/// Draws the next operation for a device of `kind` (the same seed, the same draws).
fn draw(rng: &mut StdRng, kind: Kind, online_resize: bool, nbd: bool) -> Op {
    loop {
        let op = match rng.gen_range(0..100) {
            0..=11 => Op::Snapshot,
            12..=19 => Op::ResizeOnline { mib: rng.gen_range(1..=16) },
            20..=35 => Op::Restart {
                commit: rng.gen_bool(0.5),
                rebase: rng.gen_bool(0.3),
                resize_mib: if rng.gen_bool(0.3) { rng.gen_range(1..=16) } else { 0 },
                repair: rng.gen_bool(0.2),
            },
            36..=57 => Op::KillRecover { ms: rng.gen_range(0..1500), again: if rng.gen_bool(0.25) { 1 } else { 0 } },
            58..=71 => Op::Pause { ms: rng.gen_range(200..3000) },
            72..=83 => Op::Fault { ms: rng.gen_range(300..3000) },
            84..=88 => Op::VgFull { ms: rng.gen_range(500..4000) },
            89..=92 => Op::ThinFull { ms: rng.gen_range(500..3000) },
            93..=96 => Op::NbdRestart { ms: rng.gen_range(500..3000) },
            _ => Op::Verify,
        };
        match (op, kind) {
            (Op::Fault { .. }, k) if k != Kind::Flakey => continue,
            (Op::VgFull { .. }, k) if k != Kind::Lv => continue,
            (Op::ThinFull { .. }, k) if k != Kind::Thin => continue,
            (Op::NbdRestart { .. }, k) if k != Kind::Overlay || !nbd => continue,
            // Where the kernel has no online resize (6.12) its draws go elsewhere.
            (Op::ResizeOnline { .. }, _) if !online_resize => continue,
            _ => return op,
        }
    }
}

fn torture(a: &Args, log: &Log) -> Result<(), String> {
    let online_resize = AtomicBool::new(true);
    let flakey_tables = match &a.flakey_table {
        Some(t) => Some((t.clone(), failing_table(t)?)),
        None => None,
    };
    let ctx = Ctx {
        fvd: &a.fvd,
        work: &a.work,
        thin_pool: a.thin_pool.as_deref(),
        log,
        region_blocks: a.region_mib * (1 << 20) / BLOCK as u64,
        online_resize: &online_resize,
        max_layers: a.max_layers,
        flakey_tables,
        nbd_down: a.nbd_down.as_deref(),
        nbd_up: a.nbd_up.as_deref(),
    };
    if a.devs.is_empty() {
        return Err("no --dev given".into());
    }
    log.line(&format!(
        "torture: seed {} phase {} for {} s over {} devices{}",
        a.seed,
        a.phase,
        a.seconds,
        a.devs.len(),
        if a.power_cut { ", then a power cut" } else { "" }
    ));
    // A later phase draws its own schedule; the first keeps the seed's (old seeds replay).
    let seed = a.seed ^ (u64::from(a.phase.saturating_sub(1)) << 56);
    let (devs, next_value, earlier) = if a.resume {
        let (state, devs) = powercut::load(&powercut::state_path(&a.results), a.seed)?;
        for d in &devs {
            ctx.start(d)?;
            log.line(&format!("dev {}: {} recovered after the power cut on {}", d.index, d.kind.name(), d.top()));
            ctx.verify(d)?;
            log.count("power-cut-recovered");
        }
        (devs, state.next_value, state.counts)
    } else {
        (setup(a, log, &ctx)?, 1, BTreeMap::new())
    };
    let stop = AtomicBool::new(false);
    let values = AtomicU64::new(next_value);
    let counts: [AtomicU64; 7] = Default::default();
    let op_starts: Vec<Vec<AtomicU64>> =
        devs.iter().map(|_| (0..a.writers).map(|_| AtomicU64::new(0)).collect()).collect();
    let t0 = log.start();
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let running_ops = AtomicU32::new(0);

    std::thread::scope(|s| {
        for (di, d) in devs.iter().enumerate() {
            for t in 0..a.writers {
                let w = writer::Writer {
                    dev: d,
                    thread: t,
                    threads: a.writers,
                    region_blocks: ctx.region_blocks,
                    seed,
                    log,
                    stop: &stop,
                    op_start: &op_starts[di][t as usize],
                    values: &values,
                    counts: &counts,
                    think_us: a.think_us,
                    control: a.control,
                };
                s.spawn(move || w.run());
            }
        }
        // The monitor: hangs and daemons that died unasked.
        s.spawn(|| {
            while !stop.load(SeqCst) && !log.has_failed() {
                std::thread::sleep(Duration::from_millis(500));
                let now = dev::now_ms(t0);
                for (di, d) in devs.iter().enumerate() {
                    if d.paused.load(SeqCst) > 0 {
                        continue;
                    }
                    let since = d.unpaused_ms.load(SeqCst);
                    for st in &op_starts[di] {
                        let began = st.load(SeqCst);
                        if began > 0 && now.saturating_sub(began.max(since)) > REQUEST_BOUND.as_millis() as u64 {
                            log.fail(&format!(
                                "HANG: {} dev {}: a request has taken {} s",
                                d.kind.name(),
                                d.index,
                                (now - began) / 1000
                            ));
                        }
                    }
                    if let Ok(g) = d.daemon.lock() {
                        if let Daemon::Running { id, pid } = *g {
                            if !alive(pid) {
                                log.fail(&format!(
                                    "{} dev {}: daemon of device {id} (pid {pid}) exited unasked",
                                    d.kind.name(),
                                    d.index
                                ));
                            }
                        }
                    }
                }
            }
        });
        // The scheduler: the seed draws the sequence of (device, operation); each waits
        // for its device and for a free slot, so a replay runs the same operations in the
        // same order (how they overlap in time may differ).
        let mut rng = StdRng::seed_from_u64(seed);
        let mut n = 0u64;
        'draws: while Instant::now() < deadline && !log.has_failed() {
            std::thread::sleep(Duration::from_millis(rng.gen_range(100..1500)));
            let di = rng.gen_range(0..devs.len());
            let mut op = draw(&mut rng, devs[di].kind, online_resize.load(SeqCst), a.nbd_down.is_some());
            while !a.ops.is_empty()
                && !a.ops.iter().any(|o| o == op.name() || (o == "restart-commit" && matches!(op, Op::Restart { .. })))
            {
                op = draw(&mut rng, devs[di].kind, online_resize.load(SeqCst), a.nbd_down.is_some());
            }
            if a.ops.iter().any(|o| o == "restart-commit") {
                if let Op::Restart { commit, .. } = &mut op {
                    *commit = true;
                }
            }
            n += 1;
            let d = &devs[di];
            while running_ops.load(SeqCst) >= MAX_PARALLEL || d.busy.load(SeqCst) {
                if Instant::now() >= deadline || log.has_failed() {
                    break 'draws;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            d.busy.store(true, SeqCst);
            running_ops.fetch_add(1, SeqCst);
            let (ctx, running_ops) = (&ctx, &running_ops);
            s.spawn(move || {
                if let Err(e) = ctx.apply(d, op, n) {
                    log.fail(&e);
                }
                d.busy.store(false, SeqCst);
                running_ops.fetch_sub(1, SeqCst);
            });
        }
        // Wind down: operations finish, then the writers stop.
        while running_ops.load(SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Every daemon killed at once with the writers' requests in flight, each device
        // recovered and read whole; or the whole guest's power cut.
        if !log.has_failed() && a.power_cut {
            log.count("power-cut");
            let all = totals(&earlier, log, &counts);
            let e = powercut::cut(&a.results, a.seed, a.phase, log, &devs, values.load(SeqCst), all);
            log.fail(&e);
        } else if !log.has_failed() {
            if let Err(e) = ctx.kill_all(&devs) {
                log.fail(&e);
            }
        }
        stop.store(true, SeqCst);
    });
    if log.has_failed() {
        return Ok(());
    }
    // The end: every device checked, stopped cleanly, every layer checked.
    for d in &devs {
        ctx.verify(d)?;
        ctx.apply(d, Op::Restart { commit: false, rebase: false, resize_mib: 0, repair: false }, 0)?; // counted as final-restart
        ctx.verify(d)?;
        let id = match *d.daemon.lock().map_err(|_| "poisoned")? {
            Daemon::Running { id, .. } => id,
            Daemon::Away => return Err(format!("dev {} has no daemon at the end", d.index)),
        };
        *d.io.write().map_err(|_| "poisoned")? = None;
        *d.daemon.lock().map_err(|_| "poisoned")? = Daemon::Away;
        let o = run(log, &a.fvd, &["stop", "-n", &id.to_string()])?;
        if !o.ok {
            return Err(format!("final fvd stop -n {id}: {}", o.stderr));
        }
        ctx.check_layers(d)?;
    }
    let mut summary = serde_json::Map::new();
    summary.insert("seed".into(), a.seed.into());
    summary.insert("phases".into(), a.phase.into());
    summary.insert("seconds".into(), t0.elapsed().as_secs().into());
    for (k, v) in totals(&earlier, log, &counts) {
        summary.insert(k, v.into());
    }
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(summary)).unwrap_or_default();
    let _ = std::fs::write(format!("{}/torture.json", a.results), &text);
    println!("torture: seed {} passed in {} s\n{text}", a.seed, t0.elapsed().as_secs());
    Ok(())
}
