//! Forward secrecy in the store (PROTOCOL.md §15.4): the device's Olm account and its
//! sessions with other devices, kept as encrypted pickles, and the messages that did not
//! decrypt.
//!
//! The store is the only keeper of Olm state, and every change to it is made inside the redb
//! write transaction that also records what it produced: a session is saved in the transaction
//! that stores the message it decrypted (with its seen id and the inbox floor), and a sending
//! session in the transaction that seals with it, before the envelope leaves. redb admits one
//! write transaction at a time, so two sends cannot use one ratchet step twice, and a crash
//! before the commit leaves the session as it was for the redelivery. One process holds the
//! store (its file lock): the home's service, which so owns the sessions.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use kez_core::chat::Resend;
use kez_core::envelope::{self, Message, MessageId, OlmEnvelope};
use kez_core::olm::{OlmAccount, OlmMessage, OlmSession};
use kez_core::prekey::{OlmKey, SignedPrekey};
use kez_core::{PublicKey, SecretKey};
use redb::{Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    CONTACTS, Direction, InboxFloor, MESSAGES, META, ReceivedBounce, SEEN, Store, StoreError,
    StoredMessage, UNSHOWN, corrupt, db, own_in, read_contact, record_batch_in,
};

/// The Olm account's encrypted pickle, under [`ACCOUNT`].
const OLM_ACCOUNT: TableDefinition<&str, &str> = TableDefinition::new("olm_account");
const ACCOUNT: &str = "account";
/// (peer device key, session id) → JSON [`SessionRecord`].
const OLM_SESSIONS: TableDefinition<([u8; 32], &str), &[u8]> = TableDefinition::new("olm_sessions");
/// message id → JSON [`Placeholder`]: a message that did not decrypt, shown as such until a
/// copy sent again replaces it.
const UNDECRYPTABLE: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("undecryptable");
/// (device, message id) → how often the message was sealed again for that device.
const RESENT: TableDefinition<([u8; 32], [u8; 16]), u64> = TableDefinition::new("resent");
/// [`META`] entry: the last value of the session use counter ([`SessionRecord::used`]).
const SESSION_USES: &str = "olm_session_uses";

/// [`META`] entry written by the durable commit of [`Store::make_durable`].
const FLUSHED: &str = "olm_flushed";

/// Group commit of sending sessions: [`Store::seal_olm`] commits without a disk sync and
/// hands out a ticket; [`Store::make_durable`] syncs once for every ticket handed out before
/// it (a later durable commit persists every earlier one, redb's `Durability::None`), so
/// pipelined sends share one sync instead of one each.
#[derive(Default)]
pub(super) struct Flush {
    /// The newest ticket handed out.
    sealed: AtomicU64,
    /// Every ticket up to this one is on disk.
    durable: AtomicU64,
    /// Held by the one thread syncing.
    syncing: Mutex<()>,
}

/// One target's envelope from [`Store::seal_olm`], or why there is none.
pub type SealedFor = Result<Vec<u8>, String>;

/// What [`Store::seal_olm`] sealed must be on disk before its envelopes leave: pass this to
/// [`Store::make_durable`] first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "the sessions must be made durable before the envelopes leave"]
pub struct SealTicket(u64);

/// The content type of the placeholder stored for a message that did not decrypt. It cannot
/// come from a peer: `!` is not a content type character (PROTOCOL.md §8.1).
pub const UNDECRYPTABLE_CONTENT_TYPE: &str = "!undecryptable";
/// Sessions kept per peer device: the newest few, so a message sealed with a session the peer
/// replaced a moment ago still opens.
const SESSIONS_PER_DEVICE: usize = 4;
/// How often one message is sealed again for one device on its requests.
const MAX_RESENDS: u64 = 2;

/// One Olm session with a peer device.
#[derive(Serialize, Deserialize)]
struct SessionRecord {
    /// The peer's Olm identity key: a session is used only while the peer's chain binds it.
    their_identity: OlmKey,
    /// The encrypted pickle.
    pickle: String,
    /// When it was last used or made, as a counter: the newest is the one sealed with.
    used: u64,
}

/// Where the placeholder of a message that did not decrypt is, and who sent it.
#[derive(Serialize, Deserialize)]
struct Placeholder {
    conversation: String,
    order: u64,
    device: PublicKey,
}

