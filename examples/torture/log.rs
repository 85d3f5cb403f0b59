//! The operation log (every operation with its time, kept in a file and the last lines in
//! memory) and the one way a run fails: print the seed, the reason and the log's tail.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

pub struct Log {
    t0: Instant,
    seed: u64,
    file: Mutex<File>,
    tail: Mutex<VecDeque<String>>,
    counts: Mutex<BTreeMap<String, u64>>,
    failed: AtomicBool,
    verbose: bool,
    /// The fvd binary, to release the devices when the run fails.
    fvd: String,
}

impl Log {
    /// `append`: a later phase of a run (after a power cut) adds to the phase before's log.
    pub fn new(path: &str, seed: u64, verbose: bool, fvd: &str, append: bool) -> Result<Log, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .map_err(|e| format!("{path}: {e}"))?;
        Ok(Log {
            t0: Instant::now(),
            seed,
            file: Mutex::new(file),
            tail: Mutex::new(VecDeque::new()),
            counts: Mutex::new(BTreeMap::new()),
            failed: AtomicBool::new(false),
            verbose,
            fvd: fvd.to_string(),
        })
    }

    pub fn start(&self) -> Instant {
        self.t0
    }

    pub fn line(&self, text: &str) {
        let ms = self.t0.elapsed().as_millis();
        let l = format!("[{:>5}.{:03}] {text}", ms / 1000, ms % 1000);
        if let Ok(mut f) = self.file.lock() {
            let _ = writeln!(f, "{l}");
        }
        if self.verbose {
            println!("{l}");
        }
        if let Ok(mut t) = self.tail.lock() {
            t.push_back(l);
            if t.len() > 60 {
                t.pop_front();
            }
        }
    }

    /// Counts one operation of `kind` (its outcome in the name: "snapshot", "snapshot-refused").
    pub fn count(&self, kind: &str) {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(kind.to_string()).or_default() += 1;
        }
    }

    /// The log file on stable storage (before a power cut).
    pub fn sync(&self) {
        if let Ok(f) = self.file.lock() {
            let _ = f.sync_all();
        }
    }

    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Records the first failure: prints the seed, why, and the last operations; the run
    /// then winds down and exits non-zero.
    pub fn fail(&self, why: &str) {
        if self.failed.swap(true, Ordering::SeqCst) {
            self.line(&format!("FAIL (after the first): {why}"));
            return;
        }
        self.line(&format!("FAIL: {why}"));
        let tail = self.tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>()).unwrap_or_default();
        println!("torture: FAIL (seed {}): {why}", self.seed);
        println!("torture: the last operations (replay with --seed {}):", self.seed);
        for l in tail {
            println!("  {l}");
        }
        println!("torture: operations so far: {:?}", self.counts());
        // A hung request would keep the run from winding down: end here. But a
        // process with I/O in flight cannot exit until it completes: release every
        // device first (a daemon under SIGSTOP, or killed and not yet recovered,
        // holds its requests forever), else the scenario waits for this process.
        release_devices(&self.fvd);
        std::process::exit(1);
    }
}

/// Continues every fvd daemon (SIGCONT) and stops every device (`fvd stop --all --force`,
/// within two and a half minutes): requests in flight complete or fail.
fn release_devices(fvd: &str) {
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.trim() == "fvd" {
                // SAFETY: kill(2) with a pid and a signal; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
        }
    }
    let child = std::process::Command::new(fvd)
        .args(["stop", "--all", "--force"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Ok(mut c) = child {
        let t0 = Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(150) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        println!("torture: fvd stop --all --force did not finish within 150 s");
        let _ = c.kill();
    }
}
