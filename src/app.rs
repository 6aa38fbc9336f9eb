//! Wiring: [`App::build`] opens the store, builds the Graph client and binds
//! the API; [`App::run`] serves and clears until its token is cancelled, then
//! shuts down as SPEC says (503 for new sessions, clear everything within
//! `shutdown.deadline`, exit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState, Lifecycle};
use crate::config::{Config, Listen};
use crate::graph::{BuildError, GraphClient};
use crate::ids::SessionId;
use crate::metrics::Metrics;
use crate::reaper::Reaper;
use crate::store::{BatchCounts, Session, Store, StoreError, now_ms};
use crate::systemd;

/// Why the daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Graph client could not be built.
    #[error(transparent)]
    Graph(#[from] BuildError),
    /// The API could not listen.
    #[error("api.listen = {listen}: cannot listen: {source}")]
    Listen {
        /// The configured address.
        listen: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The config does not hold together.
    #[error("{0}")]
    Config(String),
    /// The API server failed.
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
}

/// The API's listening socket.
enum ApiListener {
    Tcp(TcpListener, SocketAddr),
    /// A Unix socket, removed again on exit.
    Unix(UnixListener, PathBuf),
}

impl ApiListener {
    async fn bind(listen: &Listen) -> Result<Self, AppError> {
        let err = |source| AppError::Listen {
            listen: listen.to_string(),
            source,
        };
        match listen {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr).await.map_err(err)?;
                let addr = l.local_addr().map_err(err)?;
                Ok(Self::Tcp(l, addr))
            }
            Listen::Unix(path) => {
                if path.exists() {
                    // A socket file left by a crash is removed; one that
                    // answers belongs to a running process and is not.
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            "another process is listening on this socket",
                        )));
                    }
                    std::fs::remove_file(path).map_err(err)?;
                }
                let l = UnixListener::bind(path).map_err(err)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                    .map_err(err)?;
                Ok(Self::Unix(l, path.clone()))
            }
        }
    }
}

/// A built daemon, ready to run.
pub struct App {
    config: Config,
    store: Store,
    reaper: Arc<Reaper>,
    metrics: Arc<Metrics>,
    listener: ApiListener,
    lifecycle: Arc<Lifecycle>,
    /// `auth.client_id`, the session id of PUTs that name none.
    default_session: SessionId,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("endpoint", &self.endpoint())
            .finish_non_exhaustive()
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Live sessions left in the store (cleared first after the next start).
    pub left: u64,
}