/// A device to seal a forward-secret message to: its Olm identity key (from its verified
/// chain) and, when a new session is to be made, the prekey claimed for it (checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OlmTarget {
    /// The device key.
    pub device: PublicKey,
    /// Its Olm identity key, as its chain binds it.
    pub identity: OlmKey,
    /// A claimed prekey: start a new session with it (and seal with that one) instead of
    /// using the newest session.
    pub prekey: Option<OlmKey>,
}

/// New prekeys to publish ([`Store::new_prekeys`]), already kept in the stored account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prekeys {
    /// The account's identity key.
    pub identity: OlmKey,
    /// New one-time keys, signed.
    pub one_time: Vec<SignedPrekey>,
    /// A new fallback key, signed, when one was asked for.
    pub fallback: Option<SignedPrekey>,
}

/// A fetched envelope after the stateless layer ([`envelope::open_outer`]), with its inbox
/// sequence and origin: what [`Store::record_fetched_olm`] stores.
#[derive(Debug, Clone)]
pub enum Received {
    /// A version 1 envelope, opened.
    Sealed(Message),
    /// A version 2 envelope: its Olm message is decrypted in the storing transaction.
    Olm(OlmEnvelope),
}

/// What [`Store::record_fetched_olm`] did with a batch.
#[derive(Debug, Default)]
pub struct RecordedBatch {
    /// The messages stored now (not seen before), in inbox order, with their origin.
    pub fresh: Vec<Message>,
    /// The messages that did not decrypt (stored as placeholders), by sending device.
    pub undecryptable: HashMap<PublicKey, BTreeSet<MessageId>>,
    /// Whether a pre-key message used one of the own one-time keys (time to publish more).
    pub used_prekeys: bool,
    /// Duplicates dropped by their id before any decryption.
    pub duplicates: usize,
}

pub(super) fn create_tables(database: &redb::Database) -> Result<(), StoreError> {
    let tx = database.begin_write().map_err(db)?;
    tx.open_table(OLM_ACCOUNT).map_err(db)?;
    tx.open_table(OLM_SESSIONS).map_err(db)?;
    tx.open_table(UNDECRYPTABLE).map_err(db)?;
    tx.open_table(RESENT).map_err(db)?;
    tx.commit().map_err(db)
}

fn olm_failure(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {err}"))
}

fn read_account(
    tx: &redb::WriteTransaction,
    key: &SecretKey,
) -> Result<Option<OlmAccount>, StoreError> {
    let table = tx.open_table(OLM_ACCOUNT).map_err(db)?;
    let Some(pickle) = table.get(ACCOUNT).map_err(db)? else {
        return Ok(None);
    };
    OlmAccount::from_pickle(pickle.value(), key)
        .map(Some)
        .map_err(|err| olm_failure("the Olm account does not open with this home's key", err))
}

/// The account, read the first time an operation needs it: unpickling it recomputes the
/// public key of every one-time key it holds (milliseconds), which most messages do not need.
struct LazyAccount<'a> {
    tx: &'a redb::WriteTransaction,
    key: &'a SecretKey,
    read: Option<Option<OlmAccount>>,
}

impl<'a> LazyAccount<'a> {
    fn new(tx: &'a redb::WriteTransaction, key: &'a SecretKey) -> Self {
        LazyAccount {
            tx,
            key,
            read: None,
        }
    }

    /// The account, `None` when this home has none.
    fn get(&mut self) -> Result<Option<&mut OlmAccount>, StoreError> {
        if self.read.is_none() {
            self.read = Some(read_account(self.tx, self.key)?);
        }
        Ok(self.read.as_mut().and_then(Option::as_mut))
    }

    /// The account if it was read (and so may have changed).
    fn loaded(&self) -> Option<&OlmAccount> {
        self.read.as_ref().and_then(Option::as_ref)
    }
}

fn write_account(
    tx: &redb::WriteTransaction,
    key: &SecretKey,
    account: &OlmAccount,
) -> Result<(), StoreError> {
    let mut table = tx.open_table(OLM_ACCOUNT).map_err(db)?;
    table
        .insert(ACCOUNT, account.pickle(key).as_str())
        .map_err(db)?;
    Ok(())
}

fn next_use(tx: &redb::WriteTransaction) -> Result<u64, StoreError> {
    let mut meta = tx.open_table(META).map_err(db)?;
    let used = meta
        .get(SESSION_USES)
        .map_err(db)?
        .map_or(0, |guard| guard.value())
        + 1;
    meta.insert(SESSION_USES, used).map_err(db)?;
    Ok(used)
}

