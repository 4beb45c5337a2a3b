//! Advertising the reconnect window (PROTOCOL.md §6.1).
//!
//! A broker restart drops all of its clients at once, and each reconnect is an authorization the
//! callout must answer within nats-server's authorization timeout. Clients that come back
//! faster than the deployment authorizes queue past that timeout, are refused, and come again:
//! the storm feeds itself (BENCHMARKS.md, storm). So the server tells its clients how widely to
//! spread their reconnects: the connections its brokers hold divided by the authorizations per
//! second the operator says the deployment sustains (`--reconnects-per-sec`), kept in the
//! directory bucket where every client reads it ([`kez_proto::reconnect`]).
//!
//! Every [`SAMPLE_EVERY`] the worker asks every nats-server for its statistics
//! (`$SYS.REQ.SERVER.PING.STATSZ`, a system account service, over the server's `SYS` user) and
//! takes the most connections one server holds; the window follows the highest count of the
//! last [`PEAK_SPAN`], so that the clients coming back from a restart, each reading the window
//! as it reconnects, do not shrink it while the broker is still filling up. A restarted worker
//! starts from the window it last advertised.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::store::Store;

/// Where every nats-server answers with its statistics (`ServerStatsMsg`).
pub const STATSZ_SUBJECT: &str = "$SYS.REQ.SERVER.PING.STATSZ";
/// How often the connections are counted.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How long a count is remembered: the window shrinks only once the brokers have held fewer
/// connections for this long.
pub const PEAK_SPAN: Duration = Duration::from_secs(600);
/// The longest pause between two counts that failed: a broker whose configuration does not let
/// the system user ask (a deployment not yet upgraded) logs each refusal.
pub const FAILED_COUNT_PAUSE_MAX: Duration = Duration::from_secs(300);
/// Default `--reconnects-per-sec`: what a 2-vCPU node authorizes per second in a reconnect storm
/// with its waits staying flat, even with 16,000 clients sharing its CPUs (BENCHMARKS.md, storm:
/// ~2,300 per second is all of its CPU, spent on nothing else).
pub const DEFAULT_RECONNECTS_PER_SEC: u32 = 1_800;

#[derive(Deserialize)]
struct StatszAnswer {
    statsz: Statsz,
}

#[derive(Deserialize)]
struct Statsz {
    connections: u64,
}

/// The client connections one server's answer to a STATSZ request counts.
pub fn parse_statsz(body: &[u8]) -> Result<u64, String> {
    serde_json::from_slice::<StatszAnswer>(body)
        .map(|answer| answer.statsz.connections)
        .map_err(|err| format!("unreadable STATSZ answer: {err}"))
}

/// The highest connection count of the last [`PEAK_SPAN`].
#[derive(Debug, Default)]
pub struct Peak {
    /// Counts with when they were taken, oldest first; none older than [`PEAK_SPAN`] past the
    /// latest.
    counts: VecDeque<(Instant, u64)>,
}

impl Peak {
    /// Remembers `count`, taken at `now` (not earlier than the counts before it).
    pub fn record(&mut self, now: Instant, count: u64) {
        while self
            .counts
            .front()
            .is_some_and(|&(taken, _)| now.duration_since(taken) > PEAK_SPAN)
        {
            self.counts.pop_front();
        }
        // A count no higher than a later one can never be the peak again.
        while self.counts.back().is_some_and(|&(_, held)| held <= count) {
            self.counts.pop_back();
        }
        self.counts.push_back((now, count));
    }

    /// The highest count remembered (0 when none is).
    pub fn highest(&self) -> u64 {
        self.counts.front().map_or(0, |&(_, count)| count)
    }
}

