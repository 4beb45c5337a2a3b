//! Server configuration: command-line flags, each also settable from the environment, over an
//! optional TOML file, over defaults. Precedence: flag > environment > file > default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

/// Domain served when none is configured.
pub const DEFAULT_DOMAIN: &str = "kez.lat";
/// NATS URL used when none is configured.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// How the server authenticates its own NATS connection.
#[derive(Debug, Clone)]
pub enum NatsAuth {
    /// No credentials (a broker without authentication, e.g. in tests).
    None,
    /// User and password (an `authorization { users = [...] }` entry or a callout auth user).
    UserPassword {
        /// The user.
        user: String,
        /// The password, zeroized on drop.
        password: Zeroizing<String>,
    },
    /// An nkey seed (`SU...`) read from a file that only its owner can read.
    NkeySeedFile(PathBuf),
}

/// The auth callout's keys (see [`crate::nats_conf`]) and what it accepts.
#[derive(Debug, Clone)]
pub struct CalloutConfig {
    /// Directory with the seed files `keygen` wrote.
    pub keys_dir: PathBuf,
    /// The issuer public key nats-server is configured with; must match the issuer seed.
    pub issuer: String,
    /// Whether connect proofs of clients older than this release (an untagged nonce
    /// signature, PROTOCOL.md §6.1) are accepted.
    pub legacy_proofs: kez_core::connect::LegacyProofs,
    /// The authorizations per second the deployment sustains in a reconnect storm, from which
    /// the reconnect window clients are told is worked out ([`crate::reconnect_window`]).
    pub reconnects_per_sec: u32,
    /// How long an authorization lasts ([`crate::callout::AUTHORIZATION_LIFETIME_SECS`]; not
    /// settable from the command line; tests shrink it).
    pub authorization_lifetime: Duration,
}

impl CalloutConfig {
    /// The callout with the keys in `keys_dir` for `issuer`, accepting legacy proofs (this
    /// release's default).
    pub fn new(keys_dir: PathBuf, issuer: String) -> CalloutConfig {
        CalloutConfig {
            keys_dir,
            issuer,
            legacy_proofs: kez_core::connect::LegacyProofs::Accept,
            reconnects_per_sec: crate::reconnect_window::DEFAULT_RECONNECTS_PER_SEC,
            authorization_lifetime: Duration::from_secs(
                crate::callout::AUTHORIZATION_LIFETIME_SECS,
            ),
        }
    }
}

/// Everything `kez-chat-server run` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The broker to connect to.
    pub nats_url: String,
    /// The server's own NATS credentials (its `APP` connection).
    pub auth: NatsAuth,
    /// When set, the server answers nats-server's auth callout (and connects with its keys).
    pub callout: Option<CalloutConfig>,
    /// The domain this server serves (normalised).
    pub domain: String,
    /// Replicas of the key-value buckets and the inbox stream: 1 on a single node, 3 in a
    /// cluster. `None`: existing ones keep theirs (new ones get 1), so a command run without
    /// the setting never scales a cluster down.
    pub kv_replicas: Option<usize>,
    /// Where the HTTP shim (WebFinger, `/healthz`, `/metrics`) listens; `None`: no HTTP at all.
    pub http_listen: Option<SocketAddr>,
    /// The NATS URL clients should use, published in WebFinger answers: one URL, no credentials.
    pub public_nats_url: String,
    /// The HTTP shim's limits (not settable from the command line; tests shrink them).
    pub http_limits: crate::http::HttpLimits,
    /// Pinning (`kez.pin.*` and a pin node), when `--pin-dir` is set.
    pub pin: Option<crate::pin::PinConfig>,
    /// Rate limits against hostile clients (PROTOCOL.md §5.5).
    pub limits: crate::limits::Limits,
    /// Settings of an earlier release that still parse but no longer do anything (a start
    /// warns about each, so that an upgraded deployment keeps starting).
    pub retired_settings: Vec<&'static str>,
    /// Most bytes `KEZ_MAIL` may hold; `None`: an existing stream keeps its bound, a new one
    /// gets [`crate::store::DEFAULT_INBOX_MAX_BYTES`].
    pub inbox_max_bytes: Option<u64>,
    /// Tests only: a pairing relay that misbehaves on purpose (no flag or setting sets it).
    pub pair_relay_tamper: Option<crate::relay::Tamper>,
    /// Federation with other home servers (`--federate`); `None`: this server talks to no other.
    pub federation: Option<FederationConfig>,
}

/// Default `--bounce-after`: how long the outbox keeps trying a peer before it bounces.
pub const DEFAULT_BOUNCE_AFTER: Duration = Duration::from_secs(3 * 24 * 3600);
/// Default `--retry-max`: the longest wait between two attempts of the outbox.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(600);
/// The file of the server key in `--keys-dir` when `--federation-key` is not set.
pub const FEDERATION_KEY_FILE: &str = "federation.key";
/// Default messages per second one peer domain may deliver, and at once.
pub const DEFAULT_PEER_MESSAGES: crate::limits::Rate = crate::limits::Rate::new(50.0, 500);
/// Default envelope bytes per second one peer domain may deliver (4 MiB/s, 32 MiB at once).
pub const DEFAULT_PEER_BYTES: crate::limits::Rate =
    crate::limits::Rate::new(4.0 * 1024.0 * 1024.0, 32 << 20);

/// What one peer domain may deliver through `kez.mail.deliver` (token buckets per domain).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerLimits {
    /// Messages.
    pub messages: crate::limits::Rate,
    /// Envelope bytes (one token a byte).
    pub bytes: crate::limits::Rate,
}

impl Default for PeerLimits {
    fn default() -> PeerLimits {
        PeerLimits {
            messages: DEFAULT_PEER_MESSAGES,
            bytes: DEFAULT_PEER_BYTES,
        }
    }
}

/// Federation (PROTOCOL.md §14): the server key, where peers reach this server, how peers are
/// found and which are talked to, and the outbox's patience.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    /// The server key's file (kez-keyfile format), created with mode 0600 when missing.
    pub key_file: PathBuf,
    /// The NATS URL peers connect to, advertised in `acct:kez@<domain>`'s WebFinger answer.
    pub nats_url: String,
    /// Per peer domain, the WebFinger base URL to ask instead of `https://<domain>`.
    pub peer_webfinger: BTreeMap<String, String>,
    /// Whether an `http://` WebFinger base and a peer broker without TLS are accepted (dev and
    /// tests only).
    pub allow_http: bool,
    /// A PEM file of CA certificates trusted for peers (WebFinger over HTTPS and their brokers'
    /// TLS) besides Mozilla's roots: a private federation's CA (`--federation-ca`).
    pub ca_file: Option<PathBuf>,
    /// When not empty, the only peer domains talked to.
    pub allow: Vec<String>,
    /// Peer domains never talked to.
    pub deny: Vec<String>,
    /// How long the outbox keeps trying before it bounces a message to its sender.
    pub bounce_after: Duration,
    /// The longest wait between two attempts.
    pub retry_max: Duration,
    /// What one peer domain may deliver.
    pub peer_limits: PeerLimits,
    /// Most bytes `KEZ_OUTBOX` may hold; `None`: [`crate::outbox::DEFAULT_OUTBOX_MAX_BYTES`].
    pub outbox_max_bytes: Option<u64>,
}

