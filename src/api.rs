//! The local HTTP API (axum): routes, input validation and JSON errors.
//!
//! Handlers validate everything before the store sees it and answer bad
//! input with a 4xx and `{"error": {"code", "message"}}`; they never call
//! Graph (the scheduler does).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::config::{Secret, SessionsConfig};
use crate::ids::{Owner, SessionId, UserId};
use crate::metrics::Metrics;
use crate::store::{ListQuery, Session, State as SessionState, Store, StoreError, Tracked, now_ms};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest a `wait=true` call waits.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// An error answer: status, machine code and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store error while serving the API");
        match e {
            StoreError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the daemon is shutting down",
            ),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
                "the session store failed; see the daemon's log",
            ),
        }
    }
}

/// Lifecycle flags the API reports and obeys.
#[derive(Debug, Default)]
pub struct Lifecycle {
    ready: AtomicBool,
    shutting_down: AtomicBool,
    stopping: tokio_util::sync::CancellationToken,
}

impl Lifecycle {
    /// The store is open and the API serves.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }
    /// Stop accepting new sessions.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
    /// The API is about to stop: callers still waiting are answered now.
    pub fn set_stopping(&self) {
        self.stopping.cancel();
    }
    /// True once shutdown began.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.is_shutting_down()
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    store: Store,
    sessions: SessionsConfig,
    default_session: SessionId,
    lifecycle: Arc<Lifecycle>,
    token: Option<Secret>,
    metrics: Arc<Metrics>,
}

impl ApiState {
    /// State for the routes.
    pub fn new(
        store: Store,
        sessions: SessionsConfig,
        default_session: SessionId,
        lifecycle: Arc<Lifecycle>,
        token: Option<Secret>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            sessions,
            default_session,
            lifecycle,
            token,
            metrics,
        }
    }
}

/// All routes.
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/sessions/{user_id}",
            get(get_session).put(put_session).delete(delete_session),
        )
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/clear-all", post(clear_all))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn require_token(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(expected) = &st.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this API needs Authorization: Bearer <token> (api.token_file)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

async fn readyz(State(st): State<ApiState>) -> Response {
    if st.lifecycle.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        let why = if st.lifecycle.is_shutting_down() {
            "shutting_down"
        } else {
            "starting"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": why})),
        )
            .into_response()
    }
}

type PathParam = Result<Path<String>, PathRejection>;
type QueryParams = Result<Query<HashMap<String, String>>, QueryRejection>;

async fn metrics(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let counts = st.store.count_by_state().await?;
    let body = st.metrics.render(&counts);
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

fn user_id(raw: PathParam) -> Result<UserId, ApiError> {
    let Path(raw) = raw.map_err(|e| ApiError::bad("invalid_user_id", e.body_text()))?;
    UserId::parse(&raw).map_err(|e| ApiError::bad("invalid_user_id", e.0))
}

/// Query parameters, read by hand so that every problem gets a clear message.
struct Params(HashMap<String, String>);

impl Params {
    fn from(
        q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    ) -> Result<Self, ApiError> {
        q.map(|Query(m)| Self(m))
            .map_err(|e| ApiError::bad("invalid_query", e.body_text()))
    }

    fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(ApiError::bad(
                "invalid_query",
                format!(
                    "unknown query parameter {k:?}; this call takes {}",
                    allowed.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    fn session_id(&self, default: &SessionId) -> Result<SessionId, ApiError> {
        match self.0.get("session_id") {
            None => Ok(default.clone()),
            Some(s) => SessionId::parse(s).map_err(|e| ApiError::bad("invalid_session_id", e.0)),
        }
    }

    fn wait(&self) -> Result<bool, ApiError> {
        match self.0.get("wait").map(String::as_str) {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") | Some("") => Ok(true),
            Some(other) => Err(ApiError::bad(
                "invalid_query",
                format!("wait={other:?}: use true or false"),
            )),
        }
    }
}

/// Reads an optional JSON body into `T`, mapping every failure to a 4xx.
fn json_body<T: serde::de::DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request bodies are limited to {} KiB", MAX_BODY / 1024),
            )
        } else {
            ApiError::bad("invalid_body", e.body_text())
        }
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::bad("invalid_json", format!("the body is not valid JSON: {e}"))
            }
            Category::Data => ApiError::bad("invalid_body", e.to_string()),
        }
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackBody {
    ttl_seconds: Option<i64>,
    expires_at: Option<String>,
    session_id: Option<String>,
    owner: Option<String>,
}

