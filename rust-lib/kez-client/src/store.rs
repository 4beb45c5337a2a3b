//! The local store: contacts with their pinned keys, message history and the ids of messages
//! already seen, in one redb database (`store.redb` in the home).
//!
//! Every change is one redb write transaction, committed durably before the call returns (the
//! one exception: `Store::seal_olm` commits sending sessions without a sync, and its caller
//! makes them durable, one sync for many, before the envelopes leave), so
//! a message is recorded as seen exactly when it is in the history, and the inbox floor (the
//! highest inbox sequence stored) moves with the messages below it: a crash cannot separate
//! them. That is what lets [`crate::Connection::receive`] acknowledge messages to the server
//! (by naming the floor in its next fetch) only after storing them: a crash in between means
//! a redelivery, which the seen ids drop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use kez_core::PublicKey;
use kez_core::chat::{self, ChangeKind, ChatContent, ChatError, ReceiptKind, Timer};
use kez_core::copy::{SENT_COPY_CONTENT_TYPE, SentCopy};
use kez_core::envelope::{Message, MessageId};
use kez_core::file::{BlobHash, ContentKey, FILE_OFFER_CONTENT_TYPE};
use kez_core::manifest::{FILE_KEY_CONTENT_TYPE, FileKey, ManifestEntry};
use kez_core::prekey::OlmKey;
use kez_core::sigchain::{Device, DeviceKind, LinkHash};
use kez_proto::federation::Bounce;
use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use kez_core::trust::{PinChange, PinRefusal, PinnedChain, VerifiedChain, check_pin};

/// handle → JSON [`Contact`].
const CONTACTS: TableDefinition<&str, &[u8]> = TableDefinition::new("contacts");
/// [`OWN_CHAIN`] → JSON [`Contact`] of the own identity: its devices, as last verified.
const OWN: TableDefinition<&str, &[u8]> = TableDefinition::new("own");
const OWN_CHAIN: &str = "chain";
/// (conversation: the peer's key hex, receive order) → JSON [`StoredMessage`].
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// message id → when it was first seen (seconds since the epoch).
const SEEN: TableDefinition<[u8; 16], u64> = TableDefinition::new("seen");
/// Counters: `next_order`, the next history position; `inbox_floor` and `inbox_floor_time`, the
/// [`InboxFloor`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Device key → the sender's time of the latest message from it this home stored: when a
/// contact's or another own device was last seen.
const LAST_SEEN: TableDefinition<[u8; 32], u64> = TableDefinition::new("last_seen");
/// Received messages not yet shown to the user: storage order → peer (key hex).
const UNSHOWN: TableDefinition<u64, &str> = TableDefinition::new("unshown");
/// File offers (received and sent), by message id → (peer key hex, storage order): where the
/// offer message is in `messages`.
const OFFERS: TableDefinition<[u8; 16], (&str, u64)> = TableDefinition::new("offers");
/// Downloaded offers: message id → JSON [`Downloaded`].
const DOWNLOADS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("downloads");
/// The own published files: name → JSON [`Published`].
const PUBLISHED: TableDefinition<&str, &[u8]> = TableDefinition::new("published");
/// The own manifest last committed: [`LAST_MANIFEST`] → JSON [`PublishedManifest`].
const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
/// (conversation, message id) → JSON `ChatState`: what edits, deletions, reactions and receipts
/// did to that message (PROTOCOL.md §8.6).
const CHAT_STATE: TableDefinition<(&str, [u8; 16]), &[u8]> = TableDefinition::new("chat_state");
/// Conversation → JSON list of its `kez.timer` settings.
const TIMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("timers");
/// Conversation → the storage order up to which (exclusive) its messages were read.
const READ_UPTO: TableDefinition<&str, u64> = TableDefinition::new("read_upto");
/// Identity (hex) → the latest `kez.profile` it sent (JSON [`StoredProfile`]).
const PROFILES: TableDefinition<&str, &[u8]> = TableDefinition::new("profiles");
/// Signer key → the domain of the server its latest message came from (a fetch's origin,
/// PROTOCOL.md §6.3): where to ask who a stranger of another domain is. Added with
/// federation; a store without it gets it at open.
const ORIGINS: TableDefinition<[u8; 32], &str> = TableDefinition::new("origins");
/// (conversation, message id) → JSON list of [`Undelivered`]: the devices an own sent message
/// did not reach, as the home server's bounces said. Added with federation.
const UNDELIVERED: TableDefinition<(&str, [u8; 16]), &[u8]> = TableDefinition::new("undelivered");
/// (conversation, message id, device) → the bounce's time: the [`UNDELIVERED`] entries not
/// shown to a listener yet ([`Store::unshown_undelivered`]).
const UNSHOWN_UNDELIVERED: TableDefinition<(&str, [u8; 16], [u8; 32]), u64> =
    TableDefinition::new("unshown_undelivered");
/// (owner identity key, blob hash) → the wrap of that owner's private manifest entries for the
/// blob, from a `kez.file-key` message of that contact (PROTOCOL.md §11.5).
const FILE_WRAPS: TableDefinition<([u8; 32], [u8; 32]), [u8; 32]> =
    TableDefinition::new("file_wraps");
const LAST_MANIFEST: &str = "last";
const NEXT_ORDER: &str = "next_order";
const INBOX_FLOOR: &str = "inbox_floor";
const INBOX_FLOOR_TIME: &str = "inbox_floor_time";

/// How far the own inbox is stored: every message up to sequence `seq`, the one at `seq` stored
/// by the server's stream at `time` (PROTOCOL.md §6.3). A home of an earlier release has none
/// yet: 0 and 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxFloor {
    /// The highest inbox sequence stored (0: none).
    pub seq: u64,
    /// When the stream stored that message, microseconds since the Unix epoch (0: none).
    pub time: u64,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, a full disk).
    #[error("local store: {0}")]
    Database(Box<redb::Error>),
    /// Another process holds the store (redb locks the file).
    #[error(
        "another kez-chat (for example `kez-chat listen`) is using {path}: wait for it to finish or stop it, then try again"
    )]
    InUse {
        /// The store file.
        path: std::path::PathBuf,
    },
    /// The store file is damaged or empty: nothing was read from it and nothing written to it.
    #[error(
        "{path} is damaged ({reason}); nothing was changed. Restore it from a backup, or move it aside (`mv {path} {path}.damaged`) to start again with no contacts and no history (your key and registration are not in it)"
    )]
    Damaged {
        /// The store file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Other users of this machine can read the store file.
    #[error(
        "{path} can be read by other users of this machine (mode {mode:03o}), and it holds your messages and the keys of files sent to you: run `chmod 600 {path}`"
    )]
    Exposed {
        /// The store file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A record could not be decoded: the file was written by something else or is damaged.
    #[error("local store record is unreadable ({0}); the store file may be damaged")]
    Corrupt(String),
    /// The chain offered for a pinned contact is not trusted ([`check_pin`]): another
    /// identity, an older copy or a fork. Nothing was changed.
    #[error("{}", refusal_message(handle, refusal))]
    Refused {
        /// The contact's handle.
        handle: String,
        /// Why.
        refusal: PinRefusal,
    },
    /// A chat change (an edit, deletion, reaction, reply or receipt, PROTOCOL.md §8.6) was not
    /// applied: its target is not stored in that conversation, or its sender may not make it.
    /// Nothing was stored.
    #[error("the change was not applied: {0}")]
    ChangeRefused(ChatError),
    /// No contact is pinned under that handle. Nothing was changed.
    #[error("{handle} is not in your contacts: add it with `kez-chat add {handle}`")]
    NotAContact {
        /// The handle asked for.
        handle: String,
    },
}

/// What a person is told about a refused chain.
fn refusal_message(handle: &str, refusal: &PinRefusal) -> String {
    match refusal {
        PinRefusal::KeyChanged { pinned, offered } => format!(
            "{handle} is pinned to key {pinned}, but the server now names key {offered}, whose sigchain does not prove a rotation from the pinned key: the key changed, which can mean the account was taken over or the server lies"
        ),
        PinRefusal::Rollback { pinned, served } => format!(
            "the server served {handle}'s sigchain at seq {served}, but seq {pinned} was verified before: an older chain could undo a key rotation, so it is not trusted (the server may be lying or restored from an old backup)"
        ),
        PinRefusal::Forked { seq } => format!(
            "the server served {handle}'s sigchain with a different link {seq} than verified before: a forked chain is not trusted (the server may be lying)"
        ),
    }
}

fn db<E: Into<redb::Error>>(err: E) -> StoreError {
    StoreError::Database(Box::new(err.into()))
}

fn corrupt(err: serde_json::Error) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

/// A received message as stored.
fn incoming(message: &Message, seq: u64, now: u64) -> StoredMessage {
    StoredMessage {
        id: message.id,
        from: message.from,
        to: message.to,
        time: message.time,
        seq,
        stored_at: now,
        content_type: message.content_type.clone(),
        body: message.body.clone(),
        direction: Direction::Incoming,
    }
}

/// `message`, fetched from the own inbox, as the own sent message it copies (PROTOCOL.md
/// §8.5): when it is a sent copy signed by another active device of `own` (the own identity as
/// last verified). `None` for anything else, which is an incoming message like any other.
fn own_copy(own: Option<&Contact>, message: &Message, seq: u64, now: u64) -> Option<StoredMessage> {
    let own = own?;
    if message.content_type != SENT_COPY_CONTENT_TYPE || !own.signs_with(&message.from) {
        return None;
    }
    let copy = match SentCopy::decode(&message.body) {
        Ok(copy) => copy,
        Err(err) => {
            tracing::warn!(id = %message.id, "a copy from another own device is not valid: {err}");
            return None;
        }
    };
    Some(StoredMessage {
        id: message.id,
        from: message.from,
        to: copy.to,
        time: message.time,
        seq,
        stored_at: now,
        content_type: copy.content_type,
        body: copy.body,
        direction: Direction::Outgoing,
    })
}

/// Writes `message` (seen id, history, offer index, and an unshown mark if `unshown`) in `tx`;
/// `false`, writing nothing, when its id was seen before.
fn record_in(
    tx: &redb::WriteTransaction,
    message: &StoredMessage,
    unshown: bool,
) -> Result<bool, StoreError> {
    Ok(record_at(tx, message, unshown)?.is_some())
}

/// [`record_in`] of an unshown message, answering where it went: its conversation and order.
fn record_placed(
    tx: &redb::WriteTransaction,
    message: &StoredMessage,
) -> Result<Option<(String, u64)>, StoreError> {
    record_at(tx, message, true)
}

fn record_at(
    tx: &redb::WriteTransaction,
    message: &StoredMessage,
    unshown: bool,
) -> Result<Option<(String, u64)>, StoreError> {
    let mut seen = tx.open_table(SEEN).map_err(db)?;
    if seen.get(message.id.as_bytes()).map_err(db)?.is_some() {
        return Ok(None);
    }
    seen.insert(message.id.as_bytes(), message.stored_at)
        .map_err(db)?;
    let mut meta = tx.open_table(META).map_err(db)?;
    let order = meta
        .get(NEXT_ORDER)
        .map_err(db)?
        .map_or(0, |guard| guard.value());
    meta.insert(NEXT_ORDER, order + 1).map_err(db)?;
    let peer = conversation(tx, message)?;
    let json = serde_json::to_vec(message).expect("a message serialises");
    let mut messages = tx.open_table(MESSAGES).map_err(db)?;
    messages
        .insert((peer.as_str(), order), json.as_slice())
        .map_err(db)?;
    if message.content_type == FILE_OFFER_CONTENT_TYPE {
        let mut offers = tx.open_table(OFFERS).map_err(db)?;
        offers
            .insert(message.id.as_bytes(), (peer.as_str(), order))
            .map_err(db)?;
    }
    if message.content_type == FILE_KEY_CONTENT_TYPE && message.direction == Direction::Incoming {
        record_file_key(tx, message)?;
    }
    if unshown {
        let mut unshown = tx.open_table(UNSHOWN).map_err(db)?;
        unshown.insert(order, peer.as_str()).map_err(db)?;
        let mut last_seen = tx.open_table(LAST_SEEN).map_err(db)?;
        let before = last_seen
            .get(message.from.as_bytes())
            .map_err(db)?
            .map_or(0, |time| time.value());
        last_seen
            .insert(message.from.as_bytes(), before.max(message.time))
            .map_err(db)?;
    }
    Ok(Some((peer, order)))
}

/// The conversation `message` belongs to (its key in [`MESSAGES`]): for a message to a
/// contact, the contact's identity; for one signed by a contact's current key, that contact's
/// identity (so a contact's messages stay in one conversation across a rotation). A message
/// signed by the identity key of a contact that has rotated away from it is not the contact's:
/// it goes to a conversation of its own (`retired.<key hex>`). Anything else: the sender's key.
/// Keeps the wrap a `kez.file-key` message carries, in the transaction that records the
/// message: under its sender's identity when a contact's active device signed it (the owner of
/// the entries it unwraps is the verified sender, never a member of the body). Anything else
/// (a stranger's, a malformed body) is recorded as a message and its wrap dropped.
fn record_file_key(tx: &redb::WriteTransaction, message: &StoredMessage) -> Result<(), StoreError> {
    let contacts = tx.open_table(CONTACTS).map_err(db)?;
    let mut owner = None;
    for entry in contacts.iter().map_err(db)? {
        let (_, value) = entry.map_err(db)?;
        let contact: Contact = serde_json::from_slice(value.value()).map_err(corrupt)?;
        if contact.signs_with(&message.from) {
            owner = Some(contact.key);
            break;
        }
    }
    let Some(owner) = owner else {
        tracing::warn!(id = %message.id, "a file key from someone not in the contacts: dropped");
        return Ok(());
    };
    let file_key = match FileKey::decode(&message.body) {
        Ok(file_key) => file_key,
        Err(err) => {
            tracing::warn!(id = %message.id, "a file key is not valid: {err}");
            return Ok(());
        }
    };
    let mut wraps = tx.open_table(FILE_WRAPS).map_err(db)?;
    wraps
        .insert(
            (*owner.as_bytes(), *file_key.blob.as_bytes()),
            *file_key.wrap.as_bytes(),
        )
        .map_err(db)?;
    Ok(())
}

/// The body of [`Store::record_fetched`] inside the caller's transaction (without the floor).
fn record_batch_in(
    tx: &redb::WriteTransaction,
    messages: &[(Message, u64)],
    origins: &[Option<String>],
    bounces: &[ReceivedBounce],
    now: u64,
) -> Result<Vec<bool>, StoreError> {
    let own = own_in(tx)?;
    let fresh = messages
        .iter()
        .map(|(message, seq)| {
            let stored = own_copy(own.as_ref(), message, *seq, now)
                .unwrap_or_else(|| incoming(message, *seq, now));
            record_in(tx, &stored, true)
        })
        .collect::<Result<Vec<bool>, StoreError>>()?;
    {
        let mut table = tx.open_table(ORIGINS).map_err(db)?;
        for ((message, _), origin) in messages.iter().zip(origins) {
            if let Some(origin) = origin {
                table
                    .insert(message.from.as_bytes(), origin.as_str())
                    .map_err(db)?;
            }
        }
    }
    for bounce in bounces {
        record_bounce(tx, bounce, now)?;
    }
    Ok(fresh)
}

fn write_floor(tx: &redb::WriteTransaction, floor: InboxFloor) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META).map_err(db)?;
    meta.insert(INBOX_FLOOR, floor.seq).map_err(db)?;
    meta.insert(INBOX_FLOOR_TIME, floor.time).map_err(db)?;
    Ok(())
}

fn conversation(
    tx: &redb::WriteTransaction,
    message: &StoredMessage,
) -> Result<String, StoreError> {
    if message.direction == Direction::Outgoing {
        return Ok(message.to.to_hex());
    }
    let contacts = tx.open_table(CONTACTS).map_err(db)?;
    let mut retired = false;
    for entry in contacts.iter().map_err(db)? {
        let (_, value) = entry.map_err(db)?;
        let contact: Contact = serde_json::from_slice(value.value()).map_err(corrupt)?;
        if contact.signs_with(&message.from) {
            return Ok(contact.key.to_hex());
        }
        retired |= contact.key == message.from;
    }
    Ok(match retired {
        true => format!("retired.{}", message.from.to_hex()),
        false => message.from.to_hex(),
    })
}

/// The peer of conversation `name` (a key in [`MESSAGES`]) and whether it is the conversation
/// kept apart for a key a contact retired.
fn conversation_peer(name: &str) -> Result<(PublicKey, bool), StoreError> {
    let (retired, hex) = match name.strip_prefix("retired.") {
        Some(hex) => (true, hex),
        None => (false, name),
    };
    let peer = format!("ed25519:{hex}")
        .parse()
        .map_err(|err| StoreError::Corrupt(format!("conversation {name:?} is not a key: {err}")))?;
    Ok((peer, retired))
}

