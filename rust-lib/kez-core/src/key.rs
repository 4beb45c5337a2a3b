//! ed25519 keys: the KEZ primary key, its text form, and its NATS nkey form.
//!
//! One key is three things at once: the user's KEZ identity (`ed25519:<hex>`), the signer of their
//! sigchain, and their NATS credential (`U...` nkey). This module converts between the forms and
//! never lets a secret escape into `Debug` output.

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE32_NOPAD, HEXLOWER};
use ed25519_dalek::{SigningKey, VerifyingKey};
use zeroize::Zeroizing;

/// Text prefix of a public key: `ed25519:` followed by 64 lowercase hex digits.
pub const PUBLIC_KEY_PREFIX: &str = "ed25519:";
/// Text prefix of a secret key file's single line: `ed25519-secret:` then 64 lowercase hex digits.
pub const SECRET_KEY_PREFIX: &str = "ed25519-secret:";
/// The nkey prefix byte of a NATS user key (`'U'` once base32-encoded).
const NKEY_USER_PREFIX_BYTE: u8 = 20 << 3;
/// Length of a NATS user nkey string: base32 of prefix (1) + key (32) + CRC-16 (2) bytes.
pub const NKEY_LEN: usize = 56;

/// Why a key could not be parsed or used. Each variant is a distinct, stable failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text does not start with the expected prefix.
    #[error("a KEZ key starts with `{expected}` (got {found:?})")]
    MissingPrefix {
        /// The prefix the text must start with.
        expected: &'static str,
        /// The first characters that were found instead (never a secret).
        found: String,
    },
    /// The hex part is not exactly the expected number of lowercase hex digits.
    #[error("expected {expected} lowercase hex digits after the prefix, got {found} characters")]
    BadHexLength {
        /// Required number of hex digits.
        expected: usize,
        /// Number of characters found.
        found: usize,
    },
    /// The hex part holds something other than `0-9a-f` (uppercase is refused: one text per key).
    #[error("key hex must be lowercase 0-9a-f only")]
    NotLowercaseHex,
    /// The 32 bytes are not the canonical encoding of a point on the curve.
    #[error("these 32 bytes are not a valid ed25519 public key")]
    InvalidPoint,
    /// The point has small order: signatures by it prove nothing, so it is never accepted.
    #[error("this ed25519 public key is a weak (small-order) point and cannot be used")]
    WeakKey,
    /// The point has a small-order (torsion) component: it is not a multiple of the base
    /// point, as every key made by ed25519 key generation is. Cofactorless and cofactored
    /// verifiers may disagree on signatures by such a key, so it is never accepted.
    #[error(
        "this ed25519 public key has a small-order component (it is not a multiple of the base point) and cannot be used"
    )]
    MixedOrder,
    /// The nkey string is not 56 base32 characters of a NATS user key.
    #[error("not a NATS user nkey: expected 56 base32 characters starting with 'U'")]
    BadNkey,
    /// The nkey's CRC-16 does not match its content (a typo or truncation).
    #[error("NATS nkey checksum mismatch: the key was mistyped or truncated")]
    BadNkeyChecksum,
}

