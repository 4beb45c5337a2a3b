//! Registry and sigchain state in JetStream key-value buckets. The server keeps nothing else:
//! any number of instances can share one set of buckets.
//!
//! Invariants (ARCHITECTURE.md):
//! - A handle record is only written after its reverse (key → handle) entry, and a reverse entry
//!   is trusted only when the handle record points back at the same key. A crash between the two
//!   writes leaves a stale reverse entry that is ignored; a retry for the same name finishes the
//!   registration, and another name may take it over once it is a minute old. Never a handle
//!   without its reverse entry.
//! - A link is stored with KV `create` under `<chain hex>.<seq>`: exactly one writer wins each
//!   seq, so racing appends cannot fork a chain. The head entry is an index that may lag the
//!   links (a crash, or a failed index update); readers go on past it until the first missing
//!   seq, and move it forward when they find it behind.
//! - The device index maps a key to at most one identity, ever: an entry is claimed (`adding`)
//!   with KV `create` before the link that adds the device is stored, and is then written from
//!   the verified chain state after each append, only by a state at least as far along the chain
//!   as the one that wrote it (its `seq`): an append that finishes late cannot undo a later
//!   revocation. A crash in between leaves a device refused (`adding`), never a revoked one
//!   admitted. A key holding a handle is never a device of another identity, and a device key
//!   never registers a handle.
//! - The directory (PROTOCOL.md §5.7) holds, per handle and per identity key, what a lookup
//!   answers, sealed. It is written after what it is derived from (the handle record, the
//!   stored link) and before the registration or append is answered, and never moved back (a
//!   write that finds a later head keeps it): whoever was answered reads it current. A write
//!   that fails fails the request, whose retry writes it.

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use kez_core::sigchain::{LinkHash, MAX_LINK_BYTES, StateJsonError};
use kez_core::{Handle, PublicKey, Sigchain};
use kez_proto::federation::ORIGIN_HEADER;
use kez_proto::mail::{Fetched, MAX_FETCH_BYTES};
use kez_proto::subjects::{INBOX_SUBJECTS, MAIL_STREAM, NEW_MAIL_DESTINATION, inbox_subject};
use serde::{Deserialize, Serialize};

use kez_proto::ErrorAnswer;
use kez_proto::answer::{ChainHead, HandleRecord, Profile};
use kez_proto::directory::{DIRECTORY_BUCKET, MAX_ENTRY_BYTES, Slot};

/// Bucket: handle name → [`HandleRecord`] (the `kez.registry.register` answer's JSON).
pub const HANDLES_BUCKET: &str = "kez_handles";
/// Bucket: key hex → [`KeyRecord`].
pub const KEYS_BUCKET: &str = "kez_keys";
/// Bucket: `<chain hex>.<seq>` → the link's exact bytes.
pub const LINKS_BUCKET: &str = "kez_chain_links";
/// Bucket: chain hex → [`ChainHead`].
pub const HEADS_BUCKET: &str = "kez_chain_heads";
/// Bucket: chain hex → the verified chain's state (`Sigchain::to_state_json`), kept so that an
/// append verifies one link, not the whole chain.
pub const STATES_BUCKET: &str = "kez_chain_states";
/// Largest kept chain state, in bytes: the state's limits (32 endpoints, 64 claims, 16
/// providers, 64 unknown operations, at most ~1 KiB a field) stay well below it.
const MAX_STATE_BYTES: usize = 512 * 1024;
/// How many link bytes one read of a chain's stored links fetches at a time.
const MAX_CHAIN_BYTES_PER_READ: usize = 1024 * 1024;
/// Bucket: device key hex → [`DeviceRecord`], for every device a verified chain added other
/// than its own chain id's key (the chain id is its own identity, found in [`KEYS_BUCKET`]).
pub const DEVICES_BUCKET: &str = "kez_devices";
/// Bucket: key hex → [`DisabledRecord`], for keys an operator disabled.
pub const DISABLED_BUCKET: &str = "kez_disabled";
/// The directory's marker of a finished [`Store::backfill_directory`]; no entry's id (64 hex
/// digits) is ever this.
const DIRECTORY_BACKFILLED: &str = "kez-backfilled-v1";
/// The key the health check reads: no bucket ever holds it (`-` is in no handle or key hex).
const HEALTH_PROBE_KEY: &str = "kez-health-probe";

/// Most undelivered messages one inbox holds; past it new messages are refused (the sender is
/// told), never old ones dropped.
pub const INBOX_MAX_MESSAGES: i64 = 10_000;
/// How long an undelivered message is kept.
pub const INBOX_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// The previous release's inbox stream (work-queue retention, one consumer per user), which a
/// start moves into [`MAIL_STREAM`] ([`crate::migrate`]); its settings seed the new stream's.
pub const LEGACY_INBOX_STREAM: &str = "KEZ_INBOX";
/// Bytes `KEZ_MAIL` may hold when the operator sets nothing (`--inbox-max-bytes`).
pub const DEFAULT_INBOX_MAX_BYTES: u64 = 4 << 30;
/// Largest stored inbox message: the largest envelope and room for the headers the server adds
/// (`Nats-Msg-Id`): the stream counts headers against its message size limit.
pub const INBOX_MAX_STORED_BYTES: i32 = kez_core::envelope::MAX_ENVELOPE_BYTES as i32 + 1024;
/// Window in which a re-sent message with the same `Nats-Msg-Id` is stored only once.
pub const INBOX_DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(120);

/// Age after which a reverse entry without its handle record is abandoned: well past the
/// handler timeout, so the registration that wrote it has certainly ended.
const STALE_REVERSE_AFTER_SECS: u64 = 60;
/// How many link reads run at once when a chain is loaded.
const PARALLEL_LINK_READS: usize = 16;
/// How often a head update is retried when another instance moved it meanwhile.
const HEAD_UPDATE_ATTEMPTS: usize = 8;
/// How long a head update keeps retrying when JetStream fails (a cluster electing the bucket's
/// new leader after a node died takes a few seconds), well inside the handler timeout.
const HEAD_UPDATE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// The keys bucket's value: which handle a key registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The handle's name.
    pub name: String,
}

/// Why and since when a key is disabled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisabledRecord {
    /// The handle the key held when it was disabled.
    pub handle: Handle,
    /// Server time it was disabled, seconds since the Unix epoch.
    pub since: u64,
}

/// Where a device stands in its identity's verified chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Claimed by an append that has not (yet) stored its link: not a credential.
    Adding,
    /// Active in the chain: a NATS credential of the identity, with an inbox of its own.
    Active,
    /// Revoked in the chain: refused for good.
    Revoked,
}

/// The device index's value: whose device a key is, and whether it is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// The identity (chain id) the key is a device of.
    pub identity: PublicKey,
    /// Where it stands.
    pub state: DeviceState,
    /// The chain seq of the verified state (or, `adding`, of the link) this entry comes from.
    pub seq: u64,
}

/// The buckets and the inbox stream.
#[derive(Clone)]
pub struct Store {
    js: jetstream::Context,
    devices: kv::Store,
    disabled: kv::Store,
    handles: kv::Store,
    keys: kv::Store,
    links: kv::Store,
    heads: kv::Store,
    states: kv::Store,
    /// Boxed: a `kv::Store` is tens of kilobytes (its stream's info), and every frame that
    /// moves a `Store` carries all of them, which debug builds' small test stacks feel.
    directory: Arc<kv::Store>,
    /// Where a device whose index entry this store turned `revoked` is handed on, to end its
    /// live connections ([`crate::kick`]); none without the server's system user.
    revocations: Option<tokio::sync::mpsc::Sender<PublicKey>>,
}

/// Outcome of a registration.
pub enum Registered {
    /// Newly registered.
    New(HandleRecord),
    /// The same key already holds this same handle (a retried request): nothing changed.
    Existing(HandleRecord),
}

/// What [`Store::open`] applies to the buckets and the inbox stream; `None` keeps what an
/// existing stream has (so a command run without the setting changes nothing) and gives a new
/// one the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreSettings {
    /// Replicas of every bucket and the stream (default 1).
    pub replicas: Option<usize>,
    /// Bytes the inbox stream may hold (default [`DEFAULT_INBOX_MAX_BYTES`]).
    pub inbox_max_bytes: Option<u64>,
}

