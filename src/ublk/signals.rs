//! The stop signals (SIGTERM, SIGINT, SIGHUP): blocked in every thread, and
//! waited for by one thread that stops the device.

use super::{kernel, DaemonError};
use nix::sys::signal::{SigSet, Signal};
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

/// Where a stop signal meets the start-up. The driver must not be asked to
/// stop a device between ADD_DEV and the end of START_DEV: a STOP_DEV then
/// aborts the queues' fetch commands while START_DEV goes on to add the disk,
/// whose first read then waits for a server that has gone (the daemon hung
/// in START_DEV). So a signal before the device is live is only noted, and
/// the start-up's end stops the device; one after it stops it at once.
#[derive(Default)]
pub(super) struct StopLatch {
    /// (live, stop asked)
    state: std::sync::Mutex<(bool, bool)>,
}

impl StopLatch {
    /// A stop signal came: true if the device is live and must be stopped now.
    fn ask(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 = true;
        st.0
    }

    /// The device is live: true if a stop signal came before, and the caller
    /// must stop it now.
    pub(super) fn went_live(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = true;
        st.1
    }
}

/// SIGTERM, SIGINT, SIGHUP: stop the device (once it is live, see
/// [`StopLatch`]). The queues then see their commands aborted and end, and
/// `run_target` returns to the serve loop's end.
pub(super) fn spawn_signal_thread(id: u32, latch: Arc<StopLatch>) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name("fvd-signals".into())
        .spawn(move || {
            let set = stop_signals();
            while let Ok(sig) = set.wait() {
                if latch.ask() {
                    tracing::info!(signal = %sig, id, "stopping the device");
                    stop_device(id);
                } else {
                    tracing::info!(signal = %sig, id, "stop signal during start-up: the device stops once live");
                }
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
