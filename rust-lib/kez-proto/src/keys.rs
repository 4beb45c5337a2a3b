//! `kez.keys.*` (PROTOCOL.md §15.2): the key service, which keeps each device's Olm prekeys —
//! one-time keys and one fallback key, each signed by the device's KEZ key — and hands one out
//! to a device that wants to start a forward-secret session with it.
//!
//! The server checks what it can without state here ([`PublishRequest::check`]: bounds, kinds,
//! no key twice); the prekeys' signatures are verified by the server against the caller's key,
//! which only it knows, and again by every claimer against the verified chain.

use kez_core::PublicKey;
use kez_core::prekey::{OlmKey, PrekeyKind, SignedPrekey};
use serde::{Deserialize, Serialize};

use crate::error::ErrorAnswer;

/// Most one-time keys one `kez.keys.publish` carries.
pub const MAX_PUBLISH_ONE_TIME: usize = 50;
/// Most one-time keys the server keeps for one device.
pub const MAX_STORED_ONE_TIME: usize = 100;

/// The body of `kez.keys.publish`: the caller's Olm identity key, one-time keys to add and,
/// optionally, a new fallback key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The Olm account's identity key (the one the device binds with `set_olm_key`). Another
    /// one than the server keeps replaces everything kept (a new account).
    pub identity_key: OlmKey,
    /// One-time keys, each of kind `one_time`, at most [`MAX_PUBLISH_ONE_TIME`].
    #[serde(default)]
    pub one_time: Vec<SignedPrekey>,
    /// A new fallback key (kind `fallback`), replacing the one kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<SignedPrekey>,
}

impl PublishRequest {
    /// The checks that need no state: at most [`MAX_PUBLISH_ONE_TIME`] one-time keys (else
    /// 400 `too_many_keys`), every member of its kind and no key given twice (else 400
    /// `malformed`). The signatures are the server's to verify, with the caller's key.
    pub fn check(&self) -> Result<(), ErrorAnswer> {
        if self.one_time.len() > MAX_PUBLISH_ONE_TIME {
            return Err(ErrorAnswer::too_many_keys(format!(
                "{} one-time keys in one request; at most {MAX_PUBLISH_ONE_TIME}",
                self.one_time.len()
            )));
        }
        if let Some(prekey) = self.one_time.iter().find(|p| p.kind != PrekeyKind::OneTime) {
            return Err(ErrorAnswer::malformed(format!(
                "one_time holds {}, a key of kind fallback",
                prekey.key
            )));
        }
        if let Some(fallback) = &self.fallback
            && fallback.kind != PrekeyKind::Fallback
        {
            return Err(ErrorAnswer::malformed(
                "fallback holds a key of kind one_time",
            ));
        }
        let mut keys: Vec<&OlmKey> = self
            .one_time
            .iter()
            .chain(&self.fallback)
            .map(|p| &p.key)
            .collect();
        keys.sort_unstable();
        if keys.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(ErrorAnswer::malformed("a prekey is given twice"));
        }
        Ok(())
    }

    /// Every prekey of the request (one-time keys, then the fallback).
    pub fn prekeys(&self) -> impl Iterator<Item = &SignedPrekey> {
        self.one_time.iter().chain(&self.fallback)
    }
}

/// The answer to `kez.keys.publish`: what the server keeps now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishAnswer {
    /// One-time keys kept.
    pub one_time: u64,
    /// Whether a fallback key is kept.
    pub fallback: bool,
}

/// The body of `kez.keys.count`: `{}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountRequest {}

/// The answer to `kez.keys.count`: what the server keeps of the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountAnswer {
    /// The Olm identity key the kept prekeys belong to, `null` when nothing is kept.
    pub identity_key: Option<OlmKey>,
    /// One-time keys kept.
    pub one_time: u64,
    /// Whether a fallback key is kept.
    pub fallback: bool,
}

/// The body of `kez.keys.claim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// The device whose prekey is wanted.
    pub device: PublicKey,
    /// The device's home domain, when it is another server's (PROTOCOL.md §14.3). Absent (or
    /// the served domain): this server's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// The answer to `kez.keys.claim`: one prekey of `device`, which the claimer verifies with
/// the device key and the Olm identity key its verified chain binds (never this answer's
/// `identity_key` alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimAnswer {
    /// The device asked about.
    pub device: PublicKey,
    /// The Olm identity key the prekey was published with.
    pub identity_key: OlmKey,
    /// The prekey: `kind` says whether it was a one-time key (now gone from the server) or
    /// the fallback key.
    pub prekey: SignedPrekey,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kez_core::SecretKey;

    fn olm(byte: u8) -> OlmKey {
        OlmKey::from_bytes([byte; 32])
    }

    fn request(device: &SecretKey, count: u8) -> PublishRequest {
        let identity = olm(1);
        PublishRequest {
            identity_key: identity,
            one_time: (0..count)
                .map(|i| SignedPrekey::sign(device, &identity, olm(10 + i), PrekeyKind::OneTime))
                .collect(),
            fallback: Some(SignedPrekey::sign(
                device,
                &identity,
                olm(2),
                PrekeyKind::Fallback,
            )),
        }
    }

    #[test]
    fn a_publish_is_bounded_of_its_kinds_and_without_repeats() {
        let device = SecretKey::from_seed(&[3; 32]);
        assert_eq!(request(&device, 50).check(), Ok(()));
        assert_eq!(
            request(&device, 51).check().unwrap_err().name,
            "too_many_keys"
        );
        let mut wrong = request(&device, 2);
        wrong.one_time[1].kind = PrekeyKind::Fallback;
        assert_eq!(wrong.check().unwrap_err().name, "malformed");
        let mut wrong = request(&device, 2);
        wrong.fallback.as_mut().unwrap().kind = PrekeyKind::OneTime;
        assert_eq!(wrong.check().unwrap_err().name, "malformed");
        let mut twice = request(&device, 2);
        twice.one_time[1] = twice.one_time[0];
        assert_eq!(twice.check().unwrap_err().name, "malformed");
        let json = serde_json::to_string(&request(&device, 1)).unwrap();
        assert!(json.starts_with(r#"{"identity_key":"0101"#), "{json}");
        let claim = ClaimRequest {
            device: device.public_key(),
            domain: None,
        };
        assert_eq!(
            serde_json::to_string(&claim).unwrap(),
            format!(r#"{{"device":"{}"}}"#, device.public_key())
        );
    }
}
