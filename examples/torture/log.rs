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
}

impl Log {
    pub fn new(path: &str, seed: u64, verbose: bool) -> Result<Log, String> {
        let file = File::create(path).map_err(|e| format!("{path}: {e}"))?;
        Ok(Log {
            t0: Instant::now(),
            seed,
            file: Mutex::new(file),
            tail: Mutex::new(VecDeque::new()),
            counts: Mutex::new(BTreeMap::new()),
            failed: AtomicBool::new(false),
            verbose,
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
        // A hung request would keep the run from winding down: end here; the
        // scenario's cleanup stops the daemons.
        std::process::exit(1);
    }
}
