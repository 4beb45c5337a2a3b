//! `kez.mail.*` (PROTOCOL.md §6.3): `send` stores a client's sealed envelope in the inbox of a
//! registered recipient or of one of its active devices, within the budget of messages and bytes
//! of the sender's identity; `fetch` reads the caller's own device inbox and deletes what the
//! caller says it has stored.
//!
//! Users cannot touch `KEZ_MAIL` themselves: an inbox subject nobody owns, or a flood from one
//! key, would otherwise fill the broker's disk, and the JetStream calls that read or delete by
//! subject cannot be limited to one subject. The envelope stays opaque: the server learns its
//! recipient, size and time, as the broker always did, and who handed it over.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use kez_core::PublicKey;
use kez_proto::ErrorAnswer;
use kez_proto::answer::Delivered;
use kez_proto::mail::{FetchAnswer, FetchRequest, SendRequest};
use kez_proto::subjects::inbox_subject;

use crate::context::Context;
use crate::limits::{Caller, Limited, Limiters};
use crate::metrics::Metrics;
use crate::store::{DeviceState, Store};

/// Most recipients [`Recipients`] remembers; past it, it starts afresh.
const MAX_KNOWN_RECIPIENTS: usize = 100_000;

/// The keys known to be registered, so that a send costs a registry read only for a recipient
/// this instance has not delivered to yet. Registrations are never taken back, so a key once
/// registered stays valid; the set is bounded and cleared when full.
#[derive(Debug, Default)]
pub struct Recipients {
    known: Mutex<HashSet<PublicKey>>,
}

