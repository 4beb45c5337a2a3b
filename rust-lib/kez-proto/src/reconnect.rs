//! The reconnect window (PROTOCOL.md §6.1): how long clients spread their reconnects over after
//! their broker restarts, so that the authorizations arrive no faster than the deployment
//! answers them. The home server works it out from the connections its brokers hold and the
//! authorizations per second the operator says the deployment sustains, and keeps it in the
//! directory bucket under [`WINDOW_ID`], where every client may read it with the same direct
//! get as a directory entry ([`window_subject`], body [`crate::directory::DIRECT_GET_BODY`]).
//!
//! Pure: the window is a function of its inputs; the entry's bytes are encoded and read here.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::directory::DIRECT_GET_PREFIX;

/// The entry's key in the directory bucket. Not 64 hex digits, so never a slot's id.
pub const WINDOW_ID: &str = "reconnect-window";
/// The narrowest window: what a client uses when no window is advertised (a small home, an
/// older server, another broker configuration).
pub const MIN_WINDOW: Duration = Duration::from_secs(1);
/// The widest window a server advertises and a client accepts: a person whose broker restarted
/// is back within this (ten minutes) however many share the broker.
pub const MAX_WINDOW: Duration = Duration::from_secs(600);
/// The largest entry a client reads: `{"window_ms":600000}` with room for members added later.
pub const MAX_ENTRY_BYTES: usize = 256;

/// The subject of the direct get that reads the window.
pub fn window_subject() -> String {
    format!("{DIRECT_GET_PREFIX}.{WINDOW_ID}")
}

/// The window for `connections` held when `authorizations_per_sec` is what the deployment
/// answers: the time the last of them waits for its turn if they all come back at that rate,
/// within [`MIN_WINDOW`] and [`MAX_WINDOW`]. A rate of 0 counts as 1.
pub fn window_for(connections: u64, authorizations_per_sec: u32) -> Duration {
    let millis = connections.saturating_mul(1000) / u64::from(authorizations_per_sec.max(1));
    Duration::from_millis(millis).clamp(MIN_WINDOW, MAX_WINDOW)
}

#[derive(Serialize, Deserialize)]
struct Entry {
    /// The window in milliseconds.
    window_ms: u64,
}

/// The entry's bytes for `window`: `{"window_ms":<integer>}`.
pub fn encode(window: Duration) -> Vec<u8> {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    serde_json::to_vec(&Entry { window_ms }).expect("an integer member serializes")
}

/// Why an entry was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// Larger than [`MAX_ENTRY_BYTES`].
    #[error("reconnect window entry of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Not a JSON object with an integer `window_ms`.
    #[error("reconnect window entry is not readable: {0}")]
    Content(String),
}

/// Reads an entry: the window it names, brought within [`MIN_WINDOW`] and [`MAX_WINDOW`] (the
/// broker's word sets how long a client waits, so it is bounded here). Members other than
/// `window_ms` are ignored, so that a later release may add some.
pub fn decode(entry: &[u8]) -> Result<Duration, WindowError> {
    if entry.len() > MAX_ENTRY_BYTES {
        return Err(WindowError::TooLarge(entry.len()));
    }
    let entry: Entry =
        serde_json::from_slice(entry).map_err(|err| WindowError::Content(err.to_string()))?;
    Ok(Duration::from_millis(entry.window_ms).clamp(MIN_WINDOW, MAX_WINDOW))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_the_connections_at_the_sustained_rate_within_bounds() {
        assert_eq!(window_for(16_000, 2_000), Duration::from_secs(8));
        assert_eq!(window_for(100_000, 2_000), Duration::from_secs(50));
        assert_eq!(window_for(3_000, 2_000), Duration::from_millis(1_500));
        // A small home, or none connected: the clients' own first window.
        assert_eq!(window_for(0, 2_000), MIN_WINDOW);
        assert_eq!(window_for(1_999, 2_000), MIN_WINDOW);
        // More than a node should hold at that rate: capped, and no overflow.
        assert_eq!(window_for(10_000_000, 2_000), MAX_WINDOW);
        assert_eq!(window_for(u64::MAX, 1), MAX_WINDOW);
        assert_eq!(window_for(5, 0), Duration::from_secs(5));
    }

    #[test]
    fn an_entry_reads_back_as_written() {
        for window in [MIN_WINDOW, Duration::from_millis(8_250), MAX_WINDOW] {
            assert_eq!(decode(&encode(window)).unwrap(), window);
        }
        assert_eq!(encode(Duration::from_secs(8)), br#"{"window_ms":8000}"#);
    }

    #[test]
    fn a_hostile_entry_is_bounded_or_refused() {
        // Whatever the broker says, a client waits between the bounds.
        assert_eq!(decode(br#"{"window_ms":0}"#).unwrap(), MIN_WINDOW);
        assert_eq!(
            decode(br#"{"window_ms":18446744073709551615}"#).unwrap(),
            MAX_WINDOW
        );
        assert_eq!(
            decode(br#"{"window_ms":9000,"later":"member"}"#).unwrap(),
            Duration::from_secs(9)
        );
        for bad in [
            &b""[..],
            b"{}",
            b"[]",
            br#"{"window_ms":-1}"#,
            br#"{"window_ms":1.5}"#,
            br#"{"window_ms":"9000"}"#,
            b"\x01\x02",
        ] {
            assert!(
                matches!(decode(bad), Err(WindowError::Content(_))),
                "{bad:?}"
            );
        }
        let long = format!(r#"{{"window_ms":9000,"pad":"{}"}}"#, "x".repeat(300));
        assert_eq!(
            decode(long.as_bytes()),
            Err(WindowError::TooLarge(long.len()))
        );
    }

    #[test]
    fn the_entry_is_read_with_a_directory_direct_get_and_is_no_slot() {
        assert_eq!(
            window_subject(),
            "$JS.API.DIRECT.GET.KV_kez_directory.$KV.kez_directory.reconnect-window"
        );
        // Users may publish to the directory's one-token direct get.
        let allowed = crate::directory::DIRECT_GET_SUBJECTS.trim_end_matches('*');
        let rest = window_subject().strip_prefix(allowed).map(str::to_owned);
        assert_eq!(rest.as_deref(), Some(WINDOW_ID));
        assert!(!WINDOW_ID.contains('.'));
        assert_ne!(WINDOW_ID.len(), 64);
    }
}