/// Writes `value` under `key` of `bucket` if the entry is still at `revision` (`None`: only if
/// there is none yet): `Ok(false)` when another write came first, so the caller reads again and
/// retries (the prekeys' and the pins' compare-and-set).
pub(crate) async fn compare_and_set(
    bucket: &kv::Store,
    key: &str,
    value: Bytes,
    revision: Option<u64>,
) -> Result<bool, ErrorAnswer> {
    let written = match revision {
        Some(revision) => bucket
            .update(key, value, revision)
            .await
            .map(|_| ())
            .map_err(|err| match err.kind() {
                kv::UpdateErrorKind::WrongLastRevision => None,
                _ => Some(ErrorAnswer::unavailable(err)),
            }),
        None => bucket
            .create(key, value)
            .await
            .map(|_| ())
            .map_err(|err| match err.kind() {
                kv::CreateErrorKind::AlreadyExists => None,
                _ => Some(ErrorAnswer::unavailable(err)),
            }),
    };
    match written {
        Ok(()) => Ok(true),
        Err(None) => Ok(false),
        Err(Some(err)) => Err(err),
    }
}

impl Store {
    /// Creates the buckets and the inbox stream if missing (idempotent) and opens them, with
    /// `settings` applied to new and existing ones (what it leaves unset, existing ones keep:
    /// read from the inbox stream, which is created with the buckets).
    pub async fn open(
        js: &jetstream::Context,
        settings: StoreSettings,
    ) -> Result<Store, async_nats::Error> {
        let mut existing = None;
        // The first start after an upgrade takes the settings of the stream it replaces.
        for name in [MAIL_STREAM, LEGACY_INBOX_STREAM] {
            let mut described = None;
            for _ in 0..ENSURE_ATTEMPTS {
                described = stream_config(js, name).await;
                if described.is_some() {
                    break;
                }
            }
            existing = described.ok_or_else(|| format!("no answer about stream {name}"))??;
            if existing.is_some() {
                break;
            }
        }
        let replicas = settings.replicas.unwrap_or_else(|| {
            existing
                .as_ref()
                .map_or(1, |config| config.num_replicas.max(1))
        });
        // A stream of the previous release had no bound (-1): it gets the default.
        let inbox_max_bytes = match (settings.inbox_max_bytes, &existing) {
            (Some(bytes), _) => bytes,
            (None, Some(config)) if config.max_bytes > 0 => config.max_bytes as u64,
            (None, _) => DEFAULT_INBOX_MAX_BYTES,
        };
        let bucket = |name: &str, description: &str, max_value_size: usize| kv::Config {
            bucket: name.to_owned(),
            description: description.to_owned(),
            history: 1,
            max_value_size: max_value_size as i32,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        // Boxed: seven of them at once would make a future too large for a small stack.
        let open = |config: kv::Config| Box::pin(ensure_bucket(js, config));
        ensure_stream(
            js,
            jetstream::stream::Config {
                name: MAIL_STREAM.to_owned(),
                description: Some("kez-chat: undelivered end-to-end encrypted messages".to_owned()),
                subjects: vec![INBOX_SUBJECTS.to_owned()],
                // No consumers: the server reads a device's subject for it with batch direct
                // gets and purges what the device says it stored (PROTOCOL.md §6.3), so the
                // broker keeps ciphertext only until it is delivered, and a registered user
                // costs the broker nothing but the user's key-value entries.
                retention: jetstream::stream::RetentionPolicy::Limits,
                allow_direct: true,
                // Headers only, on the device's own subject: "new mail, sequence N".
                republish: Some(jetstream::stream::Republish {
                    source: INBOX_SUBJECTS.to_owned(),
                    destination: NEW_MAIL_DESTINATION.to_owned(),
                    headers_only: true,
                }),
                storage: jetstream::stream::StorageType::File,
                max_messages_per_subject: INBOX_MAX_MESSAGES,
                discard: jetstream::stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                max_message_size: INBOX_MAX_STORED_BYTES,
                // Reserved by JetStream: the stream can never take the store the buckets need.
                max_bytes: i64::try_from(inbox_max_bytes).unwrap_or(i64::MAX),
                max_age: INBOX_MAX_AGE,
                duplicate_window: INBOX_DUPLICATE_WINDOW,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        // At once: each is a round of the cluster's meta layer.
        // A store of a release before devices has no devices bucket: it is made here like the
        // others, empty (that release had no devices to index).
        let (devices, disabled, handles, keys, links, heads, states) = futures::try_join!(
            open(bucket(
                DEVICES_BUCKET,
                "kez-chat: device key -> identity",
                1024
            )),
            open(bucket(DISABLED_BUCKET, "kez-chat: disabled keys", 1024)),
            open(bucket(HANDLES_BUCKET, "kez-chat: handle -> key", 1024)),
            open(bucket(KEYS_BUCKET, "kez-chat: key -> handle", 1024)),
            open(bucket(
                LINKS_BUCKET,
                "kez-chat: sigchain links",
                MAX_LINK_BYTES
            )),
            open(bucket(HEADS_BUCKET, "kez-chat: sigchain heads", 1024)),
            open(bucket(
                STATES_BUCKET,
                "kez-chat: verified sigchain states",
                MAX_STATE_BYTES
            )),
        )?;
        // After them: an eighth in the same join makes its poll too deep for a small stack.
        let directory = Arc::new(
            open(bucket(
                DIRECTORY_BUCKET,
                "kez-chat: sealed lookup answers, read by clients with direct gets",
                MAX_ENTRY_BYTES,
            ))
            .await?,
        );
        Ok(Store {
            js: js.clone(),
            devices,
            disabled,
            handles,
            keys,
            links,
            heads,
            states,
            directory,
            revocations: None,
        })
    }

    /// The JetStream context the store writes with (the outbox shares it).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The same store, handing every device key it turns `revoked` to `revocations` (never
    /// waiting: when the queue is full the device's connections end with their authorization).
    pub fn with_revocations(mut self, revocations: tokio::sync::mpsc::Sender<PublicKey>) -> Self {
        self.revocations = Some(revocations);
        self
    }

    /// Ends the open connections of `key` (a peer server's key whose domain the operator just
    /// blocked), when the server's system user is connected; else they end at their next
    /// request's refusal or with their authorization.
    pub fn end_connections(&self, key: PublicKey) {
        self.revoked(key);
    }

    /// Hands `key`, just written as revoked, to whoever ends its connections.
    fn revoked(&self, key: PublicKey) {
        let Some(revocations) = &self.revocations else {
            return;
        };
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = revocations.try_send(key) {
            tracing::warn!(device = %key, "too many revocations at once: this device's open connections end when their authorization expires (at most an hour)");
        }
    }

    /// Claims `handle` for `key`, first come first served; one handle per key.
    pub async fn register(
        &self,
        handle: &Handle,
        key: PublicKey,
        now: u64,
    ) -> Result<Registered, ErrorAnswer> {
        let key_hex = key.to_hex();
        let reverse_value = encode(&KeyRecord {
            name: handle.name().to_owned(),
        });
        let reverse = self
            .keys
            .entry(&key_hex)
            .await
            .map_err(ErrorAnswer::unavailable)?
            .filter(|entry| entry.operation == kv::Operation::Put);
        // The revision of a reverse entry that names `handle` for this key.
        let claimed = match reverse {
            None => self
                .keys
                .create(&key_hex, reverse_value)
                .await
                .map_err(|err| match err.kind() {
                    kv::CreateErrorKind::AlreadyExists => in_progress(),
                    _ => ErrorAnswer::unavailable(err),
                })?,
            Some(entry) => {
                let held: KeyRecord = decode(&entry.value)?;
                match self.handle(&held.name).await? {
                    Some(record) if record.key == key && record.handle.name() == handle.name() => {
                        // A retry: perhaps of one whose directory write failed.
                        let head = self.head(key).await?;
                        Box::pin(self.publish_directory(&record, head)).await?;
                        return Ok(Registered::Existing(record));
                    }
                    Some(record) if record.key == key => {
                        return Err(ErrorAnswer::new(
                            409,
                            "key_has_handle",
                            format!(
                                "this key already holds {}; one handle per key",
                                record.handle
                            ),
                        ));
                    }
                    // An unfinished attempt at this very name (a retry after a lost answer or a
                    // crash): finish it.
                    _ if held.name == handle.name() => entry.revision,
                    // An unfinished attempt at another name. Take it over only once that attempt
                    // cannot still be running, or one key could win two handles by racing itself.
                    _ if now.saturating_sub(entry.created.unix_timestamp().max(0) as u64)
                        >= STALE_REVERSE_AFTER_SECS =>
                    {
                        self.keys
                            .update(&key_hex, reverse_value, entry.revision)
                            .await
                            .map_err(|err| match err.kind() {
                                kv::UpdateErrorKind::WrongLastRevision => in_progress(),
                                _ => ErrorAnswer::unavailable(err),
                            })?
                    }
                    _ => return Err(in_progress()),
                }
            }
        };

        // Checked after the reverse entry is written, as an append claims a device before it
        // checks for a handle: of a registration and a device claim racing for one key, at
        // least one sees the other.
        if let Some(device) = self.device(key).await? {
            self.withdraw_reverse(key, claimed).await;
            return Err(key_is_device(key, device.identity));
        }
        let record = HandleRecord {
            handle: handle.clone(),
            key,
            registered_at: now,
        };
        match self.handles.create(handle.name(), encode(&record)).await {
            Ok(_) => {
                Box::pin(self.publish_new_directory(&record)).await?;
                Ok(Registered::New(record))
            }
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.handle(handle.name()).await? {
                    // A concurrent attempt by the same key for the same name finished first.
                    Some(existing) if existing.key == key => Ok(Registered::Existing(existing)),
                    _ => {
                        // Taken by someone else.
                        self.withdraw_reverse(key, claimed).await;
                        Err(ErrorAnswer::new(
                            409,
                            "handle_taken",
                            format!("{handle} is already registered; pick another name"),
                        ))
                    }
                }
            }
            // The create may still have happened (a lost acknowledgement), so the reverse entry
            // stays: a retry of this request finishes the registration.
            Err(err) => Err(ErrorAnswer::unavailable(err)),
        }
    }

    /// Withdraws the reverse entry of a registration that did not happen, unless it changed
    /// since (revision `claimed`).
    async fn withdraw_reverse(&self, key: PublicKey, claimed: u64) {
        if let Err(undo) = self
            .keys
            .delete_expect_revision(&key.to_hex(), Some(claimed))
            .await
        {
            tracing::warn!(key = %key, error = %undo, "could not withdraw reverse entry; it stays stale and is reclaimed later");
        }
    }

    /// Stores `envelope` in the inbox of `device`, a device of `identity`, with the
    /// `Nats-Msg-Id` [`inbox_msg_id`]; answers its stream sequence and whether the stream had
    /// that id already (then nothing was stored).
    pub async fn deliver(
        &self,
        identity: PublicKey,
        device: PublicKey,
        id: &kez_core::envelope::MessageId,
        envelope: Bytes,
    ) -> Result<(u64, bool), ErrorAnswer> {
        self.deliver_with_origin(identity, device, id, envelope, None)
            .await
    }

    /// [`Store::deliver`] of a message a peer server handed over: `origin` (its domain) is
    /// kept with it in the `Kez-Origin` header, which a fetch with `origins` passes on.
    pub async fn deliver_with_origin(
        &self,
        identity: PublicKey,
        device: PublicKey,
        id: &kez_core::envelope::MessageId,
        envelope: Bytes,
        origin: Option<&str>,
    ) -> Result<(u64, bool), ErrorAnswer> {
        self.store_in_inbox(
            identity,
            device,
            &inbox_msg_id(&device, id),
            origin,
            envelope,
        )
        .await
    }

    /// Stores `envelope` in the inbox of `device` (of `identity`) under the de-duplication id
    /// `msg_id`, with its `origin` when a peer handed it over; answers its sequence and whether
    /// the stream already held that id.
    pub async fn store_in_inbox(
        &self,
        identity: PublicKey,
        device: PublicKey,
        msg_id: &str,
        origin: Option<&str>,
        envelope: Bytes,
    ) -> Result<(u64, bool), ErrorAnswer> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        if let Some(origin) = origin {
            headers.insert(ORIGIN_HEADER, origin);
        }
        let ack = self
            .js
            .publish_with_headers(inbox_subject(&identity, &device), headers, envelope)
            .await
            .map_err(ErrorAnswer::unavailable)?
            .await
            .map_err(|err| store_refusal(&err))?;
        Ok((ack.sequence, ack.duplicate))
    }

    /// Reads up to `max` messages of inbox `subject` after sequence `after`, in one batch direct
    /// get bounded by [`MAX_FETCH_BYTES`] (the first message always comes).
    pub async fn read_inbox(
        &self,
        subject: &str,
        after: u64,
        max: u32,
    ) -> Result<InboxRead, ErrorAnswer> {
        let client = self.js.client();
        let reply = client.new_inbox();
        let mut replies = client
            .subscribe(reply.clone())
            .await
            .map_err(ErrorAnswer::unavailable)?;
        let request = serde_json::json!({
            "seq": after + 1,
            "next_by_subj": subject,
            "batch": max,
            "max_bytes": MAX_FETCH_BYTES,
        });
        client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{MAIL_STREAM}"),
                reply,
                request.to_string().into(),
            )
            .await
            .map_err(ErrorAnswer::unavailable)?;
        let mut read = InboxRead::default();
        loop {
            let message = tokio::time::timeout(DIRECT_GET_PATIENCE, replies.next())
                .await
                .map_err(|_| {
                    ErrorAnswer::unavailable("the inbox stream did not answer a read in time")
                })?
                .ok_or_else(|| ErrorAnswer::unavailable("the broker connection closed"))?;
            match direct_get_reply(&message)? {
                DirectGetReply::Message { seq, time, pending } => {
                    if read.messages.last().is_some_and(|last| seq <= last.seq)
                        || seq <= after
                        || read.messages.len() >= max as usize
                    {
                        return Err(ErrorAnswer::internal(format!(
                            "the inbox stream answered sequence {seq} out of order"
                        )));
                    }
                    read.pending = pending;
                    let origin = message
                        .headers
                        .as_ref()
                        .and_then(|headers| headers.get(ORIGIN_HEADER))
                        .map(|value| value.as_str())
                        .filter(|origin| {
                            kez_core::handle::parse_domain(origin).as_deref() == Ok(*origin)
                        })
                        .map(str::to_owned);
                    read.messages.push(Stored {
                        seq,
                        time,
                        envelope: message.payload,
                        origin,
                    });
                }
                DirectGetReply::End { pending } => {
                    read.pending = pending.unwrap_or(read.pending);
                    return Ok(read);
                }
                DirectGetReply::NoMessages => return Ok(read),
            }
        }
    }

