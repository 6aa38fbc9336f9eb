//! The client side of the CLI: `track`, `clear` and `list` talk to the
//! running daemon's API (address and bearer token from the same config).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::config::{ApiConfig, Listen, Secret};
use crate::ids::{Owner, SessionId, UserId};
use crate::store::State;

/// Why a CLI command failed, and the exit code that goes with it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The daemon refused or could not do it (exit 1).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// 2 for usage errors, 1 for failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

/// A client for the daemon's API.
#[derive(Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    listen: Listen,
    token: Option<Secret>,
}

impl ApiClient {
    /// A client for the daemon whose `[api]` this is.
    pub fn from_api_config(api: &ApiConfig) -> Result<Self, CliError> {
        // Clear-all with wait may take 30 s on the daemon's side.
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .no_proxy();
        let base = match &api.listen {
            Listen::Tcp(addr) => format!("http://{addr}"),
            Listen::Unix(path) => {
                builder = builder.unix_socket(path.clone());
                "http://localhost".to_owned()
            }
        };
        let http = builder
            .build()
            .map_err(|e| CliError::Failed(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            listen: api.listen.clone(),
            token: api.token.clone(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), CliError> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.map_err(|e| {
            CliError::Failed(format!(
                "no daemon answers at {} (api.listen): {}",
                self.listen,
                root_cause(&e)
            ))
        })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| CliError::Failed(format!("the daemon's answer was cut short: {e}")))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() || status == StatusCode::GATEWAY_TIMEOUT {
            return Ok((status, value));
        }
        let message = value["error"]["message"]
            .as_str()
            .unwrap_or(text.trim())
            .to_owned();
        let code = value["error"]["code"].as_str().unwrap_or("error");
        let text = format!("the daemon answered {status}: {code}: {message}");
        Err(if status == StatusCode::BAD_REQUEST {
            CliError::Usage(text)
        } else {
            CliError::Failed(text)
        })
    }

    /// `PUT /v1/sessions/{user}`.
    pub async fn track(
        &self,
        user: &str,
        ttl: Option<Duration>,
        owner: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<Value, CliError> {
        let user = parse_user(user)?;
        let mut body = serde_json::Map::new();
        if let Some(ttl) = ttl {
            if ttl.subsec_nanos() != 0 || ttl.as_secs() == 0 {
                return Err(CliError::Usage(format!(
                    "--ttl {}: use whole seconds, at least 1s",
                    humantime::format_duration(ttl)
                )));
            }
            body.insert("ttl_seconds".into(), json!(ttl.as_secs()));
        }
        if let Some(o) = owner {
            Owner::parse(o).map_err(|e| CliError::Usage(format!("--owner: {e}")))?;
            body.insert("owner".into(), json!(o));
        }
        if let Some(s) = session_id {
            SessionId::parse(s).map_err(|e| CliError::Usage(format!("--session-id: {e}")))?;
            body.insert("session_id".into(), json!(s));
        }
        let (_, v) = self
            .call(Method::PUT, &session_path(&user), Some(Value::Object(body)))
            .await?;
        Ok(v)
    }

    /// `DELETE /v1/sessions/{user}`, optionally waiting for the outcome.
    pub async fn clear(
        &self,
        user: &str,
        session_id: Option<&str>,
        wait: bool,
    ) -> Result<Value, CliError> {
        let user = parse_user(user)?;
        let mut query = Vec::new();
        if let Some(s) = session_id {
            let s =
                SessionId::parse(s).map_err(|e| CliError::Usage(format!("--session-id: {e}")))?;
            query.push(format!("session_id={s}"));
        }
        if wait {
            query.push("wait=true".into());
        }
        let mut path = session_path(&user);
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        let (status, v) = self.call(Method::DELETE, &path, None).await?;
        if status == StatusCode::GATEWAY_TIMEOUT {
            return Err(CliError::Failed(format!(
                "{user}: still being cleared after 30 s"
            )));
        }
        Ok(v)
    }

    /// `POST /v1/clear-all`, optionally for one owner and waiting.
    pub async fn clear_all(&self, owner: Option<&str>, wait: bool) -> Result<Value, CliError> {
        let mut body = serde_json::Map::new();
        if let Some(o) = owner {
            Owner::parse(o).map_err(|e| CliError::Usage(format!("--owner: {e}")))?;
            body.insert("owner".into(), json!(o));
        }
        let path = if wait {
            "/v1/clear-all?wait=true"
        } else {
            "/v1/clear-all"
        };
        let (_, v) = self
            .call(Method::POST, path, Some(Value::Object(body)))
            .await?;
        Ok(v)
    }

    /// Every session matching the filters, following the cursor.
    pub async fn list(
        &self,
        state: Option<&str>,
        owner: Option<&str>,
    ) -> Result<Vec<Value>, CliError> {
        let mut params = vec!["limit=1000".to_owned()];
        if let Some(s) = state {
            s.parse::<State>()
                .map_err(|e| CliError::Usage(format!("--state: {e}")))?;
            params.push(format!("state={s}"));
        }
        if let Some(o) = owner {
            Owner::parse(o).map_err(|e| CliError::Usage(format!("--owner: {e}")))?;
            params.push(format!("owner={o}"));
        }
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut p = params.clone();
            if let Some(c) = &cursor {
                p.push(format!("cursor={c}"));
            }
            let (_, page) = self
                .call(Method::GET, &format!("/v1/sessions?{}", p.join("&")), None)
                .await?;
            if let Some(sessions) = page["sessions"].as_array() {
                out.extend(sessions.iter().cloned());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(out),
            }
        }
    }
}

fn parse_user(raw: &str) -> Result<UserId, CliError> {
    UserId::parse(raw).map_err(|e| CliError::Usage(format!("{raw:?}: {e}")))
}

/// `/v1/sessions/{user}`, the id percent-encoded as one segment.
fn session_path(user: &UserId) -> String {
    let mut url = url::Url::parse("http://x/v1/sessions").expect("static URL");
    url.path_segments_mut().expect("base").push(user.as_str());
    url.path().to_owned()
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Sessions as an aligned table a person can read.
pub fn table(sessions: &[Value]) -> String {
    let headers = [
        "USER",
        "SESSION",
        "OWNER",
        "STATE",
        "EXPIRES",
        "ATTEMPTS",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 7]> = sessions
        .iter()
        .map(|s| {
            let text = |k: &str| s[k].as_str().unwrap_or("-").to_owned();
            [
                text("user_id"),
                text("session_id"),
                text("owner"),
                text("state"),
                text("expires_at"),
                s["attempts"].as_i64().unwrap_or(0).to_string(),
                text("last_error"),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&headers.map(str::to_owned));
    for row in &rows {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_aligned() {
        let s = json!({"user_id": "a@x.com", "session_id": "s", "owner": null, "state": "tracked",
                       "expires_at": "2026-12-04T19:30:00Z", "attempts": 0, "last_error": null});
        let t = table(&[s]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("STATE"), lines[1].find("tracked"));
        assert!(lines[1].starts_with("a@x.com"));
    }

    #[test]
    fn user_ids_are_one_encoded_segment() {
        let u = UserId::parse("a_contoso.com#EXT#@x.onmicrosoft.com").unwrap();
        assert_eq!(
            session_path(&u),
            "/v1/sessions/a_contoso.com%23ext%23@x.onmicrosoft.com"
        );
    }
}