async fn put_session(
    State(st): State<ApiState>,
    raw_user: PathParam,
    query: QueryParams,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if st.lifecycle.is_shutting_down() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the daemon is shutting down and takes no new sessions",
        ));
    }
    let user = user_id(raw_user)?;
    Params::from(query)?.only(&[])?;
    let body: TrackBody = json_body(&headers, body)?;
    let now = now_ms();
    let max_ttl_ms = st.sessions.max_ttl.0.as_millis() as i64;
    let expires_at = match (body.ttl_seconds, body.expires_at) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "conflicting_fields",
                "give ttl_seconds or expires_at, not both",
            ));
        }
        (Some(ttl), None) => {
            let max = max_ttl_ms / 1000;
            if !(1..=max).contains(&ttl) {
                return Err(ApiError::bad(
                    "invalid_ttl",
                    format!("ttl_seconds must be an integer from 1 to {max} (sessions.max_ttl)"),
                ));
            }
            now + ttl * 1000
        }
        (None, Some(at)) => {
            let at = chrono::DateTime::parse_from_rfc3339(&at)
                .map_err(|e| {
                    ApiError::bad(
                        "invalid_expires_at",
                        format!("expires_at {at:?} is not an RFC 3339 time such as 2026-12-04T19:30:00Z ({e})"),
                    )
                })?
                .timestamp_millis();
            if at <= now {
                return Err(ApiError::bad(
                    "invalid_expires_at",
                    "expires_at is in the past",
                ));
            }
            if at - now > max_ttl_ms {
                return Err(ApiError::bad(
                    "invalid_expires_at",
                    "expires_at is further away than sessions.max_ttl",
                ));
            }
            at
        }
        (None, None) => now + st.sessions.default_ttl.0.as_millis() as i64,
    };
    let session = match body.session_id {
        None => st.default_session.clone(),
        Some(s) => SessionId::parse(&s).map_err(|e| ApiError::bad("invalid_session_id", e.0))?,
    };
    let owner = body
        .owner
        .map(|o| Owner::parse(&o).map_err(|e| ApiError::bad("invalid_owner", e.0)))
        .transpose()?;
    let (row, kind) = st
        .store
        .track(&user, &session, owner.as_ref(), expires_at, now)
        .await?;
    let status = match kind {
        Tracked::Created => StatusCode::CREATED,
        Tracked::Renewed => StatusCode::OK,
    };
    Ok((status, Json(row)).into_response())
}

async fn get_session(
    State(st): State<ApiState>,
    raw_user: PathParam,
    query: QueryParams,
) -> Result<Json<Session>, ApiError> {
    let user = user_id(raw_user)?;
    let params = Params::from(query)?;
    params.only(&["session_id"])?;
    let session = params.session_id(&st.default_session)?;
    st.store
        .get(&user, &session)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such session"))
}

async fn delete_session(
    State(st): State<ApiState>,
    raw_user: PathParam,
    query: QueryParams,
) -> Result<Response, ApiError> {
    let user = user_id(raw_user)?;
    let params = Params::from(query)?;
    params.only(&["session_id", "wait"])?;
    let session = params.session_id(&st.default_session)?;
    let wait = params.wait()?;
    let mut finished = st.store.subscribe_finished();
    let row = st.store.clear(&user, &session, now_ms()).await?;
    if !wait {
        return Ok((StatusCode::ACCEPTED, Json(row)).into_response());
    }
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    loop {
        if let Some(row) = st.store.get(&user, &session).await?
            && row.state.is_terminal()
        {
            return Ok(Json(row).into_response());
        }
        if !wait_for_change(&st.lifecycle, &mut finished, deadline).await {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "the session is still being cleared after {}s",
                    MAX_WAIT.as_secs()
                ),
            ));
        }
    }
}