    /// Deletes every message of inbox `subject` up to and including sequence `upto`; answers
    /// how many there were.
    pub async fn purge_inbox(&self, subject: &str, upto: u64) -> Result<u64, ErrorAnswer> {
        let stream = self
            .js
            .get_stream_no_info(MAIL_STREAM)
            .await
            .map_err(ErrorAnswer::unavailable)?;
        let purged = stream
            .purge()
            .filter(subject)
            .sequence(upto + 1)
            .await
            .map_err(ErrorAnswer::unavailable)?;
        Ok(purged.purged)
    }

    /// The inbox stream's last sequence, read now.
    pub async fn inbox_last_sequence(&self) -> Result<u64, ErrorAnswer> {
        let stream = self
            .js
            .get_stream(MAIL_STREAM)
            .await
            .map_err(ErrorAnswer::unavailable)?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// The sequence of the first message of inbox `subject` the stream stored at or after
    /// `time` (microseconds since the Unix epoch), if any: one direct get.
    pub async fn first_stored_since(
        &self,
        subject: &str,
        time: u64,
    ) -> Result<Option<u64>, ErrorAnswer> {
        let request = serde_json::json!({
            "start_time": rfc3339_from_micros(time),
            "next_by_subj": subject,
        });
        let reply = self
            .js
            .client()
            .request(
                format!("$JS.API.DIRECT.GET.{MAIL_STREAM}"),
                request.to_string().into(),
            )
            .await
            .map_err(ErrorAnswer::unavailable)?;
        match direct_get_reply(&reply)? {
            DirectGetReply::Message { seq, .. } => Ok(Some(seq)),
            DirectGetReply::NoMessages | DirectGetReply::End { .. } => Ok(None),
        }
    }

    /// Marks `key` disabled (`Some`) or enabled (`None`).
    pub async fn set_disabled(
        &self,
        key: PublicKey,
        record: Option<&DisabledRecord>,
    ) -> Result<(), ErrorAnswer> {
        match record {
            Some(record) => self
                .disabled
                .put(key.to_hex(), encode(record))
                .await
                .map(|_| ())
                .map_err(ErrorAnswer::unavailable),
            None => self
                .disabled
                .delete(key.to_hex())
                .await
                .map_err(ErrorAnswer::unavailable),
        }
    }

    /// Whether an operator disabled `key`.
    pub async fn disabled(&self, key: PublicKey) -> Result<Option<DisabledRecord>, ErrorAnswer> {
        match self
            .disabled
            .get(key.to_hex())
            .await
            .map_err(ErrorAnswer::unavailable)?
        {
            Some(value) => Ok(Some(decode(&value)?)),
            None => Ok(None),
        }
    }

    /// One read from every bucket (of a key that never exists): whether JetStream answers.
    pub async fn ping(&self) -> Result<(), ErrorAnswer> {
        let buckets = [
            &self.handles,
            &self.keys,
            &self.links,
            &self.heads,
            &self.states,
            &self.disabled,
            &self.devices,
            &*self.directory,
        ];
        futures::future::try_join_all(
            buckets
                .into_iter()
                .map(|bucket| bucket.get(HEALTH_PROBE_KEY)),
        )
        .await
        .map_err(ErrorAnswer::unavailable)?;
        Ok(())
    }

    /// Whose device `key` is, if a verified chain other than its own ever added it.
    pub async fn device(&self, key: PublicKey) -> Result<Option<DeviceRecord>, ErrorAnswer> {
        match self
            .devices
            .get(key.to_hex())
            .await
            .map_err(ErrorAnswer::unavailable)?
        {
            Some(value) => Ok(Some(decode(&value)?)),
            None => Ok(None),
        }
    }

    /// Claims the keys `added` as devices of `identity` before the link that adds them is
    /// stored: each must be a device of no other identity and hold no handle (409
    /// `device_in_use`). A claim is `adding`, which admits nothing; a claim left by an append
    /// that failed stays with `identity` (its key's owner counter-signed that link).
    async fn claim_devices(
        &self,
        identity: PublicKey,
        seq: u64,
        added: &[PublicKey],
    ) -> Result<(), ErrorAnswer> {
        for &key in added {
            let claim = encode(&DeviceRecord {
                identity,
                state: DeviceState::Adding,
                seq,
            });
            match self.devices.create(key.to_hex(), claim).await {
                Ok(_) => {}
                Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                    match self.device(key).await? {
                        Some(held) if held.identity == identity => {}
                        Some(_) => return Err(device_in_use(key)),
                        // Deleted meanwhile (only an operator does that): claim it next time.
                        None => {
                            return Err(ErrorAnswer::unavailable(format!(
                                "the device index entry of {key} changed meanwhile"
                            )));
                        }
                    }
                }
                Err(err) => return Err(ErrorAnswer::unavailable(err)),
            }
            // After the claim, as a registration checks for a device after its reverse entry.
            if self.whois(key).await?.is_some() {
                return Err(device_in_use(key));
            }
        }
        Ok(())
    }