/// What [`Store::search`] looks in: a text message's text, a file offer's file name, a reply's
/// text.
fn searchable_words(message: &StoredMessage) -> Option<String> {
    match message.content_type.as_str() {
        "text" => Some(String::from_utf8_lossy(&message.body).into_owned()),
        FILE_OFFER_CONTENT_TYPE => kez_core::file::FileOffer::from_json(&message.body)
            .ok()
            .map(|offer| offer.name),
        chat::REPLY_CONTENT_TYPE => chat::Reply::decode(&message.body)
            .ok()
            .map(|reply| reply.text),
        _ => None,
    }
}

/// The own identity as pinned, read in a write transaction.
fn own_in(tx: &redb::WriteTransaction) -> Result<Option<Contact>, StoreError> {
    let table = tx.open_table(OWN).map_err(db)?;
    read_contact(&table, OWN_CHAIN)
}

/// The contact stored under `entry` of `table`, if any.
fn read_contact(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    entry: &str,
) -> Result<Option<Contact>, StoreError> {
    match table.get(entry).map_err(db)? {
        Some(guard) => Ok(Some(
            serde_json::from_slice(guard.value()).map_err(corrupt)?,
        )),
        None => Ok(None),
    }
}

/// What `contact` pinned, to check a later chain against.
fn pinned_of(contact: &Contact) -> PinnedChain {
    PinnedChain {
        key: contact.key,
        current_key: contact.current_key,
        seq: contact.chain_seq,
        head: contact.chain_head,
    }
}

fn contact_for(handle: &str, chain: &VerifiedChain, now: u64) -> Contact {
    Contact {
        handle: handle.to_owned(),
        key: chain.chain_id(),
        current_key: chain.current_key(),
        chain_seq: chain.seq(),
        chain_head: chain.head(),
        added_at: now,
        devices: chain.devices().to_vec(),
        moved_from: Vec::new(),
        olm_keys: olm_keys_of(chain),
    }
}

/// The Olm identity key each active device of `chain` bound to itself (PROTOCOL.md §15.1).
fn olm_keys_of(chain: &VerifiedChain) -> BTreeMap<PublicKey, OlmKey> {
    let mut devices: Vec<PublicKey> = chain
        .devices()
        .iter()
        .filter(|device| device.is_active())
        .map(|device| device.key)
        .collect();
    devices.push(chain.current_key());
    devices
        .into_iter()
        .filter_map(|device| chain.olm_key(&device).map(|olm| (device, olm)))
        .collect()
}

/// A contact: a handle, the identity pinned for it on first use (trust on first use), and the
/// state of its sigchain when last verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The handle, e.g. `@bob@kez.lat`.
    pub handle: String,
    /// The pinned identity: the registry key, which is the sigchain id. It never changes for a
    /// contact unless the user accepts a key change ([`Store::repin`]).
    pub key: PublicKey,
    /// The key the sigchain names now (differs from `key` after a `rotate`): messages are sealed
    /// to it, and the contact's messages are signed by it.
    pub current_key: PublicKey,
    /// The sigchain's seq when last verified: a later chain must extend it.
    pub chain_seq: u64,
    /// The hash of the link at `chain_seq`.
    pub chain_head: LinkHash,
    /// When the contact was added, seconds since the epoch.
    pub added_at: u64,
    /// Every device the sigchain lists, active and revoked, as last verified. Empty for a
    /// contact stored before devices (0.1) until it is verified again: then its one device is
    /// `current_key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
    /// The handles this identity lived under before its chain said it moved (PROTOCOL.md
    /// §14.6), oldest first: a command naming one of them means this contact. Absent in a
    /// contact stored before moves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved_from: Vec<String>,
    /// The Olm identity key each active device bound to itself (`set_olm_key`, PROTOCOL.md
    /// §15.1), as last verified: such a device gets forward-secret messages (envelope version
    /// 2), the others today's. Absent in a contact stored before forward secrecy until it is
    /// verified again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub olm_keys: BTreeMap<PublicKey, OlmKey>,
}

impl Contact {
    /// Whether `key` is a key this contact signs with now, an active device of its chain: only
    /// messages such a key signed are the contact's. A key stops being one when the chain
    /// revokes it (or rotates away from it).
    pub fn signs_with(&self, key: &PublicKey) -> bool {
        if self.devices.is_empty() {
            return self.current_key == *key;
        }
        self.devices
            .iter()
            .any(|device| device.key == *key && device.is_active())
    }

    /// Whether `key` is a key this contact signed with before: its identity key or a device
    /// its chain revoked or rotated away from. A message signed by it now is not theirs.
    pub fn retired(&self, key: &PublicKey) -> bool {
        let known = self.key == *key || self.devices.iter().any(|device| device.key == *key);
        known && !self.signs_with(key)
    }

    /// Whether every device a message to this contact goes to has an Olm key bound, so that
    /// messages to it are forward secret (PROTOCOL.md §15).
    pub fn forward_secret(&self) -> bool {
        self.recipient_keys()
            .iter()
            .all(|device| self.olm_keys.contains_key(device))
    }

    /// The devices of [`Contact::recipient_keys`] that have no Olm key bound: they still get
    /// today's envelope (an older client, or one that has not bound its key yet).
    pub fn without_olm_key(&self) -> Vec<PublicKey> {
        self.recipient_keys()
            .into_iter()
            .filter(|device| !self.olm_keys.contains_key(device))
            .collect()
    }

    /// The keys a message to this contact is sealed to, one envelope each: every active device
    /// that runs a client (a paper key is kept off any machine and receives nothing).
    pub fn recipient_keys(&self) -> Vec<PublicKey> {
        if self.devices.is_empty() {
            return vec![self.current_key];
        }
        self.devices
            .iter()
            .filter(|device| device.is_active() && device.kind != DeviceKind::Paper)
            .map(|device| device.key)
            .collect()
    }
}

/// A message [`Store::search`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The conversation's peer: a contact's identity key, or a stranger's key.
    pub peer: PublicKey,
    /// Whether it is the conversation kept apart for a key a contact retired.
    pub retired: bool,
    /// The message.
    pub message: StoredMessage,
    /// Its text as last edited (§8.6), when it was: what was searched, not the message's body.
    pub edited: Option<String>,
}

/// A file offer in the history ([`Store::offers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The message that carried it (its body is the offer's JSON, PROTOCOL.md §9.3).
    pub message: StoredMessage,
    /// Where it was written, once downloaded.
    pub downloaded: Option<Downloaded>,
}

/// Where and when an offered file was downloaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downloaded {
    /// The path the decrypted file was written to.
    pub path: String,
    /// When, seconds since the epoch.
    pub at: u64,
}

/// Which way a stored message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Received from the peer.
    Incoming,
    /// Sent to the peer.
    Outgoing,
}

/// A message in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The message id.
    pub id: MessageId,
    /// The sender's key (verified for incoming messages).
    pub from: PublicKey,
    /// The recipient's key.
    pub to: PublicKey,
    /// The sender's clock when sealed, seconds since the epoch.
    pub time: u64,
    /// Its sequence in the home server's inbox stream (0 when not known: stored by an older
    /// version, or recorded without it). The stream holds every inbox, so within a
    /// conversation on one server it is the order the server stored the messages in.
    #[serde(default)]
    pub seq: u64,
    /// The local clock when received (or sent), seconds since the epoch.
    pub stored_at: u64,
    /// The content type (`text`, ...).
    pub content_type: String,
    /// The content.
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
    /// Incoming or outgoing.
    pub direction: Direction,
}

impl StoredMessage {
    /// The other party of the conversation: the sender of an incoming message, the recipient
    /// of an outgoing one.
    pub fn peer(&self) -> &PublicKey {
        match self.direction {
            Direction::Incoming => &self.from,
            Direction::Outgoing => &self.to,
        }
    }
}

/// A bounce from the home server, opened and checked (kez-client's fetch believes one only
/// from the home server's federation key): what [`Store::record_fetched`] records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedBounce {
    /// The bounce envelope's own id: it is stored once.
    pub envelope: MessageId,
    /// When the home server sealed it, seconds since the epoch.
    pub time: u64,
    /// What it says.
    pub bounce: Bounce,
}

/// A device an own sent message did not reach, as the home server's bounce said
/// (PROTOCOL.md §14.4). `reason` and `message` are the server's words, which may carry a
/// peer's: shown through `display`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undelivered {
    /// The recipient device.
    pub device: PublicKey,
    /// The recipient's home domain.
    pub domain: String,
    /// The stable error name (`unknown_recipient`, `expired`, …).
    pub reason: String,
    /// What went wrong, for people.
    pub message: String,
    /// When the home server took the message, seconds since the epoch.
    pub queued_at: u64,
    /// When the home server gave up (the bounce's time).
    pub time: u64,
}

/// An [`Undelivered`] with the sent message it is about ([`Store::unshown_undelivered`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndeliveredNote {
    /// The conversation: the contact's identity.
    pub peer: PublicKey,
    /// The sent message.
    pub id: MessageId,
    /// Which device it did not reach, and why.
    pub undelivered: Undelivered,
}

/// Records `received` on the own sent message it names, in `tx`, once (its envelope id is
/// kept as seen). The message must be an outgoing one of the conversation of the contact on
/// the bounce's domain whose chain lists the bounced device; a bounce about anything else is
/// logged and dropped. `false` when nothing was recorded.
fn record_bounce(
    tx: &redb::WriteTransaction,
    received: &ReceivedBounce,
    now: u64,
) -> Result<bool, StoreError> {
    let mut seen = tx.open_table(SEEN).map_err(db)?;
    if seen
        .get(received.envelope.as_bytes())
        .map_err(db)?
        .is_some()
    {
        return Ok(false);
    }
    seen.insert(received.envelope.as_bytes(), now).map_err(db)?;
    let bounce = &received.bounce;
    let Some(id) = bounce.message_id() else {
        return Ok(false);
    };
    let mut contact = None;
    for entry in tx.open_table(CONTACTS).map_err(db)?.iter().map_err(db)? {
        let (_, value) = entry.map_err(db)?;
        let candidate: Contact = serde_json::from_slice(value.value()).map_err(corrupt)?;
        let lists = candidate.key == bounce.to
            || candidate.current_key == bounce.to
            || candidate
                .devices
                .iter()
                .any(|device| device.key == bounce.to);
        if lists && candidate.handle.rsplit('@').next() == Some(bounce.domain.as_str()) {
            contact = Some(candidate);
            break;
        }
    }
    let Some(contact) = contact else {
        tracing::info!(id = bounce.id, to = %bounce.to, "a bounce names a device of no contact on {}; dropped", bounce.domain);
        return Ok(false);
    };
    let conversation = contact.key.to_hex();
    let messages = tx.open_table(MESSAGES).map_err(db)?;
    let sent = find_messages(&messages, &conversation, &BTreeSet::from([id]))?;
    if !sent
        .values()
        .any(|(_, message)| message.direction == Direction::Outgoing)
    {
        tracing::info!(
            id = bounce.id,
            "a bounce names no message sent to {}; dropped",
            contact.handle
        );
        return Ok(false);
    }
    let mut table = tx.open_table(UNDELIVERED).map_err(db)?;
    let mut list = read_undelivered(&table, &conversation, id.as_bytes())?;
    if list.iter().any(|note| note.device == bounce.to) {
        return Ok(false);
    }
    list.push(Undelivered {
        device: bounce.to,
        domain: bounce.domain.clone(),
        reason: bounce.reason.clone(),
        message: bounce.message.clone(),
        queued_at: bounce.queued_at,
        time: received.time,
    });
    let json = serde_json::to_vec(&list).expect("undelivered notes serialise");
    table
        .insert((conversation.as_str(), *id.as_bytes()), json.as_slice())
        .map_err(db)?;
    tx.open_table(UNSHOWN_UNDELIVERED)
        .map_err(db)?
        .insert(
            (conversation.as_str(), *id.as_bytes(), *bounce.to.as_bytes()),
            received.time,
        )
        .map_err(db)?;
    Ok(true)
}

/// The undelivered notes of message `id` in `conversation`.
fn read_undelivered(
    table: &impl ReadableTable<(&'static str, [u8; 16]), &'static [u8]>,
    conversation: &str,
    id: &[u8; 16],
) -> Result<Vec<Undelivered>, StoreError> {
    match table.get((conversation, *id)).map_err(db)? {
        Some(guard) => serde_json::from_slice(guard.value()).map_err(corrupt),
        None => Ok(Vec::new()),
    }
}

/// One conversation in the store, as a list of conversations shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The other party: a contact's identity key ([`Contact::key`]) or a stranger's key.
    pub peer: PublicKey,
    /// Whether these messages were signed by a key a contact rotated away from: kept apart
    /// from the contact's own conversation, never attributed to them.
    pub retired: bool,
    /// How many messages it holds.
    pub messages: usize,
    /// How many of its received messages were not shown yet.
    pub unshown: usize,
    /// How many of its received messages a person sees ([`kez_core::chat::is_message`]) were
    /// not read yet: stored after the conversation was last marked read ([`Store::mark_read`]),
    /// not marked read by another own device, not deleted. A store written before read state
    /// starts each conversation read up to its first message not yet shown.
    pub unread: usize,
    /// Its last message, in the order of [`Store::history`].
    pub last: StoredMessage,
}

mod olm;
pub use olm::{
    OlmTarget, Prekeys, Received, RecordedBatch, SealTicket, UNDECRYPTABLE_CONTENT_TYPE,
};

mod base64_bytes {
    use data_encoding::BASE64;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        BASE64
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// A file the user publishes in their manifest (PROTOCOL.md §11.4). The manifest cannot tell
/// its owner whom a box is for, so the recipients are kept here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The entry (it holds the file's content key).
    pub entry: ManifestEntry,
    /// Who may see it, by handle; empty for a public file.
    pub recipients: Vec<String>,
    /// Whether the home server pins its blob.
    pub pinned: bool,
    /// The own blob node's tag that keeps the encrypted file.
    pub tag: String,
    /// For a private file, by recipient identity: the wrap its boxes for that recipient's
    /// devices with an Olm key carry the key under, and the devices a `kez.file-key` message
    /// carried it to (PROTOCOL.md §11.5). Kept so a republish reuses it. Absent for a file
    /// published before forward secrecy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub wraps: BTreeMap<PublicKey, SentWrap>,
}

/// A wrap sent to one recipient of a private published file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentWrap {
    /// The wrap.
    pub wrap: ContentKey,
    /// The recipient's devices it was sent to (those with an Olm key at the time): only their
    /// boxes carry the wrapped key.
    pub devices: Vec<PublicKey>,
}

/// The own manifest last committed to the sigchain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedManifest {
    /// Its publish counter.
    pub version: u64,
    /// Its BLAKE3 hash, as the `set_shared_files` link names it.
    pub hash: BlobHash,
    /// When it was built.
    pub time: u64,
    /// The own blob node's tag that keeps it.
    pub tag: String,
    /// Whether the home server pins it (and so every manifest after it: pinning is opt-in
    /// once).
    pub pinned: bool,
}

/// Why [`open_database`] failed.
enum OpenFailure {
    InUse,
    Io(std::io::Error),
    Damaged(String),
    /// The file needs redb's repair (asked for, and refused by the first attempt).
    NeedsRepair,
}

/// What a redb error means for opening a store.
fn classify(err: redb::Error) -> OpenFailure {
    match err {
        redb::Error::DatabaseAlreadyOpen => OpenFailure::InUse,
        redb::Error::RepairAborted => OpenFailure::NeedsRepair,
        // redb reads a file that is not one of its databases as invalid data.
        redb::Error::Io(err) if err.kind() != std::io::ErrorKind::InvalidData => {
            OpenFailure::Io(err)
        }
        err => OpenFailure::Damaged(err.to_string()),
    }
}

/// Opens the redb file at `path` (created with mode 0600 if missing) and reads it through.
///
/// A file left by a process that was killed needs redb's repair, which rewrites it: the file
/// is copied aside first (`<name>.before-repair`), and if the repair fails, or the repaired
/// file does not read through, the copy is put back, so a damaged file is left exactly as it
/// was. Panics inside redb (it asserts on some damaged files) count as damage.
fn open_database(path: &Path) -> Result<Database, OpenFailure> {
    use std::os::unix::fs::OpenOptionsExt;
    let open_file = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(OpenFailure::Io)
    };
    let inconsistent =
        || OpenFailure::Damaged("the database's own structure is inconsistent".into());
    let without_repair = quietly(|| {
        let mut builder = redb::Builder::new();
        builder.set_repair_callback(|session| session.abort());
        builder
            .create_file(open_file()?)
            .map_err(|err| classify(err.into()))
    })
    .map_err(|()| inconsistent())?;
    let database = match without_repair {
        Ok(database) => database,
        Err(OpenFailure::NeedsRepair) => {
            let copy = path.with_extension("redb.before-repair");
            std::fs::copy(path, &copy).map_err(OpenFailure::Io)?;
            let repaired = quietly(|| {
                let database = redb::Builder::new()
                    .create_file(open_file()?)
                    .map_err(|err| classify(err.into()))?;
                check_readable(&database)?;
                Ok(database)
            })
            .unwrap_or_else(|()| Err(inconsistent()));
            return match repaired {
                Ok(database) => {
                    let _ = std::fs::remove_file(&copy);
                    Ok(database)
                }
                Err(failure) => {
                    std::fs::rename(&copy, path).map_err(OpenFailure::Io)?;
                    Err(failure)
                }
            };
        }
        Err(failure) => return Err(failure),
    };
    quietly(|| check_readable(&database)).map_err(|()| inconsistent())??;
    Ok(database)
}

