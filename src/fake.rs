//! A fake Microsoft Graph and Entra ID token endpoint, over HTTPS with a CA
//! made at start-up, for the test suite and `presence-reaper dev`.
//!
//! It is strict like Graph: clearPresence needs a token it issued, the exact
//! path and a `{"sessionId": "<guid>"}` body, and answers 404 for a session
//! nobody set. Faults can be injected (latency, 5xx, 429 with a fractional
//! Retry-After, 401, dropped connections, a quota enforced like Graph's) and
//! every call is recorded.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A fault the fake injects into the next clearPresence answer(s).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status and a Graph error body.
    Status(u16),
    /// 429 with this `Retry-After` value (`"2.128"`, `"3"` or an HTTP date).
    Throttle(String),
    /// 429 without `Retry-After`.
    ThrottleBare,
    /// 503 with this `Retry-After` value.
    Unavailable(String),
    /// 401, as for a revoked token.
    Unauthorized,
    /// Close the connection without answering.
    Drop,
    /// Wait this long before answering normally.
    Delay(Duration),
    /// Wait this long, then answer 504 (a call the client gave up on).
    Stall(Duration),
}

/// One recorded clearPresence (or setPresence) call. Calls are recorded when
/// answered; one the client abandoned mid-way (a timeout) is not recorded.
#[derive(Debug, Clone)]
pub struct Call {
    /// `clearPresence` or `setPresence`.
    pub action: String,
    /// The user id as Graph decoded it from the path.
    pub user_id: String,
    /// The raw request path, still percent-encoded.
    pub raw_path: String,
    /// `sessionId` from the body, if it parsed.
    pub session_id: Option<String>,
    /// The `client-request-id` header.
    pub client_request_id: Option<String>,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The status answered (0 for a dropped connection).
    pub status: u16,
    /// When the request arrived.
    pub at: Instant,
    /// When it arrived, in epoch ms.
    pub at_ms: i64,
}

/// The credentials the fake's token endpoint accepts.
#[derive(Debug, Clone)]
pub struct FakeTenant {
    /// Tenant id in the token URL.
    pub tenant_id: String,
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: String,
    /// Required scope.
    pub scope: String,
    /// The service account token a workload identity presents as its assertion.
    pub federated_token: String,
    /// The `x-identity-header` the managed identity endpoint (App Service
    /// style, `GET /msi/token`) requires.
    pub identity_header: String,
}

impl Default for FakeTenant {
    fn default() -> Self {
        Self {
            tenant_id: "00000000-0000-4000-8000-000000000001".into(),
            client_id: "22553876-f5ab-4529-bffb-cfe50aa89f87".into(),
            client_secret: "fake-client-secret-do-not-log".into(),
            scope: "https://graph.microsoft.com/.default".into(),
            federated_token: "fake-federated-service-account-token".into(),
            identity_header: "fake-identity-header".into(),
        }
    }
}

#[derive(Debug, Default)]
struct Quota {
    requests: usize,
    per: Duration,
    arrivals: VecDeque<Instant>,
}

#[derive(Debug, Default)]
struct FakeState {
    tenant: FakeTenant,
    tokens: Mutex<HashSet<String>>,
    sessions: Mutex<HashSet<(String, String)>>,
    faults: Mutex<VecDeque<Fault>>,
    token_faults: Mutex<VecDeque<u16>>,
    down: Mutex<Option<u16>>,
    latency: Mutex<Duration>,
    quota: Mutex<Option<Quota>>,
    calls: Mutex<Vec<Call>>,
    token_requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// `dev` mode: log calls, and every user has a session to clear.
    dev: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running fake. Stops when dropped.
#[derive(Debug)]
pub struct FakeGraph {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<FakeState>,
    stop: CancellationToken,
}

impl Drop for FakeGraph {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Errors starting the fake.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// Certificate generation failed.
    #[error("cannot make the fake's certificates: {0}")]
    Cert(#[from] rcgen::Error),
    /// TLS setup failed.
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Binding failed.
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
}

impl FakeGraph {
    /// Starts a fake on 127.0.0.1 (port 0) for `tenant`.
    pub async fn start(tenant: FakeTenant) -> Result<Self, FakeError> {
        Self::start_with(tenant, false).await
    }

