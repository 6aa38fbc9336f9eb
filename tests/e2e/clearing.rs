//! When and how sessions are cleared: deadlines, the outcome table,
//! renewals, explicit ends and clear-all.

use std::time::Duration;

use presence_reaper::fake::Fault;
use serde_json::json;

use crate::helpers::{APP_ID, World, ms};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_session_is_cleared_when_its_deadline_passes() {
    let w = World::new().await;
    let app = w.spawn().await;
    w.fake.set_presence("adele@contoso.com", APP_ID);

    let (status, s) = app
        .put(
            "Adele@Contoso.com",
            json!({"ttl_seconds": 1, "owner": "bot-1"}),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    assert_eq!(s["state"], "tracked");
    assert_eq!(s["user_id"], "adele@contoso.com");
    assert_eq!(s["session_id"], APP_ID);
    assert_eq!(s["owner"], "bot-1");
    let deadline = ms(&s["expires_at"]);

    let done = app
        .wait_state("adele@contoso.com", "cleared", 5 * SECOND)
        .await;
    let calls = w.fake.clear_calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c.status, 200);
    assert_eq!(c.user_id, "adele@contoso.com");
    assert_eq!(c.session_id.as_deref(), Some(APP_ID));
    assert_eq!(c.content_type.as_deref(), Some("application/json"));
    assert!(
        c.user_agent
            .as_deref()
            .unwrap_or("")
            .starts_with("presence-reaper/")
    );
    let rid = c
        .client_request_id
        .as_deref()
        .expect("client-request-id sent");
    assert!(uuid::Uuid::parse_str(rid).is_ok(), "{rid}");
    // Sent at the deadline, not at the next sweep.
    assert!(c.at_ms >= deadline, "sent {} ms early", deadline - c.at_ms);
    assert!(
        c.at_ms - deadline < 1000,
        "sent {} ms late",
        c.at_ms - deadline
    );
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["last_error"], json!(null));
    assert!(done["finished_at"].is_string());
    assert!(!w.fake.has_presence("adele@contoso.com", APP_ID));
    app.stop().await;
}

#[tokio::test]
async fn the_user_id_is_one_encoded_path_segment() {
    let w = World::new().await;
    let app = w.spawn().await;
    let guest = "a_contoso.com#EXT#@x.onmicrosoft.com";
    w.fake.set_presence(guest, APP_ID);
    let (status, _) = app
        .put("a_contoso.com%23EXT%23@x.onmicrosoft.com", json!({}))
        .await;
    assert_eq!(status, 201);
    app.delete("a_contoso.com%23EXT%23@x.onmicrosoft.com").await;
    app.wait_state(
        "a_contoso.com%23EXT%23@x.onmicrosoft.com",
        "cleared",
        5 * SECOND,
    )
    .await;
    let c = &w.fake.clear_calls()[0];
    assert_eq!(
        c.raw_path,
        "/v1.0/users/a_contoso.com%23ext%23@x.onmicrosoft.com/presence/clearPresence"
    );
    // Ids are stored lower-case; Graph compares UPNs case-insensitively.
    assert_eq!(c.user_id, guest.to_ascii_lowercase());
}

#[tokio::test]
async fn not_found_is_dropped_without_retry() {
    let w = World::new().await;
    let app = w.spawn().await;
    let (status, s) = app.delete("ghost@contoso.com").await;
    assert_eq!(status, 202);
    assert_eq!(s["state"], "clearing");
    let s = app
        .wait_state("ghost@contoso.com", "dropped", 5 * SECOND)
        .await;
    assert_eq!(s["attempts"], 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.fake.clear_calls().len(), 1);
}

#[tokio::test]
async fn server_errors_timeouts_and_dropped_connections_are_retried() {
    let w = World::new().await;
    let app = w
        .spawn_with(|c| {
            c.graph.request_timeout = presence_reaper::config::Dur(Duration::from_millis(500))
        })
        .await;
    w.fake.set_presence("u@contoso.com", APP_ID);
    w.fake.push_faults([
        Fault::Status(500),
        Fault::Drop,
        Fault::Stall(2 * SECOND),
        Fault::Status(502),
    ]);
    app.delete("u@contoso.com").await;
    let s = app
        .wait_state("u@contoso.com", "cleared", 10 * SECOND)
        .await;
    assert_eq!(s["attempts"], 5);
    let mut calls = w.fake.clear_calls();
    calls.sort_by_key(|c| c.at);
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    // 0: the dropped connection. The stalled call was abandoned by our
    // timeout (the fake records only answered calls) but counts as an attempt.
    assert_eq!(statuses, vec![500, 0, 502, 200]);
    // Backoff: each retry waits at least half the doubling delay.
    let gap = calls[1].at - calls[0].at;
    assert!(gap >= Duration::from_millis(50), "{gap:?}");
}