/// The sessions with `device`, newest first, with their ids.
fn sessions_of(
    tx: &redb::WriteTransaction,
    device: &PublicKey,
) -> Result<Vec<(String, SessionRecord)>, StoreError> {
    let table = tx.open_table(OLM_SESSIONS).map_err(db)?;
    let device = *device.as_bytes();
    let mut sessions = Vec::new();
    for entry in table.range((device, "")..).map_err(db)? {
        let (key, value) = entry.map_err(db)?;
        let (peer, id) = key.value();
        if peer != device {
            break;
        }
        let record: SessionRecord = serde_json::from_slice(value.value()).map_err(corrupt)?;
        sessions.push((id.to_owned(), record));
    }
    sessions.sort_by_key(|(_, record)| std::cmp::Reverse(record.used));
    Ok(sessions)
}

/// Saves `session` with `device` as used now, and drops the oldest beyond
/// [`SESSIONS_PER_DEVICE`].
fn save_session(
    tx: &redb::WriteTransaction,
    key: &SecretKey,
    device: &PublicKey,
    their_identity: OlmKey,
    session: &OlmSession,
) -> Result<(), StoreError> {
    let record = SessionRecord {
        their_identity,
        pickle: session.pickle(key),
        used: next_use(tx)?,
    };
    let id = session.session_id();
    {
        let mut table = tx.open_table(OLM_SESSIONS).map_err(db)?;
        let json = serde_json::to_vec(&record).expect("a session record serialises");
        table
            .insert((*device.as_bytes(), id.as_str()), json.as_slice())
            .map_err(db)?;
    }
    let sessions = sessions_of(tx, device)?;
    if sessions.len() > SESSIONS_PER_DEVICE {
        let mut table = tx.open_table(OLM_SESSIONS).map_err(db)?;
        for (old, _) in &sessions[SESSIONS_PER_DEVICE..] {
            table
                .remove((*device.as_bytes(), old.as_str()))
                .map_err(db)?;
        }
    }
    Ok(())
}

/// Every device's bound Olm identity key, from the own pin and the contacts.
fn bound_olm_keys(tx: &redb::WriteTransaction) -> Result<HashMap<PublicKey, OlmKey>, StoreError> {
    let mut keys = HashMap::new();
    if let Some(own) = own_in(tx)? {
        keys.extend(own.olm_keys);
    }
    let contacts = tx.open_table(CONTACTS).map_err(db)?;
    for entry in contacts.iter().map_err(db)? {
        let (handle, _) = entry.map_err(db)?;
        if let Some(contact) = read_contact(&contacts, handle.value())? {
            keys.extend(contact.olm_keys);
        }
    }
    Ok(keys)
}

/// Why an Olm message from a device did not decrypt, or `Ok` with the plaintext (the session
/// is saved by the caller only once the inside checked out).
enum Decrypted {
    Opened {
        plaintext: zeroize::Zeroizing<Vec<u8>>,
        session: Box<OlmSession>,
        their_identity: OlmKey,
        new_inbound: bool,
    },
    Failed(String),
}

fn decrypt(
    tx: &redb::WriteTransaction,
    account: &mut LazyAccount<'_>,
    key: &SecretKey,
    outer: &OlmEnvelope,
    bound: Option<OlmKey>,
) -> Result<Decrypted, StoreError> {
    let sessions = sessions_of(tx, &outer.sender)?;
    for (_, record) in &sessions {
        let mut session = OlmSession::from_pickle(&record.pickle, key)
            .map_err(|err| olm_failure("a stored Olm session does not open", err))?;
        if outer.message.is_pre_key() && !session.matches(&outer.message) {
            continue;
        }
        if let Ok(plaintext) = session.decrypt(&outer.message) {
            return Ok(Decrypted::Opened {
                plaintext,
                session: Box::new(session),
                their_identity: record.their_identity,
                new_inbound: false,
            });
        }
    }
    let OlmMessage::PreKey(_) = &outer.message else {
        return Ok(Decrypted::Failed(
            "no session with the sending device opens it".into(),
        ));
    };
    let Some(claimed) = outer.message.sender_identity() else {
        return Ok(Decrypted::Failed(
            "the pre-key message names no sender".into(),
        ));
    };
    if bound.is_some_and(|bound| bound != claimed) {
        return Ok(Decrypted::Failed(
            "the sending device's Olm key is not the one its chain binds".into(),
        ));
    }
    let Some(account) = account.get()? else {
        return Ok(Decrypted::Failed("this device has no Olm account".into()));
    };
    match account.create_inbound(&claimed, &outer.message) {
        Ok((session, plaintext)) => Ok(Decrypted::Opened {
            plaintext,
            session: Box::new(session),
            their_identity: claimed,
            new_inbound: true,
        }),
        Err(err) => Ok(Decrypted::Failed(err.to_string())),
    }
}

