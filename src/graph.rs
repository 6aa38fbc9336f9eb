//! The Graph side: the shared HTTP client, app tokens through
//! `azure_identity`, the clearPresence request and the classification of
//! every answer.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::SecretBytes;
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_identity::{
    ClientAssertionCredentialOptions, ClientCertificateCredential,
    ClientCertificateCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use url::Url;

use crate::config::{Config, CredentialKind, Secret};
use crate::ids::{SessionId, UserId};

/// The `User-Agent` sent with every request.
pub const USER_AGENT: &str = concat!("presence-reaper/", env!("CARGO_PKG_VERSION"));

/// Errors building the Graph client.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `tls.extra_ca_file` could not be used.
    #[error("tls.extra_ca_file: {0}")]
    Ca(String),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The credential could not be built.
    #[error("auth: cannot build the credential: {0}")]
    Credential(String),
}

/// The one HTTP client, shared by Graph calls and `azure_identity`.
pub fn http_client(config: &Config) -> Result<reqwest::Client, BuildError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(config.graph.request_timeout.0)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(config.graph.max_in_flight.max(8));
    if let Some(path) = &config.tls.extra_ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| BuildError::Ca(format!("cannot read {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| BuildError::Ca(format!("{}: {e}", path.display())))?;
        builder = builder.tls_certs_merge(certs);
    }
    Ok(builder.build()?)
}

type CredentialFactory = Box<dyn Fn() -> Result<Arc<dyn TokenCredential>, String> + Send + Sync>;