#[tokio::test]
async fn a_throttled_call_pauses_every_call_for_its_fractional_retry_after() {
    let w = World::new().await;
    let app = w.spawn().await;
    w.fake.set_presence("a@contoso.com", APP_ID);
    w.fake.set_presence("b@contoso.com", APP_ID);
    w.fake.push_faults([Fault::Throttle("1.25".into())]);
    app.delete("a@contoso.com").await;
    assert!(w.fake.wait_for(5 * SECOND, |c| !c.is_empty()).await);
    app.delete("b@contoso.com").await;
    app.wait_state("a@contoso.com", "cleared", 10 * SECOND)
        .await;
    app.wait_state("b@contoso.com", "cleared", 10 * SECOND)
        .await;
    let calls = w.fake.clear_calls();
    assert_eq!(calls[0].status, 429);
    for later in &calls[1..] {
        let waited = later.at - calls[0].at;
        assert!(
            waited >= Duration::from_millis(1240),
            "{} called after {waited:?}",
            later.user_id
        );
    }
    let (_, a) = app.get("a@contoso.com").await;
    assert_eq!(a["attempts"], 2);
}

#[tokio::test]
async fn retry_after_on_a_503_is_a_floor_for_that_session() {
    let w = World::new().await;
    let app = w.spawn().await;
    w.fake.set_presence("a@contoso.com", APP_ID);
    w.fake.push_faults([Fault::Unavailable("1".into())]);
    app.delete("a@contoso.com").await;
    let s = app
        .wait_until("a@contoso.com", 5 * SECOND, |s| s["attempts"] == 1)
        .await;
    assert_eq!(s["state"], "clearing");
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .starts_with("503 serviceUnavailable"),
        "{s}"
    );
    assert!(s["next_attempt_at"].is_string());
    app.wait_state("a@contoso.com", "cleared", 5 * SECOND).await;
    let calls = w.fake.clear_calls();
    assert!(calls[1].at - calls[0].at >= Duration::from_millis(990));
}

#[tokio::test]
async fn a_revoked_token_is_renewed_and_the_call_retried() {
    let w = World::new().await;
    let app = w.spawn().await;
    w.fake.set_presence("a@contoso.com", APP_ID);
    app.delete("a@contoso.com").await;
    app.wait_state("a@contoso.com", "cleared", 5 * SECOND).await;
    assert_eq!(w.fake.token_requests(), 1);

    w.fake.set_presence("a@contoso.com", APP_ID);
    w.fake.revoke_tokens();
    app.delete("a@contoso.com").await;
    let s = app.wait_state("a@contoso.com", "cleared", 5 * SECOND).await;
    assert_eq!(w.fake.token_requests(), 2);
    assert_eq!(s["attempts"], 2, "the retry after 401 counts as an attempt");
    let statuses: Vec<u16> = w.fake.clear_calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, vec![200, 401, 200]);
}

#[tokio::test]
async fn a_failed_token_request_delays_without_counting_an_attempt() {
    let w = World::new().await;
    let app = w.spawn().await;
    // A first clear makes sure a token is cached.
    app.delete("warm@contoso.com?wait=true").await;
    w.fake.set_presence("a@contoso.com", APP_ID);
    // The cached token is refused (401, attempt 1); the renewal fails once
    // (no attempt, a delay); then a fresh token clears it (attempt 2).
    w.fake.revoke_tokens();
    w.fake.push_token_failures([503]);
    let before = w.fake.token_requests();
    app.delete("a@contoso.com").await;
    let s = app.wait_state("a@contoso.com", "cleared", 5 * SECOND).await;
    assert_eq!(s["attempts"], 2);
    let calls: Vec<_> = w
        .fake
        .clear_calls()
        .into_iter()
        .filter(|c| c.user_id == "a@contoso.com")
        .collect();
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, vec![401, 200]);
    assert_eq!(w.fake.token_requests(), before + 2);
    assert!(
        calls[1].at - calls[0].at >= Duration::from_millis(50),
        "the token failure did not delay the retry"
    );
}

