//! Typed configuration: parsing `config.toml`, environment fallbacks,
//! validation, and secrets that never print.
//!
//! [`Config::load`] is the only way in. It reads the file (if any), applies
//! SPEC's defaults and environment fallbacks, validates every key once, and
//! returns a [`ConfigError`] that names the offending key.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};
use url::Url;

/// A configuration problem: the key it concerns and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// Dotted key (`graph.cloud`), or the file for problems reading it.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// A secret value. `Debug`, `Display` and `Serialize` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is handed to its consumer.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// The process environment, passed in so that tests need not mutate it.
#[derive(Debug, Clone, Default)]
pub struct Environment(HashMap<String, String>);

impl Environment {
    /// Snapshot of the real process environment.
    pub fn from_process() -> Self {
        Self(std::env::vars().collect())
    }
    /// An environment with just these variables.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }
    /// Sets `name` unless it already has a value.
    pub fn set_default(&mut self, name: &str, value: &str) {
        if self.var(name).is_none() {
            self.0.insert(name.to_owned(), value.to_owned());
        }
    }

    /// A variable's value, treating an empty one as unset.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// A duration written like `"90s"`, `"5m"` or `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration like \"90s\", \"5m\" or \"1h 30m\" ({e})"
            ))
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// The national cloud whose Graph and authority the daemon talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cloud {
    /// graph.microsoft.com
    Global,
    /// graph.microsoft.us (GCC High)
    UsgovL4,
    /// dod-graph.microsoft.us
    UsgovDod,
}

impl Cloud {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "global" => Ok(Self::Global),
            "usgov-l4" => Ok(Self::UsgovL4),
            "usgov-dod" => Ok(Self::UsgovDod),
            "china" => Err("\"china\": clearPresence is not available in the China (21Vianet) cloud, so presence-reaper cannot run there".into()),
            other => Err(format!(
                "{other:?} is not a cloud; use \"global\", \"usgov-l4\" or \"usgov-dod\""
            )),
        }
    }

    /// Graph's root for this cloud, without version.
    pub fn graph_root(self) -> &'static str {
        match self {
            Self::Global => "https://graph.microsoft.com",
            Self::UsgovL4 => "https://graph.microsoft.us",
            Self::UsgovDod => "https://dod-graph.microsoft.us",
        }
    }

    /// The Entra ID authority host for this cloud.
    pub fn authority_host(self) -> &'static str {
        match self {
            Self::Global => "https://login.microsoftonline.com",
            Self::UsgovL4 | Self::UsgovDod => "https://login.microsoftonline.us",
        }
    }
}

/// How the daemon gets its app token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// Client credentials with a client secret.
    ClientSecret,
    /// Client credentials with a certificate.
    ClientCertificate,
    /// Azure managed identity.
    ManagedIdentity,
    /// Kubernetes workload identity (federated token file).
    WorkloadIdentity,
}

/// SQLite's `synchronous` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// `synchronous = FULL`: acknowledged writes survive power loss.
    Full,
    /// `synchronous = NORMAL`: acknowledged writes survive a crash of the process.
    Normal,
}

/// Which clock cron expressions are read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Timezone {
    /// Coordinated Universal Time.
    #[serde(rename = "UTC")]
    Utc,
    /// The host's local time zone.
    #[serde(rename = "local")]
    Local,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
    /// The systemd journal.
    Journald,
}

/// Where the API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for Listen {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || !path.starts_with('/') {
                return Err(format!("{s:?}: a Unix socket path must be absolute"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(Self::Tcp).map_err(|_| {
            format!(
                "{s:?} is neither host:port (e.g. \"127.0.0.1:7740\") nor \"unix:/path/api.sock\""
            )
        })
    }
}

