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
use kez_proto::ErrorAnswer;
use kez_proto::webfinger::{self, JRD_CONTENT_TYPE, Jrd, WEBFINGER_PATH};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::context::Context;
use crate::metrics::HttpEndpoint;

/// The health check path.
pub const HEALTH_PATH: &str = "/healthz";
/// The Prometheus metrics path.
pub const METRICS_PATH: &str = "/metrics";

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

fn not_found(message: impl Into<String>) -> Refusal {
    (StatusCode::NOT_FOUND, message.into())
}

/// The JRD for a WebFinger query, or why there is none.
async fn webfinger(context: &Context, query: Option<&str>) -> Result<Vec<u8>, Refusal> {
    let (asked, rels) = webfinger::account(query, &context.domain).map_err(|refusal| {
        let status = match refusal {
            webfinger::Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            webfinger::Refusal::NotFound(_) => StatusCode::NOT_FOUND,
        };
        (status, refusal.to_string())
    })?;
    // Without the broker every read would wait out its timeout: say so at once.
    if context.client.connection_state() != async_nats::connection::State::Connected {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "storage unavailable; retry".to_owned(),
        ));
    }
    let unavailable = |err: ErrorAnswer| {
        tracing::warn!(error = %err.message, "WebFinger: store read failed");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "storage unavailable; retry".to_owned(),
        )
    };
    let handle = match asked {
        webfinger::Asked::User(handle) => handle,
        webfinger::Asked::Server => {
            let federation = context
                .federation
                .as_ref()
                .ok_or_else(|| not_found("this server does not federate"))?;
            return serde_json::to_vec(&federation.discovery().jrd()).map_err(|err| {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("could not encode the answer: {err}"),
                )
            });
        }
    };
    let record = context
        .store
        .handle(handle.name())
        .await
        .map_err(unavailable)?
        .ok_or_else(|| not_found(format!("{handle} is not registered")))?;
    let head = context.store.head(record.key).await.map_err(unavailable)?;
    let jrd = Jrd::new(&record, head, &context.public_nats_url, &rels);
    serde_json::to_vec(&jrd).map_err(|err| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode the answer: {err}"),
        )
    })
}
