//! The block device front end: serves an [`crate::image::Image`] as
//! `/dev/ublkbN` through the kernel's ublk driver (libublk).
//!
//! - [`queue`]: one thread, one io_uring and one executor per queue, one task
//!   per tag; [`engine`] plugs the image engine into the queue's ring.
//! - [`request`]: a ublk I/O descriptor → an image operation → a result.
//! - [`params`]: the device parameters (block sizes, cache, discard).
//! - [`serve`]: the daemon's life: open, add or recover, serve, stop, close;
//!   [`options`]: what it is asked; [`setup`]: adding or taking back the
//!   device; [`signals`]: the stop signals; [`report`]: telling the starter
//!   that the device is live, or why not.
//! - [`spawn`]: detaching the daemon; [`control`]: stop, recover, list;
//!   [`state`]: the run dir (/run/fvd); [`kernel`]: driver and process checks.
//! - [`background`]: copy-on-read and prefetch on a queue's ring.
//! - [`gate`]: the hold every request passes, and the image each queue
//!   serves; [`snapshot`]: online snapshots (hold, freeze, switch) and their
//!   completion or roll back after a crash; [`channel`]: the daemon's control
//!   socket.
//! - [`zc`]: zero copy (auto buffer registration) and its copy path.

pub mod background;
pub mod channel;
pub mod control;
pub mod engine;
pub mod error;
pub mod gate;
pub mod hybrid;
pub mod kernel;
pub mod notify;
pub mod options;
pub mod params;
pub mod queue;
pub mod report;
pub mod request;
pub mod resize;
pub mod ring;
pub mod scrub;
pub mod serve;
pub mod setup;
pub mod signals;
pub mod snapshot;
pub mod spawn;
pub mod state;
pub mod zc;

pub use error::DaemonError;
