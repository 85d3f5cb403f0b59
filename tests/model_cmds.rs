//! The image commands against a model, through the real binary: seeded random
//! sequences of create (raw and fvd bottoms, every geometry, overlays on any
//! layer), io (write, write -s with odd lengths, zero, discard, flush, in
//! writeback and writethrough), snapshot, commit (into the base or further
//! down, -d), rebase (safe onto any layer, onto another chain, -b ""), resize,
//! convert (to fvd and raw), prefetch, check (--repair) and scrub (after one
//! byte of one copy of the table or bitmap was damaged, half of the time), with SIGKILL at
//! random points followed by the same command again, and commands that must be
//! refused (writes to frozen layers, loops, a snapshot onto an existing name).
//!
//! The model keeps what every layer reads (or "unknown" where the product
//! promises nothing: a layer whose base a commit changed under it). After each
//! step every layer reads its model, layers that must not open do not (a layer
//! marked invalid, or one whose chain passes through one), and `fvd check`
//! agrees on the layers the step touched (on all of them at the end).
//!
//! `FVD_MODEL_CMDS_SEQS` sets how many sequences (CI: the default below; by
//! hand: thousands), `FVD_MODEL_CMDS_SEED` the first seed. A failure prints
//! the seed and every command of its sequence; the same seed replays it.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEFAULT_SEQS: u64 = 200;
const STEPS: usize = 14;
const MAX_LAYERS: usize = 9;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Live,
    Frozen,
    Invalid,
}

#[derive(Clone, Debug)]
struct Layer {
    name: String,
    raw: bool,
    state: State,
    /// What the layer reads; None: unknown (the product promises nothing).
    content: Option<Vec<u8>>,
    /// The layer it reads through (None: stands alone).
    base: Option<usize>,
    /// A commit changed its base under it: Some(true) it is refused (an fvd
    /// base takes a new identity), None maybe (a raw base's fingerprint
    /// samples 16 blocks: a change elsewhere goes unseen).
    orphan: Option<bool>,
}

struct World {
    dir: tempfile::TempDir,
    layers: Vec<Layer>,
    rng: StdRng,
    log: Vec<String>,
    ops: u64,
    kills: u64,
    refusals: u64,
    seq_names: u64,
}

/// What a command did.
struct Ran {
    code: i32,
    out: String,
    killed: bool,
}

