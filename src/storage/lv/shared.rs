//! What the writers, the grower thread and the status share about one LV: the
//! published size and, under one lock, the need, the last failure and the
//! counters.

use super::volume::{Volume, VolumeReport};
use crate::storage::lvm::policy::Growth;
use crate::storage::lvm::Policy;
use crate::storage::StorageError;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why the last growth failed.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) no_space: bool,
    pub(super) msg: String,
    /// The `used` the failed attempt tried to serve.
    pub(super) covered: u64,
    /// Even the least size holding `covered` could not be had.
    pub(super) hard: bool,
}

/// Everything under the one lock.
#[derive(Default)]
pub(super) struct State {
    /// How far the image uses the LV: the largest size asked of ensure_size.
    pub(super) used: u64,
    pub(super) stop: bool,
    pub(super) growing: bool,
    /// Failed attempts so far; a waiter fails when it changes under it.
    pub(super) epoch: u64,
    pub(super) failure: Option<Failure>,
    pub(super) last_attempt: Option<Instant>,
    pub(super) retry_at: Option<Instant>,
    pub(super) backoff: Duration,
    pub(super) growths: u64,
    pub(super) grown_bytes: u64,
    pub(super) growth_time: Duration,
    pub(super) last_growth_time: Duration,
    pub(super) waits: u64,
    pub(super) wait_time: Duration,
    pub(super) wait_max: Duration,
    /// Waits that began after the first growth had completed.
    pub(super) late_waits: u64,
    pub(super) enospc: u64,
    /// The LV was reduced to what the image uses (see `reduce`): no growth ahead.
    pub(super) reduced: bool,
    pub(super) reductions: u64,
    pub(super) reduced_bytes: u64,
    pub(super) failed_attempts: u64,
    pub(super) report: Option<VolumeReport>,
    pub(super) pool_warned: bool,
    /// When the status was last published (ENOSPC counts publish at most once a second).
    pub(super) published: Option<Instant>,
}

/// One per LV, shared by the storage, the writers and the grower thread.
pub(super) struct Shared {
    pub(super) path: String,
    pub(super) vol: Box<dyn Volume>,
    /// Behind a lock: the image bounds it once it knows its size (set_size_limit).
    pub(super) policy: Mutex<Policy>,
    pub(super) unit_from: &'static str,
    pub(super) initial: u64,
    pub(super) size: AtomicU64,
    pub(super) st: Mutex<State>,
    /// Wakes the grower.
    pub(super) work: Condvar,
    /// Wakes writers waiting for space.
    pub(super) done: Condvar,
    pub(super) hard_retry: Duration,
    pub(super) growth: Growth,
    pub(super) status_file: Option<PathBuf>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn policy(&self) -> Policy {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(super) fn error(&self, f: &Failure, want: u64) -> StorageError {
        if f.no_space {
            StorageError::NoSpace { path: self.path.clone(), want, have: self.size() }
        } else {
            StorageError::Grow { path: self.path.clone(), want, source: io::Error::other(f.msg.clone()) }
        }
    }
}
