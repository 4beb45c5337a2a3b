//! `kez.keys.*` (PROTOCOL.md §15.2): the key service. Each device's Olm prekeys — at most
//! [`MAX_STORED_ONE_TIME`] one-time keys and one fallback key, each signed by the device's KEZ
//! key — are one entry of the `kez_olm_keys` bucket, keyed by the device key's hex. Every change
//! is a compare-and-set on the entry's revision, retried on a lost race, so a one-time key is
//! handed out at most once whichever instances serve the claims: it is removed from the entry
//! before the claim is answered.
//!
//! The server verifies every prekey a device publishes against the device's key (the
//! connection's, which nats-server vouches for), so it stores nothing the device did not sign;
//! a claimer verifies again against the Olm identity key the device's chain binds, so a server
//! cannot hand out a key of its own either.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use kez_core::PublicKey;
use kez_core::prekey::{OlmKey, PrekeyKind, SignedPrekey};
use kez_proto::ErrorAnswer;
use kez_proto::keys::{
    ClaimAnswer, CountAnswer, MAX_STORED_ONE_TIME, PublishAnswer, PublishRequest,
};
use serde::{Deserialize, Serialize};

use crate::limits::{Caller, Limiters};
use crate::mail::Recipients;
use crate::metrics::{ClaimServed, Metrics};
use crate::store::{DeviceState, Store};

/// The bucket of the prekeys.
pub const OLM_KEYS_BUCKET: &str = "kez_olm_keys";
/// Largest entry: a hundred signed one-time keys and a fallback key come to about 24 KiB.
const MAX_ENTRY_BYTES: i32 = 64 * 1024;
/// Attempts at one compare-and-set change before answering 503 (only instances racing on the
/// same device lose: the claims of one instance are queued per device before they read).
const CAS_ATTEMPTS: usize = 50;
/// Prekeys up to which a publish verifies their signatures on the async worker itself (about
/// 40 µs each); more go to the blocking pool.
const INLINE_VERIFIES: usize = 8;
/// Locks per instance that queue the changes to one device's entry (by the key's first byte).
const LOCKS: usize = 64;

/// One device's prekeys, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    identity_key: OlmKey,
    one_time: Vec<SignedPrekey>,
    fallback: Option<SignedPrekey>,
}

