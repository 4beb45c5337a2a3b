//! Operator metrics, rendered in the Prometheus text format by `GET /metrics`.
//!
//! Plain atomics in fixed arrays: recording is a few uncontended atomic adds on the request path,
//! with no allocation and no lock.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use kez_proto::Endpoint;

/// Upper bounds of the latency histogram buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// The error codes counted (PROTOCOL.md §5.1).
const ERROR_CODES: [u16; 10] = [400, 401, 403, 404, 409, 413, 429, 500, 502, 503];
/// HTTP statuses the shim answers (PROTOCOL.md §7).
const HTTP_STATUSES: [u16; 8] = [200, 400, 404, 405, 414, 431, 500, 503];

/// What an HTTP request of the shim asked for, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpEndpoint {
    /// `/.well-known/webfinger`
    WebFinger,
    /// `/healthz`
    Health,
    /// `/metrics`
    Metrics,
    /// Any other path, and requests refused before they had one (unparseable, too large).
    Other,
}

impl HttpEndpoint {
    /// Every endpoint, in a fixed order (metrics index by it).
    pub const ALL: [HttpEndpoint; 4] = [
        HttpEndpoint::WebFinger,
        HttpEndpoint::Health,
        HttpEndpoint::Metrics,
        HttpEndpoint::Other,
    ];

    /// The `endpoint` label.
    pub fn label(self) -> &'static str {
        match self {
            HttpEndpoint::WebFinger => "webfinger",
            HttpEndpoint::Health => "healthz",
            HttpEndpoint::Metrics => "metrics",
            HttpEndpoint::Other => "other",
        }
    }
}

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

#[derive(Default)]
struct RouteMetrics {
    requests: AtomicU64,
    errors: [AtomicU64; ERROR_CODES.len()],
    latency: Histogram,
}

/// Most peer domains counted under their own name; the others are counted as `other`.
pub const MAX_METRIC_DOMAINS: usize = 1000;
/// The bounce and refusal reasons counted by name; any other is counted as `other` (a peer
/// chooses its error names).
const FEDERATION_REASONS: [&str; 15] = [
    "expired",
    "dialback_failed",
    "unavailable",
    "unknown_recipient",
    "recipient_revoked",
    "domain_blocked",
    "forbidden",
    "malformed",
    "too_large",
    "rate_limited",
    "peer_key_changed",
    "peer_key_in_use",
    "peer_unavailable",
    "bad_peer_answer",
    "not_federated",
];

/// What happened with one peer domain.
#[derive(Default)]
struct PeerCounters {
    sent: u64,
    received: u64,
    retries: u64,
    bounced: BTreeMap<&'static str, u64>,
    refused: BTreeMap<&'static str, u64>,
}

/// The reason label for `reason`.
fn reason_label(reason: &str) -> &'static str {
    FEDERATION_REASONS
        .iter()
        .find(|known| **known == reason)
        .copied()
        .unwrap_or("other")
}

/// What the callout decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutDecision {
    /// Allowed with the registered profile.
    Registered,
    /// Allowed with the unregistered profile.
    Unregistered,
    /// Refused.
    Denied,
    /// Allowed with the peer profile (another home server).
    Peer,
}

/// All counters of one server instance.
#[derive(Default)]
pub struct Metrics {
    routes: [RouteMetrics; Endpoint::ALL.len()],
    callout: [AtomicU64; 4],
    legacy_proofs: AtomicU64,
    http: [[AtomicU64; HTTP_STATUSES.len()]; HttpEndpoint::ALL.len()],
    inbox_acknowledged: AtomicU64,
    federation: Mutex<BTreeMap<String, PeerCounters>>,
    outbox_pending: AtomicU64,
    /// `kez.keys.claim` answers served here: one-time keys, fallback keys.
    prekey_claims: [AtomicU64; 2],
    /// Prekeys stored by `kez.keys.publish` (one-time and fallback keys, each counted).
    prekeys_published: AtomicU64,
}

/// Which prekey a claim was answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimServed {
    /// A one-time key, removed from the store before it was answered.
    OneTime,
    /// The fallback key (no one-time key left, or the target's budget spent).
    Fallback,
}

