//! The CLI against a running daemon (over a Unix socket with a bearer
//! token), and the offline drain.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use presence_reaper::fake::Fault;
use presence_reaper::store::State;
use serde_json::{Value, json};

use crate::helpers::{APP_ID, Daemon, World, stored, write_config};

use crate::helpers::run_cli as cli;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_list_and_clear_through_a_unix_socket_with_a_token() {
    let w = World::new().await;
    let sock = w.dir.path().join("api.sock");
    let token = w.dir.path().join("api-token");
    std::fs::write(&token, "s3cret-api-token\n").unwrap();
    // A stale socket file from a crash must not block the start.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let api = format!(
        "[api]\nlisten = \"unix:{}\"\ntoken_file = \"{}\"\n",
        sock.display(),
        token.display()
    );
    let path = write_config(&w, "", "").to_owned();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[api]\nlisten = \"127.0.0.1:0\"\n", &api);
    std::fs::write(&path, text).unwrap();
    let d = Daemon::start(&path);
    assert_eq!(d.addr, format!("unix:{}", sock.display()));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    // Without the token: 401 with a JSON error; /healthz stays open.
    let plain = reqwest::Client::builder()
        .unix_socket(sock.clone())
        .build()
        .unwrap();
    let r = plain
        .get("http://localhost/v1/sessions")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let r = plain
        .get("http://localhost/v1/sessions")
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        plain
            .get("http://localhost/healthz")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    w.fake.set_presence("adele@contoso.com", APP_ID);
    w.fake.set_presence("bob@contoso.com", APP_ID);
    let (code, out, err) = cli(
        &path,
        &[
            "track",
            "Adele@contoso.com",
            "--ttl",
            "10m",
            "--owner",
            "bot-1",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("tracked adele@contoso.com"), "{out}");
    let (code, _, err) = cli(&path, &["track", "bob@contoso.com", "--owner", "bot-2"]);
    assert_eq!(code, Some(0), "{err}");

    let (code, out, _) = cli(&path, &["list"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("USER"), "{out}");
    assert!(
        lines[1].starts_with("adele@contoso.com")
            && lines[1].contains("bot-1")
            && lines[1].contains("tracked"),
        "{out}"
    );
    assert_eq!(lines.len(), 3);

    let (code, out, _) = cli(&path, &["list", "--owner", "bot-2", "--json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["user_id"], "bob@contoso.com");

    let (code, out, err) = cli(&path, &["clear", "adele@contoso.com", "--wait"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "adele@contoso.com: cleared");

    let (code, out, err) = cli(&path, &["clear", "--all", "--owner", "bot-2", "--wait"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.trim(),
        "cleared 1, dropped 0, failed 0, still pending 0"
    );

    let (code, _, err) = cli(&path, &["track", "a/b@contoso.com"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = cli(&path, &["track", "a@contoso.com", "--ttl", "1.5s"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, _) = cli(&path, &["clear"]);
    assert_eq!(code, Some(2), "clear needs a user or --all");

    d.signal("-TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(10)).0, Some(0));
    assert!(!sock.exists(), "the socket is removed on exit");

    let (code, _, err) = cli(&path, &["list"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no daemon answers") && err.contains("api.sock"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_clears_the_store_offline_and_reports_what_is_left() {
    let w = World::new().await;
    {
        let app = w.spawn_with(|c| c.shutdown.clear_on_shutdown = false).await;
        for u in ["a@contoso.com", "b@contoso.com", "c@contoso.com"] {
            app.put(u, json!({"ttl_seconds": 3600})).await;
        }
        app.stop().await;
    }
    w.fake.set_presence("a@contoso.com", APP_ID);
    w.fake.push_faults([Fault::Status(403)]);
    let path = write_config(&w, "", "");

    // Refused while a daemon holds the store.
    let d = Daemon::start(&path);
    let (code, _, err) = cli(&path, &["drain"]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&w.store_path().display().to_string()), "{err}");
    d.kill9();

    let (code, out, _) = cli(&path, &["drain", "--deadline", "20s"]);
    assert_eq!(code, Some(1), "one session failed: {out}");
    assert!(out.contains("failed 1"), "{out}");
    assert!(
        out.contains("not cleared:") && out.contains("403 fakeFault"),
        "{out}"
    );
    let store = w.open_store().await;
    let states: Vec<State> = {
        let mut v = Vec::new();
        for u in ["a@contoso.com", "b@contoso.com", "c@contoso.com"] {
            v.push(stored(&store, u).await.unwrap().state);
        }
        v
    };
    assert_eq!(states.iter().filter(|s| **s == State::Failed).count(), 1);
    assert_eq!(states.iter().filter(|s| !s.is_terminal()).count(), 0);
    store.close().await;

    // Nothing live: exit 0.
    let (code, out, _) = cli(&path, &["drain"]);
    assert_eq!(code, Some(0), "{out}");
}
