//! Operator metrics, rendered in the Prometheus text format by `GET /metrics`.
//!
//! Plain atomics in fixed arrays: recording is a few uncontended atomic adds on the request path,
//! with no allocation and no lock.

use std::fmt::Write as _;
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

/// What the callout decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutDecision {
    /// Allowed with the registered profile.
    Registered,
    /// Allowed with the unregistered profile.
    Unregistered,
    /// Refused.
    Denied,
}

/// All counters of one server instance.
#[derive(Default)]
pub struct Metrics {
    routes: [RouteMetrics; Endpoint::ALL.len()],
    callout: [AtomicU64; 3],
    legacy_proofs: AtomicU64,
    http: [[AtomicU64; HTTP_STATUSES.len()]; HttpEndpoint::ALL.len()],
    inbox_acknowledged: AtomicU64,
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
            "# HELP kez_callout_decisions_total Auth callout decisions."
        )?;
        writeln!(out, "# TYPE kez_callout_decisions_total counter")?;
        for (name, count) in ["registered", "unregistered", "denied"]
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
        Ok(())
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
}
