//! What every request handler can use: the connections, the store, the limits and the optional
//! parts (callout, pin node), made once by `Server::start`.

use crate::callout::Callout;
use crate::limits::Limiters;
use crate::mail::MailState;
use crate::metrics::Metrics;
use crate::pin::Pinning;
use crate::store::Store;

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
    /// What `kez.mail.*` remembers between requests.
    pub mail: MailState,
    /// The pairing relay (`kez.pair.*`).
    pub relay: crate::relay::Relay,
    /// The key service (`kez.keys.*`).
    pub keys: crate::keys::Keys,
    /// Federation with other home servers, when on.
    pub federation: Option<std::sync::Arc<crate::federation::Federation>>,
}
