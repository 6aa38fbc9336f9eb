//! systemd: the unit passes `systemd-analyze verify`, and the daemon speaks
//! the notify protocol on `$NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::helpers::{Daemon, World, binary, write_config};

const UNIT: &str = include_str!("../../systemd/presence-reaper.service");

fn directive<'a>(name: &str) -> Vec<&'a str> {
    UNIT.lines()
        .filter_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .collect()
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart= exists: point it at the binary under test.
    let unit = UNIT.replace("/usr/local/bin/presence-reaper", binary().to_str().unwrap());
    let path = dir.path().join("presence-reaper.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (.ci/run installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn the_unit_has_the_hardening_and_timeouts_spec_asks_for() {
    assert_eq!(directive("Type"), ["notify"]);
    assert_eq!(directive("DynamicUser"), ["yes"]);
    assert_eq!(directive("StateDirectory"), ["presence-reaper"]);
    assert_eq!(directive("ProtectSystem"), ["strict"]);
    assert_eq!(directive("NoNewPrivileges"), ["yes"]);
    assert_eq!(directive("PrivateTmp"), ["yes"]);
    assert_eq!(
        directive("RestrictAddressFamilies"),
        ["AF_UNIX AF_INET AF_INET6"]
    );
    assert!(directive("LoadCredential")[0].starts_with("client-secret:"));
    let secs = |v: &str| humantime::parse_duration(v).unwrap();
    assert!(!directive("WatchdogSec").is_empty());
    // Above the default shutdown.deadline (20s).
    assert!(secs(directive("TimeoutStopSec")[0]) > Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_speaks_the_notify_protocol() {
    let w = World::new().await;
    let sock_path = w.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let messages = messages.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                messages
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
    }
    let all = || messages.lock().unwrap().join("");
    let path = write_config(&w, "", "[shutdown]\ndeadline = \"2s\"\n");
    let d = Daemon::start_with_env(
        &path,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let first = messages
        .lock()
        .unwrap()
        .first()
        .cloned()
        .unwrap_or_default();
    assert!(
        first.contains("READY=1\n") && first.contains("STATUS=ready on "),
        "{first:?}"
    );
    // Half of 300 ms: several pings in 800 ms.
    assert!(all().matches("WATCHDOG=1").count() >= 3, "{}", all());
    assert!(
        all().contains("STATUS=tracking 0 live sessions"),
        "{}",
        all()
    );

    // Graph is down, so the drain has work until its deadline.
    w.fake.set_down(Some(503));
    d.put("a@contoso.com", json!({"ttl_seconds": 3600})).await;
    let pings_before = all().matches("WATCHDOG=1").count();
    d.signal("-TERM");
    let (code, _) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    let text = all();
    assert!(text.contains("STOPPING=1\n"), "{text}");
    assert!(text.contains("EXTEND_TIMEOUT_USEC="), "{text}");
    assert!(
        text.contains("STATUS=shutting down: 1 sessions left to clear"),
        "{text}"
    );
    assert!(
        text.matches("WATCHDOG=1").count() > pings_before + 3,
        "the watchdog is fed during the drain: {text}"
    );
}

/// `log.format = "journald"` sends structured entries to the journal. The
/// daemon runs in a private mount namespace (`unshare -m`, as root) where the
/// journal's socket path leads to a socket this test reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journald_logging_sends_structured_entries() {
    let w = World::new().await;
    let journal = tempfile::tempdir().unwrap();
    let sock = UnixDatagram::bind(journal.path().join("socket")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let path = write_config(&w, "", "");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("format = \"json\"", "format = \"journald\"");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
             && mount --bind \"$JOURNAL\" /run/systemd/journal \
             && exec \"$BIN\" --config \"$CONFIG\" run",
        ])
        .env("JOURNAL", journal.path())
        .env("BIN", binary())
        .env("CONFIG", &path)
        .spawn()
        .expect("unshare (util-linux) runs as root");
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 65536];
    let ready = loop {
        let Ok(n) = sock.recv(&mut buf) else {
            break None;
        };
        let entry = journal_fields(&buf[..n]);
        if entry.get("MESSAGE").map(String::as_str) == Some("presence-reaper is ready") {
            break Some(entry);
        }
        entries.push(entry);
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let ready = ready.unwrap_or_else(|| panic!("no ready entry among {entries:?}"));
    assert_eq!(ready["SYSLOG_IDENTIFIER"], "presence-reaper", "{ready:?}");
    // tracing-journald maps INFO to NOTICE (5) and prefixes event fields with F_.
    assert_eq!(ready["PRIORITY"], "5", "{ready:?}");
    assert!(
        ready["F_ADDR"].starts_with("127.0.0.1:"),
        "a structured field: {ready:?}"
    );
    assert!(ready["F_STORE"].ends_with("sessions.db"), "{ready:?}");
    assert_eq!(status.code(), Some(0));
}

/// Parses one datagram of journald's native protocol: `KEY=value` lines, or
/// `KEY`, a little-endian u64 length and that many bytes.
fn journal_fields(mut data: &[u8]) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    while let Some(nl) = data.iter().position(|&b| b == b'\n') {
        let line = &data[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            data = &data[nl + 1..];
        } else {
            let rest = &data[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.insert(
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(&rest[8..8 + len]).into_owned(),
            );
            data = &rest[8 + len + 1..];
        }
    }
    out
}
