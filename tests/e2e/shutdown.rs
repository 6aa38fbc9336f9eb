//! Shutdown: clearing everything, Graph down at shutdown, resuming after a restart.

use std::time::Duration;

use presence_reaper::config::Dur;
use presence_reaper::store::State;
use serde_json::json;

use crate::helpers::{APP_ID, World, stored};

#[tokio::test]
async fn shutdown_clears_every_live_session() {
    let w = World::new().await;
    let app = w.spawn().await;
    let users: Vec<String> = (0..20).map(|i| format!("user{i}@contoso.com")).collect();
    for u in &users {
        w.fake.set_presence(u, APP_ID);
        let (status, _) = app.put(u, json!({"ttl_seconds": 3600})).await;
        assert_eq!(status, 201);
    }
    let report = app.stop().await;
    assert_eq!(report.left, 0);
    assert_eq!(w.fake.clear_calls().len(), users.len());
    let store = w.open_store().await;
    for u in &users {
        assert_eq!(
            stored(&store, u).await.unwrap().state,
            State::Cleared,
            "{u}"
        );
        assert!(!w.fake.has_presence(u, APP_ID));
    }
}

#[tokio::test]
async fn new_sessions_are_refused_while_shutting_down() {
    let w = World::new().await;
    w.fake.set_down(Some(503));
    let app = w
        .spawn_with(|c| {
            c.shutdown.deadline = Dur(Duration::from_secs(2));
            c.retry.max_attempts = 1000;
        })
        .await;
    app.put("a@contoso.com", json!({})).await;
    app.cancel.cancel();
    // While the drain runs, the API answers: 503 for new sessions, readyz 503.
    let mut refused = false;
    for _ in 0..100 {
        let (status, body) = app.put("b@contoso.com", json!({})).await;
        if status == 503 {
            assert_eq!(body["error"]["code"], "shutting_down");
            let (ready, _) = app.call(reqwest::Method::GET, "/readyz", None).await;
            assert_eq!(ready, 503);
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "PUT was never refused during shutdown");
    app.stop().await;
}

#[tokio::test]
async fn sessions_left_when_graph_is_down_are_cleared_first_after_restart() {
    let w = World::new().await;
    w.fake.set_down(Some(503));
    let app = w
        .spawn_with(|c| {
            c.shutdown.deadline = Dur(Duration::from_millis(800));
            // Quick retries must not exhaust the attempts within the deadline.
            c.retry.max_attempts = 1000;
        })
        .await;
    for i in 0..3 {
        w.fake.set_presence(&format!("u{i}@contoso.com"), APP_ID);
        app.put(&format!("u{i}@contoso.com"), json!({"ttl_seconds": 3600}))
            .await;
    }
    let report = app.stop().await;
    assert_eq!(report.left, 3);
    {
        let store = w.open_store().await;
        let s = stored(&store, "u0@contoso.com").await.unwrap();
        assert_eq!(s.state, State::Clearing);
        assert!(s.attempts >= 1);
        store.close().await;
    }

    w.fake.set_down(None);
    let before = w.fake.clear_calls().len();
    let app = w.spawn().await;
    for i in 0..3 {
        app.wait_state(
            &format!("u{i}@contoso.com"),
            "cleared",
            Duration::from_secs(3),
        )
        .await;
    }
    assert_eq!(w.fake.clear_calls().len(), before + 3);
    app.stop().await;
}

#[tokio::test]
async fn without_clear_on_shutdown_sessions_stay_tracked() {
    let w = World::new().await;
    let app = w.spawn_with(|c| c.shutdown.clear_on_shutdown = false).await;
    app.put("a@contoso.com", json!({"ttl_seconds": 3600})).await;
    let started = std::time::Instant::now();
    let report = app.stop().await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(report.left, 1);
    assert!(w.fake.clear_calls().is_empty());
    let store = w.open_store().await;
    assert_eq!(
        stored(&store, "a@contoso.com").await.unwrap().state,
        State::Tracked
    );
}
