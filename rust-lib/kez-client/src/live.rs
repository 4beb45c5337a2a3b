//! Live notices: typing and presence (PROTOCOL.md §8.6, "Live notices"), sealed like any
//! message but sent over core NATS to each device's `kez.live.<identity hex>.<device hex>`,
//! never through the inbox and never stored: no acknowledgement, best effort, and a receiver
//! that is not listening simply misses them.
//!
//! [`Connection::send_live`] seals one envelope per active device of a contact and publishes
//! it; [`Connection::live_notices`] subscribes to the own device's live subject and yields the
//! notices that open, come from an active device of a pinned contact, are of an ephemeral
//! content type, are fresh ([`LIVE_WINDOW_SECS`]) and were not seen before. Everything else is
//! dropped with a `tracing::debug!` line. Nothing is written to the store.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kez_core::chat::{ChatContent, ChatError};
use kez_core::envelope::{self, EnvelopeError, MAX_ENVELOPE_BYTES, MessageId};
use kez_core::{PublicKey, SecretKey};
use kez_proto::subjects::live_subject;

use crate::connection::{Connection, NatsError, now};
use crate::store::{Contact, Store};

/// How far an envelope's time may be from the receiver's clock, either way, for a live notice
/// to be taken: older is stale (a delayed or replayed notice says nothing about now), later is
/// a sender's clock too far ahead.
pub const LIVE_WINDOW_SECS: u64 = 30;

/// How many notice ids a [`Connection::live_notices`] stream remembers to drop replays: those
/// of the last [`LIVE_WINDOW_SECS`] (twice, for the skew), at most this many (the oldest
/// forgotten first). Bounds its memory whatever the senders do.
pub const MAX_LIVE_IDS_REMEMBERED: usize = 4096;

/// How long [`Connection::live_notices`] waits for the broker to confirm its subscription.
const SUBSCRIBE_CONFIRMATION: std::time::Duration = std::time::Duration::from_secs(5);

/// The most messages kept that arrive while [`Connection::live_notices`] waits for that.
const MAX_EARLY_NOTICES: usize = 64;

/// A live notice from a contact ([`Connection::live_notices`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveNotice {
    /// The contact's handle as pinned, e.g. `@alice@kez.lat`.
    pub handle: String,
    /// The contact's identity (the sigchain id).
    pub identity: PublicKey,
    /// The device that signed it: an active device of the contact's pinned chain.
    pub device: PublicKey,
    /// `kez.typing` or `kez.presence` ([`ChatContent::Typing`], [`ChatContent::Presence`]).
    pub content: ChatContent,
    /// The envelope's time (the sender's clock), seconds since the epoch.
    pub time: u64,
    /// The notice's id (the same in the envelope to each of the receiver's devices).
    pub id: MessageId,
}

/// Why a live notice was not sent, or the live subscription not made.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Only `kez.typing` and `kez.presence` travel live; everything else goes through the inbox
    /// ([`Connection::send`]).
    #[error("{0} is not an ephemeral content type: only kez.typing and kez.presence are sent live")]
    NotEphemeral(&'static str),
    /// The body breaks its rules (§8.6).
    #[error("the notice's body is refused: {0}")]
    Body(ChatError),
    /// The notice could not be sealed.
    #[error("cannot seal the notice: {0}")]
    Seal(EnvelopeError),
    /// A body larger than one envelope carries (never for the ephemeral types' bodies).
    #[error("the notice is {size} bytes; one envelope carries at most {max} bytes")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The most it may be.
        max: usize,
    },
    /// The broker connection failed.
    #[error("could not {action}: {source}")]
    Nats {
        /// What was being done.
        action: &'static str,
        /// async-nats' error.
        source: NatsError,
    },
}

impl Connection {
    /// Sends `content`, a `kez.typing` or `kez.presence` body, to each active non-paper device
    /// of `contact` (as pinned: check it with [`Connection::verify_contact`] now and then), one
    /// envelope each with one id, published on the device's live subject
    /// ([`kez_proto::subjects::live_subject`]) over core NATS: no acknowledgement, nothing
    /// stored, a device not listening misses it. Nothing goes to the own other devices. An
    /// error means nothing, or not every envelope, was handed to the connection; `Ok` only
    /// that they were (the broker may still drop them).
    pub async fn send_live(
        &self,
        contact: &Contact,
        content: &ChatContent,
    ) -> Result<(), LiveError> {
        if !content.is_ephemeral() {
            return Err(LiveError::NotEphemeral(content.content_type()));
        }
        let content_type = content.content_type();
        let body = content.encode().map_err(LiveError::Body)?;
        let time = now();
        let max = envelope::max_body_len(content_type, time).unwrap_or(0);
        if body.len() > max {
            return Err(LiveError::TooLarge {
                size: body.len(),
                max,
            });
        }
        let id = MessageId::random();
        let mut sealed = Vec::new();
        for device in contact.recipient_keys() {
            let envelope =
                envelope::seal_with_id(self.secret_key(), &device, content_type, &body, time, id)
                    .map_err(LiveError::Seal)?;
            sealed.push((live_subject(&contact.key, &device), envelope));
        }
        for (subject, envelope) in sealed {
            self.nats()
                .publish(subject, envelope.into())
                .await
                .map_err(|err| LiveError::Nats {
                    action: "publish a live notice",
                    source: err.into(),
                })?;
        }
        Ok(())
    }