impl Metrics {
    /// Records one answered request: its route, how long it took and its error code, if any.
    pub fn record_request(&self, route: Endpoint, elapsed: Duration, error_code: Option<u16>) {
        let metrics = &self.routes[route.index()];
        metrics.requests.fetch_add(1, Relaxed);
        if let Some(slot) = error_code.and_then(|code| ERROR_CODES.iter().position(|&c| c == code))
        {
            metrics.errors[slot].fetch_add(1, Relaxed);
        }
        let seconds = elapsed.as_secs_f64();
        for (bucket, bound) in metrics.latency.buckets.iter().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        metrics.latency.count.fetch_add(1, Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        metrics.latency.sum_micros.fetch_add(micros, Relaxed);
    }

    /// Records a callout decision.
    pub fn record_callout(&self, decision: CalloutDecision) {
        self.callout[decision as usize].fetch_add(1, Relaxed);
    }

    /// Records a connection the callout let in on an untagged (legacy) connect proof.
    pub fn record_legacy_proof(&self) {
        self.legacy_proofs.fetch_add(1, Relaxed);
    }

    /// Records an HTTP answer of the shim by endpoint and status.
    pub fn record_http(&self, endpoint: HttpEndpoint, status: u16) {
        if let Some(slot) = HTTP_STATUSES.iter().position(|&s| s == status) {
            self.http[endpoint as usize][slot].fetch_add(1, Relaxed);
        }
    }

    /// Records messages a fetch deleted because their recipient acknowledged them
    /// ([`crate::mail::fetch`]).
    pub fn record_inbox_acknowledged(&self, messages: u64) {
        self.inbox_acknowledged.fetch_add(messages, Relaxed);
    }

    fn peer(&self, domain: &str, count: impl FnOnce(&mut PeerCounters)) {
        let mut peers = self
            .federation
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let domain = match peers.contains_key(domain) || peers.len() < MAX_METRIC_DOMAINS {
            true => domain,
            false => "other",
        };
        count(peers.entry(domain.to_owned()).or_default());
    }

    /// Records a message the outbox handed to `domain`'s server.
    pub fn record_federation_sent(&self, domain: &str) {
        self.peer(domain, |peer| peer.sent += 1);
    }

    /// Records a message `domain`'s server delivered here.
    pub fn record_federation_received(&self, domain: &str) {
        self.peer(domain, |peer| peer.received += 1);
    }

    /// Records a failed attempt of the outbox that will be made again.
    pub fn record_federation_retry(&self, domain: &str) {
        self.peer(domain, |peer| peer.retries += 1);
    }

    /// Records a message bounced to its sender for `reason`.
    pub fn record_federation_bounced(&self, domain: &str, reason: &str) {
        self.peer(domain, |peer| {
            *peer.bounced.entry(reason_label(reason)).or_default() += 1;
        });
    }

    /// Records a connection or delivery from `domain` refused for `reason`.
    pub fn record_federation_refused(&self, domain: &str, reason: &str) {
        self.peer(domain, |peer| {
            *peer.refused.entry(reason_label(reason)).or_default() += 1;
        });
    }

    /// Records a `kez.keys.claim` answered with a prekey of this server's.
    pub fn record_prekey_claim(&self, served: ClaimServed) {
        self.prekey_claims[served as usize].fetch_add(1, Relaxed);
    }

    /// Records prekeys a `kez.keys.publish` handed over and the server stored.
    pub fn record_prekeys_published(&self, count: u64) {
        self.prekeys_published.fetch_add(count, Relaxed);
    }

    /// Sets the outbox's pending messages, as its consumer last said.
    pub fn set_outbox_pending(&self, pending: u64) {
        self.outbox_pending.store(pending, Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let _ = self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP kez_requests_total Requests answered, per NATS endpoint."
        )?;
        writeln!(out, "# TYPE kez_requests_total counter")?;
        for route in Endpoint::ALL {
            let count = self.routes[route.index()].requests.load(Relaxed);
            writeln!(
                out,
                "kez_requests_total{{endpoint=\"{}\"}} {count}",
                route.subject()
            )?;
        }
        writeln!(
            out,
            "# HELP kez_request_errors_total Error answers, per NATS endpoint and code."
        )?;
        writeln!(out, "# TYPE kez_request_errors_total counter")?;
        for route in Endpoint::ALL {
            for (code, count) in ERROR_CODES.iter().zip(&self.routes[route.index()].errors) {
                let count = count.load(Relaxed);
                if count > 0 {
                    writeln!(
                        out,
                        "kez_request_errors_total{{endpoint=\"{}\",code=\"{code}\"}} {count}",
                        route.subject()
                    )?;
                }
            }
        }
        writeln!(
            out,
            "# HELP kez_request_duration_seconds Time to answer, per NATS endpoint."
        )?;
        writeln!(out, "# TYPE kez_request_duration_seconds histogram")?;
        for route in Endpoint::ALL {
            let histogram = &self.routes[route.index()].latency;
            let endpoint = route.subject();
            for (bucket, bound) in histogram.buckets.iter().zip(LATENCY_BUCKETS) {
                writeln!(
                    out,
                    "kez_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"{bound}\"}} {}",
                    bucket.load(Relaxed)
                )?;
            }
            let count = histogram.count.load(Relaxed);
            writeln!(
                out,
                "kez_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"+Inf\"}} {count}"
            )?;
            let sum = histogram.sum_micros.load(Relaxed) as f64 / 1e6;
            writeln!(
                out,
                "kez_request_duration_seconds_sum{{endpoint=\"{endpoint}\"}} {sum}"
            )?;
            writeln!(
                out,
                "kez_request_duration_seconds_count{{endpoint=\"{endpoint}\"}} {count}"
            )?;
        }
        writeln!(
            out,
            "# HELP kez_inbox_acknowledged_messages_total Delivered messages deleted from KEZ_MAIL once their recipient acknowledged them."
        )?;
        writeln!(out, "# TYPE kez_inbox_acknowledged_messages_total counter")?;
        writeln!(
            out,
            "kez_inbox_acknowledged_messages_total {}",
            self.inbox_acknowledged.load(Relaxed)
        )?;
        writeln!(
            out,
            "# HELP kez_prekey_claims_total Olm prekeys handed out by kez.keys.claim, per kind."
        )?;
        writeln!(out, "# TYPE kez_prekey_claims_total counter")?;
        for (kind, count) in ["one_time", "fallback"].iter().zip(&self.prekey_claims) {
            writeln!(
                out,
                "kez_prekey_claims_total{{kind=\"{kind}\"}} {}",
                count.load(Relaxed)
            )?;
        }
        writeln!(
            out,
            "# HELP kez_prekeys_published_total Olm prekeys devices published (kez.keys.publish)."
        )?;
        writeln!(out, "# TYPE kez_prekeys_published_total counter")?;
        writeln!(
            out,
            "kez_prekeys_published_total {}",
            self.prekeys_published.load(Relaxed)
        )?;
        writeln!(
            out,
            "# HELP kez_callout_decisions_total Auth callout decisions."
        )?;
        writeln!(out, "# TYPE kez_callout_decisions_total counter")?;
        for (name, count) in ["registered", "unregistered", "denied", "peer"]
            .iter()
            .zip(&self.callout)
        {
            writeln!(
                out,
                "kez_callout_decisions_total{{decision=\"{name}\"}} {}",
                count.load(Relaxed)
            )?;
        }
        writeln!(
            out,
            "# HELP kez_callout_legacy_proofs_total Connections let in on an untagged connect proof (clients older than this release; they should be upgraded)."
        )?;
        writeln!(out, "# TYPE kez_callout_legacy_proofs_total counter")?;
        writeln!(
            out,
            "kez_callout_legacy_proofs_total {}",
            self.legacy_proofs.load(Relaxed)
        )?;
        writeln!(
            out,
            "# HELP kez_http_requests_total HTTP answers of the WebFinger/operator shim, per endpoint and status."
        )?;
        writeln!(out, "# TYPE kez_http_requests_total counter")?;
        for endpoint in HttpEndpoint::ALL {
            for (status, count) in HTTP_STATUSES.iter().zip(&self.http[endpoint as usize]) {
                writeln!(
                    out,
                    "kez_http_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {}",
                    endpoint.label(),
                    count.load(Relaxed)
                )?;
            }
        }
        self.write_federation(out)
    }

    fn write_federation(&self, out: &mut String) -> std::fmt::Result {
        let peers = self
            .federation
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for (name, help, count) in [
            (
                "kez_federation_sent_total",
                "Messages the outbox handed to a peer server, per peer domain.",
                (|peer: &PeerCounters| peer.sent) as fn(&PeerCounters) -> u64,
            ),
            (
                "kez_federation_received_total",
                "Messages a peer server delivered here, per peer domain.",
                |peer| peer.received,
            ),
            (
                "kez_federation_retries_total",
                "Failed outbox attempts that will be made again, per peer domain.",
                |peer| peer.retries,
            ),
        ] {
            writeln!(out, "# HELP {name} {help}")?;
            writeln!(out, "# TYPE {name} counter")?;
            for (domain, peer) in peers.iter() {
                writeln!(out, "{name}{{domain=\"{domain}\"}} {}", count(peer))?;
            }
        }
        for (name, help, reasons) in [
            (
                "kez_federation_bounced_total",
                "Messages bounced to their sender, per peer domain and reason.",
                (|peer: &PeerCounters| &peer.bounced)
                    as fn(&PeerCounters) -> &BTreeMap<&'static str, u64>,
            ),
            (
                "kez_federation_refused_total",
                "Peer connections and deliveries refused, per peer domain and reason.",
                |peer| &peer.refused,
            ),
        ] {
            writeln!(out, "# HELP {name} {help}")?;
            writeln!(out, "# TYPE {name} counter")?;
            for (domain, peer) in peers.iter() {
                for (reason, count) in reasons(peer) {
                    writeln!(
                        out,
                        "{name}{{domain=\"{domain}\",reason=\"{reason}\"}} {count}"
                    )?;
                }
            }
        }
        writeln!(
            out,
            "# HELP kez_outbox_pending Messages in KEZ_OUTBOX not yet handed to a worker."
        )?;
        writeln!(out, "# TYPE kez_outbox_pending gauge")?;
        writeln!(
            out,
            "kez_outbox_pending {}",
            self.outbox_pending.load(Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_errors_and_latency_are_counted() {
        let metrics = Metrics::default();
        metrics.record_request(Endpoint::Lookup, Duration::from_micros(700), None);
        metrics.record_request(Endpoint::Lookup, Duration::from_millis(30), Some(404));
        metrics.record_callout(CalloutDecision::Denied);
        metrics.record_legacy_proof();
        metrics.record_http(HttpEndpoint::WebFinger, 405);
        metrics.record_inbox_acknowledged(3);
        metrics.record_inbox_acknowledged(2);
        let text = metrics.render();
        assert!(text.contains("kez_requests_total{endpoint=\"kez.registry.lookup\"} 2"));
        assert!(
            text.contains(
                "kez_request_errors_total{endpoint=\"kez.registry.lookup\",code=\"404\"} 1"
            )
        );
        assert!(text.contains(
            "kez_request_duration_seconds_bucket{endpoint=\"kez.registry.lookup\",le=\"0.001\"} 1"
        ));
        assert!(text.contains(
            "kez_request_duration_seconds_bucket{endpoint=\"kez.registry.lookup\",le=\"0.05\"} 2"
        ));
        assert!(
            text.contains("kez_request_duration_seconds_count{endpoint=\"kez.registry.lookup\"} 2")
        );
        assert!(text.contains("kez_callout_decisions_total{decision=\"denied\"} 1"));
        assert!(text.contains("kez_callout_legacy_proofs_total 1\n"));
        assert!(text.contains("kez_http_requests_total{endpoint=\"webfinger\",status=\"405\"} 1"));
        assert!(text.contains("kez_http_requests_total{endpoint=\"healthz\",status=\"405\"} 0"));
        assert!(text.contains("kez_inbox_acknowledged_messages_total 5\n"));
    }

    #[test]
    fn federation_is_counted_per_domain_within_bounds() {
        let metrics = Metrics::default();
        metrics.record_callout(CalloutDecision::Peer);
        metrics.record_federation_sent("b.localhost");
        metrics.record_federation_received("b.localhost");
        metrics.record_federation_retry("b.localhost");
        metrics.record_federation_bounced("b.localhost", "expired");
        metrics.record_federation_bounced("b.localhost", "whatever_a_peer_says");
        metrics.record_federation_refused("c.localhost", "rate_limited");
        metrics.set_outbox_pending(7);
        let text = metrics.render();
        for line in [
            "kez_callout_decisions_total{decision=\"peer\"} 1",
            "kez_federation_sent_total{domain=\"b.localhost\"} 1",
            "kez_federation_received_total{domain=\"b.localhost\"} 1",
            "kez_federation_retries_total{domain=\"b.localhost\"} 1",
            "kez_federation_bounced_total{domain=\"b.localhost\",reason=\"expired\"} 1",
            "kez_federation_bounced_total{domain=\"b.localhost\",reason=\"other\"} 1",
            "kez_federation_refused_total{domain=\"c.localhost\",reason=\"rate_limited\"} 1",
            "kez_outbox_pending 7",
        ] {
            assert!(text.contains(line), "{line}");
        }
        for i in 0..MAX_METRIC_DOMAINS + 10 {
            metrics.record_federation_received(&format!("d{i}.example"));
        }
        let text = metrics.render();
        assert!(text.contains("kez_federation_received_total{domain=\"other\"} 12"));
        assert!(!text.contains(&format!("d{}.example", MAX_METRIC_DOMAINS + 5)));
    }
}