/// Reads every table to its end, so that a damaged page shows now, while the store is being
/// opened, rather than in the middle of a later command.
fn check_readable(database: &Database) -> Result<(), OpenFailure> {
    let tx = database.begin_read().map_err(|err| classify(err.into()))?;
    macro_rules! scan {
        ($($definition:expr),*) => {$(
            match tx.open_table($definition) {
                Ok(table) => {
                    for entry in table.iter().map_err(|err| classify(err.into()))? {
                        entry.map_err(|err| classify(err.into()))?;
                    }
                }
                // A store made by an older version may lack a table: created at open.
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(err) => return Err(classify(err.into())),
            }
        )*};
    }
    scan!(
        CONTACTS, MESSAGES, SEEN, META, UNSHOWN, OFFERS, DOWNLOADS, PUBLISHED, MANIFESTS
    );
    scan!(CHAT_STATE, TIMERS, READ_UPTO, UNDELIVERED);
    scan!(ORIGINS);
    scan!(UNSHOWN_UNDELIVERED);
    scan!(FILE_WRAPS);
    Ok(())
}

thread_local! {
    /// Set while [`quietly`] runs on this thread: a panic then is reported as a damaged store,
    /// not printed.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic in it into `Err(())` without the panic message: redb asserts on
/// some damaged files, and the person using the store needs to hear "damaged", not a
/// backtrace. Panics on other threads, or outside `f`, are reported as before.
fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, ()> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET.with(|quiet| quiet.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|quiet| quiet.set(false));
    result.map_err(|_| ())
}

/// The local store (see the module docs). One process at a time: redb locks the file.
#[derive(Clone)]
pub struct Store {
    db: std::sync::Arc<Database>,
    /// Group commit of the sending sessions (`olm::SealTicket`).
    flush: std::sync::Arc<olm::Flush>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store at `path`, creating the file (mode 0600) and its tables if needed.
    ///
    /// An existing file is checked before it is used, and never rewritten when it fails: it
    /// must be private to its owner ([`StoreError::Exposed`]), not empty, and readable to the
    /// end, every table ([`StoreError::Damaged`]: a file with flipped bits can make redb
    /// panic, which is caught here and reported as damage, without a backtrace). A file
    /// another process holds is [`StoreError::InUse`].
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let path = path.as_ref();
        let damaged = |reason: String| StoreError::Damaged {
            path: path.to_path_buf(),
            reason,
        };
        match std::fs::metadata(path) {
            Ok(metadata) if metadata.mode() & 0o077 != 0 => {
                return Err(StoreError::Exposed {
                    path: path.to_path_buf(),
                    mode: metadata.mode() & 0o777,
                });
            }
            Ok(metadata) if metadata.len() == 0 => {
                return Err(damaged("the file is empty: 0 bytes".into()));
            }
            _ => {}
        }
        let database = open_database(path).map_err(|failure| match failure {
            OpenFailure::InUse => StoreError::InUse {
                path: path.to_path_buf(),
            },
            OpenFailure::Io(err) => StoreError::Database(Box::new(redb::Error::Io(err))),
            OpenFailure::Damaged(reason) => damaged(reason),
            OpenFailure::NeedsRepair => damaged("redb could not repair it".into()),
        })?;
        let tx = database.begin_write().map_err(db)?;
        tx.open_table(CONTACTS).map_err(db)?;
        tx.open_table(OWN).map_err(db)?;
        tx.open_table(MESSAGES).map_err(db)?;
        tx.open_table(SEEN).map_err(db)?;
        tx.open_table(META).map_err(db)?;
        tx.open_table(OFFERS).map_err(db)?;
        tx.open_table(DOWNLOADS).map_err(db)?;
        tx.open_table(PUBLISHED).map_err(db)?;
        tx.open_table(MANIFESTS).map_err(db)?;
        create_chat_tables(&tx)?;
        tx.open_table(ORIGINS).map_err(db)?;
        tx.open_table(UNDELIVERED).map_err(db)?;
        tx.open_table(UNSHOWN_UNDELIVERED).map_err(db)?;
        tx.open_table(FILE_WRAPS).map_err(db)?;
        tx.commit().map_err(db)?;
        olm::create_tables(&database)?;
        Ok(Store {
            db: std::sync::Arc::new(database),
            flush: std::sync::Arc::default(),
        })
    }

    /// Pins `chain`'s identity for `handle` on first use, or checks it against the pinned one
    /// and follows the chain's rotations, at time `now`. The chain must extend the one verified
    /// before and be the same identity ([`check_pin`]; else [`StoreError::Refused`]). On error
    /// nothing changes.
    pub fn pin(
        &self,
        handle: &str,
        chain: &VerifiedChain,
        now: u64,
    ) -> Result<(Contact, PinChange), StoreError> {
        self.pin_in(CONTACTS, handle, handle, chain, now)
    }

    /// [`Store::pin`] for the own identity (under the own `handle`): its devices, which a
    /// sent message is copied to, and whose copies are the own sent messages. The first pin
    /// is trust on first use, like a contact's; every later chain must extend it.
    pub fn pin_own(
        &self,
        handle: &str,
        chain: &VerifiedChain,
        now: u64,
    ) -> Result<(Contact, PinChange), StoreError> {
        self.pin_in(OWN, OWN_CHAIN, handle, chain, now)
    }

    /// When a message from the device `key` (a contact's, or another own device's) was last
    /// stored here: the sender's time of the latest one. `None` if none was.
    pub fn last_seen(&self, key: &PublicKey) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = match tx.open_table(LAST_SEEN) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(err) => return Err(db(err)),
        };
        Ok(table
            .get(key.as_bytes())
            .map_err(db)?
            .map(|time| time.value()))
    }

    /// The own identity as last pinned ([`Store::pin_own`]), if it was.
    pub fn own(&self) -> Result<Option<Contact>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(OWN).map_err(db)?;
        read_contact(&table, OWN_CHAIN)
    }

    /// [`Store::pin`] into `table` under `entry`.
    fn pin_in(
        &self,
        table: TableDefinition<&str, &[u8]>,
        entry: &str,
        handle: &str,
        chain: &VerifiedChain,
        now: u64,
    ) -> Result<(Contact, PinChange), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let result = {
            let mut table = tx.open_table(table).map_err(db)?;
            let existing = match table.get(entry).map_err(db)? {
                Some(guard) => {
                    Some(serde_json::from_slice::<Contact>(guard.value()).map_err(corrupt)?)
                }
                None => None,
            };
            let pinned = existing.as_ref().map(|contact| PinnedChain {
                key: contact.key,
                current_key: contact.current_key,
                seq: contact.chain_seq,
                head: contact.chain_head,
            });
            let (now_pinned, change) =
                check_pin(pinned.as_ref(), chain).map_err(|refusal| StoreError::Refused {
                    handle: handle.to_owned(),
                    refusal,
                })?;
            let contact = match existing {
                None => contact_for(handle, chain, now),
                Some(contact) => Contact {
                    current_key: now_pinned.current_key,
                    chain_seq: now_pinned.seq,
                    chain_head: now_pinned.head,
                    devices: chain.devices().to_vec(),
                    olm_keys: olm_keys_of(chain),
                    ..contact
                },
            };
            let json = serde_json::to_vec(&contact).expect("a contact serialises");
            table.insert(entry, json.as_slice()).map_err(db)?;
            (contact, change)
        };
        tx.commit().map_err(db)?;
        Ok(result)
    }

    /// Follows a contact's move (PROTOCOL.md §14.6): the contact pinned under `old` is pinned
    /// under `new` from now on, with `chain` (the identity's chain as `new`'s server serves it,
    /// which must extend the pin, [`check_pin`]) and everything else kept (identity, devices,
    /// when it was added; the history is the identity's already); `old` is remembered in
    /// [`Contact::moved_from`], and the own published files shared with `old` are shared with
    /// `new`. A contact already pinned under `new` must be the same identity; the two become one.
    /// All in one transaction: on error nothing changes.
    pub fn rename_contact(
        &self,
        old: &str,
        new: &str,
        chain: &VerifiedChain,
    ) -> Result<(Contact, PinChange), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let result = {
            let mut table = tx.open_table(CONTACTS).map_err(db)?;
            let Some(existing) = read_contact(&table, old)? else {
                return Err(StoreError::NotAContact {
                    handle: old.to_owned(),
                });
            };
            let refused = |handle: &str, refusal| StoreError::Refused {
                handle: handle.to_owned(),
                refusal,
            };
            let (now_pinned, change) = check_pin(Some(&pinned_of(&existing)), chain)
                .map_err(|refusal| refused(old, refusal))?;
            let there = read_contact(&table, new)?;
            if let Some(there) = &there {
                check_pin(Some(&pinned_of(there)), chain)
                    .map_err(|refusal| refused(new, refusal))?;
            }
            let mut moved_from = existing.moved_from.clone();
            moved_from.extend(there.iter().flat_map(|there| there.moved_from.clone()));
            moved_from.push(old.to_owned());
            moved_from.retain(|handle| handle != new);
            let mut seen = std::collections::HashSet::new();
            moved_from.retain(|handle| seen.insert(handle.clone()));
            let contact = Contact {
                handle: new.to_owned(),
                current_key: now_pinned.current_key,
                chain_seq: now_pinned.seq,
                chain_head: now_pinned.head,
                devices: chain.devices().to_vec(),
                olm_keys: olm_keys_of(chain),
                added_at: existing
                    .added_at
                    .min(there.map_or(u64::MAX, |there| there.added_at)),
                moved_from,
                ..existing
            };
            table.remove(old).map_err(db)?;
            let json = serde_json::to_vec(&contact).expect("a contact serialises");
            table.insert(new, json.as_slice()).map_err(db)?;
            let mut published = tx.open_table(PUBLISHED).map_err(db)?;
            let mut renamed = Vec::new();
            for entry in published.iter().map_err(db)? {
                let (name, value) = entry.map_err(db)?;
                let mut file: Published = serde_json::from_slice(value.value()).map_err(corrupt)?;
                if file.recipients.iter().any(|handle| handle == old) {
                    for handle in &mut file.recipients {
                        if handle == old {
                            new.clone_into(handle);
                        }
                    }
                    let mut seen = std::collections::HashSet::new();
                    file.recipients.retain(|handle| seen.insert(handle.clone()));
                    renamed.push((name.value().to_owned(), file));
                }
            }
            for (name, file) in renamed {
                let json = serde_json::to_vec(&file).expect("a published file serialises");
                published
                    .insert(name.as_str(), json.as_slice())
                    .map_err(db)?;
            }
            (contact, change)
        };
        tx.commit().map_err(db)?;
        Ok(result)
    }

    /// The contact that lived under `handle` before it moved ([`Contact::moved_from`]), if any.
    pub fn contact_moved_from(&self, handle: &str) -> Result<Option<Contact>, StoreError> {
        Ok(self
            .contacts()?
            .into_iter()
            .find(|contact| contact.moved_from.iter().any(|old| old == handle)))
    }

    /// The contact pinned under `handle`, else the one that lived under it before it moved
    /// ([`Store::contact_moved_from`]): who a person means by `handle`.
    pub fn contact_or_moved(&self, handle: &str) -> Result<Option<Contact>, StoreError> {
        match self.contact(handle)? {
            Some(contact) => Ok(Some(contact)),
            None => self.contact_moved_from(handle),
        }
    }

    /// Replaces whatever is pinned for `handle` with `chain`'s identity: the user accepted a
    /// key change after checking the new key another way.
    pub fn repin(
        &self,
        handle: &str,
        chain: &VerifiedChain,
        now: u64,
    ) -> Result<Contact, StoreError> {
        let contact = contact_for(handle, chain, now);
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut table = tx.open_table(CONTACTS).map_err(db)?;
            let json = serde_json::to_vec(&contact).expect("a contact serialises");
            table.insert(handle, json.as_slice()).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(contact)
    }

    /// The contact for `handle`, if added.
    pub fn contact(&self, handle: &str) -> Result<Option<Contact>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(CONTACTS).map_err(db)?;
        match table.get(handle).map_err(db)? {
            Some(guard) => Ok(Some(
                serde_json::from_slice(guard.value()).map_err(corrupt)?,
            )),
            None => Ok(None),
        }
    }

    /// Every contact, ordered by handle.
    pub fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(CONTACTS).map_err(db)?;
        let mut contacts = Vec::new();
        for entry in table.iter().map_err(db)? {
            let (_, value) = entry.map_err(db)?;
            contacts.push(serde_json::from_slice(value.value()).map_err(corrupt)?);
        }
        Ok(contacts)
    }

    /// The contact that signs with `key` now ([`Contact::signs_with`]), if any: who sent a
    /// message signed by `key`.
    pub fn contact_by_key(&self, key: &PublicKey) -> Result<Option<Contact>, StoreError> {
        Ok(self.contacts()?.into_iter().find(|c| c.signs_with(key)))
    }

    /// The contact that rotated away from `key` ([`Contact::retired`]), if any: a message
    /// signed by `key` is not theirs, and saying whose key it was warns the user.
    pub fn contact_retired_key(&self, key: &PublicKey) -> Result<Option<Contact>, StoreError> {
        Ok(self.contacts()?.into_iter().find(|c| c.retired(key)))
    }

    /// Whether a message with `id` was seen (received or sent) before.
    pub fn is_seen(&self, id: &MessageId) -> Result<bool, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(SEEN).map_err(db)?;
        Ok(table.get(id.as_bytes()).map_err(db)?.is_some())
    }

    /// Records a received, opened message at time `now`: its id as seen and the message in
    /// the history, both or neither. Returns `false`, changing nothing, when the id was seen
    /// before (a replay or a redelivery).
    pub fn record_incoming(&self, message: &Message, now: u64) -> Result<bool, StoreError> {
        self.record(incoming(message, 0, now))
    }

    /// [`Store::record_incoming`] for a whole fetched batch in one transaction, with the inbox
    /// floor moved to `floor`: one disk sync for the batch instead of one per message. Every
    /// message is stored and the floor moved, or nothing changes (on an error). Answers, in
    /// order, whether each message was new; a repeat, also within `messages`, changes nothing.
    /// Each message comes with its inbox stream sequence ([`StoredMessage::seq`]).
    pub fn record_incoming_all(
        &self,
        messages: &[(Message, u64)],
        floor: InboxFloor,
        now: u64,
    ) -> Result<Vec<bool>, StoreError> {
        self.record_fetched(messages, &[], &[], floor, now)
    }

    /// [`Store::record_incoming_all`] for a batch from a federating server: `origins` (as many
    /// as `messages`, or none) names the domain of the server each message came from, which is
    /// remembered for its signer ([`Store::origin`]); `bounces` are recorded on the own sent
    /// messages they name ([`MessageView::undelivered`]), each once (by its envelope's id),
    /// and never as messages. All in the one transaction that moves the floor.
    pub fn record_fetched(
        &self,
        messages: &[(Message, u64)],
        origins: &[Option<String>],
        bounces: &[ReceivedBounce],
        floor: InboxFloor,
        now: u64,
    ) -> Result<Vec<bool>, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let fresh = record_batch_in(&tx, messages, origins, bounces, now)?;
        write_floor(&tx, floor)?;
        tx.commit().map_err(db)?;
        Ok(fresh)
    }

    /// The domain of the server the latest message signed by `key` came from, when that was
    /// another server ([`Store::record_fetched`]): where to ask who a stranger is.
    pub fn origin(&self, key: &PublicKey) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(ORIGINS).map_err(db)?;
        Ok(table
            .get(key.as_bytes())
            .map_err(db)?
            .map(|origin| origin.value().to_owned()))
    }

    /// The undelivered notes (bounces recorded on own sent messages) not shown to a listener
    /// yet, in the order of the conversations and messages.
    pub fn unshown_undelivered(&self) -> Result<Vec<UndeliveredNote>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let unshown = tx.open_table(UNSHOWN_UNDELIVERED).map_err(db)?;
        let undelivered = tx.open_table(UNDELIVERED).map_err(db)?;
        let mut out = Vec::new();
        for entry in unshown.iter().map_err(db)? {
            let (key, _) = entry.map_err(db)?;
            let (conversation, id, device) = key.value();
            let (peer, _) = conversation_peer(conversation)?;
            let device = PublicKey::from_bytes(&device)
                .map_err(|err| StoreError::Corrupt(format!("an undelivered device: {err}")))?;
            let found = read_undelivered(&undelivered, conversation, &id)?
                .into_iter()
                .find(|note| note.device == device)
                .ok_or_else(|| {
                    StoreError::Corrupt("an unshown undelivered note is missing".into())
                })?;
            out.push(UndeliveredNote {
                peer,
                id: MessageId::from_bytes(id),
                undelivered: found,
            });
        }
        Ok(out)
    }

    /// Marks these notes (from [`Store::unshown_undelivered`]) as shown.
    pub fn mark_undelivered_shown(&self, notes: &[UndeliveredNote]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut unshown = tx.open_table(UNSHOWN_UNDELIVERED).map_err(db)?;
            for note in notes {
                let conversation = note.peer.to_hex();
                unshown
                    .remove((
                        conversation.as_str(),
                        *note.id.as_bytes(),
                        *note.undelivered.device.as_bytes(),
                    ))
                    .map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    /// How far the own inbox is stored.
    pub fn inbox_floor(&self) -> Result<InboxFloor, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let meta = tx.open_table(META).map_err(db)?;
        let read = |name: &str| -> Result<u64, StoreError> {
            Ok(meta.get(name).map_err(db)?.map_or(0, |value| value.value()))
        };
        Ok(InboxFloor {
            seq: read(INBOX_FLOOR)?,
            time: read(INBOX_FLOOR_TIME)?,
        })
    }

    /// Sets the inbox floor without storing messages: to start over (the server's inbox stream
    /// was restored or recreated; redelivered messages are then dropped by id).
    pub fn set_inbox_floor(&self, floor: InboxFloor) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        write_floor(&tx, floor)?;
        tx.commit().map_err(db)
    }

    /// Records a sent message (see [`crate::Sent`]) at time `now`, like
    /// [`Store::record_incoming`].
    pub fn record_outgoing(&self, sent: &crate::Sent, now: u64) -> Result<bool, StoreError> {
        self.record(StoredMessage {
            id: sent.id,
            from: sent.from,
            to: sent.to,
            time: sent.time,
            seq: sent.stream_sequence,
            stored_at: now,
            content_type: sent.content_type.clone(),
            body: sent.body.clone(),
            direction: Direction::Outgoing,
        })
    }

    fn record(&self, message: StoredMessage) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let unshown = message.direction == Direction::Incoming;
        let fresh = record_in(&tx, &message, unshown)?;
        if fresh {
            tx.commit().map_err(db)?;
        }
        Ok(fresh)
    }

    /// Received messages not yet shown to the user, in the order they were stored, each with its
    /// storage position for [`Store::mark_shown`]. Showing comes after storing (and acking), so a
    /// client killed in between shows them on its next run instead of losing them.
    pub fn unshown(&self) -> Result<Vec<(u64, StoredMessage)>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let unshown = match tx.open_table(UNSHOWN) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(err) => return Err(db(err)),
        };
        let messages = tx.open_table(MESSAGES).map_err(db)?;
        let mut out = Vec::new();
        for entry in unshown.iter().map_err(db)? {
            let (order, peer) = entry.map_err(db)?;
            let (order, peer) = (order.value(), peer.value());
            let json = messages.get((peer, order)).map_err(db)?.ok_or_else(|| {
                StoreError::Corrupt(format!("unshown message {order} is missing"))
            })?;
            out.push((
                order,
                serde_json::from_slice(json.value()).map_err(corrupt)?,
            ));
        }
        Ok(out)
    }

    /// Marks the messages at these storage positions (from [`Store::unshown`]) as shown.
    pub fn mark_shown(&self, orders: &[u64]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut unshown = tx.open_table(UNSHOWN).map_err(db)?;
            for order in orders {
                unshown.remove(order).map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    /// Every file offer (content type `file-offer`), received or sent, in storage order, each
    /// with where it was downloaded to, if it was.
    pub fn offers(&self) -> Result<Vec<Offer>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let offers = tx.open_table(OFFERS).map_err(db)?;
        let messages = tx.open_table(MESSAGES).map_err(db)?;
        let downloads = tx.open_table(DOWNLOADS).map_err(db)?;
        let mut out = Vec::new();
        for entry in offers.iter().map_err(db)? {
            let (id, place) = entry.map_err(db)?;
            let (peer, order) = place.value();
            let json = messages
                .get((peer, order))
                .map_err(db)?
                .ok_or_else(|| StoreError::Corrupt(format!("offer message {order} is missing")))?;
            let downloaded = match downloads.get(id.value()).map_err(db)? {
                Some(guard) => Some(serde_json::from_slice(guard.value()).map_err(corrupt)?),
                None => None,
            };
            out.push((
                order,
                Offer {
                    message: serde_json::from_slice(json.value()).map_err(corrupt)?,
                    downloaded,
                },
            ));
        }
        out.sort_by_key(|(order, _)| *order);
        Ok(out.into_iter().map(|(_, offer)| offer).collect())
    }

    /// Records that the offer `id` was downloaded, decrypted and written to `path`, at `now`.
    pub fn mark_downloaded(&self, id: &MessageId, path: &str, now: u64) -> Result<(), StoreError> {
        let json = serde_json::to_vec(&Downloaded {
            path: path.to_owned(),
            at: now,
        })
        .expect("a download record serialises");
        let tx = self.db.begin_write().map_err(db)?;
        tx.open_table(DOWNLOADS)
            .map_err(db)?
            .insert(id.as_bytes(), json.as_slice())
            .map_err(db)?;
        tx.commit().map_err(db)
    }

    /// The own published files, by name.
    pub fn published(&self) -> Result<Vec<Published>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(PUBLISHED).map_err(db)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db)? {
            let (_, value) = entry.map_err(db)?;
            out.push(serde_json::from_slice(value.value()).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// Adds a published file; `false` (and nothing changes) when one of that name is there.
    pub fn add_published(&self, published: &Published) -> Result<bool, StoreError> {
        let json = serde_json::to_vec(published).expect("a published file serialises");
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut table = tx.open_table(PUBLISHED).map_err(db)?;
            if table
                .get(published.entry.name.as_str())
                .map_err(db)?
                .is_some()
            {
                return Ok(false);
            }
            table
                .insert(published.entry.name.as_str(), json.as_slice())
                .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(true)
    }

    /// Sets the wraps of the published file `name` ([`Published::wraps`]); `false` (and nothing
    /// changes) when there is none.
    pub fn set_published_wraps(
        &self,
        name: &str,
        wraps: &BTreeMap<PublicKey, SentWrap>,
    ) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut table = tx.open_table(PUBLISHED).map_err(db)?;
            let Some(mut published) = table
                .get(name)
                .map_err(db)?
                .map(|guard| serde_json::from_slice::<Published>(guard.value()))
                .transpose()
                .map_err(corrupt)?
            else {
                return Ok(false);
            };
            published.wraps = wraps.clone();
            let json = serde_json::to_vec(&published).expect("a published file serialises");
            table.insert(name, json.as_slice()).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(true)
    }

    /// The wrap `owner` (a contact's identity key) sent for its private manifest entries of
    /// `blob` (PROTOCOL.md §11.5); `None` when none has arrived.
    pub fn file_wrap(
        &self,
        owner: &PublicKey,
        blob: &BlobHash,
    ) -> Result<Option<ContentKey>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(FILE_WRAPS).map_err(db)?;
        Ok(table
            .get((*owner.as_bytes(), *blob.as_bytes()))
            .map_err(db)?
            .map(|guard| ContentKey::from_bytes(guard.value())))
    }

    /// Removes the published file `name` and returns it; `None` when there is none.
    pub fn remove_published(&self, name: &str) -> Result<Option<Published>, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let removed = {
            let mut table = tx.open_table(PUBLISHED).map_err(db)?;
            let removed = table.remove(name).map_err(db)?;
            match removed {
                Some(guard) => Some(serde_json::from_slice(guard.value()).map_err(corrupt)?),
                None => None,
            }
        };
        tx.commit().map_err(db)?;
        Ok(removed)
    }

    /// The own manifest last committed, if any.
    pub fn last_manifest(&self) -> Result<Option<PublishedManifest>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(MANIFESTS).map_err(db)?;
        let value = table.get(LAST_MANIFEST).map_err(db)?;
        value
            .map(|guard| serde_json::from_slice(guard.value()).map_err(corrupt))
            .transpose()
    }

    /// Records the manifest just committed.
    pub fn set_last_manifest(&self, manifest: &PublishedManifest) -> Result<(), StoreError> {
        let json = serde_json::to_vec(manifest).expect("a manifest record serialises");
        let tx = self.db.begin_write().map_err(db)?;
        tx.open_table(MANIFESTS)
            .map_err(db)?
            .insert(LAST_MANIFEST, json.as_slice())
            .map_err(db)?;
        tx.commit().map_err(db)
    }

    /// Every conversation, the one with the latest message first. Reads every stored message
    /// once.
    pub fn conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(MESSAGES).map_err(db)?;
        let mut unshown = std::collections::HashMap::<String, usize>::new();
        match tx.open_table(UNSHOWN) {
            Ok(table) => {
                for entry in table.iter().map_err(db)? {
                    let (_, peer) = entry.map_err(db)?;
                    *unshown.entry(peer.value().to_owned()).or_default() += 1;
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(err) => return Err(db(err)),
        }
        let read_upto = tx.open_table(READ_UPTO).map_err(db)?;
        let states = tx.open_table(CHAT_STATE).map_err(db)?;
        let mut out: Vec<Conversation> = Vec::new();
        let mut current: Option<String> = None;
        let mut upto = 0;
        for entry in table.iter().map_err(db)? {
            let (key, value) = entry.map_err(db)?;
            let (name, order) = key.value();
            let message: StoredMessage = serde_json::from_slice(value.value()).map_err(corrupt)?;
            // Changes of other messages (receipts, edits…) are not messages of their own here.
            if !chat::is_message(&message.content_type) {
                continue;
            }
            if current.as_deref() != Some(name) {
                upto = read_upto
                    .get(name)
                    .map_err(db)?
                    .map_or(0, |guard| guard.value());
            }
            let is_unread = message.direction == Direction::Incoming
                && order >= upto
                && unread(
                    &message,
                    order,
                    upto,
                    &read_state(&states, name, &message.id)?,
                );
            if current.as_deref() == Some(name)
                && let Some(conversation) = out.last_mut()
            {
                conversation.messages += 1;
                conversation.unread += usize::from(is_unread);
                if (message.time, message.seq) >= (conversation.last.time, conversation.last.seq) {
                    conversation.last = message;
                }
                continue;
            }
            let (peer, retired) = conversation_peer(name)?;
            out.push(Conversation {
                peer,
                retired,
                messages: 1,
                unshown: unshown.get(name).copied().unwrap_or(0),
                unread: usize::from(is_unread),
                last: message,
            });
            current = Some(name.to_owned());
        }
        out.sort_by_key(|conversation| {
            std::cmp::Reverse((conversation.last.time, conversation.last.seq))
        });
        Ok(out)
    }

    /// Every stored message whose words contain `query`, ignoring case: the text of a `text`
    /// message, the file name of a file offer, the text of a reply. With the conversation each belongs to, in the
    /// order they were sent (the sender's time, then the stream sequence). Reads the whole
    /// history: local search over what this home holds.
    pub fn search(&self, query: &str) -> Result<Vec<Found>, StoreError> {
        let query = query.to_lowercase();
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(MESSAGES).map_err(db)?;
        let states = tx.open_table(CHAT_STATE).map_err(db)?;
        let mut found = Vec::new();
        for entry in table.iter().map_err(db)? {
            let (key, value) = entry.map_err(db)?;
            let message: StoredMessage = serde_json::from_slice(value.value()).map_err(corrupt)?;
            // What the conversation shows: the last edit's text, nothing of a deleted message.
            let state = read_state(&states, key.value().0, &message.id)?;
            if state.deleted {
                continue;
            }
            let edited = state.edit.map(|edit| edit.value);
            let words = edited.clone().or_else(|| searchable_words(&message));
            if !words.is_some_and(|words| words.to_lowercase().contains(&query)) {
                continue;
            }
            let (peer, retired) = conversation_peer(key.value().0)?;
            found.push(Found {
                peer,
                retired,
                message,
                edited,
            });
        }
        found.sort_by_key(|found| (found.message.time, found.message.seq));
        Ok(found)
    }

    /// The conversation with `peer` (a contact's identity key, see [`Contact::key`]), in the
    /// order the messages were sent: by the sender's time, then the stream sequence; messages
    /// alike in both keep the order they were stored in.
    pub fn history(&self, peer: &PublicKey) -> Result<Vec<StoredMessage>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(MESSAGES).map_err(db)?;
        let peer = peer.to_hex();
        let mut messages = Vec::new();
        for entry in table
            .range((peer.as_str(), 0)..=(peer.as_str(), u64::MAX))
            .map_err(db)?
        {
            let (_, value) = entry.map_err(db)?;
            messages.push(serde_json::from_slice(value.value()).map_err(corrupt)?);
        }
        // The order the messages were sent in, not the order they arrived in (a redelivery
        // after a crash arrives late): the sender's time, then the server's stream order.
        messages.sort_by_key(|message: &StoredMessage| (message.time, message.seq));
        Ok(messages)
    }
}

