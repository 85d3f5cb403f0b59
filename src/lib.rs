//! fvd: the Fast Virtual Disk image format and a ublk daemon that serves it.
//!
//! Layers, each using only the ones before it:
//! [`format`] (bytes ↔ structs) → [`meta`] (in-memory metadata and plans) →
//! [`io`] (io_uring engine) → [`storage`] (file, device) → [`image`] (carries
//! out plans) → `ublk` (the block device front end) → `cli`. Beside them, used
//! from any layer: [`units`] (unit newtypes) and [`rundir`] (the run dir's place).

pub mod bench;
pub mod cli;
pub mod format;
pub mod image;
pub mod io;
pub mod logging;
pub mod meta;
pub mod rundir;
pub mod storage;
pub mod ublk;
pub mod units;
