//! Bad input: every case gets a 4xx with a JSON error, nothing reaches Graph,
//! and the daemon keeps serving.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{TestApp, World};

/// Sends a raw HTTP/1.1 request, so that paths reach the server unnormalised.
async fn raw(
    app: &TestApp,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) before reading the whole body.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    )
}

fn assert_error(what: &str, got: (u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{what}: {}", got.1);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}"
    );
}

#[tokio::test]
async fn bad_ids_are_refused_before_any_url_is_built() {
    let w = World::new().await;
    let app = w.spawn().await;
    let long = format!("{}@x.com", "a".repeat(251));
    for id in [
        "..",
        "a%2Fb",
        "a%2fb@x.com",
        "a%5Cb@x.com",
        "a%3Fb",
        "a%3Fb@x.com",
        "a%23b",
        "a%20b@x.com",
        "a%09b@x.com",
        "a%01b@x.com",
        "%2E%2E",
        "a..b@x.com",
        &long,
        "not-an-id",
        "a%25b@x.com",
    ] {
        for method in ["PUT", "GET", "DELETE"] {
            let got = raw(
                &app,
                method,
                &format!("/v1/sessions/{id}"),
                Some("application/json"),
                b"{}",
            )
            .await;
            assert_error(&format!("{method} {id}"), got, 400, "invalid_user_id");
        }
    }
    assert!(w.fake.calls().is_empty());
}

#[tokio::test]
async fn bad_bodies_are_refused() {
    let w = World::new().await;
    let app = w.spawn().await;
    let put = |body: &'static [u8]| {
        raw(
            &app,
            "PUT",
            "/v1/sessions/a@x.com",
            Some("application/json"),
            body,
        )
    };
    assert_error(
        "malformed",
        put(b"{\"ttl_seconds\": ").await,
        400,
        "invalid_json",
    );
    assert_error("not an object", put(b"[1]").await, 400, "invalid_body");
    assert_error(
        "unknown field",
        put(b"{\"ttl\": 5}").await,
        400,
        "invalid_body",
    );
    assert_error(
        "wrong type",
        put(b"{\"ttl_seconds\": \"5\"}").await,
        400,
        "invalid_body",
    );
    assert_error(
        "fraction",
        put(b"{\"ttl_seconds\": 1.5}").await,
        400,
        "invalid_body",
    );
    assert_error(
        "zero ttl",
        put(b"{\"ttl_seconds\": 0}").await,
        400,
        "invalid_ttl",
    );
    assert_error(
        "negative ttl",
        put(b"{\"ttl_seconds\": -5}").await,
        400,
        "invalid_ttl",
    );
    assert_error(
        "ttl over max",
        put(b"{\"ttl_seconds\": 86401}").await,
        400,
        "invalid_ttl",
    );
    assert_error(
        "huge ttl",
        put(b"{\"ttl_seconds\": 99999999999999999999}").await,
        400,
        "invalid_body",
    );
    assert_error(
        "past",
        put(b"{\"expires_at\": \"2020-01-01T00:00:00Z\"}").await,
        400,
        "invalid_expires_at",
    );
    assert_error(
        "far",
        put(b"{\"expires_at\": \"2999-01-01T00:00:00Z\"}").await,
        400,
        "invalid_expires_at",
    );
    assert_error(
        "not a time",
        put(b"{\"expires_at\": \"tomorrow\"}").await,
        400,
        "invalid_expires_at",
    );
    assert_error(
        "both",
        put(b"{\"ttl_seconds\": 5, \"expires_at\": \"2999-01-01T00:00:00Z\"}").await,
        400,
        "conflicting_fields",
    );
    assert_error(
        "session id",
        put(b"{\"session_id\": \"bot\"}").await,
        400,
        "invalid_session_id",
    );
    assert_error(
        "owner",
        put(b"{\"owner\": \"bad owner\"}").await,
        400,
        "invalid_owner",
    );
    assert_error(
        "long owner",
        put(format!("{{\"owner\": \"{}\"}}", "o".repeat(129))
            .leak()
            .as_bytes())
        .await,
        400,
        "invalid_owner",
    );
    let big = format!("{{\"owner\": \"{}\"}}", "o".repeat(70 * 1024));
    assert_error(
        "too big",
        raw(
            &app,
            "PUT",
            "/v1/sessions/a@x.com",
            Some("application/json"),
            big.as_bytes(),
        )
        .await,
        413,
        "body_too_large",
    );
    assert_error(
        "media type",
        raw(
            &app,
            "PUT",
            "/v1/sessions/a@x.com",
            Some("text/plain"),
            b"{}",
        )
        .await,
        415,
        "unsupported_media_type",
    );
    assert_error(
        "clear-all body",
        raw(
            &app,
            "POST",
            "/v1/clear-all",
            Some("application/json"),
            b"{\"owner\": 5}",
        )
        .await,
        400,
        "invalid_body",
    );
    assert_error(
        "clear-all owner",
        raw(
            &app,
            "POST",
            "/v1/clear-all",
            Some("application/json"),
            b"{\"owner\": \"a b\"}",
        )
        .await,
        400,
        "invalid_owner",
    );
    // Nothing was stored, nothing reached Graph.
    let (status, _) = app.get("a@x.com").await;
    assert_eq!(status, 404);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(w.fake.calls().is_empty());
}

