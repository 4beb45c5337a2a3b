//! The pairing relay (`kez.pair.put`, `kez.pair.get`, PROTOCOL.md §5.6): three write-once
//! slots per pairing request, in the `kez_pairing` bucket, dropped when the request expires
//! (and at the latest when the bucket's age limit passes). The relay is not trusted by either
//! device — everything in a slot is signed or sealed end to end — so it only bounds who may
//! touch which slot: a key without a handle only the `answer` slot of its own requests and the
//! `offer` and `sync` slots addressed to it; a registered key or active device writes the
//! `offer` of another key's request, then its `sync`, and reads the `answer` to its own offer.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use kez_core::pair::{CLOCK_SKEW_SECS, MAX_LIFETIME_SECS};
use kez_core::{PublicKey, SecretKey, SignatureDomain};
use kez_proto::ErrorAnswer;
use kez_proto::pair::{
    GetAnswer, GetRequest, MAX_PAIR_DATA_BYTES, PutAnswer, PutRequest, Slot, slot_key,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::limits::Caller;
use crate::store::{DeviceState, Store};

/// The bucket of the slots.
pub const PAIRING_BUCKET: &str = "kez_pairing";
/// Most bytes the bucket holds (past it a put is 503 `unavailable`).
pub const PAIRING_BUCKET_BYTES: i64 = 64 * 1024 * 1024;

/// A relay that misbehaves on purpose, for the tests of what a hostile server can do during
/// pairing (it can only deny service). Never set outside tests: no flag or setting sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// Answers every offer itself, with its own key (seed `[0x66; 32]`).
    SubstituteKey,
    /// Changes the link in every offer (its time) before the new device reads it.
    AlterLink,
    /// Keeps the first answer it relays and hands it out for every later request.
    ReplayAnswer,
}

/// The relay's key when it plays [`Tamper::SubstituteKey`].
pub fn tamper_key() -> SecretKey {
    SecretKey::from_seed(&[0x66; 32])
}

/// One slot as stored.
#[derive(Serialize, Deserialize)]
struct Entry {
    data: String,
    expires: u64,
    /// The key that wrote it.
    by: PublicKey,
}

/// The relay's bucket and, in tests, its misbehaviour.
pub struct Relay {
    bucket: kv::Store,
    tamper: Option<Tamper>,
    first_answer: std::sync::Mutex<Option<String>>,
}

impl Relay {
    /// Opens (creating if needed) the bucket.
    pub async fn open(
        js: &jetstream::Context,
        replicas: Option<usize>,
        tamper: Option<Tamper>,
    ) -> Result<Relay, async_nats::Error> {
        let config = kv::Config {
            bucket: PAIRING_BUCKET.to_owned(),
            description: "kez-chat: pairing relay slots (short-lived)".to_owned(),
            history: 1,
            max_age: Duration::from_secs(MAX_LIFETIME_SECS + CLOCK_SKEW_SECS),
            max_value_size: (MAX_PAIR_DATA_BYTES + 1024) as i32,
            max_bytes: PAIRING_BUCKET_BYTES,
            storage: jetstream::stream::StorageType::Memory,
            num_replicas: replicas.unwrap_or(1),
            ..Default::default()
        };
        let bucket = crate::store::ensure_bucket(js, config).await?;
        Ok(Relay {
            bucket,
            tamper,
            first_answer: std::sync::Mutex::new(None),
        })
    }

    async fn entry(&self, key: &str, now: u64) -> Result<Option<Entry>, ErrorAnswer> {
        let Some(bytes) = self
            .bucket
            .get(key)
            .await
            .map_err(ErrorAnswer::unavailable)?
        else {
            return Ok(None);
        };
        let entry: Entry = serde_json::from_slice(&bytes)
            .map_err(|_| ErrorAnswer::internal("a pairing slot does not decode"))?;
        if entry.expires <= now {
            return Err(ErrorAnswer::new(
                410,
                "expired",
                "the pairing request has expired",
            ));
        }
        Ok(Some(entry))
    }