#[tokio::test]
async fn client_errors_fail_at_once_with_graphs_code_and_message() {
    let w = World::new().await;
    let app = w.spawn().await;
    for (user, status) in [
        ("a@contoso.com", 403),
        ("b@contoso.com", 400),
        ("c@contoso.com", 409),
    ] {
        w.fake.push_faults([Fault::Status(status)]);
        app.delete(user).await;
        let s = app.wait_state(user, "failed", 5 * SECOND).await;
        assert_eq!(s["attempts"], 1);
        assert_eq!(
            s["last_error"],
            format!("{status} fakeFault: injected {status}")
        );
    }
    assert_eq!(w.fake.clear_calls().len(), 3);
}

#[tokio::test]
async fn retries_stop_after_max_attempts() {
    let w = World::new().await;
    let app = w.spawn_with(|c| c.retry.max_attempts = 3).await;
    w.fake.set_down(Some(503));
    app.delete("a@contoso.com").await;
    let s = app.wait_state("a@contoso.com", "failed", 10 * SECOND).await;
    assert_eq!(s["attempts"], 3);
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{s}"
    );
    assert_eq!(w.fake.clear_calls().len(), 3);
}

#[tokio::test]
async fn renewal_postpones_the_clear() {
    let w = World::new().await;
    let app = w.spawn().await;
    w.fake.set_presence("a@contoso.com", APP_ID);
    let (status, _) = app.put("a@contoso.com", json!({"ttl_seconds": 1})).await;
    assert_eq!(status, 201);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, s) = app.put("a@contoso.com", json!({"ttl_seconds": 2})).await;
    assert_eq!(status, 200, "a renewal answers 200");
    let deadline = ms(&s["expires_at"]);
    app.wait_state("a@contoso.com", "cleared", 5 * SECOND).await;
    let calls = w.fake.clear_calls();
    assert_eq!(calls.len(), 1);
    assert!(
        calls[0].at_ms >= deadline,
        "cleared before the renewed deadline"
    );
}

#[tokio::test]
async fn a_renewal_during_an_in_flight_clear_wins() {
    let w = World::new().await;
    let app = w.spawn().await;
    w.fake.set_presence("a@contoso.com", APP_ID);
    w.fake.push_faults([Fault::Delay(SECOND)]);
    app.delete("a@contoso.com").await;
    assert!(
        w.fake
            .wait_for(5 * SECOND, |_| w.fake.in_flight() == 1)
            .await
    );
    let (status, s) = app.put("a@contoso.com", json!({"ttl_seconds": 600})).await;
    assert_eq!(status, 200);
    assert_eq!(s["state"], "tracked");
    // Let the slow answer arrive; the row must stay tracked with the new deadline.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, now) = app.get("a@contoso.com").await;
    assert_eq!(now["state"], "tracked", "{now}");
    assert_eq!(now["expires_at"], s["expires_at"]);
}