    /// For `dev`: logs every clearPresence at info and holds a presence
    /// session for every user, as if the bot had set one.
    pub async fn start_dev(tenant: FakeTenant) -> Result<Self, FakeError> {
        Self::start_with(tenant, true).await
    }

    async fn start_with(tenant: FakeTenant, dev: bool) -> Result<Self, FakeError> {
        let (ca_pem, acceptor) = tls()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(FakeState {
            tenant,
            dev,
            ..Default::default()
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, acceptor, state.clone(), stop.clone()));
        Ok(Self {
            addr,
            ca_pem,
            state,
            stop,
        })
    }

    /// `https://127.0.0.1:PORT`
    pub fn origin(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// The Graph base URL to configure (`…/v1.0`).
    pub fn graph_base(&self) -> String {
        format!("{}/v1.0", self.origin())
    }

    /// The authority host to configure.
    pub fn authority_host(&self) -> String {
        self.origin()
    }

    /// The CA certificate (PEM) to pass as `tls.extra_ca_file`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The tenant it accepts.
    pub fn tenant(&self) -> &FakeTenant {
        &self.state.tenant
    }

    /// Records a presence session, as setPresence would.
    pub fn set_presence(&self, user_id: &str, session_id: &str) {
        lock(&self.state.sessions).insert((
            user_id.to_ascii_lowercase(),
            session_id.to_ascii_lowercase(),
        ));
    }

    /// Whether Graph still holds the session.
    pub fn has_presence(&self, user_id: &str, session_id: &str) -> bool {
        lock(&self.state.sessions).contains(&(
            user_id.to_ascii_lowercase(),
            session_id.to_ascii_lowercase(),
        ))
    }

    /// Queues faults for the next clearPresence calls, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state.faults).extend(faults);
    }

    /// Queues token endpoint failures (statuses) for the next token requests.
    pub fn push_token_failures(&self, statuses: impl IntoIterator<Item = u16>) {
        lock(&self.state.token_faults).extend(statuses);
    }

    /// While `Some(status)`, every clearPresence gets that status (Graph is down).
    pub fn set_down(&self, status: Option<u16>) {
        *lock(&self.state.down) = status;
    }

    /// Latency added to every clearPresence answer.
    pub fn set_latency(&self, d: Duration) {
        *lock(&self.state.latency) = d;
    }

    /// Enforces a quota like Graph's: more than `requests` arrivals in any
    /// `per` get 429 with a Retry-After.
    pub fn set_quota(&self, requests: usize, per: Duration) {
        *lock(&self.state.quota) = Some(Quota {
            requests,
            per,
            arrivals: VecDeque::new(),
        });
    }

    /// Invalidates every token issued so far (the next call gets 401).
    pub fn revoke_tokens(&self) {
        lock(&self.state.tokens).clear();
    }

    /// Every clearPresence/setPresence call so far.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state.calls).clone()
    }

