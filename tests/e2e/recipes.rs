//! The recipes in docs/ are real: each shutdown-hook snippet runs against a
//! live daemon and clears its bot's sessions; the unit files pass
//! `systemd-analyze verify`; the Kubernetes manifest parses and its config
//! loads. The toolchains come from `.ci/run` (Debian packages).

use std::path::{Path, PathBuf};
use std::process::Command;

use presence_reaper::config::{Config, Environment};
use serde_json::json;

use std::net::SocketAddr;

use crate::helpers::{APP_ID, World, binary};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Tracks two sessions for `owner` and one for another owner, runs the
/// command `make` builds for the daemon's address, and checks that exactly
/// the owner's two were cleared.
async fn clears_only_its_owners_sessions(owner: &str, make: impl FnOnce(SocketAddr) -> Command) {
    let w = World::new().await;
    let app = w.spawn().await;
    for (user, o) in [
        ("a@contoso.com", owner),
        ("b@contoso.com", owner),
        ("c@contoso.com", "other"),
    ] {
        w.fake.set_presence(user, APP_ID);
        app.put(user, json!({"owner": o, "ttl_seconds": 3600}))
            .await;
    }
    let mut command = make(app.addr);
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?} (.ci/run installs it): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{command:?} failed: {stdout}\n{stderr}"
    );
    for user in ["a@contoso.com", "b@contoso.com"] {
        let (_, s) = app.get(user).await;
        assert_eq!(s["state"], "cleared", "{user}");
    }
    let (_, other) = app.get("c@contoso.com").await;
    assert_eq!(other["state"], "tracked");
}

/// Runs a shutdown-hook program the way a bot would, with its environment.
async fn run_hook(program: &str, args: &[&str]) {
    let scratch = tempfile::tempdir().unwrap();
    clears_only_its_owners_sessions("hook-bot", |addr| {
        let mut c = Command::new(program);
        c.args(args)
            .current_dir(scratch.path())
            .env("PRESENCE_REAPER_URL", format!("http://{addr}"))
            .env("BOT_OWNER", "hook-bot")
            .env("HOME", scratch.path())
            .env("GOCACHE", scratch.path().join("gocache"));
        c
    })
    .await;
}

