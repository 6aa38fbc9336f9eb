//! presence-reaper: makes sure no Microsoft Graph presence session outlives
//! the app that set it.
//!
//! Data flows one way: API → store → scheduler → Graph.
//!
//! - [`config`] — typed settings from `config.toml` and the environment,
//!   validated once; secrets that never print.
//! - [`ids`] — allow-list validation of user ids, session ids and owners.
//! - [`store`] — SQLite through sqlx, the only module with SQL; group-commit
//!   writer, lock file, migrations.
//! - [`graph`] — the shared HTTP client, tokens through `azure_identity`, the
//!   clearPresence request and the classification of Graph's answers.
//! - [`limiter`] — the sliding-window rate limit and the global 429 pause.
//! - [`metrics`] — Prometheus metrics.
//! - [`reaper`] — the scheduler, the only thing that decides when Graph is
//!   called: deadlines, retries, backoff, sweeps.
//! - [`api`] — the local HTTP API (axum).
//! - [`app`] — builds the pieces and runs them until shutdown; offline drain.
//! - [`cli`] — the client side of `track`, `clear` and `list`.
//! - [`shutdown`] — signals and exit codes.
//! - [`systemd`] — sd_notify: READY, STATUS, WATCHDOG, STOPPING, EXTEND_TIMEOUT.
//! - [`telemetry`] — logging.
//! - [`dev`] — `presence-reaper dev`: the daemon against the fake, no tenant.
//! - [`fake`] — a fake Graph and token endpoint over HTTPS, for tests and `dev`.

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod dev;
pub mod fake;
pub mod graph;
pub mod ids;
pub mod limiter;
pub mod metrics;
pub mod reaper;
pub mod shutdown;
pub mod store;
pub mod systemd;
pub mod telemetry;

pub use app::App;
pub use config::Config;
