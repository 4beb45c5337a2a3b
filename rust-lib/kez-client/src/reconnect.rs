//! When a lost connection tries again (PROTOCOL.md §6.1, reconnects): a random wait in a
//! window, so that the clients a broker restart drops all at once come back spread out instead
//! of all in the same millisecond, each of them an authorization the callout has to answer
//! within nats-server's authorization timeout.
//!
//! The window is the one the home server advertises ([`kez_proto::reconnect`]: the connections
//! its brokers hold over the authorizations per second it sustains), read by every connection
//! when it connects and every [`WINDOW_REFRESH`] after, and at least [`RECONNECT_WINDOW`]
//! doubled for each failed attempt up to [`RECONNECT_MAX_WINDOW`]. A process has one home
//! broker, so the window it learnt is the process's: every connection of it waits by it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rand_core::RngCore as _;

/// The window of the first attempt after the connection is lost when the home server
/// advertises none (or a narrower one).
pub const RECONNECT_WINDOW: Duration = kez_proto::reconnect::MIN_WINDOW;
/// The widest window of a client's own doubling: past a few failures every attempt waits a random
/// time up to this long, or the advertised window when that is wider (a person whose broker
/// was away is back within this of its return).
pub const RECONNECT_MAX_WINDOW: Duration = Duration::from_secs(8);
/// How often a connection reads the advertised window again: a home's connection count changes
/// slowly, and a connection that lives for days should know today's.
pub const WINDOW_REFRESH: Duration = Duration::from_secs(600);
/// How long one read of the window may take.
const WINDOW_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The window the home server advertised, in milliseconds; 0 when none was read.
static ADVERTISED_MS: AtomicU64 = AtomicU64::new(0);

/// The wait before connect attempt `attempts` (1: the first since the last success) after a
/// loss, when the home server advertised `advertised`: uniform in `[0, window)`, the window
/// [`RECONNECT_WINDOW`] doubled for each earlier failed attempt up to
/// [`RECONNECT_MAX_WINDOW`], or `advertised` when that is wider. Full jitter over the
/// advertised window: the clients of one restart come back at the rate the deployment
/// authorizes, and however long the broker is away they keep trying at that rate, never all
/// at once when it returns.
pub fn reconnect_delay(attempts: usize, advertised: Option<Duration>) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(16);
    let own = RECONNECT_WINDOW
        .saturating_mul(1 << doublings)
        .min(RECONNECT_MAX_WINDOW);
    let window = advertised.map_or(own, |advertised| {
        own.max(advertised.min(kez_proto::reconnect::MAX_WINDOW))
    });
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand_core::OsRng.next_u64() % window_ms.max(1))
}

/// The window this process learnt from its home server ([`learn_window`]), if any.
pub fn advertised_window() -> Option<Duration> {
    match ADVERTISED_MS.load(Ordering::Relaxed) {
        0 => None,
        millis => Some(Duration::from_millis(millis)),
    }
}

/// async-nats' `reconnect_delay_callback` for one connection's options: the first call, the
/// connection's initial connect (async-nats asks the callback for that attempt too), does not
/// wait, so a command connecting to send one message is not slowed down; every later one waits
/// [`reconnect_delay`] with the [`advertised_window`].
pub fn delay_callback() -> impl Fn(usize) -> Duration + Send + Sync + 'static {
    let initial_done = Arc::new(AtomicBool::new(false));
    move |attempts| {
        if initial_done.swap(true, Ordering::Relaxed) {
            reconnect_delay(attempts, advertised_window())
        } else {
            Duration::ZERO
        }
    }
}

