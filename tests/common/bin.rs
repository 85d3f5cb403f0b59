//! The built `fvd` binary, run from the tests.

use std::path::Path;
use std::process::Command;

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
