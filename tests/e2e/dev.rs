//! `presence-reaper dev`, the README's first command: it starts without a
//! tenant, and the three commands it prints work as printed.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use crate::helpers::binary;

#[test]
fn dev_runs_without_a_tenant_and_its_printed_commands_work() {
    let dir = tempfile::tempdir().unwrap();
    // The printed commands reach the daemon through the same config, so it
    // needs a fixed port: take a free one.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[api]\nlisten = \"127.0.0.1:{port}\"\n")).unwrap();
    let mut child = Command::new(binary())
        .arg("--config")
        .arg(&config)
        .arg("dev")
        .env_remove("AZURE_TENANT_ID")
        .env_remove("AZURE_CLIENT_ID")
        .env_remove("AZURE_CLIENT_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = Vec::new();
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 {
        if line.starts_with("Stop with Ctrl-C") {
            break;
        }
        printed.push(std::mem::take(&mut line));
    }
    let commands: Vec<String> = printed
        .iter()
        .filter_map(|l| l.strip_prefix("  "))
        .map(|c| c.trim().replace(binary().to_str().unwrap(), "\"$REAPER\""))
        .collect();
    assert_eq!(commands.len(), 3, "{printed:?}");
    assert!(
        commands[0].contains("track adele@contoso.com --ttl 10s"),
        "{commands:?}"
    );

    let run = |cmd: &str| {
        let out = Command::new("sh")
            .args(["-c", cmd])
            .env("REAPER", binary())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(run(&commands[0]).starts_with("tracked adele@contoso.com"));
    assert!(run(&commands[1]).contains("tracked"));
    let after = run(&commands[2]);
    assert!(
        after
            .lines()
            .any(|l| l.starts_with("adele@contoso.com") && l.contains("cleared")),
        "{after}"
    );

    // Ctrl-C stops it cleanly; the fake logged the clear it received.
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("fake Graph received clearPresence"), "{log}");
}