impl Store {
    /// The Olm account's identity key, the account made and stored first if this home has
    /// none.
    pub fn olm_identity(&self, key: &SecretKey) -> Result<OlmKey, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let identity = match read_account(&tx, key)? {
            Some(account) => account.identity_key(),
            None => {
                let account = OlmAccount::new();
                write_account(&tx, key, &account)?;
                account.identity_key()
            }
        };
        tx.commit().map_err(db)?;
        Ok(identity)
    }

    /// Makes `one_time` new one-time keys (and a new fallback key when `fallback`), stores
    /// the account with their secrets, and answers them signed, to publish: stored before
    /// published, so no published key is ever lost.
    pub fn new_prekeys(
        &self,
        key: &SecretKey,
        one_time: usize,
        fallback: bool,
    ) -> Result<Prekeys, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let mut account = read_account(&tx, key)?.unwrap_or_else(OlmAccount::new);
        let one_time = account.generate_one_time_keys(one_time, key);
        let fallback = fallback.then(|| account.generate_fallback_key(key));
        write_account(&tx, key, &account)?;
        tx.commit().map_err(db)?;
        Ok(Prekeys {
            identity: account.identity_key(),
            one_time,
            fallback,
        })
    }

    /// Which of `targets` (device, its bound Olm identity key) have no session to seal with.
    pub fn without_session(
        &self,
        targets: &[(PublicKey, OlmKey)],
    ) -> Result<Vec<PublicKey>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(OLM_SESSIONS).map_err(db)?;
        let mut missing = Vec::new();
        for (device, identity) in targets {
            let bytes = *device.as_bytes();
            let mut found = false;
            for entry in table.range((bytes, "")..).map_err(db)? {
                let (entry_key, value) = entry.map_err(db)?;
                if entry_key.value().0 != bytes {
                    break;
                }
                let record: SessionRecord =
                    serde_json::from_slice(value.value()).map_err(corrupt)?;
                if record.their_identity == *identity {
                    found = true;
                    break;
                }
            }
            if !found {
                missing.push(*device);
            }
        }
        Ok(missing)
    }

    /// Seals one message (`id`, `time`) for each of `targets` with Olm (envelope version 2),
    /// all in one transaction that saves the sessions: the newest session with the device's
    /// bound key, or a new one from the claimed prekey. A target without either gets its
    /// reason. The transaction is committed without a disk sync: call
    /// [`Store::make_durable`] with the ticket before any envelope leaves, so that a crash can
    /// never make a session seal two messages with one ratchet step.
    #[allow(clippy::too_many_arguments)]
    pub fn seal_olm(
        &self,
        key: &SecretKey,
        targets: &[OlmTarget],
        content_type: &str,
        body: &[u8],
        time: u64,
        id: MessageId,
    ) -> Result<(Vec<SealedFor>, SealTicket), StoreError> {
        let mut tx = self.db.begin_write().map_err(db)?;
        tx.set_durability(Durability::None);
        let mut account = LazyAccount::new(&tx, key);
        let mut sealed = Vec::with_capacity(targets.len());
        for target in targets {
            let session: Result<OlmSession, String> = match target.prekey {
                Some(prekey) => match account.get()? {
                    Some(account) => account
                        .create_outbound(&target.identity, &prekey)
                        .map_err(|err| err.to_string()),
                    None => Err("this device has no Olm account".to_owned()),
                },
                None => {
                    let newest = sessions_of(&tx, &target.device)?
                        .into_iter()
                        .find(|(_, record)| record.their_identity == target.identity);
                    match newest {
                        Some((_, record)) => Ok(OlmSession::from_pickle(&record.pickle, key)
                            .map_err(|err| {
                                olm_failure("a stored Olm session does not open", err)
                            })?),
                        None => Err("no session with this device yet".to_owned()),
                    }
                }
            };
            let result = match session {
                Ok(mut session) => {
                    let envelope = envelope::seal_olm(
                        key,
                        &target.device,
                        &mut session,
                        content_type,
                        body,
                        time,
                        id,
                    )
                    .map_err(|err| err.to_string());
                    if envelope.is_ok() {
                        save_session(&tx, key, &target.device, target.identity, &session)?;
                    }
                    envelope
                }
                Err(reason) => Err(reason),
            };
            sealed.push(result);
        }
        tx.commit().map_err(db)?;
        // Numbered after the commit: a sync that sees this number starts after it.
        let ticket = self.flush.sealed.fetch_add(1, Ordering::SeqCst) + 1;
        Ok((sealed, SealTicket(ticket)))
    }

    /// Makes what [`Store::seal_olm`] committed with `ticket` durable, with one disk sync for
    /// every ticket handed out before it; returns at once when another call synced it already.
    /// Blocks: call it off the async workers.
    pub fn make_durable(&self, ticket: SealTicket) -> Result<(), StoreError> {
        if self.flush.durable.load(Ordering::SeqCst) >= ticket.0 {
            return Ok(());
        }
        let _syncing = self
            .flush
            .syncing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.flush.durable.load(Ordering::SeqCst) >= ticket.0 {
            return Ok(());
        }
        let upto = self.flush.sealed.load(Ordering::SeqCst);
        let tx = self.db.begin_write().map_err(db)?;
        tx.open_table(META)
            .map_err(db)?
            .insert(FLUSHED, upto)
            .map_err(db)?;
        tx.commit().map_err(db)?;
        self.flush.durable.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }

    /// Stores a fetched batch like [`Store::record_fetched`], decrypting its version 2
    /// envelopes in the same transaction (PROTOCOL.md §15.4): an envelope whose id was seen
    /// is dropped before any decryption (unless it replaces a placeholder); a decrypted one
    /// is checked ([`envelope::open_inner`]) and stored with its session; one that does not
    /// decrypt is stored as a placeholder ([`UNDECRYPTABLE_CONTENT_TYPE`]) and named in
    /// [`RecordedBatch::undecryptable`], so its sender can be asked for it again. Sessions,
    /// account, messages, seen ids and the floor move together.
    pub fn record_fetched_olm(
        &self,
        key: &SecretKey,
        batch: Vec<(Received, u64, Option<String>)>,
        bounces: &[ReceivedBounce],
        floor: InboxFloor,
        now: u64,
    ) -> Result<RecordedBatch, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let me = key.public_key();
        let mut account = LazyAccount::new(&tx, key);
        let mut account_changed = false;
        let bound = bound_olm_keys(&tx)?;
        let mut recorded = RecordedBatch::default();
        let mut this_batch = HashSet::new();
        let mut messages = Vec::with_capacity(batch.len());
        let mut origins = Vec::with_capacity(batch.len());
        let mut placeholders = Vec::new();
        for (fetched, seq, origin) in batch {
            let outer = match fetched {
                Received::Sealed(message) => {
                    messages.push((message, seq));
                    origins.push(origin);
                    continue;
                }
                Received::Olm(outer) => outer,
            };
            let replaces = read_placeholder(&tx, &outer.id)?;
            let seen = tx
                .open_table(SEEN)
                .map_err(db)?
                .get(outer.id.as_bytes())
                .map_err(db)?
                .is_some();
            if (seen && replaces.is_none()) || !this_batch.insert(outer.id) {
                recorded.duplicates += 1;
                continue;
            }
            match decrypt(
                &tx,
                &mut account,
                key,
                &outer,
                bound.get(&outer.sender).copied(),
            )? {
                Decrypted::Opened {
                    plaintext,
                    session,
                    their_identity,
                    new_inbound,
                } => match envelope::open_inner(&me, &outer, &plaintext) {
                    Ok(message) => {
                        save_session(&tx, key, &outer.sender, their_identity, &session)?;
                        if new_inbound {
                            account_changed = true;
                            recorded.used_prekeys = true;
                        }
                        if let Some(placeholder) = replaces {
                            drop_placeholder(&tx, &outer.id, &placeholder)?;
                        }
                        messages.push((message, seq));
                        origins.push(origin);
                    }
                    Err(err) => tracing::warn!(
                        code = err.code(),
                        seq,
                        "dropping a forward-secret message whose inside does not check: {err}"
                    ),
                },
                Decrypted::Failed(reason) if replaces.is_none() => {
                    tracing::warn!(
                        id = %outer.id,
                        seq,
                        device = %outer.sender,
                        "a forward-secret message did not decrypt: {reason}"
                    );
                    placeholders.push((outer, seq, reason));
                }
                Decrypted::Failed(reason) => {
                    tracing::info!(id = %outer.id, "a copy sent again did not decrypt either: {reason}");
                }
            }
        }
        if account_changed && let Some(account) = account.loaded() {
            write_account(&tx, key, account)?;
        }
        let fresh = record_batch_in(&tx, &messages, &origins, bounces, now)?;
        for (outer, seq, reason) in placeholders {
            let placeholder = StoredMessage {
                id: outer.id,
                from: outer.sender,
                to: me,
                time: now,
                seq,
                stored_at: now,
                content_type: UNDECRYPTABLE_CONTENT_TYPE.to_owned(),
                body: reason.into_bytes(),
                direction: Direction::Incoming,
            };
            if let Some((conversation, order)) = super::record_placed(&tx, &placeholder)? {
                let json = serde_json::to_vec(&Placeholder {
                    conversation,
                    order,
                    device: outer.sender,
                })
                .expect("a placeholder serialises");
                tx.open_table(UNDECRYPTABLE)
                    .map_err(db)?
                    .insert(outer.id.as_bytes(), json.as_slice())
                    .map_err(db)?;
                recorded
                    .undecryptable
                    .entry(outer.sender)
                    .or_default()
                    .insert(outer.id);
            }
        }
        super::write_floor(&tx, floor)?;
        tx.commit().map_err(db)?;
        recorded.fresh = messages
            .into_iter()
            .zip(fresh)
            .filter_map(|((message, _), fresh)| fresh.then_some(message))
            .collect();
        Ok(recorded)
    }

    /// The own sent messages of `request` (from `device`, a verified device of `peer`'s
    /// conversation) to seal again for it: each at most [`MAX_RESENDS`] times per device, and
    /// only messages this device sent. Counts them as resent.
    pub fn take_resends(
        &self,
        me: &PublicKey,
        peer: &PublicKey,
        device: &PublicKey,
        request: &Resend,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let found = {
            let messages = tx.open_table(MESSAGES).map_err(db)?;
            super::find_messages(&messages, &peer.to_hex(), &request.ids)?
        };
        let mut out = Vec::new();
        {
            let mut resent = tx.open_table(RESENT).map_err(db)?;
            for (_, (_, message)) in found {
                if message.direction != Direction::Outgoing || message.from != *me {
                    continue;
                }
                let entry = (*device.as_bytes(), *message.id.as_bytes());
                let count = resent.get(entry).map_err(db)?.map_or(0, |c| c.value());
                if count >= MAX_RESENDS {
                    continue;
                }
                resent.insert(entry, count + 1).map_err(db)?;
                out.push(message);
            }
        }
        tx.commit().map_err(db)?;
        out.sort_by_key(|message| (message.time, message.seq));
        Ok(out)
    }

    /// Whether a placeholder stands for message `id` (it did not decrypt, and no copy sent
    /// again replaced it yet).
    pub fn is_undecryptable(&self, id: &MessageId) -> Result<bool, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        Ok(tx
            .open_table(UNDECRYPTABLE)
            .map_err(db)?
            .get(id.as_bytes())
            .map_err(db)?
            .is_some())
    }
}

