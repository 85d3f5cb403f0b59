//! The built `fvd` binary, run from the tests.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `fvd ARGS`: exit code (-1 when killed by a signal), stdout, stderr.
pub fn fvd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fvd")).args(args).output().expect("run fvd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// [`fvd`] with stdout and stderr in one text, stdout first.
pub fn fvd_merged(args: &[&str]) -> (i32, String) {
    let (code, out, err) = fvd(args);
    (code, out + &err)
}

/// Runs `fvd ARGS`, which must exit 0; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let (code, out, err) = fvd(args);
    assert_eq!(code, 0, "fvd {args:?} failed: {out}{err}");
    out
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

/// Leaves `img` not closed cleanly, with several blocks in its journal: `fvd io`
/// writes 64 KiB at 0, 1M, 2M, 3M and 5M (pattern 1 to 5), each followed by a
/// flush, then 64 KiB of pattern 9 at 6M, and is killed while it waits on a pipe
/// for its last write (at 7M).
pub fn kill_writer_after_flushes(img: &Path, dir: &Path) {
    let mut cmds = Vec::new();
    for (i, at) in ["0", "1M", "2M", "3M", "5M"].iter().enumerate() {
        cmds.push(format!("write -P {} {at} 64k", i + 1));
        cmds.push("flush".to_string());
    }
    cmds.push("write -P 9 6M 64k".to_string());
    kill_writer_at_pipe(img, dir, &cmds, "7M");
    assert!(fvd::image::snapshot::header_at(img).unwrap().is_dirty());
}

/// Runs `fvd io IMG` with `cmds`, then a write of 512 bytes at `pipe_at` from a
/// pipe (made in `dir`) that never delivers them, and kills it (-9) once every
/// write of `cmds` has reported; returns once its lock is gone.
pub fn kill_writer_at_pipe(img: &Path, dir: &Path, cmds: &[String], pipe_at: &str) {
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out_path = dir.join("out.txt");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fvd"));
    cmd.args(["io", s(img)]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.args(["-c"]).arg(format!("write -s {} {pipe_at} 512", s(&fifo)));
    let writes = cmds.iter().filter(|c| c.starts_with("write")).count();
    let mut child = cmd.stdout(std::fs::File::create(&out_path).unwrap()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(&out_path).unwrap_or_default().lines().count() < writes {
        assert!(t0.elapsed() < Duration::from_secs(20), "fvd io never got to the pipe");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    while fvd::storage::held_by_writer(img) {
        assert!(t0.elapsed() < Duration::from_secs(30), "the killed writer's lock stayed");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::fs::remove_file(&fifo).unwrap();
}
