//! The SQLite store: the only module with SQL in it.
//!
//! Reads go through a small connection pool. Writes go through one writer
//! task that owns its own connection and commits whatever has queued up in a
//! single transaction (group commit), so a burst of PUTs costs one fsync, not
//! one each. A write is acknowledged only after its transaction committed.
//!
//! Times are milliseconds since the Unix epoch, passed in by the caller, so
//! that tests control the clock.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::config::Durability;
use crate::ids::{Owner, SessionId, UserId};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the store's lock file.
    #[error(
        "store {path} is in use by another presence-reaper (lock file {lock} is held); \
         stop that process first"
    )]
    Locked {
        /// The database path.
        path: PathBuf,
        /// The lock file path.
        lock: PathBuf,
    },
    /// The lock file could not be opened.
    #[error("cannot open lock file {path}: {source}")]
    LockFile {
        /// The lock file path.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The database could not be opened or migrated.
    #[error("cannot open store {path}: {source}")]
    Open {
        /// The database path.
        path: PathBuf,
        /// What went wrong.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("cannot migrate store {path}: {source}")]
    Migrate {
        /// The database path.
        path: PathBuf,
        /// What went wrong.
        source: sqlx::migrate::MigrateError,
    },
    /// A query failed.
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// The writer task has stopped (the store is closing).
    #[error("the store is closed")]
    Closed,
}

/// Lifecycle state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its deadline.
    Tracked,
    /// Due: a clear is in flight or waiting for its next retry.
    Clearing,
    /// Graph answered 2xx.
    Cleared,
    /// Graph answered 404: nothing left to clear.
    Dropped,
    /// A permanent error, or retries exhausted.
    Failed,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [State; 5] = [
        State::Tracked,
        State::Clearing,
        State::Cleared,
        State::Dropped,
        State::Failed,
    ];

    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Tracked => "tracked",
            State::Clearing => "clearing",
            State::Cleared => "cleared",
            State::Dropped => "dropped",
            State::Failed => "failed",
        }
    }

    /// True for `cleared`, `dropped` and `failed`.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Cleared | State::Dropped | State::Failed)
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("{s:?} is not a state; use tracked, clearing, cleared, dropped or failed")
            })
    }
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Graph user id (lower-case).
    pub user_id: String,
    /// Presence session id (lower-case GUID).
    pub session_id: String,
    /// The app-chosen owner label.
    pub owner: Option<String>,
    /// Lifecycle state.
    pub state: State,
    /// Deadline, ms since the epoch.
    pub expires_at: i64,
    /// When the session was first tracked.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
    /// clearPresence requests sent for the current clear.
    pub attempts: i64,
    /// When the scheduler acts next (deadline or next retry); `None` once terminal.
    pub due_at: Option<i64>,
    /// `"<status> <code>: <message>"` of the last failed attempt.
    pub last_error: Option<String>,
    /// When it reached a terminal state.
    pub finished_at: Option<i64>,
    /// Renewal counter.
    pub generation: i64,
}

/// Formats epoch milliseconds as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The wall clock in epoch milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Serialize for Session {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Session", 11)?;
        st.serialize_field("user_id", &self.user_id)?;
        st.serialize_field("session_id", &self.session_id)?;
        st.serialize_field("owner", &self.owner)?;
        st.serialize_field("state", &self.state)?;
        st.serialize_field("expires_at", &rfc3339(self.expires_at))?;
        st.serialize_field("created_at", &rfc3339(self.created_at))?;
        st.serialize_field("updated_at", &rfc3339(self.updated_at))?;
        st.serialize_field("attempts", &self.attempts)?;
        let next = (self.state == State::Clearing)
            .then_some(self.due_at)
            .flatten()
            .map(rfc3339);
        st.serialize_field("next_attempt_at", &next)?;
        st.serialize_field("last_error", &self.last_error)?;
        st.serialize_field("finished_at", &self.finished_at.map(rfc3339))?;
        st.end()
    }
}

const SESSION_COLUMNS: &str = "user_id, session_id, owner, state, expires_at, created_at, \
     updated_at, attempts, due_at, last_error, finished_at, generation";