// ---- Chat changes, read state and disappearing messages (PROTOCOL.md §8.6) ----

/// One change to a stored message, as received or sent ([`Store::apply_change`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatChange {
    /// The conversation the change came in: the peer's identity ([`Contact::key`]), as for
    /// [`Store::history`].
    pub peer: PublicKey,
    /// The identity that sent the change (the own identity, or the peer's), resolved from the
    /// envelope's verified device through a verified chain.
    pub sender: PublicKey,
    /// The change message's id.
    pub id: MessageId,
    /// The change message's envelope time.
    pub time: u64,
    /// What it says.
    pub content: ChatContent,
}

/// A shown message with what later messages did to it ([`Store::message`],
/// [`Store::messages`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    /// The message as stored (after a deletion: its body is empty).
    pub message: StoredMessage,
    /// The text to show for a `text` or `kez.reply` message: the latest edit's, else its own
    /// (lossy UTF-8, PROTOCOL.md §8.1); `None` for other content types and once deleted.
    pub text: Option<String>,
    /// Whether `text` is an edit's.
    pub edited: bool,
    /// Whether its sender deleted it (its text is gone from the store).
    pub deleted: bool,
    /// The message a `kez.reply` quotes (`None` once deleted).
    pub reply_to: Option<MessageId>,
    /// Each reaction with the identities that reacted with it.
    pub reactions: BTreeMap<String, BTreeSet<PublicKey>>,
    /// Outgoing: a device of the peer stored it (read implies delivered).
    pub delivered: bool,
    /// Outgoing: the peer read it. Incoming: the own person read it (the conversation was
    /// marked read after it was stored, or another own device said so).
    pub read: bool,
    /// When a disappearing-message timer deletes it (seconds since the epoch).
    pub expires_at: Option<u64>,
    /// Outgoing: the devices of the peer it was not delivered to, as the home server's
    /// bounces said (a contact on another domain).
    pub undelivered: Vec<Undelivered>,
}

/// A value written by the message (`time`, `id`): of two, the later wins
/// ([`chat::timer_replaces`]), whatever order they arrived in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Versioned<T> {
    time: u64,
    id: MessageId,
    value: T,
}

impl<T> Versioned<T> {
    fn replaces(&self, current: Option<&Versioned<T>>) -> bool {
        current.is_none_or(|current| {
            chat::timer_replaces(self.time, self.id, current.time, current.id)
        })
    }
}

/// What changes did to one message: a JSON record in [`CHAT_STATE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ChatState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    edit: Option<Versioned<String>>,
    #[serde(default)]
    deleted: bool,
    /// emoji → identity (text form) → whether it is there.
    #[serde(default)]
    reactions: BTreeMap<String, BTreeMap<PublicKey, Versioned<bool>>>,
    #[serde(default)]
    delivered: bool,
    #[serde(default)]
    read: bool,
}

/// A conversation's `kez.timer` settings: a JSON list in [`TIMERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct TimerSetting {
    time: u64,
    id: MessageId,
    seconds: u32,
}

fn timer_list(settings: &[TimerSetting]) -> Vec<(u64, MessageId, Timer)> {
    settings
        .iter()
        .map(|setting| {
            (
                setting.time,
                setting.id,
                Timer {
                    seconds: setting.seconds,
                },
            )
        })
        .collect()
}

fn read_timers(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    conversation: &str,
) -> Result<Vec<TimerSetting>, StoreError> {
    match table.get(conversation).map_err(db)? {
        Some(guard) => serde_json::from_slice(guard.value()).map_err(corrupt),
        None => Ok(Vec::new()),
    }
}

