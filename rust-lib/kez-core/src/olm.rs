//! Forward-secret sessions between two devices (PROTOCOL.md §15): Olm, the double ratchet of
//! Matrix, as vodozemac implements it. This module is a thin, pure wrapper that fixes the
//! choices KEZ makes and keeps vodozemac's types out of the rest of the code:
//!
//! - sessions are Olm version 2 (`SessionConfig::version_2`: AES-256-CBC with a full 32-byte
//!   HMAC-SHA-256, not the truncated 8-byte MAC of version 1), and only its messages decode;
//! - prekeys come out signed by the device's KEZ key ([`SignedPrekey`]), so nothing unsigned
//!   is ever published;
//! - pickles (the saved account and sessions) are encrypted with a key derived from the
//!   device's secret key, so whoever holds the key file can read them and nobody else;
//! - every failure is an [`OlmError`] with a stable [`code`](OlmError::code).
//!
//! Messages travel inside envelope version 2 (`crate::envelope`), as [`OlmMessage::to_bytes`]:
//!
//! ```text
//! olm message = type (1: 0x00 pre-key, 0x01 normal) || vodozemac's encoding of the message
//! ```

use hkdf::Hkdf;
use sha2::Sha256;
use vodozemac::olm::{Account, DecryptionError, Session, SessionConfig, SessionCreationError};
use vodozemac::{Curve25519PublicKey, olm};
use zeroize::Zeroizing;

use crate::key::SecretKey;
use crate::prekey::{OlmKey, PrekeyKind, SignedPrekey};

/// HKDF `info` of the key that encrypts pickles.
pub const OLM_PICKLE_KDF_INFO: &[u8] = b"KEZ-OLM-PICKLE-V1";
/// Largest encoded [`OlmMessage`] accepted, type byte included: what fits an envelope, so no
/// decoder works on more than one envelope's bytes.
pub const MAX_OLM_MESSAGE_BYTES: usize = crate::envelope::MAX_ENVELOPE_BYTES;
/// The type byte of a pre-key message (the first messages of a session, which set it up).
pub const OLM_TYPE_PRE_KEY: u8 = 0;
/// The type byte of a normal message (once the sender has heard back on the session).
pub const OLM_TYPE_NORMAL: u8 = 1;

/// The version byte vodozemac writes first in a message of an Olm version 2 session (full MAC).
/// Version 1's messages (byte 3, 8-byte MAC) are refused: KEZ never sends them.
const OLM_V2_MESSAGE_VERSION: u8 = 4;

/// Why an Olm operation failed. Each variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OlmError {
    /// The bytes are not an Olm version 2 message in its one encoding.
    #[error("malformed Olm message: {0}")]
    Malformed(String),
    /// The message's MAC does not verify or its padding is wrong: not from this session, or
    /// changed in transit.
    #[error("the Olm message cannot be decrypted by this session")]
    DecryptFailed,
    /// The message's key is gone: it was decrypted before (a replay) or is too old.
    #[error("the Olm message key is used up (a replay, or a message too old to keep a key for)")]
    MissingMessageKey,
    /// The message is too far ahead of the last one received: too many keys to skip.
    #[error("the Olm message skips too many messages")]
    MessageGap,
    /// A key gives a non-contributory Diffie-Hellman (a small-order point).
    #[error("an Olm key gives a non-contributory Diffie-Hellman (weak key)")]
    WeakKey,
    /// A pre-key message names a one-time key this account does not have (used up, or never
    /// ours).
    #[error("the pre-key message uses a one-time key this account does not have")]
    UnknownOneTimeKey,
    /// A pre-key message's sender identity key is not the one the caller expected.
    #[error("the pre-key message is from another Olm identity than expected")]
    WrongIdentity,
    /// A pre-key message of another session than the one asked to decrypt it.
    #[error("the pre-key message belongs to another session")]
    WrongSession,
    /// A new inbound session needs a pre-key message.
    #[error("a new session can only be made from a pre-key message")]
    NotPreKey,
    /// A pickle that does not decrypt with this device's key or does not parse.
    #[error("the Olm pickle cannot be read with this device's key")]
    BadPickle,
}

impl OlmError {
    /// The failure's stable snake_case name.
    pub fn code(&self) -> &'static str {
        match self {
            OlmError::Malformed(_) => "olm_malformed",
            OlmError::DecryptFailed => "olm_decrypt_failed",
            OlmError::MissingMessageKey => "olm_missing_message_key",
            OlmError::MessageGap => "olm_message_gap",
            OlmError::WeakKey => "olm_weak_key",
            OlmError::UnknownOneTimeKey => "olm_unknown_one_time_key",
            OlmError::WrongIdentity => "olm_wrong_identity",
            OlmError::WrongSession => "olm_wrong_session",
            OlmError::NotPreKey => "olm_not_pre_key",
            OlmError::BadPickle => "olm_bad_pickle",
        }
    }
}

