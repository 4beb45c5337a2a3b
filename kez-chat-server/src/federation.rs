//! Federation with other home servers (PROTOCOL.md §14): the server key, finding a peer
//! (WebFinger `acct:kez@<domain>`), the key pinned for each peer domain (bucket `kez_peers`),
//! the operator's word on which domains are talked to, the pool of connections to peers'
//! brokers, the reads proxied for this server's clients, and `kez.mail.deliver` (mail a peer
//! hands over).
//!
//! Everything a peer says is checked against what was asked, and everything a peer can make
//! this server do is bounded: discoveries run with a timeout, a body cap and a semaphore; the
//! pool holds at most [`MAX_PEERS`] domains; deliveries are budgeted per peer domain.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::BodyExt;
use kez_core::{Handle, PublicKey, SecretKey};
use kez_proto::answer::{ChainPage, Delivered, HeadAnswer, Profile};
use kez_proto::federation::{
    ServerDiscovery, domain_blocked, peer_connection_name, peer_key_changed, peer_unavailable,
    server_resource,
};
use kez_proto::keys::{ClaimAnswer, ClaimRequest};
use kez_proto::mail::SendRequest;
use kez_proto::request::{GetChainRequest, KeyRequest, LookupRequest, MAX_CHAIN_PAGE_BYTES};
use kez_proto::subjects::reply_prefix;
use kez_proto::webfinger::{JRD_CONTENT_TYPE, WEBFINGER_PATH};
use kez_proto::{Endpoint, ErrorAnswer};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::config::FederationConfig;
use crate::limits::{Caller, Limiter};
use crate::metrics::Metrics;
use crate::store::Store;

/// Bucket: `d.<domain>` → [`PeerRecord`] JSON; `k.<key hex>` → the domain pinned to that key.
pub const PEERS_BUCKET: &str = "kez_peers";
/// How long finding a peer may take when this server connects to it.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the dialback of a connecting peer may take: nats-server waits for the callout 5 s
/// (the configs `nats_conf` renders), or 2 s (nats' default, older configs).
pub const DIALBACK_TIMEOUT: Duration = Duration::from_millis(1500);
/// Largest WebFinger answer read from a peer.
pub const MAX_DISCOVERY_BYTES: usize = 64 * 1024;
/// How long connecting to a peer's broker may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a proxied read may wait for the peer's answer (with discovery and connect, within
/// the handler's 10 s).
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Most peer domains the pool holds a connection (or a failed attempt) for.
pub const MAX_PEERS: usize = 1000;
/// Discoveries run at once (clients can ask for lookups on any domain).
const PARALLEL_DISCOVERIES: usize = 16;
/// Largest answer taken from a peer: a chain page and its JSON escaping.
const MAX_PEER_ANSWER_BYTES: usize = 2 * MAX_CHAIN_PAGE_BYTES + 16 * 1024;
/// Longest error message relayed from a peer.
const MAX_RELAYED_MESSAGE: usize = 512;
/// Longest `Kez-Retry-After-Ms` relayed from a peer: an hour.
const MAX_RELAYED_RETRY_MS: u64 = 3_600_000;
/// Attempts at a pin write that lost a race with another instance.
const PIN_ATTEMPTS: usize = 3;

/// What `kez_peers` holds for one peer domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRecord {
    /// The peer domain.
    pub domain: String,
    /// The server key pinned for it (`null`: none yet, e.g. a domain blocked before contact).
    pub key: Option<PublicKey>,
    /// When the key was pinned (or the record made), unix seconds.
    pub pinned_at: u64,
    /// Whether the operator blocked the domain (`admin peer block`).
    pub blocked: bool,
}

/// What a key met for a domain means, given the domain's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinDecision {
    /// The key is the one pinned.
    Matches,
    /// No key is pinned yet: pin this one.
    Pin,
    /// Another key is pinned: refused until the operator forgets the pin.
    Changed(PublicKey),
    /// The operator blocked the domain.
    Blocked,
}

/// The pin rule (trust on first use): a blocked domain is refused, the first key met is
/// pinned, the pinned key matches, any other is refused.
pub fn pin_decision(record: Option<&PeerRecord>, key: &PublicKey) -> PinDecision {
    match record {
        Some(record) if record.blocked => PinDecision::Blocked,
        Some(PeerRecord {
            key: Some(pinned), ..
        }) if pinned == key => PinDecision::Matches,
        Some(PeerRecord {
            key: Some(pinned), ..
        }) => PinDecision::Changed(*pinned),
        _ => PinDecision::Pin,
    }
}

/// Whether the operator's lists let this server talk to `domain`: never a denied one, and
/// only an allowed one when the allow list is not empty.
pub fn listed_ok(allow: &[String], deny: &[String], domain: &str) -> bool {
    !deny.iter().any(|denied| denied == domain)
        && (allow.is_empty() || allow.iter().any(|allowed| allowed == domain))
}

/// 403 `peer_key_in_use`: the key a domain names is pinned for another domain already (a
/// domain that names another server's key could otherwise take that server's mail for its own).
fn peer_key_in_use(domain: &str, key: &PublicKey, other: &str) -> ErrorAnswer {
    ErrorAnswer::new(
        403,
        "peer_key_in_use",
        format!("{domain} names the server key {key}, which is pinned for {other}; refused"),
    )
}

