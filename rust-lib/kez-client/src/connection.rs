//! One NATS connection to the home server's broker, authenticated with the KEZ key
//! (PROTOCOL.md §6), and typed calls for the server's services (§5), sending (§6.3, §8) and
//! the own inbox.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use kez_core::chat::RESEND_CONTENT_TYPE;
use kez_core::copy::{SENT_COPY_CONTENT_TYPE, SentCopy};
use kez_core::envelope::{self, EnvelopeError, Message, MessageId, OlmEnvelope, Opened};
use kez_core::file::BlobHash;
use kez_core::moving;
use kez_core::{ChainError, Handle, HandleError, PublicKey, SecretKey};
use kez_proto::answer::{
    ChainHead, ChainPage, Delivered, HandleRecord, HeadAnswer, PinList, PinRecord, PinRemoved,
    PinStatus, Profile, ServerInfo,
};
use kez_proto::directory::{DIRECT_GET_BODY, EntryError, Slot};
use kez_proto::federation::{BOUNCE_CONTENT_TYPE, Bounce, RelayRequest, not_federated};
use kez_proto::mail::{
    FetchAnswer, FetchRequest, Fetched, MAX_FETCH_AFTER, MAX_FETCH_MESSAGES, SendRequest,
};
use kez_proto::pin::{PinOp, PinRequest};
use kez_proto::registry::RegistrationRequest;
use kez_proto::request::{GetChainRequest, KeyRequest, LookupRequest};
use kez_proto::subjects::{new_mail_subject, reply_prefix};
use kez_proto::{Endpoint, ErrorAnswer};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::{Contact, InboxFloor, Received, ReceivedBounce, Store, StoreError};

pub mod secrecy;
use kez_core::trust::VerifiedChain;
use kez_core::trust::{DeviceChange, PinChange, device_changes};

/// The first pause of [`Connection::receive`] before it fetches again when a notification named
/// a message the fetch did not bring yet; it doubles each time, [`CATCH_UP_PAUSES`] times
/// (about 1.6 s in all).
const CATCH_UP_PAUSE: Duration = Duration::from_millis(25);
/// See [`CATCH_UP_PAUSE`].
const CATCH_UP_PAUSES: usize = 6;

/// How often [`Connection::receive`], waiting for new-mail notifications, checks whether the
/// connection was re-established meanwhile: notifications sent while it was down are lost, so
/// a reconnect means fetching again.
const RECONNECT_CHECK: Duration = Duration::from_millis(500);

/// How long [`Connection::pin_add`] waits for the answer: the server fetches the blob first
/// (at most 100 s, PROTOCOL.md §10), and nats-server forgets the reply after 2 minutes.
pub const PIN_ADD_TIMEOUT: Duration = Duration::from_secs(120);

/// How long [`Connection::connect_with`] keeps asking a broker that refuses the key before it
/// reports the refusal: a server that is starting refuses everyone until its auth callout runs.
pub const AUTHORIZATION_RETRY_WINDOW: Duration = Duration::from_secs(4);

/// Whether a failed connect may be the broker's auth callout not serving yet rather than a
/// decision about the key: a refusal, or the connection closed by the broker while it waited
/// for its authorization (the home server closes those whose request reached no callout,
/// PROTOCOL.md §6.1), as opposed to a broker that cannot be reached at all.
fn not_decided_yet(err: &async_nats::ConnectError) -> bool {
    match err.kind() {
        async_nats::ConnectErrorKind::AuthorizationViolation => true,
        // async-nats' "connection closed unexpectedly" after CONNECT; an unreachable broker
        // fails with the operating system's error instead.
        async_nats::ConnectErrorKind::Io => std::error::Error::source(err)
            .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_none()),
        _ => false,
    }
}

/// How long a call keeps asking again a server that names when to (429 "slow down", 503
/// "unavailable" while a cluster elects a leader, both with `Kez-Retry-After-Ms`) before it
/// gives up with the server's answer.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(15);
/// How long a request is asked again while no service answers its subject (the server is
/// starting), before that is the caller's error.
pub const MAX_ABSENT_WAIT: Duration = Duration::from_secs(5);
/// The pause between two requests that found no service.
const NO_RESPONDERS_PAUSE: Duration = Duration::from_millis(250);
/// How long a directory read may take before the connection asks the service instead (and
/// from then on): an answer from the broker itself, normally a fraction of a millisecond.
const DIRECTORY_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest number of chain pages [`Connection::chain`] fetches before giving up on a
/// server that keeps saying `more`.
const MAX_CHAIN_PAGES: usize = 10_000;

/// Boxed errors from async-nats, whose error types differ per call.
pub type NatsError = Box<dyn std::error::Error + Send + Sync>;

/// An error answer from a kez service (PROTOCOL.md §5.1), and the subject that gave it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{subject}: {answer}")]
pub struct ServiceError {
    /// The service subject that answered.
    pub subject: String,
    /// The answer: code, stable name, message for people, and the chain head (a 409 from
    /// `append`) or the pause (a 429 or 503) it names.
    pub answer: ErrorAnswer,
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker URL is refused ([`broker_urls`]).
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The broker could not be reached, or refused the key.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The broker's URL.
        url: String,
        /// async-nats' error.
        source: async_nats::ConnectError,
    },
    /// A request got no answer (timeout, no responders, connection lost, or not permitted:
    /// an unregistered key may call only `register`, `lookup` and `server_info`).
    #[error("{subject}: no answer ({source})")]
    Request {
        /// The service subject.
        subject: String,
        /// async-nats' error.
        source: async_nats::RequestError,
    },
    /// The service answered with an error.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The answer could not be understood.
    #[error("{subject}: unexpected answer: {reason}")]
    BadAnswer {
        /// The service subject.
        subject: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A handle is not valid.
    #[error(transparent)]
    Handle(#[from] HandleError),
    /// A sigchain did not verify (the server, or someone, served a bad chain).
    #[error("the sigchain of {key} does not verify: {source}")]
    Chain {
        /// Whose chain.
        key: PublicKey,
        /// Why.
        source: ChainError,
    },
    /// A forward-secret session with a device could not be made (no prekey from its key
    /// service, or one that does not check): the device does not get the message.
    #[error("cannot start a forward-secret session with device {device}: {reason}")]
    Session {
        /// The device.
        device: PublicKey,
        /// Why.
        reason: String,
    },
    /// A message could not be sealed.
    #[error("cannot seal the message: {0}")]
    Seal(EnvelopeError),
    /// A message body larger than one envelope carries: nothing was sent.
    #[error("the message is {size} bytes; one message carries at most {max} bytes")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The most it may be ([`envelope::max_body_len`]).
        max: usize,
    },
    /// A NATS or JetStream operation failed.
    #[error("could not {action}: {source}")]
    Nats {
        /// What was being done.
        action: &'static str,
        /// async-nats' error.
        source: NatsError,
    },
    /// The stream already held a message with this id, and the request was sent once: message
    /// ids are random, so that message is not ours, and this one was not stored (PROTOCOL.md
    /// §6.3).
    #[error("the server already had a message with id {id}; it was not delivered again")]
    Duplicate {
        /// The message id.
        id: MessageId,
    },
    /// The local store failed, or refused a contact's key ([`Store::pin`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A contact's chain names a new home whose server names another identity for it: the
    /// move is not followed.
    #[error(
        "{from}'s sigchain says it moved to {to}, but the server of {to} names another identity for it ({offered}, not {pinned}): not followed"
    )]
    MovedToAnother {
        /// The handle the contact is pinned under.
        from: Handle,
        /// The handle its chain names.
        to: Handle,
        /// The identity pinned.
        pinned: PublicKey,
        /// The key the new server names.
        offered: PublicKey,
    },
    /// The server names another key for the handle than the one the user accepted.
    #[error(
        "the server names key {offered} for {handle}, not the key you accepted ({accepted}): nothing was changed"
    )]
    NotAccepted {
        /// The handle.
        handle: String,
        /// The key the user accepted.
        accepted: PublicKey,
        /// The key the server names.
        offered: PublicKey,
    },
}

/// A contact as verified now ([`Connection::verify_contact`]).
#[derive(Debug, Clone)]
pub struct VerifiedContact {
    /// The pinned contact, updated to the verified chain.
    pub contact: Contact,
    /// What changed since it was last verified.
    pub change: PinChange,
    /// The devices added and revoked since it was last verified (notes for people).
    pub devices_changed: Vec<DeviceChange>,
    /// The verified sigchain.
    pub chain: VerifiedChain,
    /// The contact's chain says it moved to another handle (PROTOCOL.md §14.6), found now.
    pub moved: Option<Moved>,
}

/// A contact as [`Connection::check_contact`] found it: as pinned, or verified again.
#[derive(Debug, Clone)]
pub enum CheckedContact {
    /// The chain's head has not moved since the contact was last verified: the pinned contact
    /// is current, and its chain was neither fetched nor verified again.
    Unchanged(Contact),
    /// The head moved (or the contact is new): the chain was fetched and verified.
    Verified(Box<VerifiedContact>),
}

impl CheckedContact {
    /// The contact as it stands now.
    pub fn contact(&self) -> &Contact {
        match self {
            CheckedContact::Unchanged(contact) => contact,
            CheckedContact::Verified(verified) => &verified.contact,
        }
    }
}

/// A contact's move, as [`Connection::verify_contact`] found it.
#[derive(Debug, Clone)]
pub struct Moved {
    /// The handle the contact was pinned under.
    pub from: Handle,
    /// The handle its chain names as its home now.
    pub to: Handle,
    /// Why the move was not followed (the contact stays pinned under `from`, whose server
    /// forwards while it lives), or `None`: the contact is pinned under `to` now, the same
    /// identity, its chain as `to`'s server serves it verified and extending the pin.
    pub not_followed: Option<String>,
}

/// How many moves in a row [`Connection::verify_contact`] follows at once (a chain names one
/// home; a later server's copy may name a later one).
const MAX_MOVES_FOLLOWED: usize = 4;

/// A message the stream accepted (see [`Connection::send`]); [`Store::record_outgoing`]
/// puts it in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The random message id: the same in the envelope of every device it went to.
    pub id: MessageId,
    /// The sender: the sending device's key.
    pub from: PublicKey,
    /// The recipient's identity (the envelopes are sealed to its active devices).
    pub to: PublicKey,
    /// The time sealed into the message, seconds since the epoch.
    pub time: u64,
    /// The content type.
    pub content_type: String,
    /// The content.
    pub body: Vec<u8>,
    /// The message's sequence in the inbox stream of the first recipient device that took it;
    /// 0 for a contact on another domain (the home server's outbox took it: its sequence there
    /// does not order it among the inbox's).
    pub stream_sequence: u64,
    /// The devices (the recipient's, or the own other devices for their copy) the server did
    /// not take it for, and why: one revoked a moment ago, say. Empty when every one did.
    pub missed: Vec<(PublicKey, String)>,
}

/// A message handed to the server by [`Connection::publish`] whose answers are still
/// outstanding: one request per device, on their way already; several messages can be in
/// flight at once.
#[derive(Debug)]
pub struct Pending {
    /// For each device, in the order the recipient's come first: the device, whether it is
    /// the recipient's (not an own copy), and the answer with whether it is to a repeated
    /// request.
    answers: Vec<(PublicKey, bool, DeliveryAnswer)>,
    /// Whether the recipient's envelopes went to the outbox (`kez.mail.relay`).
    relayed: bool,
    sent: Sent,
}

type DeliveryAnswer = tokio::task::JoinHandle<Result<(Bytes, bool), ClientError>>;