impl App {
    /// Opens the store, builds the Graph client and binds the API.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let default_session = SessionId::parse(&config.auth.client_id)
            .map_err(|e| AppError::Config(format!("auth.client_id: {e}")))?;
        let graph = Arc::new(GraphClient::from_config(&config)?);
        let store = Store::open(&config.store.path, config.store.durability).await?;
        let listener = ApiListener::bind(&config.api.listen).await?;
        let metrics = Arc::new(Metrics::new());
        let reaper = Reaper::new(&config, store.clone(), graph, metrics.clone());
        Ok(Self {
            config,
            store,
            reaper,
            metrics,
            listener,
            lifecycle: Arc::new(Lifecycle::default()),
            default_session,
        })
    }

    /// The TCP address the API listens on (`None` on a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            ApiListener::Tcp(_, addr) => Some(*addr),
            ApiListener::Unix(..) => None,
        }
    }

    /// Where the API listens, as `host:port` or `unix:/path`.
    pub fn endpoint(&self) -> String {
        match &self.listener {
            ApiListener::Tcp(_, addr) => addr.to_string(),
            ApiListener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves and clears until `shutdown` is cancelled, then shuts down.
    pub async fn run(self, shutdown: CancellationToken) -> Result<ShutdownReport, AppError> {
        let endpoint = self.endpoint();
        let App {
            config,
            store,
            reaper,
            metrics,
            listener,
            lifecycle,
            default_session,
        } = self;
        let state = ApiState::new(
            store.clone(),
            config.sessions,
            default_session,
            lifecycle.clone(),
            config.api.token.clone(),
            metrics,
        );
        let stop_api = CancellationToken::new();
        let router = api::router(state);
        let stop = stop_api.clone().cancelled_owned();
        let (server, socket_file) = match listener {
            ApiListener::Tcp(l, _) => (
                tokio::spawn(
                    async move { axum::serve(l, router).with_graceful_shutdown(stop).await },
                ),
                None,
            ),
            ApiListener::Unix(l, path) => (
                tokio::spawn(
                    async move { axum::serve(l, router).with_graceful_shutdown(stop).await },
                ),
                Some(path),
            ),
        };

        let resumed = store.resume(now_ms()).await?;
        if resumed > 0 {
            tracing::info!(
                sessions = resumed,
                "resuming clears left by the previous run"
            );
        }
        let warm_up = tokio::spawn({
            let reaper = reaper.clone();
            async move { reaper.warm_up().await }
        });
        let stop_reaper = CancellationToken::new();
        let reaper_task = tokio::spawn(reaper.clone().run(stop_reaper.clone()));
        lifecycle.set_ready();
        let live = store.live_count().await.unwrap_or(0);
        systemd::ready(&format!(
            "ready on {endpoint}; tracking {live} live sessions"
        ));
        let stop_systemd = CancellationToken::new();
        let watchdog = tokio::spawn(systemd::watchdog(store.clone(), stop_systemd.clone()));
        let status = tokio::spawn(systemd::status_updates(store.clone(), stop_systemd.clone()));
        tracing::info!(addr = %endpoint, store = %store.path().display(), "presence-reaper is ready");

        shutdown.cancelled().await;
        lifecycle.set_shutting_down();
        status.abort();
        let mut left = store.live_count().await.unwrap_or(0);
        systemd::stopping(&format!("shutting down; {left} live sessions"));
        tracing::info!("shutting down: new sessions are refused");

        if config.shutdown.clear_on_shutdown && left > 0 {
            let deadline = config.shutdown.deadline.0;
            let (_, marked) = store.clear_all(None, now_ms()).await?;
            tracing::info!(sessions = marked, deadline = %humantime::format_duration(deadline), "clearing every live session before exit");
            // A second signal ends the process from `shutdown`; nothing cancels this.
            left = drain(&store, deadline, &CancellationToken::new()).await;
        }
        warm_up.abort();
        stop_reaper.cancel();
        let _ = reaper_task.await;
        // Clears still in flight at the deadline are abandoned: their rows stay
        // live and are cleared first after the next start.
        if !reaper.wait_in_flight(Duration::from_millis(200)).await {
            tracing::warn!("abandoning clears still in flight");
        }
        left = store.live_count().await.unwrap_or(left);
        if left > 0 {
            tracing::warn!(
                sessions = left,
                "sessions left live; they will be cleared after the next start"
            );
        } else {
            tracing::info!("every session is settled");
        }
        lifecycle.set_stopping();
        stop_api.cancel();
        let served = server.await;
        if let Some(path) = socket_file {
            let _ = std::fs::remove_file(path);
        }
        match served {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(AppError::Serve(e)),
            Err(e) => tracing::error!(error = %e, "API server task failed"),
        }
        stop_systemd.cancel();
        let _ = watchdog.await;
        store.close().await;
        Ok(ShutdownReport { left })
    }
}

/// Time asked of systemd beyond the drain deadline, for the exit itself.
const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// Waits until no session is live, `deadline` passes or `cancel` fires;
/// returns how many are left. Meanwhile it keeps systemd informed and asks
/// it for more time (EXTEND_TIMEOUT_USEC) while there is work and time left.
async fn drain(store: &Store, deadline: Duration, cancel: &CancellationToken) -> u64 {
    let mut finished = store.subscribe_finished();
    let start = tokio::time::Instant::now();
    let until = start + deadline;
    let mut next_report = start;
    loop {
        let left = store.live_count().await.unwrap_or(u64::MAX);
        if left == 0 {
            return 0;
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return left;
        }
        if now >= next_report {
            systemd::extend_timeout(until - now + EXIT_MARGIN);
            systemd::status(&format!("shutting down: {left} sessions left to clear"));
            next_report = now + Duration::from_secs(5);
        }
        tokio::select! {
            _ = finished.changed() => {}
            _ = tokio::time::sleep_until(until.min(next_report)) => {}
            _ = cancel.cancelled() => return left,
        }
    }
}

/// What `presence-reaper drain` did.
#[derive(Debug)]
pub struct DrainReport {
    /// Outcomes of the sessions that were live when the drain began.
    pub counts: BatchCounts,
    /// Those that did not end cleared or dropped (failed, or still live).
    pub unfinished: Vec<Session>,
}

/// `presence-reaper drain`: takes the store's lock (no daemon may hold it),
/// clears every live session with the daemon's retry policy until all have
/// ended or `deadline` passes (or `cancel` fires).
pub async fn drain_offline(
    config: &Config,
    deadline: Duration,
    cancel: CancellationToken,
) -> Result<DrainReport, AppError> {
    let graph = Arc::new(GraphClient::from_config(config)?);
    let store = Store::open(&config.store.path, config.store.durability).await?;
    let reaper = Reaper::new(config, store.clone(), graph, Arc::new(Metrics::new()));
    let (batch, marked) = store.clear_all(None, now_ms()).await?;
    tracing::info!(sessions = marked, deadline = %humantime::format_duration(deadline), "draining the store");
    let stop = CancellationToken::new();
    let task = tokio::spawn(reaper.clone().run(stop.clone()));
    drain(&store, deadline, &cancel).await;
    stop.cancel();
    let _ = task.await;
    reaper.wait_in_flight(Duration::from_millis(200)).await;
    let counts = store.batch_counts(batch).await?;
    let unfinished = store.batch_unfinished(batch).await?;
    store.close().await;
    Ok(DrainReport { counts, unfinished })
}
