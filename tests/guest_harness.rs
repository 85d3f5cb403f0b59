//! The guest harness itself (tests/guest/run), with a fake `vng` in a scratch copy of the
//! tree: a guest that dies before its scenario starts is booted again (at most twice more,
//! each retry logged with its reason); a scenario that started is never retried.
//!
//! The fake `vng` stands where setup-guest puts the real one (target/guest-venv/bin) and,
//! when it "boots", runs the entry script the harness wrote, on the host. How it behaves
//! comes from FAKE_VNG_MODE:
//!   ok                 boots every time
//!   fail-first:N       dies (exit 255, a QEMU-style abort on stderr) on its first N boots
//!   die-after-start    runs the scenario, then dies as if the emulator aborted, no status
//!   assert-after-start:N   the same on its first N boots, with a QEMU assertion on stderr
//!   hang-at-exit       runs the scenarios, then never exits (a shutdown that hangs)

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const FAKE_VNG: &str = r#"#!/bin/bash
# Fake vng for the harness test: see tests/guest_harness.rs.
exec_cmd=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --exec) exec_cmd=$2; shift ;;
    esac
    shift
done
echo boot >>"$FAKE_VNG_LOG"
boots=$(wc -l <"$FAKE_VNG_LOG")
case $FAKE_VNG_MODE in
    fail-first:*)
        if [[ $boots -le ${FAKE_VNG_MODE#fail-first:} ]]; then
            echo "qemu-system-x86_64: hw/pci/msix.c:228: msix_table_mmio_write: Assertion failed." >&2
            exit 255
        fi ;;
    die-after-start | assert-after-start:*)
        if [[ $FAKE_VNG_MODE == assert-after-start:* && $boots -gt ${FAKE_VNG_MODE#assert-after-start:} ]]; then
            exec bash -c "$exec_cmd"
        fi
        # The entry script sits in target/guest-results/.boot: once a scenario has
        # started, the "guest" dies with everything in it.
        root=$(dirname "$(dirname "${exec_cmd#bash }")")
        setsid bash -c "$exec_cmd" >/dev/null 2>&1 &
        guest=$!
        for _ in $(seq 200); do
            compgen -G "$root/*/started" >/dev/null && break
            sleep 0.05
        done
        kill -9 -- "-$guest" 2>/dev/null || kill -9 "$guest"
        if [[ $FAKE_VNG_MODE == assert-after-start:* ]]; then
            echo "qemu-system-x86_64: system/physmem.c:2678: iotlb_to_section: Assertion \`section_index < d->map.sections_nb' failed." >&2
        else
            echo "qemu-system-x86_64: aborted after the scenario started" >&2
        fi
        exit 255 ;;
    hang-at-exit)
        bash -c "$exec_cmd"
        exec sleep 600 ;;
esac
exec bash -c "$exec_cmd"
"#;

struct Tree {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn write_exec(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A scratch copy of what tests/guest/run needs: the runner, lib.sh, two scenarios, a fake
/// kernel layout and the fake vng with stubs of the host tools the runner looks for.
fn tree() -> Tree {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let scen = root.join("tests/guest/scenarios");
    fs::create_dir_all(&scen).unwrap();
    fs::copy(src.join("tests/guest/run"), root.join("tests/guest/run")).unwrap();
    fs::copy(src.join("tests/guest/lib.sh"), root.join("tests/guest/lib.sh")).unwrap();
    fs::write(scen.join("pass.sh"), "step 'scenario ran'\necho ran >\"$RESULTS/ran\"\n").unwrap();
    fs::write(scen.join("slow.sh"), "step 'scenario ran'\nsleep 5\n").unwrap();
    fs::write(scen.join("pass2.sh"), "step 'scenario ran'\necho ran >\"$RESULTS/ran\"\n").unwrap();
    fs::write(scen.join("four-cpus.sh"), "# cpus: 4\nstep 'scenario ran'\necho ran >\"$RESULTS/ran\"\n").unwrap();
    fs::write(scen.join("fails.sh"), "step 'scenario ran'\nfail 'the scenario failed on purpose'\n").unwrap();
    let kdir = root.join("target/guest-kernel");
    fs::create_dir_all(kdir.join("boot")).unwrap();
    fs::create_dir_all(kdir.join("lib/modules/9.9.9-fake")).unwrap();
    fs::write(kdir.join("boot/vmlinuz-9.9.9-fake"), "").unwrap();
    fs::write(kdir.join("lib/modules/9.9.9-fake/modules.dep"), "").unwrap();
    let bin = root.join("target/guest-venv/bin");
    fs::create_dir_all(&bin).unwrap();
    write_exec(&bin.join("vng"), FAKE_VNG);
    for stub in ["qemu-system-x86_64", "busybox", "udevadm"] {
        write_exec(&bin.join(stub), "#!/bin/sh\nexit 0\n");
    }
    Tree { _dir: dir, root }
}

struct Run {
    ok: bool,
    out: String,
    boots: usize,
}

fn run(tree: &Tree, mode: &str, scenario: &str) -> Run {
    run_args(tree, mode, &[scenario])
}

fn run_args(tree: &Tree, mode: &str, args: &[&str]) -> Run {
    run_env(tree, mode, args, &[])
}

fn run_env(tree: &Tree, mode: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let log = tree.root.join("vng.log");
    let _ = fs::remove_file(&log);
    fs::write(&log, "").unwrap();
    let out = Command::new("bash")
        .arg(tree.root.join("tests/guest/run"))
        .args(args)
        .env("FAKE_VNG_MODE", mode)
        .env("FAKE_VNG_LOG", &log)
        .env("FVD", "/bin/true")
        .env_remove("FVD_GUEST_BOOT_RETRIES")
        .env_remove("FVD_GUEST_BOOT_ALLOWANCE")
        .envs(env.iter().copied())
        .output()
        .expect("run tests/guest/run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let boots = fs::read_to_string(&log).unwrap().lines().count();
    Run { ok: out.status.success(), out: text, boots }
}

fn have_tools() -> bool {
    ["timeout", "flock"].iter().all(|t| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

#[test]
fn a_boot_that_dies_once_is_retried_and_passes() {
    if !have_tools() {
        eprintln!("SKIP: timeout or flock missing on this host");
        return;
    }
    let t = tree();
    let r = run(&t, "fail-first:1", "pass");
    assert!(r.ok, "{}", r.out);
    assert_eq!(r.boots, 2, "{}", r.out);
    assert!(r.out.contains("RETRY pass: boot 1 of 3 failed before the scenario started"), "{}", r.out);
    assert!(r.out.contains("vng exited 255"), "{}", r.out);
    assert!(r.out.contains("msix_table_mmio_write"), "the retry shows the dead boot's log:\n{}", r.out);
    assert!(r.out.contains("PASS pass"), "{}", r.out);
    assert!(r.out.contains("guest: 1 passed, 0 failed"), "{}", r.out);
    let res = t.root.join("target/guest-results/pass");
    assert!(res.join("ran").exists());
    assert!(res.join("kernel.log.boot1").exists(), "the failed boot's log is kept");
}

#[test]
fn boots_that_keep_dying_fail_after_three() {
    if !have_tools() {
        eprintln!("SKIP: timeout or flock missing on this host");
        return;
    }
    let t = tree();
    let r = run(&t, "fail-first:99", "pass");
    assert!(!r.ok, "{}", r.out);
    assert_eq!(r.boots, 3, "{}", r.out);
    assert_eq!(r.out.matches("RETRY pass").count(), 2, "{}", r.out);
    assert!(r.out.contains("FAIL pass") && r.out.contains("guest reported no status (vng exited 255"), "{}", r.out);
}

#[test]
fn a_scenario_that_ran_and_failed_is_not_retried() {
    if !have_tools() {
        eprintln!("SKIP: timeout or flock missing on this host");
        return;
    }
    let t = tree();
    let r = run(&t, "ok", "fails");
    assert!(!r.ok, "{}", r.out);
    assert_eq!(r.boots, 1, "{}", r.out);
    assert!(!r.out.contains("RETRY"), "{}", r.out);
    assert!(r.out.contains("the scenario failed on purpose"), "{}", r.out);
}

#[test]
fn a_guest_that_dies_after_the_scenario_started_is_not_retried() {
    if !have_tools() {
        eprintln!("SKIP: timeout or flock missing on this host");
        return;
    }
    let t = tree();
    let r = run(&t, "die-after-start", "slow");
    assert!(!r.ok, "{}", r.out);
    assert_eq!(r.boots, 1, "{}", r.out);
    assert!(!r.out.contains("RETRY"), "{}", r.out);
    assert!(r.out.contains("FAIL slow") && r.out.contains("the guest died or hung during the scenario"), "{}", r.out);
}

#[test]
fn scenarios_share_a_boot_and_a_failure_ends_it() {
    if !have_tools() {
        eprintln!("SKIP: timeout or flock missing on this host");
        return;
    }
    let t = tree();
    // Two passing scenarios: one boot.
    let r = run_args(&t, "ok", &["pass", "pass2"]);
    assert!(r.ok, "{}", r.out);
    assert_eq!(r.boots, 1, "{}", r.out);
    assert!(r.out.contains("PASS pass ") && r.out.contains("PASS pass2 "), "{}", r.out);
    assert!(r.out.contains("guest: 2 passed, 0 failed"), "{}", r.out);
    // A failure ends its boot; with --keep-going the rest run in a new one.
    let r = run_args(&t, "ok", &["--keep-going", "fails", "pass", "pass2"]);
    assert!(!r.ok, "{}", r.out);
    assert_eq!(r.boots, 2, "{}", r.out);
    assert!(r.out.contains("FAIL fails") && r.out.contains("PASS pass ") && r.out.contains("PASS pass2 "), "{}", r.out);
    assert!(r.out.contains("guest: 2 passed, 1 failed (fails)"), "{}", r.out);
    let failed = fs::read_to_string(t.root.join("target/guest-results/failed")).unwrap();
    assert_eq!(failed, "fails\n", "the failed scenarios, one per line, for tests/guest.rs's verdict");
    // Without --keep-going nothing runs after the failure.
    let r = run_args(&t, "ok", &["fails", "pass"]);
    assert_eq!(r.boots, 1, "{}", r.out);
    assert!(r.out.contains("1 scenario(s) not run after the first failure"), "{}", r.out);
    // A scenario that asks for other CPUs gets a boot of its own.
    let r = run_args(&t, "ok", &["pass", "four-cpus", "pass2"]);
    assert!(r.ok, "{}", r.out);
    assert_eq!(r.boots, 2, "{}", r.out);
    // Each scenario keeps its own console log and results.
    for name in ["pass", "pass2", "four-cpus"] {
        let res = t.root.join("target/guest-results").join(name);
        assert!(res.join("ran").exists(), "{name}");
        let log = fs::read_to_string(res.join("console.log")).unwrap();
        assert!(log.contains(&format!("guest: {name} exited 0")), "{name}: {log}");
    }
}

#[test]
fn a_scenario_the_emulator_aborted_in_runs_again() {
    if !have_tools() {
        eprintln!("SKIP: timeout or flock missing on this host");
        return;
    }
    let t = tree();
    // Aborted once while the scenario ran: a second boot runs it, and it passes; the
    // aborted run's logs stay beside the new ones.
    let r = run_args(&t, "assert-after-start:1", &["slow", "pass"]);
    assert!(r.ok, "{}", r.out);
    assert_eq!(r.boots, 2, "{}", r.out);
    assert!(r.out.contains("RETRY slow: the emulator aborted during the scenario (qemu-system-x86_64:"), "{}", r.out);
    assert!(r.out.contains("PASS slow ") && r.out.contains("PASS pass "), "{}", r.out);
    let res = t.root.join("target/guest-results/slow");
    assert!(res.join("kernel.log.abort1").exists() && res.join("status").exists(), "logs kept and the rerun's status");
    // Aborting every time: after two reruns it fails.
    let r = run_args(&t, "assert-after-start:9", &["slow"]);
    assert!(!r.ok, "{}", r.out);
    assert_eq!(r.boots, 3, "{}", r.out);
    assert!(r.out.contains("FAIL slow"), "{}", r.out);
}

#[test]
fn a_guest_that_hangs_after_a_failure_is_stopped_by_the_watchdog() {
    if !have_tools() {
        eprintln!("SKIP: timeout or flock missing on this host");
        return;
    }
    let t = tree();
    // The guest reports the failure, then hangs in its shutdown (as one whose
    // failed daemon held a device did): without the watchdog the run waited for
    // the boot's whole allowance, hours for a full plan.
    let t0 = std::time::Instant::now();
    let r = run_env(&t, "hang-at-exit", &["--keep-going", "fails", "pass"], &[("FVD_GUEST_BOOT_ALLOWANCE", "4")]);
    let took = t0.elapsed().as_secs();
    assert!(!r.ok, "{}", r.out);
    assert!(r.out.contains("FAIL fails") && r.out.contains("the scenario failed on purpose"), "{}", r.out);
    assert!(r.out.contains("guest hung: no progress for 4s, stopped"), "{}", r.out);
    // The rest ran in a new boot, which hung at its exit too and was stopped.
    assert!(r.out.contains("PASS pass "), "{}", r.out);
    assert_eq!(r.boots, 2, "{}", r.out);
    assert!(took < 120, "the watchdog stops a hung guest within its allowance; took {took} s");
}