fn read_placeholder(
    tx: &redb::WriteTransaction,
    id: &MessageId,
) -> Result<Option<Placeholder>, StoreError> {
    let table = tx.open_table(UNDECRYPTABLE).map_err(db)?;
    let Some(value) = table.get(id.as_bytes()).map_err(db)? else {
        return Ok(None);
    };
    serde_json::from_slice(value.value())
        .map(Some)
        .map_err(corrupt)
}

/// Removes the placeholder of `id` (history, unshown mark, seen id), so the decrypted copy is
/// stored in its place as a new message.
fn drop_placeholder(
    tx: &redb::WriteTransaction,
    id: &MessageId,
    placeholder: &Placeholder,
) -> Result<(), StoreError> {
    tx.open_table(MESSAGES)
        .map_err(db)?
        .remove((placeholder.conversation.as_str(), placeholder.order))
        .map_err(db)?;
    tx.open_table(UNSHOWN)
        .map_err(db)?
        .remove(placeholder.order)
        .map_err(db)?;
    tx.open_table(SEEN)
        .map_err(db)?
        .remove(id.as_bytes())
        .map_err(db)?;
    tx.open_table(UNDECRYPTABLE)
        .map_err(db)?
        .remove(id.as_bytes())
        .map_err(db)?;
    Ok(())
}
