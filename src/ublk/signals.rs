//! The stop signals (SIGTERM, SIGINT, SIGHUP): blocked in every thread, and
//! waited for by one thread that stops the device.

use super::{kernel, DaemonError};
use nix::sys::signal::{SigSet, Signal};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Blocks the stop signals in the calling thread. Called before any other
/// thread exists, so that every thread inherits the mask and the stop
/// signals reach only the signal thread's sigwait.
pub(super) fn block_stop_signals() -> Result<(), DaemonError> {
    stop_signals().thread_block().map_err(|e| DaemonError::Sys { what: "blocking signals", source: e.into() })
}

/// SIGTERM, SIGINT, SIGHUP: stop the device. The queues then see their
/// commands aborted and end, and `run_target` returns to the serve loop's end.
pub(super) fn spawn_signal_thread(id: u32, stop_asked: Arc<AtomicBool>) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name("fvd-signals".into())
        .spawn(move || {
            let set = stop_signals();
            while let Ok(sig) = set.wait() {
                tracing::info!(signal = %sig, id, "stopping the device");
                // Set first: if the device is not live yet, the live callback
                // sees it after the start and stops the device then.
                stop_asked.store(true, Ordering::SeqCst);
                stop_device(id);
            }
        })
        .map(|_| ())
        .map_err(|e| DaemonError::Sys { what: "spawning the signal thread", source: e })
}

/// Asks the driver to stop the device; the queues then end and the daemon
/// closes the image. Before the device is live the driver has nothing to stop.
pub(super) fn stop_device(id: u32) {
    match kernel::open_device(id) {
        Ok(ctrl) => {
            if let Err(e) = ctrl.kill_dev() {
                tracing::error!(id, error = %super::error::ublk_why(&e), "stopping the device failed");
            }
        }
        Err(e) => tracing::error!(id, error = %e, "stopping the device failed"),
    }
}
