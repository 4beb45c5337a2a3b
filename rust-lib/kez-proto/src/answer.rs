//! The answers of the home server's endpoints (PROTOCOL.md §5, §6.3, §10): one type each, which
//! the server encodes and the client decodes.

use kez_core::file::BlobHash;
use kez_core::sigchain::LinkHash;
use kez_core::{Handle, PublicKey};
use serde::{Deserialize, Serialize};

/// A handle and the key that registered it: the answer of `kez.registry.register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleRecord {
    /// Full form, `@name@domain`.
    pub handle: Handle,
    /// The key that registered it: the handle's primary key and sigchain id.
    pub key: PublicKey,
    /// Server time of registration, seconds since the Unix epoch.
    pub registered_at: u64,
}

/// A chain's last link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// The last link's seq.
    pub seq: u64,
    /// The last link's hash.
    pub head: LinkHash,
}

/// A handle record and its chain head: the answer of `kez.registry.lookup` and `whois`. The
/// server's word: a client checks what it asked (the handle, the key) and verifies the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Full form, `@name@domain`.
    pub handle: Handle,
    /// The key that registered it: the handle's primary key and sigchain id.
    pub key: PublicKey,
    /// Server time of registration, seconds since the Unix epoch.
    pub registered_at: u64,
    /// The chain's head; `null` when the key has written no sigchain yet.
    pub sigchain: Option<ChainHead>,
}

impl Profile {
    /// The profile of `record` whose chain ends at `sigchain`.
    pub fn new(record: HandleRecord, sigchain: Option<ChainHead>) -> Profile {
        Profile {
            handle: record.handle,
            key: record.key,
            registered_at: record.registered_at,
            sigchain,
        }
    }
}

/// The answer of `kez.sigchain.head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadAnswer {
    /// The chain's key, as asked.
    pub key: PublicKey,
    /// The last link's seq.
    pub seq: u64,
    /// The last link's hash.
    pub head: LinkHash,
}

/// One page of a chain: the answer of `kez.sigchain.get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPage {
    /// The chain's key, as asked.
    pub key: PublicKey,
    /// The seq of the first link in `links`, as asked.
    pub from_seq: u64,
    /// Each link's exact bytes as a UTF-8 string, in seq order.
    pub links: Vec<String>,
    /// Whether links after these exist: ask again from the next seq.
    pub more: bool,
}

/// The answer of `kez.server.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// The domain the server serves (handles are `@name@<domain>`).
    pub domain: String,
    /// The server's version.
    pub version: String,
    /// Its limits.
    pub limits: Limits,
    /// Pinning, when the server offers it (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<PinInfo>,
    /// Federation, when the server talks to other servers (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<FederationInfo>,
    /// Whether the server keeps the directory (PROTOCOL.md §5.7) and lets users read it with
    /// direct gets (absent, false, from servers before it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub directory: bool,
}

/// What a federating server announces in [`ServerInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationInfo {
    /// The server key: it connects to peers with it, and seals bounces with it (PROTOCOL.md
    /// §14.4), so a client believes a bounce only from this key.
    pub key: PublicKey,
}

/// The limits a server announces in [`ServerInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest request body.
    pub max_request_bytes: u64,
    /// Largest sigchain link.
    pub max_link_bytes: u64,
    /// Most link bytes in one chain page.
    pub max_chain_page_bytes: u64,
    /// How far a registration's time may be from the server's clock, in seconds.
    pub registration_window_secs: u64,
}

/// The server's pin service, in [`ServerInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinInfo {
    /// The pin node's provider string: where pinned blobs can be fetched.
    pub provider: String,
    /// Bytes each user may pin.
    pub quota_bytes: u64,
}

/// Where a pin stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinState {
    /// Stored and kept.
    Pinned,
    /// Reserved; the server is still fetching it.
    Pinning,
}

/// One pin: the answer of `kez.pin.add`, an entry of `kez.pin.list` and `kez.pin.status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// The blob.
    pub blob: BlobHash,
    /// Its size in bytes (counted against the quota).
    pub size: u64,
    /// When it was pinned (while `pinning`: when the add started), the server's clock.
    pub pinned_at: u64,
    /// Pinned, or still being fetched.
    pub state: PinState,
    /// Endpoint id (hex) of the pin node that holds it; it matches the id in
    /// [`PinInfo::provider`] of the server instance that pinned it.
    pub node: String,
}

/// The own pins and quota: the answer of `kez.pin.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinList {
    /// Every pin, by blob hash.
    pub pins: Vec<PinRecord>,
    /// Bytes in use: the sum of the pins' sizes.
    pub used: u64,
    /// Bytes allowed.
    pub quota_bytes: u64,
}

/// What a remove freed: the answer of `kez.pin.remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRemoved {
    /// The blob.
    pub blob: BlobHash,
    /// Bytes freed.
    pub size: u64,
    /// Bytes in use now.
    pub used: u64,
    /// Bytes allowed.
    pub quota_bytes: u64,
}

/// Whether one blob is pinned: the answer of `kez.pin.status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinStatus {
    /// The blob.
    pub blob: BlobHash,
    /// Whether it is pinned (stored and kept).
    pub pinned: bool,
    /// The pin, pinned or still being fetched; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<PinRecord>,
}

/// Where an envelope is stored: the answer of `kez.mail.send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// Its sequence in `KEZ_MAIL`.
    pub seq: u64,
    /// Whether the stream already held a message with this id (then not stored again).
    pub duplicate: bool,
}

/// An answer's JSON body; a type that cannot be encoded is a 500 `internal`.
pub fn encode<T: Serialize>(answer: &T) -> Result<Vec<u8>, crate::ErrorAnswer> {
    serde_json::to_vec(answer)
        .map_err(|err| crate::ErrorAnswer::internal(format!("could not encode the answer: {err}")))
}
