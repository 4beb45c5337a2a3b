//! The HTTP shim: WebFinger (RFC 7033) for `acct:` handles, and `/healthz` and `/metrics` for
//! operators. PROTOCOL.md §7.
//!
//! Plain HTTP/1.1 on hyper, off unless `--http-listen` is set; TLS is a reverse proxy's job
//! (`deploy/`). Everything here answers from the same [`Context`] as the NATS services and
//! changes nothing: the shim only reads.
//!
//! Limits: a request head (request line and headers) of at most [`MAX_HEAD_BYTES`] (431), a
//! request target of at most [`MAX_URI_BYTES`] (414), [`HttpLimits::header_read_timeout`] to
//! send the head, [`HttpLimits::max_connections`] connections at once (more wait in the listen
//! backlog), [`HttpLimits::connection_lifetime`] per connection. Request bodies are never read.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use kez_core::Handle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::handlers::{Context, Route};
use crate::metrics::HttpEndpoint;
use crate::store::HandleRecord;

/// The WebFinger path (RFC 7033 §10.1).
pub const WEBFINGER_PATH: &str = "/.well-known/webfinger";
/// The health check path.
pub const HEALTH_PATH: &str = "/healthz";
/// The Prometheus metrics path.
pub const METRICS_PATH: &str = "/metrics";

/// Link relation: the home server's NATS endpoint (`href` is the NATS URL clients connect to).
pub const REL_NATS: &str = "https://kez.lat/ns/rel/nats";
/// Link relation: the account's sigchain, served over NATS (`href` is the NATS URL; the link's
/// properties name the subject and the key to ask for).
pub const REL_SIGCHAIN: &str = "https://kez.lat/ns/rel/sigchain";
/// Property: a KEZ key (PROTOCOL.md §1.1 text form).
pub const PROP_KEY: &str = "https://kez.lat/ns/key";
/// Property: the handle in its full `@name@domain` form.
pub const PROP_HANDLE: &str = "https://kez.lat/ns/handle";
/// Property: the sigchain's last seq as a decimal string, or `null` without a sigchain.
pub const PROP_SIGCHAIN_SEQ: &str = "https://kez.lat/ns/sigchain-seq";
/// Property: the sigchain's head (hex link hash), or `null` without a sigchain.
pub const PROP_SIGCHAIN_HEAD: &str = "https://kez.lat/ns/sigchain-head";
/// Link property: the NATS subject to send requests to.
pub const PROP_NATS_SUBJECT: &str = "https://kez.lat/ns/nats-subject";

/// The JRD media type (RFC 7033 §10.2).
pub const JRD_CONTENT_TYPE: &str = "application/jrd+json";
/// The Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";
/// What every endpoint accepts.
const ALLOWED_METHODS: &str = "GET, HEAD";

/// Largest request head (request line plus headers), in bytes; larger is answered 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest request target (path and query), in bytes; longer is answered 414.
pub const MAX_URI_BYTES: usize = 2 * 1024;
/// Most header fields in a request; more is answered 431.
const MAX_HEADERS: usize = 64;
/// A request (its store reads) that takes longer is answered 503.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The health check's store read must answer within this.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The shim's limits; [`Default`] is what `run` uses.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// A connection must send a complete request head within this, else it is closed (no
    /// answer). Also bounds the idle time between keep-alive requests.
    pub header_read_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// A connection is closed after this long, whatever it is doing.
    pub connection_lifetime: Duration,
    /// On shutdown, open connections get this long to finish before they are cut.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 256,
            connection_lifetime: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// What the shim answers from.
#[derive(Clone)]
pub(crate) enum Phase {
    /// The server is starting: every request but a 404 is answered 503, `/healthz` with why
    /// the server is not serving yet (waiting for the broker, for JetStream, ...).
    Starting(Arc<str>),
    /// The server serves: answers come from its context.
    Serving(Arc<Context>),
}

