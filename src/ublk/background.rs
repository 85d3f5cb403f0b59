//! Background work on a queue's ring: storing copy-on-read blocks as reads
//! queue them, and (on queue 0) prefetching the base, the periodic commit and
//! publishing the daemon's status. All stop, between two operations, once the
//! queue's tag tasks have ended, so nothing is dropped while the kernel still
//! uses its buffers.
//!
//! Each step passes the queue's gate (see [`super::gate`]) like a request, on
//! the image the gate gives: after an online snapshot the work goes on with
//! the new top. The prefetch, which holds its pass for long, stops when a
//! hold begins and starts again on the new top afterwards.

use super::engine::QueueEngine;
use super::gate::Gate;
use super::state::RunDir;
use crate::image::{Image, PrefetchOptions};
use crate::io::sleep;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a queue runs besides its requests.
#[derive(Debug, Clone, Default)]
pub struct Background {
    /// Run the prefetch (one queue does).
    pub prefetch: bool,
    /// Upper bound on the prefetch rate, bytes per second.
    pub prefetch_rate: Option<u64>,
    /// The periodic commit and status publishing (one queue does).
    pub housekeeping: Option<Housekeeping>,
}

#[derive(Debug, Clone)]
pub struct Housekeeping {
    pub run_dir: RunDir,
    pub id: u32,
    /// None: commit only on flush and under pressure.
    pub commit_interval: Option<Duration>,
}

/// How often housekeeping looks at the queue and the clock.
const TICK: Duration = Duration::from_millis(200);
/// How often the status is published (when it changed).
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Spawns on `exe` the background work `bg` asks of queue `qid`, beside
/// its requests: copy-on-read (also where a prefetch runs, to store what it
/// copies), housekeeping, prefetch. Each ends after the queue's tags
/// (`tags_live` back at 0).
pub fn spawn_all(
    exe: &smol::LocalExecutor<'_>,
    gate: &Arc<Gate<Image>>,
    qid: u16,
    tags_live: &Rc<Cell<usize>>,
    bg: Background,
) -> Vec<smol::Task<()>> {
    use crate::io::wake::CrossThread;
    let mut tasks = Vec::new();
    let cancel = Arc::new(AtomicBool::new(false));
    let cor = gate.current().is_some_and(|i| i.copy_on_read_queue().is_some());
    if cor || bg.prefetch {
        let (gate, live, c) = (gate.clone(), tags_live.clone(), cancel.clone());
        tasks.push(exe.spawn(CrossThread::new(copy_on_read_loop(gate, qid, live, c))));
    }
    if let Some(hk) = bg.housekeeping.clone() {
        tasks.push(exe.spawn(CrossThread::new(housekeeping(gate.clone(), qid, tags_live.clone(), hk))));
    }
    if bg.prefetch {
        tasks.push(exe.spawn(CrossThread::new(prefetch(gate.clone(), qid, bg, cancel))));
    }
    tasks
}

/// Commits metadata that waited an interval and publishes the status,
/// until `tags_live` drops to zero.
pub async fn housekeeping(gate: Arc<Gate<Image>>, q: u16, tags_live: Rc<Cell<usize>>, hk: Housekeeping) {
    let mut last_publish = None::<Instant>;
    let mut published = None;
    let mut commit_failed = false;
    let mut last_img = std::ptr::null::<Image>();
    while tags_live.get() > 0 {
        sleep(&QueueEngine, TICK).await;
        let pass = gate.enter(usize::from(q)).await;
        let Some(img) = pass.get() else { continue };
        if !std::ptr::eq(Arc::as_ptr(img), last_img) {
            // A new top (online snapshot): its commits have not failed.
            last_img = Arc::as_ptr(img);
            commit_failed = false;
        }
        if let Some(every) = hk.commit_interval.filter(|_| !commit_failed) {
            if let Err(e) = img.commit_pending(&QueueEngine, every).await {
                // The image now refuses writes; the guest learns it from its
                // next write or flush. Said once.
                tracing::error!(error = %e, "periodic metadata commit failed");
                commit_failed = true;
            }
        }
        if last_publish.is_none_or(|t| t.elapsed() >= PUBLISH_EVERY) {
            last_publish = Some(Instant::now());
            let live = img.live_status();
            if published.as_ref() != Some(&live) {
                if let Err(e) = hk.run_dir.write_live(hk.id, &live) {
                    tracing::debug!(error = %e, "could not publish the status");
                }
                published = Some(live);
            }
        }
    }
}

/// How often an idle queue looks for queued copy-on-read blocks.
const POLL: Duration = Duration::from_millis(20);

/// Stores copy-on-read blocks until `tags_live` drops to zero, then cancels
/// the prefetch (if any) through `cancel`.
pub async fn copy_on_read_loop(gate: Arc<Gate<Image>>, q: u16, tags_live: Rc<Cell<usize>>, cancel: Arc<AtomicBool>) {
    loop {
        if tags_live.get() == 0 {
            cancel.store(true, Ordering::Release);
            return;
        }
        let pass = gate.enter(usize::from(q)).await;
        match pass.get() {
            Some(img) if img.background_pending() => img.run_background_copies(&QueueEngine).await,
            _ => {
                drop(pass);
                sleep(&QueueEngine, POLL).await;
            }
        }
    }
}

/// First and longest wait before a prefetch that failed tries again.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Prefetches the base until done or cancelled; a hold (online snapshot)
/// stops it, and it goes on with the new top once the gate opens. A failure
/// (a base that went away: an NBD server down, a device gone) is retried
/// after a wait that doubles up to 30 s, from the cursor it reached: once
/// the base is back, the prefetch goes on where it stopped. Requests meanwhile
/// read what is local and get the base's errors for the rest.
pub async fn prefetch(gate: Arc<Gate<Image>>, q: u16, bg: Background, cancel: Arc<AtomicBool>) {
    let mut retry = RETRY_FIRST;
    loop {
        let pass = gate.enter(usize::from(q)).await;
        let Some(img) = pass.get() else { return };
        if cancel.load(Ordering::Acquire) || !wants_prefetch(img, true) {
            return;
        }
        let opts = PrefetchOptions {
            rate_limit: bg.prefetch_rate,
            cancel: Some(cancel.clone()),
            hold: Some(gate.closing().clone()),
            ..Default::default()
        };
        tracing::info!(image = %img.path().display(), "prefetch started");
        match img.prefetch(&QueueEngine, &opts).await {
            Ok(()) => {
                retry = RETRY_FIRST;
                let (c, t, state) = img.prefetch_progress();
                tracing::info!(cursor = c, blocks = t, state = ?state, "prefetch stopped");
            }
            Err(e) => {
                let (c, t, _) = img.prefetch_progress();
                tracing::warn!(error = %e, cursor = c, blocks = t, retry_in_s = retry.as_secs(), "prefetch failed; the image keeps using its base, and prefetch tries again");
                drop(pass);
                if !wait_unless_stopped(retry, &cancel).await {
                    return;
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        }
        let held = gate.closing().load(Ordering::Acquire) && img.prefetch.state() != crate::image::PrefetchState::Done;
        drop(pass);
        if !held {
            return;
        }
    }
}

/// Waits `d`; false as soon as the queue stops (`cancel`). A hold does not end
/// the wait: the retry passes the gate after it.
async fn wait_unless_stopped(d: Duration, cancel: &AtomicBool) -> bool {
    crate::io::sleep_unless(&QueueEngine, d, || cancel.load(Ordering::Acquire)).await
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
