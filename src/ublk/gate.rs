//! The hold: every request (and every step of background work) passes its
//! queue's gate before it touches the image, and the image it gets is the one
//! the gate holds for that queue.
//!
//! Each queue has one read-write lock around the image it serves. A request
//! takes it for reading while it runs (one uncontended atomic on the queue's
//! own lock: the queues never share it). An online snapshot closes the gate:
//! it takes every queue's lock for writing, which holds new requests (they
//! wait in their queue, the kernel sees them in flight) and waits until those
//! already running are done. With the gate closed nothing uses the image, so
//! the snapshot may freeze it and put the new top in every queue's place
//! ([`Closed::switch`]); opening the gate lets the held requests run on it.
//!
//! Work that holds a pass for long (prefetch) watches [`Gate::closing`] and
//! stops at its next step.

use async_lock::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The queues' gate around the image they serve (an [`crate::image::Image`];
/// generic for the tests).
pub struct Gate<T> {
    queues: Box<[RwLock<Option<Arc<T>>>]>,
    /// What the gate serves now, for those outside the queues.
    current: Mutex<Option<Arc<T>>>,
    /// Set from the moment a hold begins until the gate opens.
    closing: Arc<AtomicBool>,
}

/// A request's right to use the image; the gate cannot close before it is dropped.
pub struct Pass<'a, T>(RwLockReadGuard<'a, Option<Arc<T>>>);

impl<T> Pass<'_, T> {
    /// The image, or None after a failed switch left the gate without one.
    pub fn get(&self) -> Option<&Arc<T>> {
        self.0.as_ref()
    }
}

/// Why the gate could not close.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("requests in flight did not finish within {0:?}")]
pub struct DrainTimeout(pub Duration);

impl<T> Gate<T> {
    /// A gate for `queues` queues (at least one) serving `value`.
    pub fn new(queues: usize, value: Arc<T>) -> Gate<T> {
        let queues = (0..queues.max(1)).map(|_| RwLock::new(Some(value.clone()))).collect();
        Gate { queues, current: Mutex::new(Some(value)), closing: Arc::new(AtomicBool::new(false)) }
    }

    fn slot(&self, q: usize) -> &RwLock<Option<Arc<T>>> {
        &self.queues[q % self.queues.len()]
    }

    /// Passes queue `q`'s gate: at once when it is open, else once it opens.
    pub async fn enter(&self, q: usize) -> Pass<'_, T> {
        let slot = self.slot(q);
        if let Some(g) = slot.try_read() {
            return Pass(g);
        }
        // The waker may come from the snapshot's thread: ring the queue's bell.
        Pass(crate::io::wake::CrossThread::new(slot.read()).await)
    }

    /// Passes queue `q`'s gate when it is open and no hold is being taken
    /// (a queue's fast path, which never waits).
    pub fn try_enter(&self, q: usize) -> Option<Pass<'_, T>> {
        if self.closing.load(Ordering::Acquire) {
            return None;
        }
        self.slot(q).try_read().map(Pass)
    }

    /// What the gate serves now (None after a failed switch).
    pub fn current(&self) -> Option<Arc<T>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Set while a hold is being taken or held: long background work stops.
    pub fn closing(&self) -> &Arc<AtomicBool> {
        &self.closing
    }

    /// Closes the gate: holds new requests on every queue and waits until
    /// the ones running are done, at most `limit` in all. Blocks the calling
    /// thread (never call it from a queue's thread). On a timeout the gate is
    /// open again, as it was.
    pub fn close(&self, limit: Duration) -> Result<Closed<'_, T>, DrainTimeout> {
        let t0 = Instant::now();
        self.closing.store(true, Ordering::SeqCst);
        // Every queue's lock at once: each holds its new requests from the
        // first poll on, while the ones in flight finish.
        let all = futures::future::join_all(self.queues.iter().map(|slot| slot.write()));
        let got = smol::block_on(smol::future::or(async { Some(all.await) }, async {
            smol::Timer::after(limit).await;
            None
        }));
        let Some(guards) = got else {
            self.closing.store(false, Ordering::SeqCst);
            return Err(DrainTimeout(limit));
        };
        Ok(Closed { gate: self, guards, t0, drained: t0.elapsed() })
    }
}

/// The gate, closed: no request uses the image until it is dropped (or
/// [`Closed::open`]ed).
pub struct Closed<'a, T> {
    gate: &'a Gate<T>,
    guards: Vec<RwLockWriteGuard<'a, Option<Arc<T>>>>,
    t0: Instant,
    drained: Duration,
}

