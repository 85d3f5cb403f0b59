//! The controller's operations on one device, each checked when it ends: the device
//! reads what the model allows, every command finished within its bound, and every
//! image no daemon holds checks clean.

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use crate::dev::{self, alive, daemon_pid, open_direct, run, signal, Daemon, Device, Kind};
use crate::log::Log;
use crate::model::{check_block, BLOCK};
use crate::writer::{pread, Aligned};

/// One operation, its parameters drawn by the scheduler from the seed.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// An online snapshot onto a new layer of the device's kind.
    Snapshot,
    /// Grow the live device by `mib`.
    ResizeOnline { mib: u64 },
    /// Stop; offline: check, maybe commit, rebase the top onto the bottom layer, resize
    /// and check --repair; start again.
    Restart { commit: bool, rebase: bool, resize_mib: u64, repair: bool },
    /// kill -9 the daemon, wait `ms`, `fvd recover`; `again` more times the recovered daemon
    /// is killed at once (a crash soon after recovery).
    KillRecover { ms: u64, again: u32 },
    /// SIGSTOP the daemon for `ms`, then SIGCONT.
    Pause { ms: u64 },
    /// Writes fail for `ms` (dm-flakey error_writes), then a forced stop, a check, a start.
    Fault { ms: u64 },
    /// The volume group has no free extent for `ms` (an LV takes it all), then room again.
    VgFull { ms: u64 },
    /// The thin pool runs out of data space for `ms` (another thin LV fills it), then has
    /// room again; a failed commit leaves the image refusing writes until it is opened
    /// again, so a (forced) restart follows.
    ThinFull { ms: u64 },
    /// The NBD server of the overlay's base dies for `ms` and comes back; then the daemon
    /// is stopped, the export attached again and the daemon started (fvd does not
    /// reconnect by itself yet: issue 25).
    NbdRestart { ms: u64 },
    /// Read the whole region and compare it with the model.
    Verify,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::ResizeOnline { .. } => "resize-online",
            Op::Restart { .. } => "restart",
            Op::KillRecover { .. } => "kill-recover",
            Op::Pause { .. } => "sigstop",
            Op::Fault { .. } => "fault",
            Op::VgFull { .. } => "vg-full",
            Op::ThinFull { .. } => "thin-full",
            Op::NbdRestart { .. } => "nbd-restart",
            Op::Verify => "verify",
        }
    }
}

/// What the controller shares with every operation.
pub struct Ctx<'a> {
    pub fvd: &'a str,
    pub work: &'a str,
    pub thin_pool: Option<&'a str>,
    pub log: &'a Log,
    pub region_blocks: u64,
    pub online_resize: &'a std::sync::atomic::AtomicBool,
    pub max_layers: usize,
    /// dm tables of the flakey device: healthy and failing.
    pub flakey_tables: Option<(String, String)>,
    /// Commands that kill the overlay base's NBD server, and serve and attach it again.
    pub nbd_down: Option<&'a str>,
    pub nbd_up: Option<&'a str>,
}

/// The dm device the flakey kind's image lives on (96-torture.sh makes it).
pub const FLAKEY_NAME: &str = "fvdtorture";

fn vg_of(path: &str) -> Option<&str> {
    path.strip_prefix("/dev/")?.split('/').next()
}