impl Pending {
    /// The message's id.
    pub fn id(&self) -> MessageId {
        self.sent.id
    }

    /// Waits for the server's answers: the message is sent once a device of the recipient
    /// has it in its inbox, and this answers [`Sent`], naming the devices that did not take it
    /// ([`Sent::missed`]). When none of the recipient's did, the answer for the first is the
    /// error. A `duplicate` answer to a request sent once is [`ClientError::Duplicate`]; to a
    /// repeated one (after a 429 or 503 that named a pause) it means the first attempt was
    /// stored, and the message is sent (PROTOCOL.md §6.3). A refusal is the server's
    /// [`ServiceError`] (`unknown_recipient`, `rate_limited`, `inbox_full`, …).
    pub async fn acked(self) -> Result<Sent, ClientError> {
        let mut sent = self.sent;
        let mut delivered_to_peer = false;
        let mut first_error = None;
        for (device, for_peer, answer) in self.answers {
            let outcome = delivery(answer, sent.id).await;
            match outcome {
                Ok(seq) if for_peer => {
                    if !delivered_to_peer && !self.relayed {
                        sent.stream_sequence = seq;
                    }
                    delivered_to_peer = true;
                }
                Ok(_) => {}
                Err(err) => {
                    sent.missed.push((device, err.to_string()));
                    if for_peer && first_error.is_none() {
                        first_error = Some(err);
                    }
                }
            }
        }
        match first_error {
            Some(err) if !delivered_to_peer => Err(err),
            _ => Ok(sent),
        }
    }
}

/// The stream sequence one device's answer names.
async fn delivery(answer: DeliveryAnswer, id: MessageId) -> Result<u64, ClientError> {
    let (answer, repeated) = answer.await.map_err(|err| ClientError::Nats {
        action: "wait for the server's answer",
        source: err.into(),
    })??;
    let delivered: Delivered =
        serde_json::from_slice(&answer).map_err(|err| bad_answer(Endpoint::MailSend, &err))?;
    if delivered.duplicate && !repeated {
        return Err(ClientError::Duplicate { id });
    }
    Ok(delivered.seq)
}

/// Whether a connection may go to its broker unencrypted (`nats://`, `ws://`). The connect
/// proof is bound to the broker's nonce under its own tag, so nobody on the way can reuse it
/// for anything else, but they could read and change the traffic and hand it to another broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Plaintext {
    /// Unencrypted only to this machine (`localhost`, `127.0.0.0/8`, `::1`); other brokers need
    /// `tls://` or `wss://`.
    #[default]
    LoopbackOnly,
    /// Unencrypted to any broker: the user said so.
    Allowed,
}

/// Why a broker URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The URL names a broker on another machine without TLS ([`Plaintext::LoopbackOnly`]).
    #[error(
        "{url} is not encrypted and not on this machine: anyone on the way could read and change what you send. Use tls://HOST:PORT (or wss://), or allow plaintext explicitly if that is really what you want"
    )]
    Plaintext {
        /// The URL refused.
        url: String,
    },
    /// The URL is not a NATS URL.
    #[error("{url:?} is not a NATS server URL: {reason}")]
    Bad {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
}

/// The broker URLs of `url` (one, or several separated by commas: the nodes of a cluster),
/// each checked to be a NATS URL that `plaintext` allows.
pub fn broker_urls(url: &str, plaintext: Plaintext) -> Result<Vec<String>, UrlError> {
    let urls: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(UrlError::Bad {
            url: url.to_owned(),
            reason: "no URL given".into(),
        });
    }
    urls.into_iter()
        .map(|text| {
            let addr: async_nats::ServerAddr =
                text.parse().map_err(|err: std::io::Error| UrlError::Bad {
                    url: text.to_owned(),
                    reason: err.to_string(),
                })?;
            if addr.host().is_empty() {
                return Err(UrlError::Bad {
                    url: text.to_owned(),
                    reason: "it names no host".into(),
                });
            }
            let encrypted = matches!(addr.scheme(), "tls" | "wss");
            if !encrypted && plaintext == Plaintext::LoopbackOnly && !is_loopback(addr.host()) {
                return Err(UrlError::Plaintext {
                    url: text.to_owned(),
                });
            }
            Ok(text.to_owned())
        })
        .collect()
}

/// Whether `host` is this machine: `localhost` or a loopback address.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Seconds since the Unix epoch by the local clock.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// One connection to the broker as a KEZ key. It reconnects on its own, forever (each
/// reconnect is authorized afresh by the callout), so it survives a broker restart.
///
/// A key that registers over this connection keeps the narrow profile until it connects
/// again: connect a new `Connection` after [`Connection::register`] to send and receive.
#[derive(Debug, Clone)]
pub struct Connection {
    client: Client,
    key: Arc<SecretKey>,
    /// The identity the key is a device of (the sigchain id): the key itself unless
    /// [`Connection::as_device_of`] said otherwise.
    identity: PublicKey,
    /// The subscription to the own new-mail notifications, made by the first
    /// [`Connection::receive`] and kept (async-nats renews it on every reconnect).
    new_mail: Arc<tokio::sync::Mutex<Option<async_nats::Subscriber>>>,
    /// The own identity's devices that get a copy of what this connection sends, as last
    /// learned by [`Connection::own_devices`]: none until then.
    own_devices: Arc<std::sync::Mutex<Vec<PublicKey>>>,
    /// The store whose Olm account and sessions seal forward-secret messages, once
    /// [`Connection::prepare_forward_secrecy`] found the key service: until then (and with a
    /// server without one) every message is sealed with envelope version 1.
    secrecy: Arc<std::sync::OnceLock<Store>>,
    /// The contacts' moves followed while receiving, for [`Connection::take_moves`].
    moves: Arc<std::sync::Mutex<Vec<Moved>>>,
    /// The home server's domain and federation key, asked once ([`Connection::home_server`]).
    home: Arc<tokio::sync::OnceCell<HomeServer>>,
    /// Whether directory reads still answer on this connection: the first that fails turns
    /// it off, and lookups ask the service from then on.
    directory_works: Arc<std::sync::atomic::AtomicBool>,
    /// The directory entries opened on this connection.
    directory: Arc<DirectoryCache>,
    /// The task reading the home server's reconnect window ([`crate::reconnect`]), ended when
    /// the last clone of the connection is dropped (it holds a clone of the NATS client, which
    /// would otherwise keep the connection open).
    _window_reader: Arc<AbortOnDrop>,
}

/// A task aborted when this is dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The directory entries (PROTOCOL.md §5.7) a connection opened, by slot: an answer with the
/// very bytes of the last one is that entry (each is sealed with a fresh nonce), so it is not
/// opened and parsed again. Parsing is most of a lookup's cost on the client: a key is
/// checked to be a canonical, torsion-free point.
#[derive(Debug, Default)]
pub struct DirectoryCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, (Bytes, Profile)>>,
}

/// How many slots a [`DirectoryCache`] keeps before it starts over.
const DIRECTORY_CACHE_SLOTS: usize = 4096;

impl DirectoryCache {
    /// `entry`, an answer for `slot`, opened ([`Slot::open`]), or as it was opened before.
    pub fn open(&self, slot: &Slot, entry: &Bytes) -> Result<Profile, EntryError> {
        let mut entries = self.entries.lock().expect("directory cache lock");
        if let Some((bytes, profile)) = entries.get(slot.id())
            && bytes == entry
        {
            return Ok(profile.clone());
        }
        let profile = slot.open(entry)?;
        if entries.len() >= DIRECTORY_CACHE_SLOTS {
            entries.clear();
        }
        entries.insert(slot.id().to_owned(), (entry.clone(), profile.clone()));
        Ok(profile)
    }
}

/// What a connection knows of its home server from `kez.server.info`, asked once per
/// connection: the domain it serves and, when it talks to other servers, its federation key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeServer {
    /// The domain it serves (normalised).
    pub domain: String,
    /// Its server key when it federates (PROTOCOL.md §14): the only signer a bounce is
    /// believed from. `None`: it does not federate, and no request names another domain.
    pub federation: Option<PublicKey>,
    /// Whether it keeps the directory (PROTOCOL.md §5.7): lookups of its own users are then
    /// one direct get.
    pub directory: bool,
}

impl HomeServer {
    /// The `domain` member of a request about a key or handle whose home is `domain`
    /// (normalised): `None` for the home server's own domain (the member is left out, as
    /// before federation), the domain for another server's, which the home server asks in
    /// turn. Another domain through a server that does not federate is its `not_federated`
    /// answer, made here: such a server refuses a `domain` member it does not know.
    pub fn domain_member(&self, domain: &str) -> Result<Option<String>, ErrorAnswer> {
        if domain == self.domain {
            return Ok(None);
        }
        match self.federation {
            Some(_) => Ok(Some(domain.to_owned())),
            None => Err(not_federated(domain, &self.domain)),
        }
    }

    /// Whether fetches ask for each message's origin (`origins`): only a federating server
    /// knows the member.
    pub fn federates(&self) -> bool {
        self.federation.is_some()
    }
}

/// The handle `handle` names now: the one its contact lives under when it moved since
/// ([`Store::contact_or_moved`]), else itself.
fn pinned_handle(store: &Store, handle: &Handle) -> Result<Handle, StoreError> {
    if let Some(pinned) = store.contact_or_moved(&handle.to_string())?
        && let Ok(now) = pinned.handle.parse::<Handle>()
    {
        return Ok(now);
    }
    Ok(handle.clone())
}

/// The service request that hands `sealed` (for `device`, with message `id`) to the home
/// server: `kez.mail.send` for a device of the home domain (`remote` `None`), else
/// `kez.mail.relay` naming the recipient's domain, which the home server's outbox delivers.
fn mail_request(
    remote: Option<&str>,
    device: &PublicKey,
    id: &MessageId,
    sealed: &[u8],
) -> (Endpoint, Vec<u8>) {
    let frame = SendRequest::encode(device, id, sealed);
    match remote {
        None => (Endpoint::MailSend, frame),
        Some(domain) => (Endpoint::MailRelay, RelayRequest::encode(domain, &frame)),
    }
}

/// What a fetched message is: a bounce only when the home server's federation key (`home_key`)
/// signed it with the bounce content type. `None` for anything else (another signer's
/// `kez.bounce` too: that is a message like any other, of a type this client does not show);
/// `Some(Err)` for a bounce whose body does not parse, which is dropped.
fn bounce_of(message: &Message, home_key: Option<&PublicKey>) -> Option<Result<Bounce, String>> {
    if home_key != Some(&message.from) || message.content_type != BOUNCE_CONTENT_TYPE {
        return None;
    }
    let bounce = serde_json::from_slice::<Bounce>(&message.body)
        .map_err(|err| format!("a bounce from the home server does not parse: {err}"))
        .and_then(|bounce| match bounce.message_id() {
            Some(_) => Ok(bounce),
            None => Err(format!(
                "a bounce from the home server names no message id ({:?})",
                bounce.id
            )),
        });
    Some(bounce)
}

/// The domain of a full handle as stored (`@name@domain`).
fn handle_domain(handle: &str) -> &str {
    handle.rsplit('@').next().unwrap_or_default()
}

