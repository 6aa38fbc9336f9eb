//! Wiring: [`App::build`] opens the store, builds the Graph client and binds
//! the API; [`App::run`] serves and clears until its token is cancelled, then
//! shuts down as SPEC says (503 for new sessions, clear everything within
//! `shutdown.deadline`, exit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState, Lifecycle};
use crate::config::{Config, Listen};
use crate::graph::{BuildError, GraphClient};
use crate::ids::SessionId;
use crate::reaper::Reaper;
use crate::store::{Store, StoreError, now_ms};

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
    /// The API server failed.
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
}

/// A built daemon, ready to run.
pub struct App {
    config: Config,
    store: Store,
    reaper: Arc<Reaper>,
    listener: TcpListener,
    addr: SocketAddr,
    lifecycle: Arc<Lifecycle>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("addr", &self.addr)
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
        let graph = Arc::new(GraphClient::from_config(&config)?);
        let store = Store::open(&config.store.path, config.store.durability).await?;
        let listener = match &config.api.listen {
            Listen::Tcp(addr) => {
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| AppError::Listen {
                        listen: config.api.listen.to_string(),
                        source,
                    })?
            }
            Listen::Unix(_) => {
                return Err(AppError::Listen {
                    listen: config.api.listen.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::Unsupported,
                        "Unix sockets are not supported by this build yet; use host:port",
                    ),
                });
            }
        };
        let addr = listener.local_addr().map_err(|source| AppError::Listen {
            listen: config.api.listen.to_string(),
            source,
        })?;
        let reaper = Reaper::new(&config, store.clone(), graph);
        Ok(Self {
            config,
            store,
            reaper,
            listener,
            addr,
            lifecycle: Arc::new(Lifecycle::default()),
        })
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves and clears until `shutdown` is cancelled, then shuts down.
    pub async fn run(self, shutdown: CancellationToken) -> Result<ShutdownReport, AppError> {
        let App {
            config,
            store,
            reaper,
            listener,
            addr,
            lifecycle,
        } = self;
        let default_session = SessionId::parse(&config.auth.client_id)
            .expect("auth.client_id is validated as a GUID at load");
        let state = ApiState::new(
            store.clone(),
            config.sessions,
            default_session,
            lifecycle.clone(),
            config.api.token.clone(),
        );
        let stop_api = CancellationToken::new();
        let server = {
            let stop = stop_api.clone();
            tokio::spawn(async move {
                axum::serve(listener, api::router(state))
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
            })
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
        tracing::info!(%addr, store = %store.path().display(), "presence-reaper is ready");

        shutdown.cancelled().await;
        lifecycle.set_shutting_down();
        tracing::info!("shutting down: new sessions are refused");

        let mut left = store.live_count().await.unwrap_or(0);
        if config.shutdown.clear_on_shutdown && left > 0 {
            let deadline = config.shutdown.deadline.0;
            let (_, marked) = store.clear_all(None, now_ms()).await?;
            tracing::info!(sessions = marked, deadline = %humantime::format_duration(deadline), "clearing every live session before exit");
            left = drain(&store, deadline).await;
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
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(AppError::Serve(e)),
            Err(e) => tracing::error!(error = %e, "API server task failed"),
        }
        store.close().await;
        Ok(ShutdownReport { left })
    }
}

/// Waits until no session is live or `deadline` passes; returns how many are left.
async fn drain(store: &Store, deadline: Duration) -> u64 {
    let mut finished = store.subscribe_finished();
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let left = store.live_count().await.unwrap_or(u64::MAX);
        if left == 0 {
            return 0;
        }
        if tokio::time::timeout_at(until, finished.changed())
            .await
            .is_err()
        {
            return left;
        }
    }
}
