//! Real-kernel tests: the scenarios in tests/guest/scenarios/, run by tests/guest/run in
//! freshly booted Debian 6.12 guests (virtme-ng, software emulation; several scenarios per
//! boot, the guest reset between them), where ublk and device-mapper exist. They take minutes, so they run only when asked:
//!
//!     scripts/setup-guest                      # once per machine, as root
//!     FVD_GUEST_TESTS=1 cargo test --test guest -- --nocapture
//!
//! FVD_GUEST_SCENARIOS="00-kernel 10-foo" picks scenarios (default: all of them).
//! Then a subset (NEW_KERNEL_SCENARIOS, or FVD_GUEST_NEW_SCENARIOS) runs again on the
//! second kernel, the newest of trixie-backports (FVD_GUEST_NEW_KERNEL=0 skips it).
//! FVD=/path/to/fvd uses that binary instead of building target/release/fvd.

use std::env;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn say(msg: &str) {
    // Straight to the process's stderr, past the test harness's output capture, so the
    // message shows in a plain `cargo test` run.
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn has_kernel(root: &Path) -> bool {
    has_kernel_in(root, "target/guest-kernel")
}

fn has_kernel_in(root: &Path, dir: &str) -> bool {
    std::fs::read_dir(root.join(dir).join("boot"))
        .map(|dir| dir.flatten().any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")))
        .unwrap_or(false)
}

fn cargo() -> OsString {
    env::var_os("CARGO").or_else(|| option_env!("CARGO").map(OsString::from)).unwrap_or_else(|| OsString::from("cargo"))
}

#[test]
fn guest_scenarios() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));

    let mut why = Vec::new();
    if env::var("FVD_GUEST_TESTS").as_deref() != Ok("1") {
        why.push("FVD_GUEST_TESTS not set to 1");
    }
    if !has_kernel(&root) {
        why.push("guest kernel not installed in target/guest-kernel");
    }
    if !root.join("target/guest-venv/bin/vng").exists() {
        why.push("virtme-ng not installed in target/guest-venv");
    }
    if !why.is_empty() {
        say(&format!(
            "SKIP guest_scenarios: skipping real-kernel tests: {}; \
             run scripts/setup-guest and scripts/test (or FVD_GUEST_TESTS=1 cargo test --test guest)",
            why.join(", ")
        ));
        return;
    }

    let fvd = match env::var_os("FVD") {
        Some(path) => {
            say(&format!("guest_scenarios: using FVD={}", Path::new(&path).display()));
            PathBuf::from(path)
        }
        None => {
            say("guest_scenarios: cargo build --release --bin fvd");
            let status = Command::new(cargo())
                .args(["build", "--release", "--bin", "fvd"])
                .current_dir(&root)
                .status()
                .expect("could not run cargo");
            assert!(status.success(), "cargo build --release --bin fvd failed: {status}");
            let target = env::var_os("CARGO_TARGET_DIR").map(|t| root.join(t)).unwrap_or_else(|| root.join("target"));
            target.join("release/fvd")
        }
    };
    assert!(fvd.is_file(), "fvd binary not found at {}", fvd.display());
    let fvd = fvd.canonicalize().expect("canonicalize the fvd path");

    let scenarios = list(env::var("FVD_GUEST_SCENARIOS").unwrap_or_default());
    let default = run_guest(&root, &fvd, &[], &scenarios);

    // The second kernel (the newest of trixie-backports, 7.x): the scenarios that cover
    // the daemon's own paths (ublk set-up, requests, recovery, errors, a base), not the
    // long LVM ones, which exercise lvm2 and device-mapper more than the kernel's ublk.
    let new = if env::var("FVD_GUEST_NEW_KERNEL").as_deref() == Ok("0") {
        say("guest_scenarios: second kernel skipped (FVD_GUEST_NEW_KERNEL=0)");
        Ok(())
    } else if !has_kernel_in(&root, "target/guest-kernel-new") {
        say("SKIP guest_scenarios on the second kernel: none in target/guest-kernel-new (scripts/setup-guest)");
        Ok(())
    } else {
        // A subset asked for with FVD_GUEST_SCENARIOS narrows the default list too.
        let new = list(env::var("FVD_GUEST_NEW_SCENARIOS").unwrap_or_else(|_| {
            NEW_KERNEL_SCENARIOS
                .iter()
                .filter(|s| scenarios.is_empty() || scenarios.iter().any(|a| a.trim_end_matches(".sh") == **s))
                .copied()
                .collect::<Vec<_>>()
                .join(" ")
        }));
        if new.is_empty() {
            say("guest_scenarios: none of the chosen scenarios runs on the second kernel");
            Ok(())
        } else {
            say(&format!("guest_scenarios: on the second kernel: {}", new.join(" ")));
            run_guest(&root, &fvd, &["--kernel", "new"], &new)
        }
    };
    // The verdict names what failed and shows its last lines: in a long log (a CI run
    // keeps only the end) this is what stays in view.
    let failures: Vec<String> = [default.err(), new.err()].into_iter().flatten().collect();
    assert!(failures.is_empty(), "guest scenarios failed:\n{}", failures.join("\n"));
}

/// What runs on the second kernel too (FVD_GUEST_NEW_SCENARIOS overrides).
/// Chosen for what differs between kernels (ublk's feature set, user recovery, error
/// paths, udev) at a few minutes in all: CI runs both kernels in one job.
/// (40-recover passes there too, run by hand: `tests/guest/run --kernel new 40-recover`;
/// it is left out of CI for time.)
const NEW_KERNEL_SCENARIOS: &[&str] = &["00-kernel", "10-fs", "67-resize-online", "70-errors", "80-udev"];

fn list(s: String) -> Vec<String> {
    s.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Runs tests/guest/run; on failure, says which scenarios failed (from the runner's
/// `failed` file) with the last lines each printed.
fn run_guest(root: &Path, fvd: &Path, opts: &[&str], scenarios: &[String]) -> Result<(), String> {
    // Inherited stdout/stderr: the runner's lines stream as they come.
    let status = Command::new("bash")
        .arg(root.join("tests/guest/run"))
        .arg("--keep-going")
        .args(opts)
        .args(scenarios)
        .env("FVD", fvd)
        .current_dir(root)
        .status()
        .expect("could not run tests/guest/run");
    if status.success() {
        return Ok(());
    }
    let results = root.join(if opts.contains(&"new") { "target/guest-results-new" } else { "target/guest-results" });
    let failed = std::fs::read_to_string(results.join("failed")).unwrap_or_default();
    let mut msg = format!(
        "tests/guest/run {} failed ({status}); failed scenarios: {}; logs in {}/<scenario>/",
        opts.join(" "),
        if failed.trim().is_empty() {
            "none named (see the runner's output)".to_owned()
        } else {
            failed.split_whitespace().collect::<Vec<_>>().join(" ")
        },
        results.strip_prefix(root).unwrap_or(&results).display()
    );
    for name in failed.split_whitespace() {
        let log = std::fs::read_to_string(results.join(name).join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        msg.push_str(&format!("\n--- {name}: last lines of its console.log\n"));
        for line in &lines[lines.len().saturating_sub(VERDICT_LINES)..] {
            msg.push_str("    ");
            msg.push_str(line);
            msg.push('\n');
        }
    }
    Err(msg)
}

/// How many of a failed scenario's last lines the verdict shows.
const VERDICT_LINES: usize = 15;
