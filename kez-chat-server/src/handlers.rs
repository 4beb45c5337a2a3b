//! The wire layer: decode a request, call the store, encode the answer. PROTOCOL.md §5.

use bytes::Bytes;
use kez_core::connect::ProofForm;
use kez_core::pin::PinOp;
use kez_core::registry::{REGISTRATION_WINDOW_SECS, RegistrationRequest};
use kez_core::sigchain::MAX_LINK_BYTES;
use kez_core::{Handle, PublicKey, SignedLink};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::callout::{Callout, Verdict};
use crate::error::{ApiError, RETRY_AFTER_HEADER};
use crate::limits::{Caller, Limited, Limiter};
use crate::metrics::{CalloutDecision, Metrics};
use crate::pin::Pinning;
use crate::store::{ChainHead, HandleRecord, Registered, Store};

/// Largest request body any endpoint accepts, in bytes.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Most link bytes one `kez.sigchain.get` answer carries; `more` says when to ask again.
pub const MAX_CHAIN_PAGE_BYTES: usize = 256 * 1024;

/// Every endpoint, by subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `kez.registry.register`
    Register,
    /// `kez.registry.lookup`
    Lookup,
    /// `kez.registry.whois`
    Whois,
    /// `kez.sigchain.append`
    Append,
    /// `kez.sigchain.get`
    GetChain,
    /// `kez.sigchain.head`
    Head,
    /// `kez.server.info`
    Info,
    /// `$SYS.REQ.USER.AUTH` (on the `AUTH` account connection)
    Authorize,
    /// `kez.pin.add`
    PinAdd,
    /// `kez.pin.remove`
    PinRemove,
    /// `kez.pin.list`
    PinList,
    /// `kez.pin.status`
    PinStatus,
    /// `kez.mail.send`
    MailSend,
}

impl Route {
    /// Every route, in a fixed order (metrics index by it).
    pub const ALL: [Route; 13] = [
        Route::Register,
        Route::Lookup,
        Route::Whois,
        Route::Append,
        Route::GetChain,
        Route::Head,
        Route::Info,
        Route::Authorize,
        Route::PinAdd,
        Route::PinRemove,
        Route::PinList,
        Route::PinStatus,
        Route::MailSend,
    ];

    /// The route's position in [`Route::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The subject the route answers.
    pub fn subject(self) -> &'static str {
        match self {
            Route::Register => "kez.registry.register",
            Route::Lookup => "kez.registry.lookup",
            Route::Whois => "kez.registry.whois",
            Route::Append => "kez.sigchain.append",
            Route::GetChain => "kez.sigchain.get",
            Route::Head => "kez.sigchain.head",
            Route::Info => "kez.server.info",
            Route::Authorize => kez_nats_jwt::AUTH_CALLOUT_SUBJECT,
            Route::PinAdd => "kez.pin.add",
            Route::PinRemove => "kez.pin.remove",
            Route::PinList => "kez.pin.list",
            Route::PinStatus => "kez.pin.status",
            Route::MailSend => kez_core::mail::SEND_SUBJECT,
        }
    }
}

/// One NATS micro-service: its name, subject prefix and endpoints.
pub struct ServiceSpec {
    /// Service name, as `$SRV.PING.<name>` finds it.
    pub name: &'static str,
    /// Subject prefix of its endpoints.
    pub prefix: &'static str,
    /// Shown by `$SRV.INFO`.
    pub description: &'static str,
    /// Endpoint name (the last subject token) and its route.
    pub endpoints: &'static [(&'static str, Route)],
}

/// Every service the server runs.
pub const SERVICES: &[ServiceSpec] = &[
    ServiceSpec {
        name: "kez-registry",
        prefix: "kez.registry",
        description: "Handle registry: register, lookup, whois",
        endpoints: &[
            ("register", Route::Register),
            ("lookup", Route::Lookup),
            ("whois", Route::Whois),
        ],
    },
    ServiceSpec {
        name: "kez-sigchain",
        prefix: "kez.sigchain",
        description: "Sigchain store: append, get, head",
        endpoints: &[
            ("append", Route::Append),
            ("get", Route::GetChain),
            ("head", Route::Head),
        ],
    },
    ServiceSpec {
        name: "kez-server",
        prefix: "kez.server",
        description: "Server information",
        endpoints: &[("info", Route::Info)],
    },
    ServiceSpec {
        name: "kez-mail",
        prefix: "kez.mail",
        description: "Mail: store a sealed envelope in a registered recipient's inbox",
        endpoints: &[("send", Route::MailSend)],
    },
];