    /// `kez.pair.put`.
    pub async fn put(
        &self,
        store: &Store,
        caller: &Caller,
        request: &PutRequest,
        now: u64,
    ) -> Result<Bytes, ErrorAnswer> {
        let caller = caller_key(caller)?;
        let offer_key = slot_key(&request.device, &request.nonce, Slot::Offer);
        if request.slot.written_by_new_device() {
            if caller != request.device {
                return Err(not_yours("only the new device answers its own request"));
            }
        } else {
            if caller == request.device {
                return Err(not_yours(
                    "a new device cannot make its own offer: an existing device of the identity does",
                ));
            }
            if !may_offer(store, caller).await? {
                return Err(ErrorAnswer::new(
                    403,
                    "not_registered",
                    "only a registered key or an active device may offer a device",
                ));
            }
            if request.slot == Slot::Sync {
                match self.entry(&offer_key, now).await? {
                    Some(offer) if offer.by == caller => {}
                    Some(_) => return Err(not_yours("the offer of this request is another key's")),
                    None => {
                        return Err(ErrorAnswer::new(
                            409,
                            "no_offer",
                            "there is no offer for this request",
                        ));
                    }
                }
            }
        }
        let data = self.tamper(request, &offer_key, now).await;
        let entry = Entry {
            data,
            expires: request.expires,
            by: caller,
        };
        let value = Bytes::from(serde_json::to_vec(&entry).expect("an entry serialises"));
        match self.bucket.create(request.slot_key(), value).await {
            Ok(_) => answer(&PutAnswer { stored: true }),
            // The same put again (an answer lost on the way) is answered as the first was.
            Err(err)
                if err.kind() == kv::CreateErrorKind::AlreadyExists
                    && matches!(
                        self.entry(&request.slot_key(), now).await?,
                        Some(stored) if stored.by == caller && stored.data == entry.data
                    ) =>
            {
                answer(&PutAnswer { stored: true })
            }
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Err(ErrorAnswer::new(
                409,
                "slot_taken",
                format!(
                    "the {} of this pairing request was written already (each is written once)",
                    request.slot.as_str()
                ),
            )),
            Err(err) => Err(ErrorAnswer::unavailable(err)),
        }
    }

    /// `kez.pair.get`.
    pub async fn get(
        &self,
        caller: &Caller,
        request: &GetRequest,
        now: u64,
    ) -> Result<Bytes, ErrorAnswer> {
        let caller = caller_key(caller)?;
        if request.slot.written_by_new_device() {
            let offer = slot_key(&request.device, &request.nonce, Slot::Offer);
            match self.entry(&offer, now).await? {
                Some(offer) if offer.by == caller => {}
                _ => {
                    return Err(not_yours(
                        "only the device that made the offer reads the answer",
                    ));
                }
            }
        } else if caller != request.device {
            return Err(not_yours("only the new device reads what is sent to it"));
        }
        match self.entry(&request.slot_key(), now).await? {
            Some(entry) => answer(&GetAnswer { data: entry.data }),
            None => Err(ErrorAnswer::not_found(format!(
                "no {} for this pairing request yet",
                request.slot.as_str()
            ))),
        }
    }

    /// What a hostile relay would store instead of `request.data` (only with [`Tamper`]).
    async fn tamper(&self, request: &PutRequest, offer_key: &str, now: u64) -> String {
        let data = request.data.clone();
        match (self.tamper, request.slot) {
            (Some(Tamper::SubstituteKey), Slot::Answer) => {
                let Ok(Some(offer)) = self.entry(offer_key, now).await else {
                    return data;
                };
                let Ok(offer) = serde_json::from_str::<Value>(&offer.data) else {
                    return data;
                };
                let link = offer["link"].as_str().unwrap_or_default();
                let key = tamper_key();
                let counter_sig = key.sign(SignatureDomain::SigchainAddDevice, link.as_bytes());
                let mut value = json!({
                    "nonce": request.nonce,
                    "counter_sig": counter_sig.to_string(),
                });
                let signed = kez_core::canonical::encode(&value).expect("plain JSON");
                value["sig"] = json!(key.sign(SignatureDomain::PairAnswer, &signed).to_string());
                value.to_string()
            }
            (Some(Tamper::AlterLink), Slot::Offer) => {
                let Ok(mut offer) = serde_json::from_str::<Value>(&data) else {
                    return data;
                };
                let Some(link) = offer["link"]
                    .as_str()
                    .and_then(|link| serde_json::from_str::<Value>(link).ok())
                else {
                    return data;
                };
                let mut link = link;
                link["time"] = json!(link["time"].as_u64().unwrap_or_default() + 1);
                let link = kez_core::canonical::encode(&link).unwrap_or_default();
                offer["link"] = json!(String::from_utf8_lossy(&link));
                offer.to_string()
            }
            (Some(Tamper::ReplayAnswer), Slot::Answer) => {
                let mut first = self.first_answer.lock().expect("not poisoned");
                first.get_or_insert(data).clone()
            }
            _ => data,
        }
    }
}

/// Whether `key` may offer a device: it holds a handle, or is an active device.
async fn may_offer(store: &Store, key: PublicKey) -> Result<bool, ErrorAnswer> {
    if store.whois(key).await?.is_some() {
        return Ok(true);
    }
    Ok(matches!(
        store.device(key).await?,
        Some(record) if record.state == DeviceState::Active
    ))
}

fn caller_key(caller: &Caller) -> Result<PublicKey, ErrorAnswer> {
    caller
        .user
        .as_deref()
        .and_then(|user| PublicKey::from_nkey(user).ok())
        .ok_or_else(|| {
            ErrorAnswer::new(
                503,
                "unavailable",
                "pairing needs the auth callout (the relay must know who asks)",
            )
        })
}

fn not_yours(message: &str) -> ErrorAnswer {
    ErrorAnswer::new(403, "not_your_request", message)
}

fn answer<T: Serialize>(value: &T) -> Result<Bytes, ErrorAnswer> {
    kez_proto::answer::encode(value).map(Bytes::from)
}