// ---------------------------------------------------------------------------
// The file as written: every key optional, unknown keys refused.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    graph: FileGraph,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    store: FileStore,
    #[serde(default)]
    sessions: FileSessions,
    #[serde(default)]
    schedule: FileSchedule,
    #[serde(default)]
    retry: FileRetry,
    #[serde(default)]
    shutdown: FileShutdown,
    #[serde(default)]
    api: FileApi,
    #[serde(default)]
    log: FileLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGraph {
    cloud: Option<String>,
    base_url: Option<String>,
    scope: Option<String>,
    request_timeout: Option<Dur>,
    max_in_flight: Option<i64>,
    rate_limit: Option<FileRateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRateLimit {
    requests: Option<i64>,
    per: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    tenant_id: Option<String>,
    client_id: Option<String>,
    credential: Option<CredentialKind>,
    client_secret_file: Option<PathBuf>,
    client_certificate_file: Option<PathBuf>,
    client_certificate_password_file: Option<PathBuf>,
    federated_token_file: Option<PathBuf>,
    user_assigned_identity: Option<bool>,
    authority_host: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    extra_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    path: Option<PathBuf>,
    durability: Option<Durability>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSessions {
    default_ttl: Option<Dur>,
    max_ttl: Option<Dur>,
    retention: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchedule {
    sweep: Option<String>,
    clear_all: Option<Vec<String>>,
    timezone: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetry {
    max_attempts: Option<i64>,
    initial_backoff: Option<Dur>,
    max_backoff: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShutdown {
    clear_on_shutdown: Option<bool>,
    deadline: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApi {
    listen: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

// ---------------------------------------------------------------------------
// The resolved configuration.

/// Everything the daemon needs, validated and with defaults applied.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Graph endpoint and pacing.
    pub graph: GraphConfig,
    /// The app registration and its credential.
    pub auth: AuthConfig,
    /// Extra trust roots.
    pub tls: TlsConfig,
    /// The SQLite store.
    pub store: StoreConfig,
    /// Session lifetimes.
    pub sessions: SessionsConfig,
    /// Cron schedules.
    pub schedule: ScheduleConfig,
    /// Retry policy for clears.
    pub retry: RetryConfig,
    /// What happens on SIGTERM.
    pub shutdown: ShutdownConfig,
    /// The local HTTP API.
    pub api: ApiConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[graph]`
#[derive(Debug, Clone, Serialize)]
pub struct GraphConfig {
    /// National cloud.
    pub cloud: Cloud,
    /// Graph root including version, e.g. `https://graph.microsoft.com/v1.0`.
    pub base_url: Url,
    /// Token scope.
    pub scope: String,
    /// Per-request timeout.
    pub request_timeout: Dur,
    /// Concurrent Graph requests.
    pub max_in_flight: usize,
    /// Sliding-window quota.
    pub rate_limit: RateLimitConfig,
}

/// `graph.rate_limit`
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RateLimitConfig {
    /// Requests allowed in any window.
    pub requests: usize,
    /// The window.
    pub per: Dur,
}

/// `[auth]`
#[derive(Debug, Clone, Serialize)]
pub struct AuthConfig {
    /// Directory (tenant) id (a managed identity may leave it out).
    pub tenant_id: Option<String>,
    /// Application (client) id; also the default presence session id.
    pub client_id: String,
    /// Credential type.
    pub credential: CredentialKind,
    /// File the secret was read from, if any.
    pub client_secret_file: Option<PathBuf>,
    /// The client secret (printed redacted).
    pub client_secret: Option<Secret>,
    /// PKCS#12 file with the certificate and its RSA key (`client_certificate`).
    pub client_certificate_file: Option<PathBuf>,
    /// The PKCS#12 file's password (printed redacted).
    pub client_certificate_password: Option<Secret>,
    /// Kubernetes service account token file (`workload_identity`).
    pub federated_token_file: Option<PathBuf>,
    /// `managed_identity`: use the user-assigned identity whose client id is
    /// `client_id` rather than the system-assigned one.
    pub user_assigned_identity: bool,
    /// Entra ID authority host.
    pub authority_host: Url,
}

/// `[tls]`
#[derive(Debug, Clone, Serialize)]
pub struct TlsConfig {
    /// PEM roots trusted in addition to the system's.
    pub extra_ca_file: Option<PathBuf>,
}

/// `[store]`
#[derive(Debug, Clone, Serialize)]
pub struct StoreConfig {
    /// SQLite file.
    pub path: PathBuf,
    /// SQLite `synchronous`.
    pub durability: Durability,
}

/// `[sessions]`
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SessionsConfig {
    /// TTL when a PUT names none.
    pub default_ttl: Dur,
    /// Longest TTL accepted.
    pub max_ttl: Dur,
    /// How long terminal records are kept.
    pub retention: Dur,
}

/// `[schedule]`
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleConfig {
    /// Sweep cron expression.
    pub sweep: String,
    /// Cron expressions at which every session is cleared.
    pub clear_all: Vec<String>,
    /// Clock the expressions are read in.
    pub timezone: Timezone,
}

/// `[retry]`
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RetryConfig {
    /// Attempts before a session is `failed`.
    pub max_attempts: u32,
    /// First backoff.
    pub initial_backoff: Dur,
    /// Backoff cap.
    pub max_backoff: Dur,
}

/// `[shutdown]`
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ShutdownConfig {
    /// Clear every live session on SIGTERM/SIGINT.
    pub clear_on_shutdown: bool,
    /// How long the shutdown drain may take.
    pub deadline: Dur,
}

/// `[api]`
#[derive(Debug, Clone, Serialize)]
pub struct ApiConfig {
    /// Listen address.
    pub listen: Listen,
    /// File the bearer token was read from, if any.
    pub token_file: Option<PathBuf>,
    /// The bearer token (printed redacted).
    pub token: Option<Secret>,
}

/// `[log]`
#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `presence_reaper=debug`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// Parses a cron expression the way the scheduler will read it.
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, String> {
    cron::Schedule::from_str(expr).map_err(|e| {
        format!("{expr:?} is not a cron expression with a seconds field first, like \"0 * * * * *\" ({e})")
    })
}

fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    let value = raw.trim_end_matches(['\n', '\r']);
    if value.trim().is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret::new(value))
}

fn kind_name(kind: CredentialKind) -> &'static str {
    match kind {
        CredentialKind::ClientSecret => "client_secret",
        CredentialKind::ClientCertificate => "client_certificate",
        CredentialKind::ManagedIdentity => "managed_identity",
        CredentialKind::WorkloadIdentity => "workload_identity",
    }
}

fn positive(key: &str, v: i64, max: i64) -> Result<i64, ConfigError> {
    if (1..=max).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::new(
            key,
            format!("{v} is out of range; use 1 to {max}"),
        ))
    }
}

fn nonzero(key: &str, d: Dur) -> Result<Dur, ConfigError> {
    if d.0.is_zero() {
        Err(ConfigError::new(key, "must be longer than zero"))
    } else {
        Ok(d)
    }
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 256
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn resolve_api(api: FileApi) -> Result<ApiConfig, ConfigError> {
    let listen = api
        .listen
        .as_deref()
        .unwrap_or("127.0.0.1:7740")
        .parse::<Listen>()
        .map_err(|p| ConfigError::new("api.listen", p))?;
    let token = match &api.token_file {
        Some(p) => Some(read_secret_file("api.token_file", p)?),
        None => None,
    };
    Ok(ApiConfig {
        listen,
        token_file: api.token_file,
        token,
    })
}

impl Config {
    /// Loads just `[api]` from `path`, for the commands that talk to a
    /// running daemon: they need its address and token, not its credentials.
    /// The rest of the file must still parse (unknown keys are errors).
    pub fn load_api(path: Option<&Path>) -> Result<ApiConfig, ConfigError> {
        let file = match path {
            None => FileConfig::default(),
            Some(p) => Self::read_file(p)?,
        };
        resolve_api(file.api)
    }

    fn read_file(p: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(p).map_err(|e| {
            ConfigError::new(
                p.display().to_string(),
                format!("cannot read config file: {e}"),
            )
        })?;
        Self::parse_file(&text).map_err(|mut e| {
            if e.key.is_empty() {
                e.key = p.display().to_string();
            }
            e
        })
    }

    /// Loads the config from `path` (or none: defaults and environment only).
    pub fn load(path: Option<&Path>, env: &Environment) -> Result<Self, ConfigError> {
        let file = match path {
            None => FileConfig::default(),
            Some(p) => Self::read_file(p)?,
        };
        Self::resolve(file, env)
    }

    /// Parses and validates config text (no file involved).
    pub fn from_toml(text: &str, env: &Environment) -> Result<Self, ConfigError> {
        Self::resolve(Self::parse_file(text)?, env)
    }

    fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new("", format!("not valid TOML: {}", e.message())))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::new(
                if key == "." { String::new() } else { key },
                inner.message().to_owned(),
            )
        })
    }

    fn resolve(f: FileConfig, env: &Environment) -> Result<Self, ConfigError> {
        // graph
        let cloud = match f.graph.cloud.as_deref() {
            None => Cloud::Global,
            Some(s) => Cloud::parse(s).map_err(|p| ConfigError::new("graph.cloud", p))?,
        };
        let base_url = match f.graph.base_url.as_deref() {
            None => Url::parse(&format!("{}/v1.0", cloud.graph_root())).expect("static URL"),
            Some(s) => {
                let url = Url::parse(s)
                    .map_err(|e| ConfigError::new("graph.base_url", format!("{s:?}: {e}")))?;
                let ok =
                    url.scheme() == "https" || (url.scheme() == "http" && is_loopback_host(&url));
                if !ok {
                    return Err(ConfigError::new(
                        "graph.base_url",
                        format!("{s:?} must use https (http is allowed only on a loopback host)"),
                    ));
                }
                if url.query().is_some() || url.fragment().is_some() || url.cannot_be_a_base() {
                    return Err(ConfigError::new(
                        "graph.base_url",
                        format!("{s:?} must be a plain base URL without query or fragment"),
                    ));
                }
                url
            }
        };
        let scope = match f.graph.scope {
            None => format!("{}/.default", cloud.graph_root()),
            Some(s) if s.trim().is_empty() || s.chars().any(char::is_whitespace) => {
                return Err(ConfigError::new(
                    "graph.scope",
                    "must be one non-empty scope",
                ));
            }
            Some(s) => s,
        };
        let request_timeout = nonzero(
            "graph.request_timeout",
            f.graph
                .request_timeout
                .unwrap_or(Dur(Duration::from_secs(10))),
        )?;
        let max_in_flight = positive(
            "graph.max_in_flight",
            f.graph.max_in_flight.unwrap_or(16),
            1024,
        )? as usize;
        let rate_limit = match f.graph.rate_limit {
            None => RateLimitConfig {
                requests: 1500,
                per: Dur(Duration::from_secs(30)),
            },
            Some(r) => RateLimitConfig {
                requests: positive(
                    "graph.rate_limit.requests",
                    r.requests.unwrap_or(1500),
                    10_000_000,
                )? as usize,
                per: nonzero(
                    "graph.rate_limit.per",
                    r.per.unwrap_or(Dur(Duration::from_secs(30))),
                )?,
            },
        };

        // auth
        let credential = f.auth.credential.unwrap_or(CredentialKind::ClientSecret);
        let tenant_id = f
            .auth
            .tenant_id
            .or_else(|| env.var("AZURE_TENANT_ID").map(str::to_owned));
        // A managed identity knows its tenant; every other credential names it.
        if tenant_id.is_none() && credential != CredentialKind::ManagedIdentity {
            return Err(ConfigError::new(
                "auth.tenant_id",
                "is required (or set AZURE_TENANT_ID)",
            ));
        }
        if let Some(t) = &tenant_id
            && !valid_tenant(t)
        {
            return Err(ConfigError::new(
                "auth.tenant_id",
                format!(
                    "{t:?} is not a tenant id (a GUID or a domain such as contoso.onmicrosoft.com)"
                ),
            ));
        }
        let client_id = f
            .auth
            .client_id
            .or_else(|| env.var("AZURE_CLIENT_ID").map(str::to_owned))
            .ok_or_else(|| {
                ConfigError::new("auth.client_id", "is required (or set AZURE_CLIENT_ID)")
            })?;
        if !crate::ids::is_guid(&client_id) {
            return Err(ConfigError::new(
                "auth.client_id",
                format!(
                    "{client_id:?} is not a GUID (the app registration's Application (client) ID)"
                ),
            ));
        }
        let client_id = client_id.to_ascii_lowercase();
        // Keys that belong to another credential are mistakes worth naming.
        for (key, set, kind) in [
            (
                "auth.client_secret_file",
                f.auth.client_secret_file.is_some(),
                CredentialKind::ClientSecret,
            ),
            (
                "auth.client_certificate_file",
                f.auth.client_certificate_file.is_some(),
                CredentialKind::ClientCertificate,
            ),
            (
                "auth.client_certificate_password_file",
                f.auth.client_certificate_password_file.is_some(),
                CredentialKind::ClientCertificate,
            ),
            (
                "auth.federated_token_file",
                f.auth.federated_token_file.is_some(),
                CredentialKind::WorkloadIdentity,
            ),
            (
                "auth.user_assigned_identity",
                f.auth.user_assigned_identity.is_some(),
                CredentialKind::ManagedIdentity,
            ),
        ] {
            if set && credential != kind {
                return Err(ConfigError::new(
                    key,
                    format!("is only used with auth.credential = {:?}", kind_name(kind)),
                ));
            }
        }
        let client_secret = if credential != CredentialKind::ClientSecret {
            None
        } else if let Some(p) = &f.auth.client_secret_file {
            Some(read_secret_file("auth.client_secret_file", p)?)
        } else if let Some(dir) = env.var("CREDENTIALS_DIRECTORY")
            && Path::new(dir).join("client-secret").exists()
        {
            Some(read_secret_file(
                "auth.client_secret_file",
                &Path::new(dir).join("client-secret"),
            )?)
        } else {
            env.var("AZURE_CLIENT_SECRET").map(Secret::new)
        };
        if credential == CredentialKind::ClientSecret && client_secret.is_none() {
            return Err(ConfigError::new(
                "auth.client_secret_file",
                "auth.credential = \"client_secret\" needs a secret: set auth.client_secret_file, \
                 a systemd credential named client-secret, or AZURE_CLIENT_SECRET",
            ));
        }
        let client_certificate_file = match (credential, &f.auth.client_certificate_file) {
            (CredentialKind::ClientCertificate, None) => {
                return Err(ConfigError::new(
                    "auth.client_certificate_file",
                    "auth.credential = \"client_certificate\" needs a PKCS#12 (.pfx) file \
                     holding the certificate and its RSA private key",
                ));
            }
            (_, Some(p)) => {
                std::fs::File::open(p).map_err(|e| {
                    ConfigError::new(
                        "auth.client_certificate_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                Some(p.clone())
            }
            (_, None) => None,
        };
        let client_certificate_password = match &f.auth.client_certificate_password_file {
            Some(p) => Some(read_secret_file(
                "auth.client_certificate_password_file",
                p,
            )?),
            None => None,
        };
        let federated_token_file = if credential == CredentialKind::WorkloadIdentity {
            let p = f
                .auth
                .federated_token_file
                .clone()
                .or_else(|| env.var("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from))
                .ok_or_else(|| {
                    ConfigError::new(
                        "auth.federated_token_file",
                        "auth.credential = \"workload_identity\" needs the service account \
                         token file (or AZURE_FEDERATED_TOKEN_FILE, set by the workload identity webhook)",
                    )
                })?;
            std::fs::File::open(&p).map_err(|e| {
                ConfigError::new(
                    "auth.federated_token_file",
                    format!("cannot read {}: {e}", p.display()),
                )
            })?;
            Some(p)
        } else {
            None
        };
        let authority_host = match f.auth.authority_host.as_deref() {
            None => Url::parse(cloud.authority_host()).expect("static URL"),
            Some(s) => {
                let url = Url::parse(s)
                    .map_err(|e| ConfigError::new("auth.authority_host", format!("{s:?}: {e}")))?;
                if url.scheme() != "https" {
                    return Err(ConfigError::new(
                        "auth.authority_host",
                        format!("{s:?} must use https"),
                    ));
                }
                url
            }
        };

        // tls
        if let Some(p) = &f.tls.extra_ca_file {
            let pem = std::fs::read(p).map_err(|e| {
                ConfigError::new(
                    "tls.extra_ca_file",
                    format!("cannot read {}: {e}", p.display()),
                )
            })?;
            match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => {}
                _ => {
                    return Err(ConfigError::new(
                        "tls.extra_ca_file",
                        format!("{} holds no PEM certificate", p.display()),
                    ));
                }
            }
        }

        // store
        let path = f
            .store
            .path
            .unwrap_or_else(|| match env.var("STATE_DIRECTORY") {
                // systemd may pass several directories separated by ':'; the first is ours.
                Some(dirs) => Path::new(dirs.split(':').next().unwrap_or(dirs)).join("sessions.db"),
                None => PathBuf::from("sessions.db"),
            });
        if path.as_os_str().is_empty() {
            return Err(ConfigError::new("store.path", "must not be empty"));
        }

        // sessions
        let default_ttl = nonzero(
            "sessions.default_ttl",
            f.sessions
                .default_ttl
                .unwrap_or(Dur(Duration::from_secs(300))),
        )?;
        let max_ttl = nonzero(
            "sessions.max_ttl",
            f.sessions
                .max_ttl
                .unwrap_or(Dur(Duration::from_secs(24 * 3600))),
        )?;
        if default_ttl > max_ttl {
            return Err(ConfigError::new(
                "sessions.default_ttl",
                "must not be longer than sessions.max_ttl",
            ));
        }
        if max_ttl.0 > Duration::from_secs(366 * 24 * 3600) {
            return Err(ConfigError::new(
                "sessions.max_ttl",
                "must be at most a year",
            ));
        }
        let retention = f
            .sessions
            .retention
            .unwrap_or(Dur(Duration::from_secs(24 * 3600)));

        // schedule
        let sweep = f.schedule.sweep.unwrap_or_else(|| "0 * * * * *".to_owned());
        parse_cron(&sweep).map_err(|p| ConfigError::new("schedule.sweep", p))?;
        let clear_all = f.schedule.clear_all.unwrap_or_default();
        for (i, expr) in clear_all.iter().enumerate() {
            parse_cron(expr)
                .map_err(|p| ConfigError::new(format!("schedule.clear_all[{i}]"), p))?;
        }
        let timezone = match f.schedule.timezone.as_deref() {
            None | Some("UTC") | Some("utc") => Timezone::Utc,
            Some("local") => Timezone::Local,
            Some(other) => {
                return Err(ConfigError::new(
                    "schedule.timezone",
                    format!("{other:?}: use \"UTC\" or \"local\""),
                ));
            }
        };

        // retry
        let max_attempts = positive(
            "retry.max_attempts",
            f.retry.max_attempts.unwrap_or(10),
            1000,
        )? as u32;
        let initial_backoff = nonzero(
            "retry.initial_backoff",
            f.retry
                .initial_backoff
                .unwrap_or(Dur(Duration::from_secs(1))),
        )?;
        let max_backoff = nonzero(
            "retry.max_backoff",
            f.retry.max_backoff.unwrap_or(Dur(Duration::from_secs(300))),
        )?;
        if initial_backoff > max_backoff {
            return Err(ConfigError::new(
                "retry.initial_backoff",
                "must not be longer than retry.max_backoff",
            ));
        }

        // shutdown
        let shutdown = ShutdownConfig {
            clear_on_shutdown: f.shutdown.clear_on_shutdown.unwrap_or(true),
            deadline: f.shutdown.deadline.unwrap_or(Dur(Duration::from_secs(20))),
        };

        let api = resolve_api(f.api)?;

        // log
        let level = f.log.level.unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::builder()
            .parse(&level)
            .is_err()
        {
            return Err(ConfigError::new(
                "log.level",
                format!(
                    "{level:?} is not a level (trace, debug, info, warn, error) or filter directive"
                ),
            ));
        }

        Ok(Config {
            graph: GraphConfig {
                cloud,
                base_url,
                scope,
                request_timeout,
                max_in_flight,
                rate_limit,
            },
            auth: AuthConfig {
                tenant_id,
                client_id,
                credential,
                client_secret_file: f.auth.client_secret_file,
                client_secret,
                client_certificate_file,
                client_certificate_password,
                federated_token_file,
                user_assigned_identity: f.auth.user_assigned_identity.unwrap_or(false),
                authority_host,
            },
            tls: TlsConfig {
                extra_ca_file: f.tls.extra_ca_file,
            },
            store: StoreConfig {
                path,
                durability: f.store.durability.unwrap_or(Durability::Full),
            },
            sessions: SessionsConfig {
                default_ttl,
                max_ttl,
                retention,
            },
            schedule: ScheduleConfig {
                sweep,
                clear_all,
                timezone,
            },
            retry: RetryConfig {
                max_attempts,
                initial_backoff,
                max_backoff,
            },
            shutdown,
            api,
            log: LogConfig {
                level,
                format: f.log.format.unwrap_or(LogFormat::Text),
            },
        })
    }

    /// The resolved config as TOML, secrets redacted (for `check-config`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "22553876-f5ab-4529-bffb-cfe50aa89f87";

    fn env() -> Environment {
        Environment::from_pairs([
            ("AZURE_TENANT_ID", "contoso.onmicrosoft.com"),
            ("AZURE_CLIENT_ID", CLIENT),
            ("AZURE_CLIENT_SECRET", "s3cr3t-value"),
        ])
    }

    fn err(text: &str) -> ConfigError {
        Config::from_toml(text, &env()).expect_err("config should be refused")
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = Config::from_toml("", &env()).unwrap();
        assert_eq!(
            c.graph.base_url.as_str(),
            "https://graph.microsoft.com/v1.0"
        );
        assert_eq!(c.graph.scope, "https://graph.microsoft.com/.default");
        assert_eq!(
            c.auth.authority_host.as_str(),
            "https://login.microsoftonline.com/"
        );
        assert_eq!(c.graph.max_in_flight, 16);
        assert_eq!(c.graph.rate_limit.requests, 1500);
        assert_eq!(c.graph.rate_limit.per.0, Duration::from_secs(30));
        assert_eq!(c.graph.request_timeout.0, Duration::from_secs(10));
        assert_eq!(c.sessions.default_ttl.0, Duration::from_secs(300));
        assert_eq!(c.sessions.max_ttl.0, Duration::from_secs(86400));
        assert_eq!(c.retry.max_attempts, 10);
        assert_eq!(c.retry.max_backoff.0, Duration::from_secs(300));
        assert_eq!(c.shutdown.deadline.0, Duration::from_secs(20));
        assert!(c.shutdown.clear_on_shutdown);
        assert_eq!(c.store.path, PathBuf::from("sessions.db"));
        assert_eq!(c.store.durability, Durability::Full);
        assert_eq!(c.api.listen, Listen::Tcp("127.0.0.1:7740".parse().unwrap()));
        assert_eq!(c.schedule.timezone, Timezone::Utc);
    }

    #[test]
    fn clouds_set_graph_authority_and_scope() {
        let c = Config::from_toml("[graph]\ncloud = \"usgov-dod\"", &env()).unwrap();
        assert_eq!(
            c.graph.base_url.as_str(),
            "https://dod-graph.microsoft.us/v1.0"
        );
        assert_eq!(c.graph.scope, "https://dod-graph.microsoft.us/.default");
        assert_eq!(
            c.auth.authority_host.as_str(),
            "https://login.microsoftonline.us/"
        );
        let c = Config::from_toml(
            "[graph]\ncloud = \"usgov-l4\"\nbase_url = \"http://127.0.0.1:9/v1.0\"",
            &env(),
        )
        .unwrap();
        assert_eq!(c.graph.scope, "https://graph.microsoft.us/.default");
    }

    #[test]
    fn china_is_refused_with_the_reason() {
        let e = err("[graph]\ncloud = \"china\"");
        assert_eq!(e.key, "graph.cloud");
        assert!(e.problem.contains("China (21Vianet)"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("[graph]\nbogus = 1", "graph.bogus"),
            ("[nope]\nx = 1", ""),
            (
                "[graph]\nrequest_timeout = \"soon\"",
                "graph.request_timeout",
            ),
            ("[graph]\nmax_in_flight = 0", "graph.max_in_flight"),
            ("[graph]\nmax_in_flight = \"many\"", "graph.max_in_flight"),
            (
                "[graph]\nbase_url = \"http://graph.example.com/v1.0\"",
                "graph.base_url",
            ),
            (
                "[graph.rate_limit]\nrequests = 0",
                "graph.rate_limit.requests",
            ),
            (
                "[auth]\nauthority_host = \"http://127.0.0.1:1\"",
                "auth.authority_host",
            ),
            ("[auth]\nclient_id = \"bot\"", "auth.client_id"),
            (
                "[auth]\nclient_secret_file = \"/nonexistent/secret\"",
                "auth.client_secret_file",
            ),
            ("[store]\ndurability = \"sometimes\"", "store.durability"),
            ("[sessions]\nmax_ttl = \"0s\"", "sessions.max_ttl"),
            ("[schedule]\nsweep = \"every minute\"", "schedule.sweep"),
            (
                "[schedule]\nclear_all = [\"0 0 18 * * MON-FRI\", \"bad\"]",
                "schedule.clear_all[1]",
            ),
            (
                "[schedule]\ntimezone = \"Europe/Paris\"",
                "schedule.timezone",
            ),
            (
                "[retry]\ninitial_backoff = \"10m\"",
                "retry.initial_backoff",
            ),
            ("[api]\nlisten = \"everywhere\"", "api.listen"),
            ("[log]\nformat = \"xml\"", "log.format"),
            (
                "[tls]\nextra_ca_file = \"/nonexistent/ca.pem\"",
                "tls.extra_ca_file",
            ),
        ] {
            let e = err(text);
            if key.is_empty() {
                assert!(e.problem.contains("nope"), "{text}: {e}");
            } else {
                assert_eq!(e.key, key, "{text}: {e}");
            }
        }
        assert!(err("[graph]\nbogus = 1").problem.contains("bogus"));
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let e = err("[nope]\nx = 1");
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn required_ids_fall_back_to_the_environment_or_fail() {
        let e = Config::from_toml("", &Environment::default()).unwrap_err();
        assert_eq!(e.key, "auth.tenant_id");
        let e = Config::from_toml(
            "[auth]\ntenant_id = \"t\"\nclient_id = \"22553876-f5ab-4529-bffb-cfe50aa89f87\"",
            &Environment::default(),
        )
        .unwrap_err();
        assert_eq!(e.key, "auth.client_secret_file");
    }

    #[test]
    fn systemd_credentials_and_state_directory_are_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("client-secret"), "from-systemd\n").unwrap();
        let d = dir.path().to_str().unwrap();
        let env = Environment::from_pairs([
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", CLIENT),
            ("AZURE_CLIENT_SECRET", "from-env"),
            ("CREDENTIALS_DIRECTORY", d),
            ("STATE_DIRECTORY", "/var/lib/presence-reaper"),
        ]);
        let c = Config::from_toml("", &env).unwrap();
        assert_eq!(
            c.auth.client_secret.as_ref().unwrap().expose(),
            "from-systemd"
        );
        assert_eq!(
            c.store.path,
            PathBuf::from("/var/lib/presence-reaper/sessions.db")
        );
    }

    #[test]
    fn redacted_output_hides_secrets() {
        let c = Config::from_toml("", &env()).unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("s3cr3t-value"), "{out}");
        assert!(out.contains("<redacted>"), "{out}");
        assert!(!format!("{c:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn the_shipped_example_is_valid_and_matches_the_defaults() {
        let shipped = Config::from_toml(include_str!("../config.toml"), &env()).unwrap();
        let defaults =
            Config::from_toml("[auth]\ntenant_id = \"contoso.onmicrosoft.com\"", &env()).unwrap();
        assert_eq!(shipped.to_redacted_toml(), defaults.to_redacted_toml());
    }

    #[test]
    fn durations_read_like_people_write_them() {
        let c = Config::from_toml("[shutdown]\ndeadline = \"1h 30m\"", &env()).unwrap();
        assert_eq!(c.shutdown.deadline.0, Duration::from_secs(5400));
    }
}