    /// Writes the device index entries `state`, a verified chain state stored as the chain's,
    /// implies: its devices other than the chain id's key, active or revoked, and the chain
    /// id's key once revoked (a key a version 1
    /// `rotate` came back to is listed twice: its last entry is its standing). Every entry, not
    /// only this link's, so that one a failed earlier append left behind is caught up; bounded:
    /// a chain has at most `MAX_DEVICE_ENTRIES` devices, read [`PARALLEL_LINK_READS`] at a time.
    async fn index_devices(&self, state: &Sigchain) -> Result<(), ErrorAnswer> {
        let identity = state.chain_id();
        let mut standing = std::collections::HashMap::new();
        for device in state.devices() {
            // The chain id's own key holds the handle, and the registry speaks for it while
            // it is active; revoked, it is indexed like any device, which refuses it.
            if device.key != identity || !device.is_active() {
                standing.insert(device.key, device.is_active());
            }
        }
        let writes = standing.into_iter().map(|(key, active)| {
            let wanted = DeviceRecord {
                identity,
                state: if active {
                    DeviceState::Active
                } else {
                    DeviceState::Revoked
                },
                seq: state.seq(),
            };
            self.index_device(key, wanted)
        });
        futures::stream::iter(writes)
            .buffer_unordered(PARALLEL_LINK_READS)
            .try_collect::<()>()
            .await
    }

    /// One entry of [`Store::index_devices`]: `key` as `wanted` says, unless a state as far
    /// along the chain or further wrote it already.
    async fn index_device(&self, key: PublicKey, wanted: DeviceRecord) -> Result<(), ErrorAnswer> {
        let identity = wanted.identity;
        let key_hex = key.to_hex();
        let value = encode(&wanted);
        for _ in 0..HEAD_UPDATE_ATTEMPTS {
            let entry = self
                .devices
                .entry(&key_hex)
                .await
                .map_err(ErrorAnswer::unavailable)?
                .filter(|entry| entry.operation == kv::Operation::Put);
            let mut was_revoked = false;
            let written = match entry {
                Some(entry) => {
                    let held: DeviceRecord = decode(&entry.value)?;
                    was_revoked = held.state == DeviceState::Revoked;
                    if held.identity != identity {
                        // Only a chain that added the device before this index existed (its
                        // append was not claimed) gets here: the first identity keeps the key.
                        tracing::warn!(%key, holder = %held.identity, chain = %identity, "a device of this chain is indexed as another identity's; it stays refused for this chain");
                        return Ok(());
                    }
                    let behind = held.seq < wanted.seq
                        || (held.seq == wanted.seq && held.state == DeviceState::Adding);
                    if !behind {
                        return Ok(());
                    }
                    self.devices
                        .update(&key_hex, value.clone(), entry.revision)
                        .await
                        .is_ok()
                }
                None => self.devices.create(&key_hex, value.clone()).await.is_ok(),
            };
            if written {
                // Every later append writes the entry again (a later seq): only the change
                // ends connections.
                if wanted.state == DeviceState::Revoked && !was_revoked {
                    self.revoked(key);
                }
                return Ok(());
            }
        }
        Err(ErrorAnswer::unavailable(format!(
            "the device index entry of {key} kept changing"
        )))
    }

    /// The record of a handle name, if registered.
    pub async fn handle(&self, name: &str) -> Result<Option<HandleRecord>, ErrorAnswer> {
        match self
            .handles
            .get(name)
            .await
            .map_err(ErrorAnswer::unavailable)?
        {
            Some(value) => Ok(Some(decode(&value)?)),
            None => Ok(None),
        }
    }

    /// The handle a key registered, if any (only when both entries agree).
    pub async fn whois(&self, key: PublicKey) -> Result<Option<HandleRecord>, ErrorAnswer> {
        let Some(value) = self
            .keys
            .get(key.to_hex())
            .await
            .map_err(ErrorAnswer::unavailable)?
        else {
            return Ok(None);
        };
        let held: KeyRecord = decode(&value)?;
        Ok(self
            .handle(&held.name)
            .await?
            .filter(|record| record.key == key))
    }

    /// The chain's head: the indexed head, or a later one when links are stored past the index
    /// (an append whose index update failed, or a crash in between). A lagging index is moved
    /// forward in the background, so only the first read after such an append pays for the
    /// extra link reads.
    pub async fn head(&self, chain: PublicKey) -> Result<Option<ChainHead>, ErrorAnswer> {
        let indexed = self.indexed_head(chain).await?;
        let chain_hex = chain.to_hex();
        let mut head = indexed;
        loop {
            let next = head.map_or(1, |head| head.seq + 1);
            if next > kez_core::sigchain::MAX_LINKS {
                break;
            }
            let Some(link) = self.link(&chain_hex, next).await? else {
                break;
            };
            // Stored links were verified when appended: only their hash is needed here.
            let parsed = kez_core::SignedLink::parse(&link).map_err(|err| {
                ErrorAnswer::internal(format!("stored link {next} of {chain} is corrupt: {err}"))
            })?;
            head = Some(ChainHead {
                seq: next,
                head: parsed.hash(),
            });
        }
        if let Some(found) = head
            && head != indexed
        {
            let store = self.clone();
            tokio::spawn(async move { store.advance_head(chain, found).await });
        }
        Ok(head)
    }