    /// Subscribes to this device's live subject and yields, as they arrive, the notices that
    /// are a contact's (see the module docs; `store` names the contacts, and is only read).
    /// The subscription is in place when this returns (the broker echoed an empty message on
    /// it, waiting up to 5 s), and ends when the stream is dropped. A notice from a contact's device that `store` has not pinned yet is dropped:
    /// a notice costs the receiver no network round trip.
    pub async fn live_notices<'a>(
        &'a self,
        store: &'a Store,
    ) -> Result<impl Stream<Item = LiveNotice> + 'a, LiveError> {
        let subject = live_subject(&self.identity(), &self.public_key());
        let nats_error = |err: NatsError| LiveError::Nats {
            action: "subscribe to the own live notices",
            source: err,
        };
        let mut subscriber = self
            .nats()
            .subscribe(subject.clone())
            .await
            .map_err(|err| nats_error(err.into()))?;
        // A flush only writes the SUB to the socket: an empty message to the own subject, heard
        // back, proves the broker has the subscription. What arrives before it is kept.
        self.nats()
            .publish(subject, Bytes::new())
            .await
            .map_err(|err| nats_error(err.into()))?;
        let mut early = Vec::new();
        let confirmed = tokio::time::timeout(SUBSCRIBE_CONFIRMATION, async {
            while let Some(message) = subscriber.next().await {
                if message.payload.is_empty() {
                    return true;
                }
                if early.len() < MAX_EARLY_NOTICES {
                    early.push(message);
                }
            }
            false
        })
        .await;
        if confirmed != Ok(true) {
            tracing::warn!("the broker did not confirm the live-notice subscription in time");
        }
        let key = self.secret_key().clone();
        let mut seen = SeenIds::default();
        Ok(futures::stream::iter(early)
            .chain(subscriber)
            .filter_map(move |message| {
                let notice = accept(&key, store, &mut seen, &message.payload, now());
                futures::future::ready(notice)
            }))
    }
}

/// The ids of live notices taken lately, to drop a replay: bounded by
/// [`MAX_LIVE_IDS_REMEMBERED`], an id forgotten once its notice is out of the window.
#[derive(Debug, Default)]
struct SeenIds {
    ids: HashSet<MessageId>,
    order: VecDeque<(MessageId, u64)>,
}

impl SeenIds {
    /// Remembers `id` of a notice at `time`; `false` when it was seen already.
    fn insert(&mut self, id: MessageId, time: u64, now: u64) -> bool {
        if self.ids.contains(&id) {
            return false;
        }
        // A notice whose time is before this is stale at once: its id need not be kept.
        let forget_before = now.saturating_sub(LIVE_WINDOW_SECS);
        while let Some(&(old, old_time)) = self.order.front() {
            if old_time >= forget_before && self.order.len() < MAX_LIVE_IDS_REMEMBERED {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&old);
        }
        self.ids.insert(id);
        self.order.push_back((id, time));
        true
    }
}

/// Checks one live-notice payload for `key`'s device at `now` and yields it as a
/// [`LiveNotice`], or logs why it is dropped. At most one envelope opened and one contact read.
fn accept(
    key: &SecretKey,
    store: &Store,
    seen: &mut SeenIds,
    payload: &[u8],
    now: u64,
) -> Option<LiveNotice> {
    if payload.len() > MAX_ENVELOPE_BYTES {
        tracing::debug!(size = payload.len(), "dropping a live notice: too large");
        return None;
    }
    let message = match envelope::open(key, payload) {
        Ok(message) => message,
        Err(err) => {
            tracing::debug!(
                code = err.code(),
                size = payload.len(),
                "dropping a live notice that does not open: {err}"
            );
            return None;
        }
    };
    let (from, id, time) = (message.from, message.id, message.time);
    let content = match ChatContent::decode(&message.content_type, &message.body) {
        Ok(content) if content.is_ephemeral() => content,
        Ok(_) | Err(ChatError::NotChat(_)) => {
            tracing::debug!(content_type = %message.content_type, %from, "dropping a live notice: not an ephemeral content type");
            return None;
        }
        Err(err) => {
            tracing::debug!(code = err.code(), %from, "dropping a live notice: its body is refused: {err}");
            return None;
        }
    };
    if time + LIVE_WINDOW_SECS < now || time > now + LIVE_WINDOW_SECS {
        tracing::debug!(time, now, %from, "dropping a live notice: not fresh");
        return None;
    }
    let contact = match store.contact_by_key(&from) {
        Ok(Some(contact)) => contact,
        Ok(None) => {
            tracing::debug!(%from, "dropping a live notice: not an active device of a contact");
            return None;
        }
        Err(err) => {
            tracing::debug!(%from, "dropping a live notice: the store failed: {err}");
            return None;
        }
    };
    if !seen.insert(id, time, now) {
        tracing::debug!(%id, %from, "dropping a live notice: seen before");
        return None;
    }
    Some(LiveNotice {
        handle: contact.handle,
        identity: contact.key,
        device: from,
        content,
        time,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_ids_drop_repeats_and_stay_bounded() {
        let mut seen = SeenIds::default();
        let now = 1_767_225_600;
        let first = MessageId::random();
        assert!(seen.insert(first, now, now));
        assert!(!seen.insert(first, now, now), "a replay");
        for _ in 0..MAX_LIVE_IDS_REMEMBERED * 2 {
            assert!(seen.insert(MessageId::random(), now, now));
        }
        assert!(seen.ids.len() <= MAX_LIVE_IDS_REMEMBERED);
        assert_eq!(seen.ids.len(), seen.order.len());
        // Once out of the window, ids are forgotten at the next insert.
        let later = now + 3 * LIVE_WINDOW_SECS;
        assert!(seen.insert(MessageId::random(), later, later));
        assert_eq!(seen.ids.len(), 1);
    }
}
