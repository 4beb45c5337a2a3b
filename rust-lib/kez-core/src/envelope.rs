//! End-to-end encrypted, signed messages (PROTOCOL.md §8).
//!
//! Sign, then encrypt: the sender signs the message together with the recipient's key, a random
//! message id, the time and the content type; then everything, signature and sender identity
//! included, is encrypted to the recipient with a fresh X25519 key (ECIES: ephemeral-static
//! Diffie-Hellman, HKDF-SHA256, XChaCha20-Poly1305). The broker sees only the recipient (from
//! the subject), the size and the time.
//!
//! ```text
//! envelope  = 0x01 || ephemeral_x25519_public(32) || xchacha20poly1305(plaintext) (+16 tag)
//! plaintext = u32be(header_len) || header || body || signature(64)
//! signature = ed25519 by header.from over
//!             "KEZ-MESSAGE-V1" || 0x00 || u32be(header_len) || header || body
//! header    = canonical JSON {"content_type","from","id","time","to","v"}
//! ```
//!
//! Version 2 (PROTOCOL.md §15.3) is for a recipient device with an Olm key: the same signed
//! plaintext (header `"v":2`) is encrypted by an Olm session ([`crate::olm`]), which gives
//! forward secrecy, and the result is sealed to the recipient as above (sealed sender), with
//! the message id in clear so that a duplicate is dropped before any decryption:
//!
//! ```text
//! envelope v2   = 0x02 || id(16) || ephemeral_x25519_public(32) || xchacha20poly1305(outer) (+16 tag)
//!                 (HKDF info "KEZ-ENVELOPE-V2", aad = 0x02 || id || ephemeral public)
//! outer         = sender device key(32) || Olm message type(1) || Olm message bytes
//! Olm plaintext = the signed plaintext above, header v 2, id and from as in the outer layer
//! ```

use std::fmt;
use std::str::FromStr;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::canonical;
use crate::key::{KeyError, PublicKey, SecretKey, Signature, SignatureDomain, decode_hex};
use crate::olm::{OlmMessage, OlmSession};

/// The envelope format version (its first byte).
pub const ENVELOPE_VERSION: u8 = 1;
/// The format version of an envelope whose inside is an Olm message (its first byte).
pub const ENVELOPE_VERSION_OLM: u8 = 2;
/// HKDF `info` for the envelope key and nonce.
pub const ENVELOPE_KDF_INFO: &[u8] = b"KEZ-ENVELOPE-V1";
/// HKDF `info` for the key and nonce of version 2's outer layer.
pub const ENVELOPE_V2_KDF_INFO: &[u8] = b"KEZ-ENVELOPE-V2";
/// Largest envelope, in bytes (the inbox stream's message limit).
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;
/// Largest header, in bytes.
pub const MAX_HEADER_BYTES: usize = 1024;
/// Largest content type, in bytes.
pub const MAX_CONTENT_TYPE_LEN: usize = 64;

const EPHEMERAL_LEN: usize = 32;
const TAG_LEN: usize = 16;
const SIGNATURE_LEN: usize = 64;
/// Version, ephemeral key and tag.
const ENVELOPE_FRAME: usize = 1 + EPHEMERAL_LEN + TAG_LEN;
/// Header length prefix and signature.
const PLAINTEXT_FRAME: usize = 4 + SIGNATURE_LEN;
const ID_LEN: usize = 16;
/// Version 2's version, clear id, ephemeral key and tag.
const ENVELOPE_V2_FRAME: usize = 1 + ID_LEN + EPHEMERAL_LEN + TAG_LEN;
/// Version 2's sender device key and Olm message type byte.
const OUTER_PREFIX: usize = 32 + 1;
/// The most an Olm message adds to its plaintext: a pre-key message is
/// version(1) + three keys (3 × (2 + 32)) + the inner message's tag and length (1 + 3), and
/// the inner message version(1) + ratchet key (2 + 32) + chain index (1 + at most 10) +
/// the ciphertext's tag and length (1 + 3) + MAC (32); AES-CBC pads by 1 to 16 bytes. Lengths
/// take at most 3 varint bytes because an envelope is under 2^21 bytes. A normal message is
/// the inner message alone, smaller. `the_v2_overhead_bound_holds` measures it.
const OLM_OVERHEAD_BOUND: usize = (1 + 3 * 34 + 4) + (1 + 34 + 11 + 4 + 32) + 16;
/// The most envelope version 2 adds to the signed plaintext; more than version 1's frame, so
/// the one [`max_body_len`] is this.
const ENVELOPE_V2_OVERHEAD_BOUND: usize = ENVELOPE_V2_FRAME + OUTER_PREFIX + OLM_OVERHEAD_BOUND;