/// A bound, not yet serving HTTP listener.
pub(crate) struct HttpShim {
    listener: TcpListener,
    addr: SocketAddr,
    limits: HttpLimits,
}

impl HttpShim {
    /// Binds `addr` (port 0: the OS picks one; [`HttpShim::local_addr`] tells which).
    pub(crate) async fn bind(addr: SocketAddr, limits: HttpLimits) -> std::io::Result<HttpShim> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(HttpShim {
            listener,
            addr,
            limits,
        })
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves from the current `phase` until `stop` changes (or its sender goes), then stops
    /// accepting, lets open connections finish their current request for up to
    /// [`HttpLimits::shutdown_grace`] and cuts the rest.
    pub(crate) async fn serve(
        self,
        phase: watch::Receiver<Phase>,
        mut stop: watch::Receiver<bool>,
    ) {
        tracing::info!(addr = %self.addr, "HTTP shim serving");
        let permits = Arc::new(Semaphore::new(self.limits.max_connections.max(1)));
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_header_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS)
            .max_buf_size(2 * MAX_HEAD_BYTES)
            .half_close(false);
        let mut connections = JoinSet::new();
        loop {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_closed) => break,
                },
                _ = stop.changed() => break,
            };
            let accepted = loop {
                tokio::select! {
                    accepted = self.listener.accept() => match accepted {
                        Ok(accepted) => break Some(accepted),
                        Err(err) => {
                            tracing::warn!(error = %err, "HTTP accept failed");
                            tokio::time::sleep(ACCEPT_RETRY).await;
                        }
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    _ = stop.changed() => break None,
                }
            };
            let Some((stream, peer)) = accepted else {
                break;
            };
            let connection = builder.serve_connection(
                TokioIo::new(stream),
                service_fn({
                    let phase = phase.clone();
                    move |request| {
                        let now = phase.borrow().clone();
                        async move {
                            Ok::<_, Infallible>(match now {
                                Phase::Serving(context) => answer(&context, request).await,
                                Phase::Starting(reason) => answer_starting(&reason, &request),
                            })
                        }
                    }
                }),
            );
            let mut stop = stop.clone();
            let phase = phase.clone();
            let lifetime = self.limits.connection_lifetime;
            connections.spawn(async move {
                let _permit = permit;
                let mut connection = std::pin::pin!(connection);
                let run = async {
                    tokio::select! {
                        result = connection.as_mut() => result,
                        _ = stop.changed() => {
                            connection.as_mut().graceful_shutdown();
                            connection.as_mut().await
                        }
                    }
                };
                match tokio::time::timeout(lifetime, run).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => connection_failed(&phase.borrow().clone(), peer, &err),
                    Err(_elapsed) => {
                        tracing::debug!(%peer, "HTTP connection lifetime over; closed");
                    }
                }
            });
        }
        drop(self.listener);
        let grace = self.limits.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open = connections.len(),
                "HTTP connections still open after the grace period; closing them"
            );
            connections.shutdown().await;
        }
        tracing::info!("HTTP shim stopped");
    }
}

/// Counts the answers hyper sent by itself (a request it could not parse) and logs the rest.
fn connection_failed(phase: &Phase, peer: SocketAddr, err: &hyper::Error) {
    if let Phase::Serving(context) = phase {
        if err.is_parse_too_large() {
            context.metrics.record_http(HttpEndpoint::Other, 431);
        } else if err.is_parse() && !err.is_parse_version_h2() {
            context.metrics.record_http(HttpEndpoint::Other, 400);
        }
    }
    tracing::debug!(%peer, error = %err, "HTTP connection ended with an error");
}