    /// clearPresence calls so far.
    pub fn clear_calls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.action == "clearPresence")
            .collect()
    }

    /// Token requests so far.
    pub fn token_requests(&self) -> usize {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// Graph requests being handled right now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Most Graph requests ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits until some clearPresence was answered with `status`, or `timeout` passes.
    pub async fn wait_for_answer(&self, timeout: Duration, status: u16) -> bool {
        self.wait_for(timeout, |calls| {
            calls
                .iter()
                .any(|c| c.action == "clearPresence" && c.status == status)
        })
        .await
    }

    /// Waits until `pred` holds over the recorded calls, or `timeout` passes.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Call]) -> bool) -> bool {
        let until = Instant::now() + timeout;
        loop {
            if pred(&lock(&self.state.calls)) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn tls() -> Result<(String, TlsAcceptor), FakeError> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "presence-reaper fake Graph CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca, &ca_key);
    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der())
        .map_err(|e| rustls::Error::General(e.to_owned()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![leaf_cert.der().clone()], key)?;
    Ok((ca_cert.pem(), TlsAcceptor::from(Arc::new(config))))
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<FakeState>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
            _ = stop.cancelled() => return,
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

type Answer = Response<Full<Bytes>>;

/// The service's error: hyper closes the connection without an answer.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault injected: connection dropped")
    }
}

impl std::error::Error for Dropped {}

fn json(status: u16, body: serde_json::Value) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().expect("static"),
    );
    r
}

fn graph_error(status: u16, code: &str, message: &str) -> Answer {
    json(
        status,
        serde_json::json!({"error": {"code": code, "message": message}}),
    )
}

fn with_retry_after(mut r: Answer, value: &str) -> Answer {
    if let Ok(v) = value.parse() {
        r.headers_mut().insert(hyper::header::RETRY_AFTER, v);
    }
    r
}

async fn handle(state: Arc<FakeState>, req: Request<Incoming>) -> Result<Answer, Dropped> {
    let path = req.uri().path().to_owned();
    let token_path = format!("/{}/oauth2/v2.0/token", state.tenant.tenant_id);
    if path == "/msi/token" && req.method() == hyper::Method::GET {
        return Ok(msi_token(&state, &req));
    }
    if path == token_path && req.method() == hyper::Method::POST {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Ok(token(&state, &body));
    }
    if let Some(rest) = path.strip_prefix("/v1.0/users/") {
        let mut parts = rest.split('/');
        let (Some(raw_user), Some("presence"), Some(action), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Ok(graph_error(
                400,
                "BadRequest",
                "Resource not found for the segment",
            ));
        };
        let action = action.to_owned();
        let raw_user = raw_user.to_owned();
        if req.method() != hyper::Method::POST
            || !(action == "clearPresence" || action == "setPresence")
        {
            return Ok(graph_error(
                405,
                "Request_BadRequest",
                "Unsupported method or segment",
            ));
        }
        return presence(&state, req, &path, &raw_user, &action).await;
    }
    Ok(graph_error(404, "NotFound", "no such endpoint on the fake"))
}

fn token(state: &FakeState, body: &[u8]) -> Answer {
    state.token_requests.fetch_add(1, Ordering::SeqCst);
    if let Some(status) = lock(&state.token_faults).pop_front() {
        return json(
            status,
            serde_json::json!({
                "error": "temporarily_unavailable",
                "error_description": "AADSTS50196: fake token endpoint fault.",
                "error_codes": [50196]
            }),
        );
    }
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(body).into_owned().collect();
    let t = &state.tenant;
    let get = |k: &str| form.get(k).map(String::as_str);
    if get("grant_type") != Some("client_credentials") {
        return json(
            400,
            serde_json::json!({"error": "unsupported_grant_type", "error_description": "AADSTS70003: grant type not supported.", "error_codes": [70003]}),
        );
    }
    if get("client_id") != Some(t.client_id.as_str()) {
        return json(
            400,
            serde_json::json!({"error": "unauthorized_client", "error_description": "AADSTS700016: Application not found in the directory.", "error_codes": [700016]}),
        );
    }
    let authenticated = match (get("client_secret"), get("client_assertion")) {
        (Some(secret), None) => secret == t.client_secret,
        (None, Some(assertion)) => {
            get("client_assertion_type")
                == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                && (assertion == t.federated_token
                    || is_certificate_assertion(assertion, &t.client_id))
        }
        _ => false,
    };
    if !authenticated {
        return json(
            401,
            serde_json::json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret or assertion provided.", "error_codes": [7000215]}),
        );
    }
    if get("scope") != Some(t.scope.as_str()) {
        return json(
            400,
            serde_json::json!({"error": "invalid_scope", "error_description": "AADSTS70011: The provided value for the input parameter 'scope' is not valid.", "error_codes": [70011]}),
        );
    }
    let access = format!("fake-token-{}", uuid::Uuid::new_v4());
    lock(&state.tokens).insert(access.clone());
    json(
        200,
        serde_json::json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": access}),
    )
}