/// A message's random 128-bit id; recipients drop a second message with an id they have seen.
/// Text form: 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId([u8; 16]);

impl MessageId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        MessageId(id)
    }

    /// The id with these bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        MessageId(bytes)
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        Ok(MessageId(decode_hex::<16>(text)?))
    }
}

serde_as_text!(MessageId);

/// Why an envelope cannot be sealed or opened. Each variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Larger than [`MAX_ENVELOPE_BYTES`].
    #[error("message is {size} bytes; the limit is {MAX_ENVELOPE_BYTES}")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Shorter than the smallest possible envelope, or a length inside points past the end.
    #[error("message is truncated")]
    Truncated,
    /// A version this code does not know.
    #[error("message format version {version} is not supported; upgrade")]
    UnknownVersion {
        /// The version found.
        version: u64,
    },
    /// The ephemeral key gives an all-zero shared secret (a small-order point).
    #[error("message uses a weak ephemeral key")]
    WeakKey,
    /// Not encrypted to this key, or changed in transit.
    #[error("message cannot be decrypted with this key (not for us, or tampered)")]
    DecryptionFailed,
    /// Decrypted, but the inside is not a valid header and body.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Decrypted, but signed for someone else: a forwarded message.
    #[error("message was signed for another recipient")]
    WrongRecipient,
    /// The sender's signature does not verify.
    #[error("sender signature does not verify")]
    BadSignature,
    /// Version 2: the signed header names another sender than the outer layer.
    #[error("the signed sender is not the sealed sender")]
    SenderMismatch,
    /// Version 2: the signed header has another id than the outer layer.
    #[error("the signed id is not the envelope's id")]
    IdMismatch,
}

impl EnvelopeError {
    /// The failure's stable snake_case name.
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::TooLarge { .. } => "too_large",
            EnvelopeError::Truncated => "truncated",
            EnvelopeError::UnknownVersion { .. } => "unknown_version",
            EnvelopeError::WeakKey => "weak_key",
            EnvelopeError::DecryptionFailed => "decryption_failed",
            EnvelopeError::Malformed(_) => "malformed",
            EnvelopeError::WrongRecipient => "wrong_recipient",
            EnvelopeError::BadSignature => "bad_signature",
            EnvelopeError::SenderMismatch => "sender_mismatch",
            EnvelopeError::IdMismatch => "id_mismatch",
        }
    }
}

/// The signed header inside an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    v: u64,
    from: PublicKey,
    to: PublicKey,
    id: MessageId,
    time: u64,
    content_type: String,
}

/// An opened message: who sent it, to whom, and what it says. Only [`open`], [`open_outer`]
/// and [`open_inner`] make one, so its sender is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The sender's key (verified).
    pub from: PublicKey,
    /// The recipient's key (ours).
    pub to: PublicKey,
    /// The random id.
    pub id: MessageId,
    /// The sender's clock when it was sealed, seconds since the Unix epoch.
    pub time: u64,
    /// What `body` is: `text`, `file-offer`, ... (`[a-z0-9_.+/-]{1,64}`).
    pub content_type: String,
    /// The content.
    pub body: Vec<u8>,
}

/// Seals `body` from `sender` to `recipient` with a fresh id and ephemeral key.
pub fn seal(
    sender: &SecretKey,
    recipient: &PublicKey,
    content_type: &str,
    body: &[u8],
    time: u64,
) -> Result<(MessageId, Vec<u8>), EnvelopeError> {
    let id = MessageId::random();
    let envelope = seal_with_id(sender, recipient, content_type, body, time, id)?;
    Ok((id, envelope))
}

/// [`seal`] with the message id given: one message sent to several devices of its recipients
/// is one envelope per device, all with the message's id (each with its own ephemeral key),
/// so that every device knows it by the same id.
pub fn seal_with_id(
    sender: &SecretKey,
    recipient: &PublicKey,
    content_type: &str,
    body: &[u8],
    time: u64,
    id: MessageId,
) -> Result<Vec<u8>, EnvelopeError> {
    let mut ephemeral = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(ephemeral.as_mut());
    seal_with_fixed_randomness(sender, recipient, content_type, body, time, id, &ephemeral)
}