/// Answers one request, whatever it holds, and counts the answer.
async fn answer(
    context: &Context,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let endpoint = match request.uri().path() {
        WEBFINGER_PATH => HttpEndpoint::WebFinger,
        HEALTH_PATH => HttpEndpoint::Health,
        METRICS_PATH => HttpEndpoint::Metrics,
        _ => HttpEndpoint::Other,
    };
    let work = AssertUnwindSafe(route(context, endpoint, &request));
    let mut response = match tokio::time::timeout(REQUEST_TIMEOUT, work.catch_unwind()).await {
        Ok(Ok(response)) => response,
        Ok(Err(_panic)) => {
            tracing::error!(uri = %request.uri(), "HTTP handler panicked");
            text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
        Err(_elapsed) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request took too long; retry\n",
        ),
    };
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if endpoint == HttpEndpoint::WebFinger {
        // RFC 7033 §5: browsers' JavaScript may read every WebFinger answer, errors included.
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    context
        .metrics
        .record_http(endpoint, response.status().as_u16());
    response
}

/// Answers one request while the server starts: 503 for what it serves (`/healthz` saying why it
/// does not serve yet), 404 for the rest. Nothing is counted: the metrics start with serving.
fn answer_starting(
    reason: &str,
    request: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let mut response = match request.uri().path() {
        HEALTH_PATH => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("starting: {reason}\n"),
        ),
        WEBFINGER_PATH | METRICS_PATH => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is starting; retry shortly\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if request.uri().path() == WEBFINGER_PATH {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    response
}

async fn route(
    context: &Context,
    endpoint: HttpEndpoint,
    request: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let target_len = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if target_len > MAX_URI_BYTES {
        return text(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {target_len} bytes; the limit is {MAX_URI_BYTES}\n"),
        );
    }
    if endpoint == HttpEndpoint::Other {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("use {ALLOWED_METHODS}\n"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
        return response;
    }
    // HEAD: hyper sends the headers (Content-Length included) of the same answer, not its body.
    match endpoint {
        HttpEndpoint::WebFinger => match webfinger(context, request.uri().query()).await {
            Ok(jrd) => {
                let mut response = Response::new(Full::new(Bytes::from(jrd)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(JRD_CONTENT_TYPE),
                );
                response
            }
            Err((status, message)) => text(status, format!("{message}\n")),
        },
        HttpEndpoint::Health => match health(context).await {
            Ok(()) => text(StatusCode::OK, "ok\n"),
            Err(problem) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")),
        },
        HttpEndpoint::Metrics => {
            let mut response = Response::new(Full::new(Bytes::from(context.metrics.render())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(METRICS_CONTENT_TYPE),
            );
            response
        }
        HttpEndpoint::Other => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(TEXT_CONTENT_TYPE),
    );
    response
}

/// Healthy: the NATS connection is up and every bucket answers a read.
async fn health(context: &Context) -> Result<(), &'static str> {
    if context.client.connection_state() != async_nats::connection::State::Connected {
        return Err("NATS connection down");
    }
    match tokio::time::timeout(HEALTH_TIMEOUT, context.store.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => {
            tracing::warn!(error = %err.message, "health check: buckets do not answer");
            Err("JetStream key-value buckets do not answer")
        }
        Err(_elapsed) => Err("JetStream key-value buckets do not answer in time"),
    }
}

type Refusal = (StatusCode, String);

fn bad_request(message: impl Into<String>) -> Refusal {
    (StatusCode::BAD_REQUEST, message.into())
}

fn not_found(message: impl Into<String>) -> Refusal {
    (StatusCode::NOT_FOUND, message.into())
}

/// The WebFinger parameters: `resource` (exactly once) and any number of `rel`.
#[derive(Debug, PartialEq, Eq)]
struct Query {
    resource: String,
    rels: Vec<String>,
}

/// Parses the query component: `&`-separated `name=value` pairs, both percent-decoded (RFC 3986
/// §2.1, strictly: `%` must start a two-hex-digit escape and the result must be UTF-8; `+` is a
/// plus sign). Unknown parameters are ignored (RFC 7033 §4.1 leaves room for extensions).
fn parse_query(query: Option<&str>) -> Result<Query, Refusal> {
    let mut resource = None;
    let mut rels = Vec::new();
    for pair in query.unwrap_or_default().split('&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name).map_err(bad_request)?;
        let value = percent_decode(value).map_err(bad_request)?;
        match name.as_str() {
            "resource" if resource.is_some() => {
                return Err(bad_request("resource is given more than once"));
            }
            "resource" => resource = Some(value),
            "rel" => rels.push(value),
            _ => {}
        }
    }
    match resource {
        None => Err(bad_request(
            "missing resource parameter, e.g. ?resource=acct:alice@kez.lat",
        )),
        Some(resource) if resource.is_empty() => Err(bad_request("resource is empty")),
        Some(resource) => Ok(Query { resource, rels }),
    }
}

/// Strict percent-decoding (RFC 3986 §2.1) into UTF-8.
fn percent_decode(input: &str) -> Result<String, String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&byte, tail)) = rest.split_first() {
        if byte != b'%' {
            out.push(byte);
            rest = tail;
            continue;
        }
        match tail {
            [high, low, after @ ..] => match (hex_digit(*high), hex_digit(*low)) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    rest = after;
                }
                _ => return Err(format!("bad percent-encoding in {input:?}")),
            },
            _ => return Err(format!("bad percent-encoding in {input:?}")),
        }
    }
    String::from_utf8(out).map_err(|_| format!("{input:?} does not decode to UTF-8"))
}

