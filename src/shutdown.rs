//! Signals: the first SIGTERM or SIGINT starts a graceful shutdown, a second
//! one exits at once with 128 + the signal number.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit status after a second SIGINT.
pub const EXIT_SIGINT: i32 = 130;
/// Exit status after a second SIGTERM.
pub const EXIT_SIGTERM: i32 = 143;

/// Registers the signal streams (once, before anything else runs) and returns
/// a token cancelled by the first signal. A second signal ends the process.
pub fn install() -> std::io::Result<CancellationToken> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let first = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutdown requested (send it again to exit at once)"
        );
        first.cancel();
        let code = tokio::select! {
            _ = term.recv() => EXIT_SIGTERM,
            _ = int.recv() => EXIT_SIGINT,
        };
        tracing::warn!(code, "second signal: exiting at once");
        std::process::exit(code);
    });
    Ok(token)
}
