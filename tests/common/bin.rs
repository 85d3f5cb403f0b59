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
/// (made in `dir`) for its last write.
pub fn kill_writer_after_flushes(img: &Path, dir: &Path) {
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out_path = dir.join("out.txt");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fvd"));
    cmd.args(["io", s(img)]);
    for (i, at) in ["0", "1M", "2M", "3M", "5M"].iter().enumerate() {
        cmd.args(["-c", &format!("write -P {} {at} 64k", i + 1), "-c", "flush"]);
    }
    cmd.args(["-c", "write -P 9 6M 64k", "-c"]).arg(format!("write -s {} 7M 512", s(&fifo)));
    let mut child = cmd.stdout(std::fs::File::create(&out_path).unwrap()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(&out_path).unwrap_or_default().lines().count() < 6 {
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
    assert!(fvd::image::snapshot::header_at(img).unwrap().is_dirty());
}
