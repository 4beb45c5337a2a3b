//! The pairing relay (`kez.pair.*`, PROTOCOL.md §5.6): three write-once slots per pairing
//! request, through which an existing device and a new one exchange the offer, the answer and
//! the sync. The relay is not trusted: every message in a slot is signed or sealed end to end
//! (`kez_core::pair`); the relay only bounds who may touch which slot, how much and how long.

use kez_core::PublicKey;
use kez_core::pair::{CLOCK_SKEW_SECS, MAX_LIFETIME_SECS, Nonce};
use serde::{Deserialize, Serialize};

use crate::error::ErrorAnswer;

/// Most bytes of one slot's `data`.
pub const MAX_PAIR_DATA_BYTES: usize = 192 * 1024;
/// Most bytes of a `kez.pair.put` request.
pub const MAX_PAIR_REQUEST_BYTES: usize = MAX_PAIR_DATA_BYTES + 1024;

/// Which message of the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// The existing device's offer, for the new device.
    Offer,
    /// The new device's answer, for the device that made the offer.
    Answer,
    /// The existing device's sync envelope, for the new device.
    Sync,
}

impl Slot {
    /// The slot's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Offer => "offer",
            Slot::Answer => "answer",
            Slot::Sync => "sync",
        }
    }

    /// Whether the new device itself writes it (else: an existing device of an identity).
    pub fn written_by_new_device(self) -> bool {
        self == Slot::Answer
    }
}

/// `kez.pair.put`: writes one slot of the request of `device` named `nonce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutRequest {
    /// The new device's key (from the request).
    pub device: PublicKey,
    /// The request's nonce, 32 hex digits.
    pub nonce: String,
    /// Which slot.
    pub slot: Slot,
    /// The request's expiry: the slot is dropped then.
    pub expires: u64,
    /// The message (JSON text, or base64 of the sync envelope).
    pub data: String,
}

/// `kez.pair.get`: reads one slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetRequest {
    /// The new device's key.
    pub device: PublicKey,
    /// The request's nonce, 32 hex digits.
    pub nonce: String,
    /// Which slot.
    pub slot: Slot,
}

/// The answer to `kez.pair.put`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutAnswer {
    /// Always `true`.
    pub stored: bool,
}

/// The answer to `kez.pair.get` when the slot holds a message (else 404 `not_found`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetAnswer {
    /// The message, as written.
    pub data: String,
}

fn check_nonce(nonce: &str) -> Result<(), ErrorAnswer> {
    Nonce::from_hex(nonce)
        .map(drop)
        .ok_or_else(|| ErrorAnswer::malformed("nonce: 32 lowercase hex digits"))
}

impl PutRequest {
    /// The bounds of a put at `now`: nonce form, data size, an expiry in the future (410
    /// `expired`) and not further than any pairing request lives.
    pub fn check(&self, now: u64) -> Result<(), ErrorAnswer> {
        check_nonce(&self.nonce)?;
        if self.data.is_empty() {
            return Err(ErrorAnswer::malformed("data is empty"));
        }
        if self.data.len() > MAX_PAIR_DATA_BYTES {
            return Err(ErrorAnswer::too_large(
                "pairing message",
                self.data.len(),
                MAX_PAIR_DATA_BYTES,
            ));
        }
        if self.expires <= now {
            return Err(ErrorAnswer::new(
                410,
                "expired",
                "the pairing request has expired",
            ));
        }
        if self.expires > now + MAX_LIFETIME_SECS + CLOCK_SKEW_SECS {
            return Err(ErrorAnswer::malformed(format!(
                "expires: at most {} s from now",
                MAX_LIFETIME_SECS + CLOCK_SKEW_SECS
            )));
        }
        Ok(())
    }

    /// The slot's key in the relay's bucket: `<device hex>.<nonce>.<slot>`.
    pub fn slot_key(&self) -> String {
        slot_key(&self.device, &self.nonce, self.slot)
    }
}

impl GetRequest {
    /// The nonce's form.
    pub fn check(&self) -> Result<(), ErrorAnswer> {
        check_nonce(&self.nonce)
    }

    /// The slot's key in the relay's bucket.
    pub fn slot_key(&self) -> String {
        slot_key(&self.device, &self.nonce, self.slot)
    }
}

/// `<device hex>.<nonce hex>.<slot>`.
pub fn slot_key(device: &PublicKey, nonce: &str, slot: Slot) -> String {
    format!("{}.{nonce}.{}", device.to_hex(), slot.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;
    use crate::request::{Request, decode};

    fn put(body: &str) -> Result<PutRequest, ErrorAnswer> {
        match decode(Endpoint::PairPut, body.as_bytes(), "kez.test", 1000)? {
            Request::PairPut(request) => Ok(request),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn puts_are_bounded() {
        let key = kez_core::SecretKey::from_seed(&[1; 32]).public_key();
        let nonce = "00".repeat(16);
        let good = format!(
            r#"{{"device":"{key}","nonce":"{nonce}","slot":"answer","expires":1600,"data":"x"}}"#
        );
        assert_eq!(put(&good).unwrap().slot, Slot::Answer);
        for (bad, code) in [
            (good.replace("1600", "1000"), "expired"),
            (good.replace("1600", "999999"), "malformed"),
            (good.replace(&nonce, "00"), "malformed"),
            (good.replace("answer", "other"), "malformed"),
            (good.replace(r#""x""#, r#""""#), "malformed"),
            (good.replace("}", r#","more":1}"#), "malformed"),
            ("[]".to_owned(), "malformed"),
            (String::new(), "malformed"),
        ] {
            assert_eq!(put(&bad).unwrap_err().name, code, "{bad}");
        }
        let huge = good.replace(
            r#""x""#,
            &format!("\"{}\"", "x".repeat(MAX_PAIR_DATA_BYTES + 1)),
        );
        assert_eq!(put(&huge).unwrap_err().name, "too_large");
        let huger = "x".repeat(MAX_PAIR_REQUEST_BYTES + 1);
        assert_eq!(put(&huger).unwrap_err().name, "too_large");
    }
}