/// 502 `bad_peer_answer`: a peer answered something else than was asked.
pub fn bad_peer_answer(domain: &str, why: impl std::fmt::Display) -> ErrorAnswer {
    ErrorAnswer::new(
        502,
        "bad_peer_answer",
        format!("{domain}'s server answered what was not asked ({why})"),
    )
}

/// The pins: `kez_peers`.
#[derive(Clone)]
pub struct Pins {
    kv: kv::Store,
}

fn domain_entry(domain: &str) -> String {
    format!("d.{domain}")
}

fn key_entry(key: &PublicKey) -> String {
    format!("k.{}", key.to_hex())
}

impl Pins {
    /// Creates the bucket if missing and opens it (`replicas` as for the other buckets).
    pub async fn open(
        js: &jetstream::Context,
        replicas: Option<usize>,
    ) -> Result<Pins, async_nats::Error> {
        let kv = crate::store::ensure_bucket(
            js,
            kv::Config {
                bucket: PEERS_BUCKET.to_owned(),
                description: "kez-chat: peer server domain -> pinned server key".to_owned(),
                history: 1,
                max_value_size: 1024,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas.unwrap_or(0),
                ..Default::default()
            },
        )
        .await?;
        Ok(Pins { kv })
    }

    /// The record of `domain` and its revision.
    pub async fn record(&self, domain: &str) -> Result<Option<(PeerRecord, u64)>, ErrorAnswer> {
        let entry = self
            .kv
            .entry(domain_entry(domain))
            .await
            .map_err(ErrorAnswer::unavailable)?
            .filter(|entry| entry.operation == kv::Operation::Put);
        match entry {
            None => Ok(None),
            Some(entry) => {
                let record: PeerRecord = serde_json::from_slice(&entry.value).map_err(|err| {
                    ErrorAnswer::internal(format!("corrupt peer record of {domain}: {err}"))
                })?;
                Ok(Some((record, entry.revision)))
            }
        }
    }

    /// The domain `key` is pinned for, if any (and that domain's record still pins it).
    pub async fn domain_of(&self, key: &PublicKey) -> Result<Option<PeerRecord>, ErrorAnswer> {
        let entry = self
            .kv
            .entry(key_entry(key))
            .await
            .map_err(ErrorAnswer::unavailable)?
            .filter(|entry| entry.operation == kv::Operation::Put);
        let Some(domain) = entry.and_then(|entry| String::from_utf8(entry.value.to_vec()).ok())
        else {
            return Ok(None);
        };
        // The reverse entry is an index: the domain's record is what counts.
        Ok(self
            .record(&domain)
            .await?
            .map(|(record, _)| record)
            .filter(|record| record.key.as_ref() == Some(key)))
    }

    /// Checks `key` against `domain`'s pin, pinning it when none is (first contact): the
    /// domain's refusal (`domain_blocked`, `peer_key_changed`, `peer_key_in_use`) otherwise.
    pub async fn pin(&self, domain: &str, key: &PublicKey, now: u64) -> Result<(), ErrorAnswer> {
        for _ in 0..PIN_ATTEMPTS {
            let current = self.record(domain).await?;
            let decision = pin_decision(current.as_ref().map(|(record, _)| record), key);
            match decision {
                PinDecision::Blocked => return Err(domain_blocked(domain)),
                PinDecision::Changed(pinned) => {
                    tracing::warn!(%domain, %pinned, offered = %key, "a peer's server key changed; refused until the operator runs `kez-chat-server admin peer forget {domain}`");
                    return Err(peer_key_changed(domain, &pinned, key));
                }
                PinDecision::Matches => return Ok(()),
                PinDecision::Pin => {}
            }
            if let Some(other) = self.domain_of(key).await?
                && other.domain != domain
            {
                return Err(peer_key_in_use(domain, key, &other.domain));
            }
            let record = PeerRecord {
                domain: domain.to_owned(),
                key: Some(*key),
                pinned_at: now,
                blocked: false,
            };
            let value = Bytes::from(serde_json::to_vec(&record).expect("a record serialises"));
            let written = match current {
                None => self
                    .kv
                    .create(domain_entry(domain), value)
                    .await
                    .map(drop)
                    .map_err(|err| {
                        (
                            err.kind() == kv::CreateErrorKind::AlreadyExists,
                            err.to_string(),
                        )
                    }),
                Some((_, revision)) => self
                    .kv
                    .update(domain_entry(domain), value, revision)
                    .await
                    .map(drop)
                    .map_err(|err| {
                        (
                            err.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            err.to_string(),
                        )
                    }),
            };
            match written {
                Ok(()) => {
                    self.kv
                        .put(key_entry(key), Bytes::from(domain.to_owned()))
                        .await
                        .map_err(ErrorAnswer::unavailable)?;
                    tracing::info!(%domain, %key, "pinned a peer's server key (first contact)");
                    return Ok(());
                }
                // Another instance wrote first: decide again on what it wrote.
                Err((true, _)) => continue,
                Err((false, err)) => return Err(ErrorAnswer::unavailable(err)),
            }
        }
        Err(ErrorAnswer::unavailable(format!(
            "the pin of {domain} kept changing"
        )))
    }