fn read_state(
    table: &impl ReadableTable<(&'static str, [u8; 16]), &'static [u8]>,
    conversation: &str,
    id: &MessageId,
) -> Result<ChatState, StoreError> {
    match table.get((conversation, *id.as_bytes())).map_err(db)? {
        Some(guard) => serde_json::from_slice(guard.value()).map_err(corrupt),
        None => Ok(ChatState::default()),
    }
}

/// The messages of `conversation` with these ids: id → (storage order, message).
fn find_messages(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    conversation: &str,
    ids: &BTreeSet<MessageId>,
) -> Result<HashMap<MessageId, (u64, StoredMessage)>, StoreError> {
    let mut found = HashMap::new();
    for entry in table
        .range((conversation, 0)..=(conversation, u64::MAX))
        .map_err(db)?
    {
        let (key, value) = entry.map_err(db)?;
        let message: StoredMessage = serde_json::from_slice(value.value()).map_err(corrupt)?;
        if ids.contains(&message.id) {
            found.insert(message.id, (key.value().1, message));
        }
    }
    Ok(found)
}

/// Whether an incoming shown message at storage `order` counts as unread.
fn unread(message: &StoredMessage, order: u64, read_upto: u64, state: &ChatState) -> bool {
    message.direction == Direction::Incoming
        && chat::is_message(&message.content_type)
        && order >= read_upto
        && !state.read
        && !state.deleted
}

fn refused(reason: ChatError) -> StoreError {
    StoreError::ChangeRefused(reason)
}

/// Sets up the tables of chat changes, read state and timers in a store that lacks them:
/// every conversation of a store an earlier version wrote starts read up to its first message
/// not yet shown (what the CLI printed counts as read).
/// A kept profile: its message's time and id, and its §8.6 body.
#[derive(Serialize, Deserialize)]
struct StoredProfile {
    time: u64,
    id: MessageId,
    #[serde(with = "base64_bytes")]
    body: Vec<u8>,
}

fn read_profile(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<StoredProfile>, StoreError> {
    match table.get(key).map_err(db)? {
        Some(value) => serde_json::from_slice(value.value())
            .map(Some)
            .map_err(corrupt),
        None => Ok(None),
    }
}

fn create_chat_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let exists = tx
        .list_tables()
        .map_err(db)?
        .any(|table| table.name() == READ_UPTO.name());
    tx.open_table(CHAT_STATE).map_err(db)?;
    tx.open_table(TIMERS).map_err(db)?;
    tx.open_table(PROFILES).map_err(db)?;
    let mut read_upto = tx.open_table(READ_UPTO).map_err(db)?;
    if exists {
        return Ok(());
    }
    let next = tx
        .open_table(META)
        .map_err(db)?
        .get(NEXT_ORDER)
        .map_err(db)?
        .map_or(0, |guard| guard.value());
    let mut first_unshown = HashMap::<String, u64>::new();
    for entry in tx.open_table(UNSHOWN).map_err(db)?.iter().map_err(db)? {
        let (order, peer) = entry.map_err(db)?;
        first_unshown
            .entry(peer.value().to_owned())
            .or_insert(order.value());
    }
    let messages = tx.open_table(MESSAGES).map_err(db)?;
    let mut conversations = BTreeSet::new();
    for entry in messages.iter().map_err(db)? {
        let (key, _) = entry.map_err(db)?;
        conversations.insert(key.value().0.to_owned());
    }
    for name in conversations {
        let upto = first_unshown.get(&name).copied().unwrap_or(next);
        read_upto.insert(name.as_str(), upto).map_err(db)?;
    }
    Ok(())
}

impl Store {
    /// Applies a change (PROTOCOL.md §8.6) to the message(s) it names in conversation
    /// `change.peer`, the own identity being `own`, in one transaction; `true` when it changed
    /// something. The rules of [`chat::may_change`] hold here: the sender must be `own` or the
    /// peer, the target must be stored in this conversation (a change that arrives before its
    /// target is refused, not parked: [`ChatError::NotInConversation`]), an edit or deletion
    /// must come from the target's sender (the peer for an incoming message, `own` for an
    /// outgoing one) and name a text or a reply. A refused change is
    /// [`StoreError::ChangeRefused`] and stores nothing.
    ///
    /// - Edit: the latest edit (envelope time, then id) is the text; ignored once deleted.
    /// - Delete: the target's body is emptied in the store and its edit dropped.
    /// - Reaction: the sender's reaction is added or taken back (latest wins per emoji).
    /// - Reply: checks its target if stored (a reply is a message, recorded like one; a reply
    ///   to a message not stored is still shown); changes nothing.
    /// - Receipt: the ids found in the conversation are marked (ids not stored, for example
    ///   already expired, are passed over; none found is refused). From the peer, own messages
    ///   are delivered or read; from `own`, a `read` marks the peer's messages read and a
    ///   `delivered` changes nothing.
    /// - Timer: the conversation's timer setting is kept ([`Store::timer`]).
    /// - Typing, presence, profile: not stored here; `Ok(false)`.
    pub fn apply_change(&self, own: &PublicKey, change: &ChatChange) -> Result<bool, StoreError> {
        let peer = change.peer;
        if change.sender != *own && change.sender != peer {
            return Err(refused(ChatError::NotInConversation));
        }
        let Some((kind, ids)) = change.content.change() else {
            if let ChatContent::Timer(timer) = change.content {
                return self.set_timer(&peer, change.time, change.id, timer);
            }
            return Ok(false);
        };
        let conversation = peer.to_hex();
        let ids: BTreeSet<MessageId> = ids.into_iter().collect();
        let tx = self.db.begin_write().map_err(db)?;
        let changed = {
            let mut messages = tx.open_table(MESSAGES).map_err(db)?;
            let mut states = tx.open_table(CHAT_STATE).map_err(db)?;
            let found = find_messages(&messages, &conversation, &ids)?;
            if found.is_empty() && kind == ChangeKind::Reply {
                return Ok(false);
            }
            if found.is_empty()
                || (found.len() != ids.len() && !matches!(kind, ChangeKind::Receipt(_)))
            {
                return Err(refused(ChatError::NotInConversation));
            }
            for (_, target) in found.values() {
                let target_sender = match target.direction {
                    Direction::Incoming => &peer,
                    Direction::Outgoing => own,
                };
                chat::may_change(
                    target_sender,
                    &target.content_type,
                    true,
                    &change.sender,
                    kind,
                )
                .map_err(refused)?;
            }
            let mut changed = false;
            for (id, (order, target)) in &found {
                let before = read_state(&states, &conversation, id)?;
                let mut state = before.clone();
                match &change.content {
                    ChatContent::Edit(edit) => {
                        let new = Versioned {
                            time: change.time,
                            id: change.id,
                            value: edit.text.clone(),
                        };
                        if !state.deleted && new.replaces(state.edit.as_ref()) {
                            state.edit = Some(new);
                        }
                    }
                    ChatContent::Delete(_) => {
                        state.deleted = true;
                        state.edit = None;
                        if !target.body.is_empty() {
                            let emptied = StoredMessage {
                                body: Vec::new(),
                                ..target.clone()
                            };
                            let json = serde_json::to_vec(&emptied).expect("a message serialises");
                            messages
                                .insert((conversation.as_str(), *order), json.as_slice())
                                .map_err(db)?;
                            changed = true;
                        }
                    }
                    ChatContent::Reaction(reaction) => {
                        let new = Versioned {
                            time: change.time,
                            id: change.id,
                            value: !reaction.remove,
                        };
                        let by = state.reactions.entry(reaction.emoji.clone()).or_default();
                        if new.replaces(by.get(&change.sender)) {
                            by.insert(change.sender, new);
                        }
                    }
                    ChatContent::Receipt(receipt) => {
                        let read = receipt.kind == ReceiptKind::Read;
                        if change.sender == peer {
                            state.delivered = true;
                            state.read |= read;
                        } else {
                            state.read |= read;
                        }
                    }
                    _ => {}
                }
                if state != before {
                    let json = serde_json::to_vec(&state).expect("a state serialises");
                    states
                        .insert((conversation.as_str(), *id.as_bytes()), json.as_slice())
                        .map_err(db)?;
                    changed = true;
                }
            }
            changed
        };
        tx.commit().map_err(db)?;
        Ok(changed)
    }

    /// The message `id` of the conversation with `peer`, with its state; `None` when it is not
    /// stored there.
    pub fn message(
        &self,
        peer: &PublicKey,
        id: &MessageId,
    ) -> Result<Option<MessageView>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let conversation = peer.to_hex();
        let messages = tx.open_table(MESSAGES).map_err(db)?;
        let found = find_messages(&messages, &conversation, &BTreeSet::from([*id]))?;
        let Some((order, message)) = found.into_values().next() else {
            return Ok(None);
        };
        Ok(Some(self.view(&tx, &conversation, order, message)?))
    }

    /// The shown messages ([`chat::is_message`]) of the conversation with `peer` with their
    /// state, in the order of [`Store::history`]: what a chat view lists (changes, receipts
    /// and the like that were recorded as messages are left out).
    pub fn messages(&self, peer: &PublicKey) -> Result<Vec<MessageView>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let conversation = peer.to_hex();
        let table = tx.open_table(MESSAGES).map_err(db)?;
        let mut out = Vec::new();
        for entry in table
            .range((conversation.as_str(), 0)..=(conversation.as_str(), u64::MAX))
            .map_err(db)?
        {
            let (key, value) = entry.map_err(db)?;
            let message: StoredMessage = serde_json::from_slice(value.value()).map_err(corrupt)?;
            if chat::is_message(&message.content_type) {
                out.push(self.view(&tx, &conversation, key.value().1, message)?);
            }
        }
        out.sort_by_key(|view| (view.message.time, view.message.seq));
        Ok(out)
    }

    fn view(
        &self,
        tx: &redb::ReadTransaction,
        conversation: &str,
        order: u64,
        message: StoredMessage,
    ) -> Result<MessageView, StoreError> {
        let state = read_state(
            &tx.open_table(CHAT_STATE).map_err(db)?,
            conversation,
            &message.id,
        )?;
        let timers = read_timers(&tx.open_table(TIMERS).map_err(db)?, conversation)?;
        let read_upto = tx
            .open_table(READ_UPTO)
            .map_err(db)?
            .get(conversation)
            .map_err(db)?
            .map_or(0, |guard| guard.value());
        let undelivered = read_undelivered(
            &tx.open_table(UNDELIVERED).map_err(db)?,
            conversation,
            message.id.as_bytes(),
        )?;
        let reply = (message.content_type == chat::REPLY_CONTENT_TYPE && !state.deleted)
            .then(|| chat::Reply::decode(&message.body).ok())
            .flatten();
        let text = match (state.deleted, &state.edit, message.content_type.as_str()) {
            (true, _, _) => None,
            (false, Some(edit), _) => Some(edit.value.clone()),
            (false, None, "text") => Some(String::from_utf8_lossy(&message.body).into_owned()),
            (false, None, _) => reply.as_ref().map(|reply| reply.text.clone()),
        };
        let read = match message.direction {
            Direction::Incoming => order < read_upto || state.read,
            Direction::Outgoing => state.read,
        };
        Ok(MessageView {
            edited: state.edit.is_some() && !state.deleted,
            deleted: state.deleted,
            text,
            reply_to: reply.map(|reply| reply.id),
            reactions: state
                .reactions
                .iter()
                .map(|(emoji, by)| {
                    let who: BTreeSet<PublicKey> = by
                        .iter()
                        .filter(|(_, there)| there.value)
                        .map(|(identity, _)| *identity)
                        .collect();
                    (emoji.clone(), who)
                })
                .filter(|(_, who)| !who.is_empty())
                .collect(),
            delivered: state.delivered || (message.direction == Direction::Outgoing && state.read),
            read,
            expires_at: chat::expires_at(
                message.time,
                chat::timer_in_force(&timer_list(&timers), message.time),
            ),
            undelivered,
            message,
        })
    }

    /// Keeps the `kez.timer` setting (`time`, `id`) of the conversation with `peer`: messages
    /// sent from `time` on expire after `timer` ([`chat::timer_in_force`]). `false` when this
    /// setting was kept before.
    pub fn set_timer(
        &self,
        peer: &PublicKey,
        time: u64,
        id: MessageId,
        timer: Timer,
    ) -> Result<bool, StoreError> {
        timer.validate().map_err(refused)?;
        let conversation = peer.to_hex();
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut table = tx.open_table(TIMERS).map_err(db)?;
            let mut settings = read_timers(&table, &conversation)?;
            if settings.iter().any(|setting| setting.id == id) {
                return Ok(false);
            }
            settings.push(TimerSetting {
                time,
                id,
                seconds: timer.seconds,
            });
            let json = serde_json::to_vec(&settings).expect("timers serialise");
            table
                .insert(conversation.as_str(), json.as_slice())
                .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(true)
    }

    /// Keeps `profile` as what the identity `of` says about itself, from its message `id` of
    /// `time`, unless a later one is kept already ([`chat::timer_replaces`]: the later message
    /// wins whatever order they arrived in). Answers whether it is kept.
    pub fn set_profile(
        &self,
        of: &PublicKey,
        time: u64,
        id: MessageId,
        profile: &chat::Profile,
    ) -> Result<bool, StoreError> {
        let body = profile.encode().map_err(refused)?;
        let key = of.to_hex();
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut table = tx.open_table(PROFILES).map_err(db)?;
            if let Some(kept) = read_profile(&table, &key)?
                && !chat::timer_replaces(time, id, kept.time, kept.id)
            {
                return Ok(false);
            }
            let json = serde_json::to_vec(&StoredProfile { time, id, body })
                .expect("a profile serialises");
            table.insert(key.as_str(), json.as_slice()).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(true)
    }

    /// The latest profile the identity `of` sent ([`Store::set_profile`]) and its time.
    pub fn profile(&self, of: &PublicKey) -> Result<Option<(chat::Profile, u64)>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(PROFILES).map_err(db)?;
        let Some(kept) = read_profile(&table, &of.to_hex())? else {
            return Ok(None);
        };
        let profile = chat::Profile::decode(&kept.body)
            .map_err(|err| StoreError::Corrupt(format!("a kept profile does not decode: {err}")))?;
        Ok(Some((profile, kept.time)))
    }

    /// The conversation's timer now: the latest setting ([`chat::timer_replaces`]); off when
    /// none.
    pub fn timer(&self, peer: &PublicKey) -> Result<Timer, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let settings = read_timers(&tx.open_table(TIMERS).map_err(db)?, &peer.to_hex())?;
        Ok(chat::timer_in_force(&timer_list(&settings), u64::MAX))
    }

    /// Deletes every message whose timer expired at `now` ([`MessageView::expires_at`] at or
    /// before `now`), with its state, unshown mark, offer index and download record (a
    /// downloaded file itself is the caller's); its id stays seen, so a redelivery does not
    /// bring it back. Answers how many were deleted.
    pub fn purge_expired(&self, now: u64) -> Result<usize, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let mut purged = 0;
        {
            let timers = tx.open_table(TIMERS).map_err(db)?;
            let mut all = Vec::new();
            for entry in timers.iter().map_err(db)? {
                let (name, value) = entry.map_err(db)?;
                let settings: Vec<TimerSetting> =
                    serde_json::from_slice(value.value()).map_err(corrupt)?;
                all.push((name.value().to_owned(), timer_list(&settings)));
            }
            let mut messages = tx.open_table(MESSAGES).map_err(db)?;
            let mut states = tx.open_table(CHAT_STATE).map_err(db)?;
            let mut unshown = tx.open_table(UNSHOWN).map_err(db)?;
            let mut offers = tx.open_table(OFFERS).map_err(db)?;
            let mut downloads = tx.open_table(DOWNLOADS).map_err(db)?;
            let mut undelivered = tx.open_table(UNDELIVERED).map_err(db)?;
            let mut unshown_undelivered = tx.open_table(UNSHOWN_UNDELIVERED).map_err(db)?;
            for (conversation, timers) in all {
                let mut expired = Vec::new();
                for entry in messages
                    .range((conversation.as_str(), 0)..=(conversation.as_str(), u64::MAX))
                    .map_err(db)?
                {
                    let (key, value) = entry.map_err(db)?;
                    let message: StoredMessage =
                        serde_json::from_slice(value.value()).map_err(corrupt)?;
                    let timer = chat::timer_in_force(&timers, message.time);
                    if chat::expires_at(message.time, timer).is_some_and(|at| at <= now) {
                        expired.push((key.value().1, message.id));
                    }
                }
                for (order, id) in expired {
                    messages
                        .remove((conversation.as_str(), order))
                        .map_err(db)?;
                    states
                        .remove((conversation.as_str(), *id.as_bytes()))
                        .map_err(db)?;
                    unshown.remove(order).map_err(db)?;
                    offers.remove(id.as_bytes()).map_err(db)?;
                    downloads.remove(id.as_bytes()).map_err(db)?;
                    for note in read_undelivered(&undelivered, &conversation, id.as_bytes())? {
                        unshown_undelivered
                            .remove((
                                conversation.as_str(),
                                *id.as_bytes(),
                                *note.device.as_bytes(),
                            ))
                            .map_err(db)?;
                    }
                    undelivered
                        .remove((conversation.as_str(), *id.as_bytes()))
                        .map_err(db)?;
                    purged += 1;
                }
            }
        }
        tx.commit().map_err(db)?;
        Ok(purged)
    }

    /// Marks every message of the conversation with `peer` stored so far as read by the own
    /// person, and answers the ids of the incoming shown messages that were unread until now
    /// (for a `read` receipt to the peer and the own other devices), in storage order.
    pub fn mark_read(&self, peer: &PublicKey) -> Result<Vec<MessageId>, StoreError> {
        let conversation = peer.to_hex();
        let tx = self.db.begin_write().map_err(db)?;
        let mut newly_read = Vec::new();
        {
            let next = tx
                .open_table(META)
                .map_err(db)?
                .get(NEXT_ORDER)
                .map_err(db)?
                .map_or(0, |guard| guard.value());
            let mut read_upto = tx.open_table(READ_UPTO).map_err(db)?;
            let upto = read_upto
                .get(conversation.as_str())
                .map_err(db)?
                .map_or(0, |guard| guard.value());
            if next <= upto {
                // Nothing stored since it was last read: no write (and no sync) at all.
                drop(read_upto);
                tx.abort().map_err(db)?;
                return Ok(newly_read);
            }
            let messages = tx.open_table(MESSAGES).map_err(db)?;
            let states = tx.open_table(CHAT_STATE).map_err(db)?;
            for entry in messages
                .range((conversation.as_str(), upto)..=(conversation.as_str(), u64::MAX))
                .map_err(db)?
            {
                let (key, value) = entry.map_err(db)?;
                let message: StoredMessage =
                    serde_json::from_slice(value.value()).map_err(corrupt)?;
                let state = read_state(&states, &conversation, &message.id)?;
                if unread(&message, key.value().1, upto, &state) {
                    newly_read.push(message.id);
                }
            }
            read_upto
                .insert(conversation.as_str(), next.max(upto))
                .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(newly_read)
    }
}

