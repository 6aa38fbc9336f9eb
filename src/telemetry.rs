//! Logging setup from `[log]`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber: text or JSON lines on stderr, or the
/// systemd journal with structured fields (falling back to text on stderr,
/// with a warning, where there is no journal).
pub fn init(log: &LogConfig) {
    let filter = || {
        EnvFilter::builder()
            .parse(&log.level)
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let fmt = || {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
    };
    match log.format {
        LogFormat::Text => drop(fmt().try_init()),
        LogFormat::Json => drop(fmt().json().flatten_event(true).try_init()),
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                use tracing_subscriber::layer::SubscriberExt;
                use tracing_subscriber::util::SubscriberInitExt;
                let layer = layer.with_syslog_identifier("presence-reaper".into());
                drop(
                    tracing_subscriber::registry()
                        .with(filter())
                        .with(layer)
                        .try_init(),
                );
            }
            Err(e) => {
                drop(fmt().without_time().with_ansi(false).try_init());
                tracing::warn!(error = %e, "log.format = \"journald\" but the journal is not reachable; logging to stderr");
            }
        },
    }
}