impl FederationConfig {
    /// Federation with the server key in `key_file`, advertising `nats_url`, with the defaults
    /// for everything else.
    pub fn new(key_file: PathBuf, nats_url: String) -> FederationConfig {
        FederationConfig {
            key_file,
            nats_url,
            peer_webfinger: BTreeMap::new(),
            allow_http: false,
            ca_file: None,
            allow: Vec::new(),
            deny: Vec::new(),
            bounce_after: DEFAULT_BOUNCE_AFTER,
            retry_max: DEFAULT_RETRY_MAX,
            peer_limits: PeerLimits::default(),
            outbox_max_bytes: None,
        }
    }
}

impl ServerConfig {
    /// A config for `nats_url` and `domain` without credentials, callout or HTTP, one replica,
    /// publishing `nats_url` as the public NATS URL.
    pub fn new(nats_url: &str, domain: &str) -> ServerConfig {
        ServerConfig {
            nats_url: nats_url.to_owned(),
            auth: NatsAuth::None,
            callout: None,
            domain: domain.to_owned(),
            kv_replicas: None,
            http_listen: None,
            public_nats_url: public_url_from(nats_url),
            http_limits: crate::http::HttpLimits::default(),
            pin: None,
            limits: crate::limits::Limits::default(),
            retired_settings: Vec::new(),
            inbox_max_bytes: None,
            pair_relay_tamper: None,
            federation: None,
        }
    }
}

