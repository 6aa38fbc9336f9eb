//! The scheduler: the only thing that decides when Graph is called.
//!
//! It sleeps until the earliest due time in the store (a deadline or a
//! retry), the next sweep or the next scheduled clear-all, and is woken early
//! by the store when a sooner due time is committed. Due sessions are sent
//! within `graph.max_in_flight` and the rate limit, each answer is classified
//! by [`crate::graph::classify`] and written back to the row.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, RetryConfig, Timezone};
use crate::graph::{Answer, GraphClient};
use crate::limiter::{Pause, RateLimiter};
use crate::metrics::{ClearOutcome, Metrics};
use crate::store::{DueSession, Outcome, Store, StoreError, now_ms};

type Key = (String, String);

/// Exponential backoff with equal jitter: the delay before try `attempts + 1`,
/// `attempts` (≥ 1) having been made.
pub fn backoff(cfg: &RetryConfig, attempts: u32, jitter: f64) -> Duration {
    let exp = attempts.saturating_sub(1).min(40);
    let base = cfg
        .initial_backoff
        .0
        .saturating_mul(1u32 << exp.min(31))
        .min(cfg.max_backoff.0);
    // Half fixed, half random: retries spread out without ever being instant.
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// A cron schedule read in the configured clock.
#[derive(Debug, Clone)]
struct Cron {
    schedule: cron::Schedule,
    tz: Timezone,
}

impl Cron {
    fn new(expr: &str, tz: Timezone) -> Option<Self> {
        crate::config::parse_cron(expr)
            .ok()
            .map(|schedule| Self { schedule, tz })
    }

    /// The first firing strictly after `after_ms`.
    fn next_after(&self, after_ms: i64) -> Option<i64> {
        let after = chrono::DateTime::from_timestamp_millis(after_ms)?;
        match self.tz {
            Timezone::Utc => self
                .schedule
                .after(&after)
                .next()
                .map(|t| t.timestamp_millis()),
            Timezone::Local => self
                .schedule
                .after(&after.with_timezone(&chrono::Local))
                .next()
                .map(|t| t.timestamp_millis()),
        }
    }
}

/// What one pass of the scheduler did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Clears started.
    pub started: usize,
    /// True if due sessions were left for lack of a permit, a rate-limit
    /// slot or because Graph calls are paused.
    pub saturated: bool,
}

/// The scheduler.
pub struct Reaper {
    store: Store,
    graph: Arc<GraphClient>,
    retry: RetryConfig,
    retention: Duration,
    permits: Arc<Semaphore>,
    limiter: Arc<RateLimiter>,
    pause: Pause,
    token_failures: Mutex<u32>,
    in_flight: Mutex<HashSet<Key>>,
    tasks: TaskTracker,
    sweep: Option<Cron>,
    clear_all: Vec<Cron>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// A scheduler over `store` that clears through `graph`.
    pub fn new(
        config: &Config,
        store: Store,
        graph: Arc<GraphClient>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let tz = config.schedule.timezone;
        Arc::new(Self {
            store,
            graph,
            retry: config.retry,
            retention: config.sessions.retention.0,
            permits: Arc::new(Semaphore::new(config.graph.max_in_flight)),
            limiter: RateLimiter::new(
                config.graph.rate_limit.requests,
                config.graph.rate_limit.per.0,
            ),
            pause: Pause::default(),
            token_failures: Mutex::new(0),
            in_flight: Mutex::new(HashSet::new()),
            tasks: TaskTracker::new(),
            sweep: Cron::new(&config.schedule.sweep, tz),
            clear_all: config
                .schedule
                .clear_all
                .iter()
                .filter_map(|e| Cron::new(e, tz))
                .collect(),
            metrics,
        })
    }