impl<T> Closed<'_, T> {
    /// What the gate serves.
    pub fn current(&self) -> Option<Arc<T>> {
        self.gate.current()
    }

    /// How long the requests in flight took to finish.
    pub fn drained(&self) -> Duration {
        self.drained
    }

    /// Puts `new` in every queue's place (None: no image; requests then fail).
    /// Returns what was served, so that the caller decides when it is dropped.
    pub fn switch(&mut self, new: Option<Arc<T>>) -> Option<Arc<T>> {
        for g in self.guards.iter_mut() {
            **g = new.clone();
        }
        std::mem::replace(&mut *self.gate.current.lock().unwrap_or_else(|p| p.into_inner()), new)
    }

    /// Opens the gate: the held requests go on. Returns how long it was held.
    pub fn open(self) -> Duration {
        let held = self.t0.elapsed();
        drop(self);
        held
    }
}

impl<T> Drop for Closed<'_, T> {
    fn drop(&mut self) {
        self.guards.clear();
        self.gate.closing.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn open_gate_passes_at_once_and_serves_the_value() {
        let g = Gate::new(2, Arc::new(7));
        let p = smol::block_on(g.enter(1));
        assert_eq!(p.get().map(|v| **v), Some(7));
        // Out-of-range queue numbers wrap instead of panicking.
        let p2 = smol::block_on(g.enter(5));
        assert_eq!(p2.get().map(|v| **v), Some(7));
    }

    /// A close waits for the pass in flight; requests that come meanwhile are
    /// held and, once the gate opens, see the switched value. No request runs
    /// while the gate is closed.
    #[test]
    fn hold_drains_switches_and_releases() {
        let g = Arc::new(Gate::new(2, Arc::new(1u32)));
        let in_hold = Arc::new(AtomicBool::new(false));
        let ran_during_hold = Arc::new(AtomicUsize::new(0));
        // One request in flight on queue 0, finishing after 100 ms.
        let (g1, ih) = (g.clone(), in_hold.clone());
        let inflight = std::thread::spawn(move || {
            smol::block_on(async {
                let p = g1.enter(0).await;
                std::thread::sleep(Duration::from_millis(100));
                assert!(!ih.load(Ordering::SeqCst), "the hold began before the request in flight ended");
                p.get().map(|v| **v).unwrap()
            })
        });
        std::thread::sleep(Duration::from_millis(20));
        let closer = {
            let (g, ih) = (g.clone(), in_hold.clone());
            std::thread::spawn(move || {
                let mut c = g.close(Duration::from_secs(5)).unwrap();
                ih.store(true, Ordering::SeqCst);
                assert!(c.drained() >= Duration::from_millis(50), "{:?}", c.drained());
                std::thread::sleep(Duration::from_millis(100));
                let old = c.switch(Some(Arc::new(2)));
                assert_eq!(old.map(|v| *v), Some(1));
                ih.store(false, Ordering::SeqCst);
                c.open()
            })
        };
        std::thread::sleep(Duration::from_millis(40));
        // New requests on both queues: held until the switch.
        let held: Vec<_> = (0..4)
            .map(|i| {
                let (g, ih, bad) = (g.clone(), in_hold.clone(), ran_during_hold.clone());
                std::thread::spawn(move || {
                    smol::block_on(async {
                        let p = g.enter(i % 2).await;
                        if ih.load(Ordering::SeqCst) {
                            bad.fetch_add(1, Ordering::SeqCst);
                        }
                        p.get().map(|v| **v).unwrap()
                    })
                })
            })
            .collect();
        assert_eq!(inflight.join().unwrap(), 1);
        let held_for = closer.join().unwrap();
        assert!(held_for >= Duration::from_millis(100), "{held_for:?}");
        for h in held {
            assert_eq!(h.join().unwrap(), 2);
        }
        assert_eq!(ran_during_hold.load(Ordering::SeqCst), 0);
        assert_eq!(g.current().map(|v| *v), Some(2));
        assert!(!g.closing().load(Ordering::SeqCst));
    }

    /// A request that never ends makes the close give up; the gate is open
    /// again and still serves the old value.
    #[test]
    fn close_times_out_and_reopens() {
        let g = Gate::new(1, Arc::new(3));
        let p = smol::block_on(g.enter(0));
        let e = g.close(Duration::from_millis(50)).err();
        assert_eq!(e, Some(DrainTimeout(Duration::from_millis(50))));
        assert!(!g.closing().load(Ordering::SeqCst));
        drop(p);
        let p = smol::block_on(g.enter(0));
        assert_eq!(p.get().map(|v| **v), Some(3));
    }

    /// Dropping a closed gate without a switch opens it unchanged.
    #[test]
    fn dropped_hold_reopens_unchanged() {
        let g = Gate::new(3, Arc::new(5));
        {
            let c = g.close(Duration::from_secs(1)).unwrap();
            assert!(g.closing().load(Ordering::SeqCst));
            assert_eq!(c.current().map(|v| *v), Some(5));
        }
        for q in 0..3 {
            assert_eq!(smol::block_on(g.enter(q)).get().map(|v| **v), Some(5));
        }
    }
}