/// The largest body an envelope of `content_type` sealed at `time` can carry within
/// [`MAX_ENVELOPE_BYTES`] in either version: the limit minus version 2's frame (with the
/// bound of what Olm adds, larger than version 1's frame), the signature and the header
/// (whose size depends only on the content type and the number of digits of the time). So a
/// body that fits, fits whichever version the recipient device gets. `None` for a content
/// type [`seal`] refuses.
pub fn max_body_len(content_type: &str, time: u64) -> Option<usize> {
    check_content_type(content_type).ok()?;
    // Every key has the same text length: any key gives the header's size.
    let key = SecretKey::from_seed(&[0; 32]).public_key();
    let header = Header {
        v: u64::from(ENVELOPE_VERSION),
        from: key,
        to: key,
        id: MessageId([0; 16]),
        time,
        content_type: content_type.to_owned(),
    };
    let header = canonical::encode(&serde_json::to_value(&header).ok()?).ok()?;
    MAX_ENVELOPE_BYTES.checked_sub(ENVELOPE_V2_OVERHEAD_BOUND + PLAINTEXT_FRAME + header.len())
}

/// [`seal`] with the id and ephemeral secret given: for test vectors only. Reusing an ephemeral
/// secret for two messages to one recipient reuses key and nonce and destroys confidentiality.
pub fn seal_with_fixed_randomness(
    sender: &SecretKey,
    recipient: &PublicKey,
    content_type: &str,
    body: &[u8],
    time: u64,
    id: MessageId,
    ephemeral: &[u8; 32],
) -> Result<Vec<u8>, EnvelopeError> {
    let plaintext = signed_plaintext(
        sender,
        recipient,
        ENVELOPE_VERSION,
        content_type,
        body,
        time,
        id,
    )?;
    encrypt(recipient, ephemeral, &plaintext)
}

/// `u32be(header_len) || header || body || signature` with a header of format `version`,
/// signed by `sender`: the plaintext of both envelope versions.
fn signed_plaintext(
    sender: &SecretKey,
    recipient: &PublicKey,
    version: u8,
    content_type: &str,
    body: &[u8],
    time: u64,
    id: MessageId,
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    check_content_type(content_type)?;
    let header = Header {
        v: u64::from(version),
        from: sender.public_key(),
        to: *recipient,
        id,
        time,
        content_type: content_type.to_owned(),
    };
    let header = canonical::encode(&serde_json::to_value(&header).expect("a header serialises"))
        .map_err(|err| EnvelopeError::Malformed(err.to_string()))?;
    let signature = sender.sign(SignatureDomain::Message, &signed_body(&header, body));
    let mut plaintext = Zeroizing::new(Vec::with_capacity(
        PLAINTEXT_FRAME + header.len() + body.len(),
    ));
    plaintext.extend_from_slice(&(header.len() as u32).to_be_bytes());
    plaintext.extend_from_slice(&header);
    plaintext.extend_from_slice(body);
    plaintext.extend_from_slice(&signature.to_bytes());
    Ok(plaintext)
}

/// Signs the message (header `"v":2`) with `sender`, encrypts it with the Olm `session` to
/// `recipient`'s device, and seals that to `recipient` with a fresh ephemeral key (PROTOCOL.md
/// §15.3). A body longer than [`max_body_len`] is [`EnvelopeError::TooLarge`] before the
/// session is touched. The caller saves the session (it advanced) with the message sent.
pub fn seal_olm(
    sender: &SecretKey,
    recipient: &PublicKey,
    session: &mut OlmSession,
    content_type: &str,
    body: &[u8],
    time: u64,
    id: MessageId,
) -> Result<Vec<u8>, EnvelopeError> {
    let plaintext = signed_plaintext(
        sender,
        recipient,
        ENVELOPE_VERSION_OLM,
        content_type,
        body,
        time,
        id,
    )?;
    let bound = ENVELOPE_V2_OVERHEAD_BOUND + plaintext.len();
    if bound > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge { size: bound });
    }
    let message = session.encrypt(&plaintext);
    let mut ephemeral = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(ephemeral.as_mut());
    seal_olm_outer_with_fixed_randomness(recipient, id, &sender.public_key(), &message, &ephemeral)
}