/// The key service's bucket and the locks that queue one instance's changes per device.
pub struct Keys {
    bucket: kv::Store,
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl Keys {
    /// Opens (creating if needed) the bucket.
    pub async fn open(
        js: &jetstream::Context,
        replicas: Option<usize>,
    ) -> Result<Keys, async_nats::Error> {
        let config = kv::Config {
            bucket: OLM_KEYS_BUCKET.to_owned(),
            description: "kez-chat: devices' Olm prekeys (one-time and fallback)".to_owned(),
            history: 1,
            max_value_size: MAX_ENTRY_BYTES,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas.unwrap_or(0),
            ..Default::default()
        };
        let bucket = crate::store::ensure_bucket(js, config).await?;
        Ok(Keys {
            bucket,
            locks: (0..LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
        })
    }

    fn lock(&self, device: &PublicKey) -> &tokio::sync::Mutex<()> {
        &self.locks[usize::from(device.as_bytes()[0]) % LOCKS]
    }

    async fn load(&self, device: &PublicKey) -> Result<(Option<Entry>, Option<u64>), ErrorAnswer> {
        let key = device.to_hex();
        match self
            .bucket
            .entry(&key)
            .await
            .map_err(ErrorAnswer::unavailable)?
        {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let stored = serde_json::from_slice(&entry.value).map_err(|err| {
                    ErrorAnswer::internal(format!("corrupt prekeys of {key}: {err}"))
                })?;
                Ok((Some(stored), Some(entry.revision)))
            }
            Some(entry) => Ok((None, Some(entry.revision))),
            None => Ok((None, None)),
        }
    }

    /// Writes `entry` if the entry is still at `revision`; `Ok(false)`: another write came
    /// first.
    async fn store(
        &self,
        device: &PublicKey,
        entry: &Entry,
        revision: Option<u64>,
    ) -> Result<bool, ErrorAnswer> {
        let key = device.to_hex();
        let value = Bytes::from(serde_json::to_vec(entry).expect("prekeys serialise"));
        crate::store::compare_and_set(&self.bucket, &key, value, revision).await
    }

    /// Applies `change` to `device`'s entry with compare-and-set until it sticks (this
    /// instance's changes to one device queue on a lock first, so only other instances race).
    async fn update<T>(
        &self,
        device: &PublicKey,
        mut change: impl FnMut(Option<Entry>) -> Result<Step<T>, ErrorAnswer>,
    ) -> Result<T, ErrorAnswer> {
        let _queued = self.lock(device).lock().await;
        for attempt in 0..CAS_ATTEMPTS {
            let (entry, revision) = self.load(device).await?;
            match change(entry)? {
                Step::Done(out) => return Ok(out),
                Step::Write(entry, out) => {
                    if self.store(device, &entry, revision).await? {
                        return Ok(out);
                    }
                }
            }
            // Spread the retries of instances racing on the same device.
            let pause = 1 + (attempt as u64 % 7) * 3;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        Err(ErrorAnswer::unavailable(
            "too many concurrent changes to this device's prekeys",
        ))
    }

    /// `kez.keys.publish` by `caller`: every prekey verified with the caller's key and the
    /// request's identity key, then added to what is kept (or, for another identity key,
    /// replacing it).
    pub async fn publish(
        &self,
        store: &Store,
        recipients: &Recipients,
        metrics: &Metrics,
        caller: &Caller,
        request: PublishRequest,
    ) -> Result<Bytes, ErrorAnswer> {
        let device = own_device(store, recipients, caller).await?;
        let request = verify_prekeys(device, request).await?;
        let (answer, added) = self
            .update(&device, |stored| {
                let mut entry = match stored {
                    Some(entry) if entry.identity_key == request.identity_key => entry,
                    _ => Entry {
                        identity_key: request.identity_key,
                        one_time: Vec::new(),
                        fallback: None,
                    },
                };
                let before = entry.one_time.len();
                for prekey in &request.one_time {
                    if !entry.one_time.iter().any(|kept| kept.key == prekey.key) {
                        entry.one_time.push(*prekey);
                    }
                }
                if entry.one_time.len() > MAX_STORED_ONE_TIME {
                    return Err(ErrorAnswer::too_many_keys(format!(
                        "the server would keep {} one-time keys of this device; at most {MAX_STORED_ONE_TIME} (ask kez.keys.count, publish fewer)",
                        entry.one_time.len()
                    )));
                }
                let added = (entry.one_time.len() - before) as u64
                    + u64::from(request.fallback.is_some());
                if let Some(fallback) = request.fallback {
                    entry.fallback = Some(fallback);
                }
                let answer = PublishAnswer {
                    one_time: entry.one_time.len() as u64,
                    fallback: entry.fallback.is_some(),
                };
                Ok(Step::Write(entry, (answer, added)))
            })
            .await?;
        metrics.record_prekeys_published(added);
        answer_json(&answer)
    }

    /// `kez.keys.count` by `caller`: what is kept of its own.
    pub async fn count(
        &self,
        store: &Store,
        recipients: &Recipients,
        caller: &Caller,
    ) -> Result<Bytes, ErrorAnswer> {
        let device = own_device(store, recipients, caller).await?;
        let (entry, _) = self.load(&device).await?;
        answer_json(&match entry {
            Some(entry) => CountAnswer {
                identity_key: Some(entry.identity_key),
                one_time: entry.one_time.len() as u64,
                fallback: entry.fallback.is_some(),
            },
            None => CountAnswer {
                identity_key: None,
                one_time: 0,
                fallback: false,
            },
        })
    }

    /// `kez.keys.claim` of a device of this server's: a one-time key taken (removed by
    /// compare-and-set before it is answered) while the device's one-time budget lasts, else
    /// the fallback key. The claimer's own budget is the caller's to check.
    pub async fn claim(
        &self,
        store: &Store,
        recipients: &Recipients,
        limiters: &Limiters,
        metrics: &Metrics,
        device: PublicKey,
    ) -> Result<ClaimAnswer, ErrorAnswer> {
        if !is_user(store, recipients, device).await? {
            return Err(ErrorAnswer::no_prekeys(&device));
        }
        let target = device.to_hex();
        // One token of the device's budget per claim answered with a one-time key, taken once
        // however many races the claim loses.
        let mut budget: Option<Result<(), u64>> = None;
        let claimed = self
            .update(&device, |stored| {
                let Some(mut entry) = stored else {
                    return Err(ErrorAnswer::no_prekeys(&device));
                };
                if !entry.one_time.is_empty() {
                    let allowed = *budget.get_or_insert_with(|| {
                        limiters
                            .one_time_per_target
                            .check(&target, Instant::now())
                            .map_err(|limited| limited.retry_after_ms())
                    });
                    match (allowed, entry.fallback) {
                        (Ok(()), _) => {
                            // The newest first: an Olm account that made more one-time keys
                            // than it keeps forgets its oldest.
                            let prekey = entry.one_time.pop().expect("not empty");
                            let answer = claim_answer(device, &entry, prekey);
                            return Ok(Step::Write(entry, answer));
                        }
                        (Err(_), Some(fallback)) => {
                            return Ok(Step::Done(claim_answer(device, &entry, fallback)));
                        }
                        (Err(ms), None) => {
                            return Err(ErrorAnswer::rate_limited(
                                format!(
                                    "{device}'s one-time keys are being claimed too fast and it has no fallback key; retry in {ms} ms"
                                ),
                                ms,
                            ));
                        }
                    }
                }
                match entry.fallback {
                    Some(fallback) => Ok(Step::Done(claim_answer(device, &entry, fallback))),
                    None => Err(ErrorAnswer::no_prekeys(&device)),
                }
            })
            .await?;
        metrics.record_prekey_claim(match claimed.prekey.kind {
            PrekeyKind::OneTime => ClaimServed::OneTime,
            PrekeyKind::Fallback => ClaimServed::Fallback,
        });
        Ok(claimed)
    }
}

enum Step<T> {
    Write(Entry, T),
    Done(T),
}

fn claim_answer(device: PublicKey, entry: &Entry, prekey: SignedPrekey) -> ClaimAnswer {
    ClaimAnswer {
        device,
        identity_key: entry.identity_key,
        prekey,
    }
}

/// Checks every prekey's signature by `device` for the request's identity key (on the
/// blocking pool when there are many): 401 `bad_signature` naming the first that fails.
async fn verify_prekeys(
    device: PublicKey,
    request: PublishRequest,
) -> Result<PublishRequest, ErrorAnswer> {
    fn verify(device: &PublicKey, request: &PublishRequest) -> Result<(), ErrorAnswer> {
        match request
            .prekeys()
            .find(|prekey| prekey.verify(device, &request.identity_key).is_err())
        {
            Some(bad) => Err(ErrorAnswer::new(
                401,
                "bad_signature",
                format!(
                    "the prekey {} is not signed by this connection's key for the Olm identity key {}",
                    bad.key, request.identity_key
                ),
            )),
            None => Ok(()),
        }
    }
    if request.prekeys().count() <= INLINE_VERIFIES {
        verify(&device, &request)?;
        return Ok(request);
    }
    tokio::task::spawn_blocking(move || verify(&device, &request).map(|()| request))
        .await
        .map_err(|err| ErrorAnswer::internal(format!("verifying prekeys: {err}")))?
}

/// The connection's key, when it is a registered key or an active device of this server:
/// 403 `forbidden` without one (no callout), `revoked_device` for a device its chain revoked,
/// `not_registered` for any other key.
async fn own_device(
    store: &Store,
    recipients: &Recipients,
    caller: &Caller,
) -> Result<PublicKey, ErrorAnswer> {
    let key = caller
        .user
        .as_deref()
        .and_then(|user| PublicKey::from_nkey(user).ok())
        .ok_or_else(|| {
            ErrorAnswer::new(
                403,
                "forbidden",
                "kez.keys.publish and kez.keys.count are about the connection's key; connect through the server's auth callout with a registered key",
            )
        })?;
    match store.device(key).await? {
        Some(device) if device.state == DeviceState::Active => Ok(key),
        Some(device) if device.state == DeviceState::Revoked => Err(ErrorAnswer::new(
            403,
            "revoked_device",
            format!(
                "this connection's key is no active device of {}: its chain revoked it",
                device.identity
            ),
        )),
        Some(_) => Err(not_registered()),
        None if recipients.is_registered(store, key).await? => Ok(key),
        None => Err(not_registered()),
    }
}

fn not_registered() -> ErrorAnswer {
    ErrorAnswer::new(
        403,
        "not_registered",
        "only a registered key or an active device publishes prekeys",
    )
}

/// Whether `key` is a user here: an active device, or a registered key its chain has not
/// revoked.
async fn is_user(
    store: &Store,
    recipients: &Recipients,
    key: PublicKey,
) -> Result<bool, ErrorAnswer> {
    match store.device(key).await? {
        Some(device) => Ok(device.state == DeviceState::Active),
        None => recipients.is_registered(store, key).await,
    }
}

fn answer_json<T: Serialize>(value: &T) -> Result<Bytes, ErrorAnswer> {
    kez_proto::answer::encode(value).map(Bytes::from)
}
