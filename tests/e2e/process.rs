//! The real binary: exit codes, kill -9, a second instance, signals, and
//! secrets kept out of logs. These tests block their thread while the child
//! runs, so they use a multi-threaded runtime to keep the fake Graph serving.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use presence_reaper::fake::Fault;
use presence_reaper::store::State;
use serde_json::json;

use crate::helpers::{APP_ID, Daemon, World, binary, run_cli, stored, write_config};

fn check_config(path: &Path) -> (Option<i32>, String, String) {
    run_cli(path, &["check-config"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_redacts_secrets_and_bad_configs_exit_2_naming_the_key() {
    let w = World::new().await;
    let path = write_config(&w, "", "");
    let (code, out, _) = check_config(&path);
    assert_eq!(code, Some(0));
    assert!(out.contains("client_secret = \"<redacted>\""), "{out}");
    assert!(!out.contains(&w.fake.tenant().client_secret), "{out}");

    let path = write_config(&w, "cloud = \"china\"", "");
    let (code, _, err) = check_config(&path);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("graph.cloud") && err.contains("China (21Vianet)"),
        "{err}"
    );

    let path = write_config(&w, "max_in_flight = -1", "");
    let (code, _, err) = check_config(&path);
    assert_eq!(code, Some(2));
    assert!(err.contains("graph.max_in_flight"), "{err}");

    let path = write_config(&w, "", "[sessions]\nlifetime = \"5m\"\n");
    let (code, _, err) = check_config(&path);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("sessions.lifetime") || err.contains("lifetime"),
        "{err}"
    );

    let (code, _, err) = check_config(&w.dir.path().join("missing.toml"));
    assert_eq!(code, Some(2));
    assert!(err.contains("missing.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_store_is_refused() {
    let w = World::new().await;
    let path = write_config(&w, "", "");
    let first = Daemon::start(&path);
    let out = Command::new(binary())
        .args(["--config", path.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&w.store_path().display().to_string()), "{err}");
    first.signal("-TERM");
    let (code, _) = first.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_on_kill_9_and_overdue_sessions_are_cleared_at_start() {
    let w = World::new().await;
    let path = write_config(&w, "", "");
    let d = Daemon::start(&path);
    for i in 0..3 {
        w.fake.set_presence(&format!("soon{i}@contoso.com"), APP_ID);
        d.put(&format!("soon{i}@contoso.com"), json!({"ttl_seconds": 2}))
            .await;
        d.put(
            &format!("later{i}@contoso.com"),
            json!({"ttl_seconds": 3600}),
        )
        .await;
    }
    d.kill9();
    // The deadlines pass while no daemon runs.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(w.fake.clear_calls().is_empty());

    let started = Instant::now();
    let d = Daemon::start(&path);
    assert!(
        w.fake
            .wait_for(Duration::from_secs(5), |c| c.len() >= 3)
            .await
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    d.signal("-TERM");
    // SIGTERM also clears the later ones: that is the shutdown path.
    let (code, _) = d.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0));
    let store = w.open_store().await;
    for i in 0..3 {
        assert_eq!(
            stored(&store, &format!("soon{i}@contoso.com"))
                .await
                .unwrap()
                .state,
            State::Cleared
        );
        assert_eq!(
            stored(&store, &format!("later{i}@contoso.com"))
                .await
                .unwrap()
                .state,
            State::Dropped
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_clear_in_flight_clears_again_after_restart() {
    let w = World::new().await;
    let path = write_config(&w, "", "");
    let d = Daemon::start(&path);
    w.fake.set_presence("a@contoso.com", APP_ID);
    w.fake.push_faults([Fault::Stall(Duration::from_secs(3))]);
    d.put("a@contoso.com", json!({"ttl_seconds": 3600})).await;
    d.delete("a@contoso.com").await;
    // Wait until the request is in flight at the fake, then kill.
    assert!(
        w.fake
            .wait_for(Duration::from_secs(5), |_| w.fake.max_in_flight() > 0)
            .await
    );
    d.kill9();
    let d = Daemon::start(&path);
    assert!(w.fake.wait_for_answer(Duration::from_secs(10), 200).await);
    d.signal("-TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(10)).0, Some(0));
    let store = w.open_store().await;
    assert_eq!(
        stored(&store, "a@contoso.com").await.unwrap().state,
        State::Cleared
    );
    assert!(!w.fake.has_presence("a@contoso.com", APP_ID));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_log_even_at_trace_level() {
    let w = World::new().await;
    let path = write_config(&w, "", "level = \"trace\"\n");
    let d = Daemon::start(&path);
    w.fake.set_presence("a@contoso.com", APP_ID);
    w.fake.push_faults([Fault::Unauthorized]);
    d.delete("a@contoso.com").await;
    assert!(w.fake.wait_for_answer(Duration::from_secs(5), 200).await);
    d.signal("-TERM");
    let (code, log) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(
        log.contains("TRACE") || log.contains("\"level\":\"TRACE\""),
        "trace logging was not on"
    );
    assert!(w.fake.token_requests() >= 1);
    assert!(
        !log.contains(&w.fake.tenant().client_secret),
        "the client secret leaked into the log"
    );
    assert!(
        !log.contains("fake-token-"),
        "an access token leaked into the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let w = World::new().await;
    let path = write_config(&w, "", "[shutdown]\ndeadline = \"60s\"\n");
    let d = Daemon::start(&path);
    w.fake.set_down(Some(503));
    d.put("a@contoso.com", json!({"ttl_seconds": 3600})).await;
    d.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.signal("-TERM");
    let (code, _) = d.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(143));
}
