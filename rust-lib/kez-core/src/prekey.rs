//! The Olm keys a device publishes (PROTOCOL.md §15.1): its Olm identity key, which the device
//! binds to itself in its sigchain (`set_olm_key`), and prekeys — one-time and fallback
//! Curve25519 keys that let another device start a forward-secret session with it while it is
//! offline. Each prekey is signed by the device's KEZ key together with the Olm identity key it
//! belongs to, so the key service (or anyone between) cannot hand out a key of its own.
//!
//! ```text
//! signed = "KEZ-OLM-PREKEY-V1" || 0x00 || device key (32) || Olm identity key (32)
//!          || kind (1: 0x00 one-time, 0x01 fallback) || prekey (32)
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::key::{KeyError, PublicKey, SecretKey, Signature, SignatureDomain, decode_hex};

/// A Curve25519 public key of Olm: a device's Olm identity key or one of its prekeys.
/// Text form: 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OlmKey([u8; 32]);

impl OlmKey {
    /// The key with these bytes. Any 32 bytes parse; a key that gives no contributory
    /// Diffie-Hellman is refused when a session is made with it.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        OlmKey(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for OlmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for OlmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OlmKey({self})")
    }
}

impl FromStr for OlmKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        Ok(OlmKey(decode_hex::<32>(text)?))
    }
}

serde_as_text!(OlmKey);

/// Whether a prekey is used once or until replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrekeyKind {
    /// Handed out at most once by the key service, then gone.
    OneTime,
    /// Handed out when no one-time key is left (or a claimer drains too fast); kept until the
    /// device publishes another.
    Fallback,
}

impl PrekeyKind {
    fn byte(self) -> u8 {
        match self {
            PrekeyKind::OneTime => 0,
            PrekeyKind::Fallback => 1,
        }
    }
}

/// A prekey with its kind and the device's signature. JSON: `{"key","kind","sig"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedPrekey {
    /// The Curve25519 prekey.
    pub key: OlmKey,
    /// One-time or fallback.
    pub kind: PrekeyKind,
    /// The device key's signature in [`SignatureDomain::OlmPrekey`].
    pub sig: Signature,
}

/// A prekey whose signature does not verify for the device and Olm identity key it was asked of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the prekey is not signed by this device for this Olm identity key")]
pub struct BadPrekey;

impl SignedPrekey {
    /// Signs `key` of `kind` as a prekey of the Olm account whose identity key is `identity`,
    /// held by `device`.
    pub fn sign(device: &SecretKey, identity: &OlmKey, key: OlmKey, kind: PrekeyKind) -> Self {
        let sig = device.sign(
            SignatureDomain::OlmPrekey,
            &signed_bytes(&device.public_key(), identity, &key, kind),
        );
        SignedPrekey { key, kind, sig }
    }

    /// Checks that `device` signed this prekey for the Olm account `identity`.
    pub fn verify(&self, device: &PublicKey, identity: &OlmKey) -> Result<(), BadPrekey> {
        device
            .verify(
                SignatureDomain::OlmPrekey,
                &signed_bytes(device, identity, &self.key, self.kind),
                &self.sig,
            )
            .map_err(|_| BadPrekey)
    }
}

/// The bytes after the domain tag: device key, identity key, kind byte, prekey.
fn signed_bytes(device: &PublicKey, identity: &OlmKey, key: &OlmKey, kind: PrekeyKind) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(32 + 32 + 1 + 32);
    bytes.extend_from_slice(device.as_bytes());
    bytes.extend_from_slice(identity.as_bytes());
    bytes.push(kind.byte());
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn olm(byte: u8) -> OlmKey {
        OlmKey::from_bytes([byte; 32])
    }

    #[test]
    fn a_prekey_verifies_only_for_its_device_identity_kind_and_key() {
        let device = SecretKey::from_seed(&[1; 32]);
        let other = SecretKey::from_seed(&[2; 32]).public_key();
        let signed = SignedPrekey::sign(&device, &olm(7), olm(9), PrekeyKind::OneTime);
        assert_eq!(signed.verify(&device.public_key(), &olm(7)), Ok(()));
        assert_eq!(signed.verify(&other, &olm(7)), Err(BadPrekey));
        assert_eq!(signed.verify(&device.public_key(), &olm(8)), Err(BadPrekey));
        let as_fallback = SignedPrekey {
            kind: PrekeyKind::Fallback,
            ..signed
        };
        assert_eq!(
            as_fallback.verify(&device.public_key(), &olm(7)),
            Err(BadPrekey)
        );
        let other_key = SignedPrekey {
            key: olm(10),
            ..signed
        };
        assert_eq!(
            other_key.verify(&device.public_key(), &olm(7)),
            Err(BadPrekey)
        );
    }

    #[test]
    fn json_has_one_form() {
        let device = SecretKey::from_seed(&[1; 32]);
        let signed = SignedPrekey::sign(&device, &olm(7), olm(9), PrekeyKind::Fallback);
        let json = serde_json::to_string(&signed).unwrap();
        assert!(json.starts_with(&format!(
            "{{\"key\":\"{}\",\"kind\":\"fallback\",\"sig\":\"",
            "09".repeat(32)
        )));
        assert_eq!(serde_json::from_str::<SignedPrekey>(&json).unwrap(), signed);
        assert!(serde_json::from_str::<OlmKey>(&format!("\"{}\"", "AB".repeat(32))).is_err());
        assert!(
            serde_json::from_str::<SignedPrekey>(&json.replace("}", ",\"x\":1}")).is_err(),
            "unknown members refused"
        );
    }
}
