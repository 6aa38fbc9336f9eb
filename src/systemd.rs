//! The systemd notify protocol (`Type=notify`): READY, STATUS, WATCHDOG,
//! STOPPING and EXTEND_TIMEOUT_USEC, through `sd-notify`. Every call is a
//! no-op when `NOTIFY_SOCKET` is unset (not started by systemd).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `READY=1` with a first `STATUS=`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=…`
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `STOPPING=1` with a `STATUS=`.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// `EXTEND_TIMEOUT_USEC=…`: asks systemd for `d` more before it kills us.
pub fn extend_timeout(d: Duration) {
    let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// True when systemd listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Pings `WATCHDOG=1` at half of `WatchdogSec=` until `stop` fires, as long
/// as the store answers (a daemon whose store hangs should be restarted).
/// Runs during a drain too. Does nothing without a watchdog.
pub async fn watchdog(store: Store, stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = interval / 2;
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        match tokio::time::timeout(period, store.live_count()).await {
            Ok(Ok(_)) => send(&[NotifyState::Watchdog]),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "store check failed; not pinging the watchdog")
            }
            Err(_) => tracing::error!("store check timed out; not pinging the watchdog"),
        }
    }
}

/// Keeps `STATUS=` current: live sessions and the last clear, refreshed when
/// sessions end (at most every 5 s) and once a minute, until `stop` fires.
pub async fn status_updates(store: Store, stop: CancellationToken) {
    if !enabled() {
        return;
    }
    let mut finished = store.subscribe_finished();
    loop {
        let live = store.live_count().await.unwrap_or(0);
        let last = store.last_finished().await.ok().flatten();
        let text = match last {
            Some((at, user)) => format!(
                "tracking {live} live sessions; last clear {} ({user})",
                crate::store::rfc3339(at)
            ),
            None => format!("tracking {live} live sessions"),
        };
        status(&text);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = finished.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(55)) => {}
        }
    }
}
