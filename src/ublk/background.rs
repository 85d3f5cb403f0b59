//! Background work on a queue's ring: storing copy-on-read blocks as reads
//! queue them, and (on queue 0) prefetching the base. Both stop, between two
//! operations, once the queue's tag tasks have ended, so nothing is dropped
//! while the kernel still uses its buffers.

use super::engine::QueueEngine;
use crate::image::{sleep, Image, PrefetchOptions};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a queue runs besides its requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Background {
    /// Run the prefetch (one queue does).
    pub prefetch: bool,
    /// Upper bound on the prefetch rate, bytes per second.
    pub prefetch_rate: Option<u64>,
}

/// How often an idle queue looks for queued copy-on-read blocks.
const POLL: Duration = Duration::from_millis(20);

/// Stores copy-on-read blocks until `tags_live` drops to zero, then cancels
/// the prefetch (if any) through `cancel`.
pub async fn copy_on_read_loop(img: Arc<Image>, tags_live: Rc<Cell<usize>>, cancel: Arc<AtomicBool>) {
    loop {
        if tags_live.get() == 0 {
            cancel.store(true, Ordering::Release);
            return;
        }
        if img.background_pending() {
            img.run_background_copies(&QueueEngine).await;
        } else {
            sleep(&QueueEngine, POLL).await;
        }
    }
}

/// Prefetches the base until done or cancelled.
pub async fn prefetch(img: Arc<Image>, bg: Background, cancel: Arc<AtomicBool>) {
    let opts = PrefetchOptions { rate_limit: bg.prefetch_rate, cancel: Some(cancel), ..Default::default() };
    tracing::info!(image = %img.path().display(), "prefetch started");
    match img.prefetch(&QueueEngine, &opts).await {
        Ok(()) => {
            let (c, t, state) = img.prefetch_progress();
            tracing::info!(cursor = c, blocks = t, state = ?state, "prefetch stopped");
        }
        Err(e) => tracing::warn!(error = %e, "prefetch failed; the image keeps using its base"),
    }
}

/// Whether this image wants prefetching: asked for at start, or by default
/// since create, and not already done.
pub fn wants_prefetch(img: &Image, asked: bool) -> bool {
    let h = img.header();
    !img.read_only()
        && img.base().is_some()
        && !h.is_prefetched()
        && (asked || h.compat & crate::format::header::COMPAT_PREFETCH != 0)
}