    /// Blocks or unblocks `domain` (a record is made for a domain never met, and dropped again
    /// when it is unblocked with no key pinned), answering the record as written.
    pub async fn set_blocked(
        &self,
        domain: &str,
        blocked: bool,
        now: u64,
    ) -> Result<PeerRecord, ErrorAnswer> {
        let record = match self.record(domain).await? {
            Some((record, _)) => PeerRecord { blocked, ..record },
            None => PeerRecord {
                domain: domain.to_owned(),
                key: None,
                pinned_at: now,
                blocked,
            },
        };
        match (&record.key, blocked) {
            (None, false) => self
                .kv
                .delete(domain_entry(domain))
                .await
                .map_err(ErrorAnswer::unavailable)?,
            _ => {
                self.kv
                    .put(
                        domain_entry(domain),
                        Bytes::from(serde_json::to_vec(&record).expect("a record serialises")),
                    )
                    .await
                    .map_err(ErrorAnswer::unavailable)?;
            }
        }
        Ok(record)
    }

    /// Drops `domain`'s pinned key (a block stays): the next contact pins anew. Answers the
    /// record as it was.
    pub async fn forget(&self, domain: &str) -> Result<Option<PeerRecord>, ErrorAnswer> {
        let Some((record, _)) = self.record(domain).await? else {
            return Ok(None);
        };
        if let Some(key) = &record.key {
            self.kv
                .delete(key_entry(key))
                .await
                .map_err(ErrorAnswer::unavailable)?;
        }
        match record.blocked {
            true => {
                let kept = PeerRecord {
                    key: None,
                    ..record.clone()
                };
                self.kv
                    .put(
                        domain_entry(domain),
                        Bytes::from(serde_json::to_vec(&kept).expect("a record serialises")),
                    )
                    .await
                    .map_err(ErrorAnswer::unavailable)?;
            }
            false => self
                .kv
                .delete(domain_entry(domain))
                .await
                .map_err(ErrorAnswer::unavailable)?,
        }
        Ok(Some(record))
    }

    /// Every domain's record, by domain.
    pub async fn list(&self) -> Result<Vec<PeerRecord>, ErrorAnswer> {
        let mut domains: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(ErrorAnswer::unavailable)?
            .try_filter_map(|key| async move { Ok(key.strip_prefix("d.").map(str::to_owned)) })
            .try_collect()
            .await
            .map_err(ErrorAnswer::unavailable)?;
        domains.sort();
        let mut records = Vec::with_capacity(domains.len());
        for domain in domains {
            if let Some((record, _)) = self.record(&domain).await? {
                records.push(record);
            }
        }
        Ok(records)
    }
}

/// Ends the open connections of every peer whose domain the operator blocks (`admin peer
/// block`, from any process) while this server runs, until `stop` changes: their next request
/// would be refused anyway, but reads (lookups, chains) are not checked against blocks.
pub async fn end_blocked_connections(
    pins: Pins,
    store: Store,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use futures::StreamExt;
    loop {
        let mut updates = match pins.kv.watch("d.>").await {
            Ok(updates) => updates,
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch the peers bucket; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                entry = updates.next() => entry,
                _ = stop.changed() => return,
            };
            let Some(Ok(entry)) = entry else {
                break;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            if let Ok(PeerRecord {
                key: Some(key),
                blocked: true,
                domain,
                ..
            }) = serde_json::from_slice(&entry.value)
            {
                tracing::info!(%domain, %key, "peer blocked: ending its connections");
                store.end_connections(key);
            }
        }
    }
}

/// A WebFinger base URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebfingerBase {
    /// `https` (else plain HTTP).
    pub tls: bool,
    /// The host (a name or an address; an IPv6 address without its brackets).
    pub host: String,
    /// The port.
    pub port: u16,
    /// A path prefix (empty, or starting with `/`, no trailing `/`).
    pub path: String,
}

/// Reads a WebFinger base URL: `https://host[:port][/path]`, or `http://…` when `allow_http`.
pub fn parse_webfinger_base(url: &str, allow_http: bool) -> Result<WebfingerBase, String> {
    let (tls, rest) = match url.split_once("://") {
        Some(("https", rest)) => (true, rest),
        Some(("http", _)) if !allow_http => {
            return Err("a plain-HTTP WebFinger base needs --federation-allow-http (development and tests only)".into());
        }
        Some(("http", rest)) => (false, rest),
        _ => return Err("must start with https://".into()),
    };
    if rest.contains(['?', '#', '@', ' ']) || !rest.is_ascii() {
        return Err("must be a plain URL without credentials, query or fragment".into());
    }
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or("an unclosed [")?;
            match after.strip_prefix(':') {
                Some(port) => (host, port.parse().map_err(|_| "a bad port")?),
                None if after.is_empty() => (host, default_port),
                None => return Err("junk after the address".into()),
            }
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| "a bad port")?),
            None => (authority, default_port),
        },
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    Ok(WebfingerBase {
        tls,
        host: host.to_owned(),
        port,
        path: path.trim_end_matches('/').to_owned(),
    })
}

/// Checks a `--peer-webfinger` URL.
pub fn check_webfinger_base(url: &str, allow_http: bool) -> Result<(), String> {
    parse_webfinger_base(url, allow_http).map(drop)
}

/// Aborts a spawned task when dropped (a timeout dropping the future that owns it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What each peer domain may still deliver: a message budget and a byte budget, per domain.
#[derive(Debug)]
pub struct PeerBudgets {
    messages: Limiter,
    bytes: Limiter,
}

impl PeerBudgets {
    /// Budgets of `limits` per domain, for at most [`MAX_PEERS`] domains.
    pub fn new(limits: crate::config::PeerLimits) -> PeerBudgets {
        PeerBudgets {
            messages: Limiter::new(limits.messages, MAX_PEERS),
            bytes: Limiter::new(limits.bytes, MAX_PEERS),
        }
    }