/// How long one connect attempt (TCP, the broker's greeting, the callout's decision, the
/// first pong) may take before the client hangs up and tries again later. async-nats' 5 s is
/// too short in a reconnect storm: a broker restarted under thousands of clients takes seconds
/// to greet each of them, and a client that hangs up after its authorization was decided
/// wasted that work and comes back for more (BENCHMARKS.md, storm: 551 of 10,000 did).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Connection {
    /// The async-nats options of a kez connection as `key`: nkey authentication with the
    /// broker's nonce signed under the KEZ connect tag (`with_auth_callback`,
    /// [`kez_core::connect::sign_nonce`]: a nonce no nats-server would send is not signed, and
    /// the connection fails; a broker that sends none, checking no keys, gets no proof), replies under the key's own prefix, only the servers the caller
    /// names (never those a broker advertises), reconnects forever after a random wait
    /// ([`crate::reconnect`]), each attempt for up to [`CONNECT_TIMEOUT`]. Add to them
    /// (`retry_on_initial_connect`, timeouts) and pass them to [`Connection::connect_with`]; do
    /// not replace the auth, the inbox prefix, the server list, the reconnect callbacks or the
    /// event callback: for events of your own use [`Connection::options_with_events`].
    pub fn options(key: &Arc<SecretKey>) -> async_nats::ConnectOptions {
        Connection::options_with_events(key, |_| std::future::ready(()))
    }

    /// [`Connection::options`] handing every connection event to `on_event` too (after the
    /// reconnect pacing has taken note of it: an expired authorization comes back at once).
    pub fn options_with_events<F, Fut>(
        key: &Arc<SecretKey>,
        on_event: F,
    ) -> async_nats::ConnectOptions
    where
        F: Fn(async_nats::Event) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + Sync + 'static,
    {
        let signer = key.clone();
        let pacing = Arc::new(crate::reconnect::Pacing::default());
        let noting = pacing.clone();
        let options = async_nats::ConnectOptions::with_auth_callback(move |nonce| {
            let signer = signer.clone();
            async move {
                let mut auth = async_nats::Auth::new();
                // A broker that sends no nonce checks no key (it has no nkey users, so it is
                // not a kez broker with the callout): nothing to prove, nothing is signed.
                if nonce.is_empty() {
                    return Ok(auth);
                }
                let signature = kez_core::connect::sign_nonce(&signer, &nonce)
                    .map_err(async_nats::AuthError::new)?;
                auth.nkey = Some(signer.public_key().to_nkey());
                auth.signature = Some(signature.to_bytes().to_vec());
                Ok(auth)
            }
        })
        .custom_inbox_prefix(reply_prefix(&key.public_key()))
        .ignore_discovered_servers()
        .max_reconnects(None)
        .connection_timeout(CONNECT_TIMEOUT)
        .event_callback(move |event| {
            noting.note(&event);
            on_event(event)
        });
        pacing.pace(options)
    }

    /// Connects to the broker at `url` (or to any of several comma-separated URLs, the nodes
    /// of a cluster) as `key` with [`Connection::options`]; unencrypted only to this machine
    /// ([`Plaintext::LoopbackOnly`]).
    pub async fn connect(url: &str, key: Arc<SecretKey>) -> Result<Connection, ClientError> {
        let options = Connection::options(&key);
        Connection::connect_with(url, key, options, Plaintext::LoopbackOnly).await
    }

    /// Connects with `options` made by [`Connection::options`] for the same `key`, to the
    /// URLs of `url` that `plaintext` allows ([`broker_urls`]).
    pub async fn connect_with(
        url: &str,
        key: Arc<SecretKey>,
        options: async_nats::ConnectOptions,
        plaintext: Plaintext,
    ) -> Result<Connection, ClientError> {
        // async-nats takes a list, and would read the whole string as one URL.
        let servers = broker_urls(url, plaintext)?;
        // A refusal may be the auth callout not answering yet (the server is starting) rather
        // than a decision about the key: ask again for a few seconds before reporting it.
        let mut pause = Duration::from_millis(250);
        let started = tokio::time::Instant::now();
        let client = loop {
            match options.clone().connect(servers.clone()).await {
                Ok(client) => break client,
                Err(source)
                    if not_decided_yet(&source)
                        && started.elapsed() + pause <= AUTHORIZATION_RETRY_WINDOW =>
                {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(source) => {
                    return Err(ClientError::Connect {
                        url: url.to_owned(),
                        source,
                    });
                }
            }
        };
        let window_reader = tokio::spawn(crate::reconnect::keep_learning(client.clone()));
        Ok(Connection {
            _window_reader: Arc::new(AbortOnDrop(window_reader.abort_handle())),
            client,
            identity: key.public_key(),
            key,
            new_mail: Arc::default(),
            own_devices: Arc::default(),
            secrecy: Arc::default(),
            moves: Arc::default(),
            home: Arc::default(),
            directory_works: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            directory: Arc::default(),
        })
    }

    /// The underlying NATS client.
    pub fn nats(&self) -> &Client {
        &self.client
    }

    /// The connection's key: the device key.
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// The identity this connection speaks for: the sigchain id its key is a device of.
    pub fn identity(&self) -> PublicKey {
        self.identity
    }

    /// This connection, speaking for `identity`, of which its key is another device (a home
    /// added by pairing or recovery, [`crate::Config::identity`]). The broker knows it from
    /// the device index; the client needs it for its own inbox and its own sigchain.
    pub fn as_device_of(mut self, identity: PublicKey) -> Connection {
        self.identity = identity;
        self
    }

    /// Sends `body` to a service and returns the answer's body, or its [`ServiceError`].
    async fn call(&self, endpoint: Endpoint, body: Vec<u8>) -> Result<Bytes, ClientError> {
        self.call_within(endpoint, body, None).await
    }

    /// Like [`Connection::call`], waiting up to `timeout` for the answer.
    async fn call_with_timeout(
        &self,
        endpoint: Endpoint,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        self.call_within(endpoint, body, Some(timeout)).await
    }

    /// Sends `body` to a service, waiting `timeout` for each answer (`None`: the client's
    /// default). A server that names when to ask again (429 or 503 with `Kez-Retry-After-Ms`)
    /// is asked the same again after that time, until [`MAX_RETRY_WAIT`] has passed since the
    /// first attempt; then its answer is the caller's error. Every request may be repeated:
    /// each is idempotent (PROTOCOL.md §5.1).
    async fn call_within(
        &self,
        endpoint: Endpoint,
        body: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<Bytes, ClientError> {
        let (answer, _repeated) = self.call_repeating(endpoint, body, timeout).await?;
        Ok(answer)
    }

    /// [`Connection::call_within`], also saying whether the answer is to a repeated request.
    async fn call_repeating(
        &self,
        endpoint: Endpoint,
        body: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<(Bytes, bool), ClientError> {
        let subject = endpoint.subject();
        let body = Bytes::from(body);
        let give_up = tokio::time::Instant::now() + MAX_RETRY_WAIT;
        let absent_until = tokio::time::Instant::now() + MAX_ABSENT_WAIT;
        let mut repeated = false;
        loop {
            let mut request = async_nats::Request::new().payload(body.clone());
            if let Some(timeout) = timeout {
                request = request.timeout(Some(timeout));
            }
            let answer = match self.client.send_request(subject.to_owned(), request).await {
                Ok(answer) => answer,
                // No service answers the subject: the server is (re)starting, which takes a
                // moment; a long-lived connection (the service's) sees it as this.
                Err(source)
                    if source.kind() == async_nats::RequestErrorKind::NoResponders
                        && tokio::time::Instant::now() + NO_RESPONDERS_PAUSE <= absent_until =>
                {
                    tracing::debug!(subject, "no responders; asking again");
                    tokio::time::sleep(NO_RESPONDERS_PAUSE).await;
                    continue;
                }
                Err(source) => {
                    return Err(ClientError::Request {
                        subject: subject.to_owned(),
                        source,
                    });
                }
            };
            let Some(err) = answer.headers.as_ref().and_then(|headers| {
                ErrorAnswer::from_headers(|name| headers.get(name).map(|value| value.as_str()))
            }) else {
                return Ok((answer.payload, repeated));
            };
            let pause = err.retry_after_ms.map(Duration::from_millis);
            match pause {
                Some(pause)
                    if matches!(err.code, 429 | 503)
                        && tokio::time::Instant::now() + pause <= give_up =>
                {
                    tracing::debug!(
                        subject,
                        ?pause,
                        code = err.code,
                        "the server asks to try again later; waiting"
                    );
                    tokio::time::sleep(pause).await;
                    repeated = true;
                }
                _ => {
                    return Err(ServiceError {
                        subject: subject.to_owned(),
                        answer: err,
                    }
                    .into());
                }
            }
        }
    }

    /// [`Connection::call`] with a JSON answer.
    async fn call_json<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let answer = self.call(endpoint, body).await?;
        serde_json::from_slice(&answer).map_err(|err| bad_answer(endpoint, &err))
    }

    /// The server's domain, version and limits (`kez.server.info`).
    pub async fn server_info(&self) -> Result<ServerInfo, ClientError> {
        self.call_json(Endpoint::Info, b"{}".to_vec()).await
    }

    /// The home server's domain and federation key: `kez.server.info`, asked on the first call
    /// and kept for the connection's life (a server that starts federating is seen by the next
    /// connection). The domain must be a valid one, in normal form.
    pub async fn home_server(&self) -> Result<&HomeServer, ClientError> {
        self.home
            .get_or_try_init(|| async {
                let info = self.server_info().await?;
                match kez_core::handle::parse_domain(&info.domain) {
                    Ok(domain) if domain == info.domain => Ok(HomeServer {
                        domain,
                        federation: info.federation.map(|federation| federation.key),
                        directory: info.directory,
                    }),
                    _ => Err(ClientError::BadAnswer {
                        subject: Endpoint::Info.subject().into(),
                        reason: format!("{:?} is not a domain in normal form", info.domain),
                    }),
                }
            })
            .await
    }

    /// The `domain` member for requests to `endpoint` about a key whose home is `domain`
    /// ([`HomeServer::domain_member`]; `None`: the home domain).
    async fn domain_member(
        &self,
        endpoint: Endpoint,
        domain: Option<&str>,
    ) -> Result<Option<String>, ClientError> {
        let home = self.home_server().await?;
        home.domain_member(domain.unwrap_or(&home.domain))
            .map_err(|answer| {
                ServiceError {
                    subject: endpoint.subject().to_owned(),
                    answer,
                }
                .into()
            })
    }

    /// Registers `name` (e.g. `alice`, `@alice`; bare names mean the server's domain) for this
    /// connection's key, signed now (`kez.registry.register`). Registering the name the key
    /// already holds answers the existing record. Reconnect afterwards for the chat profile.
    /// The answer must name this handle and this key.
    pub async fn register(&self, name: &str) -> Result<HandleRecord, ClientError> {
        let info = self.server_info().await?;
        let handle = Handle::parse(name, &info.domain)?;
        let request = RegistrationRequest::sign(&self.key, &handle, now());
        let record: HandleRecord = self
            .call_json(Endpoint::Register, request_body(&request))
            .await?;
        if record.handle != handle || record.key != self.key.public_key() {
            return Err(ClientError::BadAnswer {
                subject: Endpoint::Register.subject().into(),
                reason: format!(
                    "asked to register {handle} for {}, answered {} for {}",
                    self.key.public_key(),
                    record.handle,
                    record.key
                ),
            });
        }
        Ok(record)
    }

    /// Asks the home server to keep `blob` (`size` bytes of ciphertext), fetching it now from
    /// `providers` (provider strings of nodes that serve it: this client's own node must stay
    /// online until the answer), signed by this connection's key (`kez.pin.add`, PROTOCOL.md
    /// §10). Pinning a pinned blob again answers the existing record. Errors: `quota_exceeded`
    /// (413), `fetch_failed` (502), `size_mismatch` (400), `not_registered`, `disabled` (403).
    /// Waits up to [`PIN_ADD_TIMEOUT`].
    pub async fn pin_add(
        &self,
        blob: &BlobHash,
        size: u64,
        providers: &[String],
    ) -> Result<PinRecord, ClientError> {
        let domain = self.server_info().await?.domain;
        let request = PinRequest::add(&self.key, &domain, now(), *blob, size, providers.to_vec());
        let endpoint = PinOp::Add.endpoint();
        let answer = self
            .call_with_timeout(endpoint, request_body(&request), PIN_ADD_TIMEOUT)
            .await?;
        serde_json::from_slice(&answer).map_err(|err| bad_answer(endpoint, &err))
    }

    /// Stops the home server keeping `blob` (`kez.pin.remove`); the bytes are free at once,
    /// the data goes at the server's next garbage collection. `not_found` when not pinned.
    pub async fn pin_remove(&self, blob: &BlobHash) -> Result<PinRemoved, ClientError> {
        let domain = self.server_info().await?.domain;
        let request = PinRequest::remove(&self.key, &domain, now(), *blob);
        self.pin_call(PinOp::Remove, &request).await
    }

    /// The own pins, bytes used and quota (`kez.pin.list`).
    pub async fn pin_list(&self) -> Result<PinList, ClientError> {
        let domain = self.server_info().await?.domain;
        let request = PinRequest::list(&self.key, &domain, now());
        self.pin_call(PinOp::List, &request).await
    }

    /// Whether `blob` is pinned (`kez.pin.status`).
    pub async fn pin_status(&self, blob: &BlobHash) -> Result<PinStatus, ClientError> {
        let domain = self.server_info().await?.domain;
        let request = PinRequest::status(&self.key, &domain, now(), *blob);
        self.pin_call(PinOp::Status, &request).await
    }

    /// Publishes Olm prekeys of this connection's key (`kez.keys.publish`, PROTOCOL.md §15.2).
    pub async fn keys_publish(
        &self,
        request: &kez_proto::keys::PublishRequest,
    ) -> Result<kez_proto::keys::PublishAnswer, ClientError> {
        self.call_json(Endpoint::KeysPublish, request_body(request))
            .await
    }

    /// What the server keeps of this connection's prekeys (`kez.keys.count`).
    pub async fn keys_count(&self) -> Result<kez_proto::keys::CountAnswer, ClientError> {
        self.call_json(
            Endpoint::KeysCount,
            request_body(&kez_proto::keys::CountRequest {}),
        )
        .await
    }

    /// Claims one prekey of `device` (`kez.keys.claim`), of `domain`'s server when that is
    /// another than the home server's. The answer must be about `device` (else
    /// [`ClientError::BadAnswer`]); its prekey is the server's word: verify it with the device
    /// key and the Olm identity key the device's verified chain binds.
    pub async fn keys_claim(
        &self,
        device: &PublicKey,
        domain: Option<&str>,
    ) -> Result<kez_proto::keys::ClaimAnswer, ClientError> {
        let domain = self.domain_member(Endpoint::KeysClaim, domain).await?;
        let answer: kez_proto::keys::ClaimAnswer = self
            .call_json(
                Endpoint::KeysClaim,
                request_body(&kez_proto::keys::ClaimRequest {
                    device: *device,
                    domain,
                }),
            )
            .await?;
        if answer.device != *device {
            return Err(ClientError::BadAnswer {
                subject: Endpoint::KeysClaim.subject().into(),
                reason: format!("asked for {device}, answered for {}", answer.device),
            });
        }
        Ok(answer)
    }

    async fn pin_call<T: DeserializeOwned>(
        &self,
        op: PinOp,
        request: &PinRequest,
    ) -> Result<T, ClientError> {
        self.call_json(op.endpoint(), request_body(request)).await
    }

    /// Looks `handle` up (`kez.registry.lookup`). The answer must be about `handle` (else
    /// [`ClientError::BadAnswer`]); its key is the server's word: verify the key's chain with
    /// [`Connection::chain`] and pin it in the [`Store`].
    ///
    /// A handle of the home server's own domain is read from its directory with one direct
    /// get when it keeps one (PROTOCOL.md §5.7); the service answers the rest, and whatever
    /// the directory does not hold.
    pub async fn lookup(&self, handle: &Handle) -> Result<Profile, ClientError> {
        // Boxed, like the other directory reads: they sit in many callers' futures.
        let profile = match Box::pin(
            self.directory_entry(&Slot::handle(handle.name()), Some(handle.domain())),
        )
        .await
        {
            Some(profile) => profile,
            None => {
                let request = LookupRequest {
                    handle: handle.to_string(),
                };
                self.call_json(Endpoint::Lookup, request_body(&request))
                    .await?
            }
        };
        if profile.handle != *handle {
            return Err(ClientError::BadAnswer {
                subject: Endpoint::Lookup.subject().into(),
                reason: format!("asked for {handle}, answered for {}", profile.handle),
            });
        }
        Ok(profile)
    }

    /// The handle of a key (`kez.registry.whois`): the server's word for it. For a key that
    /// holds a handle the answer must be about `key`; for a device of an identity the server
    /// answers the identity's profile, and then the identity's chain is verified and must list
    /// `key` as an active device (else [`ClientError::BadAnswer`]).
    ///
    /// `domain` is the key's home domain when it is known to be another server's (the origin
    /// its messages came from, [`Store::origin`]): the home server asks that server, and the
    /// answer's handle must be on `domain`. `None`: the home server's own, whose domain the
    /// handle must be on.
    pub async fn whois(
        &self,
        key: &PublicKey,
        domain: Option<&str>,
    ) -> Result<Profile, ClientError> {
        Ok(self.whois_verified(key, domain).await?.0)
    }

    /// [`Connection::whois`], with the identity's verified chain when `key` is a device of it.
    async fn whois_verified(
        &self,
        key: &PublicKey,
        domain: Option<&str>,
    ) -> Result<(Profile, Option<VerifiedChain>), ClientError> {
        let member = self.domain_member(Endpoint::Whois, domain).await?;
        let asked = match &member {
            Some(remote) => remote.clone(),
            None => self.home_server().await?.domain.clone(),
        };
        // The directory holds identity keys only: a device's key is the service's to answer.
        let profile = match Box::pin(self.directory_entry(&Slot::key(key), Some(&asked))).await {
            Some(profile) if profile.key == *key => profile,
            _ => {
                self.call_json(
                    Endpoint::Whois,
                    request_body(&KeyRequest {
                        key: *key,
                        domain: member,
                    }),
                )
                .await?
            }
        };
        if profile.handle.domain() != asked {
            return Err(ClientError::BadAnswer {
                subject: Endpoint::Whois.subject().into(),
                reason: format!(
                    "asked who {key} is on {asked}, answered {}, a handle of another domain",
                    profile.handle
                ),
            });
        }
        if profile.key == *key {
            return Ok((profile, None));
        }
        let chain = self.chain_at(&profile.key, &asked).await?;
        if !chain.active_devices().any(|device| device.key == *key) {
            return Err(ClientError::BadAnswer {
                subject: Endpoint::Whois.subject().into(),
                reason: format!(
                    "asked for {key}, answered for {}, whose chain does not list it as a device",
                    profile.key
                ),
            });
        }
        Ok((profile, Some(chain)))
    }

    /// The directory entry of `slot` on the home server, one direct get (PROTOCOL.md §5.7),
    /// when `domain` is the home server's (`None`: it is) and it keeps a directory. `None` when it holds no
    /// entry (not registered, or registered before the directory and not yet written), or
    /// the read failed: the caller asks the service, which answers the same. After a failed
    /// read (a broker whose configuration lacks the directory's import answers "no
    /// responders") the connection asks the service from then on. The profile is the
    /// server's word, like the service's: the caller checks it against what it asked.
    async fn directory_entry(&self, slot: &Slot, domain: Option<&str>) -> Option<Profile> {
        use std::sync::atomic::Ordering;
        if !self.directory_works.load(Ordering::Relaxed) {
            return None;
        }
        let home = self.home_server().await.ok()?;
        if !home.directory || domain.is_some_and(|domain| domain != home.domain) {
            return None;
        }
        let subject = slot.direct_get_subject();
        let request = async_nats::Request::new()
            .payload(Bytes::from_static(DIRECT_GET_BODY))
            .timeout(Some(DIRECTORY_TIMEOUT));
        let failed = |reason: String| {
            tracing::warn!(
                subject,
                "the directory does not answer ({reason}); asking the service from now on"
            );
            self.directory_works.store(false, Ordering::Relaxed);
            None
        };
        match self.client.send_request(subject.clone(), request).await {
            Ok(answer) => match answer.status {
                None => match self.directory.open(slot, &answer.payload) {
                    Ok(profile) => Some(profile),
                    Err(err) => {
                        tracing::warn!(subject, error = %err, "a directory entry did not open; asking the service");
                        None
                    }
                },
                Some(async_nats::StatusCode::NOT_FOUND) => None,
                Some(status) => failed(format!("status {status}")),
            },
            Err(err) => failed(err.to_string()),
        }
    }

    /// Appends a signed link (its exact bytes) to its chain (`kez.sigchain.append`); answers
    /// the chain's new head.
    pub async fn append(&self, link: &[u8]) -> Result<ChainHead, ClientError> {
        self.call_json(Endpoint::Append, link.to_vec()).await
    }

    /// The head of `key`'s chain on the home server (`kez.sigchain.head`); `not_found` when it
    /// has none.
    /// Read from the directory when the home server keeps one (PROTOCOL.md §5.7).
    pub async fn head(&self, key: &PublicKey) -> Result<ChainHead, ClientError> {
        if let Some(profile) = Box::pin(self.directory_entry(&Slot::key(key), None)).await
            && profile.key == *key
            && let Some(head) = profile.sigchain
        {
            return Ok(head);
        }
        let answer: HeadAnswer = self
            .call_json(
                Endpoint::Head,
                request_body(&KeyRequest {
                    key: *key,
                    domain: None,
                }),
            )
            .await?;
        if answer.key != *key {
            return Err(ClientError::BadAnswer {
                subject: Endpoint::Head.subject().into(),
                reason: format!("asked for {key}, answered for {}", answer.key),
            });
        }
        Ok(ChainHead {
            seq: answer.seq,
            head: answer.head,
        })
    }

    /// `key`'s whole sigchain, every page fetched (`kez.sigchain.get`) and verified as it
    /// arrives ([`VerifiedChain::append`]: only the link hashes are kept, and a chain ends at
    /// `kez_core::sigchain::MAX_LINKS`); the chain must be `key`'s. `not_found` when it has
    /// none.
    pub async fn chain(&self, key: &PublicKey) -> Result<VerifiedChain, ClientError> {
        Ok(self.fetch_chain(key, None, false).await?.0)
    }

    /// [`Connection::chain`] of a key whose home is `domain` (a handle's domain): on the home
    /// server when that is its own domain, else through it from `domain`'s server (the home
    /// server must federate). Verified here the same way either way.
    pub async fn chain_at(
        &self,
        key: &PublicKey,
        domain: &str,
    ) -> Result<VerifiedChain, ClientError> {
        let member = self.domain_member(Endpoint::GetChain, Some(domain)).await?;
        Ok(self.fetch_chain(key, member, false).await?.0)
    }

    /// `key`'s sigchain as the server stores it, every link's exact text, verified as
    /// [`Connection::chain`] verifies it (a pairing offer carries them to the new device, which
    /// verifies them itself).
    pub async fn chain_links(&self, key: &PublicKey) -> Result<Vec<String>, ClientError> {
        Ok(self.fetch_chain(key, None, true).await?.1)
    }

    /// [`Connection::chain`] from the server of `domain` (`None`: the home server's), and the
    /// links' texts too if `keep_links`.
    async fn fetch_chain(
        &self,
        key: &PublicKey,
        domain: Option<String>,
        keep_links: bool,
    ) -> Result<(VerifiedChain, Vec<String>), ClientError> {
        let mut chain: Option<VerifiedChain> = None;
        let mut kept = Vec::new();
        let bad_answer = |reason: String| ClientError::BadAnswer {
            subject: Endpoint::GetChain.subject().into(),
            reason,
        };
        for _ in 0..MAX_CHAIN_PAGES {
            let from_seq = chain.as_ref().map_or(1, |chain| chain.seq() + 1);
            let request = GetChainRequest {
                key: *key,
                from_seq,
                domain: domain.clone(),
            };
            let page: ChainPage = self
                .call_json(Endpoint::GetChain, request_body(&request))
                .await?;
            if page.key != *key || page.from_seq != from_seq || (page.more && page.links.is_empty())
            {
                return Err(bad_answer(format!(
                    "asked for {key}'s chain from seq {from_seq}, got a page of {}'s from {} with {} links, more: {}",
                    page.key,
                    page.from_seq,
                    page.links.len(),
                    page.more
                )));
            }
            let verify = |source| ClientError::Chain { key: *key, source };
            for link in page.links {
                match &mut chain {
                    None => {
                        let first = VerifiedChain::start(link.as_bytes()).map_err(verify)?;
                        if first.chain_id() != *key {
                            return Err(bad_answer(format!(
                                "asked for {key}'s chain, got {}'s",
                                first.chain_id()
                            )));
                        }
                        chain = Some(first);
                    }
                    Some(chain) => chain.append(link.as_bytes()).map_err(verify)?,
                }
                if keep_links {
                    kept.push(link);
                }
            }
            if !page.more {
                let chain = chain.ok_or_else(|| {
                    verify(ChainError {
                        position: 0,
                        kind: kez_core::ChainErrorKind::Empty,
                    })
                })?;
                return Ok((chain, kept));
            }
        }
        Err(bad_answer(format!("more than {MAX_CHAIN_PAGES} pages")))
    }

    /// Looks `handle` up, fetches and verifies its sigchain, and pins it in `store` under
    /// `handle` on first use or checks it against the identity pinned for `handle`, following
    /// the chain's own rotations ([`Store::pin`]). The answer is what to trust for `handle`
    /// now; a changed identity, an older or a forked chain is an error and changes nothing.
    ///
    /// Moves (PROTOCOL.md §14.6): a handle a contact lived under before it moved
    /// ([`Contact::moved_from`]) means that contact where it lives now. When the verified
    /// chain's `home` endpoint names another handle, the move is followed
    /// ([`Connection::follow_move`]) and reported in [`VerifiedContact::moved`]; a move that
    /// cannot be followed now keeps the contact where it is, with the reason.
    pub async fn verify_contact(
        &self,
        store: &Store,
        handle: &Handle,
    ) -> Result<VerifiedContact, ClientError> {
        let handle = pinned_handle(store, handle)?;
        let profile = self.lookup(&handle).await?;
        Box::pin(self.verify_profile(store, handle, &profile)).await
    }

    /// [`Connection::verify_contact`] only when the contact's chain moved: a pinned contact
    /// whose head the lookup answers unchanged (the same identity, seq and head, verified
    /// with its devices) is current as pinned, without fetching or verifying its chain again.
    /// What sending needs before each message: one lookup, a directory read on the home
    /// server's own domain.
    pub async fn check_contact(
        &self,
        store: &Store,
        handle: &Handle,
    ) -> Result<CheckedContact, ClientError> {
        let handle = pinned_handle(store, handle)?;
        let profile = self.lookup(&handle).await?;
        if let Some(pinned) = store.contact(&handle.to_string())?
            && pinned.key == profile.key
            && !pinned.devices.is_empty()
            && profile
                .sigchain
                .is_some_and(|head| head.seq == pinned.chain_seq && head.head == pinned.chain_head)
        {
            return Ok(CheckedContact::Unchanged(pinned));
        }
        let verified = Box::pin(self.verify_profile(store, handle, &profile)).await?;
        Ok(CheckedContact::Verified(Box::new(verified)))
    }

    /// The rest of [`Connection::verify_contact`] once `handle` was looked up (`profile`).
    async fn verify_profile(
        &self,
        store: &Store,
        mut handle: Handle,
        profile: &Profile,
    ) -> Result<VerifiedContact, ClientError> {
        let chain = self.chain_at(&profile.key, handle.domain()).await?;
        let name = handle.to_string();
        let before = store.contact(&name)?.map(|contact| contact.devices);
        let (contact, change) = store.pin(&name, &chain, now())?;
        let mut verified = VerifiedContact {
            devices_changed: device_changes(&before.unwrap_or_default(), &contact.devices),
            contact,
            change,
            chain,
            moved: None,
        };
        for _ in 0..MAX_MOVES_FOLLOWED {
            let Some(to) = moving::moved_to(&verified.chain, &handle) else {
                break;
            };
            match self.follow_move(store, &verified.contact, &to).await {
                Ok((contact, chain)) => {
                    verified
                        .devices_changed
                        .extend(device_changes(&verified.contact.devices, &contact.devices));
                    verified.contact = contact;
                    verified.chain = chain;
                    let from = verified.moved.take().map_or(handle, |moved| moved.from);
                    verified.moved = Some(Moved {
                        from,
                        to: to.clone(),
                        not_followed: None,
                    });
                    handle = to;
                }
                Err(err) => {
                    tracing::warn!("{handle} moved to {to}, not followed: {err}");
                    verified.moved = Some(Moved {
                        from: handle,
                        to,
                        not_followed: Some(err.to_string()),
                    });
                    break;
                }
            }
        }
        Ok(verified)
    }

    /// Follows the move of `contact` (pinned under its handle) to `to`, the handle its verified
    /// chain names as home: `to` must name the same identity, whose chain as `to`'s server
    /// serves it verifies and extends the pin; then the contact is pinned under `to`
    /// ([`Store::rename_contact`]) and answered with that chain. On error nothing changes.
    pub async fn follow_move(
        &self,
        store: &Store,
        contact: &Contact,
        to: &Handle,
    ) -> Result<(Contact, VerifiedChain), ClientError> {
        let profile = self.lookup(to).await?;
        if profile.key != contact.key {
            return Err(ClientError::MovedToAnother {
                from: contact.handle.parse()?,
                to: to.clone(),
                pinned: contact.key,
                offered: profile.key,
            });
        }
        let chain = self.chain_at(&profile.key, to.domain()).await?;
        let (contact, _) = store.rename_contact(&contact.handle, &to.to_string(), &chain)?;
        Ok((contact, chain))
    }

    /// Replaces the identity pinned for `handle` with the one the server names now, which
    /// must be `accepted` (the key the user checked with the contact another way), after
    /// verifying its sigchain. Any other key is [`ClientError::NotAccepted`].
    pub async fn accept_key_change(
        &self,
        store: &Store,
        handle: &Handle,
        accepted: &PublicKey,
    ) -> Result<VerifiedContact, ClientError> {
        let profile = self.lookup(handle).await?;
        if profile.key != *accepted {
            return Err(ClientError::NotAccepted {
                handle: handle.to_string(),
                accepted: *accepted,
                offered: profile.key,
            });
        }
        let chain = self.chain_at(&profile.key, handle.domain()).await?;
        let contact = store.repin(&handle.to_string(), &chain, now())?;
        Ok(VerifiedContact {
            contact,
            change: PinChange::New,
            devices_changed: Vec::new(),
            chain,
            moved: None,
        })
    }

    /// Seals `body` for each of `to`'s active devices and, as a copy, for each other active
    /// device of the own identity as last learned ([`Connection::own_devices`]), and hands them
    /// to the home server for their inboxes (`kez.mail.send`, PROTOCOL.md §6.3, §8.5; for a
    /// contact whose handle is on another domain, its envelopes go to the home server's outbox
    /// with `kez.mail.relay`, and the copies to the own devices stay `kez.mail.send`); returns
    /// once the server stored them. A `duplicate` answer is [`ClientError::Duplicate`]. Record
    /// the result with [`Store::record_outgoing`]. Check the contact first
    /// ([`Connection::verify_contact`]): its devices come from its verified chain.
    pub async fn send(
        &self,
        to: &Contact,
        content_type: &str,
        body: &[u8],
    ) -> Result<Sent, ClientError> {
        self.publish(to, content_type, body).await?.acked().await
    }

    /// [`Connection::send`] without waiting for the answers: seals, sends the requests, and
    /// returns the [`Pending`] answers. Sending many messages before awaiting their answers
    /// (pipelining) costs one round trip for all of them instead of one each; a message counts
    /// as sent only once [`Pending::acked`] answers.
    pub async fn publish(
        &self,
        to: &Contact,
        content_type: &str,
        body: &[u8],
    ) -> Result<Pending, ClientError> {
        let remote = self
            .domain_member(Endpoint::MailRelay, Some(handle_domain(&to.handle)))
            .await?;
        let time = now();
        let me = self.key.public_key();
        let copies: Vec<PublicKey> = self
            .own_devices
            .lock()
            .expect("own devices lock")
            .iter()
            .copied()
            .filter(|device| *device != me)
            .collect();
        let max = if copies.is_empty() {
            envelope::max_body_len(content_type, time)
        } else {
            SentCopy::max_body_len(content_type, time)
        }
        .unwrap_or(0);
        if body.len() > max {
            return Err(ClientError::TooLarge {
                size: body.len(),
                max,
            });
        }
        let id = MessageId::random();
        let copy = SentCopy {
            to: to.key,
            content_type: content_type.to_owned(),
            body: body.to_vec(),
        }
        .encode();
        let peers = self
            .seal_for(
                &Connection::recipients_of(to, remote.as_deref()),
                content_type,
                body,
                time,
                id,
                false,
            )
            .await?;
        let copies = self
            .seal_for(
                &self.own_recipients(&copies),
                SENT_COPY_CONTENT_TYPE,
                &copy,
                time,
                id,
                false,
            )
            .await?;
        // The sessions are on disk before anything leaves (one sync shared with concurrent
        // sends), and envelopes leave in the order they were sealed: a receiving session keeps
        // only so many skipped message keys.
        peers.durable.wait().await?;
        copies.durable.wait().await?;
        let sealed = (peers.envelopes.into_iter())
            .map(|(device, sealed)| (device, true, sealed))
            .chain(
                copies
                    .envelopes
                    .into_iter()
                    .map(|(device, sealed)| (device, false, sealed)),
            );
        let answers = sealed
            .map(|(device, for_peer, sealed)| {
                let remote = remote.as_deref().filter(|_| for_peer);
                let answer = match sealed {
                    Ok(sealed) => {
                        let (endpoint, request) = mail_request(remote, &device, &id, &sealed);
                        let connection = self.clone();
                        tokio::spawn(async move {
                            connection.call_repeating(endpoint, request, None).await
                        })
                    }
                    Err(reason) => {
                        tokio::spawn(async move { Err(ClientError::Session { device, reason }) })
                    }
                };
                (device, for_peer, answer)
            })
            .collect();
        Ok(Pending {
            answers,
            relayed: remote.is_some(),
            sent: Sent {
                id,
                from: me,
                to: to.key,
                time,
                content_type: content_type.to_owned(),
                body: body.to_vec(),
                stream_sequence: 0,
                missed: Vec::new(),
            },
        })
    }

    /// The own identity's verified sigchain as a [`Contact`]: its devices. Asks the server for
    /// the chain's head and fetches the chain only when it moved since `store` pinned it
    /// ([`Store::pin_own`]: it must extend what was verified before). Sends from now on are
    /// copied to the other active devices it lists.
    pub async fn own_devices(&self, store: &Store, handle: &str) -> Result<Contact, ClientError> {
        let head = self.head(&self.identity).await?;
        let own = match store.own()? {
            Some(own) if own.chain_seq == head.seq && own.chain_head == head.head => own,
            _ => {
                let chain = self.chain(&self.identity).await?;
                store.pin_own(handle, &chain, now())?.0
            }
        };
        *self.own_devices.lock().expect("own devices lock") = own.recipient_keys();
        Ok(own)
    }

    /// Fetches up to `max` new messages from the own inbox (`kez.mail.fetch`), waiting up to
    /// `wait` for one to arrive (`Duration::ZERO`: only what is there now), and returns them,
    /// opened and verified, in the order the inbox holds them.
    ///
    /// Each fetched batch is stored in `store` (history, seen ids and the inbox floor) in one
    /// transaction before the next fetch names the floor, which is what acknowledges the batch
    /// and lets the server delete it: a crash in between means a redelivery, which is then
    /// dropped as already seen. Envelopes that do not open (not for us, forged, garbage) are
    /// logged and passed over with the floor: they would never open on a retry either.
    ///
    /// While waiting, a new-mail notification makes it fetch again (and go on waiting if that
    /// brought nothing new); so does a reconnect (notifications sent while the connection was
    /// down are lost), after which it returns what that fetch brought, perhaps nothing. A fetch
    /// that fails after some messages were stored returns those; one that fails before is an
    /// error.
    pub async fn receive(
        &self,
        store: &Store,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Message>, ClientError> {
        let mut new_mail = self.new_mail.lock().await;
        if new_mail.is_none() {
            let subscriber = self
                .client
                .subscribe(new_mail_subject(&self.identity, &self.key.public_key()))
                .await
                .map_err(|err| ClientError::Nats {
                    action: "subscribe to the own new-mail notifications",
                    source: err.into(),
                })?;
            *new_mail = Some(subscriber);
        }
        let notifications = new_mail.as_mut().expect("subscribed above");
        let deadline = tokio::time::Instant::now() + wait;
        let connects = || {
            self.client
                .statistics()
                .connects
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let mut reconnected = false;
        // The highest sequence a notification named: a fetch should reach it.
        let mut notified = 0;
        loop {
            // What is queued is covered by the fetch that follows.
            while let Some(Some(notification)) = notifications.next().now_or_never() {
                notified = notified.max(notified_sequence(&notification));
            }
            let connected_at = connects();
            let (received, bounced) = self.fetch_caught_up(store, max, notified).await?;
            // After a reconnect the caller hears that receiving works again, messages or not;
            // after a bounce, that there is an undelivered note to show.
            if !received.is_empty()
                || bounced
                || reconnected
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(received);
            }
            loop {
                let check = (tokio::time::Instant::now() + RECONNECT_CHECK).min(deadline);
                tokio::select! {
                    notification = notifications.next() => match notification {
                        Some(notification) => {
                            notified = notified.max(notified_sequence(&notification));
                            break;
                        }
                        None => return Ok(received),
                    },
                    () = tokio::time::sleep_until(check) => {
                        if connects() != connected_at {
                            reconnected = true;
                            break;
                        }
                        if check >= deadline {
                            return Ok(received);
                        }
                    }
                }
            }
        }
    }

    /// [`Connection::fetch`], asked again after a pause (doubling, [`CATCH_UP_PAUSES`] times)
    /// while it brings nothing and the floor is short of `notified`: in a cluster the replica
    /// that answers the server's read may not hold a message yet that the notification already
    /// announced.
    async fn fetch_caught_up(
        &self,
        store: &Store,
        max: usize,
        notified: u64,
    ) -> Result<(Vec<Message>, bool), ClientError> {
        let mut pause = CATCH_UP_PAUSE;
        for _ in 0..CATCH_UP_PAUSES {
            let (received, bounced) = self.fetch(store, max).await?;
            if !received.is_empty() || bounced || store.inbox_floor()?.seq >= notified {
                return Ok((received, bounced));
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        self.fetch(store, max).await
    }

    /// Fetches and stores up to `max` messages after the stored inbox floor, one
    /// `kez.mail.fetch` after another until one brings nothing new: each names the floor the
    /// one before stored, so what this returns is acknowledged too (unless `max` cut it short),
    /// and the server does not keep it. Also answers whether a bounce came (recorded on its
    /// message by [`Store::record_fetched`], not returned).
    async fn fetch(&self, store: &Store, max: usize) -> Result<(Vec<Message>, bool), ClientError> {
        let mut floor = store.inbox_floor()?;
        let mut received = Vec::new();
        let mut bounced = false;
        let mut started_over = false;
        let home = self.home_server().await?;
        // Origins only from a server that knows the member (an older one refuses it).
        let (ask_origins, home_key) = (home.federates(), home.federation);
        while received.len() < max {
            let want = u32::try_from(max - received.len())
                .unwrap_or(u32::MAX)
                .min(MAX_FETCH_MESSAGES);
            let request = FetchRequest {
                after: floor.seq,
                max: want,
                time: floor.time,
                origins: ask_origins,
            };
            let answer = match self.call(Endpoint::MailFetch, request_body(&request)).await {
                Ok(answer) => answer,
                // The server's inbox stream was restored or recreated: the floor means nothing
                // there. Start over; what was stored before is dropped by id.
                Err(ClientError::Service(err))
                    if !started_over
                        && matches!(err.answer.name.as_ref(), "inbox_reset" | "floor_ahead") =>
                {
                    tracing::warn!(
                        "the server's inbox does not know this home's place in it ({}); fetching it from the start",
                        err.answer.message
                    );
                    started_over = true;
                    floor = InboxFloor::default();
                    store.set_inbox_floor(floor)?;
                    continue;
                }
                Err(err) if !received.is_empty() || bounced => {
                    tracing::debug!("fetching from the own inbox stopped early: {err}");
                    break;
                }
                Err(err) => return Err(err),
            };
            let key = self.key.clone();
            let batch =
                tokio::task::spawn_blocking(move || open_fetched(&key, &request, floor, &answer))
                    .await
                    .map_err(|err| ClientError::BadAnswer {
                        subject: Endpoint::MailFetch.subject().to_owned(),
                        reason: format!("opening the fetched messages failed: {err}"),
                    })?
                    .map_err(|reason| ClientError::BadAnswer {
                        subject: Endpoint::MailFetch.subject().to_owned(),
                        reason,
                    })?;
            let Some(OpenedBatch {
                opened,
                origins,
                olm,
                next_floor,
            }) = batch
            else {
                break;
            };
            let SortedBatch {
                messages: opened,
                origins,
                bounces,
            } = take_bounces(opened, origins, home_key.as_ref());
            let senders: Vec<(PublicKey, Option<&str>, Option<&str>)> = opened
                .iter()
                .zip(&origins)
                .map(|((message, _), origin)| {
                    (
                        message.from,
                        Some(message.content_type.as_str()),
                        origin.as_deref(),
                    )
                })
                .chain(
                    olm.iter()
                        .map(|(outer, _, origin)| (outer.sender, None, origin.as_deref())),
                )
                .collect();
            self.learn_senders(store, &senders).await;
            let mut batch: Vec<(Received, u64, Option<String>)> = opened
                .into_iter()
                .zip(origins)
                .map(|((message, seq), origin)| (Received::Sealed(message), seq, origin))
                .chain(
                    olm.into_iter()
                        .map(|(outer, seq, origin)| (Received::Olm(outer), seq, origin)),
                )
                .collect();
            batch.sort_by_key(|(_, seq, _)| *seq);
            let recorded =
                store.record_fetched_olm(&self.key, batch, &bounces, next_floor, now())?;
            if recorded.duplicates > 0 {
                tracing::info!(count = recorded.duplicates, "dropped messages seen before");
            }
            bounced |= !bounces.is_empty();
            self.recover_sessions(store, recorded.undecryptable, recorded.used_prekeys)
                .await;
            for message in recorded.fresh {
                if message.content_type == RESEND_CONTENT_TYPE {
                    self.answer_resend(store, &message).await;
                } else {
                    received.push(message);
                }
            }
            floor = next_floor;
        }
        Ok((received, bounced))
    }

    /// Learns the devices that signed `opened` and are not known yet, before the batch is
    /// stored (which files each message under its sender): a contact's new device (its
    /// handle by `whois`, then the contact's chain verified again: the chain must list the
    /// key, never the server's word alone) or another own device (the own chain verified
    /// again, when it was pinned before: [`Connection::own_devices`]). At most
    /// [`MAX_SENDERS_LEARNED`] keys a batch; what fails is logged, and the message is then
    /// stored as a stranger's. A message that came from another server (its `origin`) is
    /// asked about at that server, through the home server.
    async fn learn_senders(
        &self,
        store: &Store,
        senders: &[(PublicKey, Option<&str>, Option<&str>)],
    ) {
        let mut asked = Vec::new();
        for &(from, content_type, origin) in senders {
            if asked.contains(&from) || asked.len() >= MAX_SENDERS_LEARNED {
                continue;
            }
            let own = store.own().ok().flatten();
            if own.as_ref().is_some_and(|own| own.signs_with(&from)) {
                continue;
            }
            if let Some(contact) = store.contact_by_key(&from).ok().flatten() {
                asked.push(from);
                match self.follow_from_origin(store, &contact, origin).await {
                    Ok(Some(moved)) => self.moves.lock().expect("moves lock").push(moved),
                    Ok(None) => {}
                    Err(err) => tracing::info!(
                        "{} sent from another server than its handle's; not followed: {err}",
                        contact.handle
                    ),
                }
                continue;
            }
            asked.push(from);
            let learned = if content_type == Some(SENT_COPY_CONTENT_TYPE) {
                match own {
                    Some(own) => self.own_devices(store, &own.handle).await.map(drop),
                    None => Ok(()),
                }
            } else {
                self.learn_contact_device(store, &from, origin).await
            };
            if let Err(err) = learned {
                tracing::info!(key = %from, "could not tell whose device signed a message: {err}");
            }
        }
    }

    /// The moves of contacts followed while receiving since the last call (notes for people),
    /// oldest first.
    pub fn take_moves(&self) -> Vec<Moved> {
        std::mem::take(&mut *self.moves.lock().expect("moves lock"))
    }

    /// Follows the move of `contact`, whose message came from `origin` (`None`: from the
    /// home server's own users), when that is another domain than its handle's (its old
    /// server may be gone): `whois` at `origin` must name the same identity under a handle
    /// that its chain there names as home, and that chain must extend the pin; then the
    /// contact is pinned under that handle ([`Store::rename_contact`]). `None` when the
    /// message came from the handle's own domain, or `origin` does not say the identity moved
    /// there.
    async fn follow_from_origin(
        &self,
        store: &Store,
        contact: &Contact,
        origin: Option<&str>,
    ) -> Result<Option<Moved>, ClientError> {
        let from: Handle = contact.handle.parse()?;
        let origin = match origin {
            Some(origin) => origin.to_owned(),
            None => self.home_server().await?.domain.clone(),
        };
        if origin == from.domain() {
            return Ok(None);
        }
        let profile = self.whois(&contact.key, Some(&origin)).await?;
        if profile.key != contact.key {
            return Ok(None);
        }
        let chain = self.chain_at(&contact.key, &origin).await?;
        if moving::home_of(&chain).as_ref() != Some(&profile.handle) {
            return Ok(None);
        }
        store.rename_contact(&contact.handle, &profile.handle.to_string(), &chain)?;
        Ok(Some(Moved {
            from,
            to: profile.handle,
            not_followed: None,
        }))
    }

    /// Verifies again the chain of the contact whose device the server says `device` is
    /// (`kez.registry.whois` answers an active device with its identity's profile, and
    /// [`Connection::whois`] checks the identity's chain lists it): if the handle is a contact
    /// pinned to that identity, that chain is pinned ([`Store::pin`]: it must extend the pin).
    /// `origin`: the domain of the server the message came from, which is asked.
    async fn learn_contact_device(
        &self,
        store: &Store,
        device: &PublicKey,
        origin: Option<&str>,
    ) -> Result<(), ClientError> {
        let (profile, Some(chain)) = self.whois_verified(device, origin).await? else {
            return Ok(());
        };
        let handle = profile.handle.to_string();
        // A forward-secret message says who sent it only inside: a new own device is found
        // by its identity here.
        if profile.key == self.identity {
            if let Some(own) = store.own()? {
                self.own_devices(store, &own.handle).await?;
            }
            return Ok(());
        }
        match store.contact(&handle)? {
            Some(contact) if contact.key == profile.key => {
                store.pin(&handle, &chain, now())?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes one slot of a pairing request through the relay (`kez.pair.put`, PROTOCOL.md
    /// §5.6).
    pub async fn pair_put(&self, request: &kez_proto::pair::PutRequest) -> Result<(), ClientError> {
        self.call(Endpoint::PairPut, request_body(request))
            .await
            .map(drop)
    }

    /// Reads one slot of a pairing request (`kez.pair.get`): `None` while it is empty.
    pub async fn pair_get(
        &self,
        request: &kez_proto::pair::GetRequest,
    ) -> Result<Option<String>, ClientError> {
        match self
            .call_json::<kez_proto::pair::GetAnswer>(Endpoint::PairGet, request_body(request))
            .await
        {
            Ok(answer) => Ok(Some(answer.data)),
            Err(ClientError::Service(err)) if err.answer.code == 404 => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Flushes what is buffered and closes the connection.
    pub async fn close(self) -> Result<(), ClientError> {
        self.client.drain().await.map_err(|err| ClientError::Nats {
            action: "close the connection",
            source: err.into(),
        })
    }
}

/// Most unknown signers of one fetched batch [`Connection::learn_senders`] asks about.
const MAX_SENDERS_LEARNED: usize = 8;

/// A fetched batch, opened: the messages that opened, each with its stream sequence, and the
/// floor that storing the batch moves to (past the envelopes that did not open, too: they
/// would never open on a retry either).
struct OpenedBatch {
    opened: Vec<(Message, u64)>,
    /// The domain each of `opened` came from, when another server handed it over (always
    /// `None` without `origins` in the request).
    origins: Vec<Option<String>>,
    /// The version 2 envelopes, their outer layer opened, with sequence and origin: their
    /// Olm messages are decrypted where they are stored.
    olm: Vec<(OlmEnvelope, u64, Option<String>)>,
    next_floor: InboxFloor,
}

/// A batch as [`Connection::fetch`] stores it ([`take_bounces`]).
#[derive(Debug)]
struct SortedBatch {
    /// The messages, as opened.
    messages: Vec<(Message, u64)>,
    /// The origin of each of `messages`.
    origins: Vec<Option<String>>,
    /// The bounces the home server sent, apart from the messages.
    bounces: Vec<ReceivedBounce>,
}

/// Takes the bounces the home server (its key `home_key`) sent out of an opened batch; a
/// bounce that does not parse is logged and dropped, with the floor.
fn take_bounces(
    opened: Vec<(Message, u64)>,
    origins: Vec<Option<String>>,
    home_key: Option<&PublicKey>,
) -> SortedBatch {
    let mut sorted = SortedBatch {
        messages: Vec::with_capacity(opened.len()),
        origins: Vec::with_capacity(opened.len()),
        bounces: Vec::new(),
    };
    for ((message, seq), origin) in opened.into_iter().zip(origins) {
        match bounce_of(&message, home_key) {
            None => {
                sorted.messages.push((message, seq));
                sorted.origins.push(origin);
            }
            Some(Ok(bounce)) => sorted.bounces.push(ReceivedBounce {
                envelope: message.id,
                time: message.time,
                bounce,
            }),
            Some(Err(reason)) => tracing::warn!(id = %message.id, seq, "{reason}; dropped"),
        }
    }
    sorted
}

/// Fewest envelopes worth another thread: opening one takes ~0.1 ms, starting a thread a
/// fraction of that.
const OPEN_PER_THREAD: usize = 16;

/// Decodes and checks a `kez.mail.fetch` answer to `request` (made with `floor`) and opens its
/// envelopes, on as many threads as the machine has cores for a large batch; `None` when it
/// brought nothing. The caller runs it off the async workers: a peer chooses what is opened.
fn open_fetched(
    key: &SecretKey,
    request: &FetchRequest,
    floor: InboxFloor,
    answer: &[u8],
) -> Result<Option<OpenedBatch>, String> {
    let fetched = FetchAnswer::decode(answer, request.origins)
        .map_err(|err| err.to_string())
        .and_then(|fetched| check_fetch(request, fetched))?;
    let Some(last) = fetched.messages.last() else {
        return Ok(None);
    };
    // The latest time of anything stored, not the last message's: a cluster's nodes may
    // disagree on the time, and an earlier message with a later time must not look like one
    // stored after the floor (PROTOCOL.md §6.3).
    let next_floor = InboxFloor {
        seq: last.seq,
        time: fetched
            .messages
            .iter()
            .map(|message| message.time)
            .fold(floor.time, u64::max),
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(fetched.messages.len().div_ceil(OPEN_PER_THREAD))
        .max(1);
    let chunk = fetched.messages.len().div_ceil(threads);
    let open_chunk = |messages: &[Fetched<'_>]| -> Vec<(Opened, u64, Option<String>)> {
        messages
            .iter()
            .filter_map(
                |message| match envelope::open_outer(key, message.envelope) {
                    Ok(opened) => Some((opened, message.seq, message.origin.map(str::to_owned))),
                    Err(err) => {
                        tracing::warn!(
                            code = err.code(),
                            size = message.envelope.len(),
                            seq = message.seq,
                            "dropping a message that does not open: {err}"
                        );
                        None
                    }
                },
            )
            .collect()
    };
    let opened = std::thread::scope(|scope| {
        let mut chunks = fetched.messages.chunks(chunk);
        let first = chunks.next().unwrap_or_default();
        let others: Vec<_> = chunks
            .map(|messages| scope.spawn(|| open_chunk(messages)))
            .collect();
        let mut opened = open_chunk(first);
        for other in others {
            opened.extend(other.join().expect("opening an envelope does not panic"));
        }
        opened
    });
    let mut batch = OpenedBatch {
        opened: Vec::new(),
        origins: Vec::new(),
        olm: Vec::new(),
        next_floor,
    };
    for (opened, seq, origin) in opened {
        match opened {
            Opened::Sealed(message) => {
                batch.opened.push((message, seq));
                batch.origins.push(origin);
            }
            Opened::Olm(outer) => batch.olm.push((outer, seq, origin)),
        }
    }
    Ok(Some(batch))
}

/// The stream sequence a new-mail notification names (`Nats-Sequence`), 0 if none.
fn notified_sequence(notification: &async_nats::Message) -> u64 {
    notification
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Nats-Sequence"))
        .and_then(|value| value.as_str().parse().ok())
        .unwrap_or(0)
}

/// A fetch answer checked against its request: a server answers only messages after the floor
/// it was given, no more than asked for, each with a time a later request can name.
fn check_fetch<'a>(
    request: &FetchRequest,
    fetched: FetchAnswer<'a>,
) -> Result<FetchAnswer<'a>, String> {
    if let Some(bad) = fetched
        .messages
        .iter()
        .find(|message| message.time == 0 || message.time > MAX_FETCH_AFTER)
    {
        return Err(format!(
            "message {} has time {}, not one a request can name",
            bad.seq, bad.time
        ));
    }
    if fetched.messages.len() > request.max as usize {
        return Err(format!(
            "asked for at most {} messages, got {}",
            request.max,
            fetched.messages.len()
        ));
    }
    if let Some(first) = fetched.messages.first()
        && first.seq <= request.after
    {
        return Err(format!(
            "asked for messages after sequence {}, got sequence {}",
            request.after, first.seq
        ));
    }
    Ok(fetched)
}

/// The JSON body of a request: its types are plain data with string keys, which always encode.
fn request_body(request: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(request).expect("a request encodes")
}

/// An answer of `endpoint` that could not be read.
fn bad_answer(endpoint: Endpoint, err: &serde_json::Error) -> ClientError {
    ClientError::BadAnswer {
        subject: endpoint.subject().into(),
        reason: err.to_string(),
    }
}

impl Connection {
    /// The connection's secret key, for the crate's other modules that seal and open as it
    /// ([`crate::live`]).
    pub(crate) fn secret_key(&self) -> &Arc<SecretKey> {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Errors as async-nats 0.51's connector makes them: a refusal and a connection the broker
    /// closed after CONNECT are asked again; a broker that cannot be reached is not.
    #[test]
    fn a_connect_closed_while_waiting_is_asked_again_an_unreachable_broker_is_not() {
        use async_nats::{ConnectError, ConnectErrorKind};
        assert!(not_decided_yet(&ConnectError::new(
            ConnectErrorKind::AuthorizationViolation
        )));
        assert!(not_decided_yet(&ConnectError::with_source(
            ConnectErrorKind::Io,
            "broken pipe"
        )));
        assert!(!not_decided_yet(&ConnectError::with_source(
            ConnectErrorKind::Io,
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
        )));
        assert!(!not_decided_yet(&ConnectError::new(ConnectErrorKind::Io)));
        assert!(!not_decided_yet(&ConnectError::new(
            ConnectErrorKind::TimedOut
        )));
    }

    /// A batch larger than one thread's share opens on several threads and still comes back
    /// complete and in the inbox's order, past an envelope that does not open; the floor is
    /// the last sequence and the latest time seen.
    #[test]
    fn a_fetched_batch_opens_in_order_past_what_does_not_open() {
        let alice = SecretKey::from_seed(&[1; 32]);
        let bob = SecretKey::from_seed(&[2; 32]);
        let envelopes: Vec<(MessageId, Vec<u8>)> = (0..70u64)
            .map(|n| {
                envelope::seal(
                    &alice,
                    &bob.public_key(),
                    "text",
                    &n.to_be_bytes(),
                    1_000 + n,
                )
                .expect("seals")
            })
            .collect();
        let garbage = vec![7u8; 200];
        let mut fetched: Vec<Fetched<'_>> = envelopes
            .iter()
            .enumerate()
            .map(|(n, (_, envelope))| Fetched {
                seq: 10 + n as u64,
                // Times need not rise with sequences (a cluster's nodes disagree).
                time: if n == 3 { 9_000 } else { 5_000 + n as u64 },
                envelope,
                origin: None,
            })
            .collect();
        fetched.insert(
            20,
            Fetched {
                seq: 29,
                time: 5_100,
                envelope: &garbage,
                origin: None,
            },
        );
        for (n, message) in fetched.iter_mut().enumerate() {
            message.seq = 10 + n as u64;
        }
        let answer = FetchAnswer::encode(0, &fetched, false);
        let request = FetchRequest {
            after: 9,
            max: 256,
            time: 4_000,
            origins: false,
        };
        let floor = InboxFloor {
            seq: 9,
            time: 4_000,
        };
        let batch = open_fetched(&bob, &request, floor, &answer)
            .expect("a good answer")
            .expect("it brought messages");
        let ids: Vec<MessageId> = batch.opened.iter().map(|(message, _)| message.id).collect();
        let sent: Vec<MessageId> = envelopes.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, sent);
        let seqs: Vec<u64> = batch.opened.iter().map(|(_, seq)| *seq).collect();
        let expected: Vec<u64> = (10..=80).filter(|seq| *seq != 30).collect();
        assert_eq!(seqs, expected);
        assert_eq!(
            batch.next_floor,
            InboxFloor {
                seq: 80,
                time: 9_000
            }
        );

        let empty = FetchAnswer::encode(0, &[], false);
        assert!(
            open_fetched(&bob, &request, floor, &empty)
                .unwrap()
                .is_none()
        );
        let too_early = FetchRequest {
            after: 10,
            ..request
        };
        let refused = open_fetched(&bob, &too_early, floor, &answer).err();
        assert!(refused.is_some_and(|reason| reason.contains("after sequence 10")));
    }

    /// An entry is opened once per slot while its bytes stay the same; other bytes (a new
    /// entry) are opened again, and an entry of another slot never passes for this one.
    #[test]
    fn the_directory_cache_reopens_only_changed_entries() {
        let profile = |seq: u64| Profile {
            handle: "@alice@a.test".parse().unwrap(),
            key: SecretKey::generate().public_key(),
            registered_at: 1,
            sigchain: Some(ChainHead {
                seq,
                head: kez_core::sigchain::LinkHash::of(b"link"),
            }),
        };
        let (slot, other) = (Slot::handle("alice"), Slot::handle("bob"));
        let cache = DirectoryCache::default();
        let first = Bytes::from(slot.seal(&profile(1)));
        assert_eq!(cache.open(&slot, &first).unwrap().sigchain.unwrap().seq, 1);
        assert_eq!(cache.open(&slot, &first).unwrap().sigchain.unwrap().seq, 1);
        let second = Bytes::from(slot.seal(&profile(2)));
        assert_eq!(cache.open(&slot, &second).unwrap().sigchain.unwrap().seq, 2);
        assert_eq!(cache.open(&other, &second), Err(EntryError::Seal));
        let mut damaged = second.to_vec();
        damaged[30] ^= 1;
        assert_eq!(
            cache.open(&slot, &Bytes::from(damaged)),
            Err(EntryError::Seal)
        );
    }

    fn home(federation: Option<PublicKey>) -> HomeServer {
        HomeServer {
            domain: "a.test".into(),
            federation,
            directory: true,
        }
    }

    /// A handle of the home domain is asked without a `domain` member (as before federation);
    /// another domain's names it, and only through a server that federates.
    #[test]
    fn requests_name_a_domain_only_for_another_domain_through_a_federating_server() {
        let server_key = SecretKey::from_seed(&[9; 32]).public_key();
        let federating = home(Some(server_key));
        assert_eq!(federating.domain_member("a.test"), Ok(None));
        assert_eq!(
            federating.domain_member("b.test"),
            Ok(Some("b.test".to_owned()))
        );
        assert!(federating.federates());

        let alone = home(None);
        assert!(!alone.federates());
        assert_eq!(alone.domain_member("a.test"), Ok(None));
        let refused = alone.domain_member("b.test").unwrap_err();
        assert_eq!(
            (refused.code, refused.name.as_ref()),
            (404, "not_federated")
        );
        assert!(refused.message.contains("b.test"), "{}", refused.message);

        // Without a federating server, a fetch asks no origins: the member stays out.
        let request = FetchRequest {
            after: 0,
            max: 1,
            time: 0,
            origins: alone.federates(),
        };
        assert_eq!(request_body(&request), br#"{"after":0,"max":1,"time":0}"#);
        let request = KeyRequest {
            key: server_key,
            domain: alone.domain_member("a.test").unwrap(),
        };
        assert!(
            !String::from_utf8(request_body(&request))
                .unwrap()
                .contains("domain")
        );
    }

    /// Envelopes for a device of another domain go to the own server's outbox
    /// (`kez.mail.relay`, naming the domain); those of the home domain to `kez.mail.send`.
    #[test]
    fn mail_for_another_domain_is_relayed_and_the_rest_sent() {
        let device = SecretKey::from_seed(&[3; 32]).public_key();
        let id = MessageId::from_bytes([7; 16]);
        let frame = SendRequest::encode(&device, &id, b"sealed");
        assert_eq!(
            mail_request(None, &device, &id, b"sealed"),
            (Endpoint::MailSend, frame.clone())
        );
        let (endpoint, body) = mail_request(Some("b.test"), &device, &id, b"sealed");
        assert_eq!(endpoint, Endpoint::MailRelay);
        let relayed = RelayRequest::decode(&body).unwrap();
        assert_eq!(relayed.domain, "b.test");
        assert_eq!(
            (relayed.send.to, relayed.send.id, relayed.send.envelope),
            (device, id, &b"sealed"[..])
        );
        assert_eq!(handle_domain("@bob@b.test"), "b.test");
    }

    fn bounce_message(from: &SecretKey, content_type: &str, body: &[u8]) -> Message {
        let me = SecretKey::from_seed(&[1; 32]);
        let (_, sealed) = envelope::seal(from, &me.public_key(), content_type, body, 500).unwrap();
        envelope::open(&me, &sealed).unwrap()
    }

    /// Only the home server's federation key's `kez.bounce` is a bounce; the same from any
    /// other signer, or another type from that key, is a message like any other.
    #[test]
    fn a_bounce_is_believed_only_from_the_home_servers_key() {
        let server = SecretKey::from_seed(&[9; 32]);
        let stranger = SecretKey::from_seed(&[8; 32]);
        let bounce = Bounce {
            id: "07".repeat(16),
            to: SecretKey::from_seed(&[3; 32]).public_key(),
            domain: "b.test".into(),
            reason: "unknown_recipient".into(),
            message: "no such user".into(),
            queued_at: 7,
        };
        let json = serde_json::to_vec(&bounce).unwrap();
        let key = server.public_key();
        let from_server = bounce_message(&server, BOUNCE_CONTENT_TYPE, &json);
        assert_eq!(
            bounce_of(&from_server, Some(&key)),
            Some(Ok(bounce.clone()))
        );
        assert_eq!(
            bounce_of(&from_server, None),
            None,
            "no federation: no bounces"
        );
        let forged = bounce_message(&stranger, BOUNCE_CONTENT_TYPE, &json);
        assert_eq!(bounce_of(&forged, Some(&key)), None);
        let text = bounce_message(&server, "text", &json);
        assert_eq!(bounce_of(&text, Some(&key)), None);
        let garbage = bounce_message(&server, BOUNCE_CONTENT_TYPE, b"{}");
        assert!(matches!(bounce_of(&garbage, Some(&key)), Some(Err(_))));
        let no_id = Bounce {
            id: "x".into(),
            ..bounce.clone()
        };
        let no_id = bounce_message(
            &server,
            BOUNCE_CONTENT_TYPE,
            &serde_json::to_vec(&no_id).unwrap(),
        );
        assert!(matches!(bounce_of(&no_id, Some(&key)), Some(Err(_))));

        // A fetched batch: the bounce is taken apart, the forged one stays a message, and
        // the origins stay with their messages; the unreadable one is dropped.
        let SortedBatch {
            messages,
            origins,
            bounces,
        } = take_bounces(
            vec![
                (forged.clone(), 1),
                (from_server.clone(), 2),
                (garbage, 3),
                (text.clone(), 4),
            ],
            vec![Some("b.test".into()), None, None, Some("c.test".into())],
            Some(&key),
        );
        let ids: Vec<MessageId> = messages.iter().map(|(message, _)| message.id).collect();
        assert_eq!(ids, [forged.id, text.id]);
        assert_eq!(origins, [Some("b.test".into()), Some("c.test".into())]);
        assert_eq!(
            bounces,
            [ReceivedBounce {
                envelope: from_server.id,
                time: 500,
                bounce,
            }]
        );
    }

    /// A fetch with `origins` hands each message's origin on with it.
    #[test]
    fn fetched_origins_stay_with_their_messages() {
        let alice = SecretKey::from_seed(&[1; 32]);
        let bob = SecretKey::from_seed(&[2; 32]);
        let envelopes: Vec<Vec<u8>> = (0..2u8)
            .map(|n| {
                envelope::seal(&alice, &bob.public_key(), "text", &[n], 1_000)
                    .unwrap()
                    .1
            })
            .collect();
        let fetched = [
            Fetched {
                seq: 5,
                time: 10,
                envelope: &envelopes[0],
                origin: Some("a.test"),
            },
            Fetched {
                seq: 6,
                time: 11,
                envelope: &envelopes[1],
                origin: None,
            },
        ];
        let request = FetchRequest {
            after: 4,
            max: 10,
            time: 9,
            origins: true,
        };
        let answer = FetchAnswer::encode(0, &fetched, true);
        let floor = InboxFloor { seq: 4, time: 9 };
        let batch = open_fetched(&bob, &request, floor, &answer)
            .unwrap()
            .unwrap();
        assert_eq!(batch.origins, [Some("a.test".to_owned()), None]);
        assert_eq!(batch.opened.len(), 2);
    }

    #[test]
    fn plaintext_leaves_this_machine_only_when_allowed() {
        for local in [
            "nats://127.0.0.1:4222",
            "127.0.0.1:4222",
            "nats://localhost:4222",
            "nats://[::1]:4222",
            "ws://127.0.0.2:8080",
            "tls://kez.lat:4222",
            "wss://kez.lat",
        ] {
            assert_eq!(
                broker_urls(local, Plaintext::LoopbackOnly).unwrap(),
                [local],
                "{local}"
            );
        }
        for remote in [
            "nats://kez.lat:4222",
            "kez.lat:4222",
            "nats://192.0.2.1:4222",
            "ws://kez.lat",
            "nats://[2001:db8::1]:4222",
            "nats://localhost.evil.example:4222",
        ] {
            assert!(
                matches!(
                    broker_urls(remote, Plaintext::LoopbackOnly),
                    Err(UrlError::Plaintext { .. })
                ),
                "{remote}"
            );
            assert_eq!(broker_urls(remote, Plaintext::Allowed).unwrap(), [remote]);
        }
        // A cluster's URLs are each checked: one plain remote URL refuses the list.
        assert_eq!(
            broker_urls(
                "tls://a.kez.lat:4222, tls://b.kez.lat:4222",
                Plaintext::LoopbackOnly
            )
            .unwrap(),
            ["tls://a.kez.lat:4222", "tls://b.kez.lat:4222"]
        );
        assert!(matches!(
            broker_urls(
                "tls://a.kez.lat:4222,nats://b.kez.lat:4222",
                Plaintext::LoopbackOnly
            ),
            Err(UrlError::Plaintext { url }) if url == "nats://b.kez.lat:4222"
        ));
        for bad in ["", " , ", "http://kez.lat", "nats://"] {
            assert!(
                matches!(
                    broker_urls(bad, Plaintext::Allowed),
                    Err(UrlError::Bad { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