/// What a KEZ key signs for (PROTOCOL.md §1.4). Every signature made with a KEZ key is over
///
/// ```text
/// tag || 0x00 || body
/// ```
///
/// for exactly one of these domains, so a signature made for one purpose never verifies for
/// another, and nobody who hands a client bytes to sign (a broker's nonce, a peer's request)
/// can make them mean something else. The tags are distinct, start with `KEZ-` and contain no
/// zero byte, so the signed messages of two domains can never be equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignatureDomain {
    /// A registration request (§5.2): `KEZ-REGISTER-V1`.
    Register,
    /// A sigchain link (§4.2): `KEZ-SIGCHAIN-LINK-V1`.
    SigchainLink,
    /// The new key's counter-signature of a `rotate` link (§4.2): `KEZ-SIGCHAIN-ROTATE-V1`.
    SigchainRotate,
    /// The new device key's counter-signature of an `add_device` link (§4.2):
    /// `KEZ-SIGCHAIN-ADD-DEVICE-V1`.
    SigchainAddDevice,
    /// A pin request (§10.1): `KEZ-PIN-V1`.
    Pin,
    /// A shared-files manifest (§11.1): `KEZ-MANIFEST-V1`.
    Manifest,
    /// An end-to-end message (§8.1): `KEZ-MESSAGE-V1`.
    Message,
    /// The proof of the key when connecting to the broker (§6.1): `KEZ-NATS-CONNECT-V1`.
    NatsConnect,
    /// A pairing offer by an existing device (§4.7): `KEZ-PAIR-OFFER-V1`.
    PairOffer,
    /// A pairing answer by the new device (§4.7): `KEZ-PAIR-ANSWER-V1`.
    PairAnswer,
    /// A device's Olm prekey (one-time or fallback, §15.1): `KEZ-OLM-PREKEY-V1`.
    OlmPrekey,
}

impl SignatureDomain {
    /// Every domain.
    pub const ALL: [SignatureDomain; 11] = [
        SignatureDomain::Register,
        SignatureDomain::SigchainLink,
        SignatureDomain::SigchainRotate,
        SignatureDomain::SigchainAddDevice,
        SignatureDomain::Pin,
        SignatureDomain::Manifest,
        SignatureDomain::Message,
        SignatureDomain::NatsConnect,
        SignatureDomain::PairOffer,
        SignatureDomain::PairAnswer,
        SignatureDomain::OlmPrekey,
    ];

    /// The domain's tag: the bytes before the zero byte.
    pub fn tag(self) -> &'static [u8] {
        match self {
            SignatureDomain::Register => b"KEZ-REGISTER-V1",
            SignatureDomain::SigchainLink => b"KEZ-SIGCHAIN-LINK-V1",
            SignatureDomain::SigchainRotate => b"KEZ-SIGCHAIN-ROTATE-V1",
            SignatureDomain::SigchainAddDevice => b"KEZ-SIGCHAIN-ADD-DEVICE-V1",
            SignatureDomain::Pin => b"KEZ-PIN-V1",
            SignatureDomain::Manifest => b"KEZ-MANIFEST-V1",
            SignatureDomain::Message => b"KEZ-MESSAGE-V1",
            SignatureDomain::NatsConnect => b"KEZ-NATS-CONNECT-V1",
            SignatureDomain::PairOffer => b"KEZ-PAIR-OFFER-V1",
            SignatureDomain::PairAnswer => b"KEZ-PAIR-ANSWER-V1",
            SignatureDomain::OlmPrekey => b"KEZ-OLM-PREKEY-V1",
        }
    }

    /// The bytes a key signs for `body` in this domain: the tag, a zero byte, then `body`.
    pub fn message(self, body: &[u8]) -> Vec<u8> {
        let tag = self.tag();
        let mut message = Vec::with_capacity(tag.len() + 1 + body.len());
        message.extend_from_slice(tag);
        message.push(0);
        message.extend_from_slice(body);
        message
    }
}

