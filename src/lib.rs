//! fvd: the Fast Virtual Disk image format and a ublk daemon that serves it.
//!
//! Layers, each using only the ones before it:
//! [`units`] (unit newtypes) and [`rundir`] (where the run dir is), used by all →
//! [`format`] (bytes ↔ structs) → [`meta`] (in-memory metadata and plans) →
//! [`io`] (io_uring engine) → [`storage`] (file, block device, LV) → [`image`]
//! (carries out plans) → [`ublk`] (the block device front end and the daemon).
//!
//! The `fvd` binary (`src/main.rs`) adds the command line (`src/cli/`), the
//! benchmarks (`src/bench/`) and the logging setup (`src/logging.rs`) on top;
//! they are not part of the library.

pub mod format;
pub mod image;
pub mod io;
pub mod meta;
pub mod rundir;
pub mod storage;
pub mod ublk;
pub mod units;
