//! When a lost connection tries again (PROTOCOL.md §6.1, reconnects): a random wait in a
//! window that doubles with every failed attempt, so that the clients a broker restart drops
//! all at once come back spread out instead of all in the same millisecond, each of them an
//! authorization the callout has to answer within nats-server's authorization timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand_core::RngCore as _;

/// The window of the first attempt after the connection is lost.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(1);
/// The widest window: past a few failures every attempt waits a random time up to this long
/// (a person whose broker was away is back within this of its return).
pub const RECONNECT_MAX_WINDOW: Duration = Duration::from_secs(8);

/// The wait before connect attempt `attempts` (1: the first since the last success) after a
/// loss: uniform in `[0, window)`, the window [`RECONNECT_WINDOW`] doubled for each earlier
/// failed attempt, at most [`RECONNECT_MAX_WINDOW`]. Full jitter: the clients of one restart
/// are spread over the whole window, and clients refused because the callout could not keep
/// up spread themselves wider the next time.
pub fn reconnect_delay(attempts: usize) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(16);
    let window = RECONNECT_WINDOW
        .saturating_mul(1 << doublings)
        .min(RECONNECT_MAX_WINDOW);
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand_core::OsRng.next_u64() % window_ms.max(1))
}

/// async-nats' `reconnect_delay_callback` for one connection's options: the first call, the
/// connection's initial connect (async-nats asks the callback for that attempt too), does not
/// wait, so a command connecting to send one message is not slowed down; every later one waits
/// [`reconnect_delay`].
pub fn delay_callback() -> impl Fn(usize) -> Duration + Send + Sync + 'static {
    let initial_done = Arc::new(AtomicBool::new(false));
    move |attempts| {
        if initial_done.swap(true, Ordering::Relaxed) {
            reconnect_delay(attempts)
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_failures_within_the_window() {
        for _ in 0..200 {
            assert!(reconnect_delay(1) < RECONNECT_WINDOW);
            assert!(reconnect_delay(2) < RECONNECT_WINDOW * 2);
            assert!(reconnect_delay(usize::MAX) < RECONNECT_MAX_WINDOW);
        }
        // Spread, not one fixed wait: 200 draws from a 1 s window are not all alike.
        let draws: std::collections::HashSet<_> = (0..200).map(|_| reconnect_delay(1)).collect();
        assert!(draws.len() > 50, "{} distinct waits", draws.len());
    }

    #[test]
    fn the_initial_connect_does_not_wait() {
        let callback = delay_callback();
        assert_eq!(callback(1), Duration::ZERO);
        let later: Vec<_> = (0..50).map(|_| callback(1)).collect();
        assert!(later.iter().any(|wait| !wait.is_zero()), "{later:?}");
    }
}
