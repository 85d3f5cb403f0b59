//! The daemon's control socket, `<run dir>/<id>.sock`: the commands that ask
//! a running daemon to do something and wait for its answer (an online
//! snapshot, resize or scrub). One JSON line each way per connection; the
//! daemon answers one connection at a time.

use super::snapshot::{Snapshotter, Taken};
use super::state::RunDir;
use super::DaemonError;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What a command asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// An online snapshot to NEW, an absolute path.
    Snapshot { new: PathBuf },
    /// An online resize to this many bytes.
    Resize { size: u64 },
    /// A scrub of the image's metadata, at no more than `rate` bytes/s.
    Scrub { rate: Option<u64> },
}

/// What the daemon answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Snapshot(Taken),
    Resized(super::resize::Resized),
    Scrubbed(crate::image::scrub::ScrubReport),
    Error(String),
}

/// How long the daemon waits for a request line once connected.
const READ_LIMIT: Duration = Duration::from_secs(10);

/// Listens on the device's socket in a thread of its own, answering with
/// `snap`. A stale socket (a dead daemon's) is replaced.
pub fn listen(rd: &RunDir, id: u32, snap: Arc<Snapshotter>) -> Result<(), DaemonError> {
    let path = rd.socket_path(id);
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(|source| DaemonError::State { path: path.clone(), source })?;
    std::thread::Builder::new()
        .name("fvd-control".into())
        .spawn(move || {
            for conn in l.incoming() {
                match conn {
                    Ok(c) => serve_one(c, &snap),
                    Err(e) => tracing::warn!(error = %e, "control socket: accept failed"),
                }
            }
        })
        .map(|_| ())
        .map_err(|e| DaemonError::Sys { what: "spawning the control thread", source: e })
}

fn serve_one(c: UnixStream, snap: &Snapshotter) {
    let _ = c.set_read_timeout(Some(READ_LIMIT));
    let mut line = String::new();
    let reply = match BufReader::new(&c).read_line(&mut line) {
        Err(e) => Reply::Error(format!("reading the request: {e}")),
        Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Reply::Error(format!("bad request: {e}")),
            Ok(Request::Resize { size }) => {
                tracing::info!(size, "online resize asked");
                match snap.resize(size) {
                    Ok(r) => Reply::Resized(r),
                    Err(e) => Reply::Error(e.to_string()),
                }
            }
            Ok(Request::Scrub { rate }) => {
                tracing::info!(rate, "scrub asked");
                match snap.scrub(rate) {
                    Ok(r) => {
                        tracing::info!(
                            repaired = r.repaired.len(),
                            unrepaired = r.unrepaired.len(),
                            bytes = r.bytes_read,
                            "scrub done"
                        );
                        Reply::Scrubbed(r)
                    }
                    Err(e) => Reply::Error(e),
                }
            }
            Ok(Request::Snapshot { new }) => {
                tracing::info!(new = %new.display(), "online snapshot asked");
                match snap.take(&new) {
                    Ok(t) => Reply::Snapshot(t),
                    Err(e) => Reply::Error(e.to_string()),
                }
            }
        },
    };
    let text = serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"error":"internal: reply not encodable"}"#.into());
    if let Err(e) = (&c).write_all(format!("{text}\n").as_bytes()) {
        tracing::warn!(error = %e, "control socket: the command went away before the answer");
    }
}

/// Sends `req` to device `id`'s daemon and waits up to `limit` for its answer.
pub fn ask(rd: &RunDir, id: u32, req: &Request, limit: Duration) -> Result<Reply, DaemonError> {
    let path = rd.socket_path(id);
    let err = |source| DaemonError::State { path: path.clone(), source };
    let mut c = UnixStream::connect(&path).map_err(err)?;
    c.set_read_timeout(Some(limit)).map_err(err)?;
    let text = serde_json::to_string(req).map_err(|e| DaemonError::Invalid(e.to_string()))?;
    c.write_all(format!("{text}\n").as_bytes()).map_err(err)?;
    let mut line = String::new();
    match BufReader::new(&c).read_line(&mut line) {
        Ok(0) => Err(DaemonError::Invalid(format!("device {id}: the daemon closed its socket without answering"))),
        Ok(_) => serde_json::from_str(line.trim())
            .map_err(|e| DaemonError::Invalid(format!("device {id}: unreadable answer from the daemon: {e}"))),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(DaemonError::Invalid(format!("device {id}: no answer from the daemon within {}s", limit.as_secs())))
        }
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let r = Request::Snapshot { new: "/srv/s1.fvd".into() };
        let t = serde_json::to_string(&r).unwrap();
        assert_eq!(t, r#"{"op":"snapshot","new":"/srv/s1.fvd"}"#);
        assert_eq!(serde_json::from_str::<Request>(&t).unwrap(), r);
        let ok = Reply::Snapshot(Taken {
            frozen: "/srv/a.fvd".into(),
            overlay: "/srv/s1.fvd".into(),
            held_ms: 1.5,
            drain_ms: 0.25,
            snapshots: 1,
        });
        let t = serde_json::to_string(&ok).unwrap();
        assert!(t.contains(r#""held-ms":1.5"#), "{t}");
        assert_eq!(serde_json::from_str::<Reply>(&t).unwrap(), ok);
        let e = Reply::Error("no".into());
        assert_eq!(serde_json::from_str::<Reply>(&serde_json::to_string(&e).unwrap()).unwrap(), e);
    }
}