    /// Takes one message of `size` envelope bytes from `domain`'s budgets at `now`, or 429
    /// `rate_limited` with the time to wait.
    pub fn take(&self, domain: &str, size: usize, now: Instant) -> Result<(), ErrorAnswer> {
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        self.messages
            .check(domain, now)
            .and_then(|()| self.bytes.take(domain, size, now))
            .map_err(|limited| {
                let ms = limited.retry_after_ms();
                ErrorAnswer::new(
                    429,
                    "rate_limited",
                    format!("{domain} has delivered as much as this server takes for now; retry in {ms} ms"),
                )
                .with_retry_after_ms(ms)
            })
    }
}

/// How long a failed attempt to reach a peer is remembered: requests meanwhile fail at once
/// instead of each waiting out a discovery of its own.
const FAILURE_REMEMBERED: Duration = Duration::from_secs(5);

/// One slot of the pool: the connection to a peer, if made, or the last failure to make one.
#[derive(Default)]
struct SlotState {
    client: Option<async_nats::Client>,
    failed: Option<(Instant, ErrorAnswer)>,
}

type Slot = Arc<tokio::sync::Mutex<SlotState>>;

/// Federation, as a running server does it.
pub struct Federation {
    domain: String,
    key: Arc<SecretKey>,
    config: FederationConfig,
    /// The pins.
    pub pins: Pins,
    pool: Mutex<HashMap<String, Slot>>,
    discoveries: Semaphore,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    budgets: PeerBudgets,
}

/// The CA certificates in the PEM file `path` (`--federation-ca`): at least one, every one a
/// usable trust anchor.
pub fn load_federation_ca(
    path: &Path,
) -> Result<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let text =
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let certs = tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{}: not a PEM file of certificates: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate: put the PEM (-----BEGIN CERTIFICATE-----) of the CA that signed your peers' certificates in it",
            path.display()
        ));
    }
    // Checked here rather than at the first peer: a bad anchor is the operator's to fix now.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for (at, cert) in certs.iter().enumerate() {
        roots.add(cert.clone()).map_err(|err| {
            format!(
                "{}: certificate {} is not a usable CA certificate: {err}",
                path.display(),
                at + 1
            )
        })?;
    }
    Ok(certs)
}

