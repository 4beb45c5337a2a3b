//! When a lost connection tries again (PROTOCOL.md §6.1, reconnects): a random wait in a
//! window, so that the clients a broker restart drops all at once come back spread out instead
//! of all in the same millisecond, each of them an authorization the callout has to answer
//! within nats-server's authorization timeout.
//!
//! The window is the one the home server advertises ([`kez_proto::reconnect`]: the connections
//! its brokers hold over the authorizations per second it sustains), read by every connection
//! when it connects and every [`WINDOW_REFRESH`] after, and at least [`RECONNECT_WINDOW`]
//! doubled for each failed attempt up to [`RECONNECT_MAX_WINDOW`]. A process has one home
//! broker, so the window it learnt is the process's: every connection of it waits by it. A
//! connection whose authorization expired (the broker says so before it closes it) is alone in
//! coming back and does not wait out the window ([`Pacing`]).

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

/// nats-server's `-ERR` when a connection's authorization ends (the home server grants them
/// for an hour, PROTOCOL.md §6.1), right before it closes the connection.
const AUTHORIZATION_EXPIRED: &str = "user authentication expired";
/// How long a reconnect waits, before it draws its delay, for async-nats to hand the broker's
/// last words (an expired authorization's `-ERR`) to the event callback, which runs on a task
/// of its own. Should they come later, the connection waits as after a restart.
const LAST_WORDS_SETTLE: Duration = Duration::from_millis(5);

/// How one connection paces its reconnects: what its reconnect delays and its event callback
/// share. [`Pacing::pace`] sets async-nats' callbacks; the connection's event callback must hand
/// every event to [`Pacing::note`] ([`crate::Connection::options_with_events`] does).
#[derive(Debug, Default)]
pub struct Pacing {
    /// Whether the initial connect was made: every later attempt is a reconnect.
    initial_done: AtomicBool,
    /// Whether the broker ended the connection's authorization since it was last connected.
    expired: AtomicBool,
}

impl Pacing {
    /// The wait before connect attempt `attempts` (async-nats counts from 1 after every
    /// success): none for the initial connect, so a command connecting to send one message is
    /// not slowed down; after an expired authorization, the first attempt waits as if no window
    /// were advertised (the broker is up and only this connection is coming back:
    /// authorizations expire one by one, an hour after each was granted); every other one
    /// [`reconnect_delay`] with the [`advertised_window`].
    pub fn delay(&self, attempts: usize) -> Duration {
        self.delay_in(attempts, advertised_window())
    }

    /// [`Pacing::delay`] with `advertised` for the advertised window.
    fn delay_in(&self, attempts: usize, advertised: Option<Duration>) -> Duration {
        if !self.initial_done.swap(true, Ordering::Relaxed) {
            return Duration::ZERO;
        }
        if attempts <= 1 && self.expired.swap(false, Ordering::Relaxed) {
            return reconnect_delay(attempts, None);
        }
        reconnect_delay(attempts, advertised)
    }

    /// Takes note of a connection event: an expired authorization, or a connection made.
    pub fn note(&self, event: &async_nats::Event) {
        match event {
            async_nats::Event::ServerError(async_nats::ServerError::Other(text))
                if text.trim().eq_ignore_ascii_case(AUTHORIZATION_EXPIRED) =>
            {
                self.expired.store(true, Ordering::Relaxed);
            }
            async_nats::Event::Connected => self.expired.store(false, Ordering::Relaxed),
            _ => {}
        }
    }

    /// `options` with this pacing's reconnect delays, each reconnect first letting the events
    /// already received reach [`Pacing::note`] ([`LAST_WORDS_SETTLE`]).
    pub fn pace(
        self: &Arc<Self>,
        options: async_nats::ConnectOptions,
    ) -> async_nats::ConnectOptions {
        let (delays, settle) = (self.clone(), self.clone());
        options
            .reconnect_delay_callback(move |attempts| delays.delay(attempts))
            .reconnect_to_server_callback(move |_servers, _info| {
                let reconnecting = settle.initial_done.load(Ordering::Relaxed);
                async move {
                    if reconnecting {
                        tokio::time::sleep(LAST_WORDS_SETTLE).await;
                    }
                    // async-nats' own choice of server, then the delay above.
                    None
                }
            })
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
        let pacing = Pacing::default();
        assert_eq!(pacing.delay(1), Duration::ZERO);
        let later: Vec<_> = (0..50).map(|_| pacing.delay(1)).collect();
        assert!(later.iter().any(|wait| !wait.is_zero()), "{later:?}");
    }

    #[test]
    fn after_an_expired_authorization_the_first_attempt_does_not_wait_out_the_window() {
        let expired = || {
            async_nats::Event::ServerError(async_nats::ServerError::Other(
                "User Authentication Expired".into(),
            ))
        };
        let window = Some(Duration::from_secs(30));
        let pacing = Pacing::default();
        assert_eq!(pacing.delay_in(1, window), Duration::ZERO);
        for _ in 0..200 {
            pacing.note(&expired());
            assert!(pacing.delay_in(1, window) < RECONNECT_WINDOW);
        }
        // Without the broker's word (a restart), the window.
        let restart: Vec<Duration> = (0..200).map(|_| pacing.delay_in(1, window)).collect();
        assert!(restart.iter().any(|wait| *wait >= Duration::from_secs(5)));
        // Only the first attempt: a second one (the broker refused it) is paced as always, and
        // a connection made forgets an expiry noted before it.
        pacing.note(&expired());
        pacing.note(&async_nats::Event::Connected);
        assert!(!pacing.expired.load(Ordering::Relaxed));
        pacing.note(&expired());
        pacing.note(&async_nats::Event::Disconnected);
        assert!(pacing.expired.load(Ordering::Relaxed));
        pacing.note(&async_nats::Event::ServerError(
            async_nats::ServerError::AuthorizationViolation,
        ));
        assert!(pacing.delay_in(1, window) < RECONNECT_WINDOW);
        assert!(!pacing.expired.load(Ordering::Relaxed));
    }
}