/// Version 2's outer layer around an Olm message, with the ephemeral secret given: for
/// [`seal_olm`] and test vectors only (reusing an ephemeral secret for two envelopes to one
/// recipient reuses key and nonce and destroys the outer layer's confidentiality).
pub fn seal_olm_outer_with_fixed_randomness(
    recipient: &PublicKey,
    id: MessageId,
    sender: &PublicKey,
    message: &OlmMessage,
    ephemeral: &[u8; 32],
) -> Result<Vec<u8>, EnvelopeError> {
    let message = message.to_bytes();
    let mut outer = Zeroizing::new(Vec::with_capacity(32 + message.len()));
    outer.extend_from_slice(sender.as_bytes());
    outer.extend_from_slice(&message);
    let mut clear = [0u8; 1 + ID_LEN];
    clear[0] = ENVELOPE_VERSION_OLM;
    clear[1..].copy_from_slice(id.as_bytes());
    seal_outer(recipient, ephemeral, ENVELOPE_V2_KDF_INFO, &clear, &outer)
}

/// The message id a version 2 envelope carries in clear, read without decrypting anything, so
/// that a duplicate is dropped first. `None` for version 1 (its id is inside) and for bytes
/// too short or too long to be an envelope. Not authenticated until [`open_outer`] succeeds.
pub fn outer_id(envelope: &[u8]) -> Option<MessageId> {
    if envelope.len() > MAX_ENVELOPE_BYTES || envelope.first() != Some(&ENVELOPE_VERSION_OLM) {
        return None;
    }
    let id = envelope.get(1..1 + ID_LEN)?;
    Some(MessageId(id.try_into().expect("16 bytes")))
}

/// What [`open_outer`] gives: a version 1 envelope opened in full, or version 2's sender and
/// Olm message, for the caller's session to decrypt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// A version 1 envelope, verified ([`open`]).
    Sealed(Message),
    /// The outer layer of a version 2 envelope.
    Olm(OlmEnvelope),
}

/// The outer layer of a version 2 envelope, opened: authenticated as sealed to us, but the
/// sender is only what it claims until [`open_inner`] checks its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OlmEnvelope {
    /// The message id (the clear one, which the AEAD binds).
    pub id: MessageId,
    /// The sender's device key as the outer layer names it: whose session to use.
    pub sender: PublicKey,
    /// The Olm message, well formed ([`OlmMessage::from_bytes`]).
    pub message: OlmMessage,
}

/// Opens what needs no state: a version 1 envelope in full ([`open`]), or a version 2
/// envelope's outer layer (PROTOCOL.md §15.3 steps 2–5; step 1, dropping a duplicate by
/// [`outer_id`], comes before). Then, for version 2, the caller checks that the sender's chain
/// binds an Olm key (and for a pre-key message that it is the one the message names),
/// decrypts [`OlmEnvelope::message`] with its session, and gives the plaintext to
/// [`open_inner`]; it records the id only once that succeeded.
pub fn open_outer(recipient: &SecretKey, envelope: &[u8]) -> Result<Opened, EnvelopeError> {
    if envelope.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge {
            size: envelope.len(),
        });
    }
    match *envelope.first().ok_or(EnvelopeError::Truncated)? {
        ENVELOPE_VERSION => return open(recipient, envelope).map(Opened::Sealed),
        ENVELOPE_VERSION_OLM => {}
        version => {
            return Err(EnvelopeError::UnknownVersion {
                version: u64::from(version),
            });
        }
    }
    // The smallest Olm message is bigger than this; its decoder says what is missing.
    if envelope.len() < ENVELOPE_V2_FRAME + OUTER_PREFIX {
        return Err(EnvelopeError::Truncated);
    }
    let (aad, ciphertext) = envelope.split_at(1 + ID_LEN + EPHEMERAL_LEN);
    let id = MessageId(aad[1..1 + ID_LEN].try_into().expect("16 bytes"));
    let ephemeral_public: [u8; 32] = aad[1 + ID_LEN..].try_into().expect("32 bytes");
    let shared = recipient
        .to_x25519()
        .diffie_hellman(&x25519_dalek::PublicKey::from(ephemeral_public));
    if !shared.was_contributory() {
        return Err(EnvelopeError::WeakKey);
    }
    let (cipher, nonce) = envelope_cipher(
        ENVELOPE_V2_KDF_INFO,
        shared.as_bytes(),
        &ephemeral_public,
        recipient.x25519_public(),
    );
    let outer = cipher
        .decrypt(
            &nonce,
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| EnvelopeError::DecryptionFailed)?;
    let (sender, message) = outer.split_at(32);
    let sender = PublicKey::from_bytes(sender.try_into().expect("32 bytes"))
        .map_err(|err| EnvelopeError::Malformed(format!("sender: {err}")))?;
    let message = OlmMessage::from_bytes(message)
        .map_err(|err| EnvelopeError::Malformed(format!("{}: {err}", err.code())))?;
    Ok(Opened::Olm(OlmEnvelope {
        id,
        sender,
        message,
    }))
}