/// An ed25519 public key: the canonical encoding of a point of prime order (a multiple of the
/// base point, neither small-order nor with a small-order component). Text form:
/// `ed25519:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Accepts 32 bytes that are the canonical encoding of a curve point in the prime-order
    /// subgroup (PROTOCOL.md §1.1).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::InvalidPoint)?;
        // Decoding reduces y modulo p, so 19 encodings (y >= p) alias canonical ones; requiring
        // the canonical encoding keeps one text form per key, as libsodium does.
        if key.to_edwards().compress().as_bytes() != bytes {
            return Err(KeyError::InvalidPoint);
        }
        if key.is_weak() {
            return Err(KeyError::WeakKey);
        }
        if !key.to_edwards().is_torsion_free() {
            return Err(KeyError::MixedOrder);
        }
        Ok(PublicKey(*bytes))
    }

    /// The 32 raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits of the key, without prefix (used in NATS subjects).
    pub fn to_hex(&self) -> String {
        HEXLOWER.encode(&self.0)
    }

    /// Checks `signature` over `body` in `domain` (the key signed `domain.message(body)`) with
    /// the strict rules of PROTOCOL.md §1.1: canonical `S`, canonical `R` of large order, and
    /// the cofactorless equation `[S]B = R + [k]A`, so that every verifier accepts exactly the
    /// same signatures.
    pub fn verify(
        &self,
        domain: SignatureDomain,
        body: &[u8],
        signature: &Signature,
    ) -> Result<(), SignatureError> {
        self.verify_untagged(&domain.message(body), signature)
    }

    /// [`PublicKey::verify`] over `message` as it is, without a domain: only for the proofs of
    /// the previous release that carried none ([`crate::connect`]).
    pub(crate) fn verify_untagged(
        &self,
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), SignatureError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| SignatureError)?;
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &sig).map_err(|_| SignatureError)
    }

    /// The X25519 public key of the same key pair (the birational map from Edwards to
    /// Montgomery form), used to encrypt to this key.
    pub fn to_x25519(&self) -> x25519_dalek::PublicKey {
        let key = VerifyingKey::from_bytes(&self.0).expect("checked when the key was made");
        x25519_dalek::PublicKey::from(key.to_montgomery().to_bytes())
    }

    /// X25519 agreement of the scalar `secret` (clamped, as X25519 clamps it) with this key's
    /// X25519 half: byte for byte what
    /// `StaticSecret::from(*secret).diffie_hellman(&self.to_x25519())` gives, with that X25519
    /// public key. It multiplies the Edwards point, which curve25519-dalek vectorises, instead
    /// of running the Montgomery ladder: about 40 % less time for the sender of every envelope
    /// and manifest box. `None` when the result is all zeros (no contributory agreement).
    pub fn x25519_agree(
        &self,
        secret: &[u8; 32],
    ) -> Option<(Zeroizing<[u8; 32]>, x25519_dalek::PublicKey)> {
        let point = VerifyingKey::from_bytes(&self.0)
            .expect("checked when the key was made")
            .to_edwards();
        let shared = Zeroizing::new(point.mul_clamped(*secret).to_montgomery().to_bytes());
        let own = x25519_dalek::PublicKey::from(point.to_montgomery().to_bytes());
        // Not secret-dependent in a way that matters: zero only for small-order keys.
        let contributory = shared.iter().fold(0u8, |acc, byte| acc | byte) != 0;
        contributory.then_some((shared, own))
    }

    /// The NATS user nkey (`U` + 55 base32 characters) for this key.
    pub fn to_nkey(&self) -> String {
        let mut raw = Vec::with_capacity(35);
        raw.push(NKEY_USER_PREFIX_BYTE);
        raw.extend_from_slice(&self.0);
        raw.extend_from_slice(&crc16_xmodem(&raw).to_le_bytes());
        BASE32_NOPAD.encode(&raw)
    }

    /// Parses a NATS user nkey (`U...`, 56 characters) back into the key it names.
    pub fn from_nkey(nkey: &str) -> Result<Self, KeyError> {
        if nkey.len() != NKEY_LEN {
            return Err(KeyError::BadNkey);
        }
        let raw = BASE32_NOPAD
            .decode(nkey.as_bytes())
            .map_err(|_| KeyError::BadNkey)?;
        let (body, crc) = raw.split_at(raw.len() - 2);
        if body.len() != 33 || body[0] != NKEY_USER_PREFIX_BYTE {
            return Err(KeyError::BadNkey);
        }
        if crc16_xmodem(body).to_le_bytes() != [crc[0], crc[1]] {
            return Err(KeyError::BadNkeyChecksum);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&body[1..]);
        PublicKey::from_bytes(&key)
    }
}