#[tokio::test]
async fn explicit_end_with_and_without_wait() {
    let w = World::new().await;
    let app = w.spawn().await;
    w.fake.set_presence("a@contoso.com", APP_ID);
    app.put("a@contoso.com", json!({"ttl_seconds": 3600})).await;
    let (status, s) = app.delete("a@contoso.com?wait=true").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["state"], "cleared");
    // An unknown (or already ended) session still gets a clear.
    let other = "7d7c3f39-4a4e-4a57-9d0c-3c0f2b5a1f00";
    w.fake.set_presence("b@contoso.com", other);
    let (status, s) = app
        .delete(&format!("b@contoso.com?session_id={other}&wait=true"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(s["state"], "cleared");
    assert_eq!(s["session_id"], other);
    let (status, s) = app.delete("a@contoso.com?wait=true").await;
    assert_eq!((status, s["state"].as_str()), (200, Some("dropped")));
}

#[tokio::test]
async fn clear_all_by_owner_waits_and_counts() {
    let w = World::new().await;
    let app = w.spawn().await;
    for (user, owner) in [
        ("a@x.com", "bot-a"),
        ("b@x.com", "bot-a"),
        ("c@x.com", "bot-a"),
        ("d@x.com", "bot-b"),
    ] {
        app.put(user, json!({"owner": owner, "ttl_seconds": 3600}))
            .await;
    }
    w.fake.set_presence("a@x.com", APP_ID);
    w.fake.set_presence("b@x.com", APP_ID);
    w.fake.push_faults([]);
    let (status, counts) = app
        .call(
            reqwest::Method::POST,
            "/v1/clear-all?wait=true",
            Some(json!({"owner": "bot-a"})),
        )
        .await;
    assert_eq!(status, 200, "{counts}");
    assert_eq!(
        counts,
        json!({"cleared": 2, "dropped": 1, "failed": 0, "pending": 0})
    );
    let (_, d) = app.get("d@x.com").await;
    assert_eq!(d["state"], "tracked");

    let (status, v) = app
        .call(reqwest::Method::POST, "/v1/clear-all", Some(json!({})))
        .await;
    assert_eq!((status, v), (202, json!({"scheduled": 1})));
    app.wait_state("d@x.com", "dropped", 5 * SECOND).await;
}

#[tokio::test]
async fn metrics_count_clears_requests_throttling_tokens_and_lag() {
    let w = World::new().await;
    let app = w.spawn().await;
    w.fake.set_presence("a@contoso.com", APP_ID);
    w.fake.push_faults([Fault::Throttle("0.2".into())]);
    app.put("a@contoso.com", json!({"ttl_seconds": 1})).await;
    app.put("b@contoso.com", json!({"ttl_seconds": 3600})).await;
    app.wait_state("a@contoso.com", "cleared", 5 * SECOND).await;
    let resp = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics-text")
    );
    let text = resp.text().await.unwrap();
    for needle in [
        "presence_reaper_sessions{state=\"tracked\"} 1",
        "presence_reaper_sessions{state=\"cleared\"} 1",
        "presence_reaper_clears_total{outcome=\"cleared\"} 1",
        "presence_reaper_clears_total{outcome=\"retried\"} 1",
        "presence_reaper_graph_requests_total{status=\"2xx\"} 1",
        "presence_reaper_graph_requests_total{status=\"4xx\"} 1",
        "presence_reaper_graph_throttled_total 1",
        "presence_reaper_token_requests_total{result=\"ok\"} 1",
        "presence_reaper_clear_lag_seconds_count 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let paused: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("presence_reaper_graph_paused_seconds_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(paused >= 0.19, "{paused}");
}

#[tokio::test]
async fn scheduled_clear_all_clears_every_session() {
    let w = World::new().await;
    let app = w
        .spawn_with(|c| c.schedule.clear_all = vec!["*/2 * * * * *".into()])
        .await;
    for u in ["a@contoso.com", "b@contoso.com"] {
        w.fake.set_presence(u, APP_ID);
        app.put(u, json!({"ttl_seconds": 3600, "owner": "x"})).await;
    }
    app.wait_state("a@contoso.com", "cleared", 5 * SECOND).await;
    app.wait_state("b@contoso.com", "cleared", 5 * SECOND).await;
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains("presence_reaper_scheduled_clear_alls_total 0"),
        "{text}"
    );
}

#[tokio::test]
async fn a_second_401_in_a_row_is_retried_later_like_a_server_error() {
    let w = World::new().await;
    let app = w.spawn().await;
    app.delete("warm@contoso.com?wait=true").await;
    w.fake.set_presence("a@contoso.com", APP_ID);
    let tokens = w.fake.token_requests();
    w.fake
        .push_faults([Fault::Unauthorized, Fault::Unauthorized]);
    app.delete("a@contoso.com").await;
    let s = app.wait_state("a@contoso.com", "cleared", 5 * SECOND).await;
    assert_eq!(s["attempts"], 3);
    let statuses: Vec<u16> = w
        .fake
        .clear_calls()
        .iter()
        .filter(|c| c.user_id == "a@contoso.com")
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses, vec![401, 401, 200]);
    // Only the first 401 renews the token at once.
    assert_eq!(w.fake.token_requests(), tokens + 1);
}
