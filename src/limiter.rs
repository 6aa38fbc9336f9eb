//! Pacing of Graph calls: the sliding-window rate limit and the global
//! throttling pause.
//!
//! Graph counts a request against its quota from when it handles it, so a
//! request is counted here from when it is sent until `per` after its answer
//! arrived. Whatever the latency, no window of `per` on Graph's side can then
//! see more than `requests` of ours. A token bucket that starts full would let
//! twice the quota into one window; no crate we know offers these semantics.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// At most `requests` requests in any window of `per`, counted until `per`
/// after each answer.
#[derive(Debug)]
pub struct RateLimiter {
    requests: usize,
    per: Duration,
    state: Mutex<Window>,
    released: Notify,
}

#[derive(Debug, Default)]
struct Window {
    /// Requests sent whose answer has not arrived.
    in_flight: usize,
    /// When each answered request stops counting, oldest first.
    expiries: VecDeque<Instant>,
}

/// A request's place in the window. Dropping it marks the answer as arrived.
#[derive(Debug)]
pub struct Slot {
    limiter: Arc<RateLimiter>,
    sent: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut w = self.limiter.lock();
        w.in_flight -= 1;
        if self.sent {
            w.expiries.push_back(Instant::now() + self.limiter.per);
        }
        drop(w);
        self.limiter.released.notify_waiters();
    }
}

impl RateLimiter {
    /// A limiter for `requests` per `per`.
    pub fn new(requests: usize, per: Duration) -> Arc<Self> {
        Arc::new(Self {
            requests: requests.max(1),
            per,
            state: Mutex::new(Window::default()),
            released: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot now if the window has room; otherwise says when to look again
    /// (`None`: when an in-flight request is answered).
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Result<Slot, Option<Instant>> {
        let mut w = self.lock();
        while w.expiries.front().is_some_and(|&e| e <= now) {
            w.expiries.pop_front();
        }
        if w.in_flight + w.expiries.len() < self.requests {
            w.in_flight += 1;
            return Ok(Slot {
                limiter: self.clone(),
                sent: true,
            });
        }
        Err(w.expiries.front().copied())
    }

    /// Waits for a slot.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.try_acquire(Instant::now()) {
                Ok(slot) => return slot,
                Err(Some(at)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = released => {}
                    }
                }
                Err(None) => released.await,
            }
        }
    }

    /// Gives back a slot whose request was never sent: it does not count.
    pub fn release_unused(&self, mut slot: Slot) {
        slot.sent = false;
    }

    /// Requests currently counted in the window (for metrics and tests).
    pub fn counted(&self, now: Instant) -> usize {
        let w = self.lock();
        w.in_flight + w.expiries.iter().filter(|&&e| e > now).count()
    }
}

/// The pause every Graph call observes after a 429 (throttling is per app
/// per tenant) or a failed token request.
#[derive(Debug, Default)]
pub struct Pause {
    until: Mutex<Option<Instant>>,
}

impl Pause {
    /// Pauses all calls until at least `now + d`; returns how much longer
    /// the pause became.
    pub fn extend(&self, now: Instant, d: Duration) -> Duration {
        let mut until = self.until.lock().unwrap_or_else(PoisonError::into_inner);
        let end = now + d;
        let previous = until.filter(|&u| u > now).unwrap_or(now);
        if end > previous {
            *until = Some(end);
            end - previous
        } else {
            Duration::ZERO
        }
    }

    /// When the pause ends, if one is in force at `now`.
    pub fn until(&self, now: Instant) -> Option<Instant> {
        let until = *self.until.lock().unwrap_or_else(PoisonError::into_inner);
        until.filter(|&u| u > now)
    }

    /// Waits out the pause (returns at once if there is none).
    pub async fn wait(&self) {
        while let Some(u) = self.until(Instant::now()) {
            tokio::time::sleep_until(u).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_quota_in_any_window_even_with_latency() {
        let per = Duration::from_secs(30);
        let limiter = RateLimiter::new(3, per);
        let t0 = Instant::now();
        let slots: Vec<_> = (0..3).map(|_| limiter.try_acquire(t0).unwrap()).collect();
        // Full while the requests are still in flight, however long they take.
        assert_eq!(limiter.try_acquire(t0).unwrap_err(), None);
        tokio::time::advance(Duration::from_secs(40)).await;
        assert!(limiter.try_acquire(Instant::now()).is_err());
        // Answers arrive at t0+40s: they count until t0+70s.
        drop(slots);
        let answered = Instant::now();
        assert_eq!(
            limiter.try_acquire(answered).unwrap_err(),
            Some(answered + per)
        );
        tokio::time::advance(per - Duration::from_millis(1)).await;
        assert!(limiter.try_acquire(Instant::now()).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(limiter.try_acquire(Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_for_the_window_to_slide() {
        let limiter = RateLimiter::new(2, Duration::from_secs(10));
        let start = Instant::now();
        for _ in 0..2 {
            drop(limiter.acquire().await);
        }
        let _third = limiter.acquire().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn pause_only_ever_extends() {
        let pause = Pause::default();
        let now = Instant::now();
        assert_eq!(
            pause.extend(now, Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(pause.extend(now, Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(
            pause.extend(now, Duration::from_secs(6)),
            Duration::from_secs(1)
        );
        assert_eq!(pause.until(now), Some(now + Duration::from_secs(6)));
        pause.wait().await;
        assert_eq!(Instant::now(), now + Duration::from_secs(6));
        assert_eq!(pause.until(Instant::now()), None);
    }
}