impl World {
    fn new(seed: u64) -> World {
        World {
            dir: tempfile::tempdir().expect("tempdir"),
            layers: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            log: Vec::new(),
            ops: 0,
            kills: 0,
            refusals: 0,
            seq_names: 0,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn fresh_name(&mut self, ext: &str) -> String {
        self.seq_names += 1;
        format!("l{}.{ext}", self.seq_names)
    }

    /// Runs `fvd ARGS` in the world's folder; with `kill_after`, sends SIGKILL
    /// after that long if it is still running.
    fn run(&mut self, args: &[String], kill_after: Option<Duration>) -> Ran {
        self.log.push(format!(
            "fvd {}{}",
            args.join(" "),
            kill_after.map(|d| format!("   [kill -9 after {d:?}]")).unwrap_or_default()
        ));
        self.ops += 1;
        let mut child = Command::new(env!("CARGO_BIN_EXE_fvd"))
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fvd");
        let mut killed = false;
        if let Some(d) = kill_after {
            let t0 = Instant::now();
            loop {
                if child.try_wait().expect("wait").is_some() {
                    break;
                }
                if t0.elapsed() >= d {
                    let _ = child.kill();
                    killed = true;
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        let t0 = Instant::now();
        let out = child.wait_with_output().expect("wait fvd");
        assert!(t0.elapsed() < Duration::from_secs(60), "fvd {args:?} took over 60 s");
        let code = out.status.code().unwrap_or(-1);
        killed &= out.status.code().is_none();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        if killed {
            self.kills += 1;
            // A killed process's io_uring lets go of its files (and their
            // locks) a moment after it is gone: wait, as an operator would.
            let t0 = Instant::now();
            for l in &self.layers {
                while fvd::storage::held_by_writer(&self.dir.path().join(&l.name)) {
                    assert!(t0.elapsed() < Duration::from_secs(10), "{} stays locked after a kill", l.name);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        Ran { code, out: text, killed }
    }

    fn must(&mut self, args: &[String]) -> String {
        let r = self.run(args, None);
        self.expect(r.code == 0, &format!("fvd {} failed ({}): {}", args.join(" "), r.code, r.out));
        r.out
    }

    fn refused(&mut self, args: &[String], what: &str) {
        let r = self.run(args, None);
        self.expect(r.code != 0, &format!("{what}: fvd {} succeeded: {}", args.join(" "), r.out));
        self.refusals += 1;
    }

    fn expect(&self, ok: bool, msg: &str) {
        if !ok {
            self.fail(msg);
        }
    }

    fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\nthe sequence so far:\n  {}", self.log.join("\n  "));
    }

    /// A layer's chain, itself first.
    fn chain(&self, i: usize) -> Vec<usize> {
        let mut out = vec![i];
        let mut at = i;
        while let Some(b) = self.layers[at].base {
            out.push(b);
            at = b;
        }
        out
    }

    /// Whether the layer opens: no layer of its chain is invalid or was
    /// orphaned by a commit. None: it may or may not.
    fn opens_state(&self, i: usize) -> Option<bool> {
        let c = self.chain(i);
        if c.iter().any(|&k| self.layers[k].state == State::Invalid || self.layers[k].orphan == Some(true)) {
            return Some(false);
        }
        if c.iter().any(|&k| self.layers[k].orphan.is_none()) {
            return None;
        }
        Some(true)
    }

    fn opens(&self, i: usize) -> bool {
        self.opens_state(i) == Some(true)
    }

    fn size(&self, i: usize) -> u64 {
        match &self.layers[i].content {
            Some(c) => c.len() as u64,
            None => {
                let p = self.path(&self.layers[i].name);
                if self.layers[i].raw {
                    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
                } else {
                    fvd::image::snapshot::header_at(&p).map(|h| h.virtual_size).unwrap_or(0)
                }
            }
        }
    }

    /// What layer `i` reads now, through the binary.
    fn read_all(&mut self, i: usize) -> Result<Vec<u8>, String> {
        let name = self.layers[i].name.clone();
        if self.layers[i].raw {
            return std::fs::read(self.path(&name)).map_err(|e| e.to_string());
        }
        let size = self.size(i);
        let out = self.path("read.out");
        let r = self.run(&args(&["io", "-r", &name, "-c", &format!("read -o read.out 0 {size}")]), None);
        if r.code != 0 {
            return Err(r.out);
        }
        std::fs::read(out).map_err(|e| e.to_string())
    }

    /// Every layer reads its model; those that must not open do not.
    fn verify(&mut self, check: &[usize]) {
        for i in 0..self.layers.len() {
            let Some(opens) = self.opens_state(i) else {
                // Either way is right; it must not hang or crash.
                let _ = self.read_all(i);
                continue;
            };
            let got = self.read_all(i);
            match (opens, got) {
                (true, Ok(bytes)) => {
                    if let Some(want) = &self.layers[i].content {
                        if bytes != *want {
                            let first = bytes.iter().zip(want.iter()).position(|(a, b)| a != b);
                            self.fail(&format!(
                                "{} reads other bytes than its model: {} bytes against {}, first difference at {:?}",
                                self.layers[i].name,
                                bytes.len(),
                                want.len(),
                                first
                            ));
                        }
                    }
                }
                (true, Err(e)) => self.fail(&format!("{} does not open: {e}", self.layers[i].name)),
                (false, Ok(_)) => {
                    self.fail(&format!("{} opens, but it (or a layer under it) is marked invalid", self.layers[i].name))
                }
                (false, Err(_)) => {}
            }
        }
        for &i in check {
            self.check(i);
        }
    }

    /// `fvd check`: clean on a layer that opens or is itself invalid (a
    /// note); corrupt (2) on one whose chain passes through an invalid layer.
    fn check(&mut self, i: usize) {
        if self.layers[i].raw {
            return;
        }
        let name = self.layers[i].name.clone();
        let repair = self.rng.gen_bool(0.2) && self.opens(i);
        let mut a = vec!["check".to_string()];
        if repair {
            a.push("--repair".into());
        }
        a.push(name.clone());
        let r = self.run(&a, None);
        let want = match self.opens_state(i) {
            _ if self.layers[i].state == State::Invalid => 0,
            Some(true) => 0,
            Some(false) => 2,
            None => return,
        };
        self.expect(r.code == want, &format!("fvd check {name}: exit {} (want {want}): {}", r.code, r.out));
    }

    fn fvd_layers(&self, pred: impl Fn(usize, &Layer) -> bool) -> Vec<usize> {
        (0..self.layers.len()).filter(|&i| !self.layers[i].raw && pred(i, &self.layers[i])).collect()
    }

    fn pick(&mut self, v: &[usize]) -> Option<usize> {
        (!v.is_empty()).then(|| v[self.rng.gen_range(0..v.len())])
    }

    fn kill_point(&mut self) -> Option<Duration> {
        self.rng.gen_bool(0.5).then(|| Duration::from_micros(self.rng.gen_range(0..15_000)))
    }

    fn geometry_args(&mut self) -> Vec<String> {
        let block = [4096u32, 16384, 65536][self.rng.gen_range(0..3)];
        let mut a = vec!["--block-size".to_string(), block.to_string()];
        match self.rng.gen_range(0..4) {
            0 => a.push("--no-table".into()),
            k => {
                let chunk = (block.max([65536u32, 262144, 1 << 20][k - 1])).max(block);
                a.push("--chunk-size".into());
                a.push(chunk.to_string());
            }
        }
        if self.rng.gen_bool(0.3) {
            a.push("--journal-size".into());
            a.push("64k".into());
        }
        a
    }

    /// Runs a command that makes the file `made` (create, snapshot, convert),
    /// perhaps killed part-way: all or nothing, so after a kill the file is
    /// either there, whole (verified with the rest), or missing, and then the
    /// same command again makes it.
    fn run_making(&mut self, a: &[String], made: &str, what: &str) {
        let kill = self.kill_point();
        let r = self.run(a, kill);
        if r.killed {
            if !self.path(made).exists() {
                self.must(a);
            }
        } else {
            self.expect(r.code == 0, &format!("{what}: {}", r.out));
        }
    }

    /// Runs a command that changes layer `i` but not what it reads (commit,
    /// rebase, prefetch), perhaps killed part-way: after a kill, `i` still
    /// reads its model, and the same command again completes the job.
    fn run_resumable(&mut self, a: &[String], i: usize, what: &str) {
        let kill = self.kill_point();
        let r = self.run(a, kill);
        if !r.killed {
            return self.expect(r.code == 0, &format!("{what}: {}", r.out));
        }
        if let Some(want) = self.layers[i].content.clone() {
            let name = self.layers[i].name.clone();
            match self.read_all(i) {
                Ok(got) if got == want => {}
                Ok(_) => self.fail(&format!("after a killed {what} {name} reads other bytes")),
                Err(e) => self.fail(&format!("after a killed {what} {name} does not open: {e}")),
            }
        }
        self.must(a);
    }

    // ---- the operations ----

    fn new_bottom(&mut self) -> Vec<usize> {
        let size = [2u64 << 20, 4 << 20, 3 << 20][self.rng.gen_range(0..3)];
        if self.rng.gen_bool(0.4) {
            let name = self.fresh_name("raw");
            let mut c = vec![0u8; size as usize];
            for _ in 0..self.rng.gen_range(1..6) {
                let off = self.rng.gen_range(0..size as usize);
                let len = self.rng.gen_range(1..(512 << 10)).min(size as usize - off);
                let b: u8 = self.rng.gen();
                c[off..off + len].fill(b);
            }
            std::fs::write(self.path(&name), &c).expect("write raw");
            self.log.push(format!("(raw bottom {name}, {size} bytes)"));
            self.layers.push(Layer {
                name,
                raw: true,
                state: State::Live,
                content: Some(c),
                base: None,
                orphan: Some(false),
            });
        } else {
            let name = self.fresh_name("fvd");
            let mut a = args(&["create", "--size", &size.to_string()]);
            a.extend(self.geometry_args());
            a.push(name.clone());
            self.must(&a);
            self.layers.push(Layer {
                name,
                raw: false,
                state: State::Live,
                content: Some(vec![0; size as usize]),
                base: None,
                orphan: Some(false),
            });
        }
        vec![self.layers.len() - 1]
    }

    fn overlay(&mut self) -> Vec<usize> {
        let v: Vec<usize> = (0..self.layers.len()).filter(|&i| self.opens(i)).collect();
        let Some(b) = self.pick(&v) else { return vec![] };
        let name = self.fresh_name("fvd");
        let mut a = args(&["create", "-b", &self.layers[b].name.clone()]);
        a.extend(self.geometry_args());
        if self.rng.gen_bool(0.3) {
            a.push("--no-zero-detect".into());
        }
        a.push(name.clone());
        let what = format!("create over {}", self.layers[b].name);
        self.run_making(&a, &name, &what);
        if !self.layers[b].raw {
            self.layers[b].state = State::Frozen;
        }
        let content = self.layers[b].content.clone();
        self.layers.push(Layer { name, raw: false, state: State::Live, content, base: Some(b), orphan: Some(false) });
        vec![b, self.layers.len() - 1]
    }

    fn io(&mut self) -> Vec<usize> {
        let v = self.fvd_layers(|_, l| l.state == State::Live);
        let v: Vec<usize> = v.into_iter().filter(|&i| self.opens(i)).collect();
        let Some(i) = self.pick(&v) else { return vec![] };
        let size = self.size(i);
        let mut a = args(&["io"]);
        let writethrough = self.rng.gen_bool(0.3);
        if writethrough {
            a.push("--writethrough".into());
        }
        a.push(self.layers[i].name.clone());
        // The model after each command: states[k] after the first k.
        let mut states = vec![self.layers[i].content.clone()];
        let mut flush_at = Vec::new();
        for k in 0..self.rng.gen_range(1..8) {
            let mut content = states[k].clone();
            let off = self.rng.gen_range(0..size / 512) * 512;
            let len = (self.rng.gen_range(1..=((size - off) / 512).min(4096))) * 512;
            let cmd = match self.rng.gen_range(0..10) {
                0..=4 => {
                    let p: u8 = self.rng.gen_range(1..=255);
                    if let Some(c) = content.as_mut() {
                        c[off as usize..(off + len) as usize].fill(p);
                    }
                    format!("write -P {p} {off} {len}")
                }
                5 => {
                    if let Some(c) = content.as_mut() {
                        c[off as usize..(off + len) as usize].fill(0);
                    }
                    format!("zero {off} {len}")
                }
                6 => {
                    if let Some(c) = content.as_mut() {
                        c[off as usize..(off + len) as usize].fill(0);
                    }
                    format!("discard {off} {len}")
                }
                7 => {
                    flush_at.push(k);
                    "flush".to_string()
                }
                _ => {
                    // An odd length: the bytes after it in its last sector stay.
                    let n = self.rng.gen_range(1..=(len as usize).min(5000));
                    let bytes: Vec<u8> = (0..n).map(|_| self.rng.gen()).collect();
                    self.seq_names += 1;
                    let f = format!("src{}.bin", self.seq_names);
                    std::fs::write(self.path(&f), &bytes).expect("write src");
                    if let Some(c) = content.as_mut() {
                        c[off as usize..off as usize + n].copy_from_slice(&bytes);
                    }
                    format!("write -s {f} {off}")
                }
            };
            a.push("-c".into());
            a.push(cmd);
            states.push(content);
        }
        let kill = self.kill_point();
        let r = self.run(&a, kill);
        if r.killed {
            self.after_killed_io(i, &r, &states, &flush_at, writethrough);
            // Every command of it is idempotent: the same again completes it.
            self.must(&a);
        } else {
            self.expect(r.code == 0, &format!("io on {}: {}", self.layers[i].name, r.out));
        }
        self.layers[i].content = states.pop().flatten();
        vec![i]
    }

    /// After `fvd io` was killed: every command it reported done (a line
    /// each; `flush` prints none) is there if it was flushed, or in
    /// writethrough mode; of the rest, each byte holds what one of the
    /// commands up to the one in flight left there, never anything else.
    fn after_killed_io(&mut self, i: usize, r: &Ran, states: &[Option<Vec<u8>>], flush_at: &[usize], wt: bool) {
        if states.iter().any(|s| s.is_none()) {
            return;
        }
        let done_lines = r
            .out
            .lines()
            .filter(|l| l.starts_with("wrote ") || l.starts_with("discard ") || l.starts_with("read "))
            .count();
        // Commands that printed, in order: index of the done_lines-th one.
        let printing: Vec<usize> = (0..states.len() - 1).filter(|k| !flush_at.contains(k)).collect();
        let completed = if done_lines == 0 { 0 } else { printing[done_lines - 1] + 1 };
        let lo =
            if wt { completed } else { flush_at.iter().filter(|&&f| f < completed).map(|&f| f + 1).max().unwrap_or(0) };
        // In flight: the flushes after the last line and the command after them.
        let next = printing.iter().copied().find(|&k| k >= completed).unwrap_or(states.len() - 1);
        let hi = (next + 1).min(states.len() - 1);
        let got = match self.read_all(i) {
            Ok(g) => g,
            Err(e) => self.fail(&format!("after a killed io, {} does not open: {e}", self.layers[i].name)),
        };
        let allowed: Vec<&Vec<u8>> = states[lo..=hi].iter().flatten().collect();
        if let Some(b) = (0..got.len()).find(|&b| !allowed.iter().any(|s| s[b] == got[b])) {
            self.fail(&format!(
                "after a killed io ({done_lines} command(s) reported done, writethrough {wt}), {} byte {b:#x} holds {:#x}, \
                 which none of the states {lo}..={hi} has",
                self.layers[i].name, got[b]
            ));
        }
    }

    fn refusals(&mut self) -> Vec<usize> {
        match self.rng.gen_range(0..4) {
            0 => {
                let v = self.fvd_layers(|_, l| l.state == State::Frozen);
                let Some(i) = self.pick(&v) else { return vec![] };
                let n = self.layers[i].name.clone();
                self.refused(&args(&["io", &n, "-c", "write -P 9 0 512"]), "a write to a frozen layer");
                vec![i]
            }
            1 => {
                // A rebase onto itself or onto a layer above it makes a loop.
                let v = self.fvd_layers(|i, _| self.opens(i));
                let Some(i) = self.pick(&v) else { return vec![] };
                let above: Vec<usize> =
                    (0..self.layers.len()).filter(|&k| self.chain(k).contains(&i) && self.opens(k)).collect();
                let Some(k) = self.pick(&above) else { return vec![] };
                let (n, t) = (self.layers[i].name.clone(), self.layers[k].name.clone());
                let u = self.rng.gen_bool(0.5);
                let mut a = args(&["rebase"]);
                if u {
                    a.push("-u".into());
                }
                a.extend(args(&["-b", &t, &n]));
                self.refused(&a, "a rebase that makes a loop");
                vec![i]
            }
            2 => {
                // A snapshot onto a name that exists, or into a folder that does not.
                let v = self.fvd_layers(|i, l| l.state == State::Live && self.opens(i));
                let Some(i) = self.pick(&v) else { return vec![] };
                let n = self.layers[i].name.clone();
                let target = if self.rng.gen_bool(0.5) {
                    let k = self.rng.gen_range(0..self.layers.len());
                    self.layers[k].name.clone()
                } else {
                    "no-such-folder/x.fvd".into()
                };
                self.refused(&args(&["snapshot", &n, &target]), "a snapshot onto a bad name");
                vec![i]
            }
            _ => {
                // Out of range or wrapping offsets; nothing is written.
                let v = self.fvd_layers(|i, l| l.state == State::Live && self.opens(i));
                let Some(i) = self.pick(&v) else { return vec![] };
                let n = self.layers[i].name.clone();
                let size = self.size(i);
                let cmd = match self.rng.gen_range(0..3) {
                    0 => "write -P 7 18446744073709551104 1024".to_string(),
                    1 => format!("write -P 7 {} 1024", size - 512),
                    _ => format!("zero {} 1024", size - 512),
                };
                self.refused(&args(&["io", &n, "-c", "write -P 3 0 512", "-c", &cmd]), "an out-of-range request");
                // The command before it did run.
                if let Some(c) = self.layers[i].content.as_mut() {
                    c[..512].fill(3);
                }
                vec![i]
            }
        }
    }

    fn snapshot(&mut self) -> Vec<usize> {
        let v = self.fvd_layers(|i, l| l.state != State::Invalid && self.opens(i));
        let Some(i) = self.pick(&v) else { return vec![] };
        let name = self.fresh_name("fvd");
        let a = args(&["snapshot", &self.layers[i].name.clone(), &name]);
        self.run_making(&a, &name, "snapshot");
        self.layers[i].state = State::Frozen;
        let content = self.layers[i].content.clone();
        self.layers.push(Layer { name, raw: false, state: State::Live, content, base: Some(i), orphan: Some(false) });
        vec![i, self.layers.len() - 1]
    }

    fn commit(&mut self) -> Vec<usize> {
        let v = self.fvd_layers(|i, l| l.base.is_some() && self.opens(i));
        let Some(i) = self.pick(&v) else { return vec![] };
        let chain = self.chain(i);
        let depth = self.rng.gen_range(1..chain.len());
        let t = chain[depth];
        if self.size(t) != self.size(i) {
            return vec![];
        }
        let keep = self.rng.gen_bool(0.3);
        let mut a = args(&["commit"]);
        if depth > 1 || self.rng.gen_bool(0.5) {
            a.extend(args(&["-b", &self.layers[t].name.clone()]));
        }
        if keep {
            a.push("-d".into());
        }
        a.push(self.layers[i].name.clone());
        // After a kill the chain still reads what the image read.
        self.run_resumable(&a, i, "commit");
        // The target reads what the image read; the layers between are
        // invalid; whatever else read through the target reads changed data
        // (the product promises nothing there: unknown).
        let between: Vec<usize> = chain[1..depth].to_vec();
        for &b in &between {
            self.layers[b].state = State::Invalid;
        }
        let content = self.layers[i].content.clone();
        for k in 0..self.layers.len() {
            let ck = self.chain(k);
            if k != t && ck.contains(&t) && !ck.contains(&i) {
                self.layers[k].content = None;
                // The one right above the target is refused at open (fvd),
                // or may be (raw: a sampled fingerprint).
                if self.layers[k].base == Some(t) && !between.contains(&k) {
                    self.layers[k].orphan = if self.layers[t].raw { None } else { Some(true) };
                }
            }
        }
        self.layers[t].content = content;
        self.layers[i].base = Some(t);
        let mut touched = vec![i, t];
        touched.extend(between);
        touched
    }

    fn rebase(&mut self) -> Vec<usize> {
        let v = self.fvd_layers(|i, l| l.base.is_some() && self.opens(i));
        let Some(i) = self.pick(&v) else { return vec![] };
        let bsize = self.size(self.layers[i].base.unwrap_or(i));
        let name = self.layers[i].name.clone();
        let standalone = self.rng.gen_bool(0.2);
        // Unsafe: onto a layer that reads exactly what the old base reads (a
        // copy of it, the operator's case), so the image reads the same.
        let base_content = self.layers[i].base.and_then(|b| self.layers[b].content.clone());
        let unsafe_mode =
            !standalone && self.layers[i].state == State::Live && base_content.is_some() && self.rng.gen_bool(0.3);
        let target = if standalone {
            None
        } else if unsafe_mode {
            let c: Vec<usize> = (0..self.layers.len())
                .filter(|&k| {
                    Some(k) != self.layers[i].base
                        && self.opens(k)
                        && !self.chain(k).contains(&i)
                        && self.layers[k].content == base_content
                })
                .collect();
            match self.pick(&c) {
                Some(k) => Some(k),
                None => return vec![],
            }
        } else {
            // Any layer of the same size that opens and whose chain does not pass through i.
            let c: Vec<usize> = (0..self.layers.len())
                .filter(|&k| self.opens(k) && !self.chain(k).contains(&i) && self.size(k) == bsize)
                .collect();
            match self.pick(&c) {
                Some(k) => Some(k),
                None => return vec![],
            }
        };
        let tname = target.map(|k| self.layers[k].name.clone()).unwrap_or_default();
        let a = if unsafe_mode {
            args(&["rebase", "-u", "-b", &tname, &name])
        } else {
            args(&["rebase", "-b", &tname, &name])
        };
        self.run_resumable(&a, i, "rebase");
        // An fvd new base is frozen by the rebase (it must never change under i).
        if let Some(k) = target {
            if !self.layers[k].raw {
                self.layers[k].state = State::Frozen;
            }
        }
        self.layers[i].base = target;
        let mut touched = vec![i];
        touched.extend(target);
        touched
    }

    fn resize(&mut self) -> Vec<usize> {
        let v = self.fvd_layers(|i, l| l.state == State::Live && self.opens(i) && l.content.is_some());
        let Some(i) = self.pick(&v) else { return vec![] };
        let size = self.size(i);
        let new = size + self.rng.gen_range(1..=8u64) * (512 << 10);
        let a = args(&["resize", &self.layers[i].name.clone(), &new.to_string()]);
        let kill = self.kill_point();
        let r = self.run(&a, kill);
        if r.killed {
            self.must(&a);
        } else {
            self.expect(r.code == 0, &format!("resize: {}", r.out));
        }
        if let Some(c) = self.layers[i].content.as_mut() {
            c.resize(new as usize, 0);
        }
        vec![i]
    }

    fn convert(&mut self) -> Vec<usize> {
        let v: Vec<usize> = (0..self.layers.len()).filter(|&i| self.opens(i)).collect();
        let Some(i) = self.pick(&v) else { return vec![] };
        let raw = self.rng.gen_bool(0.3);
        let name = self.fresh_name(if raw { "raw" } else { "fvd" });
        let mut a = args(&["convert"]);
        if raw {
            a.extend(args(&["-O", "raw"]));
        } else if self.rng.gen_bool(0.3) {
            a.push("--no-table".into());
        }
        a.push(self.layers[i].name.clone());
        a.push(name.clone());
        self.run_making(&a, &name, "convert");
        let content = self.layers[i].content.clone();
        self.layers.push(Layer { name, raw, state: State::Live, content, base: None, orphan: Some(false) });
        vec![self.layers.len() - 1]
    }

    fn prefetch(&mut self) -> Vec<usize> {
        let v = self.fvd_layers(|i, l| l.base.is_some() && l.state == State::Live && self.opens(i));
        let Some(i) = self.pick(&v) else { return vec![] };
        let a = args(&["prefetch", &self.layers[i].name.clone()]);
        self.run_resumable(&a, i, "prefetch");
        self.layers[i].base = None;
        vec![i]
    }

    /// `fvd scrub` (killed mid-way at random, then run again), after one byte
    /// of one copy of a random stripe of the table or bitmap was damaged half
    /// of the time: the layer reads the same, and the scrub leaves check clean.
    fn scrub(&mut self) -> Vec<usize> {
        let v = self.fvd_layers(|i, l| l.state != State::Invalid && self.opens(i));
        let Some(i) = self.pick(&v) else { return vec![] };
        let name = self.layers[i].name.clone();
        let p = self.path(&name);
        if let Ok(h) = fvd::image::snapshot::header_at(&p) {
            let meta_len = h.table_len + h.bitmap_len;
            if h.has_twin() && meta_len > 0 && self.rng.gen_bool(0.5) {
                let copy = self.rng.gen_range(0..2u64);
                let at = self.rng.gen_range(0..meta_len);
                let twin = h.journal_offset + h.journal_len;
                let (t, b) = if copy == 0 {
                    (h.table_offset, h.bitmap_offset)
                } else {
                    (twin, twin + (h.bitmap_offset - h.table_offset))
                };
                let off = if at < h.table_len { t + at } else { b + (at - h.table_len) };
                let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).expect("open for damage");
                let mut byte = [0u8];
                f.read_exact_at(&mut byte, off).expect("read for damage");
                f.write_all_at(&[byte[0] ^ 0x5a], off).expect("damage");
                self.log.push(format!("(damaged copy {copy} of {name}'s metadata at {off:#x})"));
            }
        }
        let a = args(&["scrub", &name]);
        self.run_resumable(&a, i, "scrub");
        vec![i]
    }

    fn step(&mut self) {
        if self.layers.len() >= MAX_LAYERS {
            let touched = match self.rng.gen_range(0..5) {
                0 => self.commit(),
                1 => self.rebase(),
                2 => self.refusals(),
                _ => self.io(),
            };
            return self.verify(&touched);
        }
        let touched = match self.rng.gen_range(0..21) {
            0 => self.new_bottom(),
            1..=3 => self.overlay(),
            4..=8 => self.io(),
            9..=10 => self.snapshot(),
            11..=12 => self.commit(),
            13..=14 => self.rebase(),
            15 => self.resize(),
            16 => self.convert(),
            17 => self.prefetch(),
            18 => self.scrub(),
            _ => self.refusals(),
        };
        self.verify(&touched);
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn run_sequence(seed: u64) -> (u64, u64, u64) {
    let mut w = World::new(seed);
    w.log.push(format!("seed {seed}"));
    w.new_bottom();
    for _ in 0..STEPS {
        w.step();
    }
    let all: Vec<usize> = (0..w.layers.len()).collect();
    w.verify(&all);
    (w.ops, w.kills, w.refusals)
}

#[test]
fn image_commands_against_a_model() {
    let seqs: u64 = std::env::var("FVD_MODEL_CMDS_SEQS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_SEQS);
    let first: u64 = std::env::var("FVD_MODEL_CMDS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let t0 = Instant::now();
    let (mut ops, mut kills, mut refusals) = (0, 0, 0);
    for seed in first..first + seqs {
        let (o, k, r) = run_sequence(seed);
        ops += o;
        kills += k;
        refusals += r;
    }
    println!(
        "model_cmds: {seqs} sequences (seeds {first}..{}), {ops} fvd commands, {kills} killed with SIGKILL mid-way, \
         {refusals} refusals checked, in {:.0} s",
        first + seqs,
        t0.elapsed().as_secs_f64()
    );
}