impl Recipients {
    /// Whether `key` holds a handle here.
    pub(crate) async fn is_registered(
        &self,
        store: &Store,
        key: PublicKey,
    ) -> Result<bool, ErrorAnswer> {
        if self.lock().contains(&key) {
            return Ok(true);
        }
        let registered = store.whois(key).await?.is_some();
        if registered {
            let mut known = self.lock();
            if known.len() >= MAX_KNOWN_RECIPIENTS {
                known.clear();
            }
            known.insert(key);
        }
        Ok(registered)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<PublicKey>> {
        self.known
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Most keys [`Identities`] remembers; past it, it starts afresh.
const MAX_KNOWN_IDENTITIES: usize = 100_000;

/// Which identity a caller of `kez.mail.*` speaks for. The keys found to be no device of
/// another identity are remembered: only a registered key or an active device gets a profile
/// that reaches `kez.mail.*` (PROTOCOL.md §6.2), and a registered key never becomes a device
/// (the device index takes no key with a handle), so that never goes stale. A device is looked
/// up at every call instead, so that one revoked since it connected is refused at once. Bounded,
/// and cleared when full.
#[derive(Debug, Default)]
pub struct Identities {
    own: Mutex<HashSet<PublicKey>>,
}

impl Identities {
    /// The identity `key`, a caller of `kez.mail.*`, speaks for: itself, or the identity whose
    /// active device it is. A device no longer active is 403 `revoked_device` (until the
    /// broker has closed its connection, [`crate::kick`]).
    pub(crate) async fn of(&self, store: &Store, key: PublicKey) -> Result<PublicKey, ErrorAnswer> {
        if self.lock().contains(&key) {
            return Ok(key);
        }
        match store.device(key).await? {
            None => {
                let mut own = self.lock();
                if own.len() >= MAX_KNOWN_IDENTITIES {
                    own.clear();
                }
                own.insert(key);
                Ok(key)
            }
            Some(device) if device.state == DeviceState::Active => Ok(device.identity),
            Some(device) => Err(ErrorAnswer::new(
                403,
                "revoked_device",
                format!(
                    "this connection's key is no active device of {}: its chain revoked it; add this device again with a new key",
                    device.identity
                ),
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<PublicKey>> {
        self.own.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Most callers [`Floors`] remembers; past it, it starts afresh.
const MAX_KNOWN_FLOORS: usize = 100_000;

/// What this instance knows of inbox sequences: the floor (sequence and time) each caller's
/// inbox was last purged to, so that a fetch naming the same floor again skips the purge; and
/// the stream's last sequence as last seen, so that only a floor past it costs a stream info.
/// Either may be forgotten at any time: it only saves work. A floor is only skipped when both
/// its sequence and time match (a restored or recreated stream stores other messages, at other
/// times, under the same sequences), and the check that nothing unread is purged never relies
/// on it.
#[derive(Debug, Default)]
pub struct Floors {
    purged: Mutex<HashMap<PublicKey, (u64, u64)>>,
    last_sequence: AtomicU64,
}

impl Floors {
    /// Notes that the stream holds (or held) sequence `seq`.
    fn saw(&self, seq: u64) {
        self.last_sequence.fetch_max(seq, Ordering::Relaxed);
    }

    /// Notes that the stream just stored a new message at `seq`: its last sequence, even when
    /// lower than what was seen before (the stream was restored or recreated since).
    fn stored(&self, seq: u64) {
        self.last_sequence.store(seq, Ordering::Relaxed);
    }

    fn purged_to(&self, key: &PublicKey, floor: (u64, u64)) -> bool {
        self.lock().get(key) == Some(&floor)
    }

    fn set_purged(&self, key: PublicKey, floor: (u64, u64)) {
        let mut purged = self.lock();
        if purged.len() >= MAX_KNOWN_FLOORS && !purged.contains_key(&key) {
            purged.clear();
        }
        purged.insert(key, floor);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PublicKey, (u64, u64)>> {
        self.purged
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Answers `kez.mail.fetch` from `caller`: checks the floor the caller names, purges its inbox
/// up to it (the acknowledgement), then reads what comes after. The inbox is the caller's own
/// device's, as nats-server names the connection; nothing in the body can name another.
pub async fn fetch(
    store: &Store,
    domain: &str,
    identities: &Identities,
    floors: &Floors,
    metrics: &Metrics,
    caller: &Caller,
    request: &FetchRequest,
) -> Result<Bytes, ErrorAnswer> {
    let key = caller_key(store, domain, caller).await?.ok_or_else(|| {
        ErrorAnswer::new(
            403,
            "forbidden",
            "kez.mail.fetch reads the inbox of the connection's key; connect through the server's auth callout with a registered key",
        )
    })?;
    let identity = identities.of(store, key).await?;
    let subject = inbox_subject(&identity, &key);
    if request.after > 0 {
        if request.after > floors.last_sequence.load(Ordering::Relaxed) {
            let last = store.inbox_last_sequence().await?;
            floors.saw(last);
            if request.after > last {
                return Err(ErrorAnswer::new(
                    409,
                    "floor_ahead",
                    format!(
                        "after is {}, but the inbox stream has only reached sequence {last}: nothing was deleted; fetch again from 0",
                        request.after
                    ),
                ));
            }
        }
        // A message of this inbox stored after the one at `after`, yet numbered at most
        // `after`: the stream was restored or recreated since, and purging up to `after`
        // would delete mail nobody read.
        if let Some(seq) = store
            .first_stored_since(&subject, request.time + 1)
            .await?
            .filter(|&seq| seq <= request.after)
        {
            return Err(ErrorAnswer::new(
                409,
                "inbox_reset",
                format!(
                    "the inbox holds a message (sequence {seq}) stored after the one at sequence {} that you have: the server's store was restored or recreated; nothing was deleted; fetch again from 0",
                    request.after
                ),
            ));
        }
        let floor = (request.after, request.time);
        if !floors.purged_to(&key, floor) {
            let purged = store.purge_inbox(&subject, request.after).await?;
            tracing::debug!(%key, upto = request.after, purged, "inbox acknowledged");
            metrics.record_inbox_acknowledged(purged);
            floors.set_purged(key, floor);
        }
    }
    let read = store
        .read_inbox(&subject, request.after, request.max)
        .await?;
    if let Some(last) = read.messages.last() {
        floors.saw(last.seq);
    }
    Ok(FetchAnswer::encode(read.pending, &read.fetched(), request.origins).into())
}

/// The key of the connection that sent a request: the callout names every user by its key's
/// nkey. Callouts of the previous release named registered users by their handle, and such an
/// authorization lives on for up to an hour after an upgrade: its handle is looked up.
async fn caller_key(
    store: &Store,
    domain: &str,
    caller: &Caller,
) -> Result<Option<PublicKey>, ErrorAnswer> {
    let Some(user) = caller.user.as_deref() else {
        return Ok(None);
    };
    if let Ok(key) = PublicKey::from_nkey(user) {
        return Ok(Some(key));
    }
    match kez_core::Handle::parse(user, domain) {
        Ok(handle) if handle.domain() == domain => {
            Ok(store.handle(handle.name()).await?.map(|record| record.key))
        }
        _ => Ok(None),
    }
}

/// Answers `kez.mail.send` from `caller`: the budget of the caller's identity (before anything
/// else but learning that identity), the recipient, then the store; or, for an identity that
/// moved to another server (PROTOCOL.md §14.6), the outbox toward its new home.
pub async fn send(
    ctx: &Context,
    caller: &Caller,
    request: &SendRequest<'_>,
    now: u64,
) -> Result<Bytes, ErrorAnswer> {
    let (store, mail) = (&ctx.store, &ctx.mail);
    charge(store, &ctx.limiters, mail, caller, request.envelope.len()).await?;
    let identity = recipient_identity(store, &mail.recipients, request.to).await?;
    // A forward's bounce goes back to the sending device: only a sender the callout names.
    let sender = caller
        .user
        .as_deref()
        .and_then(|user| PublicKey::from_nkey(user).ok());
    if let Some(device) = sender
        && let Some(domain) = crate::outbox::forward_domain(ctx, identity, request.to).await?
    {
        let sender_identity = mail.identities.of(store, device).await?;
        return crate::outbox::enqueue(ctx, &domain, device, sender_identity, request, now).await;
    }
    let (seq, duplicate) = store
        .deliver(
            identity,
            request.to,
            &request.id,
            Bytes::copy_from_slice(request.envelope),
        )
        .await?;
    // A duplicate's sequence is the earlier message's, not the stream's last.
    if !duplicate {
        mail.floors.stored(seq);
    }
    kez_proto::answer::encode(&Delivered { seq, duplicate }).map(Bytes::from)
}

/// Takes one message of `size` envelope bytes from the budget of `caller`'s identity
/// (`kez.mail.send` and `kez.mail.relay` share it), when nats-server names the caller.
pub(crate) async fn charge(
    store: &Store,
    limiters: &Limiters,
    mail: &MailState,
    caller: &Caller,
    size: usize,
) -> Result<(), ErrorAnswer> {
    let Some(user) = &caller.user else {
        return Ok(());
    };
    // One budget per identity, whichever of its devices sends: adding devices must not
    // multiply what one person can make the broker store. A user named by a handle (a
    // callout of 0.1) is an identity already.
    let budget = match PublicKey::from_nkey(user) {
        Ok(key) => mail.identities.of(store, key).await?.to_nkey(),
        Err(_) => user.clone(),
    };
    let now = Instant::now();
    let size = u32::try_from(size).unwrap_or(u32::MAX);
    limiters
        .send_per_key
        .check(&budget, now)
        .and_then(|()| limiters.send_bytes_per_key.take(&budget, size, now))
        .map_err(over_budget)
}

/// The identity whose device `to` is, when mail may be stored for it: `to` itself when it holds
/// a handle here, or the identity of which it is an active device. A revoked device is 410
/// `recipient_revoked`; any other key 404 `unknown_recipient`.
pub(crate) async fn recipient_identity(
    store: &Store,
    recipients: &Recipients,
    to: PublicKey,
) -> Result<PublicKey, ErrorAnswer> {
    if recipients.is_registered(store, to).await? {
        return Ok(to);
    }
    match store.device(to).await? {
        Some(device) if device.state == DeviceState::Active => Ok(device.identity),
        Some(device) if device.state == DeviceState::Revoked => Err(ErrorAnswer::new(
            410,
            "recipient_revoked",
            format!(
                "{to} is a revoked device of {}: nothing was stored; read that identity's chain again and send to its active devices",
                device.identity
            ),
        )),
        _ => Err(ErrorAnswer::new(
            404,
            "unknown_recipient",
            format!(
                "{to} has no handle and is no active device on this server: nothing was stored"
            ),
        )),
    }
}

/// What `kez.mail.*` remembers between requests, on one instance; any of it may be forgotten.
#[derive(Debug, Default)]
pub struct MailState {
    /// Keys known to be registered (`kez.mail.send` recipients).
    pub recipients: Recipients,
    /// The identity of each caller.
    pub identities: Identities,
    /// How far inboxes were purged, and the inbox stream's last sequence, as far as known.
    pub floors: Floors,
}

fn over_budget(limited: Limited) -> ErrorAnswer {
    let ms = limited.retry_after_ms();
    ErrorAnswer::new(
        429,
        "rate_limited",
        format!("this key has sent as much as the server takes for now; retry in {ms} ms"),
    )
    .with_retry_after_ms(ms)
}
