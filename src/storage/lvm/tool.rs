//! Running lvm2's tools: `lvs` for facts about an LV, `lvextend` to grow it.
//!
//! Every command is an argument vector handed to `execve` (never a shell),
//! with names validated by [`super::names`], stdin from /dev/null, `LC_ALL=C`
//! (so the messages parsed here are in English) and a time limit.

use super::filter::{filter_config, parse_string_list, ublk_reject_patterns};
use super::names::LvName;
use super::report::{parse_report, LvReport, REPORT_FIELDS};
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

/// The longest an `lvreduce` may take (a stop waits for it).
const REDUCE_TIMEOUT: Duration = Duration::from_secs(45);

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

    /// `lvs` for the given LVs, in the order lvm2 lists them: its JSON report
    /// (see [`super::report`]), sizes in bytes.
    pub fn report(&self, lvs: &[&LvName]) -> Result<Vec<LvReport>, ToolError> {
        let mut args: Vec<String> = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o"]
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

    /// `lvreduce -f -y [--fs ignore] --size BYTESb VG/LV`: the caller's word that
    /// nothing needs the bytes past BYTES. `--fs ignore` where lvm2 has it (2.03.17
    /// on; an image holds no file system for lvreduce to look after).
    pub fn reduce_to(&self, lv: &LvName, bytes: u64) -> Result<(), ToolError> {
        let mut args = vec!["lvreduce".to_string(), "-f".into(), "-y".into()];
        if self.version().is_some_and(|v| v >= (2, 3, 17)) {
            args.extend(["--fs".into(), "ignore".into()]);
        }
        args.extend(["--size".into(), format!("{bytes}b"), lv.arg()]);
        // Bounded well inside a stop's own wait for the daemon.
        self.clone().with_timeout(self.timeout.min(REDUCE_TIMEOUT)).run(&args).map(|_| ())
    }

    /// lvm2's version (`lvm version`: "LVM version:     2.03.16(2) (2022-05-18)").
    pub fn version(&self) -> Option<(u32, u32, u32)> {
        parse_version(&self.run_raw(&["version".to_string()]).ok()?)
    }
}

/// The (major, minor, patch) of `lvm version`'s first line.
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let line = text.lines().find(|l| l.trim_start().starts_with("LVM version:"))?;
    let v = line.split(':').nth(1)?.trim();
    let v: String = v.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let mut it = v.split('.').map(|n| n.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvm_version_is_read() {
        let t = "  LVM version:     2.03.16(2) (2022-05-18)\n  Library version: 1.02.185 (2022-05-18)\n";
        assert_eq!(parse_version(t), Some((2, 3, 16)));
        assert_eq!(parse_version("  LVM version:     2.03.31(2) (2025-02-27)"), Some((2, 3, 31)));
        assert_eq!(parse_version("nothing"), None);
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
    /// `report` asks for the JSON report with the exact argument vector and
    /// parses what comes back.
    #[test]
    fn report_asks_for_json() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("lvm");
        let want = format!("lvs --reportformat json --units b --nosuffix -o {REPORT_FIELDS} vg/lv vg/pool");
        let row = r#"{"vg_name":"vg", "lv_name":"lv", "lv_attr":"Vwi-a-tz--", "lv_size":"4194304", "segtype":"thin", "pool_lv":"pool", "vg_free":"0", "vg_extent_size":"4194304", "lv_tags":"", "data_percent":"50.00", "zero":"", "discards":""}"#;
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\nif [ \"$*\" = '{want}' ]; then echo '  {{\"report\": [{{\"lv\": [{row}]}}]}}'; exit 0; fi\n\
                 echo \"unexpected: $*\" >&2; exit 3\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (lv, pool) = (LvName::new("vg", "lv").unwrap(), LvName::new("vg", "pool").unwrap());
        let r = Lvm::with_binary(&bin).unguarded().report(&[&lv, &pool]).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].lv.as_str(), r[0].size, r[0].data_percent), ("lv", 4 << 20, Some(50.0)));
    }

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
}