fn hex_digit(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// An `acct:` URI (RFC 7565) split into its percent-decoded user part and host.
fn parse_acct(resource: &str) -> Result<(String, String), Refusal> {
    let Some((scheme, rest)) = resource.split_once(':') else {
        return Err(bad_request(format!(
            "resource {resource:?} is not a URI; use acct:name@domain"
        )));
    };
    // URI schemes are case-insensitive (RFC 3986 §3.1).
    if !scheme.eq_ignore_ascii_case("acct") {
        return Err(bad_request(format!(
            "only acct: resources are served here, not {scheme:?}"
        )));
    }
    let Some((user, host)) = rest.split_once('@') else {
        return Err(bad_request("an acct: resource is acct:name@domain"));
    };
    // userpart = 1*( unreserved / sub-delims / pct-encoded ); host is an RFC 3986 host.
    let user_ok = !user.is_empty() && user.bytes().all(|b| uri_char(b) || b == b'%');
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| uri_char(b) || matches!(b, b'%' | b'[' | b']' | b':'));
    if !user_ok || !host_ok {
        return Err(bad_request(format!(
            "{resource:?} is not an acct: URI (acct:name@domain)"
        )));
    }
    let user = percent_decode(user).map_err(bad_request)?;
    let host = percent_decode(host).map_err(bad_request)?;
    Ok((user, host))
}

/// RFC 3986 unreserved and sub-delims characters.
fn uri_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

#[derive(Serialize)]
struct Jrd {
    subject: String,
    aliases: Vec<String>,
    properties: BTreeMap<&'static str, Option<String>>,
    links: Vec<Link>,
}

#[derive(Serialize)]
struct Link {
    rel: &'static str,
    href: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    properties: BTreeMap<&'static str, Option<String>>,
}

/// The JRD for a WebFinger query, or why there is none.
async fn webfinger(context: &Context, query: Option<&str>) -> Result<Vec<u8>, Refusal> {
    let query = parse_query(query)?;
    let (user, host) = parse_acct(&query.resource)?;
    let domain = host.to_ascii_lowercase();
    if domain != context.domain {
        return Err(not_found(format!(
            "{domain} is not served here; this server serves {}",
            context.domain
        )));
    }
    // The registry's own normalisation (PROTOCOL.md §2). A name no handle can have names no
    // account here.
    let handle = match user.contains('@') {
        true => None,
        false => Handle::parse(&format!("@{user}@{domain}"), &context.domain).ok(),
    }
    .ok_or_else(|| not_found(format!("no account {user:?} here")))?;
    // Without the broker every read would wait out its timeout: say so at once.
    if context.client.connection_state() != async_nats::connection::State::Connected {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "storage unavailable; retry".to_owned(),
        ));
    }
    let unavailable = |err: crate::error::ApiError| {
        tracing::warn!(error = %err.message, "WebFinger: store read failed");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "storage unavailable; retry".to_owned(),
        )
    };
    let record = context
        .store
        .handle(handle.name())
        .await
        .map_err(unavailable)?
        .ok_or_else(|| not_found(format!("{handle} is not registered")))?;
    let head = context.store.head(record.key).await.map_err(unavailable)?;
    let jrd = jrd(context, &record, head, &query.rels);
    serde_json::to_vec(&jrd).map_err(|err| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode the answer: {err}"),
        )
    })
}