/// Checks the Olm plaintext of `outer` (PROTOCOL.md §15.3 step 8): the signed header is version 2,
/// for `recipient`, from `outer.sender`, with `outer.id`, and the signature verifies. Gives
/// the message.
pub fn open_inner(
    recipient: &PublicKey,
    outer: &OlmEnvelope,
    plaintext: &[u8],
) -> Result<Message, EnvelopeError> {
    open_signed(recipient, ENVELOPE_VERSION_OLM, plaintext, |header| {
        if header.from != outer.sender {
            return Err(EnvelopeError::SenderMismatch);
        }
        if header.id != outer.id {
            return Err(EnvelopeError::IdMismatch);
        }
        Ok(())
    })
}

/// Opens an envelope addressed to `recipient`: decrypts it, checks it was signed for us and by
/// the sender it names, and returns the message. Deduplication by [`MessageId`] is the caller's.
/// A version 2 envelope is [`EnvelopeError::UnknownVersion`] here: [`open_outer`] opens both.
pub fn open(recipient: &SecretKey, envelope: &[u8]) -> Result<Message, EnvelopeError> {
    let plaintext = decrypt(recipient, envelope)?;
    open_signed(
        &recipient.public_key(),
        ENVELOPE_VERSION,
        &plaintext,
        |_| Ok(()),
    )
}

/// Reads and verifies the signed plaintext of an envelope of `version`: header length, header
/// (its `v` must be `version`, so neither version's plaintext passes as the other's), `to`,
/// then `check` (version 2's consistency with its outer layer), then the signature.
fn open_signed(
    recipient: &PublicKey,
    version: u8,
    plaintext: &[u8],
    check: impl FnOnce(&Header) -> Result<(), EnvelopeError>,
) -> Result<Message, EnvelopeError> {
    let (length, rest) = plaintext
        .split_at_checked(4)
        .ok_or(EnvelopeError::Truncated)?;
    let header_len = u32::from_be_bytes(length.try_into().expect("4 bytes")) as usize;
    if header_len > MAX_HEADER_BYTES {
        return Err(EnvelopeError::Malformed(format!(
            "header is {header_len} bytes; the limit is {MAX_HEADER_BYTES}"
        )));
    }
    if rest.len() < header_len + SIGNATURE_LEN {
        return Err(EnvelopeError::Truncated);
    }
    let (header_bytes, rest) = rest.split_at(header_len);
    let (body, signature) = rest.split_at(rest.len() - SIGNATURE_LEN);
    let value = canonical::decode(header_bytes)
        .map_err(|err| EnvelopeError::Malformed(format!("header: {err}")))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(found) if found == u64::from(version) => {}
        Some(version) => return Err(EnvelopeError::UnknownVersion { version }),
        None => return Err(EnvelopeError::Malformed("header has no version".into())),
    }
    let header: Header = serde_json::from_value(value)
        .map_err(|err| EnvelopeError::Malformed(format!("header: {err}")))?;
    check_content_type(&header.content_type)?;
    if header.to != *recipient {
        return Err(EnvelopeError::WrongRecipient);
    }
    check(&header)?;
    let signature = Signature::from_bytes(signature.try_into().expect("64 bytes"));
    header
        .from
        .verify(
            SignatureDomain::Message,
            &signed_body(header_bytes, body),
            &signature,
        )
        .map_err(|_| EnvelopeError::BadSignature)?;
    Ok(Message {
        from: header.from,
        to: header.to,
        id: header.id,
        time: header.time,
        content_type: header.content_type,
        body: body.to_vec(),
    })
}

/// What the sender signs in [`SignatureDomain::Message`]: `u32be(header_len) || header || body`.
pub fn signed_body(header: &[u8], body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(4 + header.len() + body.len());
    message.extend_from_slice(&(header.len() as u32).to_be_bytes());
    message.extend_from_slice(header);
    message.extend_from_slice(body);
    message
}