/// The TLS settings for peers, WebFinger and brokers alike: Mozilla's roots (webpki-roots; not
/// the system store, so that what a peer must present does not depend on the host), plus the
/// operator's CA certificates from `ca_file` (`--federation-ca`), e.g. a private federation's.
pub fn peer_tls_config(
    ca_file: Option<&Path>,
) -> Result<tokio_rustls::rustls::ClientConfig, String> {
    let mut roots = tokio_rustls::rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        for cert in load_federation_ca(path)? {
            roots
                .add(cert)
                .map_err(|err| format!("{}: {err}", path.display()))?;
        }
    }
    Ok(
        tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

impl Federation {
    /// Federation for the server of `domain` with `key`, as `config` says, pinning in `pins`;
    /// an error when `config.ca_file` holds no usable CA certificate.
    pub fn new(
        domain: String,
        key: SecretKey,
        config: FederationConfig,
        pins: Pins,
    ) -> Result<Federation, String> {
        let tls = peer_tls_config(config.ca_file.as_deref())
            .map_err(|err| format!("--federation-ca: {err}"))?;
        Ok(Federation {
            budgets: PeerBudgets::new(config.peer_limits),
            domain,
            key: Arc::new(key),
            config,
            pins,
            pool: Mutex::new(HashMap::new()),
            discoveries: Semaphore::new(PARALLEL_DISCOVERIES),
            tls: Arc::new(tls),
        })
    }

    /// The server key's public half.
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// The server key (bounces are sealed with it).
    pub fn secret_key(&self) -> &SecretKey {
        &self.key
    }

    /// The settings.
    pub fn config(&self) -> &FederationConfig {
        &self.config
    }

    /// What this server's `acct:kez@<domain>` WebFinger answers.
    pub fn discovery(&self) -> ServerDiscovery {
        ServerDiscovery {
            domain: self.domain.clone(),
            key: self.key.public_key(),
            nats_url: self.config.nats_url.clone(),
        }
    }

    /// Whether this server talks to `domain`: the operator's lists, then the pin's block.
    pub async fn check_allowed(&self, domain: &str) -> Result<(), ErrorAnswer> {
        if !listed_ok(&self.config.allow, &self.config.deny, domain) {
            return Err(domain_blocked(domain));
        }
        match self.pins.record(domain).await? {
            Some((record, _)) if record.blocked => Err(domain_blocked(domain)),
            _ => Ok(()),
        }
    }

    /// Finds `domain`'s server through its WebFinger within `within`.
    pub async fn discover(
        &self,
        domain: &str,
        within: Duration,
    ) -> Result<ServerDiscovery, String> {
        let work = async {
            let _permit = self
                .discoveries
                .acquire()
                .await
                .map_err(|_| "shutting down".to_owned())?;
            let base = match self.config.peer_webfinger.get(domain) {
                Some(url) => parse_webfinger_base(url, self.config.allow_http)?,
                None => WebfingerBase {
                    tls: true,
                    host: domain.to_owned(),
                    port: 443,
                    path: String::new(),
                },
            };
            // A domain holds only [a-z0-9.-]: nothing to escape but the scheme's ':' and '@'.
            let target = format!(
                "{}{WEBFINGER_PATH}?resource={}",
                base.path,
                server_resource(domain)
                    .replace(':', "%3A")
                    .replace('@', "%40")
            );
            let body = self.http_get(&base, &target).await?;
            ServerDiscovery::from_jrd(domain, &body)
        };
        tokio::time::timeout(within, work)
            .await
            .map_err(|_| format!("its WebFinger did not answer within {within:?}"))?
    }

    async fn http_get(&self, base: &WebfingerBase, target: &str) -> Result<Vec<u8>, String> {
        let tcp = tokio::net::TcpStream::connect((base.host.as_str(), base.port))
            .await
            .map_err(|err| format!("cannot connect to its WebFinger: {err}"))?;
        let host_header = match (base.tls, base.port) {
            (true, 443) | (false, 80) => base.host.clone(),
            _ if base.host.contains(':') => format!("[{}]:{}", base.host, base.port),
            _ => format!("{}:{}", base.host, base.port),
        };
        let request = hyper::Request::get(target)
            .header(hyper::header::HOST, host_header)
            .header(hyper::header::ACCEPT, JRD_CONTENT_TYPE)
            .header(hyper::header::CONNECTION, "close")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|err| format!("bad WebFinger request: {err}"))?;
        match base.tls {
            true => {
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(base.host.clone())
                    .map_err(|err| format!("bad host name: {err}"))?;
                let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|err| format!("TLS with its WebFinger: {err}"))?;
                exchange(stream, request).await
            }
            false => exchange(tcp, request).await,
        }
    }

    /// A connection to `domain`'s broker: the pool's, or a new one (discovered, key checked
    /// against the pin, connected as the server key).
    pub async fn peer(&self, domain: &str, now: u64) -> Result<async_nats::Client, ErrorAnswer> {
        if domain == self.domain {
            return Err(ErrorAnswer::malformed(format!(
                "{domain} is this server's own domain"
            )));
        }
        self.check_allowed(domain).await?;
        let slot = self.slot(domain)?;
        let mut held = slot.lock().await;
        if let Some(client) = &held.client {
            if client.connection_state() == async_nats::connection::State::Connected {
                return Ok(client.clone());
            }
            // Dropped: made again, through discovery, so a changed key is seen.
            held.client = None;
        }
        if let Some((at, err)) = &held.failed
            && at.elapsed() < FAILURE_REMEMBERED
        {
            return Err(err.clone());
        }
        match self.connect(domain, now).await {
            Ok(client) => {
                *held = SlotState {
                    client: Some(client.clone()),
                    failed: None,
                };
                Ok(client)
            }
            Err(err) => {
                held.failed = Some((Instant::now(), err.clone()));
                Err(err)
            }
        }
    }

    fn slot(&self, domain: &str) -> Result<Slot, ErrorAnswer> {
        let mut pool = self
            .pool
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(slot) = pool.get(domain) {
            return Ok(slot.clone());
        }
        if pool.len() >= MAX_PEERS {
            // Slots without a live connection go first (a slot in use is locked).
            pool.retain(|_, slot| {
                slot.try_lock().map_or(true, |held| {
                    held.client.as_ref().is_some_and(|client| {
                        client.connection_state() == async_nats::connection::State::Connected
                    })
                })
            });
            if pool.len() >= MAX_PEERS {
                return Err(peer_unavailable(
                    domain,
                    "this server talks to too many peers at once",
                ));
            }
        }
        let slot = Slot::default();
        pool.insert(domain.to_owned(), slot.clone());
        Ok(slot)
    }

    /// Forgets the pool's connection to `domain` (after it failed a request): the next use
    /// makes a new one.
    pub fn drop_connection(&self, domain: &str) {
        let slot = self
            .pool
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(domain);
        if let Some(slot) = slot
            && let Ok(mut held) = slot.try_lock()
            && let Some(client) = held.client.take()
        {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), client.drain()).await;
            });
        }
    }

    async fn connect(&self, domain: &str, now: u64) -> Result<async_nats::Client, ErrorAnswer> {
        let found = self
            .discover(domain, DISCOVERY_TIMEOUT)
            .await
            .map_err(|why| peer_unavailable(domain, why))?;
        self.pins.pin(domain, &found.key, now).await?;
        let url = found.nats_url.as_str();
        let secure = url.starts_with("tls://") || url.starts_with("wss://");
        let plain = url.starts_with("nats://") || url.starts_with("ws://");
        if !secure && !(plain && (self.config.allow_http || url.starts_with("nats://"))) {
            return Err(peer_unavailable(
                domain,
                "its federation URL is not a NATS URL this server connects to",
            ));
        }
        let signer = self.key.clone();
        let options = async_nats::ConnectOptions::with_auth_callback(move |nonce| {
            let signer = signer.clone();
            async move {
                let mut auth = async_nats::Auth::new();
                let signature = kez_core::connect::sign_nonce(&signer, &nonce)
                    .map_err(async_nats::AuthError::new)?;
                auth.nkey = Some(signer.public_key().to_nkey());
                auth.signature = Some(signature.to_bytes().to_vec());
                Ok(auth)
            }
        })
        .name(peer_connection_name(&self.domain))
        .custom_inbox_prefix(reply_prefix(&self.key.public_key()))
        .connection_timeout(CONNECT_TIMEOUT)
        .request_timeout(Some(Duration::from_secs(10)))
        .ignore_discovered_servers()
        .max_reconnects(Some(3))
        // A nats:// URL is upgraded when the peer's broker offers TLS; only dev goes without.
        .require_tls(!self.config.allow_http)
        // The roots WebFinger is checked against (and --federation-ca): async-nats on its own
        // would trust the system store instead, or with add_root_certificates only the file.
        .tls_client_config((*self.tls).clone());
        tokio::time::timeout(
            CONNECT_TIMEOUT + Duration::from_secs(1),
            options.connect(url),
        )
        .await
        .map_err(|_| peer_unavailable(domain, "its broker did not answer in time"))?
        // The whole chain: the kind alone says "IO error" for a certificate this server does
        // not trust, where the operator needs "invalid peer certificate: UnknownIssuer".
        .map_err(|err| {
            let why = crate::error_chain(&err);
            tracing::warn!(%domain, %url, error = %why, "cannot connect to a peer's broker");
            peer_unavailable(domain, format!("its broker at {url}: {why}"))
        })
    }

    /// Sends `body` to `endpoint` on `domain`'s broker and waits `within` for the answer: its
    /// body, or its error answer relayed (bounded and cleaned), or `peer_unavailable`.
    pub async fn request(
        &self,
        domain: &str,
        endpoint: Endpoint,
        body: Bytes,
        within: Duration,
        now: u64,
    ) -> Result<Bytes, ErrorAnswer> {
        let client = self.peer(domain, now).await?;
        let answer =
            match tokio::time::timeout(within, client.request(endpoint.subject(), body)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(err)) => {
                    self.drop_connection(domain);
                    return Err(peer_unavailable(domain, err.kind()));
                }
                Err(_) => {
                    self.drop_connection(domain);
                    return Err(peer_unavailable(domain, "no answer in time"));
                }
            };
        if answer.payload.len() > MAX_PEER_ANSWER_BYTES {
            return Err(bad_peer_answer(domain, "an answer too large"));
        }
        let headers = answer.headers.as_ref();
        if let Some(err) = ErrorAnswer::from_headers(|name| {
            headers
                .and_then(|headers| headers.get(name))
                .map(|value| value.as_str())
        }) {
            return Err(relayed(err));
        }
        Ok(answer.payload)
    }

    /// `kez.registry.lookup` of `handle` on its domain's server.
    pub async fn lookup(&self, handle: &Handle, now: u64) -> Result<Profile, ErrorAnswer> {
        let domain = handle.domain();
        let body = json_body(&LookupRequest {
            handle: handle.to_string(),
        });
        let answer = self
            .request(domain, Endpoint::Lookup, body, READ_TIMEOUT, now)
            .await?;
        let profile: Profile = serde_json::from_slice(&answer)
            .map_err(|err| bad_peer_answer(domain, format!("not a profile: {err}")))?;
        if &profile.handle != handle {
            return Err(bad_peer_answer(
                domain,
                format!("asked for {handle}, answered {}", profile.handle),
            ));
        }
        Ok(profile)
    }

    /// `kez.registry.whois` of `key` on `domain`'s server.
    pub async fn whois(
        &self,
        key: PublicKey,
        domain: &str,
        now: u64,
    ) -> Result<Profile, ErrorAnswer> {
        let body = json_body(&KeyRequest { key, domain: None });
        let answer = self
            .request(domain, Endpoint::Whois, body, READ_TIMEOUT, now)
            .await?;
        let profile: Profile = serde_json::from_slice(&answer)
            .map_err(|err| bad_peer_answer(domain, format!("not a profile: {err}")))?;
        if profile.handle.domain() != domain {
            return Err(bad_peer_answer(
                domain,
                format!("answered {}, of another domain", profile.handle),
            ));
        }
        Ok(profile)
    }

    /// `kez.sigchain.head` of `key` on `domain`'s server.
    pub async fn head(
        &self,
        key: PublicKey,
        domain: &str,
        now: u64,
    ) -> Result<HeadAnswer, ErrorAnswer> {
        let body = json_body(&KeyRequest { key, domain: None });
        let answer = self
            .request(domain, Endpoint::Head, body, READ_TIMEOUT, now)
            .await?;
        let head: HeadAnswer = serde_json::from_slice(&answer)
            .map_err(|err| bad_peer_answer(domain, format!("not a head: {err}")))?;
        if head.key != key {
            return Err(bad_peer_answer(domain, "the head of another key"));
        }
        Ok(head)
    }

    /// `kez.sigchain.get` of `key` from `from_seq` on `domain`'s server.
    pub async fn chain(
        &self,
        key: PublicKey,
        from_seq: u64,
        domain: &str,
        now: u64,
    ) -> Result<ChainPage, ErrorAnswer> {
        let body = json_body(&GetChainRequest {
            key,
            from_seq,
            domain: None,
        });
        let answer = self
            .request(domain, Endpoint::GetChain, body, READ_TIMEOUT, now)
            .await?;
        let page: ChainPage = serde_json::from_slice(&answer)
            .map_err(|err| bad_peer_answer(domain, format!("not a chain page: {err}")))?;
        if page.key != key || page.from_seq != from_seq {
            return Err(bad_peer_answer(domain, "a page of another chain or seq"));
        }
        let bytes: usize = page.links.iter().map(String::len).sum();
        if bytes > MAX_CHAIN_PAGE_BYTES.max(kez_core::sigchain::MAX_LINK_BYTES) {
            return Err(bad_peer_answer(domain, "a chain page over the page limit"));
        }
        Ok(page)
    }

    /// `kez.keys.claim` of `device` on `domain`'s server: the answer must be about `device`
    /// and its prekey signed by it for the identity key it names (the claimer checks that key
    /// against the device's chain).
    pub async fn claim(
        &self,
        device: PublicKey,
        domain: &str,
        now: u64,
    ) -> Result<ClaimAnswer, ErrorAnswer> {
        let body = json_body(&ClaimRequest {
            device,
            domain: None,
        });
        let answer = self
            .request(domain, Endpoint::KeysClaim, body, READ_TIMEOUT, now)
            .await?;
        let claimed: ClaimAnswer = serde_json::from_slice(&answer)
            .map_err(|err| bad_peer_answer(domain, format!("not a claimed prekey: {err}")))?;
        if claimed.device != device {
            return Err(bad_peer_answer(domain, "a prekey of another device"));
        }
        if claimed
            .prekey
            .verify(&device, &claimed.identity_key)
            .is_err()
        {
            return Err(bad_peer_answer(domain, "a prekey the device did not sign"));
        }
        Ok(claimed)
    }

    /// Answers `kez.mail.deliver` from `caller`, a peer server: its domain from the pin of its
    /// key, the domain's budget, then the recipient checked and the envelope stored like
    /// `kez.mail.send` does, with the peer's domain as the message's origin.
    pub async fn deliver(
        &self,
        store: &Store,
        mail: &crate::mail::MailState,
        metrics: &Metrics,
        caller: &Caller,
        request: &SendRequest<'_>,
    ) -> Result<Bytes, ErrorAnswer> {
        let key = caller
            .user
            .as_deref()
            .and_then(|user| PublicKey::from_nkey(user).ok())
            .ok_or_else(not_a_peer)?;
        let record = self.pins.domain_of(&key).await?.ok_or_else(not_a_peer)?;
        let domain = record.domain.as_str();
        let refused = |reason: &'static str, err: ErrorAnswer| {
            metrics.record_federation_refused(domain, reason);
            err
        };
        if record.blocked || !listed_ok(&self.config.allow, &self.config.deny, domain) {
            return Err(refused("domain_blocked", domain_blocked(domain)));
        }
        self.budgets
            .take(domain, request.envelope.len(), Instant::now())
            .map_err(|err| refused("rate_limited", err))?;
        let identity =
            match crate::mail::recipient_identity(store, &mail.recipients, request.to).await {
                Ok(identity) => identity,
                Err(err) if err.code == 404 => return Err(refused("unknown_recipient", err)),
                Err(err) if err.code == 410 => return Err(refused("recipient_revoked", err)),
                Err(err) => return Err(err),
            };
        let (seq, duplicate) = store
            .deliver_with_origin(
                identity,
                request.to,
                &request.id,
                Bytes::copy_from_slice(request.envelope),
                Some(domain),
            )
            .await?;
        metrics.record_federation_received(domain);
        kez_proto::answer::encode(&Delivered { seq, duplicate }).map(Bytes::from)
    }
}