/// App tokens, cached by `azure_identity` and renewed before they expire.
///
/// `azure_identity`'s cache has no invalidation call, so a token that Graph
/// rejects with 401 is dropped by building a fresh credential.
pub struct TokenProvider {
    factory: CredentialFactory,
    current: Mutex<(u64, Arc<dyn TokenCredential>)>,
    scope: String,
    /// The last token handed out, to tell a fetched token from a cached one.
    last: Mutex<Option<Secret>>,
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenProvider")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// An access token and the credential generation that issued it.
#[derive(Debug, Clone)]
pub struct Token {
    generation: u64,
    value: Secret,
    /// True if Entra ID issued it just now (not from the cache).
    pub fresh: bool,
}

impl TokenProvider {
    /// Tokens for the configured app and credential, through `http`.
    pub fn from_config(config: &Config, http: reqwest::Client) -> Result<Self, BuildError> {
        let auth = config.auth.clone();
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = auth
            .authority_host
            .as_str()
            .trim_end_matches('/')
            .to_owned();
        let cloud = Arc::new(CloudConfiguration::from(cloud));
        let transport = Transport::new(Arc::new(http));
        let client_options = move || ClientOptions {
            transport: Some(transport.clone()),
            cloud: Some(cloud.clone()),
            // Retries are the scheduler's job: it knows about backoff,
            // pauses and shutdown deadlines.
            retry: RetryOptions::none(),
            ..Default::default()
        };
        let tenant = auth.tenant_id.clone().unwrap_or_default();
        let factory: CredentialFactory = match auth.credential {
            CredentialKind::ClientSecret => {
                let secret = auth
                    .client_secret
                    .clone()
                    .ok_or_else(|| BuildError::Credential("no client secret".into()))?;
                Box::new(move || {
                    let credential: Arc<dyn TokenCredential> = ClientSecretCredential::new(
                        &tenant,
                        auth.client_id.clone(),
                        azure_core::credentials::Secret::new(secret.expose().to_owned()),
                        Some(ClientSecretCredentialOptions {
                            client_options: client_options(),
                        }),
                    )
                    .map_err(|e| e.to_string())?;
                    Ok(credential)
                })
            }
            CredentialKind::ClientCertificate => {
                let path = auth.client_certificate_file.clone().ok_or_else(|| {
                    BuildError::Credential("auth.client_certificate_file is not set".into())
                })?;
                let der = std::fs::read(&path).map_err(|e| {
                    BuildError::Credential(format!(
                        "auth.client_certificate_file: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                let password = auth.client_certificate_password.clone();
                Box::new(move || {
                    let credential: Arc<dyn TokenCredential> = ClientCertificateCredential::new(
                        tenant.clone(),
                        auth.client_id.clone(),
                        SecretBytes::new(der.clone()),
                        Some(ClientCertificateCredentialOptions {
                            client_options: client_options(),
                            password: password.as_ref().map(|p| {
                                azure_core::credentials::Secret::new(p.expose().to_owned())
                            }),
                        }),
                    )
                    .map_err(|e| format!("auth.client_certificate_file {}: {e}", path.display()))?;
                    Ok(credential)
                })
            }
            CredentialKind::WorkloadIdentity => Box::new(move || {
                let credential: Arc<dyn TokenCredential> =
                    WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                        credential_options: ClientAssertionCredentialOptions {
                            client_options: client_options(),
                        },
                        client_id: Some(auth.client_id.clone()),
                        tenant_id: Some(tenant.clone()),
                        token_file_path: auth.federated_token_file.clone(),
                    }))
                    .map_err(|e| e.to_string())?;
                Ok(credential)
            }),
            CredentialKind::ManagedIdentity => Box::new(move || {
                let credential: Arc<dyn TokenCredential> =
                    ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                        user_assigned_id: auth
                            .user_assigned_identity
                            .then(|| UserAssignedId::ClientId(auth.client_id.clone())),
                        client_options: client_options(),
                    }))
                    .map_err(|e| e.to_string())?;
                Ok(credential)
            }),
        };
        Self::new(factory, config.graph.scope.clone())
    }

    fn new(factory: CredentialFactory, scope: String) -> Result<Self, BuildError> {
        let first = factory().map_err(BuildError::Credential)?;
        Ok(Self {
            factory,
            current: Mutex::new((0, first)),
            scope,
            last: Mutex::new(None),
        })
    }

    /// A valid token (cached unless it is near expiry).
    pub async fn token(&self) -> Result<Token, String> {
        let (generation, credential) = {
            let cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            (cur.0, cur.1.clone())
        };
        let token = credential
            .get_token(&[self.scope.as_str()], None)
            .await
            .map_err(|e| format!("token request failed: {}", first_line(&e.to_string())))?;
        let value = Secret::new(token.token.secret().to_owned());
        let fresh = {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            let fresh = last.as_ref() != Some(&value);
            if fresh {
                *last = Some(value.clone());
            }
            fresh
        };
        Ok(Token {
            generation,
            value,
            fresh,
        })
    }

    /// Drops the cached token that `rejected` came from, unless that already happened.
    pub fn invalidate(&self, rejected: &Token) {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if cur.0 != rejected.generation {
            return;
        }
        match (self.factory)() {
            Ok(fresh) => *cur = (cur.0 + 1, fresh),
            Err(e) => tracing::warn!(error = %e, "cannot rebuild the credential after a 401"),
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// How Graph answered one clearPresence request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 2xx.
    Cleared,
    /// 404: Graph has no such session.
    Dropped,
    /// 401: the token was refused.
    Unauthorized(String),
    /// 429, 5xx, a timeout or a connection error.
    Retry {
        /// `Retry-After`, if Graph sent one.
        after: Option<Duration>,
        /// True for 429: every Graph call pauses.
        throttled: bool,
        /// For `last_error`.
        error: String,
        /// The HTTP status, if an answer arrived.
        status: Option<u16>,
    },
    /// 400, 403 and other 4xx: permanent.
    Failed {
        /// For `last_error`.
        error: String,
        /// The HTTP status.
        status: u16,
    },
}

impl Answer {
    /// The HTTP status class for metrics (`2xx`, `4xx`, `5xx`, `error`).
    pub fn status_class(&self) -> &'static str {
        match self {
            Answer::Cleared => "2xx",
            Answer::Dropped | Answer::Unauthorized(_) => "4xx",
            Answer::Failed { .. } => "4xx",
            Answer::Retry {
                status: Some(429), ..
            } => "4xx",
            Answer::Retry {
                status: Some(_), ..
            } => "5xx",
            Answer::Retry { status: None, .. } => "error",
        }
    }
}

/// Parses `Retry-After`: seconds (possibly fractional, e.g. `2.128`) or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Graph's error body, `{"error": {"code": "...", "message": "..."}}`.
#[derive(serde::Deserialize)]
struct GraphError {
    error: GraphErrorInner,
}

#[derive(serde::Deserialize)]
struct GraphErrorInner {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// `"<status> <code>: <message>"` from an error answer.
pub fn describe_error(status: u16, body: &[u8]) -> String {
    match serde_json::from_slice::<GraphError>(body) {
        Ok(GraphError { error: e }) => {
            format!("{status} {}: {}", e.code, truncate(&e.message, 300))
        }
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let reason = StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error");
            format!("{status} {reason}: {}", truncate(text.trim(), 300))
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Classifies an answer from its status, headers and body: the one place
/// where SPEC's outcome table lives.
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Answer {
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now));
    match status {
        200..=299 => Answer::Cleared,
        404 => Answer::Dropped,
        401 => Answer::Unauthorized(describe_error(status, body)),
        429 | 500..=599 => Answer::Retry {
            after: retry_after,
            throttled: status == 429,
            error: describe_error(status, body),
            status: Some(status),
        },
        _ => Answer::Failed {
            error: describe_error(status, body),
            status,
        },
    }
}

/// The clearPresence client.
pub struct GraphClient {
    http: reqwest::Client,
    base: Url,
    timeout: Duration,
    tokens: TokenProvider,
}

impl std::fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphClient")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl GraphClient {
    /// A client for `config`'s Graph, sharing `http` with the token provider.
    pub fn from_config(config: &Config) -> Result<Self, BuildError> {
        let http = http_client(config)?;
        let tokens = TokenProvider::from_config(config, http.clone())?;
        Ok(Self {
            http,
            base: config.graph.base_url.clone(),
            timeout: config.graph.request_timeout.0,
            tokens,
        })
    }