fn session_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Session, sqlx::Error> {
    let state: String = row.try_get("state")?;
    Ok(Session {
        user_id: row.try_get("user_id")?,
        session_id: row.try_get("session_id")?,
        owner: row.try_get("owner")?,
        state: state
            .parse()
            .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
        expires_at: row.try_get("expires_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        attempts: row.try_get("attempts")?,
        due_at: row.try_get("due_at")?,
        last_error: row.try_get("last_error")?,
        finished_at: row.try_get("finished_at")?,
        generation: row.try_get("generation")?,
    })
}

/// A session the scheduler should act on now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueSession {
    /// Graph user id.
    pub user_id: UserId,
    /// Presence session id.
    pub session_id: SessionId,
    /// When it became due (deadline or retry time), ms.
    pub due_at: i64,
    /// Whether it was still `tracked` (its deadline passed) rather than retrying.
    pub deadline: bool,
    /// Attempts so far.
    pub attempts: i64,
    /// Renewal counter at the time it was read.
    pub generation: i64,
}

/// What the scheduler learnt from one clear, to be written to the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Graph said 2xx.
    Cleared,
    /// Graph said 404.
    Dropped,
    /// Permanent failure (or retries exhausted), with `last_error`.
    Failed(String),
    /// Try again at `next_at` (ms).
    Retry {
        /// When to try next.
        next_at: i64,
        /// `last_error`.
        error: String,
    },
}

/// What a PUT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// A new session (or one that had ended).
    Created,
    /// A live session got a new deadline.
    Renewed,
}

/// Outcome counts of a clear-all batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BatchCounts {
    /// Sessions cleared.
    pub cleared: u64,
    /// Sessions Graph no longer had.
    pub dropped: u64,
    /// Sessions that failed.
    pub failed: u64,
    /// Sessions still being cleared.
    pub pending: u64,
}

/// Filter and page for [`Store::list`].
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this state.
    pub state: Option<State>,
    /// Only this owner.
    pub owner: Option<Owner>,
    /// Page size.
    pub limit: u32,
    /// Start after this `(user_id, session_id)`.
    pub after: Option<(String, String)>,
}

/// The earliest due time the scheduler is planning for, and its wake-up call.
///
/// Writers call [`DueSignal::due`] after committing a due time; the scheduler
/// is notified only when that time is earlier than the one it sleeps towards.
#[derive(Debug)]
pub struct DueSignal {
    planned: AtomicI64,
    notify: Notify,
}

impl DueSignal {
    fn new() -> Self {
        Self {
            planned: AtomicI64::new(i64::MIN),
            notify: Notify::new(),
        }
    }

    /// Records the time the scheduler will next wake at (`i64::MAX` for never).
    pub fn plan(&self, at: i64) {
        self.planned.store(at, Ordering::SeqCst);
    }

    /// Tells the scheduler that something is due at `at`.
    pub fn due(&self, at: i64) {
        if at < self.planned.load(Ordering::SeqCst) {
            self.planned.store(at, Ordering::SeqCst);
            self.notify.notify_one();
        }
    }

    /// Wakes the scheduler unconditionally.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Resolves when woken.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

enum Op {
    Track {
        user: UserId,
        session: SessionId,
        owner: Option<Owner>,
        expires_at: i64,
        now: i64,
        reply: oneshot::Sender<Result<(Session, Tracked), sqlx::Error>>,
    },
    Clear {
        user: UserId,
        session: SessionId,
        now: i64,
        reply: oneshot::Sender<Result<Session, sqlx::Error>>,
    },
    ClearAll {
        owner: Option<Owner>,
        now: i64,
        reply: oneshot::Sender<Result<(i64, u64), sqlx::Error>>,
    },
    Record {
        user: UserId,
        session: SessionId,
        generation: i64,
        attempts: i64,
        outcome: Outcome,
        now: i64,
        reply: oneshot::Sender<Result<bool, sqlx::Error>>,
    },
    Purge {
        before: i64,
        limit: i64,
        reply: oneshot::Sender<Result<u64, sqlx::Error>>,
    },
    Resume {
        now: i64,
        reply: oneshot::Sender<Result<u64, sqlx::Error>>,
    },
}

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Handle to the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    writer: mpsc::Sender<Op>,
    due: Arc<DueSignal>,
    finished: watch::Sender<u64>,
    path: PathBuf,
    shared: Arc<Shared>,
}

/// What [`Store::close`] tears down, whichever clone calls it.
struct Shared {
    lock: std::sync::Mutex<Option<File>>,
    writer_task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    closing: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The lock file that guards a store: `<db>.lock` beside it.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn take_lock(db: &Path) -> Result<File, StoreError> {
    let lock = lock_path(db);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|source| StoreError::LockFile {
            path: lock.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: db.to_owned(),
            lock,
        }),
        Err(std::fs::TryLockError::Error(source)) => {
            Err(StoreError::LockFile { path: lock, source })
        }
    }
}