/// The pin service, run only by instances with a pin directory.
pub const PIN_SERVICE: ServiceSpec = ServiceSpec {
    name: "kez-pin",
    prefix: "kez.pin",
    description: "Pinning: keep encrypted blobs for their owners",
    endpoints: &[
        ("add", Route::PinAdd),
        ("remove", Route::PinRemove),
        ("list", Route::PinList),
        ("status", Route::PinStatus),
    ],
};

/// The auth callout service, served on the `AUTH` account connection when enabled.
pub const CALLOUT_SERVICE: ServiceSpec = ServiceSpec {
    name: "kez-auth",
    prefix: "",
    description: "NATS auth callout: KEZ keys as NATS credentials",
    endpoints: &[(kez_nats_jwt::AUTH_CALLOUT_SUBJECT, Route::Authorize)],
};

/// What every handler can use.
pub struct Context {
    /// The `SERVER` account connection (health checks).
    pub client: async_nats::Client,
    /// Counters for `GET /metrics`.
    pub metrics: Metrics,
    /// The auth callout, when enabled.
    pub callout: Option<Callout>,
    /// The buckets.
    pub store: Store,
    /// The domain this server serves.
    pub domain: String,
    /// The NATS URL clients should use, for WebFinger answers.
    pub public_nats_url: String,
    /// The pin node and bucket, when pinning is on.
    pub pin: Option<Pinning>,
    /// The per-key and per-address request limits.
    pub limiters: Limiters,
    /// Keys known to be registered (`kez.mail.send` recipients).
    pub recipients: crate::mail::Recipients,
}

/// The request limiters of PROTOCOL.md §5.5 (the callout holds the connection one).
#[derive(Debug)]
pub struct Limiters {
    /// Requests per caller key.
    pub per_key: Limiter,
    /// Registrations per client address.
    pub register_per_addr: Limiter,
    /// Registrations to this instance from anyone (one bucket).
    pub register_global: Limiter,
    /// `kez.mail.send` messages per sender key.
    pub send_per_key: Limiter,
    /// `kez.mail.send` envelope bytes per sender key.
    pub send_bytes_per_key: Limiter,
}

impl Limiters {
    /// Limiters for `limits`.
    pub fn new(limits: &crate::limits::Limits) -> Limiters {
        let limiter = |rate| Limiter::new(rate, limits.max_buckets);
        Limiters {
            per_key: limiter(limits.per_key),
            register_per_addr: limiter(limits.register_per_addr),
            register_global: limiter(limits.register_global),
            send_per_key: limiter(limits.send_per_key),
            send_bytes_per_key: limiter(limits.send_bytes_per_key),
        }
    }
}

impl Route {
    /// Whether requests on the route count against the caller's per-key request limit: every
    /// `kez.registry.*`, `kez.sigchain.*` and `kez.pin.*` request. `kez.mail.send` has budgets
    /// of its own (messages and bytes per sender).
    pub fn is_rate_limited(self) -> bool {
        !matches!(self, Route::Info | Route::Authorize | Route::MailSend)
    }
}

/// 429 `rate_limited`, with the time to wait.
fn rate_limited(limited: Limited) -> ApiError {
    let ms = limited.retry_after.as_millis().max(1);
    ApiError::new(
        429,
        "rate_limited",
        format!("too many requests from this key; retry in {ms} ms"),
    )
    .with_header(RETRY_AFTER_HEADER, ms.to_string())
}

/// 429 `too_many_registrations`, with the time to wait.
fn too_many_registrations(limited: Limited) -> ApiError {
    let ms = limited.retry_after.as_millis().max(1);
    ApiError::new(
        429,
        "too_many_registrations",
        format!(
            "too many registrations from this address; retry in {} s",
            ms.div_ceil(1000)
        ),
    )
    .with_header(RETRY_AFTER_HEADER, ms.to_string())
}