impl From<DecryptionError> for OlmError {
    fn from(err: DecryptionError) -> Self {
        match err {
            DecryptionError::InvalidMAC(_) | DecryptionError::InvalidPadding(_) => {
                OlmError::DecryptFailed
            }
            DecryptionError::InvalidMACLength(..) => {
                OlmError::Malformed("the MAC length is not Olm version 2's".into())
            }
            DecryptionError::NonContributoryKey => OlmError::WeakKey,
            DecryptionError::MissingMessageKey(_) => OlmError::MissingMessageKey,
            DecryptionError::TooBigMessageGap(..) => OlmError::MessageGap,
        }
    }
}

impl From<SessionCreationError> for OlmError {
    fn from(err: SessionCreationError) -> Self {
        match err {
            SessionCreationError::MissingOneTimeKey(_) => OlmError::UnknownOneTimeKey,
            SessionCreationError::MismatchedIdentityKey(..) => OlmError::WrongIdentity,
            SessionCreationError::MismatchedSessionConfig { .. } => {
                OlmError::Malformed("the pre-key message is not of an Olm version 2 session".into())
            }
            SessionCreationError::Decryption(err) => err.into(),
            SessionCreationError::NonContributoryKey => OlmError::WeakKey,
        }
    }
}

/// An Olm message as it travels: the encoded bytes of a pre-key or a normal message. Any
/// value can be built; the session decodes it (and refuses what is not valid) when it is
/// used. [`OlmMessage::from_bytes`] accepts only well-formed messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OlmMessage {
    /// A pre-key message: names the sender's identity key, its base key and the one-time (or
    /// fallback) key it used, and carries a message of the new session.
    PreKey(Vec<u8>),
    /// A message of an established session.
    Normal(Vec<u8>),
}

impl OlmMessage {
    /// Whether it is a pre-key message.
    pub fn is_pre_key(&self) -> bool {
        matches!(self, OlmMessage::PreKey(_))
    }

    /// For a pre-key message: the sender's Olm identity key it names (checked against the
    /// sender's chain before a session is made). `None` for a normal message or bad bytes.
    pub fn sender_identity(&self) -> Option<OlmKey> {
        match self.decode().ok()? {
            olm::OlmMessage::PreKey(message) => {
                Some(OlmKey::from_bytes(message.identity_key().to_bytes()))
            }
            olm::OlmMessage::Normal(_) => None,
        }
    }

    /// The form inside an envelope: the type byte, then the message bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (kind, bytes) = match self {
            OlmMessage::PreKey(bytes) => (OLM_TYPE_PRE_KEY, bytes),
            OlmMessage::Normal(bytes) => (OLM_TYPE_NORMAL, bytes),
        };
        let mut out = Vec::with_capacity(1 + bytes.len());
        out.push(kind);
        out.extend_from_slice(bytes);
        out
    }

    /// Reads [`OlmMessage::to_bytes`]' form. Refuses (never panics on) anything but a
    /// well-formed Olm version 2 message in the one encoding vodozemac writes: at most
    /// [`MAX_OLM_MESSAGE_BYTES`], a known type byte, and bytes that re-encode identically.
    pub fn from_bytes(bytes: &[u8]) -> Result<OlmMessage, OlmError> {
        if bytes.len() > MAX_OLM_MESSAGE_BYTES {
            return Err(OlmError::Malformed(format!(
                "{} bytes; the limit is {MAX_OLM_MESSAGE_BYTES}",
                bytes.len()
            )));
        }
        let (&kind, rest) = bytes
            .split_first()
            .ok_or_else(|| OlmError::Malformed("empty".into()))?;
        let message = match kind {
            OLM_TYPE_PRE_KEY => OlmMessage::PreKey(rest.to_vec()),
            OLM_TYPE_NORMAL => OlmMessage::Normal(rest.to_vec()),
            other => return Err(OlmError::Malformed(format!("unknown message type {other}"))),
        };
        message.decode()?;
        Ok(message)
    }

    /// vodozemac's message, if these are the bytes of an Olm version 2 message that
    /// re-encode to themselves (so a message has one byte form, like every signed object).
    fn decode(&self) -> Result<olm::OlmMessage, OlmError> {
        let (kind, bytes) = match self {
            OlmMessage::PreKey(bytes) => (usize::from(OLM_TYPE_PRE_KEY), bytes),
            OlmMessage::Normal(bytes) => (usize::from(OLM_TYPE_NORMAL), bytes),
        };
        if bytes.len() >= MAX_OLM_MESSAGE_BYTES {
            return Err(OlmError::Malformed("too large".into()));
        }
        let decoded = olm::OlmMessage::from_parts(kind, bytes)
            .map_err(|err| OlmError::Malformed(err.to_string()))?;
        let version = match &decoded {
            olm::OlmMessage::PreKey(message) => message.message().version(),
            olm::OlmMessage::Normal(message) => message.version(),
        };
        if version != OLM_V2_MESSAGE_VERSION {
            return Err(OlmError::Malformed(format!(
                "message version {version}; only Olm version 2 ({OLM_V2_MESSAGE_VERSION}) is used"
            )));
        }
        if decoded.to_parts().1 != *bytes {
            return Err(OlmError::Malformed("not in its one encoding".into()));
        }
        Ok(decoded)
    }

    fn from_vodozemac(message: olm::OlmMessage) -> OlmMessage {
        match message {
            olm::OlmMessage::PreKey(message) => OlmMessage::PreKey(message.to_bytes()),
            olm::OlmMessage::Normal(message) => OlmMessage::Normal(message.to_bytes()),
        }
    }
}