    /// The store this scheduler works on.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<Key>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of clears in flight.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight().len()
    }

    /// Starts every due session it can right now: the one-step function the
    /// loop is built on, and that tests drive with their own clock.
    pub async fn clear_due_once(self: &Arc<Self>, now: i64) -> Result<Pass, StoreError> {
        let mut pass = Pass::default();
        if self.pause.until(Instant::now()).is_some() {
            pass.saturated = true;
            return Ok(pass);
        }
        let available = self.permits.available_permits();
        if available == 0 {
            pass.saturated = true;
            return Ok(pass);
        }
        // Only this task starts clears, but clears end at any time: a row
        // read while its clear was in flight is stale even if that clear has
        // ended by the time we look, so skip what was in flight before the read.
        let busy: HashSet<Key> = self.in_flight().clone();
        let due = self.store.due(now, available + busy.len()).await?;
        for d in due {
            let key = (d.user_id.to_string(), d.session_id.to_string());
            if busy.contains(&key) || self.in_flight().contains(&key) {
                continue;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                pass.saturated = true;
                break;
            };
            let slot = match self.limiter.try_acquire(Instant::now()) {
                Ok(slot) => slot,
                Err(_) => {
                    pass.saturated = true;
                    break;
                }
            };
            self.in_flight().insert(key.clone());
            let me = self.clone();
            pass.started += 1;
            self.tasks.spawn(async move {
                me.attempt(d, slot, permit).await;
                me.in_flight().remove(&key);
                me.store.due_signal().wake();
            });
        }
        Ok(pass)
    }

    /// One clear: token, request (again after a 401), outcome to the store.
    async fn attempt(
        &self,
        d: DueSession,
        slot: crate::limiter::Slot,
        _permit: OwnedSemaphorePermit,
    ) {
        let mut sent: i64 = 0;
        let mut slot = Some(slot);
        let answer = loop {
            let token = match self.token().await {
                Ok(t) => t,
                Err(error) => {
                    drop(slot.take());
                    self.token_failed(&d, sent, error).await;
                    return;
                }
            };
            let slot_now = match slot.take() {
                Some(s) => s,
                None => self.limiter.acquire().await,
            };
            if sent == 0 && d.deadline {
                let lag_ms = (now_ms() - d.due_at).max(0) as u64;
                tracing::debug!(user_id = %d.user_id, lag_ms, "deadline passed; clearing");
                self.metrics.clear_lag(Duration::from_millis(lag_ms));
            }
            let answer = self
                .graph
                .send_clear(&d.user_id, &d.session_id, &token)
                .await;
            drop(slot_now);
            sent += 1;
            self.metrics.graph_request(answer.status_class());
            match answer {
                // A refused token is renewed and the request sent again at
                // once; a second 401 is retried later like a 5xx.
                Answer::Unauthorized(_) if sent == 1 => {
                    tracing::info!(user_id = %d.user_id, "Graph refused the token (401); renewing it");
                    self.graph.tokens().invalidate(&token);
                }
                other => break other,
            }
        };
        let now = now_ms();
        let attempts = d.attempts + sent;
        let outcome = match answer {
            Answer::Cleared => Outcome::Cleared,
            Answer::Dropped => Outcome::Dropped,
            Answer::Failed { error, .. } => Outcome::Failed(error),
            Answer::Unauthorized(error) => self.retry_outcome(None, false, error, attempts, now),
            Answer::Retry {
                after,
                throttled,
                error,
                ..
            } => self.retry_outcome(after, throttled, error, attempts, now),
        };
        match &outcome {
            Outcome::Cleared => {
                tracing::info!(user_id = %d.user_id, session_id = %d.session_id, attempts, "cleared")
            }
            Outcome::Dropped => {
                tracing::info!(user_id = %d.user_id, session_id = %d.session_id, attempts, "dropped: Graph has no such session")
            }
            Outcome::Failed(e) => {
                tracing::warn!(user_id = %d.user_id, session_id = %d.session_id, attempts, error = %e, "clear failed")
            }
            Outcome::Retry { next_at, error } => {
                tracing::info!(user_id = %d.user_id, attempts, error = %error, retry_in_ms = next_at - now, "clear will be retried")
            }
        }
        self.write(&d, sent, outcome, now).await;
    }

    /// The outcome of a retryable answer: pause everyone after a 429, back
    /// off with `Retry-After` as a floor, give up after `retry.max_attempts`.
    fn retry_outcome(
        &self,
        after: Option<Duration>,
        throttled: bool,
        error: String,
        attempts: i64,
        now: i64,
    ) -> Outcome {
        let delay = backoff(&self.retry, attempts as u32, fastrand::f64());
        if throttled {
            self.metrics.throttled();
            // Throttling is per app per tenant: everyone waits.
            let pause = after.unwrap_or(delay);
            tracing::warn!(
                pause_ms = pause.as_millis() as u64,
                "Graph throttled us (429); pausing all calls"
            );
            self.metrics
                .paused(self.pause.extend(Instant::now(), pause));
        }
        if attempts >= i64::from(self.retry.max_attempts) {
            Outcome::Failed(format!("{error} (gave up after {attempts} attempts)"))
        } else {
            let wait = after.map_or(delay, |a| a.max(delay));
            Outcome::Retry {
                next_at: now + wait.as_millis() as i64,
                error,
            }
        }
    }

    async fn token_failed(&self, d: &DueSession, sent: i64, error: String) {
        let failures = {
            let mut f = self
                .token_failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *f = f.saturating_add(1);
            *f
        };
        // A token failure is everyone's failure: pause all calls, backing off
        // as failures repeat, rather than have each session hammer Entra ID.
        let delay = backoff(&self.retry, failures, fastrand::f64());
        tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "cannot get a token; pausing Graph calls");
        self.metrics
            .paused(self.pause.extend(Instant::now(), delay));
        let now = now_ms();
        let outcome = Outcome::Retry {
            next_at: now + delay.as_millis() as i64,
            error,
        };
        self.write(d, sent, outcome, now).await;
    }

    /// A token, counting fetches and resetting the token backoff on success.
    async fn token(&self) -> Result<crate::graph::Token, String> {
        let result = self.graph.tokens().token().await;
        match &result {
            Ok(t) => {
                if t.fresh {
                    self.metrics.token_request(true);
                }
                *self
                    .token_failures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = 0;
            }
            Err(_) => self.metrics.token_request(false),
        }
        result
    }

    async fn write(&self, d: &DueSession, sent: i64, outcome: Outcome, now: i64) {
        self.metrics.clear(match &outcome {
            Outcome::Cleared => ClearOutcome::Cleared,
            Outcome::Dropped => ClearOutcome::Dropped,
            Outcome::Failed(_) => ClearOutcome::Failed,
            Outcome::Retry { .. } => ClearOutcome::Retried,
        });
        match self.store.record(d, sent, outcome, now).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(user_id = %d.user_id, "session was renewed while its clear was in flight; it stays tracked")
            }
            Err(e) => {
                tracing::error!(user_id = %d.user_id, error = %e, "cannot record a clear's outcome; it will be retried")
            }
        }
    }

    /// Fetches the first token ahead of the first deadline, so that the first
    /// clear does not wait for it. A failure here is only logged: the clear
    /// that needs the token handles it.
    pub async fn warm_up(&self) {
        if let Err(e) = self.token().await {
            tracing::warn!(error = %e, "cannot get a token yet; clears will retry");
        }
    }

    /// Makes every `clearing` session due now (start-up: finish what a
    /// previous run left).
    pub async fn resume(&self) -> Result<u64, StoreError> {
        self.store.resume(now_ms()).await
    }

    /// The sweep: purge terminal sessions older than `sessions.retention`.
    pub async fn sweep(&self, now: i64) -> Result<u64, StoreError> {
        let purged = self
            .store
            .purge(now - self.retention.as_millis() as i64)
            .await?;
        if purged > 0 {
            tracing::info!(purged, "sweep purged old finished sessions");
        }
        Ok(purged)
    }

    /// Runs until `cancel` fires, then waits for clears in flight.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let signal = self.store.due_signal().clone();
        let mut next_sweep = self.sweep.as_ref().and_then(|c| c.next_after(now_ms()));
        let mut next_clear_all = self.next_clear_all(now_ms());
        loop {
            if cancel.is_cancelled() {
                break;
            }
            // Any due time committed from here on wakes us.
            signal.plan(i64::MAX);
            let now = now_ms();
            if next_sweep.is_some_and(|t| t <= now) {
                if let Err(e) = self.sweep(now).await {
                    tracing::error!(error = %e, "sweep failed");
                }
                next_sweep = self.sweep.as_ref().and_then(|c| c.next_after(now));
            }
            if next_clear_all.is_some_and(|t| t <= now) {
                match self.store.clear_all(None, now).await {
                    Ok((_, n)) => {
                        self.metrics.scheduled_clear_all();
                        tracing::info!(sessions = n, "scheduled clear-all")
                    }
                    Err(e) => tracing::error!(error = %e, "scheduled clear-all failed"),
                }
                next_clear_all = self.next_clear_all(now);
            }
            let pass = match self.clear_due_once(now).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read due sessions; trying again in 1s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = cancel.cancelled() => {}
                    }
                    continue;
                }
            };
            if pass.started > 0 && !pass.saturated {
                // More may be due than one page held.
                continue;
            }
            let timers = [next_sweep, next_clear_all].into_iter().flatten().min();
            let at_ms = if pass.saturated {
                // Due sessions are waiting for a permit (an answer wakes us),
                // the end of a 429 pause, or the rate window to slide.
                let resume = self.saturated_wait().map(|at| {
                    now_ms() + at.saturating_duration_since(Instant::now()).as_millis() as i64
                });
                [resume, timers].into_iter().flatten().min()
            } else {
                // Everything due by `now` was started or is in flight (its
                // task wakes us when it ends): sleep towards what comes next.
                let next_due = self.store.next_due_after(now).await.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "cannot read the next due time");
                    Some(now + 1000)
                });
                [next_due, timers].into_iter().flatten().min()
            };
            signal.plan(at_ms.unwrap_or(i64::MAX));
            let sleep = async {
                match at_ms {
                    Some(at) => {
                        let ms = (at - now_ms()).max(0) as u64;
                        tokio::time::sleep(Duration::from_millis(ms)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = signal.notified() => {}
                _ = cancel.cancelled() => break,
            }
        }
        self.tasks.close();
    }

    /// When a saturated scheduler can next make progress (pause end or the
    /// rate window sliding); `None` if it waits for an answer to arrive.
    fn saturated_wait(&self) -> Option<Instant> {
        let now = Instant::now();
        if let Some(until) = self.pause.until(now) {
            return Some(until);
        }
        if self.permits.available_permits() == 0 {
            return None;
        }
        match self.limiter.try_acquire(now) {
            Ok(slot) => {
                // Room appeared meanwhile; give the slot back unused.
                self.limiter.release_unused(slot);
                Some(now)
            }
            Err(at) => at,
        }
    }

    fn next_clear_all(&self, after: i64) -> Option<i64> {
        self.clear_all
            .iter()
            .filter_map(|c| c.next_after(after))
            .min()
    }

    /// Waits (up to `timeout`) for the clears in flight to finish.
    pub async fn wait_in_flight(&self, timeout: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let cfg = RetryConfig {
            max_attempts: 10,
            initial_backoff: Dur(Duration::from_secs(1)),
            max_backoff: Dur(Duration::from_secs(300)),
        };
        assert_eq!(backoff(&cfg, 1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&cfg, 2, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(&cfg, 4, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(&cfg, 4, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(&cfg, 20, 1.0), Duration::from_secs(300));
        assert_eq!(backoff(&cfg, 200, 1.0), Duration::from_secs(300));
    }

    #[test]
    fn cron_reads_utc_with_seconds_first() {
        let c = Cron::new("0 0 18 * * MON-FRI", Timezone::Utc).unwrap();
        // 2026-12-04 is a Friday.
        let fri_noon = chrono::DateTime::parse_from_rfc3339("2026-12-04T12:00:00Z").unwrap();
        let next = c.next_after(fri_noon.timestamp_millis()).unwrap();
        assert_eq!(crate::store::rfc3339(next), "2026-12-04T18:00:00Z");
        let after = c.next_after(next).unwrap();
        assert_eq!(crate::store::rfc3339(after), "2026-12-07T18:00:00Z");
    }
}