#[cfg(test)]
mod tests {
    use kez_core::SecretKey;
    use kez_core::sigchain::{Endpoint, Op, UnsignedLink};

    use super::*;

    fn key(seed: u8) -> PublicKey {
        SecretKey::from_seed(&[seed; 32]).public_key()
    }

    fn message(from: u8, to: u8, text: &str) -> Message {
        Message {
            from: key(from),
            to: key(to),
            id: MessageId::random(),
            time: 1_767_225_600,
            content_type: "text".into(),
            body: text.as_bytes().to_vec(),
        }
    }

    fn secret(seed: u8) -> SecretKey {
        SecretKey::from_seed(&[seed; 32])
    }

    fn endpoint(name: &str) -> Op {
        Op::AddEndpoint(Endpoint {
            name: name.into(),
            kind: "nats".into(),
            address: format!("kez.inbox.{name}"),
        })
    }

    /// Links of a chain signed by `seed`'s key, one endpoint per name.
    fn links(seed: u8, names: &[&str]) -> Vec<Vec<u8>> {
        let key = secret(seed);
        let mut out: Vec<Vec<u8>> = vec![
            UnsignedLink::first(key.public_key(), 100, endpoint(names[0]))
                .sign(&key)
                .unwrap()
                .bytes()
                .to_vec(),
        ];
        for name in &names[1..] {
            let chain = VerifiedChain::verify(&out).unwrap();
            out.push(
                chain
                    .next_link(101, endpoint(name))
                    .sign(&key)
                    .unwrap()
                    .bytes()
                    .to_vec(),
            );
        }
        out
    }

    fn verified(links: &[Vec<u8>]) -> VerifiedChain {
        VerifiedChain::verify(links).unwrap()
    }

    #[test]
    fn tofu_pins_the_first_identity_and_refuses_another() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        let bob_links = links(2, &["a"]);
        let (bob, change) = store
            .pin("@bob@kez.test", &verified(&bob_links), 10)
            .unwrap();
        assert_eq!(change, PinChange::New);
        assert_eq!(
            (bob.key, bob.current_key, bob.chain_seq),
            (key(2), key(2), 1)
        );
        let (again, change) = store
            .pin("@bob@kez.test", &verified(&bob_links), 20)
            .unwrap();
        assert_eq!((again, change), (bob.clone(), PinChange::Same));