/// Applies the limits that need no decoding: the caller's key (as nats-server names it) and,
/// for registrations, the caller's address. Cheap, so it runs before anything else.
fn check_caller(ctx: &Context, route: Route, caller: &Caller) -> Result<(), ApiError> {
    let now = std::time::Instant::now();
    if route.is_rate_limited()
        && let Some(user) = &caller.user
    {
        ctx.limiters
            .per_key
            .check(user, now)
            .map_err(rate_limited)?;
    }
    if route == Route::Register {
        if let Some(host) = &caller.host {
            ctx.limiters
                .register_per_addr
                .check(host, now)
                .map_err(too_many_registrations)?;
        }
        ctx.limiters
            .register_global
            .check("", now)
            .map_err(too_many_registrations)?;
    }
    Ok(())
}

/// Without a caller nats-server vouches for (a trusted broker without the callout, or a broker
/// config without `share: true`), registrations and appends count against the key they are
/// signed by (the registering key; the chain's key) instead.
fn check_signed_key(ctx: &Context, caller: &Caller, request: &Request) -> Result<(), ApiError> {
    if caller.user.is_some() {
        return Ok(());
    }
    let key = match request {
        Request::Register { request, .. } => request.key,
        Request::Append(link) => link.link().chain,
        _ => return Ok(()),
    };
    ctx.limiters
        .per_key
        .check(&key.to_nkey(), std::time::Instant::now())
        .map_err(rate_limited)
}

