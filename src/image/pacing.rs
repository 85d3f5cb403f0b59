//! Pacing the prefetch: an optional upper bound on its rate, and backing off
//! (randomized, doubling pauses) while its throughput stays under a floor,
//! taken as a sign that it competes with the guest or with other hosts for
//! the base.

use super::prefetch::{PrefetchOptions, PrefetchState};
use super::Image;
use crate::io::{sleep, sleep_unless, IoEngine};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The longest back-off pause.
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// Throughput is judged over windows of at least this long.
const WINDOW: Duration = Duration::from_secs(1);

/// The throughput below which prefetch backs off: the configured floor, but
/// never more than half the rate limit (a prefetch held to its limit is not
/// slowed by anyone, and must not take that for contention).
fn floor(o: &PrefetchOptions) -> u64 {
    o.rate_limit.map_or(o.floor, |limit| o.floor.min(limit / 2))
}

pub(super) struct Pacing<'o> {
    o: &'o PrefetchOptions,
    /// Bytes copied beyond what the rate limit allowed so far, as of `debt_at`
    /// (never below zero: time spent under the limit, a stall or a back-off,
    /// earns no credit, so a prefetch that fell behind goes on at its limit
    /// instead of catching up in a burst). Pieces then start at least
    /// piece/limit apart, so any second sees at most the limit plus two pieces
    /// (one still being copied as it begins, one begun as it ends); the time a
    /// copy takes counts toward the spacing, so fast copies run at the limit.
    debt: f64,
    debt_at: Instant,
    /// Start of the current window and the bytes copied in it.
    window: (Instant, u64),
    /// The next back-off's base pause.
    pause: Duration,
}

impl<'o> Pacing<'o> {
    pub(super) fn new(o: &'o PrefetchOptions) -> Pacing<'o> {
        Pacing { o, debt: 0.0, debt_at: Instant::now(), window: (Instant::now(), 0), pause: o.pause }
    }

    /// Counts `n` copied bytes.
    pub(super) fn copied(&mut self, n: u64) {
        self.window.1 += n;
        self.debt += n as f64;
    }

    /// Between two pieces: waits while ahead of the rate limit, and backs off
    /// when the last window's throughput was under the floor. Both waits end
    /// early on cancel.
    pub(super) async fn pace<E: IoEngine>(&mut self, e: &E, img: &Image) {
        let o = self.o;
        if let Some(limit) = o.rate_limit {
            let limit = limit.max(1) as f64;
            loop {
                let now = Instant::now();
                self.debt = (self.debt - limit * (now - self.debt_at).as_secs_f64()).max(0.0);
                self.debt_at = now;
                if self.debt <= 0.0 || o.cancelled() {
                    break;
                }
                sleep(e, Duration::from_secs_f64((self.debt / limit).min(0.1))).await;
            }
        }
        let elapsed = self.window.0.elapsed();
        if elapsed < WINDOW {
            return;
        }
        let rate = self.window.1 as f64 / elapsed.as_secs_f64();
        if self.window.1 > 0 && rate < floor(o) as f64 {
            let p = &img.prefetch;
            p.set(PrefetchState::BackingOff);
            p.backoffs.fetch_add(1, Ordering::Relaxed);
            let jitter = 0.5 + rand::random::<f64>();
            tracing::info!(image = %img.name(), rate_mib = rate / 1048576.0, "prefetch slower than its floor: backing off");
            sleep_unless(e, self.pause.mul_f64(jitter), || o.cancelled()).await;
            self.pause = (self.pause * 2).min(MAX_PAUSE);
            p.set(PrefetchState::Running);
        } else {
            self.pause = o.pause;
        }
        self.window = (Instant::now(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_under_the_floor_lowers_the_floor() {
        let o = PrefetchOptions { floor: 4 << 20, rate_limit: Some(2 << 20), ..Default::default() };
        assert_eq!(floor(&o), 1 << 20);
        let o = PrefetchOptions { floor: 4 << 20, rate_limit: Some(64 << 20), ..Default::default() };
        assert_eq!(floor(&o), 4 << 20);
        let o = PrefetchOptions { floor: 4 << 20, rate_limit: None, ..Default::default() };
        assert_eq!(floor(&o), 4 << 20);
    }
}