fn hook(name: &str) -> String {
    repo(&format!("docs/shutdown-hooks/{name}"))
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_hook() {
    run_hook("python3", &[&hook("clear_on_shutdown.py")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_hook() {
    run_hook("java", &[&hook("ClearOnShutdown.java")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_hook() {
    run_hook("php", &[&hook("clear_on_shutdown.php")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_hook() {
    run_hook("go", &["run", &hook("clear_on_shutdown.go")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csharp_hook() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("ClearOnShutdown.exe");
    let out = Command::new("mcs")
        .args([
            "-r:System.Net.Http.dll",
            &format!("-out:{}", exe.display()),
            &hook("ClearOnShutdown.cs"),
        ])
        .output()
        .expect("mcs (mono-mcs) is installed by .ci/run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    run_hook("mono", &[exe.to_str().unwrap()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_hook() {
    // `cargo test` builds the examples next to the binaries; a filtered run
    // (`cargo test --test e2e`) does not, so build it then.
    let example = binary()
        .parent()
        .unwrap()
        .join("examples/clear_on_shutdown");
    if !example.exists() {
        let built = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--example", "clear_on_shutdown"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(built.success());
    }
    run_hook(example.to_str().unwrap(), &[]).await;
}

/// Runs `systemd-analyze verify` on unit files, with ExecStart= paths
/// pointed at programs that exist (verify checks them).
fn verify_units(units: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for unit in units {
        let text = std::fs::read_to_string(repo(unit))
            .unwrap()
            .replace("/usr/local/bin/presence-reaper", binary().to_str().unwrap())
            .replace("/usr/local/bin/my-bot", "/bin/true");
        let path = dir.path().join(Path::new(unit).file_name().unwrap());
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{units:?}: {stderr}"
    );
}

fn load(path: &str, env: &Environment) -> Config {
    Config::load(Some(&repo(path)), env).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn systemd_credentials() -> (tempfile::TempDir, Environment) {
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("client-secret"), "from-load-credential\n").unwrap();
    let env = Environment::from_pairs([
        ("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap()),
        ("STATE_DIRECTORY", "/var/lib/presence-reaper"),
    ]);
    (creds, env)
}

#[test]
fn the_systemd_recipe_config_loads_with_the_units_credential() {
    let (_creds, env) = systemd_credentials();
    let c = load("docs/systemd/config.toml", &env);
    assert_eq!(
        c.auth.client_secret.unwrap().expose(),
        "from-load-credential"
    );
    assert_eq!(
        c.store.path,
        Path::new("/var/lib/presence-reaper/sessions.db")
    );
    let unit = std::fs::read_to_string(repo("systemd/presence-reaper.service")).unwrap();
    assert!(unit.contains("--config /etc/presence-reaper/config.toml"));
    assert!(
        unit.contains("RuntimeDirectory=presence-reaper"),
        "the socket's directory"
    );
}

#[test]
fn the_sidecar_units_pass_verify_and_follow_the_bot() {
    verify_units(&[
        "docs/sidecar/my-bot.service",
        "docs/sidecar/presence-reaper-my-bot.service",
    ]);
    let reaper =
        std::fs::read_to_string(repo("docs/sidecar/presence-reaper-my-bot.service")).unwrap();
    for line in [
        "BindsTo=my-bot.service",
        "PartOf=my-bot.service",
        "Before=my-bot.service",
    ] {
        assert!(reaper.lines().any(|l| l == line), "{line}");
    }
    let (_creds, env) = systemd_credentials();
    load("docs/sidecar/my-bot.toml", &env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_shutdown_hook_clears_the_bots_sessions() {
    // The bot unit's ExecStopPost=, with its config pointed at the daemon.
    let bot = std::fs::read_to_string(repo("docs/sidecar/my-bot.service")).unwrap();
    let command = bot
        .lines()
        .find_map(|l| l.strip_prefix("ExecStopPost="))
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("my-bot.toml");
    clears_only_its_owners_sessions("my-bot", |addr| {
        std::fs::write(&config, format!("[api]\nlisten = \"{addr}\"\n")).unwrap();
        let mut c = Command::new(binary());
        c.args(
            command
                .split_whitespace()
                .skip(1)
                .map(|a| a.replace("/etc/presence-reaper/my-bot.toml", config.to_str().unwrap())),
        );
        c
    })
    .await;
}

/// The manifest's documents as JSON, parsed by PyYAML.
fn kubernetes_documents() -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(repo("docs/kubernetes/bot-with-presence-reaper.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_recipe_parses_loads_and_its_pre_stop_hook_works() {
    let docs = kubernetes_documents();
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap().clone();
    let sa = kind("ServiceAccount");
    let client_id = sa["metadata"]["annotations"]["azure.workload.identity/client-id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pod = kind("Deployment")["spec"]["template"].clone();
    assert_eq!(
        pod["metadata"]["labels"]["azure.workload.identity/use"],
        "true"
    );
    assert_eq!(pod["spec"]["serviceAccountName"], sa["metadata"]["name"]);
    let sidecar = &pod["spec"]["initContainers"][0];
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");

    // The ConfigMap's config loads as the webhook's environment would have it.
    let token = tempfile::NamedTempFile::new().unwrap();
    let token_path = token.path().to_str().unwrap().to_owned();
    let env = Environment::from_pairs([
        ("AZURE_TENANT_ID", "contoso.onmicrosoft.com"),
        ("AZURE_CLIENT_ID", client_id.as_str()),
        ("AZURE_FEDERATED_TOKEN_FILE", token_path.as_str()),
    ]);
    let text = kind("ConfigMap")["data"]["config.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    let config = Config::from_toml(&text, &env).unwrap();
    assert_eq!(config.auth.client_id, client_id);
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace > 35 + config.shutdown.deadline.0.as_secs(),
        "preStop + drain fit the grace period"
    );
    let port = config.api.listen.to_string();
    assert!(port.ends_with(":7740"));

    // The bot's preStop hook, run against a daemon.
    let bot = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bot")
        .unwrap();
    let command: Vec<String> = bot["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    clears_only_its_owners_sessions("my-bot", |addr| {
        let mut c = Command::new(&command[0]);
        c.args(&command[1..])
            .env("PRESENCE_REAPER_URL", format!("http://{addr}"));
        c
    })
    .await;
}
