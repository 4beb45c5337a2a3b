//! The kez-chat client library: what the `kez-chat` CLI (and later a GUI) is built on.
//!
//! - [`Home`]: the client's directory (`$KEZ_CHAT_HOME`, default `~/.local/share/kez-chat`)
//!   with the secret key, the config and the store.
//! - [`Store`]: contacts and their pinned keys (trust on first use), message history and the
//!   ids of messages already seen, in one redb database.
//! - [`Connection`]: one NATS connection authenticated with the KEZ key through the server's
//!   auth callout; typed calls for the home server's services, sending sealed messages, and
//!   receiving from the own inbox (store first, then acknowledge).
//!
//! - [`files`] and [`shared`]: files over iroh — offers (§9) and the shared-files manifest (§11).
//!
//! PROTOCOL.md §5, §6, §8, §9 and §11 specify what goes over the wire.

pub mod chain;
pub mod connection;
pub mod files;
pub mod home;
pub mod shared;
pub mod store;

pub use chain::VerifiedChain;
pub use connection::{
    ClientError, Connection, PIN_ADD_TIMEOUT, Pending, Plaintext, Sent, ServiceError, UrlError,
    VerifiedContact, broker_urls, now,
};
pub use home::{Config, Home, HomeError, resolve_home};
/// The answers of the home server's services, as the wire contract (kez-proto) defines them.
pub use kez_proto::answer::{
    ChainHead, HandleRecord, Limits, PinInfo, PinList, PinRecord, PinRemoved, PinState, PinStatus,
    Profile, ServerInfo,
};
pub use store::{
    Contact, Conversation, Direction, Downloaded, Offer, PinChange, Published, PublishedManifest,
    Store, StoreError, StoredMessage,
};