/// Waits until some session ends. False at `deadline`, or when the API is
/// stopping (so that waiting callers never hold up the daemon's exit).
async fn wait_for_change(
    lifecycle: &Lifecycle,
    finished: &mut tokio::sync::watch::Receiver<u64>,
    deadline: tokio::time::Instant,
) -> bool {
    tokio::select! {
        r = tokio::time::timeout_at(deadline, finished.changed()) => matches!(r, Ok(Ok(()))),
        _ = lifecycle.stopping.cancelled() => false,
    }
}

fn encode_cursor(user: &str, session: &str) -> String {
    format!("{user}\u{1f}{session}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_cursor(c: &str) -> Option<(String, String)> {
    if !c.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..c.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(c.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (u, s) = text.split_once('\u{1f}')?;
    let u = UserId::parse(u).ok()?;
    let s = SessionId::parse(s).ok()?;
    Some((u.as_str().to_owned(), s.as_str().to_owned()))
}

async fn list_sessions(
    State(st): State<ApiState>,
    query: QueryParams,
) -> Result<Response, ApiError> {
    let params = Params::from(query)?;
    params.only(&["state", "owner", "limit", "cursor"])?;
    let state = params
        .0
        .get("state")
        .map(|s| {
            s.parse::<SessionState>()
                .map_err(|e| ApiError::bad("invalid_state", e))
        })
        .transpose()?;
    let owner = params
        .0
        .get("owner")
        .map(|o| Owner::parse(o).map_err(|e| ApiError::bad("invalid_owner", e.0)))
        .transpose()?;
    let limit = match params.0.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| {
                ApiError::bad("invalid_limit", "limit must be an integer from 1 to 1000")
            })?,
    };
    let after = params
        .0
        .get("cursor")
        .map(|c| {
            decode_cursor(c).ok_or_else(|| {
                ApiError::bad("invalid_cursor", "cursor is not one this API gave out")
            })
        })
        .transpose()?;
    let sessions = st
        .store
        .list(&ListQuery {
            state,
            owner,
            // One more than asked, to know whether another page exists.
            limit: limit + 1,
            after,
        })
        .await?;
    let more = sessions.len() > limit as usize;
    let page = &sessions[..sessions.len().min(limit as usize)];
    let next_cursor = more
        .then(|| page.last())
        .flatten()
        .map(|s| encode_cursor(&s.user_id, &s.session_id));
    Ok(Json(Page {
        sessions: page,
        next_cursor,
    })
    .into_response())
}

/// One page of `GET /v1/sessions`.
#[derive(serde::Serialize)]
struct Page<'a> {
    sessions: &'a [Session],
    next_cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClearAllBody {
    owner: Option<String>,
}

async fn clear_all(
    State(st): State<ApiState>,
    query: QueryParams,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let params = Params::from(query)?;
    params.only(&["wait"])?;
    let wait = params.wait()?;
    let body: ClearAllBody = json_body(&headers, body)?;
    let owner = body
        .owner
        .map(|o| Owner::parse(&o).map_err(|e| ApiError::bad("invalid_owner", e.0)))
        .transpose()?;
    let mut finished = st.store.subscribe_finished();
    let (batch, scheduled) = st.store.clear_all(owner.as_ref(), now_ms()).await?;
    tracing::info!(
        scheduled,
        owner = owner.as_ref().map(Owner::as_str),
        "clear-all requested"
    );
    if !wait {
        return Ok((StatusCode::ACCEPTED, Json(json!({"scheduled": scheduled}))).into_response());
    }
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    loop {
        let counts = st.store.batch_counts(batch).await?;
        if counts.pending == 0 || !wait_for_change(&st.lifecycle, &mut finished, deadline).await {
            return Ok(Json(counts).into_response());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_forgeries() {
        let c = encode_cursor("a@x.com", "22553876-f5ab-4529-bffb-cfe50aa89f87");
        assert_eq!(
            decode_cursor(&c),
            Some((
                "a@x.com".into(),
                "22553876-f5ab-4529-bffb-cfe50aa89f87".into()
            ))
        );
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor(&encode_cursor("../x", "y")), None);
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