/// Settings as they may appear in the TOML file, on the command line or in the environment;
/// every field optional so the sources can be layered.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// NATS URL of the broker [default: nats://127.0.0.1:4222]
    #[arg(long, env = "KEZ_NATS_URL")]
    pub nats_url: Option<String>,
    /// NATS user for the server's own connection (with --nats-password)
    #[arg(long, env = "KEZ_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password for the server's own connection
    #[arg(long, env = "KEZ_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// File holding the server's NATS nkey seed (SU...), mode 0600
    #[arg(long, env = "KEZ_NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// Directory of the keys `kez-chat-server keygen` wrote: turns on the auth callout and
    /// authenticates both of the server's connections with those keys
    #[arg(long, env = "KEZ_KEYS_DIR")]
    pub keys_dir: Option<PathBuf>,
    /// The callout issuer public key (A...) in nats-server's config; checked against the key in
    /// --keys-dir
    #[arg(long, env = "KEZ_CALLOUT_ISSUER")]
    pub callout_issuer: Option<String>,
    /// Refuse clients that prove their key the old way (a nonce signature without the
    /// KEZ-NATS-CONNECT-V1 tag, kez-chat 0.1): set it once every client is upgraded
    /// (kez_callout_legacy_proofs_total stays 0) [default: accepted]
    #[arg(long, env = "KEZ_REFUSE_LEGACY_CONNECT_PROOFS", num_args = 0..=1, default_missing_value = "true")]
    pub refuse_legacy_connect_proofs: Option<bool>,
    /// Authorizations per second the deployment answers in a reconnect storm (`make bench`'s
    /// storm section measures it): clients spread their reconnects after a broker restart over
    /// the connections held divided by this, so that none waits past the authorization timeout
    /// [default: 1800]
    #[arg(long, env = "KEZ_RECONNECTS_PER_SEC")]
    pub reconnects_per_sec: Option<u32>,
    /// Domain this server serves: handles are @name@<domain> [default: kez.lat]
    #[arg(long, env = "KEZ_DOMAIN")]
    pub domain: Option<String>,
    /// Replicas of the JetStream key-value buckets and the KEZ_MAIL stream (1 single node, 3 in
    /// a cluster); applied at start, also to existing ones [default: keep what they have; 1 for
    /// new ones]
    #[arg(long, env = "KEZ_KV_REPLICAS")]
    pub kv_replicas: Option<usize>,
    /// Address of the HTTP shim: WebFinger (GET /.well-known/webfinger), /healthz and /metrics,
    /// plain HTTP. Off unless set. Bind it to loopback or a private address and put a TLS reverse
    /// proxy in front that forwards only /.well-known/webfinger (deploy/README.md)
    #[arg(long, env = "KEZ_HTTP_LISTEN", value_name = "ADDR:PORT")]
    pub http_listen: Option<SocketAddr>,
    /// The NATS URL clients should connect to, published in WebFinger answers (one URL,
    /// nats:// tls:// ws:// or wss://, no credentials) [default: --nats-url without credentials]
    #[arg(long, env = "KEZ_PUBLIC_NATS_URL")]
    pub public_nats_url: Option<String>,
    /// Directory of the pin node (iroh key and blob store): turns pinning on (kez.pin.*, the
    /// server keeps encrypted blobs its users name, within a quota). Off unless set
    #[arg(long, env = "KEZ_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// UDP address of the pin node. Production sets a routable address (or 0.0.0.0:<port>) so
    /// clients can reach it; it is advertised as the provider. Port 0: the port the OS picks the
    /// first time, kept in the pin directory [default: 127.0.0.1:0]
    #[arg(long, env = "KEZ_PIN_BIND", value_name = "ADDR:PORT")]
    pub pin_bind: Option<SocketAddr>,
    /// Bytes each user may pin [default: 1073741824, 1 GiB]
    #[arg(long, env = "KEZ_PIN_QUOTA_BYTES")]
    pub pin_quota_bytes: Option<u64>,
    /// Seconds between the pin node's garbage collections, which delete unpinned blobs
    /// [default: 60]
    #[arg(long, env = "KEZ_PIN_GC_SECS")]
    pub pin_gc_secs: Option<u64>,
    /// Seconds one pin may spend fetching its blob, 1 to 100 (nats-server forgets a reply
    /// after 2 minutes) [default: 90]
    #[arg(long, env = "KEZ_PIN_FETCH_SECS")]
    pub pin_fetch_secs: Option<u64>,
    /// Let the pin node dial provider addresses that are not public (loopback, private,
    /// link-local) when owners name them: only where owners' nodes are on the operator's own
    /// network [default: off, public addresses only]
    #[arg(long, env = "KEZ_PIN_DIAL_PRIVATE", num_args = 0..=1, default_missing_value = "true")]
    pub pin_dial_private: Option<bool>,
    /// Requests per second each key may make to kez.registry.*, kez.sigchain.* and kez.pin.*
    /// (over it: 429 rate_limited); 0 turns the limit off [default: 20]
    #[arg(long, env = "KEZ_RATE_LIMIT_PER_SEC")]
    pub rate_limit_per_sec: Option<f64>,
    /// Requests each key may make at once after a quiet spell [default: 40]
    #[arg(long, env = "KEZ_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// Registration requests per hour from one client address (over it: 429
    /// too_many_registrations); 0 turns the limit off [default: 60]
    #[arg(long, env = "KEZ_REGISTER_LIMIT_PER_HOUR")]
    pub register_limit_per_hour: Option<u32>,
    /// Registration requests one client address may make at once [default: 20]
    #[arg(long, env = "KEZ_REGISTER_LIMIT_BURST")]
    pub register_limit_burst: Option<u32>,
    /// Connections per second the auth callout lets in with the unregistered profile from one
    /// client address (more are refused); 0 turns the limit off [default: 5]
    #[arg(long, env = "KEZ_CONNECT_LIMIT_PER_SEC")]
    pub connect_limit_per_sec: Option<f64>,
    /// Unregistered connections one client address may open at once [default: 50]
    #[arg(long, env = "KEZ_CONNECT_LIMIT_BURST")]
    pub connect_limit_burst: Option<u32>,
    /// Registration requests per hour this instance takes from all addresses together (over
    /// it: 429 too_many_registrations); 0 turns the limit off [default: 3600]
    #[arg(long, env = "KEZ_REGISTER_LIMIT_GLOBAL_PER_HOUR")]
    pub register_limit_global_per_hour: Option<u32>,
    /// Registrations this instance takes at once from all addresses [default: 600]
    #[arg(long, env = "KEZ_REGISTER_LIMIT_GLOBAL_BURST")]
    pub register_limit_global_burst: Option<u32>,
    /// Messages per second each key may send through kez.mail.send (over it: 429
    /// rate_limited); 0 turns the limit off [default: 20]
    #[arg(long, env = "KEZ_SEND_LIMIT_PER_SEC")]
    pub send_limit_per_sec: Option<f64>,
    /// Messages each key may send at once [default: 200]
    #[arg(long, env = "KEZ_SEND_LIMIT_BURST")]
    pub send_limit_burst: Option<u32>,
    /// Envelope bytes per hour each key may send (over it: 429 rate_limited); 0 turns the limit
    /// off [default: 16777216, 16 MiB]
    #[arg(long, env = "KEZ_SEND_BYTES_PER_HOUR")]
    pub send_bytes_per_hour: Option<u64>,
    /// Envelope bytes each key may send at once, at least 65536 [default: 8388608, 8 MiB]
    #[arg(long, env = "KEZ_SEND_BYTES_BURST")]
    pub send_bytes_burst: Option<u32>,
    /// Prekey claims (kez.keys.claim) per second each key may make (over it: 429
    /// rate_limited); 0 turns the limit off [default: 10]
    #[arg(long, env = "KEZ_CLAIM_LIMIT_PER_SEC")]
    pub claim_limit_per_sec: Option<f64>,
    /// Prekey claims each key may make at once [default: 50]
    #[arg(long, env = "KEZ_CLAIM_LIMIT_BURST")]
    pub claim_limit_burst: Option<u32>,
    /// One-time prekeys per minute handed out of one device's (past it claims get the
    /// device's fallback key); 0 turns the limit off [default: 20]
    #[arg(long, env = "KEZ_ONE_TIME_KEYS_PER_MIN")]
    pub one_time_keys_per_min: Option<f64>,
    /// One-time prekeys of one device handed out at once [default: 20]
    #[arg(long, env = "KEZ_ONE_TIME_KEYS_BURST")]
    pub one_time_keys_burst: Option<u32>,
    /// Most bytes the KEZ_MAIL stream may hold (JetStream reserves them, so the key-value
    /// buckets keep the rest of the store); a full stream refuses new messages [default:
    /// 4294967296, 4 GiB; an existing stream keeps its own]
    #[arg(long, env = "KEZ_INBOX_MAX_BYTES")]
    pub inbox_max_bytes: Option<u64>,
    /// Retired: the inbox of the previous release needed a sweep; KEZ_MAIL does not. Still
    /// accepted (and ignored, with a warning) so that an upgraded deployment keeps starting.
    #[arg(long, env = "KEZ_INBOX_SWEEP_SECS", hide = true)]
    pub inbox_sweep_secs: Option<u64>,
    /// Federate: exchange mail, lookups and sigchains with other kez home servers (PROTOCOL.md
    /// §14). Needs --keys-dir (the auth callout admits peers) [default: off]
    #[arg(long, env = "KEZ_FEDERATE", num_args = 0..=1, default_missing_value = "true")]
    pub federate: Option<bool>,
    /// The server key file (created, mode 0600, when missing): peers know this server by it,
    /// and bounces are signed with it [default: <keys-dir>/federation.key]
    #[arg(long, env = "KEZ_FEDERATION_KEY")]
    pub federation_key: Option<PathBuf>,
    /// The NATS URL peer servers connect to, published at acct:kez@<domain> [default:
    /// --public-nats-url]
    #[arg(long, env = "KEZ_FEDERATION_URL")]
    pub federation_url: Option<String>,
    /// Where to ask a peer domain's WebFinger instead of https://<domain> (repeatable; in the
    /// file a table `[peer_webfinger]` of domain = "URL")
    #[arg(long = "peer-webfinger", env = "KEZ_PEER_WEBFINGER", value_delimiter = ',', value_name = "DOMAIN=URL", value_parser = parse_peer_webfinger)]
    #[serde(default, deserialize_with = "peer_webfinger_table")]
    pub peer_webfinger: Option<Vec<(String, String)>>,
    /// Accept plain-HTTP WebFinger bases and peer brokers without TLS: development and tests
    /// only [default: off]
    #[arg(long, env = "KEZ_FEDERATION_ALLOW_HTTP", num_args = 0..=1, default_missing_value = "true")]
    pub federation_allow_http: Option<bool>,
    /// A PEM file of one or more CA certificates trusted for peers' WebFinger (HTTPS) and
    /// brokers (TLS) besides the built-in Mozilla roots: a private federation's own CA
    /// [default: the built-in roots only]
    #[arg(long, env = "KEZ_FEDERATION_CA", value_name = "FILE")]
    pub federation_ca: Option<PathBuf>,
    /// Talk only to these peer domains (repeatable) [default: any not denied]
    #[arg(
        long = "federation-allow",
        env = "KEZ_FEDERATION_ALLOW",
        value_delimiter = ',',
        value_name = "DOMAIN"
    )]
    pub federation_allow: Option<Vec<String>>,
    /// Never talk to these peer domains (repeatable)
    #[arg(
        long = "federation-deny",
        env = "KEZ_FEDERATION_DENY",
        value_delimiter = ',',
        value_name = "DOMAIN"
    )]
    pub federation_deny: Option<Vec<String>>,
    /// Seconds the outbox keeps trying a peer before the message bounces back to its sender
    /// [default: 259200, 3 days]
    #[arg(long, env = "KEZ_BOUNCE_AFTER")]
    pub bounce_after: Option<u64>,
    /// Longest wait between two attempts of the outbox, in seconds [default: 600]
    #[arg(long, env = "KEZ_RETRY_MAX")]
    pub retry_max: Option<u64>,
    /// Messages per second each peer domain may deliver (over it: 429 rate_limited) [default: 50]
    #[arg(long, env = "KEZ_PEER_MESSAGES_PER_SEC")]
    pub peer_messages_per_sec: Option<f64>,
    /// Messages each peer domain may deliver at once [default: 500]
    #[arg(long, env = "KEZ_PEER_MESSAGE_BURST")]
    pub peer_message_burst: Option<u32>,
    /// Most bytes the KEZ_OUTBOX stream (mail waiting for other servers) may hold [default:
    /// 1073741824, 1 GiB]
    #[arg(long, env = "KEZ_OUTBOX_MAX_BYTES")]
    pub outbox_max_bytes: Option<u64>,
}