    /// The token provider.
    pub fn tokens(&self) -> &TokenProvider {
        &self.tokens
    }

    /// `{base}/users/{user}/presence/clearPresence`, the user id one
    /// percent-encoded path segment.
    pub fn clear_url(&self, user: &UserId) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("base URL validated as a base at load")
            .pop_if_empty()
            .push("users")
            .push(user.as_str())
            .push("presence")
            .push("clearPresence");
        url
    }

    /// Sends one clearPresence request with `token` and classifies the answer.
    pub async fn send_clear(&self, user: &UserId, session: &SessionId, token: &Token) -> Answer {
        let request_id = uuid::Uuid::new_v4();
        let url = self.clear_url(user);
        let body = serde_json::json!({ "sessionId": session.as_str() }).to_string();
        tracing::debug!(%request_id, user_id = %user, session_id = %session, "clearPresence");
        let result = self
            .http
            .post(url)
            .timeout(self.timeout)
            .bearer_auth(token.value.expose())
            .header("client-request-id", request_id.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let response = match result {
            Ok(r) => r,
            Err(e) => return transport_error(&e, self.timeout),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) if (200..300).contains(&status) || status == 404 => {
                // The status is what counts; a body cut short changes nothing.
                tracing::debug!(%request_id, error = %e, "answer body unreadable");
                Default::default()
            }
            Err(e) => return transport_error(&e, self.timeout),
        };
        let answer = classify(status, &headers, &body, SystemTime::now());
        tracing::debug!(%request_id, user_id = %user, status, "clearPresence answered");
        answer
    }
}

fn transport_error(e: &reqwest::Error, timeout: Duration) -> Answer {
    let error = if e.is_timeout() {
        format!(
            "timeout: no answer within {}",
            humantime::format_duration(timeout)
        )
    } else if e.is_connect() {
        format!("connection error: {}", error_chain(e))
    } else {
        format!("request error: {}", error_chain(e))
    };
    Answer::Retry {
        after: None,
        throttled: false,
        error,
        status: None,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(retry_after: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn outcome_table() {
        let now = SystemTime::now();
        let err = br#"{"error":{"code":"Forbidden","message":"Insufficient privileges"}}"#;
        assert_eq!(classify(200, &headers(None), b"", now), Answer::Cleared);
        assert_eq!(classify(204, &headers(None), b"", now), Answer::Cleared);
        assert_eq!(classify(404, &headers(None), b"", now), Answer::Dropped);
        assert!(matches!(
            classify(401, &headers(None), b"", now),
            Answer::Unauthorized(_)
        ));
        assert_eq!(
            classify(403, &headers(None), err, now),
            Answer::Failed {
                error: "403 Forbidden: Insufficient privileges".into(),
                status: 403
            }
        );
        assert!(matches!(
            classify(400, &headers(None), b"", now),
            Answer::Failed { status: 400, .. }
        ));
        assert!(matches!(
            classify(409, &headers(None), b"", now),
            Answer::Failed { status: 409, .. }
        ));
        assert_eq!(
            classify(429, &headers(Some("2.128")), b"", now),
            Answer::Retry {
                after: Some(Duration::from_millis(2128)),
                throttled: true,
                error: "429 Too Many Requests: ".into(),
                status: Some(429),
            }
        );
        assert!(matches!(
            classify(503, &headers(Some("7")), b"", now),
            Answer::Retry { after: Some(d), throttled: false, .. } if d == Duration::from_secs(7)
        ));
    }

    #[test]
    fn retry_after_reads_seconds_fractions_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after(" 2.128 ", now),
            Some(Duration::from_millis(2128))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(42)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(42));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn errors_without_graph_json_still_read_well() {
        assert_eq!(
            describe_error(502, b"<html>bad gateway</html>"),
            "502 Bad Gateway: <html>bad gateway</html>"
        );
    }
}
