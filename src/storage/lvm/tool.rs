//! Running lvm2's tools: `lvs` for facts about an LV, `lvextend` to grow it.
//!
//! Every command is an argument vector handed to `execve` (never a shell),
//! with names validated by [`super::names`], stdin from /dev/null, `LC_ALL=C`
//! (so the messages parsed here are in English) and a time limit.

use super::names::LvName;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A failed tool run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    /// The command, for messages.
    pub cmd: String,
    /// What went wrong: the tool's own error lines, or why it did not run.
    pub why: String,
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.cmd, self.why)
    }
}

/// Why `lvextend` did not grow the LV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtendError {
    /// The volume group has too few free extents.
    NoSpace(String),
    /// Anything else (lvm2 missing, a lock held too long, a refused request).
    Failed(String),
}

impl ExtendError {
    pub fn message(&self) -> &str {
        match self {
            ExtendError::NoSpace(m) | ExtendError::Failed(m) => m,
        }
    }
}

/// Classifies a failed `lvextend` by its messages.
pub fn classify_extend_failure(err: ToolError) -> ExtendError {
    let low = err.why.to_ascii_lowercase();
    if low.contains("insufficient free space") || low.contains("insufficient suitable") {
        ExtendError::NoSpace(err.to_string())
    } else {
        ExtendError::Failed(err.to_string())
    }
}

/// The free extents lvextend reported when it refused: "Insufficient free
/// space: 8 extents needed, but only 7 available".
pub fn available_extents(msg: &str) -> Option<u64> {
    let rest = &msg[msg.find("but only ")? + "but only ".len()..];
    let n: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    rest[n.len()..].trim_start().starts_with("available").then(|| n.parse().ok()).flatten()
}

/// One line of `lvs` output, for the fields [`REPORT_FIELDS`] asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct LvReport {
    pub vg: String,
    pub lv: String,
    /// `lv_attr`, e.g. `-wi-a-----` (linear) or `Vwi-a-tz--` (thin).
    pub attr: String,
    pub size: u64,
    pub segtype: String,
    /// The thin pool, for a thin LV.
    pub pool: Option<String>,
    pub vg_free: u64,
    pub extent_size: u64,
    pub tags: Vec<String>,
    /// For a thin pool: the share of its data space in use; for a thin LV: of its size.
    pub data_percent: Option<f64>,
    /// A thin pool zeroes newly provisioned blocks.
    pub zero: bool,
    /// A thin pool's discard mode: passdown, nopassdown or ignore.
    pub discards: String,
}

impl LvReport {
    pub fn is_thin(&self) -> bool {
        self.segtype == "thin" || self.attr.starts_with('V')
    }

    pub fn is_active(&self) -> bool {
        self.attr.as_bytes().get(4) == Some(&b'a')
    }

    /// A `fvd-grow-unit=SIZE` tag on the LV.
    pub fn grow_unit_tag(&self) -> Option<Result<u64, String>> {
        let v = self.tags.iter().find_map(|t| t.strip_prefix("fvd-grow-unit="))?;
        Some(crate::units::parse_size(v).map(|b| b.0))
    }
}

/// The fields asked of `lvs`, in the order [`parse_report`] reads them.
pub const REPORT_FIELDS: &str =
    "vg_name,lv_name,lv_attr,lv_size,segtype,pool_lv,vg_free,vg_extent_size,lv_tags,data_percent,zero,discards";