/// One `--peer-webfinger DOMAIN=URL`.
fn parse_peer_webfinger(text: &str) -> Result<(String, String), String> {
    let (domain, url) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not DOMAIN=URL"))?;
    Ok((domain.to_owned(), url.to_owned()))
}

/// The file's `[peer_webfinger]` table, as the flag's pairs.
fn peer_webfinger_table<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<(String, String)>>, D::Error> {
    let table = BTreeMap::<String, String>::deserialize(deserializer)?;
    Ok(Some(table.into_iter().collect()))
}

impl Settings {
    /// Reads a TOML file whose keys are the flag names with `_` (e.g. `nats_url = "..."`).
    pub fn from_file(path: &Path) -> Result<Settings, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read config file {}: {err}", path.display()))?;
        toml::from_str(&text).map_err(|err| format!("config file {}: {err}", path.display()))
    }

    /// `self` where set, otherwise `fallback`.
    pub fn or(self, fallback: Settings) -> Settings {
        Settings {
            nats_url: self.nats_url.or(fallback.nats_url),
            nats_user: self.nats_user.or(fallback.nats_user),
            nats_password: self.nats_password.or(fallback.nats_password),
            nats_nkey_seed_file: self.nats_nkey_seed_file.or(fallback.nats_nkey_seed_file),
            keys_dir: self.keys_dir.or(fallback.keys_dir),
            callout_issuer: self.callout_issuer.or(fallback.callout_issuer),
            refuse_legacy_connect_proofs: self
                .refuse_legacy_connect_proofs
                .or(fallback.refuse_legacy_connect_proofs),
            reconnects_per_sec: self.reconnects_per_sec.or(fallback.reconnects_per_sec),
            domain: self.domain.or(fallback.domain),
            kv_replicas: self.kv_replicas.or(fallback.kv_replicas),
            http_listen: self.http_listen.or(fallback.http_listen),
            public_nats_url: self.public_nats_url.or(fallback.public_nats_url),
            pin_dir: self.pin_dir.or(fallback.pin_dir),
            pin_bind: self.pin_bind.or(fallback.pin_bind),
            pin_quota_bytes: self.pin_quota_bytes.or(fallback.pin_quota_bytes),
            pin_gc_secs: self.pin_gc_secs.or(fallback.pin_gc_secs),
            pin_fetch_secs: self.pin_fetch_secs.or(fallback.pin_fetch_secs),
            pin_dial_private: self.pin_dial_private.or(fallback.pin_dial_private),
            rate_limit_per_sec: self.rate_limit_per_sec.or(fallback.rate_limit_per_sec),
            rate_limit_burst: self.rate_limit_burst.or(fallback.rate_limit_burst),
            register_limit_per_hour: self
                .register_limit_per_hour
                .or(fallback.register_limit_per_hour),
            register_limit_burst: self.register_limit_burst.or(fallback.register_limit_burst),
            connect_limit_per_sec: self
                .connect_limit_per_sec
                .or(fallback.connect_limit_per_sec),
            connect_limit_burst: self.connect_limit_burst.or(fallback.connect_limit_burst),
            register_limit_global_per_hour: self
                .register_limit_global_per_hour
                .or(fallback.register_limit_global_per_hour),
            register_limit_global_burst: self
                .register_limit_global_burst
                .or(fallback.register_limit_global_burst),
            send_limit_per_sec: self.send_limit_per_sec.or(fallback.send_limit_per_sec),
            send_limit_burst: self.send_limit_burst.or(fallback.send_limit_burst),
            send_bytes_per_hour: self.send_bytes_per_hour.or(fallback.send_bytes_per_hour),
            send_bytes_burst: self.send_bytes_burst.or(fallback.send_bytes_burst),
            claim_limit_per_sec: self.claim_limit_per_sec.or(fallback.claim_limit_per_sec),
            claim_limit_burst: self.claim_limit_burst.or(fallback.claim_limit_burst),
            one_time_keys_per_min: self
                .one_time_keys_per_min
                .or(fallback.one_time_keys_per_min),
            one_time_keys_burst: self.one_time_keys_burst.or(fallback.one_time_keys_burst),
            inbox_max_bytes: self.inbox_max_bytes.or(fallback.inbox_max_bytes),
            inbox_sweep_secs: self.inbox_sweep_secs.or(fallback.inbox_sweep_secs),
            federate: self.federate.or(fallback.federate),
            federation_key: self.federation_key.or(fallback.federation_key),
            federation_url: self.federation_url.or(fallback.federation_url),
            peer_webfinger: self.peer_webfinger.or(fallback.peer_webfinger),
            federation_allow_http: self
                .federation_allow_http
                .or(fallback.federation_allow_http),
            federation_ca: self.federation_ca.or(fallback.federation_ca),
            federation_allow: self.federation_allow.or(fallback.federation_allow),
            federation_deny: self.federation_deny.or(fallback.federation_deny),
            bounce_after: self.bounce_after.or(fallback.bounce_after),
            retry_max: self.retry_max.or(fallback.retry_max),
            peer_messages_per_sec: self
                .peer_messages_per_sec
                .or(fallback.peer_messages_per_sec),
            peer_message_burst: self.peer_message_burst.or(fallback.peer_message_burst),
            outbox_max_bytes: self.outbox_max_bytes.or(fallback.outbox_max_bytes),
        }
    }

    /// The federation settings checked, for a server whose callout keys are in `keys_dir` and
    /// whose clients connect to `public_nats_url`: `None` without `--federate`.
    pub fn resolve_federation(
        &self,
        keys_dir: Option<&Path>,
        public_nats_url: &str,
    ) -> Result<Option<FederationConfig>, String> {
        if self.federate != Some(true) {
            let set = self.federation_key.is_some()
                || self.federation_url.is_some()
                || self.peer_webfinger.is_some()
                || self.federation_allow_http.is_some()
                || self.federation_ca.is_some()
                || self.federation_allow.is_some()
                || self.federation_deny.is_some()
                || self.bounce_after.is_some()
                || self.retry_max.is_some()
                || self.peer_messages_per_sec.is_some()
                || self.peer_message_burst.is_some()
                || self.outbox_max_bytes.is_some();
            return match set {
                true => Err("the federation settings (--federation-*, --peer-*, --bounce-after, --retry-max, --outbox-max-bytes) need --federate".into()),
                false => Ok(None),
            };
        }
        let Some(keys_dir) = keys_dir else {
            return Err("--federate needs --keys-dir: peers are let in by the auth callout".into());
        };
        let key_file = self
            .federation_key
            .clone()
            .unwrap_or_else(|| keys_dir.join(FEDERATION_KEY_FILE));
        let nats_url = match &self.federation_url {
            Some(url) => {
                check_public_url(url).map_err(|err| format!("--federation-url {url:?}: {err}"))?;
                url.clone()
            }
            None => public_nats_url.to_owned(),
        };
        let mut federation = FederationConfig::new(key_file, nats_url);
        federation.allow_http = self.federation_allow_http.unwrap_or(false);
        if let Some(path) = &self.federation_ca {
            // Read now, so that a wrong file stops the start before anything connects.
            crate::federation::load_federation_ca(path)
                .map_err(|err| format!("--federation-ca: {err}"))?;
            federation.ca_file = Some(path.clone());
        }
        for (domain, url) in self.peer_webfinger.iter().flatten() {
            let domain = kez_core::handle::parse_domain(domain)
                .map_err(|err| format!("--peer-webfinger {domain:?}: {err}"))?;
            crate::federation::check_webfinger_base(url, federation.allow_http)
                .map_err(|err| format!("--peer-webfinger {domain}={url}: {err}"))?;
            federation
                .peer_webfinger
                .insert(domain, url.trim_end_matches('/').to_owned());
        }
        let domains = |flag: &str, list: &Option<Vec<String>>| {
            list.iter()
                .flatten()
                .map(|domain| {
                    kez_core::handle::parse_domain(domain)
                        .map_err(|err| format!("--{flag} {domain:?}: {err}"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        federation.allow = domains("federation-allow", &self.federation_allow)?;
        federation.deny = domains("federation-deny", &self.federation_deny)?;
        match self.bounce_after {
            Some(0) => return Err("--bounce-after must be at least 1 second".into()),
            Some(secs) => federation.bounce_after = Duration::from_secs(secs),
            None => {}
        }
        match self.retry_max {
            Some(0) => return Err("--retry-max must be at least 1 second".into()),
            Some(secs) => federation.retry_max = Duration::from_secs(secs),
            None => {}
        }
        let per_sec = self
            .peer_messages_per_sec
            .unwrap_or(DEFAULT_PEER_MESSAGES.per_sec);
        let burst = self
            .peer_message_burst
            .unwrap_or(DEFAULT_PEER_MESSAGES.burst);
        if !per_sec.is_finite() || per_sec < 0.0 {
            return Err("--peer-messages-per-sec must be a number of at least 0".into());
        }
        federation.peer_limits.messages = match per_sec == 0.0 {
            true => crate::limits::Rate::OFF,
            false if burst == 0 => {
                return Err(
                    "--peer-message-burst must be at least 1 (set the rate to 0 to turn it off)"
                        .into(),
                );
            }
            false => crate::limits::Rate::new(per_sec, burst),
        };
        match self.outbox_max_bytes {
            Some(bytes) if bytes < MIN_INBOX_MAX_BYTES => {
                return Err("--outbox-max-bytes must be at least 1048576 (1 MiB)".into());
            }
            bytes => federation.outbox_max_bytes = bytes,
        }
        Ok(Some(federation))
    }

    /// Applies defaults and checks the combination.
    pub fn resolve(self) -> Result<ServerConfig, String> {
        // Before the fields move: peers are told the public URL unless told another.
        let public_for_peers = match &self.public_nats_url {
            Some(url) => url.clone(),
            None => public_url_from(self.nats_url.as_deref().unwrap_or(DEFAULT_NATS_URL)),
        };
        let federation = self.resolve_federation(self.keys_dir.as_deref(), &public_for_peers)?;
        let callout = match (self.keys_dir, self.callout_issuer) {
            (None, None) if self.refuse_legacy_connect_proofs.is_some() => {
                return Err("--refuse-legacy-connect-proofs needs --keys-dir: it is a rule of the auth callout".into());
            }
            (None, None) if self.reconnects_per_sec.is_some() => {
                return Err(
                    "--reconnects-per-sec needs --keys-dir: it is the auth callout's rate".into(),
                );
            }
            (None, None) => None,
            (Some(_), Some(_)) if self.reconnects_per_sec == Some(0) => {
                return Err("--reconnects-per-sec must be at least 1".into());
            }
            (Some(keys_dir), Some(issuer)) => Some(CalloutConfig {
                legacy_proofs: match self.refuse_legacy_connect_proofs {
                    Some(true) => kez_core::connect::LegacyProofs::Refuse,
                    _ => kez_core::connect::LegacyProofs::Accept,
                },
                reconnects_per_sec: self
                    .reconnects_per_sec
                    .unwrap_or(crate::reconnect_window::DEFAULT_RECONNECTS_PER_SEC),
                ..CalloutConfig::new(keys_dir, issuer)
            }),
            (Some(_), None) => {
                return Err("--keys-dir needs --callout-issuer: the issuer public key (A...) you put in nats-server's auth_callout block".into());
            }
            (None, Some(_)) => {
                return Err(
                    "--callout-issuer needs --keys-dir, the directory with the issuer seed".into(),
                );
            }
        };
        let auth = match (self.nats_user, self.nats_password, self.nats_nkey_seed_file) {
            (None, None, None) if callout.is_some() => NatsAuth::NkeySeedFile(
                callout
                    .as_ref()
                    .expect("checked")
                    .keys_dir
                    .join(crate::nats_conf::SERVER_USER_SEED_FILE),
            ),
            _ if callout.is_some() => {
                return Err("with --keys-dir the server authenticates with its own keys; drop --nats-user, --nats-password and --nats-nkey-seed-file".into());
            }
            (None, None, None) => NatsAuth::None,
            (Some(user), Some(password), None) => NatsAuth::UserPassword {
                user,
                password: Zeroizing::new(password),
            },
            (None, None, Some(path)) => NatsAuth::NkeySeedFile(path),
            (Some(_), None, None) | (None, Some(_), None) => {
                return Err("set both --nats-user and --nats-password, or neither".into());
            }
            _ => {
                return Err(
                    "use either --nats-user/--nats-password or --nats-nkey-seed-file, not both"
                        .into(),
                );
            }
        };
        let domain = self.domain.unwrap_or_else(|| DEFAULT_DOMAIN.to_owned());
        let domain = kez_core::handle::parse_domain(&domain)
            .map_err(|err| format!("--domain {domain:?}: {err}"))?;
        if let Some(replicas) = self.kv_replicas
            && !(1..=5).contains(&replicas)
        {
            return Err(format!("--kv-replicas must be 1 to 5, not {replicas}"));
        }
        let kv_replicas = self.kv_replicas;
        let nats_url = self.nats_url.unwrap_or_else(|| DEFAULT_NATS_URL.to_owned());
        let public_nats_url = match self.public_nats_url {
            Some(url) => {
                check_public_url(&url)
                    .map_err(|err| format!("--public-nats-url {url:?}: {err}"))?;
                url
            }
            None => public_url_from(&nats_url),
        };
        let pin = match self.pin_dir {
            None => {
                if self.pin_bind.is_some()
                    || self.pin_quota_bytes.is_some()
                    || self.pin_gc_secs.is_some()
                    || self.pin_fetch_secs.is_some()
                    || self.pin_dial_private.is_some()
                {
                    return Err("--pin-bind, --pin-quota-bytes, --pin-gc-secs, --pin-fetch-secs and --pin-dial-private need --pin-dir, which turns pinning on".into());
                }
                None
            }
            Some(dir) => {
                let mut pin = crate::pin::PinConfig::new(dir);
                if let Some(bind) = self.pin_bind {
                    pin.bind = bind;
                }
                if let Some(quota) = self.pin_quota_bytes {
                    pin.quota_bytes = quota;
                }
                match self.pin_gc_secs {
                    Some(0) => return Err("--pin-gc-secs must be at least 1".into()),
                    Some(secs) => pin.gc_interval = std::time::Duration::from_secs(secs),
                    None => {}
                }
                match self.pin_fetch_secs {
                    Some(secs) if !(1..=crate::pin::MAX_FETCH_SECS).contains(&secs) => {
                        return Err(format!(
                            "--pin-fetch-secs must be 1 to {}, not {secs}",
                            crate::pin::MAX_FETCH_SECS
                        ));
                    }
                    Some(secs) => pin.fetch_timeout = std::time::Duration::from_secs(secs),
                    None => {}
                }
                pin.dial_private = self.pin_dial_private.unwrap_or(false);
                Some(pin)
            }
        };
        let per_hour = |hour: Option<f64>| hour.map(|hour| hour / 3600.0);
        let limits = resolve_limits(&[
            (self.rate_limit_per_sec, self.rate_limit_burst),
            (
                per_hour(self.register_limit_per_hour.map(f64::from)),
                self.register_limit_burst,
            ),
            (
                per_hour(self.register_limit_global_per_hour.map(f64::from)),
                self.register_limit_global_burst,
            ),
            (self.connect_limit_per_sec, self.connect_limit_burst),
            (self.send_limit_per_sec, self.send_limit_burst),
            (
                per_hour(self.send_bytes_per_hour.map(|bytes| bytes as f64)),
                self.send_bytes_burst,
            ),
            (self.claim_limit_per_sec, self.claim_limit_burst),
            (
                self.one_time_keys_per_min.map(|min| min / 60.0),
                self.one_time_keys_burst,
            ),
        ])?;
        let inbox_max_bytes = match self.inbox_max_bytes {
            Some(bytes) if bytes < MIN_INBOX_MAX_BYTES => {
                return Err(format!(
                    "--inbox-max-bytes must be at least {MIN_INBOX_MAX_BYTES} (1 MiB)"
                ));
            }
            bytes => bytes,
        };
        let retired_settings = self
            .inbox_sweep_secs
            .map(|_| "inbox_sweep_secs")
            .into_iter()
            .collect();
        Ok(ServerConfig {
            nats_url,
            auth,
            callout,
            domain,
            kv_replicas,
            http_listen: self.http_listen,
            public_nats_url,
            http_limits: crate::http::HttpLimits::default(),
            pin,
            limits,
            retired_settings,
            inbox_max_bytes,
            pair_relay_tamper: None,
            federation,
        })
    }
}

/// The limits from their settings (rate per second, burst), in the order of [`LIMIT_FLAGS`];
/// unset halves keep their defaults, a rate of 0 turns that limit off.
fn resolve_limits(
    settings: &[(Option<f64>, Option<u32>); LIMIT_FLAGS.len()],
) -> Result<crate::limits::Limits, String> {
    use crate::limits::{Limits, Rate};
    let defaults = Limits::default();
    let default_rates = [
        defaults.per_key,
        defaults.register_per_addr,
        defaults.register_global,
        defaults.unregistered_connects_per_addr,
        defaults.send_per_key,
        defaults.send_bytes_per_key,
        defaults.claim_per_key,
        defaults.one_time_per_target,
    ];
    let mut rates = [Rate::OFF; LIMIT_FLAGS.len()];
    for (((per_sec, burst), default), (flag, least_burst), rate) in settings
        .iter()
        .zip(default_rates)
        .zip(LIMIT_FLAGS)
        .zip(&mut rates)
        .map(|(((setting, default), flag), rate)| ((*setting, default), flag, rate))
    {
        let per_sec = per_sec.unwrap_or(default.per_sec);
        if !per_sec.is_finite() || per_sec < 0.0 {
            return Err(format!("--{flag} must be a number of at least 0"));
        }
        if per_sec == 0.0 {
            continue;
        }
        let burst = burst.unwrap_or(default.burst);
        if burst < least_burst {
            return Err(format!(
                "the burst of --{flag} must be at least {least_burst} (set the rate to 0 to turn it off)"
            ));
        }
        *rate = Rate::new(per_sec, burst);
    }
    let [
        per_key,
        register_per_addr,
        register_global,
        unregistered_connects_per_addr,
        send_per_key,
        send_bytes_per_key,
        claim_per_key,
        one_time_per_target,
    ] = rates;
    Ok(Limits {
        per_key,
        register_per_addr,
        register_global,
        unregistered_connects_per_addr,
        send_per_key,
        send_bytes_per_key,
        claim_per_key,
        one_time_per_target,
        max_buckets: defaults.max_buckets,
    })
}

/// Each limit's rate flag and the least burst it takes: one request, or for the byte budget
/// one envelope of the largest size, which must always fit.
const LIMIT_FLAGS: [(&str, u32); 8] = [
    ("rate-limit-per-sec", 1),
    ("register-limit-per-hour", 1),
    ("register-limit-global-per-hour", 1),
    ("connect-limit-per-sec", 1),
    ("send-limit-per-sec", 1),
    (
        "send-bytes-per-hour",
        kez_core::envelope::MAX_ENVELOPE_BYTES as u32,
    ),
    ("claim-limit-per-sec", 1),
    ("one-time-keys-per-min", 1),
];

/// Least `--inbox-max-bytes`.
const MIN_INBOX_MAX_BYTES: u64 = 1 << 20;

/// URL schemes a client can connect to NATS with.
const PUBLIC_URL_SCHEMES: [&str; 4] = ["nats://", "tls://", "ws://", "wss://"];

/// The public URL derived from `--nats-url`: its first URL, with any `user:password@` removed
/// (the server's own credentials must never be published) and `nats://` added when it has no
/// scheme.
pub fn public_url_from(nats_url: &str) -> String {
    let first = nats_url.split(',').next().unwrap_or_default().trim();
    let (scheme, rest) = match first.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None => ("nats", first),
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    format!("{scheme}://{host}{path}")
}

/// Whether `url` can be published as the NATS URL clients use.
fn check_public_url(url: &str) -> Result<(), String> {
    let Some(scheme) = PUBLIC_URL_SCHEMES.iter().find(|s| url.starts_with(**s)) else {
        return Err(format!(
            "must start with one of {}",
            PUBLIC_URL_SCHEMES.join(" ")
        ));
    };
    let rest = &url[scheme.len()..];
    if rest.is_empty() {
        return Err("has no host".into());
    }
    if let Some(bad) = rest
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, ',' | '"' | '<' | '>' | '\\'))
    {
        return Err(format!("must be one URL without {bad:?}"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(
            "must not hold credentials: it is published to everyone in WebFinger answers".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let file: Settings = toml::from_str("domain = \"example.org\"\nkv_replicas = 3\n").unwrap();
        let flags = Settings {
            kv_replicas: Some(1),
            ..Settings::default()
        };
        let config = flags.or(file).resolve().unwrap();
        assert_eq!(config.domain, "example.org");
        assert_eq!(config.kv_replicas, Some(1));
        assert_eq!(config.nats_url, DEFAULT_NATS_URL);
        assert_eq!(Settings::default().resolve().unwrap().kv_replicas, None);
        assert!(matches!(config.auth, NatsAuth::None));
    }

    #[test]
    fn rate_limits_default_and_can_be_set_or_turned_off() {
        use crate::limits::{Limits, Rate};
        let config = Settings::default().resolve().unwrap();
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.limits.per_key, Rate::new(20.0, 40));
        let file: Settings =
            toml::from_str("rate_limit_per_sec = 5.0\nregister_limit_per_hour = 0\n").unwrap();
        let flags = Settings {
            rate_limit_burst: Some(7),
            connect_limit_per_sec: Some(2.0),
            ..Settings::default()
        };
        let limits = flags.or(file).resolve().unwrap().limits;
        assert_eq!(limits.per_key, Rate::new(5.0, 7));
        assert_eq!(limits.register_per_addr, Rate::OFF);
        assert_eq!(limits.unregistered_connects_per_addr, Rate::new(2.0, 50));
        assert_eq!(config.limits.claim_per_key, Rate::new(10.0, 50));
        assert_eq!(
            config.limits.one_time_per_target,
            Rate::new(20.0 / 60.0, 20)
        );
        let file: Settings = toml::from_str(
            "claim_limit_per_sec = 0
one_time_keys_per_min = 6.0
one_time_keys_burst = 3
",
        )
        .unwrap();
        let limits = file.resolve().unwrap().limits;
        assert_eq!(limits.claim_per_key, Rate::OFF);
        assert_eq!(limits.one_time_per_target, Rate::new(0.1, 3));
        let zero_burst = Settings {
            rate_limit_burst: Some(0),
            ..Settings::default()
        };
        assert!(zero_burst.resolve().unwrap_err().contains("burst"));
        let negative = Settings {
            connect_limit_per_sec: Some(-1.0),
            ..Settings::default()
        };
        assert!(negative.resolve().unwrap_err().contains("at least 0"));
    }

    #[test]
    fn the_retired_inbox_sweep_setting_still_parses_and_is_reported() {
        let config = Settings::default().resolve().unwrap();
        assert!(config.retired_settings.is_empty());
        let file: Settings = toml::from_str("inbox_sweep_secs = 0\n").unwrap();
        assert_eq!(
            file.resolve().unwrap().retired_settings,
            ["inbox_sweep_secs"]
        );
    }

    #[test]
    fn the_reconnect_rate_is_the_callouts_and_at_least_one() {
        let callout = |rate: Option<u32>| Settings {
            keys_dir: Some("/keys".into()),
            callout_issuer: Some("A".into()),
            reconnects_per_sec: rate,
            ..Settings::default()
        };
        let rate = |settings: Settings| {
            settings
                .resolve()
                .unwrap()
                .callout
                .unwrap()
                .reconnects_per_sec
        };
        assert_eq!(
            rate(callout(None)),
            crate::reconnect_window::DEFAULT_RECONNECTS_PER_SEC
        );
        assert_eq!(rate(callout(Some(500))), 500);
        let file: Settings = toml::from_str("reconnects_per_sec = 1500\n").unwrap();
        assert_eq!(rate(file.or(callout(None))), 1500);
        assert!(
            callout(Some(0))
                .resolve()
                .unwrap_err()
                .contains("at least 1")
        );
        let without_callout = Settings {
            reconnects_per_sec: Some(500),
            ..Settings::default()
        };
        assert!(
            without_callout
                .resolve()
                .unwrap_err()
                .contains("--keys-dir")
        );
    }

    #[test]
    fn bad_combinations_are_explained() {
        let half = Settings {
            nats_user: Some("u".into()),
            ..Settings::default()
        };
        assert!(half.resolve().unwrap_err().contains("both"));
        let bad_domain = Settings {
            domain: Some("kez.lat:4222".into()),
            ..Settings::default()
        };
        assert!(bad_domain.resolve().unwrap_err().contains("port"));
        assert!(toml::from_str::<Settings>("nats_ulr = \"x\"").is_err());
    }

    #[test]
    fn the_public_nats_url_never_carries_credentials() {
        let config = Settings {
            nats_url: Some("nats://kez:secret@10.0.0.5:4222,nats://10.0.0.6:4222".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.public_nats_url, "nats://10.0.0.5:4222");
        assert_eq!(config.http_listen, None);
        assert_eq!(public_url_from("127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(public_url_from("tls://u@h:1/x"), "tls://h:1/x");

        let explicit = Settings {
            public_nats_url: Some("tls://chat.kez.lat:4222".into()),
            http_listen: Some("127.0.0.1:8080".parse().unwrap()),
            ..Settings::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(explicit.public_nats_url, "tls://chat.kez.lat:4222");
        assert_eq!(
            explicit.http_listen,
            Some("127.0.0.1:8080".parse().unwrap())
        );
        for bad in [
            "tls://u:p@chat.kez.lat:4222",
            "http://chat.kez.lat",
            "nats://",
            "nats://a:1,nats://b:2",
            "nats://a b",
        ] {
            let settings = Settings {
                public_nats_url: Some(bad.into()),
                ..Settings::default()
            };
            assert!(settings.resolve().is_err(), "{bad}");
        }
        let file: Settings = toml::from_str(
            "http_listen = \"[::1]:8080\"\npublic_nats_url = \"wss://chat.kez.lat\"\n",
        )
        .unwrap();
        let config = file.resolve().unwrap();
        assert_eq!(config.http_listen, Some("[::1]:8080".parse().unwrap()));
        assert_eq!(config.public_nats_url, "wss://chat.kez.lat");
    }

    #[test]
    fn federation_is_off_unless_federate_and_its_settings_are_checked() {
        assert!(Settings::default().resolve().unwrap().federation.is_none());
        let without = Settings {
            bounce_after: Some(5),
            ..Settings::default()
        };
        assert!(without.resolve().unwrap_err().contains("--federate"));
        let no_keys = Settings {
            federate: Some(true),
            ..Settings::default()
        };
        assert!(no_keys.resolve().unwrap_err().contains("--keys-dir"));
        let file: Settings = toml::from_str(
            "federate = true\nkeys_dir = \"/k\"\ncallout_issuer = \"AX\"\npublic_nats_url = \"tls://chat.a.example:4222\"\nfederation_allow_http = true\nfederation_deny = [\"Evil.Example\"]\nbounce_after = 60\n[peer_webfinger]\n\"b.localhost\" = \"http://127.0.0.1:8081/\"\n",
        )
        .unwrap();
        let flags = Settings {
            retry_max: Some(2),
            peer_messages_per_sec: Some(5.0),
            ..Settings::default()
        };
        let federation = flags.or(file).resolve().unwrap().federation.unwrap();
        assert_eq!(federation.key_file, PathBuf::from("/k/federation.key"));
        assert_eq!(federation.nats_url, "tls://chat.a.example:4222");
        assert_eq!(
            federation
                .peer_webfinger
                .get("b.localhost")
                .map(String::as_str),
            Some("http://127.0.0.1:8081")
        );
        assert!(federation.allow_http);
        assert_eq!(federation.deny, ["evil.example"]);
        assert!(federation.allow.is_empty());
        assert_eq!(federation.bounce_after, Duration::from_secs(60));
        assert_eq!(federation.retry_max, Duration::from_secs(2));
        assert_eq!(
            federation.peer_limits.messages,
            crate::limits::Rate::new(5.0, DEFAULT_PEER_MESSAGES.burst)
        );
        assert_eq!(federation.peer_limits.bytes, DEFAULT_PEER_BYTES);
        let base = || Settings {
            federate: Some(true),
            keys_dir: Some("/k".into()),
            callout_issuer: Some("AX".into()),
            ..Settings::default()
        };
        let defaults = base().resolve().unwrap().federation.unwrap();
        assert_eq!(defaults.nats_url, DEFAULT_NATS_URL);
        assert_eq!(defaults.bounce_after, DEFAULT_BOUNCE_AFTER);
        assert!(!defaults.allow_http);
        for bad in [
            Settings {
                peer_webfinger: Some(vec![("b.localhost".into(), "http://127.0.0.1:1".into())]),
                ..base()
            },
            Settings {
                peer_webfinger: Some(vec![("b_x".into(), "https://b".into())]),
                ..base()
            },
            Settings {
                federation_allow: Some(vec!["a b".into()]),
                ..base()
            },
            Settings {
                federation_url: Some("nats://u:p@h".into()),
                ..base()
            },
            Settings {
                retry_max: Some(0),
                ..base()
            },
            Settings {
                outbox_max_bytes: Some(10),
                ..base()
            },
        ] {
            assert!(bad.resolve().is_err());
        }
        assert_eq!(
            parse_peer_webfinger("b.localhost=http://x:1").unwrap(),
            ("b.localhost".to_owned(), "http://x:1".to_owned())
        );
        assert!(parse_peer_webfinger("b.localhost").is_err());
    }

    #[test]
    fn a_federation_ca_file_must_hold_a_ca_certificate() {
        let base = |ca: &Path| Settings {
            federate: Some(true),
            keys_dir: Some("/k".into()),
            callout_issuer: Some("AX".into()),
            federation_ca: Some(ca.to_owned()),
            ..Settings::default()
        };
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tls/ca.pem");
        let federation = base(&fixture).resolve().unwrap().federation.unwrap();
        assert_eq!(federation.ca_file.as_deref(), Some(fixture.as_path()));
        assert!(
            crate::federation::peer_tls_config(Some(&fixture)).is_ok(),
            "the webpki roots and the CA"
        );
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = base(&missing).resolve().unwrap_err();
        assert!(err.starts_with("--federation-ca: cannot read"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = base(&empty).resolve().unwrap_err();
        assert!(err.contains("holds no certificate"), "{err}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(base(&garbage).resolve().is_err());
        let without = Settings {
            federation_ca: Some(fixture),
            ..Settings::default()
        };
        assert!(without.resolve().unwrap_err().contains("--federate"));
        let file: Settings = toml::from_str("federation_ca = \"/etc/kez/peers-ca.pem\"\n").unwrap();
        assert_eq!(
            file.federation_ca.as_deref(),
            Some(Path::new("/etc/kez/peers-ca.pem"))
        );
    }

    #[test]
    fn pinning_is_off_unless_a_pin_dir_is_set() {
        assert!(Settings::default().resolve().unwrap().pin.is_none());
        let quota_only = Settings {
            pin_quota_bytes: Some(5),
            ..Settings::default()
        };
        assert!(quota_only.resolve().unwrap_err().contains("--pin-dir"));
        let file: Settings = toml::from_str(
            "pin_dir = \"/var/lib/kez/pin\"\npin_bind = \"0.0.0.0:4433\"\npin_quota_bytes = 1000\n",
        )
        .unwrap();
        let pin = file.resolve().unwrap().pin.unwrap();
        assert_eq!(pin.dir, PathBuf::from("/var/lib/kez/pin"));
        assert_eq!(pin.bind, "0.0.0.0:4433".parse().unwrap());
        assert_eq!(pin.quota_bytes, 1000);
        assert_eq!(pin.gc_interval.as_secs(), crate::pin::DEFAULT_GC_SECS);
        let defaults = Settings {
            pin_dir: Some("/p".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap()
        .pin
        .unwrap();
        assert_eq!(defaults.quota_bytes, 1 << 30);
        assert_eq!(defaults.bind, "127.0.0.1:0".parse().unwrap());
        for bad in [
            Settings {
                pin_dir: Some("/p".into()),
                pin_gc_secs: Some(0),
                ..Settings::default()
            },
            Settings {
                pin_dir: Some("/p".into()),
                pin_fetch_secs: Some(500),
                ..Settings::default()
            },
        ] {
            assert!(bad.resolve().is_err());
        }
    }
}