/// Reads the window the home server advertises (one direct get of the directory's window
/// entry, PROTOCOL.md §6.1) over `client`, and keeps it for this process's reconnects.
/// `Ok(None)`: the server advertises none (an older server, or a broker configuration without
/// the directory's import); the process keeps what it had.
pub async fn learn_window(client: &async_nats::Client) -> Result<Option<Duration>, String> {
    let subject = kez_proto::reconnect::window_subject();
    let request = async_nats::Request::new()
        .payload(Bytes::from_static(kez_proto::directory::DIRECT_GET_BODY))
        .timeout(Some(WINDOW_READ_TIMEOUT));
    let answer = match client.send_request(subject.clone(), request).await {
        Ok(answer) => answer,
        Err(err) if err.kind() == async_nats::RequestErrorKind::NoResponders => return Ok(None),
        Err(err) => return Err(format!("reading {subject}: {err}")),
    };
    match answer.status {
        None => {
            let window = kez_proto::reconnect::decode(&answer.payload)
                .map_err(|err| format!("reading {subject}: {err}"))?;
            let millis = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
            ADVERTISED_MS.store(millis, Ordering::Relaxed);
            Ok(Some(window))
        }
        Some(async_nats::StatusCode::NOT_FOUND) => Ok(None),
        Some(status) => Err(format!("reading {subject}: status {status}")),
    }
}

/// Reads the window over `client` now and every [`WINDOW_REFRESH`] after, for as long as the
/// task runs (the connection that started it aborts it when it is dropped).
pub(crate) async fn keep_learning(client: async_nats::Client) {
    loop {
        match learn_window(&client).await {
            Ok(window) => tracing::debug!(?window, "reconnect window"),
            Err(err) => {
                tracing::debug!(error = %err, "cannot read the reconnect window; keeping the one known")
            }
        }
        tokio::time::sleep(WINDOW_REFRESH).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_failures_within_the_window() {
        for _ in 0..200 {
            assert!(reconnect_delay(1, None) < RECONNECT_WINDOW);
            assert!(reconnect_delay(2, None) < RECONNECT_WINDOW * 2);
            assert!(reconnect_delay(usize::MAX, None) < RECONNECT_MAX_WINDOW);
        }
        // Spread, not one fixed wait: 200 draws from a 1 s window are not all alike.
        let draws: std::collections::HashSet<_> =
            (0..200).map(|_| reconnect_delay(1, None)).collect();
        assert!(draws.len() > 50, "{} distinct waits", draws.len());
    }

    #[test]
    fn an_advertised_window_spreads_every_attempt_over_it() {
        let advertised = Some(Duration::from_secs(30));
        for attempts in [1, 2, 5, usize::MAX] {
            let draws: Vec<Duration> = (0..2000)
                .map(|_| reconnect_delay(attempts, advertised))
                .collect();
            assert!(draws.iter().all(|wait| *wait < Duration::from_secs(30)));
            // Over the whole window, not the client's own 1 to 8 s: a quarter of 2,000 uniform
            // draws lands in the last quarter, give or take (the odds of none are nil).
            let late = draws
                .iter()
                .filter(|wait| **wait >= Duration::from_millis(22_500))
                .count();
            assert!(
                (350..650).contains(&late),
                "{late} of 2000 in the last quarter"
            );
        }
        // A narrower window than the client's own doubling leaves the doubling as it is.
        let narrow = Some(Duration::from_secs(2));
        assert!((0..200).all(|_| reconnect_delay(1, narrow) < Duration::from_secs(2)));
        let spread: Vec<Duration> = (0..2000).map(|_| reconnect_delay(4, narrow)).collect();
        assert!(spread.iter().all(|wait| *wait < RECONNECT_MAX_WINDOW));
        assert!(spread.iter().any(|wait| *wait >= Duration::from_secs(6)));
        // Never past the protocol's widest, whatever was read.
        let huge = Some(Duration::from_secs(86_400));
        assert!((0..200).all(|_| reconnect_delay(1, huge) < kez_proto::reconnect::MAX_WINDOW));
    }

    #[test]
    fn the_initial_connect_does_not_wait() {
        let callback = delay_callback();
        assert_eq!(callback(1), Duration::ZERO);
        let later: Vec<_> = (0..50).map(|_| callback(1)).collect();
        assert!(later.iter().any(|wait| !wait.is_zero()), "{later:?}");
    }
}