/// A key is its 32 bytes (hashed and compared as they are), so maps of keys can be looked up
/// by bytes not yet checked to be a key: only a key that was checked when it went in is found.
impl std::borrow::Borrow<[u8; 32]> for PublicKey {
    fn borrow(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    /// Strict: exactly `ed25519:` and 64 lowercase hex digits, nothing around them.
    fn from_str(text: &str) -> Result<Self, KeyError> {
        let hex = strip_prefix(text, PUBLIC_KEY_PREFIX)?;
        PublicKey::from_bytes(&decode_hex32(hex)?)
    }
}

serde_as_text!(PublicKey);

/// A signature did not verify under the strict rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("signature does not verify")]
pub struct SignatureError;

/// An ed25519 signature. Text form: 128 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; 64]);

impl Signature {
    /// Wraps 64 raw signature bytes (`R || S`). Validity is checked only by [`PublicKey::verify`].
    pub fn from_bytes(bytes: [u8; 64]) -> Self {
        Signature(bytes)
    }

    /// The 64 raw bytes.
    pub fn to_bytes(&self) -> [u8; 64] {
        self.0
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        Ok(Signature(decode_hex::<64>(text)?))
    }
}

serde_as_text!(Signature);

/// An ed25519 secret key. Zeroized on drop; its `Debug` shows only the public key.
pub struct SecretKey {
    signing: SigningKey,
    /// [`PublicKey::to_x25519`] of the own public key, which every opened envelope needs:
    /// derived once rather than per message.
    x25519_public: x25519_dalek::PublicKey,
}

impl SecretKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Self {
        use rand_core::RngCore;
        let mut seed = Zeroizing::new([0u8; 32]);
        rand_core::OsRng.fill_bytes(seed.as_mut());
        SecretKey::from_seed(&seed)
    }

    /// The key whose 32-byte seed is `seed` (deterministic: for test vectors and key files).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let x25519_public = PublicKey(signing.verifying_key().to_bytes()).to_x25519();
        SecretKey {
            signing,
            x25519_public,
        }
    }

    /// The 32-byte seed, for keys derived from this one (the Olm pickle key): zeroized on drop.
    pub(crate) fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// Signs `body` in `domain`: the signature is over `domain.message(body)` (deterministic
    /// ed25519, RFC 8032). There is no way to sign bytes without a domain.
    pub fn sign(&self, domain: SignatureDomain, body: &[u8]) -> Signature {
        use ed25519_dalek::Signer;
        Signature(self.signing.sign(&domain.message(body)).to_bytes())
    }

    /// The X25519 secret of the same key pair: the first half of SHA-512(seed), as RFC 8032
    /// derives the signing scalar (clamped by X25519). Its public key is
    /// [`PublicKey::to_x25519`]. Zeroized on drop.
    pub fn to_x25519(&self) -> x25519_dalek::StaticSecret {
        let scalar = Zeroizing::new(self.signing.to_scalar_bytes());
        x25519_dalek::StaticSecret::from(*scalar)
    }

    /// The public half of [`SecretKey::to_x25519`]: [`PublicKey::to_x25519`] of the own key.
    pub fn x25519_public(&self) -> &x25519_dalek::PublicKey {
        &self.x25519_public
    }

    /// The key file text: one line, `ed25519-secret:<64 hex>\n`. Zeroized when dropped.
    pub fn to_key_file(&self) -> Zeroizing<String> {
        let seed = Zeroizing::new(self.signing.to_bytes());
        let mut text = Zeroizing::new(String::with_capacity(SECRET_KEY_PREFIX.len() + 65));
        text.push_str(SECRET_KEY_PREFIX);
        text.push_str(&Zeroizing::new(HEXLOWER.encode(seed.as_ref())));
        text.push('\n');
        text
    }

    /// Parses key file text as written by [`SecretKey::to_key_file`]; one trailing newline is allowed.
    /// Errors never contain the key material.
    pub fn from_key_file(text: &str) -> Result<Self, KeyError> {
        let line = text.strip_suffix('\n').unwrap_or(text);
        let hex = strip_prefix(line, SECRET_KEY_PREFIX).map_err(|err| match err {
            KeyError::MissingPrefix { expected, .. } => KeyError::MissingPrefix {
                expected,
                found: "(hidden)".into(),
            },
            other => other,
        })?;
        let seed = Zeroizing::new(decode_hex32(hex)?);
        Ok(SecretKey::from_seed(&seed))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public: {})", self.public_key())
    }
}