fn jrd(
    context: &Context,
    record: &HandleRecord,
    head: Option<crate::store::ChainHead>,
    rels: &[String],
) -> Jrd {
    let key = record.key.to_string();
    let properties = BTreeMap::from([
        (PROP_KEY, Some(key.clone())),
        (PROP_HANDLE, Some(record.handle.to_string())),
        (PROP_SIGCHAIN_SEQ, head.map(|head| head.seq.to_string())),
        (PROP_SIGCHAIN_HEAD, head.map(|head| head.head.to_string())),
    ]);
    let links = [
        Link {
            rel: REL_NATS,
            href: context.public_nats_url.clone(),
            properties: BTreeMap::new(),
        },
        Link {
            rel: REL_SIGCHAIN,
            href: context.public_nats_url.clone(),
            properties: BTreeMap::from([
                (
                    PROP_NATS_SUBJECT,
                    Some(Route::GetChain.subject().to_owned()),
                ),
                (PROP_KEY, Some(key.clone())),
            ]),
        },
    ];
    Jrd {
        subject: format!("acct:{}@{}", record.handle.name(), record.handle.domain()),
        aliases: vec![key],
        properties,
        links: links
            .into_iter()
            .filter(|link| rels.is_empty() || rels.iter().any(|rel| rel == link.rel))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(
            percent_decode("acct%3Aalice%40kez.lat").unwrap(),
            "acct:alice@kez.lat"
        );
        assert_eq!(percent_decode("a%2b+b").unwrap(), "a++b");
        assert_eq!(percent_decode("%C3%A9").unwrap(), "é");
        for bad in ["%", "%4", "%4g", "%%41", "a%zz", "%C3", "%FF"] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queries_need_exactly_one_resource() {
        let query = parse_query(Some("rel=a&resource=acct%3Ax%40y&rel=b&x&&other=1")).unwrap();
        assert_eq!(
            query,
            Query {
                resource: "acct:x@y".into(),
                rels: vec!["a".into(), "b".into()],
            }
        );
        for bad in [
            None,
            Some(""),
            Some("rel=a"),
            Some("resource="),
            Some("resource"),
            Some("resource=a&resource=a"),
            Some("resource=acct:x@y&resourc%65=acct:x@y"),
            Some("resource=%zz"),
        ] {
            let (status, _) = parse_query(bad).unwrap_err();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn acct_uris() {
        assert_eq!(
            parse_acct("ACCT:Alice@KEZ.lat").unwrap(),
            ("Alice".into(), "KEZ.lat".into())
        );
        assert_eq!(
            parse_acct("acct:%61lice@kez.lat").unwrap(),
            ("alice".into(), "kez.lat".into())
        );
        for bad in [
            "alice@kez.lat",
            "https://kez.lat/@alice",
            "mailto:alice@kez.lat",
            "acct:alice",
            "acct:@kez.lat",
            "acct:alice@",
            "acct:a@b@kez.lat",
            "acct:al ice@kez.lat",
            "acct:al/ice@kez.lat",
            "acct:alïce@kez.lat",
            "acct:alice@kez.lat/x",
            "acct:%zz@kez.lat",
        ] {
            let (status, _) = parse_acct(bad).unwrap_err();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