fn curve25519(key: &OlmKey) -> Curve25519PublicKey {
    Curve25519PublicKey::from_bytes(*key.as_bytes())
}

fn olm_key(key: Curve25519PublicKey) -> OlmKey {
    OlmKey::from_bytes(key.to_bytes())
}

/// The key pickles are encrypted with: HKDF-SHA256 (no salt) of the device's seed, info
/// [`OLM_PICKLE_KDF_INFO`]. Tied to the device key so that a copied database is useless
/// without the key file, and separate from every other use of the seed by its `info`.
fn pickle_key(device: &SecretKey) -> Zeroizing<[u8; 32]> {
    let seed = device.seed();
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, seed.as_ref())
        .expand(OLM_PICKLE_KDF_INFO, key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    key
}

/// A device's Olm account: its Curve25519 identity key (bound to the device in its sigchain
/// by `set_olm_key`), its one-time keys and its fallback key. The `Debug` form shows only the
/// identity key.
pub struct OlmAccount {
    inner: Account,
}

impl std::fmt::Debug for OlmAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OlmAccount({})", self.identity_key())
    }
}

impl Default for OlmAccount {
    fn default() -> Self {
        OlmAccount::new()
    }
}

impl OlmAccount {
    /// A new account with fresh random keys and no prekeys yet.
    pub fn new() -> Self {
        OlmAccount {
            inner: Account::new(),
        }
    }

    /// The account's Curve25519 identity key.
    pub fn identity_key(&self) -> OlmKey {
        olm_key(self.inner.curve25519_key())
    }

    /// Generates `count` new one-time keys, marks them published, and returns them signed by
    /// `device` for this account. The account keeps at most 5000 (vodozemac's store): past
    /// that, generating drops the oldest, whose pre-key messages then fail.
    pub fn generate_one_time_keys(
        &mut self,
        count: usize,
        device: &SecretKey,
    ) -> Vec<SignedPrekey> {
        let identity = self.identity_key();
        let created = self.inner.generate_one_time_keys(count).created;
        self.inner.mark_keys_as_published();
        created
            .into_iter()
            .map(|key| SignedPrekey::sign(device, &identity, olm_key(key), PrekeyKind::OneTime))
            .collect()
    }

    /// Generates a new fallback key, marks it published and returns it signed. The previous
    /// fallback key still opens pre-key messages (whoever claimed it before the new one was
    /// published may still use it); the one before that is forgotten.
    pub fn generate_fallback_key(&mut self, device: &SecretKey) -> SignedPrekey {
        self.inner.generate_fallback_key();
        let key = self
            .inner
            .fallback_key()
            .into_values()
            .next()
            .expect("a fallback key was just generated and is not yet published");
        self.inner.mark_keys_as_published();
        SignedPrekey::sign(
            device,
            &self.identity_key(),
            olm_key(key),
            PrekeyKind::Fallback,
        )
    }

    /// The most one-time keys the account should have published at once (vodozemac's
    /// `max_number_of_one_time_keys`, 50): fewer than it stores, so that keys claimed but not
    /// yet used are not dropped by new ones.
    pub fn max_one_time_keys(&self) -> usize {
        self.inner.max_number_of_one_time_keys()
    }

    /// An outbound session to the account with identity key `their_identity`, from one of its
    /// prekeys (one-time or fallback; the caller checked its signature and that the identity
    /// key is the one the device's chain binds). Its messages are pre-key messages until the
    /// peer answers. A non-contributory key is [`OlmError::WeakKey`].
    pub fn create_outbound(
        &self,
        their_identity: &OlmKey,
        their_prekey: &OlmKey,
    ) -> Result<OlmSession, OlmError> {
        let session = self.inner.create_outbound_session(
            SessionConfig::version_2(),
            curve25519(their_identity),
            curve25519(their_prekey),
        )?;
        Ok(OlmSession { inner: session })
    }