fn strip_prefix<'a>(text: &'a str, prefix: &'static str) -> Result<&'a str, KeyError> {
    text.strip_prefix(prefix)
        .ok_or_else(|| KeyError::MissingPrefix {
            expected: prefix,
            found: text.chars().take(prefix.len()).collect(),
        })
}

fn decode_hex32(hex: &str) -> Result<[u8; 32], KeyError> {
    decode_hex::<32>(hex)
}

/// Strict lowercase hex of exactly `N` bytes.
pub(crate) fn decode_hex<const N: usize>(hex: &str) -> Result<[u8; N], KeyError> {
    if hex.len() != 2 * N {
        return Err(KeyError::BadHexLength {
            expected: 2 * N,
            found: hex.chars().count(),
        });
    }
    let mut out = [0u8; N];
    HEXLOWER
        .decode_mut(hex.as_bytes(), &mut out)
        .map_err(|_| KeyError::NotLowercaseHex)?;
    Ok(out)
}

/// CRC-16/XMODEM (poly 0x1021, init 0), the checksum NATS nkeys carry.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: [u8; 32] = [7u8; 32];

    #[test]
    fn public_key_text_round_trips() {
        let key = SecretKey::from_seed(&SEED).public_key();
        let text = key.to_string();
        assert!(text.starts_with("ed25519:"));
        assert_eq!(text.len(), 8 + 64);
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
    }

    #[test]
    fn public_key_parsing_is_strict() {
        let good = SecretKey::from_seed(&SEED).public_key().to_string();
        let upper = format!("ed25519:{}", good[8..].to_uppercase());
        assert_eq!(upper.parse::<PublicKey>(), Err(KeyError::NotLowercaseHex));
        assert!(matches!(
            good.replace("ed25519:", "ED25519:").parse::<PublicKey>(),
            Err(KeyError::MissingPrefix { .. })
        ));
        assert!(matches!(
            format!(" {good}").parse::<PublicKey>(),
            Err(KeyError::MissingPrefix { .. })
        ));
        assert!(matches!(
            format!("{good}0").parse::<PublicKey>(),
            Err(KeyError::BadHexLength {
                expected: 64,
                found: 65
            })
        ));
        assert!(matches!(
            format!("{good}\n").parse::<PublicKey>(),
            Err(KeyError::BadHexLength { .. })
        ));
    }

    #[test]
    fn weak_and_invalid_points_are_refused() {
        // The identity point (y = 1) has order 1.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(PublicKey::from_bytes(&identity), Err(KeyError::WeakKey));
        // y = 2 is not on the curve.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert_eq!(
            PublicKey::from_bytes(&off_curve),
            Err(KeyError::InvalidPoint)
        );
    }

    #[test]
    fn a_map_of_keys_finds_a_key_by_its_bytes_and_nothing_else() {
        let key = SecretKey::generate().public_key();
        let other = SecretKey::generate().public_key();
        let known = std::collections::HashMap::from([(key, "known")]);
        assert_eq!(known.get_key_value(key.as_bytes()), Some((&key, &"known")));
        assert_eq!(known.get(other.as_bytes()), None);
        // An alias of a known key's point is other bytes: not found, left to `from_bytes`.
        let mut aliased = [0xffu8; 32];
        aliased[0] = 0xf0;
        aliased[31] = 0x7f;
        assert_eq!(known.get(&aliased), None);
    }

    #[test]
    fn non_canonical_encodings_are_refused() {
        // y = p + 3 (p = 2^255 - 19) decodes to the same point as y = 3, which is on the curve.
        let mut aliased = [0xffu8; 32];
        aliased[0] = 0xf0;
        aliased[31] = 0x7f;
        assert_eq!(PublicKey::from_bytes(&aliased), Err(KeyError::InvalidPoint));
        let mut canonical = [0u8; 32];
        canonical[0] = 3;
        assert!(
            VerifyingKey::from_bytes(&aliased).is_ok(),
            "dalek alone accepts the alias"
        );
        assert_eq!(
            VerifyingKey::from_bytes(&canonical).unwrap().to_edwards(),
            VerifyingKey::from_bytes(&aliased).unwrap().to_edwards()
        );
    }

    #[test]
    fn nkey_matches_the_nkeys_crate() {
        for seed in [[0u8; 32], SEED, [0xffu8; 32]] {
            let secret = SecretKey::from_seed(&seed);
            let ours = secret.public_key().to_nkey();
            let theirs = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, seed)
                .unwrap()
                .public_key();
            assert_eq!(ours, theirs);
            assert_eq!(ours.len(), NKEY_LEN);
            assert!(ours.starts_with('U'));
            assert_eq!(PublicKey::from_nkey(&theirs).unwrap(), secret.public_key());
        }
    }

    #[test]
    fn nkey_parsing_rejects_other_kinds_and_typos() {
        let nkey = SecretKey::from_seed(&SEED).public_key().to_nkey();
        let account = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::Account, SEED)
            .unwrap()
            .public_key();
        assert_eq!(PublicKey::from_nkey(&account), Err(KeyError::BadNkey));
        let mut typo = nkey.clone().into_bytes();
        typo[10] = if typo[10] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            PublicKey::from_nkey(std::str::from_utf8(&typo).unwrap()),
            Err(KeyError::BadNkeyChecksum)
        );
        assert_eq!(PublicKey::from_nkey(&nkey[..55]), Err(KeyError::BadNkey));
        assert_eq!(
            PublicKey::from_nkey(&nkey.to_lowercase()),
            Err(KeyError::BadNkey)
        );
    }

    #[test]
    fn signatures_verify_only_for_their_message_key_and_domain() {
        let secret = SecretKey::from_seed(&SEED);
        let other = SecretKey::from_seed(&[8u8; 32]);
        let domain = SignatureDomain::Message;
        let sig = secret.sign(domain, b"hello");
        assert_eq!(secret.public_key().verify(domain, b"hello", &sig), Ok(()));
        assert_eq!(
            secret.public_key().verify(domain, b"hellO", &sig),
            Err(SignatureError)
        );
        assert_eq!(
            other.public_key().verify(domain, b"hello", &sig),
            Err(SignatureError)
        );
        for wrong in SignatureDomain::ALL.into_iter().filter(|d| *d != domain) {
            assert_eq!(
                secret.public_key().verify(wrong, b"hello", &sig),
                Err(SignatureError),
                "{wrong:?}"
            );
        }
        // What is signed is the tag, a zero byte and the body: nothing else verifies.
        assert_eq!(
            secret
                .public_key()
                .verify_untagged(b"KEZ-MESSAGE-V1\0hello", &sig),
            Ok(())
        );
        assert_eq!(
            secret.public_key().verify_untagged(b"hello", &sig),
            Err(SignatureError)
        );
        let text = sig.to_string();
        assert_eq!(text.len(), 128);
        assert_eq!(text.parse::<Signature>().unwrap(), sig);
    }

    #[test]
    fn every_domain_tag_is_a_distinct_kez_tag_without_a_zero_byte() {
        let tags: std::collections::HashSet<&[u8]> =
            SignatureDomain::ALL.iter().map(|d| d.tag()).collect();
        assert_eq!(tags.len(), SignatureDomain::ALL.len(), "tags are distinct");
        for domain in SignatureDomain::ALL {
            let tag = domain.tag();
            assert!(tag.starts_with(b"KEZ-"), "{domain:?}");
            assert!(!tag.contains(&0), "{domain:?}");
            assert!(
                tag.iter()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'-'),
                "{domain:?}"
            );
            let message = domain.message(b"body");
            assert_eq!(&message[..tag.len()], tag);
            assert_eq!(message[tag.len()], 0);
            assert_eq!(&message[tag.len() + 1..], b"body");
        }
        // No tag-and-zero prefix of one domain starts another's message: a message of one
        // domain can never be read as a message of another.
        for a in SignatureDomain::ALL {
            for b in SignatureDomain::ALL.into_iter().filter(|b| *b != a) {
                assert!(!b.message(b"").starts_with(&a.message(b"")), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn key_file_round_trips_and_hides_the_secret() {
        let secret = SecretKey::from_seed(&SEED);
        let file = secret.to_key_file();
        assert!(file.starts_with("ed25519-secret:"));
        assert!(file.ends_with('\n'));
        let back = SecretKey::from_key_file(&file).unwrap();
        assert_eq!(back.public_key(), secret.public_key());
        let seed_hex = HEXLOWER.encode(&SEED);
        assert!(!format!("{secret:?}").contains(&seed_hex));
        let garbled = format!("nope{}", &file[4..]);
        let err = SecretKey::from_key_file(&garbled).unwrap_err();
        assert!(!err.to_string().contains(&seed_hex[..8]));
    }

    #[test]
    fn x25519_halves_match() {
        for seed in [[1u8; 32], [200u8; 32]] {
            let secret = SecretKey::from_seed(&seed);
            let derived = x25519_dalek::PublicKey::from(&secret.to_x25519());
            assert_eq!(derived, secret.public_key().to_x25519());
            assert_eq!(secret.x25519_public(), &derived);
        }
    }

    proptest::proptest! {
        /// The Edwards-form agreement is the X25519 ladder's, byte for byte, for any scalar
        /// (clamping included) and any key.
        #[test]
        fn x25519_agree_matches_the_ladder(seed: [u8; 32], scalar: [u8; 32]) {
            let public = SecretKey::from_seed(&seed).public_key();
            let ladder = x25519_dalek::StaticSecret::from(scalar).diffie_hellman(&public.to_x25519());
            let (shared, own) = public.x25519_agree(&scalar).expect("a contributory agreement");
            proptest::prop_assert_eq!(shared.as_ref(), ladder.as_bytes());
            proptest::prop_assert_eq!(own, public.to_x25519());
        }
    }

    #[test]
    fn mixed_order_keys_are_refused() {
        let torsion = curve25519_dalek::constants::EIGHT_TORSION[1];
        let point = VerifyingKey::from_bytes(SecretKey::from_seed(&SEED).public_key().as_bytes())
            .unwrap()
            .to_edwards()
            + torsion;
        assert_eq!(
            PublicKey::from_bytes(&point.compress().to_bytes()),
            Err(KeyError::MixedOrder)
        );
    }

    #[test]
    fn x25519_agree_matches_the_ladder_on_mixed_order_keys() {
        // A key with a torsion part (refused by `from_bytes`, built here by hand): clamping (a
        // multiple of 8) must remove it on both paths.
        let torsion = curve25519_dalek::constants::EIGHT_TORSION[1];
        for seed in [[3u8; 32], [77u8; 32]] {
            let point =
                VerifyingKey::from_bytes(SecretKey::from_seed(&seed).public_key().as_bytes())
                    .unwrap()
                    .to_edwards()
                    + torsion;
            let public = PublicKey(point.compress().to_bytes());
            let scalar = [0x5a; 32];
            let ladder =
                x25519_dalek::StaticSecret::from(scalar).diffie_hellman(&public.to_x25519());
            assert_eq!(
                public.x25519_agree(&scalar).unwrap().0.as_ref(),
                ladder.as_bytes()
            );
        }
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            SecretKey::generate().public_key(),
            SecretKey::generate().public_key()
        );
    }
}