/// Parses `lvs --noheadings --separator '|' --units b --nosuffix -o REPORT_FIELDS`.
pub fn parse_report(text: &str) -> Result<Vec<LvReport>, String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        if f.len() != 12 {
            return Err(format!("unexpected lvs line ({} fields, want 12): {line}", f.len()));
        }
        let num = |i: usize, what: &str| -> Result<u64, String> {
            f[i].parse::<u64>().map_err(|_| format!("lvs gave {what} '{}' in: {line}", f[i]))
        };
        let data_percent = match f[9] {
            "" => None,
            s => Some(s.parse::<f64>().map_err(|_| format!("lvs gave data_percent '{s}' in: {line}"))?),
        };
        out.push(LvReport {
            vg: f[0].to_string(),
            lv: f[1].to_string(),
            attr: f[2].to_string(),
            size: num(3, "lv_size")?,
            segtype: f[4].to_string(),
            pool: Some(f[5].to_string()).filter(|p| !p.is_empty()),
            vg_free: num(6, "vg_free")?,
            extent_size: num(7, "vg_extent_size")?,
            tags: f[8].split(',').filter(|t| !t.is_empty()).map(str::to_string).collect(),
            data_percent,
            zero: f[10] == "zero",
            discards: f[11].to_string(),
        });
    }
    Ok(out)
}

/// lvm2's command-line tools.
#[derive(Debug, Clone)]
pub struct Lvm {
    bin: PathBuf,
    timeout: Duration,
    /// The administrator's own `devices/global_filter`, read once.
    admin_filter: Arc<OnceLock<Vec<String>>>,
    /// Keep lvm2 off ublk devices (see [`ublk_reject_patterns`]).
    guard: bool,
}

/// Reject patterns (lvm2 filter syntax) for every ublk block device and all
/// its names: the kernel name, `/dev/block/MAJ:MIN` and udev's links.
///
/// lvm2 reads every device it may find a PV on, and a ublk device's reads are
/// answered by its daemon. A daemon whose I/O thread waits for this very
/// growth could never answer, and lvextend (holding the VG lock) would hang
/// with it; so could another fvd daemon waiting for the same VG lock. lvm2
/// accepts a device when any of its names matches an accept pattern first,
/// so every name gets a reject pattern ahead of the administrator's own.
pub fn ublk_reject_patterns(sys_block: &Path, udev_db: &Path) -> Vec<String> {
    let mut v = vec!["r|^/dev/ublkb[0-9]+(p[0-9]+)?$|".to_string()];
    let Ok(rd) = std::fs::read_dir(sys_block) else {
        return v;
    };
    let mut names: Vec<_> = rd.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    names.sort();
    for name in names.into_iter().filter(|n| n.starts_with("ublkb")) {
        let Ok(dev) = std::fs::read_to_string(sys_block.join(&name).join("dev")) else {
            continue;
        };
        let dev = dev.trim();
        v.push(exact_reject(&format!("/dev/block/{dev}")));
        if let Ok(db) = std::fs::read_to_string(udev_db.join(format!("b{dev}"))) {
            for link in db.lines().filter_map(|l| l.strip_prefix("S:")) {
                v.push(exact_reject(&format!("/dev/{link}")));
            }
        }
    }
    v
}

/// A pattern that rejects exactly `path`: regex metacharacters become
/// bracket expressions (no backslashes, which lvm.conf strings would need
/// escaped again); the few characters a bracket cannot hold match any one.
fn exact_reject(path: &str) -> String {
    let mut re = String::from("r|^");
    for c in path.chars() {
        match c {
            '.' | '+' | '*' | '?' | '(' | ')' | '$' | '{' | '}' => {
                re.push('[');
                re.push(c);
                re.push(']');
            }
            '|' | '[' | ']' | '^' | '\\' | '"' => re.push('.'),
            c => re.push(c),
        }
    }
    re.push_str("$|");
    re
}

/// The `--config` setting: our rejects, then the administrator's patterns.
pub fn filter_config(rejects: &[String], admin: &[String]) -> String {
    let quote = |p: &String| format!("\"{}\"", p.replace('\\', "\\\\").replace('"', "\\\""));
    let items: Vec<String> = rejects.iter().chain(admin.iter()).map(quote).collect();
    format!("devices/global_filter=[{}]", items.join(","))
}

/// Parses a string list as `lvmconfig --valuesonly` prints it: `["a|x|","r|y|"]`.
pub fn parse_string_list(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    let s = s.split_once('=').map(|(_, v)| v.trim()).filter(|_| !s.starts_with('[')).unwrap_or(s);
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    let mut out = Vec::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut item = String::new();
                loop {
                    match chars.next()? {
                        '\\' => item.push(chars.next()?),
                        '"' => break,
                        c => item.push(c),
                    }
                }
                out.push(item);
            }
            ',' | ' ' | '\t' | '\n' => {}
            _ => return None,
        }
    }
    Some(out)
}