fn not_a_peer() -> ErrorAnswer {
    ErrorAnswer::new(403, "forbidden", "only a peer server may deliver mail here")
}

fn json_body<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a request serialises"))
}

/// A peer's error answer as this server passes it on: a code of the protocol's (else 502), a
/// name of `[a-z0-9_]` (else `peer_error`), a bounded message and retry time.
pub fn relayed(err: ErrorAnswer) -> ErrorAnswer {
    const CODES: [u16; 12] = [400, 401, 403, 404, 409, 410, 413, 429, 500, 502, 503, 504];
    let code = match CODES.contains(&err.code) {
        true => err.code,
        false => 502,
    };
    let name = match clean_name(&err.name) {
        Some(name) => name.to_owned(),
        None => "peer_error".to_owned(),
    };
    let mut message: String = err
        .message
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_RELAYED_MESSAGE)
        .collect();
    if message.is_empty() {
        message = format!("the peer answered {name}");
    }
    ErrorAnswer {
        code,
        name: name.into(),
        message,
        head: err.head,
        retry_after_ms: err.retry_after_ms.map(|ms| ms.min(MAX_RELAYED_RETRY_MS)),
    }
}

/// `name` if it is a stable error name: 1 to 64 of `[a-z0-9_]`.
pub fn clean_name(name: &str) -> Option<&str> {
    (!name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
    .then_some(name)
}

/// One HTTP/1.1 GET over `stream`: a 200's body of at most [`MAX_DISCOVERY_BYTES`].
async fn exchange<S>(
    stream: S,
    request: hyper::Request<http_body_util::Empty<Bytes>>,
) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|err| format!("HTTP with its WebFinger: {err}"))?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| format!("HTTP with its WebFinger: {err}"))?;
    if response.status() != hyper::StatusCode::OK {
        return Err(format!("its WebFinger answered {}", response.status()));
    }
    let body = http_body_util::Limited::new(response.into_body(), MAX_DISCOVERY_BYTES)
        .collect()
        .await
        .map_err(|err| format!("its WebFinger answer: {err}"))?;
    Ok(body.to_bytes().to_vec())
}