    /// An inbound session from a pre-key message sent by the account with identity key
    /// `their_identity`, and the message's plaintext. Uses up the one-time key the message
    /// names (a fallback key stays), but only once the message decrypted, so a forged
    /// message cannot burn one.
    pub fn create_inbound(
        &mut self,
        their_identity: &OlmKey,
        message: &OlmMessage,
    ) -> Result<(OlmSession, Zeroizing<Vec<u8>>), OlmError> {
        let olm::OlmMessage::PreKey(pre_key) = message.decode()? else {
            return Err(OlmError::NotPreKey);
        };
        let created = self.inner.create_inbound_session(
            SessionConfig::version_2(),
            curve25519(their_identity),
            &pre_key,
        )?;
        Ok((
            OlmSession {
                inner: created.session,
            },
            Zeroizing::new(created.plaintext),
        ))
    }

    /// The account, encrypted with the key derived from `device` (see [`OLM_PICKLE_KDF_INFO`]).
    pub fn pickle(&self, device: &SecretKey) -> String {
        self.inner.pickle().encrypt(&pickle_key(device))
    }

    /// Reads [`OlmAccount::pickle`]'s text with the same device key; anything else is
    /// [`OlmError::BadPickle`].
    pub fn from_pickle(pickle: &str, device: &SecretKey) -> Result<Self, OlmError> {
        let pickle = olm::AccountPickle::from_encrypted(pickle, &pickle_key(device))
            .map_err(|_| OlmError::BadPickle)?;
        Ok(OlmAccount {
            inner: Account::from_pickle(pickle),
        })
    }
}

/// One Olm session (a double ratchet) with one device. The `Debug` form shows only its id.
pub struct OlmSession {
    inner: Session,
}

impl std::fmt::Debug for OlmSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OlmSession({})", self.session_id())
    }
}

impl OlmSession {
    /// The session's id (vodozemac's: unpadded base64 of SHA-256 over the keys that made it),
    /// the same on both sides.
    pub fn session_id(&self) -> String {
        self.inner.session_id()
    }

    /// Encrypts `plaintext` as the session's next message: a pre-key message until the
    /// session has received one ([`OlmSession::has_received`]), then a normal one.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> OlmMessage {
        let message = self.inner.encrypt(plaintext).expect(
            "the only failure is a non-contributory ratchet key, and every ratchet key a session \
             holds passed a contributory Diffie-Hellman when it was received or made",
        );
        OlmMessage::from_vodozemac(message)
    }

    /// Decrypts a message of this session. A message decrypted before (a replay), one whose
    /// key was dropped, one changed in transit, or a pre-key message of another session
    /// fails, and the session is unchanged.
    pub fn decrypt(&mut self, message: &OlmMessage) -> Result<Zeroizing<Vec<u8>>, OlmError> {
        let message = message.decode()?;
        // vodozemac decrypts a pre-key message's inner message alone; the keys around it
        // must be this session's too, or they would be bytes nothing authenticates.
        if let olm::OlmMessage::PreKey(pre_key) = &message
            && pre_key.session_keys() != self.inner.session_keys()
        {
            return Err(OlmError::WrongSession);
        }
        Ok(Zeroizing::new(self.inner.decrypt(&message)?))
    }

    /// Whether `message` is a pre-key message of this session (the peer keeps sending
    /// pre-key messages until it hears back, each of which must go to the existing session
    /// rather than make a new one).
    pub fn matches(&self, message: &OlmMessage) -> bool {
        match message.decode() {
            Ok(olm::OlmMessage::PreKey(message)) => {
                message.session_keys() == self.inner.session_keys()
            }
            _ => false,
        }
    }

    /// Whether the session has decrypted a message from the peer (then the peer holds the
    /// session too, and this side's messages are normal messages).
    pub fn has_received(&self) -> bool {
        self.inner.has_received_message()
    }

    /// The session, encrypted with the key derived from `device` (see [`OLM_PICKLE_KDF_INFO`]).
    pub fn pickle(&self, device: &SecretKey) -> String {
        self.inner.pickle().encrypt(&pickle_key(device))
    }

    /// Reads [`OlmSession::pickle`]'s text with the same device key; anything else is
    /// [`OlmError::BadPickle`].
    pub fn from_pickle(pickle: &str, device: &SecretKey) -> Result<Self, OlmError> {
        let pickle = olm::SessionPickle::from_encrypted(pickle, &pickle_key(device))
            .map_err(|_| OlmError::BadPickle)?;
        Ok(OlmSession {
            inner: Session::from_pickle(pickle),
        })
    }
}

#[cfg(test)]
mod tests;