/// A client assertion signed with a certificate, as Entra ID expects it: a
/// JWT naming the certificate (`x5t`/`x5t#S256`) whose issuer and subject are
/// the client id and whose audience is the token endpoint. The fake checks
/// the shape, not the signature.
fn is_certificate_assertion(jwt: &str, client_id: &str) -> bool {
    use base64::Engine;
    let decode = |part: &str| -> Option<serde_json::Value> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let mut parts = jwt.split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Some(header), Some(payload)) = (decode(h), decode(p)) else {
        return false;
    };
    (header.get("x5t").is_some() || header.get("x5t#S256").is_some())
        && header["alg"]
            .as_str()
            .is_some_and(|a| a.starts_with("RS") || a.starts_with("PS"))
        && payload["iss"] == client_id
        && payload["sub"] == client_id
        && payload["aud"]
            .as_str()
            .is_some_and(|a| a.ends_with("/oauth2/v2.0/token"))
        && !sig.is_empty()
}

/// The App Service managed identity endpoint.
fn msi_token(state: &FakeState, req: &Request<Incoming>) -> Answer {
    state.token_requests.fetch_add(1, Ordering::SeqCst);
    let t = &state.tenant;
    let header_ok = req
        .headers()
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        == Some(t.identity_header.as_str());
    if !header_ok {
        return json(
            401,
            serde_json::json!({"error": "unauthorized", "error_description": "missing or wrong x-identity-header"}),
        );
    }
    let query: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let resource = t.scope.trim_end_matches("/.default");
    if query.get("resource").map(String::as_str) != Some(resource) {
        return json(
            400,
            serde_json::json!({"error": "invalid_resource", "error_description": "unexpected resource"}),
        );
    }
    if let Some(id) = query.get("client_id")
        && id != &t.client_id
    {
        return json(
            400,
            serde_json::json!({"error": "invalid_request", "error_description": "no such user-assigned identity"}),
        );
    }
    let access = format!("fake-token-{}", uuid::Uuid::new_v4());
    lock(&state.tokens).insert(access.clone());
    let expires_on = chrono::Utc::now().timestamp() + 3600;
    json(
        200,
        serde_json::json!({"access_token": access, "expires_on": expires_on.to_string(), "token_type": "Bearer", "resource": resource}),
    )
}

struct InFlight<'a>(&'a FakeState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn presence(
    state: &FakeState,
    req: Request<Incoming>,
    path: &str,
    raw_user: &str,
    action: &str,
) -> Result<Answer, Dropped> {
    let arrived = Instant::now();
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(state);
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut call = Call {
        action: action.to_owned(),
        user_id: percent_encoding::percent_decode_str(raw_user)
            .decode_utf8_lossy()
            .into_owned(),
        raw_path: path.to_owned(),
        session_id: None,
        client_request_id: header("client-request-id"),
        user_agent: header("user-agent"),
        content_type: header("content-type"),
        status: 0,
        at: arrived,
        at_ms: chrono::Utc::now().timestamp_millis(),
    };
    let auth = header("authorization");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let answer = presence_answer(state, &mut call, auth.as_deref(), &body).await;
    call.status = answer.as_ref().map_or(0, |a| a.status().as_u16());
    if state.dev {
        tracing::info!(target: "fake_graph", action = %call.action, user_id = %call.user_id, session_id = call.session_id.as_deref().unwrap_or(""), status = call.status, "fake Graph received {}", call.action);
    }
    lock(&state.calls).push(call);
    answer
}