pub(crate) fn check_content_type(content_type: &str) -> Result<(), EnvelopeError> {
    let ok = !content_type.is_empty()
        && content_type.len() <= MAX_CONTENT_TYPE_LEN
        && content_type.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'_' | b'.' | b'+' | b'/' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(EnvelopeError::Malformed(format!(
            "content type must be 1 to {MAX_CONTENT_TYPE_LEN} of a-z 0-9 _ . + / -"
        )))
    }
}

/// The AEAD key and nonce for one envelope: HKDF-SHA256 over the X25519 shared secret, salted
/// with both public keys so the key is bound to this ephemeral key and this recipient; `info`
/// names the version, so the two versions never share a key.
fn envelope_cipher(
    info: &[u8],
    shared: &[u8; 32],
    ephemeral_public: &[u8; 32],
    recipient: &x25519_dalek::PublicKey,
) -> (XChaCha20Poly1305, XNonce) {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral_public);
    salt[32..].copy_from_slice(recipient.as_bytes());
    let mut okm = Zeroizing::new([0u8; 56]);
    Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(info, okm.as_mut())
        .expect("56 bytes is a valid HKDF-SHA256 length");
    let cipher = XChaCha20Poly1305::new_from_slice(&okm[..32]).expect("32-byte key");
    (cipher, *XNonce::from_slice(&okm[32..]))
}

/// Version 1's envelope around a signed plaintext (8.1).
fn encrypt(
    recipient: &PublicKey,
    ephemeral: &[u8; 32],
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    seal_outer(
        recipient,
        ephemeral,
        ENVELOPE_KDF_INFO,
        &[ENVELOPE_VERSION],
        plaintext,
    )
}

/// Seals `plaintext` to `recipient` with the ephemeral secret given (8.1, 15.3): the envelope
/// is `clear || E || ciphertext`, where `clear` is what goes before the ephemeral key in clear
/// (the version, and version 2's id), and the AEAD's associated data is `clear || E`.
fn seal_outer(
    recipient: &PublicKey,
    ephemeral: &[u8; 32],
    info: &[u8],
    clear: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let size = clear.len() + EPHEMERAL_LEN + TAG_LEN + plaintext.len();
    if size > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge { size });
    }
    let ephemeral_public =
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*ephemeral)).to_bytes();
    let (shared, recipient) = recipient
        .x25519_agree(ephemeral)
        .ok_or(EnvelopeError::WeakKey)?;
    let (cipher, nonce) = envelope_cipher(info, &shared, &ephemeral_public, &recipient);
    let mut aad = Vec::with_capacity(clear.len() + EPHEMERAL_LEN);
    aad.extend_from_slice(clear);
    aad.extend_from_slice(&ephemeral_public);
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| EnvelopeError::TooLarge { size })?;
    let mut envelope = Vec::with_capacity(size);
    envelope.extend_from_slice(&aad);
    envelope.extend_from_slice(&ciphertext);
    Ok(envelope)
}

fn decrypt(recipient: &SecretKey, envelope: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    if envelope.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge {
            size: envelope.len(),
        });
    }
    let version = *envelope.first().ok_or(EnvelopeError::Truncated)?;
    if version != ENVELOPE_VERSION {
        return Err(EnvelopeError::UnknownVersion {
            version: u64::from(version),
        });
    }
    if envelope.len() < ENVELOPE_FRAME + PLAINTEXT_FRAME {
        return Err(EnvelopeError::Truncated);
    }
    let (aad, ciphertext) = envelope.split_at(1 + EPHEMERAL_LEN);
    let ephemeral_public: [u8; 32] = aad[1..].try_into().expect("32 bytes");
    let shared = recipient
        .to_x25519()
        .diffie_hellman(&x25519_dalek::PublicKey::from(ephemeral_public));
    if !shared.was_contributory() {
        return Err(EnvelopeError::WeakKey);
    }
    let (cipher, nonce) = envelope_cipher(
        ENVELOPE_KDF_INFO,
        shared.as_bytes(),
        &ephemeral_public,
        recipient.x25519_public(),
    );
    cipher
        .decrypt(
            &nonce,
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| EnvelopeError::DecryptionFailed)
}

#[cfg(test)]
mod tests;