impl Ctx<'_> {
    fn fvd(&self, args: &[&str]) -> Result<dev::Out, String> {
        run(self.log, self.fvd, args)
    }

    /// Runs one operation on `d`; `Err` is a failure of the run.
    pub fn apply(&self, d: &Device, op: Op, n: u64) -> Result<(), String> {
        let name = d.kind.name();
        self.log.line(&format!("op {n}: {name} dev {}: {op:?}", d.index));
        let outcome = match op {
            Op::Snapshot => self.snapshot(d, n)?,
            Op::ResizeOnline { mib } => self.resize_online(d, mib)?,
            Op::Restart { commit, rebase, resize_mib, repair } => {
                self.restart(d, commit, rebase, resize_mib, repair)?
            }
            Op::KillRecover { ms, again } => self.kill_recover(d, ms, again)?,
            Op::Pause { ms } => self.pause(d, ms)?,
            Op::Fault { ms } => self.fault(d, ms)?,
            Op::VgFull { ms } => self.vg_full(d, ms)?,
            Op::ThinFull { ms } => self.thin_full(d, ms)?,
            Op::NbdRestart { ms } => self.nbd_restart(d, ms)?,
            Op::Verify => "",
        };
        self.verify(d)?;
        let mut kind = if outcome.is_empty() { op.name().to_string() } else { format!("{}-{outcome}", op.name()) };
        if n == 0 {
            kind = format!("final-{kind}");
        }
        self.log.count(&kind);
        self.log.line(&format!("op {n}: done ({kind})"));
        Ok(())
    }

    fn running(&self, d: &Device) -> Result<(u32, i32), String> {
        match *d.daemon.lock().map_err(|_| "poisoned")? {
            Daemon::Running { id, pid } => Ok((id, pid)),
            Daemon::Away => Err(format!("{} dev {}: no daemon serves it", d.kind.name(), d.index)),
        }
    }

    /// Reads the whole checked region with the writers held off and checks every block.
    pub fn verify(&self, d: &Device) -> Result<(), String> {
        let guard = d.io.write().map_err(|_| "poisoned")?;
        let Some(f) = guard.as_ref() else { return Ok(()) };
        let per = 256u64; // blocks per read: 1 MiB
        let mut buf = Aligned::new(per as usize * BLOCK);
        let mut b0 = 0;
        while b0 < self.region_blocks {
            let n = per.min(self.region_blocks - b0);
            let b = buf.get(n as usize * BLOCK);
            if let Err(e) = pread(f, b, b0 * BLOCK as u64) {
                if d.trouble.load(SeqCst) {
                    self.log.line(&format!("  verify: read at block {b0} failed (errno {e}) in a trouble window"));
                    return Ok(());
                }
                return Err(format!("{} dev {}: verify read at block {b0} failed: errno {e}", d.kind.name(), d.index));
            }
            let mut m = d.model.lock().map_err(|_| "poisoned")?;
            for i in 0..n {
                let blk = b0 + i;
                let seen =
                    match check_block(&b[i as usize * BLOCK..][..BLOCK], d.index, blk, &m.blocks[blk as usize].cur) {
                        Ok(s) => s,
                        Err(e) => {
                            self.where_is(d, blk);
                            return Err(format!("{} dev {}: verify: {e}", d.kind.name(), d.index));
                        }
                    };
                m.observed(blk, seen);
            }
            b0 += n;
        }
        Ok(())
    }

    /// Logs where each layer of the device keeps `blk` (fvd map, what its metadata on
    /// storage says), for a failure's report.
    fn where_is(&self, d: &Device, blk: u64) {
        let layers = d.layers.lock().map(|l| l.clone()).unwrap_or_default();
        let off = blk * BLOCK as u64;
        for l in layers.iter().rev() {
            let Ok(o) = self.fvd(&["map", "--output", "json", l]) else { continue };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&o.stdout) else {
                self.log.line(&format!("  where: {l}: fvd map: {}", o.stderr.trim()));
                continue;
            };
            let hit = v.as_array().into_iter().flatten().find(|r| {
                let s = r["start"].as_u64().unwrap_or(u64::MAX);
                s <= off && off < s.saturating_add(r["length"].as_u64().unwrap_or(0))
            });
            let mut raw = String::new();
            if let Some(h) = hit {
                if let (Some(so), Some(st)) = (h["offset"].as_u64(), h["start"].as_u64()) {
                    let at = so + (off - st);
                    let mut sec = [0u8; 512];
                    let r = std::fs::File::open(l)
                        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut sec, at));
                    raw = match r {
                        Ok(()) => {
                            format!("; its storage at {at:#x} holds {:?}", crate::model::decode(&sec, d.index, blk))
                        }
                        Err(e) => format!("; its storage at {at:#x}: {e}"),
                    };
                }
            }
            self.log.line(&format!(
                "  where: block {blk} (byte {off:#x}) in {l}: {}{raw}",
                hit.map(|h| h.to_string()).unwrap_or_default()
            ));
        }
    }

    fn new_layer(&self, d: &Device, n: u64) -> Result<Option<String>, String> {
        let layers = d.layers.lock().map_err(|_| "poisoned")?.len();
        if layers >= self.max_layers {
            return Ok(None);
        }
        let name = format!("d{}s{n}", d.index);
        match d.kind {
            Kind::Lv | Kind::Thin => {
                let vg = vg_of(&d.storage).ok_or("no VG in the LV path")?;
                let size = "16M".to_string();
                let pool;
                let args: Vec<&str> = if d.kind == Kind::Thin {
                    pool = self.thin_pool.ok_or("no --thin-pool")?.to_string();
                    vec!["-q", "-y", "-V", "384M", "-T", &pool, "-n", &name]
                } else {
                    vec!["-q", "-y", "-L", &size, "-n", &name, vg]
                };
                let o = run(self.log, "lvcreate", &args)?;
                if !o.ok {
                    return Ok(None);
                }
                let path = format!("/dev/{vg}/{name}");
                dev::wait_path(&path, 20);
                Ok(Some(path))
            }
            _ => Ok(Some(format!("{}/{name}.fvd", self.work))),
        }
    }

    fn snapshot(&self, d: &Device, n: u64) -> Result<&'static str, String> {
        let (id, _) = self.running(d)?;
        let Some(new) = self.new_layer(d, n)? else { return Ok("skipped") };
        let o = self.fvd(&["snapshot", "-n", &id.to_string(), &new])?;
        if !o.ok {
            return Ok("refused");
        }
        d.layers.lock().map_err(|_| "poisoned")?.push(new);
        Ok("")
    }

    fn resize_online(&self, d: &Device, mib: u64) -> Result<&'static str, String> {
        if !self.online_resize.load(SeqCst) {
            return Ok("unsupported");
        }
        let (id, _) = self.running(d)?;
        let o = self.fvd(&["resize", "-n", &id.to_string(), &format!("+{mib}M")])?;
        if !o.ok {
            if o.stderr.contains("UPDATE_SIZE") {
                self.online_resize.store(false, SeqCst);
                return Ok("unsupported");
            }
            return Ok("refused");
        }
        d.size.fetch_add(mib << 20, SeqCst);
        Ok("")
    }

    /// Stops the device with the writers held off; `force` for a daemon that may be stuck or dead.
    fn stop(&self, d: &Device, force: bool) -> Result<(), String> {
        let id = match *d.daemon.lock().map_err(|_| "poisoned")? {
            Daemon::Running { id, .. } => id,
            Daemon::Away => return Ok(()),
        };
        *d.daemon.lock().map_err(|_| "poisoned")? = Daemon::Away;
        let mut io = d.io.write().map_err(|_| "poisoned")?;
        *io = None;
        let ids = id.to_string();
        let args: Vec<&str> = if force { vec!["stop", "-n", &ids, "--force"] } else { vec!["stop", "-n", &ids] };
        let o = self.fvd(&args)?;
        if !o.ok && !force {
            return Err(format!("{} dev {}: fvd stop failed: {}", d.kind.name(), d.index, o.stderr));
        }
        if o.ok && !force {
            // A clean stop flushes: everything acknowledged is durable.
            let mut m = d.model.lock().map_err(|_| "poisoned")?;
            let s = m.seq();
            m.flushed(s);
        }
        Ok(())
    }

    /// Checks every layer; `fvd check` must say clean (exit 0).
    pub fn check_layers(&self, d: &Device) -> Result<(), String> {
        let layers = d.layers.lock().map_err(|_| "poisoned")?.clone();
        for l in &layers {
            let o = self.fvd(&["check", l])?;
            if !o.ok {
                return Err(format!(
                    "{} dev {}: fvd check {l} exited {:?}: {}{}",
                    d.kind.name(),
                    d.index,
                    o.code,
                    o.stdout,
                    o.stderr
                ));
            }
        }
        Ok(())
    }

    pub fn start(&self, d: &Device) -> Result<(), String> {
        let top = d.top();
        let mut args = vec!["start", &top[..]];
        if d.kind == Kind::Overlay {
            // Copy-on-read and a slow prefetch keep reading the base through the run.
            args.extend(["--copy-on-read", "--prefetch", "--prefetch-rate", "1M"]);
        }
        let o = self.fvd(&args)?;
        if !o.ok {
            return Err(format!("{} dev {}: fvd start {top} failed: {}", d.kind.name(), d.index, o.stderr));
        }
        let path = o.stdout.lines().last().unwrap_or("").trim().to_string();
        let id: u32 = path
            .strip_prefix("/dev/ublkb")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("fvd start printed {path:?}"))?;
        if !dev::wait_path(&path, 20) {
            return Err(format!("{path} did not appear"));
        }
        let pid = daemon_pid(id).ok_or_else(|| format!("no pid for device {id}"))?;
        *d.io.write().map_err(|_| "poisoned")? = Some(open_direct(&path)?);
        *d.daemon.lock().map_err(|_| "poisoned")? = Daemon::Running { id, pid };
        Ok(())
    }

    fn restart(
        &self,
        d: &Device,
        commit: bool,
        rebase: bool,
        resize_mib: u64,
        repair: bool,
    ) -> Result<&'static str, String> {
        self.running(d)?;
        self.verify(d)?;
        self.stop(d, false)?;
        self.check_layers(d)?;
        let top = d.top();
        let mut outcome = "";
        let layers = d.layers.lock().map_err(|_| "poisoned")?.len();
        if rebase && layers >= 3 {
            // A safe rebase onto the bottom layer: the layers between drop out of the chain.
            let bottom = d.layers.lock().map_err(|_| "poisoned")?[0].clone();
            let o = self.fvd(&["rebase", "-b", &bottom, &top])?;
            if !o.ok && o.stderr.contains("a rebase keeps the base's size") {
                // A resize grew the layers above the bottom: a rebase onto a base of
                // another size is refused, in one line, and changes nothing.
                self.check_layers(d)?;
                self.start(d)?;
                return Ok("rebase-refused");
            }
            if !o.ok {
                return Err(format!("fvd rebase -b {bottom} {top} failed: {}", o.stderr));
            }
            let dropped: Vec<String> = {
                let mut l = d.layers.lock().map_err(|_| "poisoned")?;
                let between = l[1..l.len() - 1].to_vec();
                *l = vec![bottom, top.clone()];
                between
            };
            self.check_layers(d)?;
            // The layers that left the chain give their storage back (a long run would
            // fill the volume group or the pool with them otherwise).
            for gone in dropped {
                if gone.starts_with("/dev/") {
                    let lv = gone.trim_start_matches("/dev/").to_string();
                    let o = run(self.log, "lvremove", &["-q", "-y", "-f", &lv])?;
                    if !o.ok {
                        return Err(format!("lvremove {lv}: {}", o.stderr));
                    }
                } else {
                    std::fs::remove_file(&gone).map_err(|e| format!("rm {gone}: {e}"))?;
                }
            }
            self.start(d)?;
            return Ok("rebase");
        }
        if commit && layers >= 2 {
            let o = self.fvd(&["commit", &top])?;
            if o.ok {
                outcome = "commit";
            } else if o.stderr.contains("is smaller") || o.stderr.contains("no base to commit into") {
                // The top grew after its base was frozen: a commit does not grow a frozen
                // layer, and says so (it names rebase -b "" instead). Or the top holds
                // its whole base (an overlay's prefetch finished): it no longer reads
                // through it, and there is nothing to commit into.
                outcome = "commit-refused";
            } else {
                return Err(format!("fvd commit {top} failed: {}", o.stderr));
            }
            self.check_layers(d)?;
        }
        if resize_mib > 0 {
            let o = self.fvd(&["resize", &top, &format!("+{resize_mib}M")])?;
            if o.ok {
                d.size.fetch_add(resize_mib << 20, SeqCst);
                outcome = match outcome {
                    "" => "resize",
                    "commit" => "commit-resize",
                    _ => "commit-refused-resize",
                };
            }
            self.check_layers(d)?;
        }
        if repair {
            let o = self.fvd(&["check", "--repair", &top])?;
            if !o.ok {
                return Err(format!("fvd check --repair {top} on a clean image exited {:?}: {}", o.code, o.stdout));
            }
            self.check_layers(d)?;
        }
        self.start(d)?;
        Ok(outcome)
    }

    fn recover(&self, d: &Device, id: u32) -> Result<(), String> {
        let o = self.fvd(&["recover", "-n", &id.to_string()])?;
        if !o.ok {
            return Err(format!("{} dev {}: fvd recover -n {id} failed: {}", d.kind.name(), d.index, o.stderr));
        }
        let pid = daemon_pid(id).ok_or_else(|| format!("no pid for device {id} after recover"))?;
        *d.daemon.lock().map_err(|_| "poisoned")? = Daemon::Running { id, pid };
        Ok(())
    }

    fn kill_recover(&self, d: &Device, ms: u64, again: u32) -> Result<&'static str, String> {
        let (id, mut pid) = self.running(d)?;
        d.paused.fetch_add(1, SeqCst);
        for round in 0..=again {
            *d.daemon.lock().map_err(|_| "poisoned")? = Daemon::Away;
            signal(pid, libc::SIGKILL);
            let t0 = std::time::Instant::now();
            while alive(pid) && t0.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(20));
            }
            self.crashed(d)?;
            std::thread::sleep(Duration::from_millis(if round == 0 { ms } else { 0 }));
            self.recover(d, id)?;
            pid = self.running(d)?.1;
        }
        d.unpaused_ms.store(dev::now_ms(self.log.start()), SeqCst);
        d.paused.fetch_sub(1, SeqCst);
        Ok(if again > 0 { "twice" } else { "" })
    }

    fn pause(&self, d: &Device, ms: u64) -> Result<&'static str, String> {
        let (_, pid) = self.running(d)?;
        d.paused.fetch_add(1, SeqCst);
        signal(pid, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(ms));
        signal(pid, libc::SIGCONT);
        d.unpaused_ms.store(dev::now_ms(self.log.start()), SeqCst);
        d.paused.fetch_sub(1, SeqCst);
        Ok("")
    }

    fn dm_table(&self, table: &str) -> Result<(), String> {
        let name = FLAKEY_NAME;
        for args in [vec!["suspend", "--nolockfs", name], vec!["load", name, "--table", table], vec!["resume", name]] {
            let o = run(self.log, "dmsetup", &args)?;
            if !o.ok {
                return Err(format!("dmsetup {} failed: {}", args.join(" "), o.stderr));
            }
        }
        Ok(())
    }

    fn fault(&self, d: &Device, ms: u64) -> Result<&'static str, String> {
        let (id, _) = self.running(d)?;
        let (healthy, failing) = self.flakey_tables.clone().ok_or("no flakey tables")?;
        d.trouble.store(true, SeqCst);
        self.dm_table(&failing)?;
        std::thread::sleep(Duration::from_millis(ms));
        self.dm_table(&healthy)?;
        self.after_trouble(d, &format!("the daemon (device {id}) died in a fault window"))
    }

    /// The end of a trouble window: the daemon must have lived through it; then a
    /// forced restart, and requests must succeed again.
    fn after_trouble(&self, d: &Device, died: &str) -> Result<&'static str, String> {
        let (_, pid) = self.running(d)?;
        if !alive(pid) {
            return Err(format!("{} dev {}: {died}", d.kind.name(), d.index));
        }
        self.forced_restart(d)?;
        d.trouble.store(false, SeqCst);
        Ok("")
    }

    /// After trouble: a forced stop (it may lose what was not flushed: the model says
    /// so), every layer checked clean, a start and a full check.
    fn forced_restart(&self, d: &Device) -> Result<(), String> {
        self.stop(d, true)?;
        self.crashed(d)?;
        self.check_layers(d)?;
        self.start(d)?;
        self.verify(d)
    }

    fn thin_full(&self, d: &Device, ms: u64) -> Result<&'static str, String> {
        self.running(d)?;
        let pool = self.thin_pool.ok_or("no --thin-pool")?.to_string();
        let vg = pool.split('/').next().unwrap_or_default().to_string();
        let filler = format!("/dev/{vg}/filler");
        d.trouble.store(true, SeqCst);
        let o = run(self.log, "lvcreate", &["-q", "-y", "-V", "2G", "-T", &pool, "-n", "filler"])?;
        if !o.ok {
            return Err(format!("lvcreate filler in {pool}: {}", o.stderr));
        }
        dev::wait_path(&filler, 20);
        // Fills the pool; dd ends with "No space left" once the pool is full.
        let of = format!("of={filler}");
        run(self.log, "dd", &["if=/dev/zero", &of, "bs=1M", "oflag=direct", "count=2048", "status=none"])?;
        std::thread::sleep(Duration::from_millis(ms));
        let r = run(self.log, "lvremove", &["-q", "-y", "-f", &format!("{vg}/filler")])?;
        if !r.ok {
            return Err(format!("lvremove {vg}/filler failed: {}", r.stderr));
        }
        self.after_trouble(d, "the daemon died while the pool was full")
    }

    fn vg_full(&self, d: &Device, ms: u64) -> Result<&'static str, String> {
        let vg = vg_of(&d.storage).ok_or("no VG in the LV path")?.to_string();
        d.trouble.store(true, SeqCst);
        let fill = format!("{vg}/fill");
        let o = run(self.log, "lvcreate", &["-q", "-y", "-l", "100%FREE", "-n", "fill", &vg])?;
        std::thread::sleep(Duration::from_millis(ms));
        if o.ok {
            let r = run(self.log, "lvremove", &["-q", "-y", "-f", &fill])?;
            if !r.ok {
                return Err(format!("lvremove {fill} failed: {}", r.stderr));
            }
        }
        // Room again: writing resumes without a restart (after a moment for a retry).
        std::thread::sleep(Duration::from_millis(1500));
        self.verify(d)?;
        d.trouble.store(false, SeqCst);
        Ok(if o.ok { "" } else { "no-free" })
    }

    fn nbd_restart(&self, d: &Device, ms: u64) -> Result<&'static str, String> {
        let (Some(down), Some(up)) = (self.nbd_down, self.nbd_up) else { return Ok("skipped") };
        self.running(d)?;
        d.trouble.store(true, SeqCst);
        let o = run(self.log, down, &[])?;
        if !o.ok {
            return Err(format!("{down} failed: {}", o.stderr));
        }
        std::thread::sleep(Duration::from_millis(ms));
        let (_, pid) = self.running(d)?;
        if !alive(pid) {
            return Err(format!("overlay dev {}: the daemon died while its base was away", d.index));
        }
        // Reads that needed the base failed meanwhile; writes went on. A clean stop.
        self.stop(d, false)?;
        let o = run(self.log, up, &[])?;
        if !o.ok {
            return Err(format!("{up} failed: {}", o.stderr));
        }
        self.check_layers(d)?;
        self.start(d)?;
        self.verify(d)?;
        d.trouble.store(false, SeqCst);
        Ok("")
    }

    /// The end of a run: every daemon killed at the same moment, with the writers' last
    /// requests in flight; then each recovered and read whole.
    pub fn kill_all(&self, devs: &[Device]) -> Result<(), String> {
        let mut ids = Vec::new();
        for d in devs {
            let (id, pid) = self.running(d)?;
            d.paused.fetch_add(1, SeqCst);
            *d.daemon.lock().map_err(|_| "poisoned")? = Daemon::Away;
            ids.push((id, pid));
        }
        for (_, pid) in &ids {
            signal(*pid, libc::SIGKILL);
        }
        self.log.line(&format!("final: killed every daemon at once ({} devices)", ids.len()));
        for (d, (id, pid)) in devs.iter().zip(ids) {
            let t0 = std::time::Instant::now();
            while alive(pid) && t0.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(20));
            }
            self.crashed(d)?;
            self.recover(d, id)?;
            d.unpaused_ms.store(dev::now_ms(self.log.start()), SeqCst);
            d.paused.fetch_sub(1, SeqCst);
            self.verify(d)?;
        }
        self.log.count("final-kill-all");
        Ok(())
    }

    /// The daemon is gone (dead, or stopped by force): from here a block may hold what
    /// it held at the last flush or anything written since. Only once it is gone: a
    /// write acknowledged between this and its death would otherwise count as certain.
    /// Requests under way meanwhile see the crash count change and count as uncertain.
    fn crashed(&self, d: &Device) -> Result<(), String> {
        let mut m = d.model.lock().map_err(|_| "poisoned")?;
        d.crashes.fetch_add(1, SeqCst);
        m.crashed();
        Ok(())
    }
}