impl Store {
    /// Takes the store's lock, opens (creating) the database and migrates it.
    pub async fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.to_owned(),
                source: sqlx::Error::Io(e),
            })?;
        }
        let lock = take_lock(path)?;
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let mut writer_conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(open_err)?;
        sqlx::migrate!()
            .run(&mut writer_conn)
            .await
            .map_err(|source| StoreError::Migrate {
                path: path.to_owned(),
                source,
            })?;
        let pool = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(open_err)?;
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let due = Arc::new(DueSignal::new());
        let (finished, _) = watch::channel(0);
        let closing = tokio_util::sync::CancellationToken::new();
        let writer_task = tokio::spawn(writer_loop(
            writer_conn,
            rx,
            due.clone(),
            finished.clone(),
            closing.clone(),
        ));
        Ok(Self {
            pool,
            writer: tx,
            due,
            finished,
            path: path.to_owned(),
            shared: Arc::new(Shared {
                lock: std::sync::Mutex::new(Some(lock)),
                writer_task: tokio::sync::Mutex::new(Some(writer_task)),
                closing,
            }),
        })
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The scheduler's wake-up signal.
    pub fn due_signal(&self) -> &Arc<DueSignal> {
        &self.due
    }

    /// A receiver that changes whenever sessions reach a terminal state.
    pub fn subscribe_finished(&self) -> watch::Receiver<u64> {
        self.finished.subscribe()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, sqlx::Error>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx.await.map_err(|_| StoreError::Closed)??)
    }

    /// Tracks (or renews) a session until `expires_at`.
    pub async fn track(
        &self,
        user: &UserId,
        session: &SessionId,
        owner: Option<&Owner>,
        expires_at: i64,
        now: i64,
    ) -> Result<(Session, Tracked), StoreError> {
        self.call(|reply| Op::Track {
            user: user.clone(),
            session: session.clone(),
            owner: owner.cloned(),
            expires_at,
            now,
            reply,
        })
        .await
    }

    /// Makes a session due now (creating a row for an unknown one).
    pub async fn clear(
        &self,
        user: &UserId,
        session: &SessionId,
        now: i64,
    ) -> Result<Session, StoreError> {
        self.call(|reply| Op::Clear {
            user: user.clone(),
            session: session.clone(),
            now,
            reply,
        })
        .await
    }

    /// Marks every live session (of `owner`, if given) `clearing`, due now,
    /// in one transaction. Returns the batch id and how many were marked.
    pub async fn clear_all(
        &self,
        owner: Option<&Owner>,
        now: i64,
    ) -> Result<(i64, u64), StoreError> {
        self.call(|reply| Op::ClearAll {
            owner: owner.cloned(),
            now,
            reply,
        })
        .await
    }

    /// Writes a clear's outcome, unless the session was renewed meanwhile.
    /// Returns whether the row was updated.
    pub async fn record(
        &self,
        due: &DueSession,
        attempts: i64,
        outcome: Outcome,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.call(|reply| Op::Record {
            user: due.user_id.clone(),
            session: due.session_id.clone(),
            generation: due.generation,
            attempts,
            outcome,
            now,
            reply,
        })
        .await
    }

    /// Deletes terminal sessions that finished before `before`. Returns how many.
    pub async fn purge(&self, before: i64) -> Result<u64, StoreError> {
        const CHUNK: i64 = 1000;
        let mut total = 0;
        loop {
            // Chunks keep the writer free for API writes between them.
            let n = self
                .call(|reply| Op::Purge {
                    before,
                    limit: CHUNK,
                    reply,
                })
                .await?;
            total += n;
            if n < CHUNK as u64 {
                return Ok(total);
            }
        }
    }

    /// Makes every `clearing` session due at `now`: at start-up, what a
    /// previous run left half-done is finished first.
    pub async fn resume(&self, now: i64) -> Result<u64, StoreError> {
        self.call(|reply| Op::Resume { now, reply }).await
    }

    /// One session.
    pub async fn get(
        &self,
        user: &UserId,
        session: &SessionId,
    ) -> Result<Option<Session>, StoreError> {
        let sql =
            format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = ? AND session_id = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(user.as_str())
            .bind(session.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(session_from_row).transpose()?)
    }

    /// A page of sessions ordered by `(user_id, session_id)`.
    pub async fn list(&self, q: &ListQuery) -> Result<Vec<Session>, StoreError> {
        let mut sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE 1 = 1");
        if q.state.is_some() {
            sql.push_str(" AND state = ?");
        }
        if q.owner.is_some() {
            sql.push_str(" AND owner = ?");
        }
        if q.after.is_some() {
            sql.push_str(" AND (user_id, session_id) > (?, ?)");
        }
        sql.push_str(" ORDER BY user_id, session_id LIMIT ?");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(s) = q.state {
            query = query.bind(s.as_str());
        }
        if let Some(o) = &q.owner {
            query = query.bind(o.as_str().to_owned());
        }
        if let Some((u, s)) = &q.after {
            query = query.bind(u.clone()).bind(s.clone());
        }
        let rows = query.bind(i64::from(q.limit)).fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(session_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Up to `limit` sessions due at or before `now`, earliest first.
    pub async fn due(&self, now: i64, limit: usize) -> Result<Vec<DueSession>, StoreError> {
        let rows = sqlx::query(
            "SELECT user_id, session_id, state, due_at, attempts, generation FROM sessions \
             WHERE due_at IS NOT NULL AND due_at <= ? ORDER BY due_at LIMIT ?",
        )
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let user: String = row.try_get("user_id")?;
            let session: String = row.try_get("session_id")?;
            let state: String = row.try_get("state")?;
            // Rows were validated on the way in; a row that no longer parses
            // (edited by hand) is skipped rather than sent to Graph.
            let (Ok(user_id), Ok(session_id)) = (UserId::parse(&user), SessionId::parse(&session))
            else {
                tracing::warn!(user_id = %user, session_id = %session, "skipping a stored session with an invalid id");
                continue;
            };
            out.push(DueSession {
                user_id,
                session_id,
                due_at: row.try_get("due_at")?,
                deadline: state == "tracked",
                attempts: row.try_get("attempts")?,
                generation: row.try_get("generation")?,
            });
        }
        Ok(out)
    }

    /// The earliest due time after `after` of any live session.
    pub async fn next_due_after(&self, after: i64) -> Result<Option<i64>, StoreError> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(due_at) FROM sessions WHERE due_at IS NOT NULL AND due_at > ?",
        )
        .bind(after)
        .fetch_one(&self.pool)
        .await?;
        Ok(v)
    }

    /// Number of live (`tracked` or `clearing`) sessions.
    pub async fn live_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sessions WHERE due_at IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    /// Sessions per state.
    pub async fn count_by_state(&self) -> Result<Vec<(State, u64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM sessions GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::new();
        for row in rows {
            let s: String = row.try_get("state")?;
            let n: i64 = row.try_get("n")?;
            if let Ok(state) = s.parse() {
                out.push((state, n as u64));
            }
        }
        Ok(out)
    }

    /// Outcome counts of a clear-all batch.
    pub async fn batch_counts(&self, batch: i64) -> Result<BatchCounts, StoreError> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM sessions WHERE clear_batch = ? GROUP BY state",
        )
        .bind(batch)
        .fetch_all(&self.pool)
        .await?;
        let mut c = BatchCounts::default();
        for row in rows {
            let s: String = row.try_get("state")?;
            let n = row.try_get::<i64, _>("n")? as u64;
            match s.as_str() {
                "cleared" => c.cleared += n,
                "dropped" => c.dropped += n,
                "failed" => c.failed += n,
                _ => c.pending += n,
            }
        }
        Ok(c)
    }

    /// When the last session ended, and whose it was.
    pub async fn last_finished(&self) -> Result<Option<(i64, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT finished_at, user_id FROM sessions WHERE finished_at IS NOT NULL \
             ORDER BY finished_at DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some((r.try_get("finished_at")?, r.try_get("user_id")?)),
            None => None,
        })
    }

    /// Sessions of a clear-all batch that did not end cleared or dropped.
    pub async fn batch_unfinished(&self, batch: i64) -> Result<Vec<Session>, StoreError> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE clear_batch = ? \
             AND state NOT IN ('cleared', 'dropped') ORDER BY user_id, session_id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(batch)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(session_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Commits the writes already queued, closes the database and releases
    /// the lock file. Every clone answers [`StoreError::Closed`] afterwards.
    pub async fn close(&self) {
        self.shared.closing.cancel();
        if let Some(task) = self.shared.writer_task.lock().await.take() {
            let _ = task.await;
        }
        self.pool.close().await;
        self.shared
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

async fn writer_loop(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Op>,
    due: Arc<DueSignal>,
    finished: watch::Sender<u64>,
    closing: tokio_util::sync::CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => n,
            _ = closing.cancelled(), if !rx.is_closed() => {
                // Take no new writes; commit the ones already queued.
                rx.close();
                continue;
            }
        };
        if n == 0 {
            break;
        }
        let ops = std::mem::take(&mut batch);
        match commit_batch(&mut conn, ops).await {
            Ok(effects) => effects.publish(&due, &finished),
            Err((err, ops)) => {
                // A statement failed: the batch was rolled back. Commit the
                // writes one by one so one bad write fails only its caller.
                tracing::warn!(error = %err, "group commit failed; retrying writes one by one");
                for op in ops {
                    match commit_batch(&mut conn, vec![op]).await {
                        Ok(effects) => effects.publish(&due, &finished),
                        Err((err, ops)) => {
                            for op in ops {
                                op.fail(&err);
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = conn.close().await;
}

#[derive(Default)]
struct Effects {
    earliest_due: Option<i64>,
    finished: bool,
    /// Each op with its result, answered once the commit is published.
    answers: Vec<(Op, OpResult)>,
}

impl Effects {
    fn due(&mut self, at: i64) {
        self.earliest_due = Some(self.earliest_due.map_or(at, |e| e.min(at)));
    }

    fn publish(self, due: &DueSignal, finished: &watch::Sender<u64>) {
        if let Some(at) = self.earliest_due {
            due.due(at);
        }
        if self.finished {
            finished.send_modify(|n| *n += 1);
        }
        for (op, result) in self.answers {
            op.answer(result);
        }
    }
}

impl Op {
    fn fail(self, err: &sqlx::Error) {
        let e = || sqlx::Error::Protocol(format!("write failed: {err}"));
        match self {
            Op::Track { reply, .. } => drop(reply.send(Err(e()))),
            Op::Clear { reply, .. } => drop(reply.send(Err(e()))),
            Op::ClearAll { reply, .. } => drop(reply.send(Err(e()))),
            Op::Record { reply, .. } => drop(reply.send(Err(e()))),
            Op::Purge { reply, .. } => drop(reply.send(Err(e()))),
            Op::Resume { reply, .. } => drop(reply.send(Err(e()))),
        }
    }
}

/// Runs `ops` in one transaction. On failure, hands the ops back unanswered.
async fn commit_batch(
    conn: &mut SqliteConnection,
    ops: Vec<Op>,
) -> Result<Effects, (sqlx::Error, Vec<Op>)> {
    let mut tx = match conn.begin().await {
        Ok(tx) => tx,
        Err(e) => return Err((e, ops)),
    };
    let mut effects = Effects::default();
    // Ops are applied by reference so that they can be handed back on failure.
    let mut results = Vec::with_capacity(ops.len());
    for op in &ops {
        match apply(&mut tx, op, &mut effects).await {
            Ok(r) => results.push(r),
            Err(e) => {
                drop(tx);
                return Err((e, ops));
            }
        }
    }
    if let Err(e) = tx.commit().await {
        return Err((e, ops));
    }
    effects.answers = ops.into_iter().zip(results).collect();
    Ok(effects)
}

enum OpResult {
    Track(Session, Tracked),
    Clear(Session),
    ClearAll(i64, u64),
    Record(bool),
    Count(u64),
}

impl Op {
    /// Sends `result` to the op's caller (who may have gone: that is fine).
    fn answer(self, result: OpResult) {
        match (self, result) {
            (Op::Track { reply, .. }, OpResult::Track(s, t)) => drop(reply.send(Ok((s, t)))),
            (Op::Clear { reply, .. }, OpResult::Clear(s)) => drop(reply.send(Ok(s))),
            (Op::ClearAll { reply, .. }, OpResult::ClearAll(b, n)) => drop(reply.send(Ok((b, n)))),
            (Op::Record { reply, .. }, OpResult::Record(u)) => drop(reply.send(Ok(u))),
            (Op::Purge { reply, .. } | Op::Resume { reply, .. }, OpResult::Count(n)) => {
                drop(reply.send(Ok(n)))
            }
            // Unreachable by construction: apply() answers each op with its own kind.
            (op, _) => op.fail(&sqlx::Error::Protocol("mismatched store reply".into())),
        }
    }
}

async fn apply(
    conn: &mut SqliteConnection,
    op: &Op,
    fx: &mut Effects,
) -> Result<OpResult, sqlx::Error> {
    match op {
        Op::Track {
            user,
            session,
            owner,
            expires_at,
            now,
            ..
        } => {
            let (u, s) = (user.as_str(), session.as_str());
            let owner = owner.as_ref().map(|o| o.as_str().to_owned());
            // Whether the session was live decides 200 (renewed) or 201.
            let live: Option<bool> = sqlx::query_scalar(
                "SELECT due_at IS NOT NULL FROM sessions WHERE user_id = ? AND session_id = ?",
            )
            .bind(u.to_owned())
            .bind(s.to_owned())
            .fetch_optional(&mut *conn)
            .await?;
            let kind = if live == Some(true) {
                Tracked::Renewed
            } else {
                Tracked::Created
            };
            // One upsert: a new row, or the old one tracked again with the
            // new deadline (a session that had ended starts afresh).
            let sql = format!(
                "INSERT INTO sessions (user_id, session_id, owner, state, expires_at, \
                 created_at, updated_at, attempts, due_at) \
                 VALUES (?, ?, ?, 'tracked', ?, ?, ?, 0, ?) \
                 ON CONFLICT (user_id, session_id) DO UPDATE SET \
                   state = 'tracked', owner = COALESCE(excluded.owner, owner), \
                   expires_at = excluded.expires_at, due_at = excluded.due_at, \
                   updated_at = excluded.updated_at, attempts = 0, last_error = NULL, \
                   finished_at = NULL, clear_batch = NULL, generation = generation + 1, \
                   created_at = CASE WHEN due_at IS NULL THEN excluded.created_at ELSE created_at END \
                 RETURNING {SESSION_COLUMNS}"
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(u.to_owned())
                .bind(s.to_owned())
                .bind(owner)
                .bind(expires_at)
                .bind(now)
                .bind(now)
                .bind(expires_at)
                .fetch_one(&mut *conn)
                .await?;
            fx.due(*expires_at);
            Ok(OpResult::Track(session_from_row(&row)?, kind))
        }
        Op::Clear {
            user, session, now, ..
        } => {
            let (u, s) = (user.as_str(), session.as_str());
            // Unknown sessions get a row too: the caller may know of a
            // session this store never saw (set before it was deployed).
            let sql = format!(
                "INSERT INTO sessions (user_id, session_id, state, expires_at, created_at, \
                 updated_at, attempts, due_at) VALUES (?, ?, 'clearing', ?, ?, ?, 0, ?) \
                 ON CONFLICT (user_id, session_id) DO UPDATE SET \
                   attempts = CASE WHEN due_at IS NULL THEN 0 ELSE attempts END, \
                   last_error = CASE WHEN due_at IS NULL THEN NULL ELSE last_error END, \
                   finished_at = NULL, \
                   due_at = MIN(COALESCE(due_at, excluded.due_at), excluded.due_at), \
                   state = 'clearing', updated_at = excluded.updated_at \
                 RETURNING {SESSION_COLUMNS}"
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(u.to_owned())
                .bind(s.to_owned())
                .bind(now)
                .bind(now)
                .bind(now)
                .bind(now)
                .fetch_one(&mut *conn)
                .await?;
            fx.due(*now);
            Ok(OpResult::Clear(session_from_row(&row)?))
        }
        Op::ClearAll { owner, now, .. } => {
            let batch: i64 =
                sqlx::query_scalar("SELECT COALESCE(MAX(clear_batch), 0) + 1 FROM sessions")
                    .fetch_one(&mut *conn)
                    .await?;
            let result = sqlx::query(
                "UPDATE sessions SET state = 'clearing', due_at = MIN(due_at, ?), \
                 updated_at = ?, clear_batch = ? \
                 WHERE due_at IS NOT NULL AND (? IS NULL OR owner = ?)",
            )
            .bind(now)
            .bind(now)
            .bind(batch)
            .bind(owner.as_ref().map(|o| o.as_str().to_owned()))
            .bind(owner.as_ref().map(|o| o.as_str().to_owned()))
            .execute(&mut *conn)
            .await?;
            if result.rows_affected() > 0 {
                fx.due(*now);
            }
            Ok(OpResult::ClearAll(batch, result.rows_affected()))
        }
        Op::Record {
            user,
            session,
            generation,
            attempts,
            outcome,
            now,
            ..
        } => {
            let (state, due_at, error, finished_at) = match outcome {
                Outcome::Cleared => ("cleared", None, None, Some(*now)),
                Outcome::Dropped => ("dropped", None, None, Some(*now)),
                Outcome::Failed(e) => ("failed", None, Some(e.clone()), Some(*now)),
                Outcome::Retry { next_at, error } => {
                    ("clearing", Some(*next_at), Some(error.clone()), None)
                }
            };
            let result = sqlx::query(
                "UPDATE sessions SET state = ?, due_at = ?, last_error = ?, finished_at = ?, \
                 attempts = attempts + ?, updated_at = ? \
                 WHERE user_id = ? AND session_id = ? AND generation = ? AND due_at IS NOT NULL",
            )
            .bind(state)
            .bind(due_at)
            .bind(error)
            .bind(finished_at)
            .bind(attempts)
            .bind(now)
            .bind(user.as_str().to_owned())
            .bind(session.as_str().to_owned())
            .bind(generation)
            .execute(&mut *conn)
            .await?;
            let updated = result.rows_affected() > 0;
            if updated {
                match due_at {
                    Some(at) => fx.due(at),
                    None => fx.finished = true,
                }
            }
            Ok(OpResult::Record(updated))
        }
        Op::Purge { before, limit, .. } => {
            let result = sqlx::query(
                "DELETE FROM sessions WHERE (user_id, session_id) IN \
                 (SELECT user_id, session_id FROM sessions \
                  WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT ?)",
            )
            .bind(before)
            .bind(limit)
            .execute(&mut *conn)
            .await?;
            Ok(OpResult::Count(result.rows_affected()))
        }
        Op::Resume { now, .. } => {
            let result = sqlx::query(
                "UPDATE sessions SET due_at = ? WHERE state = 'clearing' AND due_at > ?",
            )
            .bind(now)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            fx.due(*now);
            Ok(OpResult::Count(result.rows_affected()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "22553876-f5ab-4529-bffb-cfe50aa89f87";

    fn ids(u: &str) -> (UserId, SessionId) {
        (UserId::parse(u).unwrap(), SessionId::parse(S).unwrap())
    }

    async fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db"), Durability::Normal)
            .await
            .unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn track_renew_and_retrack_after_end() {
        let (_d, store) = open().await;
        let (u, s) = ids("a@x.com");
        let (first, kind) = store.track(&u, &s, None, 10_000, 1_000).await.unwrap();
        assert_eq!(kind, Tracked::Created);
        assert_eq!(first.state, State::Tracked);
        assert_eq!(first.due_at, Some(10_000));
        let (renewed, kind) = store
            .track(&u, &s, Some(&Owner::parse("bot").unwrap()), 20_000, 2_000)
            .await
            .unwrap();
        assert_eq!(kind, Tracked::Renewed);
        assert_eq!(renewed.created_at, 1_000);
        assert_eq!(renewed.expires_at, 20_000);
        assert_eq!(renewed.owner.as_deref(), Some("bot"));
        assert_eq!(renewed.generation, first.generation + 1);

        let due = store.due(20_000, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert!(
            store
                .record(&due[0], 1, Outcome::Cleared, 20_001)
                .await
                .unwrap()
        );
        let done = store.get(&u, &s).await.unwrap().unwrap();
        assert_eq!(done.state, State::Cleared);
        assert_eq!(done.attempts, 1);
        assert_eq!(done.finished_at, Some(20_001));
        assert_eq!(store.next_due_after(0).await.unwrap(), None);

        let (_, kind) = store.track(&u, &s, None, 90_000, 30_000).await.unwrap();
        assert_eq!(kind, Tracked::Created);
        let again = store.get(&u, &s).await.unwrap().unwrap();
        assert_eq!(
            (again.attempts, again.created_at, again.owner.as_deref()),
            (0, 30_000, Some("bot"))
        );
    }

    #[tokio::test]
    async fn an_outcome_for_a_renewed_session_is_ignored() {
        let (_d, store) = open().await;
        let (u, s) = ids("a@x.com");
        store.track(&u, &s, None, 10, 1).await.unwrap();
        let due = store.due(10, 10).await.unwrap();
        store.track(&u, &s, None, 50_000, 11).await.unwrap();
        assert!(
            !store
                .record(&due[0], 1, Outcome::Cleared, 12)
                .await
                .unwrap()
        );
        let row = store.get(&u, &s).await.unwrap().unwrap();
        assert_eq!((row.state, row.due_at), (State::Tracked, Some(50_000)));
    }

    #[tokio::test]
    async fn clear_brings_forward_and_creates_unknown_sessions() {
        let (_d, store) = open().await;
        let (u, s) = ids("b@x.com");
        let row = store.clear(&u, &s, 500).await.unwrap();
        assert_eq!((row.state, row.due_at), (State::Clearing, Some(500)));
        let due = store.due(500, 10).await.unwrap();
        store
            .record(
                &due[0],
                1,
                Outcome::Retry {
                    next_at: 60_000,
                    error: "503 x: y".into(),
                },
                501,
            )
            .await
            .unwrap();
        let row = store.clear(&u, &s, 1_000).await.unwrap();
        assert_eq!((row.due_at, row.attempts), (Some(1_000), 1));
        assert_eq!(row.last_error.as_deref(), Some("503 x: y"));
    }

    #[tokio::test]
    async fn clear_all_marks_by_owner_and_counts_the_batch() {
        let (_d, store) = open().await;
        let bot = Owner::parse("bot").unwrap();
        for (i, owner) in [Some(&bot), Some(&bot), None].into_iter().enumerate() {
            let (u, s) = ids(&format!("u{i}@x.com"));
            store.track(&u, &s, owner, 100_000, 1).await.unwrap();
        }
        let (batch, n) = store.clear_all(Some(&bot), 10).await.unwrap();
        assert_eq!(n, 2);
        let due = store.due(10, 10).await.unwrap();
        assert_eq!(due.len(), 2);
        store
            .record(&due[0], 1, Outcome::Dropped, 11)
            .await
            .unwrap();
        let c = store.batch_counts(batch).await.unwrap();
        assert_eq!(
            c,
            BatchCounts {
                cleared: 0,
                dropped: 1,
                failed: 0,
                pending: 1
            }
        );
    }

    #[tokio::test]
    async fn purge_removes_only_old_terminal_rows() {
        let (_d, store) = open().await;
        let (u, s) = ids("c@x.com");
        store.track(&u, &s, None, 5, 1).await.unwrap();
        let due = store.due(5, 1).await.unwrap();
        store
            .record(&due[0], 1, Outcome::Failed("400 x: y".into()), 6)
            .await
            .unwrap();
        let (u2, _) = ids("d@x.com");
        store.track(&u2, &s, None, 5, 1).await.unwrap();
        assert_eq!(store.purge(6).await.unwrap(), 0);
        assert_eq!(store.purge(7).await.unwrap(), 1);
        assert!(store.get(&u, &s).await.unwrap().is_none());
        assert!(store.get(&u2, &s).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_second_open_is_refused_naming_the_path() {
        let (dir, _store) = open().await;
        let err = Store::open(&dir.path().join("s.db"), Durability::Normal)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }));
        assert!(err.to_string().contains("s.db"), "{err}");
    }

    #[tokio::test]
    async fn close_releases_the_lock_even_while_clones_live() {
        let (dir, store) = open().await;
        let clone = store.clone();
        store.close().await;
        let (u, s) = ids("a@x.com");
        assert!(matches!(
            clone.track(&u, &s, None, 5, 1).await,
            Err(StoreError::Closed)
        ));
        let reopened = Store::open(&dir.path().join("s.db"), Durability::Normal).await;
        assert!(reopened.is_ok(), "{reopened:?}");
    }

    #[test]
    fn session_json_matches_the_spec_shape() {
        let s = Session {
            user_id: "u@x.com".into(),
            session_id: S.into(),
            owner: None,
            state: State::Clearing,
            expires_at: 1_796_412_600_000,
            created_at: 1_796_412_600_000,
            updated_at: 1_796_412_600_500,
            attempts: 2,
            due_at: Some(1_796_412_601_000),
            last_error: Some("503 serviceUnavailable: busy".into()),
            finished_at: None,
            generation: 0,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["expires_at"], "2026-12-04T19:30:00Z");
        assert_eq!(v["updated_at"], "2026-12-04T19:30:00.500Z");
        assert_eq!(v["next_attempt_at"], "2026-12-04T19:30:01Z");
        assert_eq!(v["finished_at"], serde_json::Value::Null);
        assert_eq!(v.as_object().unwrap().len(), 11);
    }
}