/// The server key in `path`, created (mode 0600) when there is no file.
pub fn load_or_create_key(path: &std::path::Path) -> Result<SecretKey, String> {
    match kez_keyfile::load(path) {
        Ok(key) => Ok(key),
        Err(kez_keyfile::KeyFileError::NotFound { .. }) => {
            let key = SecretKey::generate();
            kez_keyfile::write_new(path, &key).map_err(|err| err.to_string())?;
            tracing::info!(key = %key.public_key(), file = %path.display(), "created the server's federation key");
            Ok(key)
        }
        Err(err) => Err(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PublicKey {
        SecretKey::from_seed(&[seed; 32]).public_key()
    }

    #[test]
    fn the_first_key_is_pinned_and_another_refused_until_forgotten() {
        let record = |key, blocked| PeerRecord {
            domain: "b.localhost".into(),
            key,
            pinned_at: 1,
            blocked,
        };
        assert_eq!(pin_decision(None, &key(1)), PinDecision::Pin);
        assert_eq!(
            pin_decision(Some(&record(None, false)), &key(1)),
            PinDecision::Pin,
            "a record without a key (forgotten, or made by a block since lifted) pins anew"
        );
        assert_eq!(
            pin_decision(Some(&record(Some(key(1)), false)), &key(1)),
            PinDecision::Matches
        );
        assert_eq!(
            pin_decision(Some(&record(Some(key(1)), false)), &key(2)),
            PinDecision::Changed(key(1))
        );
        for pinned in [None, Some(key(1))] {
            assert_eq!(
                pin_decision(Some(&record(pinned, true)), &key(1)),
                PinDecision::Blocked
            );
        }
        let json = serde_json::to_string(&record(Some(key(1)), false)).unwrap();
        assert!(
            json.starts_with(r#"{"domain":"b.localhost","key":"ed25519:"#),
            "{json}"
        );
        assert!(
            serde_json::from_str::<PeerRecord>(
                r#"{"domain":"x","key":null,"pinned_at":1,"blocked":false,"more":1}"#
            )
            .is_err()
        );
    }

    #[test]
    fn each_peer_domain_has_its_own_message_and_byte_budget() {
        use crate::limits::Rate;
        let budgets = PeerBudgets::new(crate::config::PeerLimits {
            messages: Rate::new(1.0, 3),
            bytes: Rate::new(100.0, 1000),
        });
        let now = Instant::now();
        for _ in 0..3 {
            budgets.take("b.localhost", 10, now).unwrap();
        }
        let err = budgets.take("b.localhost", 10, now).unwrap_err();
        assert_eq!((err.code, err.name.as_ref()), (429, "rate_limited"));
        assert_eq!(err.retry_after_ms, Some(1000));
        budgets.take("c.localhost", 900, now).unwrap();
        let err = budgets.take("c.localhost", 900, now).unwrap_err();
        assert_eq!(
            err.retry_after_ms,
            Some(8000),
            "bytes: 800 missing at 100/s"
        );
        let later = now + Duration::from_secs(1);
        budgets.take("b.localhost", 10, later).unwrap();
    }

    #[test]
    fn the_lists_deny_first_and_allow_only_what_they_name() {
        let none: Vec<String> = Vec::new();
        let b = vec!["b.localhost".to_owned()];
        assert!(listed_ok(&none, &none, "b.localhost"));
        assert!(!listed_ok(&none, &b, "b.localhost"));
        assert!(listed_ok(&b, &none, "b.localhost"));
        assert!(!listed_ok(&b, &none, "c.localhost"));
        assert!(!listed_ok(&b, &b, "b.localhost"), "deny wins");
    }

    #[test]
    fn webfinger_bases_are_https_unless_allowed() {
        assert_eq!(
            parse_webfinger_base("https://b.example", false).unwrap(),
            WebfingerBase {
                tls: true,
                host: "b.example".into(),
                port: 443,
                path: String::new()
            }
        );
        assert_eq!(
            parse_webfinger_base("http://127.0.0.1:8080/kez/", true).unwrap(),
            WebfingerBase {
                tls: false,
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/kez".into()
            }
        );
        assert_eq!(
            parse_webfinger_base("http://[::1]:81", true).unwrap().host,
            "::1"
        );
        assert!(
            parse_webfinger_base("http://127.0.0.1:8080", false)
                .unwrap_err()
                .contains("--federation-allow-http")
        );
        for bad in [
            "ftp://x",
            "https://",
            "https://u:p@x",
            "https://x?y",
            "https://x:port",
            "b.example",
        ] {
            assert!(parse_webfinger_base(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_peers_error_is_relayed_bounded_and_clean() {
        let err = ErrorAnswer::new(404, "unknown_recipient", "no such user");
        assert_eq!(relayed(err.clone()), err);
        let hostile = ErrorAnswer::new(
            999,
            "Evil\r\nName",
            format!("a\u{7}b{}", "x".repeat(10_000)),
        )
        .with_retry_after_ms(u64::MAX);
        let clean = relayed(hostile);
        assert_eq!((clean.code, clean.name.as_ref()), (502, "peer_error"));
        assert!(clean.message.starts_with("abx") && clean.message.len() == MAX_RELAYED_MESSAGE);
        assert_eq!(clean.retry_after_ms, Some(MAX_RELAYED_RETRY_MS));
        assert_eq!(clean_name("rate_limited"), Some("rate_limited"));
        assert_eq!(clean_name(""), None);
        assert_eq!(clean_name(&"a".repeat(65)), None);
    }
}
