//! `kez.mail.send` (PROTOCOL.md §6.3): the server stores a client's sealed envelope in the inbox
//! of a registered recipient, within the sender's budget of messages and bytes.
//!
//! Users cannot write into `KEZ_INBOX` themselves: an inbox subject nobody owns, or a flood from
//! one key, would otherwise fill the broker's disk. The envelope stays opaque: the server learns
//! its recipient, size and time, as the broker always did, and who handed it over.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use kez_core::PublicKey;
use kez_proto::ErrorAnswer;
use kez_proto::answer::Delivered;
use kez_proto::mail::SendRequest;

use crate::limits::{Caller, Limited, Limiters};
use crate::store::Store;

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
    async fn is_registered(&self, store: &Store, key: PublicKey) -> Result<bool, ErrorAnswer> {
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

/// Answers `kez.mail.send` from `caller`: the budget (before anything else), the recipient,
/// then the store.
pub async fn send(
    store: &Store,
    limiters: &Limiters,
    recipients: &Recipients,
    caller: &Caller,
    request: &SendRequest<'_>,
) -> Result<Bytes, ErrorAnswer> {
    if let Some(user) = &caller.user {
        let now = Instant::now();
        let size = u32::try_from(request.envelope.len()).unwrap_or(u32::MAX);
        limiters
            .send_per_key
            .check(user, now)
            .and_then(|()| limiters.send_bytes_per_key.take(user, size, now))
            .map_err(over_budget)?;
    }
    if !recipients.is_registered(store, request.to).await? {
        return Err(ErrorAnswer::new(
            404,
            "unknown_recipient",
            format!(
                "{} has no handle on this server: nothing was stored",
                request.to
            ),
        ));
    }
    let (seq, duplicate) = store
        .deliver(
            request.to,
            &request.id,
            Bytes::copy_from_slice(request.envelope),
        )
        .await?;
    kez_proto::answer::encode(&Delivered { seq, duplicate }).map(Bytes::from)
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