    /// The chain's head as indexed: it may lag behind the stored links (see [`Store::head`]).
    async fn indexed_head(&self, chain: PublicKey) -> Result<Option<ChainHead>, ErrorAnswer> {
        match self
            .heads
            .get(chain.to_hex())
            .await
            .map_err(ErrorAnswer::unavailable)?
        {
            Some(value) => Ok(Some(decode(&value)?)),
            None => Ok(None),
        }
    }

    /// The links of `chain` from `from_seq` on, in order, as many as fit in `max_bytes` (at
    /// least one, if there is one); `more` when the chain goes on past them. Reads only those
    /// links (and at most one batch beyond): the indexed ones in parallel batches, then any past
    /// the index one by one.
    pub async fn links_page(
        &self,
        chain: PublicKey,
        from_seq: u64,
        max_bytes: usize,
    ) -> Result<(Vec<Bytes>, bool), ErrorAnswer> {
        // No chain is longer than MAX_LINKS: nothing to read past it.
        if from_seq > kez_core::sigchain::MAX_LINKS {
            return Ok((Vec::new(), false));
        }
        let chain_hex = chain.to_hex();
        let indexed = self.indexed_head(chain).await?.map_or(0, |head| head.seq);
        let mut page = Vec::new();
        let mut size = 0;
        let mut seq = from_seq;
        while seq <= kez_core::sigchain::MAX_LINKS {
            // Past the index (it may lag after a crash) read one at a time until a gap.
            let batch = if seq <= indexed {
                (indexed - seq + 1).min(PARALLEL_LINK_READS as u64)
            } else {
                1
            };
            let links: Vec<Option<Bytes>> = futures::future::try_join_all(
                (seq..seq + batch).map(|seq| self.link(&chain_hex, seq)),
            )
            .await?;
            for link in links {
                let Some(link) = link else {
                    return Ok((page, false));
                };
                if !page.is_empty() && size + link.len() > max_bytes {
                    return Ok((page, true));
                }
                size += link.len();
                page.push(link);
                seq += 1;
            }
        }
        Ok((page, false))
    }

    /// The stored link of `chain_hex` at `seq`.
    async fn link(&self, chain_hex: &str, seq: u64) -> Result<Option<Bytes>, ErrorAnswer> {
        self.links
            .get(link_key(chain_hex, seq))
            .await
            .map_err(ErrorAnswer::unavailable)
    }

    /// Whether `chain` has a first link.
    pub async fn has_chain(&self, chain: PublicKey) -> Result<bool, ErrorAnswer> {
        Ok(self.link(&chain.to_hex(), 1).await?.is_some())
    }

    /// The verified state of `chain` (`None`: no links yet) and the revision of its kept
    /// entry: the entry kept at the last append, brought up to date with any links stored past
    /// it (a crash between storing a link and keeping the state, or a chain written before this
    /// version kept states), which are verified now, off the async workers. An entry kept by
    /// the release before devices lacks what the device rules need, so the chain is verified
    /// from its first link instead (once: the append then keeps the new state).
    async fn verified_state(
        &self,
        chain: PublicKey,
    ) -> Result<(Option<Sigchain>, Option<u64>), ErrorAnswer> {
        let chain_hex = chain.to_hex();
        let entry = self
            .states
            .entry(&chain_hex)
            .await
            .map_err(ErrorAnswer::unavailable)?
            .filter(|entry| entry.operation == kv::Operation::Put);
        let (kept, revision) = match entry {
            Some(entry) => match Sigchain::from_trusted_state_json(&entry.value) {
                Ok(state) => (Some(state), Some(entry.revision)),
                Err(StateJsonError::BeforeDevices) => (None, Some(entry.revision)),
                Err(err) => {
                    return Err(ErrorAnswer::internal(format!(
                        "kept state of {chain} is corrupt: {err}"
                    )));
                }
            },
            None => (None, None),
        };
        let next = kept.as_ref().map_or(1, |state| state.seq() + 1);
        let mut behind = Vec::new();
        loop {
            let (page, more) = self
                .links_page(chain, next + behind.len() as u64, MAX_CHAIN_BYTES_PER_READ)
                .await?;
            behind.extend(page);
            if !more {
                break;
            }
        }
        if behind.is_empty() {
            return Ok((kept, revision));
        }
        let caught_up = tokio::task::spawn_blocking(move || {
            let mut links = behind.iter();
            let mut state = match kept {
                Some(state) => state,
                None => Sigchain::start(links.next().expect("not empty"))?,
            };
            for link in links {
                state.append(link)?;
            }
            Ok::<_, kez_core::ChainErrorKind>(state)
        })
        .await
        .map_err(|err| ErrorAnswer::internal(format!("verifying a stored chain: {err}")))?
        .map_err(|err| {
            ErrorAnswer::internal(format!("stored chain of {chain} does not verify: {err}"))
        })?;
        Ok((Some(caught_up), revision))
    }

    /// The handle `chain`'s verified state names as its home (its `home` endpoint,
    /// PROTOCOL.md §14.6): `None` when it has no chain, or never moved.
    pub async fn home_of(&self, chain: PublicKey) -> Result<Option<kez_core::Handle>, ErrorAnswer> {
        let (state, _) = self.verified_state(chain).await?;
        Ok(state.as_ref().and_then(kez_core::moving::home_of))
    }

    /// Verifies `link` as the next link of its chain and stores it. Returns the new head.
    ///
    /// The seq and prev are checked against the kept state before any signature, and the
    /// signatures of that one link are checked off the async workers: an append costs the same
    /// whatever the chain's length.
    pub async fn append(&self, link: &[u8]) -> Result<ChainHead, ErrorAnswer> {
        let parsed = kez_core::SignedLink::parse(link)?;
        let chain_id = parsed.link().chain;
        let Some(record) = self.whois(chain_id).await? else {
            return Err(ErrorAnswer::new(
                403,
                "not_registered",
                format!(
                    "{chain_id} has not registered a handle here; register before writing a sigchain"
                ),
            ));
        };
        let (state, revision) = self.verified_state(chain_id).await?;
        let seq = parsed.link().seq;
        let current = state.as_ref().map_or(0, Sigchain::seq);
        if (1..=current).contains(&seq) {
            // The very link already stored at its seq (a retry after a lost answer): done
            // already, except perhaps the head index, which the first attempt may not have
            // reached.
            if self.link(&chain_id.to_hex(), seq).await?.as_deref() == Some(link) {
                let head = ChainHead {
                    seq,
                    head: parsed.hash(),
                };
                self.advance_head(chain_id, head).await?;
                Box::pin(self.publish_directory(&record, Some(head))).await?;
                if let Some(state) = &state {
                    self.keep_state(chain_id, state, revision).await;
                    // The first attempt may have failed to index its devices.
                    self.index_devices(state).await?;
                }
                return Ok(head);
            }
        }
        let next = tokio::task::spawn_blocking({
            let link = link.to_vec();
            let state = state.clone();
            move || verify_append(state, &link)
        })
        .await
        .map_err(|err| ErrorAnswer::internal(format!("verifying a link: {err}")))??;
        let head = ChainHead {
            seq: next.seq(),
            head: next.head(),
        };

        // Keys the link makes devices of this chain (`add_device`, a `rotate`): claimed for it
        // before the link is stored, so that no key is ever a device of two identities.
        let added: Vec<PublicKey> = next
            .devices()
            .iter()
            .map(|device| device.key)
            .filter(|key| {
                *key != chain_id
                    && !state
                        .iter()
                        .flat_map(Sigchain::devices)
                        .any(|known| known.key == *key)
            })
            .collect();
        self.claim_devices(chain_id, head.seq, &added).await?;

        let key = link_key(&chain_id.to_hex(), head.seq);
        if let Err(err) = self.links.create(&key, Bytes::copy_from_slice(link)).await {
            return Err(match err.kind() {
                kv::CreateErrorKind::AlreadyExists => {
                    let conflict = ErrorAnswer::new(
                        409,
                        "conflict",
                        format!(
                            "seq {} was taken by another append; fetch the chain and retry on top of it",
                            head.seq
                        ),
                    );
                    match self.verified_state(chain_id).await {
                        Ok((Some(winner), _)) => with_head(conflict, winner.seq(), winner.head()),
                        _ => conflict,
                    }
                }
                _ => ErrorAnswer::unavailable(err),
            });
        }
        self.advance_head(chain_id, head).await?;
        // The link is stored: a failure from here on is 503, and the client's retry of the
        // same link writes what is missing (the retry path above).
        Box::pin(self.publish_directory(&record, Some(head))).await?;
        self.keep_state(chain_id, &next, revision).await;
        self.index_devices(&next).await?;
        Ok(head)
    }

