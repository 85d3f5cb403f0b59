//! Detaching the daemon: fork, and let the parent wait on a pipe until the
//! child says the device is live (or why it is not).

use super::report::Reporter;
use super::state::RunDir;
use super::DaemonError;
use nix::unistd::{fork, ForkResult};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Where the log of a daemon goes before it knows its device ID.
pub fn startup_log(rd: &RunDir) -> PathBuf {
    rd.root().join(format!("starting-{}.log", std::process::id()))
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> DaemonError {
    move |e| DaemonError::Sys { what, source: e.into() }
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(1)
}

/// Runs `body` in a detached child (new session, stdin from /dev/null,
/// stdout and stderr to `log`), and returns the device path the child
/// reports once the device is live.
pub fn detach(
    rd: &RunDir,
    log: PathBuf,
    append: bool,
    body: impl FnOnce(Reporter) -> Result<(), DaemonError>,
) -> Result<String, DaemonError> {
    rd.create()?;
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(&log)
        .map_err(|source| DaemonError::State { path: log.clone(), source })?;
    let null = File::open("/dev/null").map_err(|e| DaemonError::Sys { what: "opening /dev/null", source: e })?;
    let (rx, tx) = nix::unistd::pipe().map_err(sys("creating a pipe"))?;
    // fork() in a process with other threads would leave the child with locks
    // held by threads that don't exist there.
    if threads() > 1 {
        return Err(DaemonError::Invalid("internal error: fork with more than one thread".into()));
    }
    // SAFETY: the process has one thread (checked just above), so the child
    // starts from a consistent state and may run any code.
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            drop(rx);
            let code = match child_setup(&null, &logf) {
                Ok(()) => match body(Reporter::Pipe(File::from(tx))) {
                    Ok(()) => 0,
                    Err(_) => 1, // already logged and reported by the body
                },
                Err(e) => {
                    let mut f = File::from(tx);
                    let _ = std::io::Write::write_all(&mut f, format!("error {e}\n").as_bytes());
                    1
                }
            };
            std::process::exit(code)
        }
        ForkResult::Parent { .. } => {
            drop(tx);
            let mut said = String::new();
            let _ = File::from(rx).read_to_string(&mut said);
            let r = parse_report(&said, log.clone());
            if matches!(r, Err(DaemonError::Startup(_))) && !append {
                // The user sees the reason; a start-up log of a daemon that
                // never got a device would only pile up in the run dir.
                let _ = std::fs::remove_file(&log);
            }
            r
        }
    }
}

fn child_setup(null: &File, log: &File) -> Result<(), DaemonError> {
    nix::unistd::setsid().map_err(sys("setsid"))?;
    nix::unistd::dup2(null.as_raw_fd(), 0).map_err(sys("dup2"))?;
    nix::unistd::dup2(log.as_raw_fd(), 1).map_err(sys("dup2"))?;
    nix::unistd::dup2(log.as_raw_fd(), 2).map_err(sys("dup2"))?;
    // Don't keep the folder fvd was started in busy (the image path is absolute).
    std::env::set_current_dir("/").map_err(|e| DaemonError::Sys { what: "chdir /", source: e })
}

/// The child's one line: "live /dev/ublkbN" or "error <message>".
fn parse_report(said: &str, log: PathBuf) -> Result<String, DaemonError> {
    let line = said.lines().next().unwrap_or("");
    if let Some(dev) = line.strip_prefix("live ") {
        Ok(dev.trim().to_string())
    } else if let Some(msg) = line.strip_prefix("error ") {
        Err(DaemonError::Startup(msg.trim().to_string()))
    } else {
        Err(DaemonError::DaemonDied(log))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports() {
        let log = PathBuf::from("/run/fvd/x.log");
        assert_eq!(parse_report("live /dev/ublkb3\n", log.clone()).unwrap(), "/dev/ublkb3");
        let e = parse_report("error /x: no such image file\n", log.clone()).unwrap_err();
        assert_eq!(e.to_string(), "/x: no such image file");
        assert!(matches!(parse_report("", log), Err(DaemonError::DaemonDied(_))));
    }
}
