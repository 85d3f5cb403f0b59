//! Readiness for a service manager (`Type=notify` in systemd): the
//! `NOTIFY_SOCKET` protocol, spoken directly, without a C library.
//!
//! A message is one datagram of newline-separated `KEY=value` assignments,
//! sent to the unix datagram socket named by `$NOTIFY_SOCKET`: a path, or an
//! abstract address when it starts with `@`. Without the variable nothing is
//! sent. `fvd start --foreground` sends `READY=1` once the device is live,
//! and `STOPPING=1` when it begins to stop (see `systemd/fvd@.service`).

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable that names the manager's socket.
pub const VAR: &str = "NOTIFY_SOCKET";

/// Sends `state` to the manager. Ok(false): no manager asked (`NOTIFY_SOCKET`
/// unset or empty).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os(VAR).filter(|v| !v.is_empty()) else {
        return Ok(false);
    };
    let addr = address(target.as_encoded_bytes())?;
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// The socket address `$NOTIFY_SOCKET` names.
fn address(name: &[u8]) -> io::Result<SocketAddr> {
    match name.strip_prefix(b"@") {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name)
        }
        None if name.first() == Some(&b'/') => {
            SocketAddr::from_pathname(std::path::Path::new(std::ffi::OsStr::from_bytes(name)))
        }
        None => Err(io::Error::new(io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is neither a path nor @abstract")),
    }
}

/// Sends `state`, logging (not failing) when the manager can't be reached:
/// the device serves either way.
pub fn tell(state: &str) {
    match notify(state) {
        Ok(true) => tracing::debug!(state, "told the service manager"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, state, "could not notify the service manager ($NOTIFY_SOCKET)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_abstract_sockets_get_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let addr = address(path.as_os_str().as_encoded_bytes()).unwrap();
        UnixDatagram::unbound().unwrap().send_to_addr(b"READY=1\nSTATUS=x", &addr).unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");

        let name = format!("@fvd-notify-test-{}", std::process::id());
        let a = address(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&a).unwrap();
        UnixDatagram::unbound().unwrap().send_to_addr(b"STOPPING=1", &a).unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(address(b"relative").is_err());
    }
}