#[tokio::test]
async fn bad_queries_methods_and_paths_get_json_errors() {
    let w = World::new().await;
    let app = w.spawn().await;
    for (what, path, code) in [
        ("limit 0", "/v1/sessions?limit=0", "invalid_limit"),
        ("limit 1001", "/v1/sessions?limit=1001", "invalid_limit"),
        ("limit text", "/v1/sessions?limit=ten", "invalid_limit"),
        ("state", "/v1/sessions?state=gone", "invalid_state"),
        ("cursor", "/v1/sessions?cursor=zz", "invalid_cursor"),
        ("owner", "/v1/sessions?owner=a%20b", "invalid_owner"),
        ("unknown param", "/v1/sessions?colour=red", "invalid_query"),
        (
            "session_id",
            "/v1/sessions/a@x.com?session_id=nope",
            "invalid_session_id",
        ),
    ] {
        assert_error(what, raw(&app, "GET", path, None, b"").await, 400, code);
    }
    assert_error(
        "wait",
        raw(&app, "DELETE", "/v1/sessions/a@x.com?wait=maybe", None, b"").await,
        400,
        "invalid_query",
    );
    assert_error(
        "method",
        raw(&app, "POST", "/v1/sessions/a@x.com", None, b"").await,
        405,
        "method_not_allowed",
    );
    assert_error(
        "path",
        raw(&app, "GET", "/v2/nothing", None, b"").await,
        404,
        "not_found",
    );
    assert_error(
        "unknown session",
        raw(&app, "GET", "/v1/sessions/a@x.com", None, b"").await,
        404,
        "not_found",
    );
    let (status, _) = raw(&app, "GET", "/healthz", None, b"").await;
    assert_eq!(status, 200);
    assert!(w.fake.calls().is_empty());
}

#[tokio::test]
async fn listing_pages_in_order_with_filters() {
    let w = World::new().await;
    let app = w.spawn().await;
    for i in 0..7 {
        let owner = if i % 2 == 0 { "even" } else { "odd" };
        app.put(
            &format!("u{i}@x.com"),
            json!({"owner": owner, "ttl_seconds": 3600}),
        )
        .await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/sessions?limit=3&cursor={c}"),
            None => "/v1/sessions?limit=3".to_owned(),
        };
        let (status, page) = app.call(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200);
        for s in page["sessions"].as_array().unwrap() {
            seen.push(s["user_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..7).map(|i| format!("u{i}@x.com")).collect();
    assert_eq!(seen, expected);
    let (_, odd) = app
        .call(
            reqwest::Method::GET,
            "/v1/sessions?owner=odd&state=tracked",
            None,
        )
        .await;
    assert_eq!(odd["sessions"].as_array().unwrap().len(), 3);
    let (_, none) = app
        .call(reqwest::Method::GET, "/v1/sessions?state=cleared", None)
        .await;
    assert_eq!(none, json!({"sessions": [], "next_cursor": null}));
}