/// Starts the worker: counts over `system` (a connection of the system account), advertises in
/// `store`'s directory bucket, for a deployment that authorizes `reconnects_per_sec`.
pub fn spawn(
    system: async_nats::Client,
    store: Store,
    reconnects_per_sec: u32,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut peak = Peak::default();
        let mut advertised = match store.reconnect_window().await {
            Ok(window) => window,
            Err(err) => {
                tracing::warn!(error = %err.message, "cannot read the reconnect window advertised before; counting afresh");
                None
            }
        };
        if let Some(window) = advertised {
            let held = u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
                * u64::from(reconnects_per_sec)
                / 1000;
            peak.record(Instant::now(), held);
        }
        let mut failed_in_a_row = 0u32;
        let mut pause = Duration::ZERO;
        loop {
            tokio::time::sleep(pause).await;
            pause = SAMPLE_EVERY;
            let counts =
                crate::kick::every_server(&system, STATSZ_SUBJECT, b"{}".to_vec(), parse_statsz)
                    .await;
            let held = match counts {
                Ok(counts) => counts.into_iter().max().unwrap_or(0),
                Err(err) => {
                    // Logged once per outage (a broker restart is one); asked again less and
                    // less often, the window meanwhile as advertised.
                    if failed_in_a_row == 0 {
                        tracing::warn!(error = %err, "cannot count the brokers' connections; the reconnect window stays as advertised");
                    }
                    failed_in_a_row = failed_in_a_row.saturating_add(1);
                    pause = failed_count_pause(failed_in_a_row);
                    continue;
                }
            };
            failed_in_a_row = 0;
            peak.record(Instant::now(), held);
            let window = kez_proto::reconnect::window_for(peak.highest(), reconnects_per_sec);
            if advertised == Some(window) {
                continue;
            }
            match store.advertise_reconnect_window(window).await {
                Ok(()) => {
                    tracing::debug!(
                        ?window,
                        connections = peak.highest(),
                        "reconnect window advertised"
                    );
                    advertised = Some(window);
                }
                Err(err) => {
                    tracing::warn!(error = %err.message, "cannot advertise the reconnect window; trying again");
                }
            }
        }
    })
}

/// The pause after `failed` counts in a row failed: [`SAMPLE_EVERY`] doubled for each, at most
/// [`FAILED_COUNT_PAUSE_MAX`].
fn failed_count_pause(failed: u32) -> Duration {
    SAMPLE_EVERY
        .saturating_mul(1 << failed.min(16))
        .min(FAILED_COUNT_PAUSE_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_counts_are_retried_less_and_less_often() {
        assert_eq!(failed_count_pause(1), Duration::from_secs(10));
        assert_eq!(failed_count_pause(2), Duration::from_secs(20));
        assert_eq!(failed_count_pause(6), FAILED_COUNT_PAUSE_MAX);
        assert_eq!(failed_count_pause(u32::MAX), FAILED_COUNT_PAUSE_MAX);
    }

    /// Captured from nats-server 2.15.1: `$SYS.REQ.SERVER.PING.STATSZ` with `{}`, a broker
    /// holding three client connections (abridged: the members after `connections` are many).
    const STATSZ_ANSWER: &str = r#"{"server":{"name":"kez-test","host":"127.0.0.1","id":"NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN","ver":"2.15.1","jetstream":true,"flags":7,"seq":12,"time":"2026-12-07T06:00:00.0Z"},"statsz":{"start":"2026-12-07T05:59:58.0Z","mem":21000000,"cores":2,"cpu":1.5,"connections":3,"total_connections":5,"active_accounts":3,"subscriptions":120,"sent":{"msgs":10,"bytes":2000},"received":{"msgs":12,"bytes":2400},"slow_consumers":0}}"#;

    #[test]
    fn a_statsz_answer_gives_its_connections() {
        assert_eq!(parse_statsz(STATSZ_ANSWER.as_bytes()), Ok(3));
        for bad in [
            &b""[..],
            b"{}",
            br#"{"statsz":{}}"#,
            br#"{"statsz":{"connections":-1}}"#,
            br#"{"server":{"id":"N"},"error":{"code":403,"description":"no"}}"#,
        ] {
            assert!(parse_statsz(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_peak_holds_for_its_span_then_follows_the_count() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut peak = Peak::default();
        assert_eq!(peak.highest(), 0);
        peak.record(at(0), 16_000);
        // The broker restarted: its clients come back one by one.
        peak.record(at(5), 0);
        peak.record(at(10), 9_000);
        assert_eq!(peak.highest(), 16_000);
        peak.record(at(300), 12_000);
        assert_eq!(peak.highest(), 16_000);
        // Past the span the restart's count is forgotten, the highest since is kept.
        peak.record(at(601), 11_000);
        assert_eq!(peak.highest(), 12_000);
        peak.record(at(901), 10_000);
        assert_eq!(peak.highest(), 11_000);
        peak.record(at(902), 20_000);
        assert_eq!(peak.highest(), 20_000);
        // Only counts that may still become the peak are kept.
        assert_eq!(peak.counts.len(), 1);
    }
}
