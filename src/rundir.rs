//! Where fvd keeps its run-time files: $FVD_RUN_DIR, else /run/fvd.
//!
//! One lookup for every layer that writes or reads there: the storage layer
//! (an LV's published growth status) and the ublk front end (device state,
//! logs; see `ublk::state::RunDir`).

use std::path::PathBuf;

/// Where the run dir is when $FVD_RUN_DIR does not say otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/fvd";

/// The run dir: $FVD_RUN_DIR when set and not empty, else [`DEFAULT_RUN_DIR`].
pub fn path() -> PathBuf {
    match std::env::var_os("FVD_RUN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_RUN_DIR),
    }
}