        let err = store
            .pin("@bob@kez.test", &verified(&links(3, &["a"])), 30)
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Refused { refusal: PinRefusal::KeyChanged { pinned, offered }, .. }
                if *pinned == key(2) && *offered == key(3)),
            "{err:?}"
        );
        assert!(err.to_string().contains("the key changed"), "{err}");
        assert_eq!(store.contact("@bob@kez.test").unwrap(), Some(bob.clone()));
        assert_eq!(store.contacts().unwrap(), vec![bob.clone()]);
        assert_eq!(store.contact_by_key(&key(2)).unwrap(), Some(bob));
        assert_eq!(store.contact("@carol@kez.test").unwrap(), None);

        // The user checked the new key another way and accepts it.
        let repinned = store
            .repin("@bob@kez.test", &verified(&links(3, &["a"])), 40)
            .unwrap();
        assert_eq!((repinned.key, repinned.added_at), (key(3), 40));
        assert_eq!(store.contact("@bob@kez.test").unwrap(), Some(repinned));
    }

    /// A contact that moved is pinned under its new handle with everything kept, and its old
    /// handle still finds it; a chain that does not extend the pin, or a new handle pinned to
    /// another identity, changes nothing.
    #[test]
    fn a_move_renames_the_contact_and_keeps_identity_devices_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        let (old, new) = ("@bob@a.test", "@bob@b.test");
        let (before, _) = store.pin(old, &verified(&links(2, &["a"])), 10).unwrap();
        assert!(store.record_incoming(&message(2, 1, "hi"), 11).unwrap());

        let forked = verified(&links(2, &["b"]));
        assert!(matches!(
            store.rename_contact(old, new, &forked),
            Err(StoreError::Refused { .. })
        ));
        store
            .pin("@carol@b.test", &verified(&links(3, &["c"])), 12)
            .unwrap();
        let grown = verified(&links(2, &["a", "moved"]));
        assert!(matches!(
            store.rename_contact(old, "@carol@b.test", &grown),
            Err(StoreError::Refused { .. })
        ));
        assert_eq!(store.contact(old).unwrap(), Some(before.clone()));

        let (moved, change) = store.rename_contact(old, new, &grown).unwrap();
        assert_eq!(change, PinChange::Same);
        assert_eq!(moved.handle, new);
        assert_eq!(
            (moved.key, moved.added_at, moved.chain_seq),
            (key(2), 10, 2)
        );
        assert_eq!(moved.moved_from, [old.to_owned()]);
        assert_eq!(store.contact(old).unwrap(), None);
        assert_eq!(store.contact(new).unwrap(), Some(moved.clone()));
        assert_eq!(store.contact_moved_from(old).unwrap(), Some(moved.clone()));
        assert_eq!(store.contact_or_moved(old).unwrap(), Some(moved.clone()));
        assert_eq!(store.contact_or_moved(new).unwrap(), Some(moved.clone()));
        assert_eq!(store.history(&key(2)).unwrap().len(), 1, "history is kept");
        assert!(matches!(
            store.rename_contact(old, new, &grown),
            Err(StoreError::NotAContact { .. })
        ));
    }

    #[test]
    fn a_pinned_chain_may_grow_and_rotate_but_not_shrink_or_fork() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        let two = links(2, &["a", "b"]);
        store
            .pin("@bob@kez.test", &verified(&two[..1]), 10)
            .unwrap();
        let (grown, change) = store.pin("@bob@kez.test", &verified(&two), 11).unwrap();
        assert_eq!((change, grown.chain_seq), (PinChange::Same, 2));

        let err = store
            .pin("@bob@kez.test", &verified(&two[..1]), 12)
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Refused {
                    refusal: PinRefusal::Rollback {
                        pinned: 2,
                        served: 1
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        let fork = links(2, &["a", "c"]);
        let err = store
            .pin("@bob@kez.test", &verified(&fork), 13)
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Refused {
                    refusal: PinRefusal::Forked { seq: 2 },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("a forked chain is not trusted"));
        assert_eq!(store.contact("@bob@kez.test").unwrap(), Some(grown.clone()));

        // A message from bob's key before the rotation is bob's.
        assert!(
            store
                .record_incoming(&message(2, 1, "before"), 100)
                .unwrap()
        );
        // bob's own chain rotates to key 9: followed, and the conversation stays one.
        let mut rotated = two.clone();
        let chain = verified(&two);
        rotated.push(
            chain
                .next_link(102, endpoint("unused"))
                .sign_rotation(&secret(2), &secret(9))
                .unwrap()
                .bytes()
                .to_vec(),
        );
        let (bob, change) = store.pin("@bob@kez.test", &verified(&rotated), 14).unwrap();
        assert_eq!(change, PinChange::Rotated { from: key(2) });
        assert_eq!(
            (bob.key, bob.current_key, bob.chain_seq),
            (key(2), key(9), 3)
        );
        assert_eq!(store.contact_by_key(&key(9)).unwrap(), Some(bob.clone()));
        assert!(store.record_incoming(&message(9, 1, "after"), 101).unwrap());
        let history = store.history(&bob.key).unwrap();
        let bodies: Vec<&[u8]> = history.iter().map(|m| m.body.as_slice()).collect();
        assert_eq!(bodies, [&b"before"[..], b"after"]);

        // The old key is retired: what it signs now is not bob's.
        assert_eq!(store.contact_by_key(&key(2)).unwrap(), None);
        assert_eq!(
            store.contact_retired_key(&key(2)).unwrap(),
            Some(bob.clone())
        );
        assert_eq!(store.contact_retired_key(&key(9)).unwrap(), None);
        assert!(store.record_incoming(&message(2, 1, "late"), 102).unwrap());
        let history = store.history(&bob.key).unwrap();
        let bodies: Vec<&[u8]> = history.iter().map(|m| m.body.as_slice()).collect();
        assert_eq!(
            bodies,
            [&b"before"[..], b"after"],
            "not in bob's conversation"
        );
        let unshown = store.unshown().unwrap();
        let late = unshown.last().unwrap();
        assert_eq!(late.1.body, b"late");
        // Listed apart from bob's conversation, as the retired key's (all sent at one time:
        // in no particular order).
        let mut listed: Vec<(PublicKey, bool, usize)> = store
            .conversations()
            .unwrap()
            .iter()
            .map(|c| (c.peer, c.retired, c.messages))
            .collect();
        listed.sort_by_key(|(_, retired, _)| *retired);
        assert_eq!(listed, [(key(2), false, 2), (key(2), true, 1)]);
    }

    #[test]
    fn search_finds_words_in_texts_and_file_names_ignoring_case() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        let at = |mut message: Message, time: u64| {
            message.time = time;
            message
        };
        let mut binary = message(3, 1, "Lunch at noon");
        binary.content_type = "image/png".into();
        let mut offer = at(message(3, 1, ""), 50);
        offer.content_type = FILE_OFFER_CONTENT_TYPE.into();
        offer.body = kez_core::file::FileOffer {
            name: "lunch-menu.pdf".into(),
            size: 17,
            blob: BlobHash::from_bytes([9; 32]),
            cipher_size: kez_core::file::ciphertext_len(17).unwrap(),
            providers: vec!["iroh:node".into()],
            key: kez_core::file::ContentKey::from_bytes([3; 32]),
            pinned: false,
        }
        .to_json()
        .unwrap()
        .to_vec();
        for m in [
            at(message(2, 1, "LUNCH tomorrow?"), 200),
            at(message(3, 1, "no lunch for me"), 100),
            at(message(2, 1, "see you"), 300),
            binary,
            offer,
        ] {
            assert!(store.record_incoming(&m, 400).unwrap());
        }
        let sent = crate::Sent {
            id: MessageId::random(),
            from: key(1),
            to: key(2),
            time: 250,
            content_type: "text".into(),
            body: "lunch: yes".into(),
            stream_sequence: 0,
            missed: Vec::new(),
        };
        store.record_outgoing(&sent, 400).unwrap();
        let found: Vec<(PublicKey, String)> = store
            .search("Lunch")
            .unwrap()
            .into_iter()
            .map(|found| {
                let text = match found.message.content_type.as_str() {
                    "text" => String::from_utf8(found.message.body).unwrap(),
                    other => other.to_owned(),
                };
                (found.peer, text)
            })
            .collect();
        assert_eq!(
            found,
            [
                (key(3), FILE_OFFER_CONTENT_TYPE.to_owned()),
                (key(3), "no lunch for me".to_owned()),
                (key(2), "LUNCH tomorrow?".to_owned()),
                (key(2), "lunch: yes".to_owned()),
            ],
            "texts and file names (not other content types), by time, both directions"
        );
        assert!(store.search("dinner").unwrap().is_empty());
    }

    #[test]
    fn conversations_list_the_latest_first_with_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        let at = |mut message: Message, time: u64| {
            message.time = time;
            message
        };
        assert!(store.conversations().unwrap().is_empty());
        for m in [
            at(message(2, 1, "bob early"), 100),
            at(message(3, 1, "carol"), 200),
            at(message(2, 1, "bob late"), 300),
            at(message(2, 1, "bob between"), 250),
        ] {
            assert!(store.record_incoming(&m, 400).unwrap());
        }
        let bob_orders: Vec<u64> = store
            .unshown()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.from == key(2))
            .map(|(order, _)| *order)
            .take(1)
            .collect();
        store.mark_shown(&bob_orders).unwrap();
        let listed = store.conversations().unwrap();
        let summary: Vec<(PublicKey, usize, usize, &[u8])> = listed
            .iter()
            .map(|c| (c.peer, c.messages, c.unshown, c.last.body.as_slice()))
            .collect();
        assert_eq!(
            summary,
            [
                (key(2), 3, 2, &b"bob late"[..]),
                (key(3), 1, 1, &b"carol"[..]),
            ]
        );
        assert!(listed.iter().all(|c| !c.retired));
    }

    #[test]
    fn a_store_is_private_and_a_bad_one_is_refused_untouched() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let store = Store::open(&path).unwrap();
            for i in 0..50u8 {
                store
                    .record_incoming(&message(2, 1, &"x".repeat(usize::from(i) * 20)), 1)
                    .unwrap();
            }
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "created private");
            assert!(matches!(Store::open(&path), Err(StoreError::InUse { .. })));
        }
        let good = std::fs::read(&path).unwrap();

        // Readable by others: refused, with the chmod that fixes it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

        let refused_untouched = |bytes: &[u8], name: &str| {
            let bad = dir.path().join(name);
            std::fs::write(&bad, bytes).unwrap();
            std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
            let result = Store::open(&bad);
            if result.is_err() {
                assert!(
                    std::fs::read(&bad).unwrap() == bytes,
                    "{name} was refused, and changed"
                );
            }
            result
        };
        let err = refused_untouched(b"", "empty.redb").unwrap_err();
        assert!(matches!(&err, StoreError::Damaged { reason, .. } if reason.contains("empty")));
        assert!(err.to_string().contains(".damaged"), "{err}");
        let garbage = refused_untouched(b"this is not a database at all", "garbage.redb");
        assert!(
            matches!(garbage, Err(StoreError::Damaged { .. })),
            "{garbage:?}"
        );
        // Bits flipped in the file's first pages: some make redb assert. Each file opens as
        // a store or is refused as damaged, and never panics out of `open`.
        let mut refused = 0;
        for seed in 0..40u64 {
            let mut bytes = good.clone();
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for _ in 0..20 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % bytes.len().min(65_536);
                bytes[at] ^= 1 << (x % 8);
            }
            match refused_untouched(&bytes, &format!("flipped-{seed}.redb")) {
                Ok(_) => {}
                Err(StoreError::Damaged { .. }) => refused += 1,
                Err(other) => panic!("seed {seed}: {other}"),
            }
        }
        assert!(refused > 0, "no flipped file was refused");

        // A store left open by a killed process needs redb's repair: done, and nothing lost.
        let open = dir.path().join("open.redb");
        let store = Store::open(&open).unwrap();
        store.record_incoming(&message(2, 1, "kept"), 1).unwrap();
        let killed = dir.path().join("killed.redb");
        std::fs::copy(&open, &killed).unwrap();
        std::mem::forget(store);
        let repaired = Store::open(&killed).expect("repaired");
        let kept = repaired.history(&key(2)).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].body, b"kept");
        assert!(!dir.path().join("killed.redb.before-repair").exists());
    }

    #[test]
    fn a_batch_is_stored_in_one_go_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        let before = message(2, 1, "before");
        assert!(store.record_incoming(&before, 100).unwrap());
        let one = message(2, 1, "one");
        let two = message(2, 1, "two");
        let fresh = store
            .record_incoming_all(
                &[(one.clone(), 3), (before, 4), (two, 5), (one, 6)],
                InboxFloor { seq: 6, time: 9 },
                101,
            )
            .unwrap();
        assert_eq!(
            fresh,
            [true, false, true, false],
            "repeats, also within the batch"
        );
        let history = store.history(&key(2)).unwrap();
        let bodies: Vec<&[u8]> = history.iter().map(|m| m.body.as_slice()).collect();
        assert_eq!(bodies, [&b"before"[..], &b"one"[..], &b"two"[..]]);
        assert_eq!(store.unshown().unwrap().len(), 3);
        assert_eq!(store.inbox_floor().unwrap(), InboxFloor { seq: 6, time: 9 });
        // A batch of nothing that opened still moves the floor.
        let floor = InboxFloor { seq: 8, time: 11 };
        assert_eq!(
            store.record_incoming_all(&[], floor, 102).unwrap(),
            Vec::<bool>::new()
        );
        assert_eq!(store.inbox_floor().unwrap(), floor);
        store.set_inbox_floor(InboxFloor::default()).unwrap();
        drop(store);
        let reopened = Store::open(dir.path().join("store.redb")).unwrap();
        assert_eq!(reopened.inbox_floor().unwrap(), InboxFloor::default());
    }

    #[test]
    fn history_is_in_the_order_sent_not_the_order_received() {
        // 1 and 2 fetched, then the client killed before acknowledging 2 and 3: 4 and 5 arrive
        // first, 2 and 3 are redelivered later.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        let sent = |n: u64| {
            let mut message = message(2, 1, &format!("m{n}"));
            message.time = 1_767_225_600 + n / 2;
            (message, 10 + n)
        };
        for batch in [
            vec![sent(1)],
            vec![sent(4), sent(5)],
            vec![sent(2), sent(3)],
        ] {
            store
                .record_incoming_all(&batch, InboxFloor::default(), 100)
                .unwrap();
        }
        let history = store.history(&key(2)).unwrap();
        let bodies: Vec<&[u8]> = history.iter().map(|m| m.body.as_slice()).collect();
        assert_eq!(bodies, [&b"m1"[..], b"m2", b"m3", b"m4", b"m5"]);
    }

    #[test]
    fn history_is_per_peer_in_order_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        let first = message(2, 1, "one");
        let other = message(3, 1, "from carol");
        let second = message(2, 1, "two");
        for m in [&first, &other, &second] {
            assert!(store.record_incoming(m, 100).unwrap());
        }
        assert!(!store.record_incoming(&first, 101).unwrap(), "a repeat");
        assert!(store.is_seen(&first.id).unwrap());
        let history = store.history(&key(2)).unwrap();
        let bodies: Vec<&[u8]> = history.iter().map(|m| m.body.as_slice()).collect();
        assert_eq!(bodies, [&b"one"[..], &b"two"[..]]);
        assert_eq!(history[0].direction, Direction::Incoming);
        assert_eq!(store.history(&key(3)).unwrap().len(), 1);
        assert!(store.history(&key(4)).unwrap().is_empty());
    }

    #[test]
    fn file_offers_are_indexed_and_remember_their_download() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::open(&path).unwrap();
        let mut offer = message(2, 1, "{\"name\":\"a.txt\"}");
        offer.content_type = FILE_OFFER_CONTENT_TYPE.into();
        store.record_incoming(&message(2, 1, "hello"), 100).unwrap();
        store.record_incoming(&offer, 101).unwrap();
        store.record_incoming(&offer, 102).unwrap();
        let offers = store.offers().unwrap();
        assert_eq!(offers.len(), 1, "text is not an offer, a repeat not twice");
        assert_eq!(offers[0].message.id, offer.id);
        assert_eq!(offers[0].downloaded, None);

        store.mark_downloaded(&offer.id, "/tmp/a.txt", 103).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let offers = store.offers().unwrap();
        assert_eq!(
            offers[0].downloaded,
            Some(Downloaded {
                path: "/tmp/a.txt".into(),
                at: 103
            })
        );
    }

    #[test]
    fn received_messages_stay_unshown_until_marked_even_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::open(&path).unwrap();
        assert!(store.unshown().unwrap().is_empty(), "a new store");
        let (first, second) = (message(2, 1, "one"), message(3, 1, "two"));
        store.record_incoming(&first, 100).unwrap();
        store.record_incoming(&second, 100).unwrap();
        store.record_incoming(&first, 101).unwrap();
        let unshown = store.unshown().unwrap();
        let bodies: Vec<&[u8]> = unshown.iter().map(|(_, m)| m.body.as_slice()).collect();
        assert_eq!(
            bodies,
            [&b"one"[..], &b"two"[..]],
            "in order, the repeat not again"
        );
        store.mark_shown(&[unshown[0].0]).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let left = store.unshown().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.body, b"two");
        store.mark_shown(&[left[0].0]).unwrap();
        assert!(store.unshown().unwrap().is_empty());
    }

    // ---- chat changes (PROTOCOL.md §8.6) ----

    const OWN_ID: u8 = 1;
    const BOB: u8 = 2;

    fn chat_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        (dir, store)
    }

    /// An outgoing message of the own identity to bob, stored.
    fn sent(store: &Store, content_type: &str, body: &[u8], time: u64) -> MessageId {
        let id = MessageId::random();
        assert!(
            store
                .record(StoredMessage {
                    id,
                    from: key(OWN_ID),
                    to: key(BOB),
                    time,
                    seq: 0,
                    stored_at: time,
                    content_type: content_type.into(),
                    body: body.to_vec(),
                    direction: Direction::Outgoing,
                })
                .unwrap()
        );
        id
    }

    /// An incoming message from `from` to the own identity, stored.
    fn received(store: &Store, from: u8, content_type: &str, body: &[u8], time: u64) -> MessageId {
        let mut message = message(from, OWN_ID, "");
        message.content_type = content_type.into();
        message.body = body.to_vec();
        message.time = time;
        assert!(store.record_incoming(&message, time).unwrap());
        message.id
    }

    fn change(sender: u8, time: u64, content: ChatContent) -> ChatChange {
        ChatChange {
            peer: key(BOB),
            sender: key(sender),
            id: MessageId::random(),
            time,
            content,
        }
    }

    fn apply(store: &Store, change: &ChatChange) -> Result<bool, StoreError> {
        store.apply_change(&key(OWN_ID), change)
    }

    fn edit(id: MessageId, text: &str) -> ChatContent {
        ChatContent::Edit(chat::Edit {
            id,
            text: text.into(),
        })
    }

    fn refusal(result: Result<bool, StoreError>) -> &'static str {
        match result {
            Err(StoreError::ChangeRefused(reason)) => reason.code(),
            other => panic!("not refused: {other:?}"),
        }
    }

    fn view(store: &Store, id: MessageId) -> MessageView {
        store.message(&key(BOB), &id).unwrap().expect("stored")
    }

    #[test]
    fn an_edit_from_the_sender_changes_the_text_and_the_latest_edit_wins() {
        let (_dir, store) = chat_store();
        let mine = sent(&store, "text", b"helo", 100);
        let theirs = received(&store, BOB, "text", b"hi", 101);
        assert_eq!(view(&store, mine).text.as_deref(), Some("helo"));
        assert!(!view(&store, mine).edited);

        let later = change(OWN_ID, 110, edit(mine, "hello!"));
        let earlier = change(OWN_ID, 105, edit(mine, "hello"));
        assert!(apply(&store, &later).unwrap());
        assert!(
            !apply(&store, &earlier).unwrap(),
            "an older edit arriving late"
        );
        let shown = view(&store, mine);
        assert_eq!(
            (shown.text.as_deref(), shown.edited),
            (Some("hello!"), true)
        );
        assert_eq!(shown.message.body, b"helo", "the original stays");

        assert!(apply(&store, &change(BOB, 111, edit(theirs, "hi there"))).unwrap());
        assert_eq!(view(&store, theirs).text.as_deref(), Some("hi there"));
    }

    #[test]
    fn search_finds_what_the_conversation_shows() {
        let (_dir, store) = chat_store();
        let edited = sent(&store, "text", b"meet at 5?", 100);
        let deleted = sent(&store, "text", b"meet in secret", 101);
        let kept = received(&store, BOB, "text", b"meet me there", 102);
        assert!(apply(&store, &change(OWN_ID, 110, edit(edited, "meet at 6?"))).unwrap());
        let delete = ChatContent::Delete(chat::Delete { id: deleted });
        assert!(apply(&store, &change(OWN_ID, 111, delete)).unwrap());
        let found = |words: &str| -> Vec<(MessageId, Option<String>)> {
            let found = store.search(words).unwrap();
            found
                .into_iter()
                .map(|f| (f.message.id, f.edited))
                .collect()
        };
        assert_eq!(
            found("meet"),
            [(edited, Some("meet at 6?".to_owned())), (kept, None)],
            "the edit's text; not the deleted message"
        );
        assert!(found("at 5").is_empty(), "not the text before the edit");
        assert!(found("secret").is_empty(), "not a deleted message");
    }

    #[test]
    fn a_forged_edit_or_delete_is_refused_and_stores_nothing() {
        let (_dir, store) = chat_store();
        let mine = sent(&store, "text", b"mine", 100);
        let theirs = received(&store, BOB, "text", b"theirs", 101);
        // bob edits or deletes the own message; the own identity edits bob's.
        for forged in [
            change(BOB, 110, edit(mine, "forged")),
            change(BOB, 110, ChatContent::Delete(chat::Delete { id: mine })),
            change(OWN_ID, 110, edit(theirs, "forged")),
        ] {
            assert_eq!(refusal(apply(&store, &forged)), "not_the_sender");
        }
        // carol is not in this conversation at all.
        assert_eq!(
            refusal(apply(&store, &change(3, 110, edit(mine, "carol")))),
            "not_in_conversation"
        );
        for id in [mine, theirs] {
            let shown = view(&store, id);
            assert!(!shown.edited && !shown.deleted, "nothing stored");
        }
        assert_eq!(view(&store, mine).text.as_deref(), Some("mine"));
        let err = apply(&store, &change(BOB, 110, edit(mine, "forged"))).unwrap_err();
        assert!(err.to_string().contains("only the sender"), "{err}");
    }

    #[test]
    fn a_change_must_name_a_message_of_its_conversation_of_a_kind_it_applies_to() {
        let (_dir, store) = chat_store();
        let elsewhere = received(&store, 3, "text", b"carol's", 100);
        let offer = sent(&store, FILE_OFFER_CONTENT_TYPE, b"{}", 101);
        let unknown = MessageId::random();
        assert_eq!(
            refusal(apply(&store, &change(OWN_ID, 110, edit(unknown, "x")))),
            "not_in_conversation",
            "a change before its target is refused, not parked"
        );
        let reaction = |id| {
            ChatContent::Reaction(chat::Reaction {
                id,
                emoji: "👍".into(),
                remove: false,
            })
        };
        assert_eq!(
            refusal(apply(&store, &change(BOB, 110, reaction(elsewhere)))),
            "not_in_conversation"
        );
        assert_eq!(
            refusal(apply(&store, &change(OWN_ID, 110, edit(offer, "x")))),
            "not_editable"
        );
        assert!(apply(&store, &change(BOB, 110, reaction(offer))).unwrap());
        let receipt_id = received(&store, BOB, chat::RECEIPT_CONTENT_TYPE, b"{}", 111);
        assert_eq!(
            refusal(apply(&store, &change(OWN_ID, 112, reaction(receipt_id)))),
            "not_a_message"
        );
        assert_eq!(
            store.message(&key(BOB), &elsewhere).unwrap(),
            None,
            "carol's message is not in bob's conversation"
        );
    }

    #[test]
    fn a_delete_removes_the_text_from_the_store_and_from_search() {
        let (_dir, store) = chat_store();
        let mine = sent(&store, "text", b"secret plans", 100);
        let reply_body = chat::Reply {
            id: mine,
            text: "more secret".into(),
        }
        .encode()
        .unwrap();
        let reply = sent(&store, chat::REPLY_CONTENT_TYPE, &reply_body, 101);
        assert!(apply(&store, &change(OWN_ID, 105, edit(mine, "secret plans v2"))).unwrap());
        assert_eq!(
            store.search("secret").unwrap().len(),
            2,
            "texts and replies"
        );
        for id in [mine, reply] {
            let delete = change(OWN_ID, 110, ChatContent::Delete(chat::Delete { id }));
            assert!(apply(&store, &delete).unwrap());
            assert!(!apply(&store, &delete).unwrap(), "once");
        }
        assert!(!apply(&store, &change(OWN_ID, 120, edit(mine, "back"))).unwrap());
        for id in [mine, reply] {
            let shown = view(&store, id);
            assert!(shown.deleted && !shown.edited);
            assert_eq!((shown.text, shown.reply_to), (None, None));
            assert!(shown.message.body.is_empty());
        }
        assert!(store.search("secret").unwrap().is_empty());
        assert!(
            store
                .history(&key(BOB))
                .unwrap()
                .iter()
                .all(|message| message.body.is_empty()),
            "gone from the records, not only hidden"
        );
    }

    #[test]
    fn reactions_collect_identities_and_can_be_taken_back() {
        let (_dir, store) = chat_store();
        let theirs = received(&store, BOB, "text", b"lunch?", 100);
        let react = |sender, time, emoji: &str, remove| {
            change(
                sender,
                time,
                ChatContent::Reaction(chat::Reaction {
                    id: theirs,
                    emoji: emoji.into(),
                    remove,
                }),
            )
        };
        for reaction in [
            react(OWN_ID, 110, "👍", false),
            react(BOB, 111, "👍", false),
            react(BOB, 112, "🎉", false),
            react(BOB, 114, "🎉", true),
            react(BOB, 113, "🎉", false),
        ] {
            apply(&store, &reaction).unwrap();
        }
        let reactions = view(&store, theirs).reactions;
        assert_eq!(
            reactions,
            BTreeMap::from([("👍".to_string(), BTreeSet::from([key(OWN_ID), key(BOB)]))]),
            "taken back, and the older add arriving late does not undo that"
        );
    }

    #[test]
    fn a_reply_shows_its_target_and_needs_none_stored() {
        let (_dir, store) = chat_store();
        let theirs = received(&store, BOB, "text", b"when?", 100);
        let body = chat::Reply {
            id: theirs,
            text: "at 8".into(),
        };
        let reply = sent(
            &store,
            chat::REPLY_CONTENT_TYPE,
            &body.encode().unwrap(),
            101,
        );
        let replying = change(OWN_ID, 101, ChatContent::Reply(body));
        assert!(
            !apply(&store, &replying).unwrap(),
            "a reply changes nothing"
        );
        let shown = view(&store, reply);
        assert_eq!(
            (shown.text.as_deref(), shown.reply_to),
            (Some("at 8"), Some(theirs))
        );
        let orphan = change(
            OWN_ID,
            102,
            ChatContent::Reply(chat::Reply {
                id: MessageId::random(),
                text: "?".into(),
            }),
        );
        assert!(!apply(&store, &orphan).unwrap());
        let views = store.messages(&key(BOB)).unwrap();
        assert_eq!(views.len(), 2);
    }

    #[test]
    fn receipts_mark_own_messages_delivered_and_read_and_sync_read_state() {
        let (_dir, store) = chat_store();
        let one = sent(&store, "text", b"one", 100);
        let two = sent(&store, "text", b"two", 101);
        let theirs = received(&store, BOB, "text", b"three", 102);
        let receipt = |kind, ids: &[MessageId]| {
            ChatContent::Receipt(chat::Receipt {
                kind,
                ids: ids.iter().copied().collect(),
            })
        };
        assert!(
            apply(
                &store,
                &change(BOB, 110, receipt(ReceiptKind::Delivered, &[one, two]))
            )
            .unwrap()
        );
        assert!(
            apply(
                &store,
                &change(BOB, 111, receipt(ReceiptKind::Read, &[one]))
            )
            .unwrap()
        );
        let (one_view, two_view) = (view(&store, one), view(&store, two));
        assert_eq!((one_view.delivered, one_view.read), (true, true));
        assert_eq!((two_view.delivered, two_view.read), (true, false));
        // Ids not stored (expired, say) are passed over; none stored is refused.
        let gone = MessageId::random();
        assert!(
            apply(
                &store,
                &change(BOB, 112, receipt(ReceiptKind::Read, &[two, gone]))
            )
            .unwrap()
        );
        assert!(view(&store, two).read);
        assert_eq!(
            refusal(apply(
                &store,
                &change(BOB, 113, receipt(ReceiptKind::Read, &[gone]))
            )),
            "not_in_conversation"
        );
        // A receipt from the message's own sender is refused, whole.
        assert_eq!(
            refusal(apply(
                &store,
                &change(BOB, 114, receipt(ReceiptKind::Read, &[one, theirs]))
            )),
            "receipt_from_sender"
        );
        // Another own device read bob's message; its `delivered` means nothing.
        assert_eq!(store.conversations().unwrap()[0].unread, 1);
        assert!(
            !apply(
                &store,
                &change(OWN_ID, 115, receipt(ReceiptKind::Delivered, &[theirs]))
            )
            .unwrap()
        );
        assert!(
            apply(
                &store,
                &change(OWN_ID, 116, receipt(ReceiptKind::Read, &[theirs]))
            )
            .unwrap()
        );
        assert!(view(&store, theirs).read);
        assert_eq!(store.conversations().unwrap()[0].unread, 0);
    }

    #[test]
    fn marking_a_conversation_read_counts_unread_apart_from_unshown() {
        let (_dir, store) = chat_store();
        let first = received(&store, BOB, "text", b"one", 100);
        let second = received(&store, BOB, "text", b"two", 101);
        received(&store, BOB, chat::RECEIPT_CONTENT_TYPE, b"{}", 102);
        sent(&store, "text", b"mine", 103);
        received(&store, 3, "text", b"carol", 104);
        let unread = |peer: u8| {
            store
                .conversations()
                .unwrap()
                .into_iter()
                .find(|conversation| conversation.peer == key(peer))
                .unwrap()
        };
        let bob = unread(BOB);
        assert_eq!(
            (bob.unread, bob.unshown, bob.messages),
            (2, 3, 3),
            "the receipt is unshown but no message (to read or to count); the own one is not unread"
        );
        assert!(!view(&store, first).read);
        assert_eq!(store.mark_read(&key(BOB)).unwrap(), [first, second]);
        assert_eq!(store.mark_read(&key(BOB)).unwrap(), Vec::<MessageId>::new());
        let bob = unread(BOB);
        assert_eq!(
            (bob.unread, bob.unshown),
            (0, 3),
            "shown is the CLI's, read the person's"
        );
        assert!(view(&store, first).read);
        assert_eq!(unread(3).unread, 1, "other conversations untouched");
        let third = received(&store, BOB, "text", b"three", 105);
        assert_eq!(unread(BOB).unread, 1);
        assert!(!view(&store, third).read);
    }

    #[test]
    fn a_timer_makes_later_messages_disappear_everywhere_in_the_store() {
        let (_dir, store) = chat_store();
        assert_eq!(store.timer(&key(BOB)).unwrap(), Timer { seconds: 0 });
        let before = received(&store, BOB, "text", b"kept forever", 100);
        let timer = change(OWN_ID, 200, ChatContent::Timer(Timer { seconds: 60 }));
        assert!(apply(&store, &timer).unwrap());
        assert!(!apply(&store, &timer).unwrap(), "once");
        assert_eq!(store.timer(&key(BOB)).unwrap(), Timer { seconds: 60 });
        let theirs = received(&store, BOB, "text", b"vanishing words", 200);
        let offer = sent(
            &store,
            FILE_OFFER_CONTENT_TYPE,
            b"{\"name\":\"v.txt\"}",
            230,
        );
        let late = received(&store, BOB, "text", b"vanishing later", 300);
        // bob turns it off at 400 (a setting at the same time with a smaller id loses).
        store
            .set_timer(
                &key(BOB),
                400,
                MessageId::from_bytes([9; 16]),
                Timer { seconds: 0 },
            )
            .unwrap();
        store
            .set_timer(
                &key(BOB),
                400,
                MessageId::from_bytes([1; 16]),
                Timer { seconds: 5 },
            )
            .unwrap();
        let after = received(&store, BOB, "text", b"after the timer", 400);
        assert_eq!(store.timer(&key(BOB)).unwrap(), Timer { seconds: 0 });
        assert_eq!(view(&store, theirs).expires_at, Some(260));
        assert_eq!(
            (
                view(&store, before).expires_at,
                view(&store, after).expires_at
            ),
            (None, None)
        );
        assert_eq!(
            store
                .set_timer(&key(BOB), 1, MessageId::random(), Timer { seconds: u32::MAX })
                .map_err(|err| err.to_string()),
            Err("the change was not applied: a timer of 4294967295 seconds; the limit is 31536000 (a year)".into())
        );

        assert_eq!(store.purge_expired(259).unwrap(), 0);
        assert_eq!(
            store.purge_expired(290).unwrap(),
            2,
            "the text and the offer"
        );
        assert_eq!(store.search("vanishing").unwrap().len(), 1);
        assert!(store.offers().unwrap().is_empty());
        assert_eq!(store.message(&key(BOB), &theirs).unwrap(), None);
        assert!(
            store.is_seen(&theirs).unwrap(),
            "a redelivery stays dropped"
        );
        let mut again = message(BOB, OWN_ID, "vanishing words");
        again.id = theirs;
        assert!(!store.record_incoming(&again, 500).unwrap());
        assert_eq!(store.purge_expired(10_000).unwrap(), 1);
        assert!(store.message(&key(BOB), &late).unwrap().is_none());
        let left: Vec<MessageId> = store
            .history(&key(BOB))
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(left, [before, after]);
        assert!(
            store
                .unshown()
                .unwrap()
                .iter()
                .all(|(_, m)| m.id != theirs && m.id != late),
            "no unshown mark left pointing at nothing"
        );
        let _ = offer;
    }

    #[test]
    fn a_store_from_before_chat_state_opens_with_every_message_and_shown_ones_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::open(&path).unwrap();
        let shown = received(&store, BOB, "text", b"shown", 100);
        let unshown_one = received(&store, BOB, "text", b"not shown", 101);
        let mine = sent(&store, "text", b"mine", 102);
        let carol = received(&store, 3, "text", b"carol", 103);
        let order = store
            .unshown()
            .unwrap()
            .into_iter()
            .find(|(_, message)| message.id == shown)
            .unwrap()
            .0;
        store.mark_shown(&[order]).unwrap();
        let carol_order = store.unshown().unwrap().last().unwrap().0;
        store.mark_shown(&[carol_order]).unwrap();
        drop(store);
        // What the previous version wrote: the same tables without the chat ones.
        {
            let database = Database::create(&path).unwrap();
            let tx = database.begin_write().unwrap();
            assert!(tx.delete_table(CHAT_STATE).unwrap());
            assert!(tx.delete_table(TIMERS).unwrap());
            assert!(tx.delete_table(READ_UPTO).unwrap());
            tx.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let ids: Vec<MessageId> = store
            .history(&key(BOB))
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, [shown, unshown_one, mine]);
        assert_eq!(store.history(&key(3)).unwrap()[0].id, carol);
        let conversations = store.conversations().unwrap();
        let bob = conversations.iter().find(|c| c.peer == key(BOB)).unwrap();
        assert_eq!((bob.messages, bob.unshown, bob.unread), (3, 1, 1));
        let carol_conversation = conversations.iter().find(|c| c.peer == key(3)).unwrap();
        assert_eq!(carol_conversation.unread, 0, "shown: read");
        assert!(view(&store, shown).read && !view(&store, unshown_one).read);
        // Reopening again keeps the read state (the upgrade runs once).
        store.mark_read(&key(BOB)).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert!(view(&store, unshown_one).read);
        assert!(apply(&store, &change(OWN_ID, 200, edit(mine, "mine!"))).unwrap());
    }

    #[test]
    fn the_latest_profile_wins_whatever_order_it_arrives_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        let alice = kez_core::SecretKey::from_seed(&[7; 32]).public_key();
        assert_eq!(store.profile(&alice).unwrap(), None);
        let named = |name: &str| chat::Profile {
            display_name: name.into(),
            avatar: None,
        };
        let later = MessageId::from_bytes([2; 16]);
        let earlier = MessageId::from_bytes([1; 16]);
        assert!(
            store
                .set_profile(&alice, 200, later, &named("Alice L."))
                .unwrap()
        );
        assert!(
            !store
                .set_profile(&alice, 100, earlier, &named("Old Alice"))
                .unwrap()
        );
        assert_eq!(
            store.profile(&alice).unwrap(),
            Some((named("Alice L."), 200))
        );
        let bad = named(" padded");
        assert!(
            store
                .set_profile(&alice, 300, MessageId::from_bytes([3; 16]), &bad)
                .is_err()
        );
        drop(store);
        let store = Store::open(dir.path().join("store.redb")).unwrap();
        assert_eq!(store.profile(&alice).unwrap().unwrap().0, named("Alice L."));
    }

    /// A bounce of message `id` for bob's device (key 2) on `domain`.
    fn bounce_for(id: MessageId, domain: &str, time: u64) -> ReceivedBounce {
        ReceivedBounce {
            envelope: MessageId::random(),
            time,
            bounce: Bounce {
                id: id.to_string(),
                to: key(2),
                domain: domain.into(),
                reason: "unknown_recipient".into(),
                message: "no such user".into(),
                queued_at: time - 5,
            },
        }
    }

    #[test]
    fn a_bounce_is_recorded_on_the_sent_message_once_and_never_as_a_message() {
        let (_dir, store) = chat_store();
        let (bob, _) = store
            .pin("@bob@b.test", &verified(&links(2, &["a"])), 10)
            .unwrap();
        let sent = crate::Sent {
            id: MessageId::random(),
            from: key(1),
            to: bob.key,
            time: 100,
            content_type: "text".into(),
            body: b"hello".to_vec(),
            stream_sequence: 7,
            missed: Vec::new(),
        };
        store.record_outgoing(&sent, 100).unwrap();
        let bounce = bounce_for(sent.id, "b.test", 200);
        let floor = InboxFloor { seq: 3, time: 9 };
        let others = [
            // Another domain than the contact's, a message never sent, a device of nobody.
            bounce_for(sent.id, "c.test", 201),
            bounce_for(MessageId::random(), "b.test", 202),
            ReceivedBounce {
                bounce: Bounce {
                    to: key(5),
                    ..bounce.bounce.clone()
                },
                ..bounce_for(sent.id, "b.test", 203)
            },
        ];
        let fresh = store
            .record_fetched(&[], &[], &[bounce.clone(), bounce.clone()], floor, 300)
            .unwrap();
        assert!(fresh.is_empty());
        store.record_fetched(&[], &[], &others, floor, 301).unwrap();
        assert_eq!(store.inbox_floor().unwrap(), floor);
        assert!(store.is_seen(&bounce.envelope).unwrap());

        let views = store.messages(&bob.key).unwrap();
        assert_eq!(views.len(), 1, "the bounce is no message");
        let expected = Undelivered {
            device: key(2),
            domain: "b.test".into(),
            reason: "unknown_recipient".into(),
            message: "no such user".into(),
            queued_at: 195,
            time: 200,
        };
        assert_eq!(views[0].undelivered, std::slice::from_ref(&expected));
        assert!(store.unshown().unwrap().is_empty());

        let notes = store.unshown_undelivered().unwrap();
        assert_eq!(
            notes,
            [UndeliveredNote {
                peer: bob.key,
                id: sent.id,
                undelivered: expected.clone(),
            }]
        );
        store.mark_undelivered_shown(&notes).unwrap();
        assert!(store.unshown_undelivered().unwrap().is_empty());
        // The same device bounced again (a bounce sealed anew): noted once.
        store
            .record_fetched(&[], &[], &[bounce_for(sent.id, "b.test", 400)], floor, 400)
            .unwrap();
        assert_eq!(
            store
                .message(&bob.key, &sent.id)
                .unwrap()
                .unwrap()
                .undelivered,
            [expected]
        );
        assert!(store.unshown_undelivered().unwrap().is_empty());
    }

    #[test]
    fn the_origin_of_a_signer_is_remembered_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::open(&path).unwrap();
        let local = message(3, 1, "local");
        let remote = message(4, 1, "from b");
        let fresh = store
            .record_fetched(
                &[(local, 1), (remote, 2)],
                &[None, Some("b.test".into())],
                &[],
                InboxFloor { seq: 2, time: 5 },
                10,
            )
            .unwrap();
        assert_eq!(fresh, [true, true]);
        assert_eq!(store.origin(&key(3)).unwrap(), None);
        assert_eq!(store.origin(&key(4)).unwrap().as_deref(), Some("b.test"));
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.origin(&key(4)).unwrap().as_deref(), Some("b.test"));
        assert_eq!(store.history(&key(4)).unwrap()[0].body, b"from b");
    }

    #[test]
    fn a_store_from_before_federation_opens_and_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::open(&path).unwrap();
        let kept = received(&store, BOB, "text", b"kept", 100);
        let mine = sent(&store, "text", b"mine", 101);
        drop(store);
        // What the previous version wrote: the same tables without the federation ones.
        {
            let database = Database::create(&path).unwrap();
            let tx = database.begin_write().unwrap();
            assert!(tx.delete_table(ORIGINS).unwrap());
            assert!(tx.delete_table(UNDELIVERED).unwrap());
            assert!(tx.delete_table(UNSHOWN_UNDELIVERED).unwrap());
            tx.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let ids: Vec<MessageId> = store
            .history(&key(BOB))
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, [kept, mine]);
        assert_eq!(store.origin(&key(BOB)).unwrap(), None);
        assert!(store.unshown_undelivered().unwrap().is_empty());
        assert!(view(&store, mine).undelivered.is_empty());
        let later = message(BOB, OWN_ID, "later");
        store
            .record_fetched(
                &[(later, 4)],
                &[Some("b.test".into())],
                &[],
                InboxFloor { seq: 4, time: 6 },
                102,
            )
            .unwrap();
        assert_eq!(store.origin(&key(BOB)).unwrap().as_deref(), Some("b.test"));
    }

    #[test]
    fn a_file_key_is_kept_with_its_message_and_an_old_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::open(&path).unwrap();
        drop(store);
        // What the previous version wrote: the same tables without the wraps.
        {
            let database = Database::create(&path).unwrap();
            let tx = database.begin_write().unwrap();
            assert!(tx.delete_table(FILE_WRAPS).unwrap());
            tx.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        store
            .pin("@bob@kez.test", &verified(&links(BOB, &["a"])), 10)
            .unwrap();
        let blob = BlobHash::from_bytes([7; 32]);
        assert_eq!(store.file_wrap(&key(BOB), &blob).unwrap(), None);
        let body = |wrap: u8| {
            FileKey {
                blob,
                wrap: ContentKey::from_bytes([wrap; 32]),
            }
            .encode()
            .to_vec()
        };
        let file_key = |from: u8, wrap: u8| {
            let mut message = message(from, OWN_ID, "");
            message.content_type = FILE_KEY_CONTENT_TYPE.into();
            message.body = body(wrap);
            message
        };
        // The message and its wrap are stored by the one transaction that moves the floor.
        let from_bob = file_key(BOB, 1);
        let from_stranger = file_key(9, 2);
        let fresh = store
            .record_incoming_all(
                &[(from_bob.clone(), 1), (from_stranger.clone(), 2)],
                InboxFloor { seq: 2, time: 5 },
                100,
            )
            .unwrap();
        assert_eq!(fresh, [true, true]);
        assert!(store.is_seen(&from_bob.id).unwrap());
        assert_eq!(store.inbox_floor().unwrap(), InboxFloor { seq: 2, time: 5 });
        assert_eq!(
            store.file_wrap(&key(BOB), &blob).unwrap(),
            Some(ContentKey::from_bytes([1; 32]))
        );
        assert_eq!(
            store.file_wrap(&key(9), &blob).unwrap(),
            None,
            "a stranger sets no wrap"
        );
        // Not a message a person sees; a redelivery changes nothing, a later key replaces.
        assert!(
            store
                .history(&key(BOB))
                .unwrap()
                .iter()
                .all(|m| !chat::is_message(&m.content_type))
        );
        let mut replay = file_key(BOB, 3);
        replay.id = from_bob.id;
        assert!(!store.record_incoming(&replay, 101).unwrap());
        assert_eq!(
            store.file_wrap(&key(BOB), &blob).unwrap(),
            Some(ContentKey::from_bytes([1; 32]))
        );
        assert!(store.record_incoming(&file_key(BOB, 4), 102).unwrap());
        assert_eq!(
            store.file_wrap(&key(BOB), &blob).unwrap(),
            Some(ContentKey::from_bytes([4; 32]))
        );
        // A malformed one is recorded as a message, and sets nothing.
        let mut bad = file_key(BOB, 5);
        bad.body = b"{}".to_vec();
        assert!(store.record_incoming(&bad, 103).unwrap());
        assert_eq!(
            store.file_wrap(&key(BOB), &blob).unwrap(),
            Some(ContentKey::from_bytes([4; 32]))
        );
    }
}