async fn presence_answer(
    state: &FakeState,
    call: &mut Call,
    auth: Option<&str>,
    body: &[u8],
) -> Result<Answer, Dropped> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        call.session_id = v
            .get("sessionId")
            .and_then(|s| s.as_str())
            .map(str::to_owned);
    }
    if let Some(q) = lock(&state.quota).as_mut() {
        while q.arrivals.front().is_some_and(|&a| a + q.per <= call.at) {
            q.arrivals.pop_front();
        }
        if q.arrivals.len() >= q.requests {
            let retry = q.arrivals.front().map_or(q.per, |&a| (a + q.per) - call.at);
            return Ok(with_retry_after(
                graph_error(429, "TooManyRequests", "Too many requests"),
                &format!("{:.3}", retry.as_secs_f64()),
            ));
        }
        q.arrivals.push_back(call.at);
    }
    let latency = *lock(&state.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let fault = lock(&state.faults).pop_front();
    match fault {
        Some(Fault::Drop) => return Err(Dropped),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Stall(d)) => {
            tokio::time::sleep(d).await;
            return Ok(graph_error(504, "GatewayTimeout", "stalled (fake)"));
        }
        Some(Fault::Status(s)) => return Ok(graph_error(s, "fakeFault", &format!("injected {s}"))),
        Some(Fault::Throttle(ra)) => {
            return Ok(with_retry_after(
                graph_error(429, "TooManyRequests", "Too many requests"),
                &ra,
            ));
        }
        Some(Fault::ThrottleBare) => {
            return Ok(graph_error(429, "TooManyRequests", "Too many requests"));
        }
        Some(Fault::Unavailable(ra)) => {
            return Ok(with_retry_after(
                graph_error(503, "serviceUnavailable", "Service unavailable"),
                &ra,
            ));
        }
        Some(Fault::Unauthorized) => {
            return Ok(graph_error(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid.",
            ));
        }
        None => {}
    }
    if let Some(s) = *lock(&state.down) {
        return Ok(graph_error(s, "serviceUnavailable", "Graph is down (fake)"));
    }
    let token = auth.and_then(|a| a.strip_prefix("Bearer "));
    if !token.is_some_and(|t| lock(&state.tokens).contains(t)) {
        return Ok(graph_error(
            401,
            "InvalidAuthenticationToken",
            "Access token validation failure.",
        ));
    }
    if !call
        .content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/json"))
    {
        return Ok(graph_error(
            415,
            "UnsupportedMediaType",
            "Content-Type must be application/json",
        ));
    }
    // The user id must be a plain path segment: no traversal, no query bent in.
    if crate::ids::UserId::parse(&call.user_id).is_err() {
        return Ok(graph_error(
            400,
            "Request_BadRequest",
            "Invalid object identifier",
        ));
    }
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return Ok(graph_error(
            400,
            "BadRequest",
            "Unable to read JSON request payload.",
        ));
    };
    let session = match obj.get("sessionId").and_then(|v| v.as_str()) {
        Some(s) if crate::ids::is_guid(s) => s.to_ascii_lowercase(),
        _ => return Ok(graph_error(400, "BadRequest", "sessionId must be a GUID")),
    };
    let key = (call.user_id.to_ascii_lowercase(), session);
    if call.action == "setPresence" {
        lock(&state.sessions).insert(key);
        return Ok(json(200, serde_json::json!({})));
    }
    if obj.len() != 1 {
        return Ok(graph_error(
            400,
            "BadRequest",
            "clearPresence takes only sessionId",
        ));
    }
    if lock(&state.sessions).remove(&key) || state.dev {
        Ok(json(200, serde_json::json!({})))
    } else {
        Ok(graph_error(
            404,
            "NotFound",
            "The presence session was not found.",
        ))
    }
}