impl Default for Lvm {
    fn default() -> Self {
        Lvm::find()
    }
}

impl Lvm {
    /// The `lvm` binary from $PATH, else from /usr/sbin or /sbin.
    pub fn find() -> Lvm {
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join("lvm")).find(|c| c.is_file()))
            .unwrap_or(None);
        let bin = on_path
            .or_else(|| ["/usr/sbin/lvm", "/sbin/lvm"].iter().map(PathBuf::from).find(|c| c.is_file()))
            .unwrap_or_else(|| PathBuf::from("lvm"));
        Lvm::with_binary(&bin)
    }

    pub fn with_binary(bin: &Path) -> Lvm {
        Lvm { bin: bin.to_path_buf(), timeout: Duration::from_secs(120), admin_filter: Default::default(), guard: true }
    }

    /// Without the ublk device filter (tests of the argument vector).
    pub fn unguarded(mut self) -> Lvm {
        self.guard = false;
        self
    }

    fn admin_filter(&self) -> &[String] {
        self.admin_filter.get_or_init(|| {
            // Prints `global_filter=[...]`, or fails when it is not set.
            let args = ["lvmconfig", "--typeconfig", "current", "devices/global_filter"];
            match self.run_raw(&args.map(String::from)) {
                Ok(out) if out.trim().is_empty() => Vec::new(),
                Ok(out) => parse_string_list(&out).unwrap_or_else(|| {
                    tracing::warn!(value = %out.trim(), "could not parse devices/global_filter; using none");
                    Vec::new()
                }),
                Err(_) => Vec::new(), // not set
            }
        })
    }

    pub fn with_timeout(mut self, t: Duration) -> Lvm {
        self.timeout = t;
        self
    }

    /// Runs `lvm ARGS…` (with the ublk device filter) and returns its
    /// stdout, or its error lines.
    pub fn run(&self, args: &[String]) -> Result<String, ToolError> {
        if !self.guard || args.is_empty() {
            return self.run_raw(args);
        }
        let rejects = ublk_reject_patterns(Path::new("/sys/block"), Path::new("/run/udev/data"));
        let mut full = vec![args[0].clone(), "--config".into(), filter_config(&rejects, self.admin_filter())];
        full.extend(args[1..].iter().cloned());
        self.run_raw(&full)
    }

    fn run_raw(&self, args: &[String]) -> Result<String, ToolError> {
        // Messages leave out the long device filter.
        let shown: Vec<&str> = args
            .iter()
            .enumerate()
            .filter(|(i, a)| {
                let filter_arg = a.starts_with("devices/global_filter")
                    || (*a == "--config" && args.get(i + 1).is_some_and(|n| n.starts_with("devices/")));
                !filter_arg
            })
            .map(|(_, a)| a.as_str())
            .collect();
        let cmd = format!("lvm {}", shown.join(" "));
        let err = |why: String| ToolError { cmd: cmd.clone(), why };
        let mut child = Command::new(&self.bin)
            .args(args)
            .env("LC_ALL", "C")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("cannot run {}: {e}", self.bin.display())))?;
        // Readers on threads of their own: a tool that writes more than a pipe
        // holds must not stall while we wait for it to exit.
        let mut out_pipe = child.stdout.take();
        let mut err_pipe = child.stderr.take();
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(p) = out_pipe.as_mut() {
                let _ = p.read_to_string(&mut s);
            }
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(p) = err_pipe.as_mut() {
                let _ = p.read_to_string(&mut s);
            }
            s
        });
        let t0 = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if t0.elapsed() > self.timeout => {
                    // Our own child, by its handle. A child stuck in the kernel
                    // dies only when its I/O ends: reap it on a thread of its own.
                    let _ = child.kill();
                    std::thread::spawn(move || {
                        let _ = child.wait();
                    });
                    return Err(err(format!("no answer within {} s; killed", self.timeout.as_secs())));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(err(format!("waiting for it: {e}"))),
            }
        };
        let stdout = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        if status.success() {
            return Ok(stdout);
        }
        let lines: Vec<&str> =
            stderr.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("WARNING")).collect();
        let why = if lines.is_empty() { stderr.trim().to_string() } else { lines.join("; ") };
        Err(err(format!("{status}: {why}")))
    }

    /// `lvs` for the given LVs, in the order lvm2 lists them.
    pub fn report(&self, lvs: &[&LvName]) -> Result<Vec<LvReport>, ToolError> {
        let mut args: Vec<String> = ["lvs", "--noheadings", "--separator", "|", "--units", "b", "--nosuffix", "-o"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(REPORT_FIELDS.into());
        args.extend(lvs.iter().map(|l| l.arg()));
        let text = self.run(&args)?;
        parse_report(&text).map_err(|why| ToolError { cmd: "lvm lvs".into(), why })
    }

    /// `lvextend --size BYTESb VG/LV`: an absolute size, so a retry after a
    /// growth whose answer got lost never grows twice.
    pub fn extend_to(&self, lv: &LvName, bytes: u64) -> Result<(), ExtendError> {
        let args = vec!["lvextend".to_string(), "--size".into(), format!("{bytes}b"), lv.arg()];
        self.run(&args).map(|_| ()).map_err(classify_extend_failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "  fvdtest|lin-x|-wi-a-----|67108864|linear||322961408|4194304|fvd-grow-unit=256M,x|||\n\
                          \x20 fvdtest|thin|Vwi-a-tz--|134217728|thin|pool|322961408|4194304||18.75|zero|passdown\n\
                          \x20 fvdtest|pool|twi-aotz--|134217728|thin-pool||322961408|4194304||0.00|zero|passdown\n";

    #[test]
    fn parses_lvs_lines() {
        let r = parse_report(SAMPLE).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].lv, "lin-x");
        assert_eq!(r[0].size, 64 << 20);
        assert!(!r[0].is_thin());
        assert!(r[0].is_active());
        assert_eq!(r[0].pool, None);
        assert_eq!(r[0].tags, vec!["fvd-grow-unit=256M", "x"]);
        assert_eq!(r[0].grow_unit_tag(), Some(Ok(256 << 20)));
        assert_eq!(r[0].data_percent, None);
        assert!(r[1].is_thin());
        assert_eq!(r[1].pool.as_deref(), Some("pool"));
        assert_eq!(r[1].data_percent, Some(18.75));
        assert_eq!(r[1].grow_unit_tag(), None);
        assert!(r[2].zero);
        assert_eq!(r[2].discards, "passdown");
        assert_eq!(r[2].extent_size, 4 << 20);
        assert!(parse_report("  a|b|c\n").is_err());
        assert!(parse_report("  fvdtest|l|-wi-a-----|x|linear||1|1||||\n").is_err());
        assert!(parse_report("").unwrap().is_empty());
    }

    #[test]
    fn available_extents_from_the_message() {
        assert_eq!(
            available_extents("exit status: 5: Insufficient free space: 8 extents needed, but only 7 available"),
            Some(7)
        );
        assert_eq!(available_extents("Insufficient free space: 1 extents needed, but only 0 available"), Some(0));
        assert_eq!(available_extents("Volume group not found"), None);
        assert_eq!(available_extents("but only x available"), None);
    }

    #[test]
    fn extend_failures_are_classified() {
        let e = |why: &str| ToolError { cmd: "lvm lvextend".into(), why: why.into() };
        assert!(matches!(
            classify_extend_failure(e(
                "exit status: 5: Insufficient free space: 262128 extents needed, but only 77 available"
            )),
            ExtendError::NoSpace(_)
        ));
        assert!(matches!(
            classify_extend_failure(e("exit status: 5: Volume group \"x\" not found")),
            ExtendError::Failed(_)
        ));
    }

    /// A stand-in `lvm` script shows the exact argument vector and that a
    /// failing tool's error lines come back.
    #[test]
    fn runs_by_argument_vector_and_reports_errors() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("lvm");
        std::fs::write(
            &bin,
            "#!/bin/sh\nfor a in \"$@\"; do printf '[%s]' \"$a\"; done\nif [ \"$1\" = lvextend ]; then echo '  WARNING: noise' >&2; \
             echo '  Insufficient free space: 2 extents needed, but only 1 available' >&2; exit 5; fi\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let lvm = Lvm::with_binary(&bin).unguarded();
        let out = lvm.run(&["lvs".into(), "a b".into(), "$(x)".into()]).unwrap();
        assert_eq!(out, "[lvs][a b][$(x)]");
        let lv = LvName::new("vg", "lv").unwrap();
        match lvm.extend_to(&lv, 1 << 30) {
            Err(ExtendError::NoSpace(m)) => {
                assert!(m.contains("Insufficient free space"), "{m}");
                assert!(!m.contains("WARNING"), "{m}");
            }
            r => panic!("{r:?}"),
        }
        // Guarded: the filter goes right after the subcommand.
        let out = Lvm::with_binary(&bin).run(&["lvs".into(), "vg/lv".into()]).unwrap();
        assert!(out.starts_with("[lvs][--config][devices/global_filter=[\"r|^/dev/ublkb"), "{out}");
        assert!(out.ends_with("][vg/lv]"), "{out}");
        let slow = d.path().join("slow");
        std::fs::write(&slow, "#!/bin/sh\nexec sleep 5\n").unwrap();
        std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = Lvm::with_binary(&slow).with_timeout(Duration::from_millis(200)).run(&["lvs".into()]).unwrap_err();
        assert!(e.why.contains("killed"), "{e}");
        let e = Lvm::with_binary(&d.path().join("missing")).run(&["lvs".into()]).unwrap_err();
        assert!(e.why.contains("cannot run"), "{e}");
    }

    #[test]
    fn ublk_devices_are_filtered_by_every_name() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let udev = d.path().join("udev");
        for (n, dev) in [("ublkb0", "259:0"), ("ublkb0p1", "259:1"), ("sda", "8:0")] {
            std::fs::create_dir_all(sys.join(n)).unwrap();
            std::fs::write(sys.join(n).join("dev"), format!("{dev}\n")).unwrap();
        }
        std::fs::create_dir_all(&udev).unwrap();
        std::fs::write(udev.join("b259:0"), "S:fvd/disk.fvd\nS:disk/by-diskseq/9\nE:ID_X=1\n").unwrap();
        std::fs::write(udev.join("b8:0"), "S:disk/by-id/ata-x\n").unwrap();
        let p = ublk_reject_patterns(&sys, &udev);
        assert_eq!(
            p,
            vec![
                "r|^/dev/ublkb[0-9]+(p[0-9]+)?$|",
                "r|^/dev/block/259:0$|",
                "r|^/dev/fvd/disk[.]fvd$|",
                "r|^/dev/disk/by-diskseq/9$|",
                "r|^/dev/block/259:1$|",
            ]
        );
        let admin = parse_string_list(r#"["a|/dev/sd.*|", "r|.*|"]"#).unwrap();
        assert_eq!(admin, vec!["a|/dev/sd.*|", "r|.*|"]);
        assert_eq!(parse_string_list(r#"global_filter=["a|x\"y|"]"#).unwrap(), vec![r#"a|x"y|"#]);
        assert_eq!(parse_string_list("nonsense"), None);
        assert_eq!(
            filter_config(&p[..2], &admin),
            r#"devices/global_filter=["r|^/dev/ublkb[0-9]+(p[0-9]+)?$|","r|^/dev/block/259:0$|","a|/dev/sd.*|","r|.*|"]"#
        );
        assert_eq!(exact_reject("/dev/a|b[c]\\d"), "r|^/dev/a.b.c..d$|");
    }
}
