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
//! - [`live`]: typing and presence notices over core NATS, never stored (§8.6).
//! - [`files`] and [`shared`]: files over iroh — offers (§9) and the shared-files manifest (§11).
//!
//! PROTOCOL.md §5, §6, §8, §9 and §11 specify what goes over the wire.
//!
//! Connect as a key, verify a contact (its sigchain checked and pinned on first use), send it
//! a message, and receive what arrived for us:
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use kez_client::{Connection, Store, now};
//! use kez_core::{Handle, SecretKey};
//!
//! # async fn chat() -> Result<(), Box<dyn std::error::Error>> {
//! let key = Arc::new(SecretKey::generate());
//! let store = Store::open("store.redb")?;
//! let conn = Connection::connect("tls://kez.lat:4222", key).await?;
//! let bob = Handle::parse("@bob@kez.lat", "kez.lat")?;
//! let verified = conn.verify_contact(&store, &bob).await?;
//! let sent = conn.send(&verified.contact, "text", b"hello").await?;
//! store.record_outgoing(&sent, now())?;
//! for message in conn.receive(&store, 100, Duration::from_secs(5)).await? {
//!     println!("{}: {} bytes", message.from, message.body.len());
//! }
//! # Ok(())
//! # }
//! ```

pub mod connection;
pub mod files;
pub mod home;
pub mod live;
pub mod reconnect;
pub mod shared;
pub mod store;

pub use connection::secrecy::ForwardSecrecy;
pub use connection::{
    CheckedContact, ClientError, Connection, DirectoryCache, HomeServer, Moved, PIN_ADD_TIMEOUT,
    Pending, Plaintext, Sent, ServiceError, UrlError, VerifiedContact, broker_urls, now,
};
pub use home::{Config, Home, HomeError, resolve_home};
/// A verified sigchain and the trust decision on a contact's chain (kez-core `trust`).
pub use kez_core::trust::{PinChange, VerifiedChain};
/// The answers of the home server's services, as the wire contract (kez-proto) defines them.
pub use kez_proto::answer::{
    ChainHead, HandleRecord, Limits, PinInfo, PinList, PinRecord, PinRemoved, PinState, PinStatus,
    Profile, ServerInfo,
};
/// The pairing relay's requests ([`Connection::pair_put`], [`Connection::pair_get`]).
pub use kez_proto::pair::{
    GetRequest as PairGetRequest, PutRequest as PairPutRequest, Slot as PairSlot,
};
pub use live::{LIVE_WINDOW_SECS, LiveError, LiveNotice};
pub use store::{
    Contact, Conversation, Direction, Downloaded, Found, InboxFloor, Offer, Published,
    PublishedManifest, ReceivedBounce, SentWrap, Store, StoreError, StoredMessage,
    UNDECRYPTABLE_CONTENT_TYPE, Undelivered, UndeliveredNote,
};
