//! Clear this bot's presence sessions when it shuts down (Rust, reqwest + tokio).
//!
//! Call `clear_presence_sessions` from your bot's shutdown path, e.g. after
//! `tokio::signal::ctrl_c()` (or a SIGTERM stream) fires and before the
//! runtime ends. Run it: `cargo run --example clear_on_shutdown`.

use std::time::Duration;

/// Asks presence-reaper to clear every session tracked for `owner` and waits
/// for Graph's answers. Returns `{"cleared", "dropped", "failed", "pending"}`.
async fn clear_presence_sessions(reaper: &str, owner: &str) -> Result<serde_json::Value, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(35))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .post(format!("{reaper}/v1/clear-all?wait=true"))
        .header("content-type", "application/json")
        .body(serde_json::json!({ "owner": owner }).to_string())
        .send()
        .await
        .map_err(|e| format!("presence-reaper did not answer: {e}"))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if status != reqwest::StatusCode::OK {
        return Err(format!("presence-reaper answered {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let reaper =
        std::env::var("PRESENCE_REAPER_URL").unwrap_or_else(|_| "http://127.0.0.1:7740".into());
    let owner = std::env::var("BOT_OWNER").unwrap_or_else(|_| "my-bot".into());
    match clear_presence_sessions(&reaper, &owner).await {
        Ok(c) => {
            println!(
                "cleared {}, dropped {}, failed {}, pending {}",
                c["cleared"], c["dropped"], c["failed"], c["pending"]
            );
            if c["failed"] == 0 && c["pending"] == 0 {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("cannot clear presence sessions: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
