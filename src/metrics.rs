//! Prometheus metrics (`GET /metrics`), through `prometheus-client`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::State;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sessions: Family<StateLabel, Gauge>,
    clears: Family<OutcomeLabel, Counter>,
    graph_requests: Family<StatusLabel, Counter>,
    throttled: Counter,
    paused_seconds: Counter<f64, AtomicU64>,
    token_requests: Family<ResultLabel, Counter>,
    clear_lag: Histogram,
    scheduled_clear_alls: Counter,
}

/// A clear's final outcome, for `presence_reaper_clears_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearOutcome {
    /// 2xx.
    Cleared,
    /// 404.
    Dropped,
    /// Permanent error or retries exhausted.
    Failed,
    /// Will be tried again.
    Retried,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("presence_reaper");
        let sessions = Family::<StateLabel, Gauge>::default();
        registry.register(
            "sessions",
            "Sessions in the store, by state",
            sessions.clone(),
        );
        let clears = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "clears",
            "Clear attempts by outcome (cleared, dropped, failed, retried)",
            clears.clone(),
        );
        let graph_requests = Family::<StatusLabel, Counter>::default();
        registry.register(
            "graph_requests",
            "clearPresence requests by answer (2xx, 4xx, 5xx, error for no answer)",
            graph_requests.clone(),
        );
        let throttled = Counter::default();
        registry.register(
            "graph_throttled",
            "429 answers from Graph",
            throttled.clone(),
        );
        let paused_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "graph_paused_seconds",
            "Time every Graph call was paused (429 Retry-After, token failures)",
            paused_seconds.clone(),
        );
        let token_requests = Family::<ResultLabel, Counter>::default();
        registry.register(
            "token_requests",
            "App tokens fetched from Entra ID, by result (ok, error)",
            token_requests.clone(),
        );
        // 1 ms to ~65 s.
        let clear_lag = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.001, 2.0, 17,
        ));
        registry.register(
            "clear_lag_seconds",
            "From a session's deadline to its clearPresence request being sent",
            clear_lag.clone(),
        );
        let scheduled_clear_alls = Counter::default();
        registry.register(
            "scheduled_clear_alls",
            "schedule.clear_all firings",
            scheduled_clear_alls.clone(),
        );
        Self {
            registry,
            sessions,
            clears,
            graph_requests,
            throttled,
            paused_seconds,
            token_requests,
            clear_lag,
            scheduled_clear_alls,
        }
    }

    /// Counts a clear's outcome.
    pub fn clear(&self, outcome: ClearOutcome) {
        let outcome = match outcome {
            ClearOutcome::Cleared => "cleared",
            ClearOutcome::Dropped => "dropped",
            ClearOutcome::Failed => "failed",
            ClearOutcome::Retried => "retried",
        };
        self.clears.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts a Graph answer by status class.
    pub fn graph_request(&self, status: &'static str) {
        self.graph_requests
            .get_or_create(&StatusLabel { status })
            .inc();
    }

    /// Counts a 429.
    pub fn throttled(&self) {
        self.throttled.inc();
    }

    /// Adds to the time Graph calls were paused.
    pub fn paused(&self, d: Duration) {
        self.paused_seconds.inc_by(d.as_secs_f64());
    }

    /// Counts a token fetch.
    pub fn token_request(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.token_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Records deadline → request lag.
    pub fn clear_lag(&self, lag: Duration) {
        self.clear_lag.observe(lag.as_secs_f64());
    }

    /// Counts a scheduled clear-all.
    pub fn scheduled_clear_all(&self) {
        self.scheduled_clear_alls.inc();
    }

    /// Renders the registry as Prometheus/OpenMetrics text, with the session
    /// counts given (read from the store at scrape time).
    pub fn render(&self, counts: &[(State, u64)]) -> String {
        for state in State::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            self.sessions
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.clear(ClearOutcome::Cleared);
        m.graph_request("2xx");
        m.throttled();
        m.paused(Duration::from_millis(1500));
        m.token_request(true);
        m.clear_lag(Duration::from_millis(3));
        let text = m.render(&[(State::Tracked, 7)]);
        for needle in [
            "presence_reaper_sessions{state=\"tracked\"} 7",
            "presence_reaper_sessions{state=\"failed\"} 0",
            "presence_reaper_clears_total{outcome=\"cleared\"} 1",
            "presence_reaper_graph_requests_total{status=\"2xx\"} 1",
            "presence_reaper_graph_throttled_total 1",
            "presence_reaper_graph_paused_seconds_total 1.5",
            "presence_reaper_token_requests_total{result=\"ok\"} 1",
            "presence_reaper_clear_lag_seconds_count 1",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