    /// Writes the directory entries of `record`, whose chain ends at `head`: one under its
    /// handle, one under its key (PROTOCOL.md §5.7), unless they hold that head or a later one.
    async fn publish_directory(
        &self,
        record: &HandleRecord,
        head: Option<ChainHead>,
    ) -> Result<(), ErrorAnswer> {
        let profile = Profile::new(record.clone(), head);
        let (by_handle, by_key) = (Slot::handle(record.handle.name()), Slot::key(&record.key));
        futures::try_join!(
            self.write_entry(&by_handle, &profile),
            self.write_entry(&by_key, &profile),
        )?;
        Ok(())
    }

    /// The directory entries of a handle registered just now: created without reading first
    /// (a new handle and key have none, unless a retry or the backfill wrote them a moment
    /// ago: then as [`Store::publish_directory`] does).
    async fn publish_new_directory(&self, record: &HandleRecord) -> Result<(), ErrorAnswer> {
        let profile = Profile::new(record.clone(), None);
        let create = |slot: Slot| {
            let profile = &profile;
            async move {
                let value = Bytes::from(slot.seal(profile));
                if !compare_and_set(&self.directory, slot.id(), value, None).await? {
                    self.write_entry(&slot, profile).await?;
                }
                Ok::<(), ErrorAnswer>(())
            }
        };
        futures::try_join!(
            create(Slot::handle(record.handle.name())),
            create(Slot::key(&record.key)),
        )?;
        Ok(())
    }

    /// One directory entry, by compare-and-set so that it never moves back: an entry of the
    /// same handle and key at `profile`'s head or later is kept as it is.
    async fn write_entry(&self, slot: &Slot, profile: &Profile) -> Result<(), ErrorAnswer> {
        let seq = |profile: &Profile| profile.sigchain.map_or(0, |head| head.seq);
        for _ in 0..HEAD_UPDATE_ATTEMPTS {
            let entry = self
                .directory
                .entry(slot.id())
                .await
                .map_err(ErrorAnswer::unavailable)?;
            if let Some(entry) = &entry
                && entry.operation == kv::Operation::Put
                && let Ok(held) = slot.open(&entry.value)
                && held.handle == profile.handle
                && held.key == profile.key
                && seq(&held) >= seq(profile)
            {
                return Ok(());
            }
            let revision = entry.map(|entry| entry.revision);
            let value = Bytes::from(slot.seal(profile));
            if compare_and_set(&self.directory, slot.id(), value, revision).await? {
                return Ok(());
            }
        }
        Err(ErrorAnswer::unavailable(format!(
            "the directory entry of {} kept changing",
            profile.handle
        )))
    }

    /// Writes the directory entries of every handle registered before the directory existed
    /// (a store of an earlier release), once per store: a marker entry says it is done. Run in
    /// the background at start; until it is done, clients find no entry and ask the service.
    pub async fn backfill_directory(&self) -> Result<u64, ErrorAnswer> {
        if self
            .directory
            .get(DIRECTORY_BACKFILLED)
            .await
            .map_err(ErrorAnswer::unavailable)?
            .is_some()
        {
            return Ok(0);
        }
        // A new store has nothing to write: no consumer for it (a start does no JetStream work
        // per registered user).
        let handles = self
            .handles
            .status()
            .await
            .map_err(ErrorAnswer::unavailable)?;
        let mut names = if handles.values() == 0 {
            futures::stream::empty().boxed()
        } else {
            self.handles
                .keys()
                .await
                .map_err(ErrorAnswer::unavailable)?
                .boxed()
        };
        let mut written = 0;
        while let Some(name) = names.try_next().await.map_err(ErrorAnswer::unavailable)? {
            let Some(record) = self.handle(&name).await? else {
                continue;
            };
            let head = self.head(record.key).await?;
            Box::pin(self.publish_directory(&record, head)).await?;
            written += 1;
        }
        self.directory
            .put(DIRECTORY_BACKFILLED, Bytes::from_static(b"1"))
            .await
            .map_err(ErrorAnswer::unavailable)?;
        Ok(written)
    }

    /// The reconnect window the server last advertised (PROTOCOL.md §6.1), if any and readable.
    pub async fn reconnect_window(&self) -> Result<Option<std::time::Duration>, ErrorAnswer> {
        let entry = self
            .directory
            .get(kez_proto::reconnect::WINDOW_ID)
            .await
            .map_err(ErrorAnswer::unavailable)?;
        Ok(entry.and_then(|value| kez_proto::reconnect::decode(&value).ok()))
    }

    /// Advertises `window` to clients: the directory's [`kez_proto::reconnect::WINDOW_ID`]
    /// entry, which they read with a direct get.
    pub async fn advertise_reconnect_window(
        &self,
        window: std::time::Duration,
    ) -> Result<(), ErrorAnswer> {
        self.directory
            .put(
                kez_proto::reconnect::WINDOW_ID,
                Bytes::from(kez_proto::reconnect::encode(window)),
            )
            .await
            .map(drop)
            .map_err(ErrorAnswer::unavailable)
    }

    /// Keeps `state` as `chain`'s verified state unless a later one is kept already. The link
    /// is stored by then, so this never fails the append: a state left behind is caught up from
    /// the links by the next append ([`Store::verified_state`]).
    async fn keep_state(&self, chain: PublicKey, state: &Sigchain, mut revision: Option<u64>) {
        let key = chain.to_hex();
        let value = Bytes::from(state.to_state_json());
        for _ in 0..HEAD_UPDATE_ATTEMPTS {
            let written = match revision {
                Some(revision) => self
                    .states
                    .update(&key, value.clone(), revision)
                    .await
                    .map(|_| ())
                    .map_err(|err| err.to_string()),
                None => self
                    .states
                    .create(&key, value.clone())
                    .await
                    .map(|_| ())
                    .map_err(|err| err.to_string()),
            };
            if written.is_ok() {
                return;
            }
            // Another writer kept one meanwhile: keep ours only if it is later.
            match self.states.entry(&key).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    match Sigchain::from_trusted_state_json(&entry.value) {
                        Ok(kept) if kept.seq() >= state.seq() => return,
                        _ => revision = Some(entry.revision),
                    }
                }
                Ok(_) => revision = None,
                Err(err) => {
                    tracing::warn!(chain = %chain, seq = state.seq(), error = %err, "could not keep the chain state; the next append catches up");
                    return;
                }
            }
        }
        tracing::warn!(chain = %chain, seq = state.seq(), "could not keep the chain state; the next append catches up");
    }

    /// Moves the head index forward to `head` unless it is already there or beyond. The link
    /// is already stored, so this never fails the append: when JetStream keeps failing past
    /// [`HEAD_UPDATE_PATIENCE`] the index is left behind (readers look past it, and the first
    /// [`Store::head`] to do so moves it).
    async fn advance_head(&self, chain: PublicKey, head: ChainHead) -> Result<(), ErrorAnswer> {
        let key = chain.to_hex();
        let deadline = tokio::time::Instant::now() + HEAD_UPDATE_PATIENCE;
        let mut pause = std::time::Duration::from_millis(50);
        let mut races = 0;
        let failure = loop {
            match self.try_advance_head(&key, head).await {
                Ok(true) => return Ok(()),
                Ok(false) if races < HEAD_UPDATE_ATTEMPTS => races += 1,
                Ok(false) => break "another writer kept moving it".to_owned(),
                Err(err) if tokio::time::Instant::now() + pause < deadline => {
                    tracing::debug!(chain = %chain, error = %err, "head index update failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                }
                Err(err) => break err,
            }
        };
        tracing::warn!(chain = %chain, seq = head.seq, error = %failure, "could not advance the head index");
        Ok(())
    }

    /// One attempt of [`Store::advance_head`]: `Ok(true)` when the index is at `head` or
    /// beyond, `Ok(false)` when another writer changed it in between, `Err` when JetStream
    /// failed.
    async fn try_advance_head(&self, key: &str, head: ChainHead) -> Result<bool, String> {
        let entry = self.heads.entry(key).await.map_err(|err| err.to_string())?;
        let current = match &entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                Some(decode::<ChainHead>(&entry.value).map_err(|err| err.message)?)
            }
            _ => None,
        };
        if current.is_some_and(|current| current.seq >= head.seq) {
            return Ok(true);
        }
        match entry {
            Some(entry) => match self.heads.update(key, encode(&head), entry.revision).await {
                Ok(_) => Ok(true),
                Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(err) => Err(err.to_string()),
            },
            None => match self.heads.create(key, encode(&head)).await {
                Ok(_) => Ok(true),
                Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(err) => Err(err.to_string()),
            },
        }
    }
}