/// A handle, its key and its sigchain head: the answer of lookup and whois.
#[derive(Debug, Serialize)]
struct Profile {
    #[serde(flatten)]
    record: HandleRecord,
    sigchain: Option<ChainHead>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupRequest {
    handle: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    key: PublicKey,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetChainRequest {
    key: PublicKey,
    #[serde(default = "first_seq")]
    from_seq: u64,
}

fn first_seq() -> u64 {
    1
}

#[derive(Serialize)]
struct ChainPage {
    key: PublicKey,
    from_seq: u64,
    /// Each link's exact bytes as a UTF-8 string.
    links: Vec<String>,
    more: bool,
}

#[derive(Serialize)]
struct HeadAnswer {
    key: PublicKey,
    #[serde(flatten)]
    head: ChainHead,
}

#[derive(Serialize)]
struct ServerInfo<'a> {
    domain: &'a str,
    version: &'static str,
    limits: Limits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pin: Option<PinInfo>,
}

#[derive(Serialize)]
struct PinInfo {
    provider: String,
    quota_bytes: u64,
}

#[derive(Serialize)]
struct Limits {
    max_request_bytes: usize,
    max_link_bytes: usize,
    max_chain_page_bytes: usize,
    registration_window_secs: u64,
}

/// A request decoded and checked without touching any state: what [`handle`] acts on.
///
/// [`decode`] makes one from a request body; it is pure (no I/O, no clock but `now`), so it
/// can be fuzzed on its own (`rust-lib/kez-fuzz`).
#[derive(Debug, Clone)]
pub enum Request {
    /// `kez.registry.register`: a registration whose signature, time and domain verified.
    Register {
        /// The request as sent.
        request: RegistrationRequest,
        /// The handle it registers (on the served domain).
        handle: Handle,
    },
    /// `kez.registry.lookup`: a handle on the served domain.
    Lookup(Handle),
    /// `kez.registry.whois`: a key.
    Whois(PublicKey),
    /// `kez.sigchain.append`: a link that parsed (its chain rules are the store's to check).
    Append(SignedLink),
    /// `kez.sigchain.get`: a key and the first seq wanted (at least 1).
    GetChain {
        /// The chain's key.
        key: PublicKey,
        /// The first link wanted, counting from 1.
        from_seq: u64,
    },
    /// `kez.sigchain.head`: a key.
    Head(PublicKey),
    /// `kez.server.info` (the body is ignored).
    Info,
    /// `$SYS.REQ.USER.AUTH`: the body is nats-server's JWT, which the callout decodes.
    Authorize,
    /// `kez.pin.*`: the signed body is decoded and verified by [`crate::pin::handle`], which
    /// also needs the owner's registration.
    Pin(PinOp),
    /// `kez.mail.send`: a recipient and an envelope of an acceptable size (the frame,
    /// `kez_core::mail`, is read again by [`crate::mail::send`], after the sender's budget).
    MailSend,
}

/// The largest body `route` accepts: [`MAX_REQUEST_BYTES`], or
/// [`kez_nats_jwt::MAX_JWT_LEN`] for nats-server's own authorization requests, or a frame and
/// the largest envelope for `kez.mail.send`.
pub fn request_limit(route: Route) -> usize {
    match route {
        Route::Authorize => kez_nats_jwt::MAX_JWT_LEN,
        Route::MailSend => kez_core::mail::MAX_SEND_BYTES,
        _ => MAX_REQUEST_BYTES,
    }
}

/// Decodes and checks a request body for `route` on a server for `domain` at `now` (unix
/// seconds): the size limits, the JSON, and every check that needs no state. Errors are the
/// answers [`handle`] gives for them (400, 404 for a handle of another domain, 413, and the
/// registration and link failures of PROTOCOL.md §5.1).
pub fn decode(route: Route, body: &[u8], domain: &str, now: u64) -> Result<Request, ApiError> {
    let limit = request_limit(route);
    if route == Route::MailSend {
        kez_core::mail::SendRequest::decode(body)?;
    }
    if body.len() > limit {
        return Err(ApiError::new(
            413,
            "too_large",
            format!("request is {} bytes; the limit is {limit}", body.len()),
        ));
    }
    match route {
        Route::Register => {
            let request: RegistrationRequest = parse(body)?;
            let handle = request.verify(domain, now)?;
            Ok(Request::Register { request, handle })
        }
        Route::Lookup => {
            let request: LookupRequest = parse(body)?;
            let handle = Handle::parse(&request.handle, domain)
                .map_err(|err| ApiError::new(400, err.code(), err.to_string()))?;
            if handle.domain() != domain {
                return Err(ApiError::not_found(format!(
                    "{handle} is not on this server ({domain}); ask its own home server"
                )));
            }
            Ok(Request::Lookup(handle))
        }
        Route::Whois => Ok(Request::Whois(parse::<KeyRequest>(body)?.key)),
        Route::Append => {
            if body.len() > MAX_LINK_BYTES {
                return Err(ApiError::new(
                    413,
                    "too_large",
                    format!(
                        "link is {} bytes; the limit is {MAX_LINK_BYTES}",
                        body.len()
                    ),
                ));
            }
            Ok(Request::Append(SignedLink::parse(body)?))
        }
        Route::GetChain => {
            let request: GetChainRequest = parse(body)?;
            if request.from_seq == 0 {
                return Err(ApiError::malformed("from_seq counts from 1"));
            }
            Ok(Request::GetChain {
                key: request.key,
                from_seq: request.from_seq,
            })
        }
        Route::Head => Ok(Request::Head(parse::<KeyRequest>(body)?.key)),
        Route::Info => Ok(Request::Info),
        Route::Authorize => Ok(Request::Authorize),
        Route::PinAdd => Ok(Request::Pin(PinOp::Add)),
        Route::PinRemove => Ok(Request::Pin(PinOp::Remove)),
        Route::PinList => Ok(Request::Pin(PinOp::List)),
        Route::PinStatus => Ok(Request::Pin(PinOp::Status)),
        Route::MailSend => Ok(Request::MailSend),
    }
}

/// Answers one request from `caller` (see [`Caller`]; unknown without the callout).
pub async fn handle(
    ctx: &Context,
    route: Route,
    body: &[u8],
    caller: &Caller,
    now: u64,
) -> Result<Bytes, ApiError> {
    check_caller(ctx, route, caller)?;
    let request = decode(route, body, &ctx.domain, now)?;
    check_signed_key(ctx, caller, &request)?;
    match request {
        Request::Register { request, handle } => {
            let record = match ctx.store.register(&handle, request.key, now).await? {
                Registered::New(record) => {
                    tracing::info!(handle = %record.handle, key = %record.key, "registered");
                    record
                }
                Registered::Existing(record) => record,
            };
            ctx.store.ensure_inbox_consumer(record.key).await?;
            answer(&record)
        }
        Request::Lookup(handle) => {
            let record = ctx
                .store
                .handle(handle.name())
                .await?
                .ok_or_else(|| ApiError::not_found(format!("{handle} is not registered")))?;
            profile(ctx, record).await
        }
        Request::Whois(key) => {
            let record = ctx.store.whois(key).await?.ok_or_else(|| {
                ApiError::not_found(format!("{key} has no handle on this server"))
            })?;
            profile(ctx, record).await
        }
        Request::Append(_) => {
            // The store parses the link again (at most MAX_LINK_BYTES) and checks the chain.
            let head = ctx.store.append(body).await?;
            answer(&head)
        }
        Request::GetChain { key, from_seq } => {
            let (links, more) = ctx
                .store
                .links_page(key, from_seq, MAX_CHAIN_PAGE_BYTES)
                .await?;
            if links.is_empty() && (from_seq == 1 || !ctx.store.has_chain(key).await?) {
                return Err(ApiError::not_found(format!(
                    "{key} has no sigchain on this server"
                )));
            }
            let links = links
                .into_iter()
                .map(|link| {
                    String::from_utf8(link.to_vec())
                        .map_err(|_| ApiError::internal("stored link is not UTF-8"))
                })
                .collect::<Result<_, _>>()?;
            answer(&ChainPage {
                key,
                from_seq,
                links,
                more,
            })
        }
        Request::Head(key) => {
            let head = ctx.store.head(key).await?.ok_or_else(|| {
                ApiError::not_found(format!("{key} has no sigchain on this server"))
            })?;
            answer(&HeadAnswer { key, head })
        }
        Request::Authorize => authorize(ctx, body, now).await,
        Request::Info => answer(&ServerInfo {
            domain: &ctx.domain,
            version: env!("CARGO_PKG_VERSION"),
            limits: Limits {
                max_request_bytes: MAX_REQUEST_BYTES,
                max_link_bytes: MAX_LINK_BYTES,
                max_chain_page_bytes: MAX_CHAIN_PAGE_BYTES,
                registration_window_secs: REGISTRATION_WINDOW_SECS,
            },
            pin: ctx.pin.as_ref().map(|pin| PinInfo {
                provider: pin.provider(),
                quota_bytes: pin.quota_bytes(),
            }),
        }),
        Request::Pin(op) => {
            let Some(pinning) = &ctx.pin else {
                return Err(ApiError::new(
                    503,
                    "unavailable",
                    "pinning is not enabled on this server",
                ));
            };
            crate::pin::handle(ctx, pinning, op, body, now).await
        }
        Request::MailSend => crate::mail::send(ctx, caller, body).await,
    }
}

/// Always answers (a refusal is a signed response too), so nats-server never waits out its
/// timeout on us.
async fn authorize(ctx: &Context, body: &[u8], now: u64) -> Result<Bytes, ApiError> {
    let Some(callout) = &ctx.callout else {
        return Err(ApiError::new(
            503,
            "unavailable",
            "the auth callout is not enabled",
        ));
    };
    let (response, verdict) = callout.authorize(body, now).await;
    let decision = match &verdict {
        Verdict::Denied(reason) => {
            tracing::warn!(%reason, "connection refused");
            CalloutDecision::Denied
        }
        Verdict::Registered(key, _) => {
            tracing::debug!(%key, "connection authorized (registered)");
            CalloutDecision::Registered
        }
        Verdict::Unregistered(key, _) => {
            tracing::debug!(%key, "connection authorized (unregistered)");
            CalloutDecision::Unregistered
        }
    };
    if let Verdict::Registered(key, ProofForm::Legacy)
    | Verdict::Unregistered(key, ProofForm::Legacy) = &verdict
    {
        tracing::info!(%key, "connection proved its key the old way (an untagged nonce signature): that client signs whatever a broker sends; upgrade it");
        ctx.metrics.record_legacy_proof();
    }
    ctx.metrics.record_callout(decision);
    Ok(Bytes::from(response))
}

async fn profile(ctx: &Context, record: HandleRecord) -> Result<Bytes, ApiError> {
    let sigchain = ctx.store.head(record.key).await?;
    answer(&Profile { record, sigchain })
}

pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::malformed(
            "empty request body; send a JSON object as PROTOCOL.md describes",
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|err| ApiError::malformed(format!("bad request JSON: {err}")))?;
    // serde would also take a struct from a JSON array; the protocol has objects only.
    if !value.is_object() {
        return Err(ApiError::malformed("the request must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|err| ApiError::malformed(format!("bad request: {err}")))
}

pub(crate) fn answer<T: Serialize>(value: &T) -> Result<Bytes, ApiError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|err| ApiError::internal(format!("could not encode the answer: {err}")))
}
