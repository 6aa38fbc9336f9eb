//! Shared helpers: a fake Graph, a config pointing at it, and the real app
//! started in-process on port 0 (or the real binary).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use presence_reaper::App;
use presence_reaper::app::ShutdownReport;
use presence_reaper::config::{Config, Environment};
use presence_reaper::fake::{FakeGraph, FakeTenant};
use presence_reaper::store::{Session, Store};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The app's id, which is also the default presence session id.
pub const APP_ID: &str = "22553876-f5ab-4529-bffb-cfe50aa89f87";

/// A fake Graph plus a directory holding its CA, the secret and the store.
pub struct World {
    pub fake: FakeGraph,
    pub dir: tempfile::TempDir,
}

impl World {
    pub async fn new() -> Self {
        let fake = FakeGraph::start(FakeTenant::default())
            .await
            .expect("fake starts");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), fake.ca_pem()).expect("write CA");
        std::fs::write(
            dir.path().join("client-secret"),
            format!("{}\n", fake.tenant().client_secret),
        )
        .expect("write secret");
        Self { fake, dir }
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("sessions.db")
    }

    /// A config file for this world; `extra` is appended (its own tables).
    pub fn config_toml(&self, graph_extra: &str, extra: &str) -> String {
        let t = self.fake.tenant();
        format!(
            r#"[graph]
base_url = "{base}"
request_timeout = "2s"
{graph_extra}

[auth]
tenant_id = "{tenant}"
client_id = "{client}"
client_secret_file = "{dir}/client-secret"
authority_host = "{authority}"

[tls]
extra_ca_file = "{dir}/ca.pem"

[store]
path = "{dir}/sessions.db"
durability = "normal"

[api]
listen = "127.0.0.1:0"

{extra}
"#,
            base = self.fake.graph_base(),
            tenant = t.tenant_id,
            client = t.client_id,
            authority = self.fake.authority_host(),
            dir = self.dir.path().display(),
        )
    }

    /// The config used by in-process tests: quick retries, short deadlines.
    pub fn config(&self, tweak: impl FnOnce(&mut Config)) -> Config {
        let text = self.config_toml(
            "",
            "[retry]\ninitial_backoff = \"100ms\"\nmax_backoff = \"400ms\"\nmax_attempts = 5\n\n[shutdown]\ndeadline = \"5s\"\n",
        );
        let mut c =
            Config::from_toml(&text, &Environment::default()).expect("test config is valid");
        tweak(&mut c);
        c
    }

    pub async fn spawn(&self) -> TestApp {
        self.spawn_with(|_| {}).await
    }

    pub async fn spawn_with(&self, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let app = App::build(self.config(tweak)).await.expect("app builds");
        let addr = app.local_addr().expect("tests listen on TCP");
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(app.run(cancel.clone()));
        let t = TestApp {
            addr,
            cancel,
            handle: Some(handle),
            http: reqwest::Client::new(),
        };
        t.wait_ready().await;
        t
    }

    /// Opens the store (after the app stopped) to look at what it left.
    pub async fn open_store(&self) -> Store {
        Store::open(
            &self.store_path(),
            presence_reaper::config::Durability::Normal,
        )
        .await
        .expect("store opens")
    }
}

/// The real app, running in-process.
pub struct TestApp {
    pub addr: SocketAddr,
    pub cancel: CancellationToken,
    pub handle: Option<JoinHandle<Result<ShutdownReport, presence_reaper::app::AppError>>>,
    pub http: reqwest::Client,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("app never became ready");
    }

    /// Sends a request and returns the status and the JSON body (Null if none).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("API answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    pub async fn put(&self, user: &str, body: Value) -> (u16, Value) {
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/sessions/{user}"),
            Some(body),
        )
        .await
    }

    pub async fn get(&self, user: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, &format!("/v1/sessions/{user}"), None)
            .await
    }

    pub async fn delete(&self, user_and_query: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/sessions/{user_and_query}"),
            None,
        )
        .await
    }

    /// Polls GET until the session's state is `state` (or panics after `timeout`).
    pub async fn wait_state(&self, user: &str, state: &str, timeout: Duration) -> Value {
        self.wait_until(user, timeout, |v| v["state"] == state)
            .await
    }

    /// Polls GET until `pred` holds for the session (or panics after `timeout`).
    pub async fn wait_until(
        &self,
        user: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let (status, v) = self.get(user).await;
            if status == 200 && pred(&v) {
                return v;
            }
            if tokio::time::Instant::now() > until {
                panic!("{user} never got there; last answer {status} {v}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Cancels the app (as SIGTERM would) and waits for it to finish.
    pub async fn stop(mut self) -> ShutdownReport {
        self.cancel.cancel();
        self.handle
            .take()
            .expect("running")
            .await
            .expect("app task")
            .expect("app shuts down cleanly")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// RFC 3339 to epoch ms.
pub fn ms(v: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().expect("a timestamp"))
        .expect("RFC 3339")
        .timestamp_millis()
}

/// Reads a session straight from a store.
pub async fn stored(store: &Store, user: &str) -> Option<Session> {
    store
        .get(
            &presence_reaper::ids::UserId::parse(user).expect("valid user"),
            &presence_reaper::ids::SessionId::parse(APP_ID).expect("valid session"),
        )
        .await
        .expect("store read")
}

/// The path of the real binary.
pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_presence-reaper"))
}

/// The daemon as a child process, its stderr collected line by line.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(binary())
            .args(["--config", config.to_str().unwrap(), "run"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "presence-reaper is ready"
                {
                    let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("daemon never became ready: {:?}", log.lock().unwrap()));
        Self { child, addr, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn put(&self, user: &str, body: Value) -> Value {
        let r = reqwest::Client::new()
            .put(self.url(&format!("/v1/sessions/{user}")))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        serde_json::from_str(&r.text().await.unwrap()).unwrap()
    }

    pub async fn delete(&self, user: &str) {
        let r = reqwest::Client::new()
            .delete(self.url(&format!("/v1/sessions/{user}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread drain what is left.
                std::thread::sleep(Duration::from_millis(100));
                let log = self.log.lock().unwrap().join("\n");
                return (status.code(), log);
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!(
                    "daemon did not exit: {}",
                    self.log.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn write_config(w: &World, graph_extra: &str, extra: &str) -> std::path::PathBuf {
    let path = w.dir.path().join("config.toml");
    let text = w.config_toml(graph_extra, &format!("[log]\nformat = \"json\"\n{extra}"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the binary with `--config config` and `args`: exit code, stdout, stderr.
pub fn run_cli(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