/// How often [`ensure_stream`] goes round before it gives up (a step that got no answer, a
/// creation refused because another instance's won).
const ENSURE_ATTEMPTS: usize = 10;
/// How long [`ensure_stream`] waits for one answer: a stream whose creation is in flight
/// answers nothing (not its info, not an update) until it exists, about 0.1 s later.
const ENSURE_STEP: std::time::Duration = std::time::Duration::from_secs(1);

/// `step` within [`ENSURE_STEP`], or `None` when it got no answer in time.
async fn within_step<T>(step: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(ENSURE_STEP, step).await.ok()
}

/// Makes the stream `wanted.name` exist with the settings `wanted` gives, and answers its
/// config: an existing stream is updated only when one of them differs, a missing one created.
///
/// Several instances start at once on a fresh cluster: an update that reaches nats-server while
/// another instance's creation of the same stream is in flight gets no answer, and neither does
/// that creation; a stream info gets none either until the stream exists. Each waited out the
/// request timeout, again at every retry: 55 s before either served. So nothing is updated that
/// need not be, each step waits [`ENSURE_STEP`] and is asked again, equal creations at once
/// agree, and a creation refused because the stream appeared meanwhile finds it next round.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    wanted: jetstream::stream::Config,
) -> Result<jetstream::stream::Config, async_nats::Error> {
    let mut last_refusal = None;
    for _ in 0..ENSURE_ATTEMPTS {
        match stream_config(js, &wanted.name).await {
            Some(Ok(Some(existing))) => {
                let merged = with_settings_of(&existing, &wanted);
                if merged == existing {
                    return Ok(existing);
                }
                match within_step(js.update_stream(merged)).await {
                    Some(updated) => return Ok(updated?.config),
                    None => continue,
                }
            }
            Some(Ok(None)) => {}
            Some(Err(err)) => return Err(err),
            None => continue,
        }
        match within_step(js.create_stream(wanted.clone())).await {
            Some(Ok(stream)) => return Ok(stream.cached_info().config.clone()),
            Some(Err(err)) => last_refusal = Some(err.to_string()),
            None => {}
        }
    }
    Err(format!(
        "stream {} could not be made or read in {ENSURE_ATTEMPTS} attempts ({})",
        wanted.name,
        last_refusal.as_deref().unwrap_or("no answer")
    )
    .into())
}

/// The config of stream `name`: `Some(Ok(None))` when there is no such stream, `None` when
/// nats-server did not answer within [`ENSURE_STEP`].
async fn stream_config(
    js: &jetstream::Context,
    name: &str,
) -> Option<Result<Option<jetstream::stream::Config>, async_nats::Error>> {
    Some(match within_step(js.get_stream(name)).await? {
        Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
        Err(err) => match err.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(source)
                if source.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(err.into()),
        },
    })
}

/// `existing` with every setting kez-chat chooses taken from `wanted`; what the server filled
/// in (or an operator set that kez-chat does not choose) is kept.
fn with_settings_of(
    existing: &jetstream::stream::Config,
    wanted: &jetstream::stream::Config,
) -> jetstream::stream::Config {
    let mut merged = existing.clone();
    merged.description.clone_from(&wanted.description);
    merged.num_replicas = wanted.num_replicas;
    merged.max_message_size = wanted.max_message_size;
    merged.max_messages_per_subject = wanted.max_messages_per_subject;
    merged.max_bytes = wanted.max_bytes;
    merged.max_age = wanted.max_age;
    merged.allow_direct = wanted.allow_direct;
    merged.republish.clone_from(&wanted.republish);
    merged.duplicate_window = wanted.duplicate_window;
    merged.discard = wanted.discard;
    merged.discard_new_per_subject = wanted.discard_new_per_subject;
    merged
}

/// [`ensure_stream`] for the key-value bucket `config` describes.
/// A `num_replicas` of 0 keeps an existing bucket's replicas (and creates one replica).
pub(crate) async fn ensure_bucket(
    js: &jetstream::Context,
    mut config: kv::Config,
) -> Result<kv::Store, async_nats::Error> {
    let name = config.bucket.clone();
    let stream = format!("KV_{name}");
    for _ in 0..ENSURE_ATTEMPTS {
        let Some(described) = stream_config(js, &stream).await else {
            continue;
        };
        match described? {
            Some(existing) => {
                if config.num_replicas == 0 {
                    config.num_replicas = existing.num_replicas;
                }
                let same = existing.description.as_deref() == Some(config.description.as_str())
                    && existing.num_replicas == config.num_replicas
                    && existing.max_message_size == config.max_value_size
                    && existing.max_messages_per_subject == config.history
                    && existing.storage == config.storage;
                let opened = match same {
                    true => within_step(js.get_key_value(&name))
                        .await
                        .map(|store| store.map_err(async_nats::Error::from)),
                    false => within_step(js.update_key_value(config.clone()))
                        .await
                        .map(|store| store.map_err(async_nats::Error::from)),
                };
                if let Some(opened) = opened {
                    return opened;
                }
            }
            None => {
                if let Some(Ok(store)) = within_step(js.create_key_value(config.clone())).await {
                    return Ok(store);
                }
            }
        }
    }
    Err(format!("bucket {name} could not be made or read in {ENSURE_ATTEMPTS} attempts").into())
}

/// The append rules (PROTOCOL.md §5.3): `link` verified as the next link of `state`, the
/// chain's kept state (as its first link when there is none). A failure is its §5.1 answer; a
/// 409 names the chain's head, which the writer builds on next.
pub fn verify_append(state: Option<Sigchain>, link: &[u8]) -> Result<Sigchain, ErrorAnswer> {
    let head = state.as_ref().map(|state| (state.seq(), state.head()));
    let appended = match state {
        None => Sigchain::start(link),
        Some(mut state) => state.append(link).map(|_| state),
    };
    appended.map_err(|err| {
        let refusal = ErrorAnswer::from(err);
        match (refusal.code, head) {
            (409, Some((seq, head))) => with_head(refusal, seq, head),
            _ => refusal,
        }
    })
}

/// `micros` after the Unix epoch as RFC 3339 in UTC with microseconds (JetStream's
/// `start_time`).
fn rfc3339_from_micros(micros: u64) -> String {
    let seconds = micros / 1_000_000;
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01 (never negative here).
    let z = days + 719_468;
    let (era, day_of_era) = (z / 146_097, z % 146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        second_of_day / 3_600,
        second_of_day % 3_600 / 60,
        second_of_day % 60,
        micros % 1_000_000
    )
}

/// How long one read of the inbox stream may take before the fetch is answered 503.
const DIRECT_GET_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// A message of an inbox, as stored.
#[derive(Debug)]
pub struct Stored {
    /// Its stream sequence.
    pub seq: u64,
    /// When the stream stored it, microseconds since the Unix epoch.
    pub time: u64,
    /// The envelope.
    pub envelope: Bytes,
    /// The domain of the peer server that handed it over (`kez.mail.deliver`), if one did.
    pub origin: Option<String>,
}

/// What [`Store::read_inbox`] found.
#[derive(Debug, Default)]
pub struct InboxRead {
    /// The messages, ascending.
    pub messages: Vec<Stored>,
    /// Messages of the subject after the last one read, as the broker counted them.
    pub pending: u64,
}

impl InboxRead {
    /// The messages as a fetch answer carries them.
    pub fn fetched(&self) -> Vec<Fetched<'_>> {
        self.messages
            .iter()
            .map(|message| Fetched {
                seq: message.seq,
                time: message.time,
                envelope: &message.envelope,
                origin: message.origin.as_deref(),
            })
            .collect()
    }
}

/// One reply to a batch direct get.
#[derive(Debug, PartialEq, Eq)]
enum DirectGetReply {
    /// A message at `seq`, stored at `time` (µs since the Unix epoch), `pending` more after it.
    Message { seq: u64, time: u64, pending: u64 },
    /// `204`: the batch is over (`pending` more were left, when said).
    End { pending: Option<u64> },
    /// `404`: nothing at or after the sequence asked for.
    NoMessages,
}

fn direct_get_reply(message: &async_nats::Message) -> Result<DirectGetReply, ErrorAnswer> {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .and_then(|value| value.as_str().parse::<u64>().ok())
    };
    match message.status.map(|status| status.as_u16()) {
        None | Some(200) => {
            let seq = header("Nats-Sequence").ok_or_else(|| {
                ErrorAnswer::internal("an inbox read answered a message without its sequence")
            })?;
            let time = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Nats-Time-Stamp"))
                .and_then(|value| async_nats::datetime::parse_rfc3339(value.as_str()).ok())
                .and_then(|time| u64::try_from(time.unix_timestamp_nanos() / 1000).ok())
                .ok_or_else(|| {
                    ErrorAnswer::internal("an inbox read answered a message without its time")
                })?;
            Ok(DirectGetReply::Message {
                seq,
                time,
                pending: header("Nats-Num-Pending").unwrap_or(0),
            })
        }
        Some(204) => Ok(DirectGetReply::End {
            pending: header("Nats-Num-Pending"),
        }),
        Some(404) => Ok(DirectGetReply::NoMessages),
        Some(status) => Err(ErrorAnswer::unavailable(format!(
            "the inbox stream refused a read: {status} {}",
            message.description.as_deref().unwrap_or("")
        ))),
    }
}

/// What a refused inbox publish means for the sender (PROTOCOL.md §6.3).
/// The `Nats-Msg-Id` of message `id` in the inbox of `device`: `<id>.<device hex>`. One
/// message goes to several devices (of its recipient, and of its sender for their copies) with
/// one id, and the stream's duplicate window spans every inbox, so each device's copy needs an
/// id of its own; a request repeated for the same device is still one message. (0.1 stored
/// the bare id.)
fn inbox_msg_id(device: &PublicKey, id: &kez_core::envelope::MessageId) -> String {
    format!("{id}.{}", device.to_hex())
}

fn store_refusal(err: &jetstream::context::PublishError) -> ErrorAnswer {
    use std::error::Error as _;
    let refusal = err
        .source()
        .and_then(|source| source.downcast_ref::<jetstream::Error>());
    match refusal {
        // nats-server answers every limit with 10077 and says which in its description.
        Some(refusal) if refusal.error_code().0 == 10077 => {
            if refusal.to_string().contains("per subject") {
                ErrorAnswer::new(
                    409,
                    "inbox_full",
                    format!(
                        "the recipient's inbox holds {INBOX_MAX_MESSAGES} undelivered messages: nothing was stored; try again once they have read some"
                    ),
                )
            } else {
                ErrorAnswer::new(
                    503,
                    "store_full",
                    "the server's message store is full: nothing was stored; try again later, and tell the server's operator",
                )
            }
        }
        Some(refusal) if refusal.error_code().0 == 10054 => ErrorAnswer::new(
            413,
            "too_large",
            "the message is larger than the inbox takes: nothing was stored",
        ),
        // No answer from the stream, or nats-server's "no stream found for given subject":
        // what a cluster electing the stream's leader answers for a few seconds.
        _ => ErrorAnswer::unavailable(format!(
            "the message store has no leader at the moment, as while a cluster elects one: nothing was stored ({err})"
        )),
    }
}

/// A device claim's refusal: the key is another identity's device, or holds a handle.
fn device_in_use(key: PublicKey) -> ErrorAnswer {
    ErrorAnswer::new(
        409,
        "device_in_use",
        format!(
            "{key} is a device or the key of another identity on this server: a key serves one identity; add a freshly generated device key"
        ),
    )
}

/// A registration's refusal: the key is a device of `identity`.
fn key_is_device(key: PublicKey, identity: PublicKey) -> ErrorAnswer {
    ErrorAnswer::new(
        409,
        "key_is_device",
        format!(
            "{key} is a device of {identity} on this server: it connects as that identity; register with a freshly generated key"
        ),
    )
}

fn in_progress() -> ErrorAnswer {
    ErrorAnswer::new(
        409,
        "key_has_handle",
        "another registration for this key is in progress or done; look the key up with kez.registry.whois",
    )
}

fn with_head(err: ErrorAnswer, seq: u64, head: LinkHash) -> ErrorAnswer {
    let message = format!("{}; the chain's head is seq {seq} ({head})", err.message);
    ErrorAnswer { message, ..err }.with_head(ChainHead { seq, head })
}

fn link_key(chain_hex: &str, seq: u64) -> String {
    format!("{chain_hex}.{seq}")
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("records serialise"))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ErrorAnswer> {
    serde_json::from_slice(bytes)
        .map_err(|err| ErrorAnswer::internal(format!("corrupt record: {err}")))
}

#[cfg(test)]
mod tests {
    use kez_core::sigchain::Endpoint;
    use kez_core::{Op, SecretKey, UnsignedLink};

    use super::*;

    #[test]
    fn each_device_of_a_message_has_its_own_msg_id() {
        let key = |seed| SecretKey::from_seed(&[seed; 32]).public_key();
        let id = kez_core::envelope::MessageId::from_bytes([0xab; 16]);
        let phone = inbox_msg_id(&key(2), &id);
        assert_eq!(phone, format!("{id}.{}", key(2).to_hex()));
        assert_ne!(phone, inbox_msg_id(&key(3), &id));
    }

    fn endpoint(name: &str) -> Op {
        Op::AddEndpoint(Endpoint {
            name: name.into(),
            kind: "nats".into(),
            address: "nats://127.0.0.1:4222".into(),
        })
    }

    #[test]
    fn start_times_are_rfc3339_to_the_microsecond() {
        assert_eq!(rfc3339_from_micros(0), "1970-01-01T00:00:00.000000Z");
        // Leap days, the end of a century that is a leap year, and the JSON limit (2^53 - 1).
        for (micros, text) in [
            (951_782_400_000_001, "2000-02-29T00:00:00.000001Z"),
            (1_796_441_712_123_456, "2026-12-05T03:35:12.123456Z"),
            (4_107_542_399_999_999, "2100-02-28T23:59:59.999999Z"),
            ((1 << 53) - 1, "2255-06-05T23:47:34.740991Z"),
        ] {
            assert_eq!(rfc3339_from_micros(micros), text);
            let parsed = async_nats::datetime::parse_rfc3339(text).unwrap();
            assert_eq!(parsed.unix_timestamp_nanos(), i128::from(micros) * 1000);
        }
    }

    #[test]
    fn an_append_verifies_on_the_kept_state_and_a_conflict_names_the_head() {
        let alice = SecretKey::from_seed(&[1; 32]);
        let first = UnsignedLink::first(alice.public_key(), 100, endpoint("a"))
            .sign(&alice)
            .unwrap();
        let one = verify_append(None, first.bytes()).unwrap();
        let second = one.next_link(101, endpoint("b")).sign(&alice).unwrap();
        let two = verify_append(Some(one.clone()), second.bytes()).unwrap();
        assert_eq!(two.seq(), 2);

        // A writer that had not seen link 2 writes its own link 2: 409, with the head to build on.
        let stale = one.next_link(102, endpoint("c")).sign(&alice).unwrap();
        let conflict = verify_append(Some(two.clone()), stale.bytes()).unwrap_err();
        assert_eq!((conflict.code, conflict.name.as_ref()), (409, "wrong_seq"));
        assert_eq!(
            conflict.head,
            Some(ChainHead {
                seq: 2,
                head: two.head()
            })
        );

        // A link signed by another key than it names: refused, with no head.
        let mallory = SecretKey::from_seed(&[2; 32]);
        let forged = two.next_link(103, endpoint("d")).sign(&mallory).unwrap();
        let refused = verify_append(Some(two), forged.bytes()).unwrap_err();
        assert_eq!(
            (refused.code, refused.name.as_ref()),
            (401, "bad_signature")
        );
        assert_eq!(refused.head, None);
        // A chain starts only with its first link.
        assert_eq!(verify_append(None, second.bytes()).unwrap_err().code, 409);
    }
}
