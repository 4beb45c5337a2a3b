//! Pairing a new device (PROTOCOL.md §4.7): the request a new device shows, the fingerprint
//! people compare, and the three messages the existing and the new device exchange through a
//! relay they do not trust (the offer, the answer, the sync), with every check each side makes.
//!
//! The invariant: **the new key comes from the user, never from the relay**. The existing
//! device takes the new key only from the request line its user pasted; the new device's
//! counter-signature must verify under that key; a relay that substitutes its own key, alters
//! the link or replays an earlier answer produces nothing the existing device accepts.
//!
//! Pure: no I/O, the clock is a parameter.

use std::fmt;

use data_encoding::{BASE32_NOPAD, HEXLOWER};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::sigchain::{DeviceKind, LINK_VERSION_2, MAX_NAME_LEN};
use crate::{Handle, Op, PublicKey, SecretKey, Sigchain, Signature, SignatureDomain, UnsignedLink};

/// What every request line starts with.
pub const REQUEST_PREFIX: &str = "kez-pair:";
/// The request format's version byte.
pub const REQUEST_VERSION: u8 = 1;
/// The longest a request may live: its expiry is at most this far after now.
pub const MAX_LIFETIME_SECS: u64 = 15 * 60;
/// How long a request lives by default.
pub const DEFAULT_LIFETIME_SECS: u64 = 10 * 60;
/// How far a request's expiry may be beyond [`MAX_LIFETIME_SECS`] (the two clocks differ).
pub const CLOCK_SKEW_SECS: u64 = 5 * 60;
/// The content type of the sync envelope.
pub const SYNC_CONTENT_TYPE: &str = "kez-pair-sync";
/// The tag of the request's checksum and of the fingerprint (hashes, not signatures).
const CHECKSUM_TAG: &[u8] = b"KEZ-PAIR-REQUEST-V1\0";
const FINGERPRINT_TAG: &[u8] = b"KEZ-PAIR-FINGERPRINT-V1\0";
/// Checksum bytes at the end of a request.
const CHECKSUM_LEN: usize = 4;
/// Bytes of the request before its variable part.
const FIXED_LEN: usize = 1 + 32 + 32 + 16 + 8 + 1;

/// Why a pairing step failed. Each has a stable [`code`](PairError::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    /// Not `kez-pair:` followed by base32 of a request.
    #[error("not a pairing request: {0}")]
    BadRequest(String),
    /// The checksum does not match: a character was changed or lost on the way.
    #[error(
        "the pairing request's checksum does not match: it was mistyped or changed; copy it again from the new device"
    )]
    BadChecksum,
    /// A request version this code does not know.
    #[error("pairing request version {0} is unknown; update kez-chat")]
    UnknownVersion(u8),
    /// The request expired.
    #[error(
        "the pairing request expired {0} s ago; run `kez-chat device join` on the new device again"
    )]
    Expired(u64),
    /// The request expires further ahead than any request may.
    #[error(
        "the pairing request claims to live until {0}, longer than any request may; check both clocks"
    )]
    TooFarAhead(u64),
    /// The request names another identity than this chain's.
    #[error(
        "the pairing request is for {requested}, but this device is {own}: run `device add` on a device of {requested}"
    )]
    WrongIdentity {
        /// The identity in the request.
        requested: String,
        /// This chain's identity.
        own: String,
    },
    /// The request's key is (or was) a device of the chain already: a request used before.
    #[error(
        "the key in this pairing request is already a device of this identity (a request is used once): run `kez-chat device join` again for a new one"
    )]
    AlreadyUsed,
    /// A device of that name is active already.
    #[error("a device named {0} is already active; join again with another --name")]
    NameTaken(String),
    /// The offer is not signed by an active device of the requested identity.
    #[error("the offer is not signed by a device of the identity: {0}")]
    BadOffer(String),
    /// The link the new device is asked to counter-sign is not the one it asked for.
    #[error("the link to counter-sign is not the one requested: {0}")]
    WrongLink(String),
    /// The answer is not signed by the key in the request.
    #[error(
        "the answer is not signed by the new device's key from the request (the relay may have substituted its own)"
    )]
    BadAnswerSignature,
    /// The counter-signature does not verify under the requested key over the link sent.
    #[error(
        "the counter-signature does not verify under the new device's key over the link this device made (the relay changed or replayed it)"
    )]
    BadCounterSignature,
    /// The message belongs to another request (its nonce differs).
    #[error("the message belongs to another pairing request (nonce differs): replayed")]
    WrongNonce,
    /// The new device refused the offer, saying why.
    #[error("the new device refused: {0}")]
    Refused(String),
    /// The sync message is not what it should be.
    #[error("the sync message is not valid: {0}")]
    BadSync(String),
    /// This request was counter-signed already.
    #[error("this request was counter-signed already; a request is used once")]
    Replayed,
}

impl PairError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            PairError::BadRequest(_) => "bad_request_line",
            PairError::BadChecksum => "bad_checksum",
            PairError::UnknownVersion(_) => "unknown_version",
            PairError::Expired(_) => "expired",
            PairError::TooFarAhead(_) => "too_far_ahead",
            PairError::WrongIdentity { .. } => "wrong_identity",
            PairError::AlreadyUsed => "already_used",
            PairError::NameTaken(_) => "duplicate_device_name",
            PairError::BadOffer(_) => "bad_offer",
            PairError::WrongLink(_) => "wrong_link",
            PairError::BadAnswerSignature => "bad_answer_signature",
            PairError::BadCounterSignature => "bad_counter_signature",
            PairError::WrongNonce => "wrong_nonce",
            PairError::Refused(_) => "refused",
            PairError::BadSync(_) => "bad_sync",
            PairError::Replayed => "replayed",
        }
    }
}

/// A random 16-byte value naming one pairing request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 16]);

impl Nonce {
    /// A fresh random nonce.
    pub fn random() -> Nonce {
        let mut bytes = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Nonce(bytes)
    }

    /// 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        HEXLOWER.encode(&self.0)
    }

    /// Parses 32 lowercase hex digits.
    pub fn from_hex(text: &str) -> Option<Nonce> {
        let bytes = HEXLOWER.decode(text.as_bytes()).ok()?;
        Some(Nonce(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a new device asks for: to become device `name` of kind `kind` of `identity`
/// (`handle`), with the key `device`, until `expires`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRequest {
    /// The identity (chain id) to join, as the new device's user named it (by handle).
    pub identity: PublicKey,
    /// That identity's handle, `@name@domain`.
    pub handle: String,
    /// The new device's key.
    pub device: PublicKey,
    /// The new device's name (the sigchain's *name* rule).
    pub name: String,
    /// Its kind (`desktop`, `mobile` or `cli`; a paper key is not paired).
    pub kind: DeviceKind,
    /// Names this request.
    pub nonce: Nonce,
    /// Seconds since the epoch after which nobody acts on it.
    pub expires: u64,
}

fn kind_byte(kind: DeviceKind) -> u8 {
    match kind {
        DeviceKind::Desktop => 0,
        DeviceKind::Mobile => 1,
        DeviceKind::Cli => 2,
        DeviceKind::Paper => 3,
    }
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let digest = Sha256::new()
        .chain_update(CHECKSUM_TAG)
        .chain_update(bytes)
        .finalize();
    digest[..CHECKSUM_LEN].try_into().expect("4 bytes")
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "device name {name:?}: 1 to {MAX_NAME_LEN} characters of a-z 0-9 _ - ."
        ))
    }
}

impl PairRequest {
    /// A new request for `device` to join `identity`, living `lifetime` seconds from `now`.
    /// Refuses a name the link could not carry, a paper kind, a handle not in full normal
    /// form, and a lifetime over [`MAX_LIFETIME_SECS`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        identity: PublicKey,
        handle: &str,
        device: PublicKey,
        name: &str,
        kind: DeviceKind,
        now: u64,
        lifetime: u64,
    ) -> Result<PairRequest, PairError> {
        let request = PairRequest {
            identity,
            handle: handle.to_owned(),
            device,
            name: name.to_owned(),
            kind,
            nonce: Nonce::random(),
            expires: now + lifetime.min(MAX_LIFETIME_SECS),
        };
        request.check_fields()?;
        Ok(request)
    }

    fn check_fields(&self) -> Result<(), PairError> {
        check_name(&self.name).map_err(PairError::BadRequest)?;
        if self.kind == DeviceKind::Paper {
            return Err(PairError::BadRequest(
                "a paper key is not paired (use `kez-chat paperkey`)".into(),
            ));
        }
        let domain = self.handle.rsplit('@').next().unwrap_or_default();
        match Handle::parse(&self.handle, domain) {
            Ok(handle) if handle.to_string() == self.handle => {}
            _ => {
                return Err(PairError::BadRequest(format!(
                    "handle {:?} is not a full handle `@name@domain`",
                    self.handle
                )));
            }
        }
        if self.device == self.identity {
            return Err(PairError::BadRequest(
                "the new device's key is the identity's own".into(),
            ));
        }
        Ok(())
    }

    /// The request's bytes: version, identity, device, nonce, expiry (u64 big-endian), kind,
    /// name and handle (each after its length byte), then the checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(FIXED_LEN + 2 + 64 + 255 + CHECKSUM_LEN);
        bytes.push(REQUEST_VERSION);
        bytes.extend_from_slice(self.identity.as_bytes());
        bytes.extend_from_slice(self.device.as_bytes());
        bytes.extend_from_slice(&self.nonce.0);
        bytes.extend_from_slice(&self.expires.to_be_bytes());
        bytes.push(kind_byte(self.kind));
        bytes.push(self.name.len() as u8);
        bytes.extend_from_slice(self.name.as_bytes());
        bytes.push(self.handle.len().min(255) as u8);
        bytes.extend_from_slice(&self.handle.as_bytes()[..self.handle.len().min(255)]);
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        bytes
    }

    /// The one line people copy: `kez-pair:` and the bytes in base32 (RFC 4648, upper case,
    /// no padding).
    pub fn to_line(&self) -> String {
        format!("{REQUEST_PREFIX}{}", BASE32_NOPAD.encode(&self.to_bytes()))
    }

    /// Parses a line the user pasted (surrounding whitespace and the base32's case ignored)
    /// and checks it at time `now`: prefix, base32, checksum, version, fields, not expired,
    /// not living longer than any request may.
    pub fn parse(line: &str, now: u64) -> Result<PairRequest, PairError> {
        let line = line.trim();
        let Some(text) = line.strip_prefix(REQUEST_PREFIX) else {
            return Err(PairError::BadRequest(format!(
                "it does not start with `{REQUEST_PREFIX}`"
            )));
        };
        let bytes = BASE32_NOPAD
            .decode(text.to_ascii_uppercase().as_bytes())
            .map_err(|_| PairError::BadRequest("it is not base32 after the prefix".into()))?;
        if bytes.len() < FIXED_LEN + 2 + CHECKSUM_LEN {
            return Err(PairError::BadRequest("it is too short".into()));
        }
        let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if checksum(body) != sum {
            return Err(PairError::BadChecksum);
        }
        if body[0] != REQUEST_VERSION {
            return Err(PairError::UnknownVersion(body[0]));
        }
        let key = |at: usize| {
            PublicKey::from_bytes(body[at..at + 32].try_into().expect("32 bytes"))
                .map_err(|err| PairError::BadRequest(format!("a key in it is invalid: {err}")))
        };
        let identity = key(1)?;
        let device = key(33)?;
        let nonce = Nonce(body[65..81].try_into().expect("16 bytes"));
        let expires = u64::from_be_bytes(body[81..89].try_into().expect("8 bytes"));
        let kind = match body[89] {
            0 => DeviceKind::Desktop,
            1 => DeviceKind::Mobile,
            2 => DeviceKind::Cli,
            3 => DeviceKind::Paper,
            other => {
                return Err(PairError::BadRequest(format!(
                    "unknown device kind {other}"
                )));
            }
        };
        let mut rest = &body[FIXED_LEN..];
        let mut text = |what: &str| -> Result<String, PairError> {
            let (&len, tail) = rest
                .split_first()
                .ok_or_else(|| PairError::BadRequest(format!("it ends before the {what}")))?;
            let (value, tail) = tail
                .split_at_checked(usize::from(len))
                .ok_or_else(|| PairError::BadRequest(format!("it ends inside the {what}")))?;
            rest = tail;
            String::from_utf8(value.to_vec())
                .map_err(|_| PairError::BadRequest(format!("the {what} is not UTF-8")))
        };
        let name = text("name")?;
        let handle = text("handle")?;
        if !rest.is_empty() {
            return Err(PairError::BadRequest("bytes after the handle".into()));
        }
        let request = PairRequest {
            identity,
            handle,
            device,
            name,
            kind,
            nonce,
            expires,
        };
        request.check_fields()?;
        request.check_time(now)?;
        Ok(request)
    }

    /// Refuses the request at `now` when it has expired, or when it expires further ahead
    /// than any request may.
    pub fn check_time(&self, now: u64) -> Result<(), PairError> {
        if now >= self.expires {
            return Err(PairError::Expired(now - self.expires));
        }
        if self.expires > now + MAX_LIFETIME_SECS + CLOCK_SKEW_SECS {
            return Err(PairError::TooFarAhead(self.expires));
        }
        Ok(())
    }

    /// The fingerprint people compare on both screens: 6 groups of 4 base32 characters of
    /// SHA-256(`KEZ-PAIR-FINGERPRINT-V1` || 0x00 || identity || device || nonce).
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::new()
            .chain_update(FINGERPRINT_TAG)
            .chain_update(self.identity.as_bytes())
            .chain_update(self.device.as_bytes())
            .chain_update(self.nonce.0)
            .finalize();
        let text = BASE32_NOPAD.encode(&digest[..15]);
        text.as_bytes()
            .chunks(4)
            .map(|chunk| std::str::from_utf8(chunk).expect("ASCII"))
            .collect::<Vec<_>>()
            .join("-")
    }

    /// The existing device's checks of the request against its own verified chain: the
    /// identity is this chain's, the key was never a device of it (a used request), and the
    /// name is free.
    pub fn check_for_chain(&self, chain: &Sigchain) -> Result<(), PairError> {
        if chain.chain_id() != self.identity {
            return Err(PairError::WrongIdentity {
                requested: format!("{} ({})", self.handle, self.identity),
                own: chain.chain_id().to_string(),
            });
        }
        if self.device == chain.chain_id() || chain.devices().iter().any(|d| d.key == self.device) {
            return Err(PairError::AlreadyUsed);
        }
        if chain.active_devices().any(|d| d.name == self.name) {
            return Err(PairError::NameTaken(self.name.clone()));
        }
        Ok(())
    }

    /// The `add_device` link the existing device `signer` proposes: the next link of `chain`,
    /// adding exactly the requested key, name and kind, its counter-signature still empty.
    pub fn link(&self, chain: &Sigchain, signer: PublicKey, time: u64) -> UnsignedLink {
        let mut link = chain.next_link_by(
            signer,
            time,
            Op::AddDevice {
                key: self.device,
                name: self.name.clone(),
                kind: self.kind,
                counter_sig: Signature::from_bytes([0; 64]),
            },
        );
        link.version = LINK_VERSION_2;
        link
    }
}

/// The offer: the existing device's proposed link and the chain it extends, signed by that
/// device (`KEZ-PAIR-OFFER-V1`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// The request's nonce (hex).
    pub nonce: String,
    /// The link without `sig` and `payload.counter_sig`, exactly as counter-signed.
    pub link: String,
    /// Every link of the identity's chain, in order.
    pub chain: Vec<String>,
    /// The link signer's signature over the canonical offer without `sig`.
    pub sig: String,
}

fn canonical_without_sig(value: &Value) -> Result<Vec<u8>, String> {
    let mut value = value.clone();
    if let Some(object) = value.as_object_mut() {
        object.remove("sig");
    }
    crate::canonical::encode(&value).map_err(|err| err.to_string())
}

/// Builds the offer of `link` (from [`PairRequest::link`]), which extends the chain whose
/// links are `chain_links`, signed by `signer` (the link's signer).
pub fn make_offer(
    request: &PairRequest,
    link: &UnsignedLink,
    chain_links: &[String],
    signer: &SecretKey,
) -> Result<Vec<u8>, PairError> {
    let body = link
        .counter_signed_body()
        .map_err(|err| PairError::WrongLink(err.to_string()))?;
    let mut value = json!({
        "nonce": request.nonce.to_hex(),
        "link": String::from_utf8(body).expect("canonical JSON is UTF-8"),
        "chain": chain_links,
    });
    let signed = canonical_without_sig(&value).map_err(PairError::BadOffer)?;
    let sig = signer.sign(SignatureDomain::PairOffer, &signed);
    value["sig"] = json!(sig.to_string());
    Ok(serde_json::to_vec(&value).expect("JSON"))
}

/// The new device's checks of an offer, and its counter-signature when they pass: the offer
/// is for this request, its chain verifies from the requested identity's first link, the link
/// extends it (seq, prev), is signed by one of its active devices (who signed the offer), and
/// adds exactly this key with this name and kind. Returns the counter-signature
/// ([`SignatureDomain::SigchainAddDevice`]) and the verified chain.
pub fn check_offer(
    request: &PairRequest,
    device: &SecretKey,
    offer: &[u8],
) -> Result<(Signature, Sigchain), PairError> {
    if device.public_key() != request.device {
        return Err(PairError::WrongLink("not this device's request".into()));
    }
    let value: Value =
        serde_json::from_slice(offer).map_err(|err| PairError::BadOffer(err.to_string()))?;
    let offer: Offer = serde_json::from_value(value.clone())
        .map_err(|err| PairError::BadOffer(err.to_string()))?;
    if Nonce::from_hex(&offer.nonce) != Some(request.nonce) {
        return Err(PairError::WrongNonce);
    }
    let chain = Sigchain::verify(&offer.chain)
        .map_err(|err| PairError::BadOffer(format!("its chain does not verify: {err}")))?;
    if chain.chain_id() != request.identity {
        return Err(PairError::WrongLink(format!(
            "its chain is {}'s, the request is for {}",
            chain.chain_id(),
            request.identity
        )));
    }
    let link = UnsignedLink::from_counter_signed_body(offer.link.as_bytes())
        .map_err(|err| PairError::WrongLink(format!("it does not parse: {err}")))?;
    let sig: Signature = offer
        .sig
        .parse()
        .map_err(|_| PairError::BadOffer("its signature is not 128 hex digits".into()))?;
    let signed = canonical_without_sig(&value).map_err(PairError::BadOffer)?;
    link.signer
        .verify(SignatureDomain::PairOffer, &signed, &sig)
        .map_err(|_| PairError::BadOffer("the signature does not verify".into()))?;
    if !chain.active_devices().any(|d| d.key == link.signer) {
        return Err(PairError::BadOffer(format!(
            "{} is no active device of {}",
            link.signer, request.identity
        )));
    }
    let wrong = |what: String| Err(PairError::WrongLink(what));
    if link.chain != request.identity {
        return wrong(format!("it is for the chain {}", link.chain));
    }
    if link.version != LINK_VERSION_2 {
        return wrong(format!("version {}", link.version));
    }
    if link.seq != chain.seq() + 1 || link.prev != Some(chain.head()) {
        return wrong(format!(
            "seq {} does not follow the chain's head (seq {})",
            link.seq,
            chain.seq()
        ));
    }
    match &link.op {
        Op::AddDevice {
            key, name, kind, ..
        } if *key == request.device && *name == request.name && *kind == request.kind => {}
        Op::AddDevice {
            key, name, kind, ..
        } => {
            return wrong(format!(
                "it adds {key} as {name:?} ({kind}), the request is for {} as {:?} ({})",
                request.device, request.name, request.kind
            ));
        }
        other => return wrong(format!("its op is {}", other.name())),
    }
    let counter_sig = device.sign(SignatureDomain::SigchainAddDevice, offer.link.as_bytes());
    Ok((counter_sig, chain))
}

/// The new device's answer: its counter-signature, or why it refused, signed by the new key
/// (`KEZ-PAIR-ANSWER-V1`).
pub fn make_answer(
    request: &PairRequest,
    device: &SecretKey,
    outcome: Result<&Signature, &PairError>,
) -> Vec<u8> {
    let mut value = match outcome {
        Ok(counter_sig) => json!({
            "nonce": request.nonce.to_hex(),
            "counter_sig": counter_sig.to_string(),
        }),
        Err(err) => json!({
            "nonce": request.nonce.to_hex(),
            "refused": format!("{}: {err}", err.code()),
        }),
    };
    let signed = canonical_without_sig(&value).expect("plain JSON");
    let sig = device.sign(SignatureDomain::PairAnswer, &signed);
    value["sig"] = json!(sig.to_string());
    serde_json::to_vec(&value).expect("JSON")
}

/// The existing device's checks of the answer to its `link`: signed by the key from the
/// request (which the user pasted), for this request's nonce, and its counter-signature
/// verifies under that key over the very link this device made. Returns the link with the
/// counter-signature in place, for the signer to sign.
pub fn check_answer(
    request: &PairRequest,
    link: &UnsignedLink,
    answer: &[u8],
) -> Result<UnsignedLink, PairError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wire {
        nonce: String,
        #[serde(default)]
        counter_sig: Option<String>,
        #[serde(default)]
        refused: Option<String>,
        sig: String,
    }
    let value: Value = serde_json::from_slice(answer).map_err(|_| PairError::BadAnswerSignature)?;
    let wire: Wire =
        serde_json::from_value(value.clone()).map_err(|_| PairError::BadAnswerSignature)?;
    let sig: Signature = wire
        .sig
        .parse()
        .map_err(|_| PairError::BadAnswerSignature)?;
    let signed = canonical_without_sig(&value).map_err(|_| PairError::BadAnswerSignature)?;
    request
        .device
        .verify(SignatureDomain::PairAnswer, &signed, &sig)
        .map_err(|_| PairError::BadAnswerSignature)?;
    if Nonce::from_hex(&wire.nonce) != Some(request.nonce) {
        return Err(PairError::WrongNonce);
    }
    if let Some(reason) = wire.refused {
        return Err(PairError::Refused(reason));
    }
    let counter_sig: Signature = wire
        .counter_sig
        .as_deref()
        .ok_or(PairError::BadCounterSignature)?
        .parse()
        .map_err(|_| PairError::BadCounterSignature)?;
    let body = link
        .counter_signed_body()
        .map_err(|err| PairError::WrongLink(err.to_string()))?;
    request
        .device
        .verify(SignatureDomain::SigchainAddDevice, &body, &counter_sig)
        .map_err(|_| PairError::BadCounterSignature)?;
    let mut signed_link = link.clone();
    match &mut signed_link.op {
        Op::AddDevice {
            key,
            counter_sig: slot,
            ..
        } if *key == request.device => *slot = counter_sig,
        _ => {
            return Err(PairError::WrongLink(
                "not an add_device of the requested key".into(),
            ));
        }
    }
    Ok(signed_link)
}

/// A contact as the sync carries it: handle, pinned identity, and the chain state last
/// verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncContact {
    /// `@name@domain`.
    pub handle: String,
    /// The pinned identity (chain id).
    pub key: PublicKey,
    /// The chain's seq when last verified.
    pub seq: u64,
    /// The hash of the link at `seq`.
    pub head: crate::sigchain::LinkHash,
}

/// What the existing device sends the new one, sealed to the new key and signed by the
/// existing device (an envelope of content type [`SYNC_CONTENT_TYPE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sync {
    /// The request's nonce (hex).
    pub nonce: String,
    /// The identity joined.
    pub identity: PublicKey,
    /// Its handle.
    pub handle: String,
    /// The home server's NATS URL(s), as the existing device uses them.
    pub server: String,
    /// Whether plaintext to another machine is allowed.
    pub allow_plaintext: bool,
    /// The contacts.
    pub contacts: Vec<SyncContact>,
}

/// The new device's checks of an opened sync `message` against `chain` (verified by the new
/// device, listing it active): content type, sent by an active device of the identity, for
/// this request's nonce and identity and handle.
pub fn check_sync(
    request: &PairRequest,
    chain: &Sigchain,
    message: &crate::envelope::Message,
) -> Result<Sync, PairError> {
    let bad = |why: String| Err(PairError::BadSync(why));
    if message.content_type != SYNC_CONTENT_TYPE {
        return bad(format!("content type {:?}", message.content_type));
    }
    if chain.chain_id() != request.identity {
        return bad("the chain is another identity's".into());
    }
    if !chain.active_devices().any(|d| d.key == request.device) {
        return bad("the chain does not list this device as active".into());
    }
    if !chain.active_devices().any(|d| d.key == message.from) {
        return bad(format!(
            "sent by {}, no active device of {}",
            message.from, request.identity
        ));
    }
    let sync: Sync =
        serde_json::from_slice(&message.body).map_err(|err| PairError::BadSync(err.to_string()))?;
    if Nonce::from_hex(&sync.nonce) != Some(request.nonce) {
        return Err(PairError::WrongNonce);
    }
    if sync.identity != request.identity || sync.handle != request.handle {
        return bad("it names another identity".into());
    }
    Ok(sync)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sigchain::Endpoint;

    const NOW: u64 = 1_767_225_600;

    struct Setup {
        alice: SecretKey,
        chain: Sigchain,
        links: Vec<String>,
        phone: SecretKey,
        request: PairRequest,
    }

    fn setup() -> Setup {
        let alice = SecretKey::from_seed(&[1; 32]);
        let op = Op::AddEndpoint(Endpoint {
            name: "nats".into(),
            kind: "nats".into(),
            address: "nats://127.0.0.1:4222".into(),
        });
        let first = UnsignedLink::first(alice.public_key(), NOW, op)
            .sign(&alice)
            .unwrap();
        let chain = Sigchain::start(first.bytes()).unwrap();
        let links = vec![String::from_utf8(first.bytes().to_vec()).unwrap()];
        let phone = SecretKey::from_seed(&[2; 32]);
        let request = PairRequest::new(
            alice.public_key(),
            "@alice@kez.test",
            phone.public_key(),
            "phone",
            DeviceKind::Mobile,
            NOW,
            DEFAULT_LIFETIME_SECS,
        )
        .unwrap();
        Setup {
            alice,
            chain,
            links,
            phone,
            request,
        }
    }

    #[test]
    fn a_request_line_round_trips_and_shows_a_fingerprint() {
        let s = setup();
        let line = s.request.to_line();
        assert!(line.starts_with("kez-pair:"));
        assert_eq!(PairRequest::parse(&line, NOW).unwrap(), s.request);
        assert_eq!(
            PairRequest::parse(&format!("  {}\n", line.to_ascii_lowercase()), NOW).unwrap(),
            s.request
        );
        let fingerprint = s.request.fingerprint();
        assert_eq!(fingerprint.len(), 29, "{fingerprint}");
        assert_eq!(fingerprint.split('-').count(), 6);
    }

    #[test]
    fn a_changed_expired_or_unknown_request_is_refused() {
        let s = setup();
        let line = s.request.to_line();
        // One character changed: the checksum catches it.
        let mut chars: Vec<char> = line.chars().collect();
        let at = 40;
        chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert_eq!(
            PairRequest::parse(&tampered, NOW).unwrap_err(),
            PairError::BadChecksum
        );
        // Cut short: the base32 no longer decodes, or the checksum does not match.
        let cut = PairRequest::parse(&line[..line.len() - 8], NOW).unwrap_err();
        assert!(
            matches!(cut.code(), "bad_checksum" | "bad_request_line"),
            "{cut}"
        );
        assert_eq!(
            PairRequest::parse("kez-pair:!!", NOW).unwrap_err().code(),
            "bad_request_line"
        );
        assert_eq!(
            PairRequest::parse("hello", NOW).unwrap_err().code(),
            "bad_request_line"
        );
        assert_eq!(
            PairRequest::parse(&line, s.request.expires)
                .unwrap_err()
                .code(),
            "expired"
        );
        let far = PairRequest {
            expires: NOW + 10 * 3600,
            ..s.request.clone()
        };
        assert_eq!(
            PairRequest::parse(&far.to_line(), NOW).unwrap_err().code(),
            "too_far_ahead"
        );
    }

    #[test]
    fn the_existing_device_checks_the_request_against_its_chain() {
        let s = setup();
        s.request.check_for_chain(&s.chain).unwrap();
        let other = SecretKey::from_seed(&[9; 32]).public_key();
        let wrong = PairRequest {
            identity: other,
            ..s.request.clone()
        };
        assert_eq!(
            wrong.check_for_chain(&s.chain).unwrap_err().code(),
            "wrong_identity"
        );
        let taken = PairRequest {
            name: "primary".into(),
            ..s.request.clone()
        };
        assert_eq!(
            taken.check_for_chain(&s.chain).unwrap_err().code(),
            "duplicate_device_name"
        );
    }

    fn exchange(s: &Setup) -> (UnsignedLink, Vec<u8>) {
        let link = s.request.link(&s.chain, s.alice.public_key(), NOW);
        let offer = make_offer(&s.request, &link, &s.links, &s.alice).unwrap();
        (link, offer)
    }

    #[test]
    fn the_happy_exchange_makes_a_link_the_chain_accepts_and_a_used_request_is_refused() {
        let s = setup();
        let (link, offer) = exchange(&s);
        let (counter_sig, chain) = check_offer(&s.request, &s.phone, &offer).unwrap();
        assert_eq!(chain, s.chain);
        let answer = make_answer(&s.request, &s.phone, Ok(&counter_sig));
        let ready = check_answer(&s.request, &link, &answer).unwrap();
        let signed = ready.sign(&s.alice).unwrap();
        let mut chain = s.chain.clone();
        chain.append(signed.bytes()).unwrap();
        assert!(
            chain
                .active_devices()
                .any(|d| d.key == s.phone.public_key())
        );
        // The same request again (replayed after success): the key is a device already.
        assert_eq!(
            s.request.check_for_chain(&chain).unwrap_err().code(),
            "already_used"
        );
    }

    #[test]
    fn a_substituted_key_an_altered_link_or_a_replayed_answer_is_refused() {
        let s = setup();
        let (link, offer) = exchange(&s);
        let (counter_sig, _) = check_offer(&s.request, &s.phone, &offer).unwrap();
        // The relay answers with its own key.
        let mallory = SecretKey::from_seed(&[6; 32]);
        let forged_counter = mallory.sign(
            SignatureDomain::SigchainAddDevice,
            &link.counter_signed_body().unwrap(),
        );
        let forged = make_answer(&s.request, &mallory, Ok(&forged_counter));
        assert_eq!(
            check_answer(&s.request, &link, &forged).unwrap_err().code(),
            "bad_answer_signature"
        );
        // A good answer over another link (the relay altered what the new device signed).
        let mut altered = link.clone();
        altered.time += 1;
        let body = altered.counter_signed_body().unwrap();
        let other_sig = s.phone.sign(SignatureDomain::SigchainAddDevice, &body);
        let answer = make_answer(&s.request, &s.phone, Ok(&other_sig));
        assert_eq!(
            check_answer(&s.request, &link, &answer).unwrap_err().code(),
            "bad_counter_signature"
        );
        // An answer of an earlier request (replayed) carries another nonce.
        let earlier = PairRequest {
            nonce: Nonce([7; 16]),
            ..s.request.clone()
        };
        let replayed = make_answer(&earlier, &s.phone, Ok(&counter_sig));
        assert_eq!(
            check_answer(&s.request, &link, &replayed)
                .unwrap_err()
                .code(),
            "wrong_nonce"
        );
        // A refusal is reported as such.
        let refused = make_answer(&s.request, &s.phone, Err(&PairError::Replayed));
        assert_eq!(
            check_answer(&s.request, &link, &refused)
                .unwrap_err()
                .code(),
            "refused"
        );
    }

    #[test]
    fn the_new_device_counter_signs_only_its_own_link_of_the_requested_identity() {
        let s = setup();
        let (_, offer) = exchange(&s);
        let mut value: Value = serde_json::from_slice(&offer).unwrap();
        // Any change breaks the offer's signature.
        value["nonce"] = json!(Nonce([7; 16]).to_hex());
        assert_eq!(
            check_offer(&s.request, &s.phone, &serde_json::to_vec(&value).unwrap())
                .unwrap_err()
                .code(),
            "wrong_nonce"
        );
        let check = |request: &PairRequest, offer: &[u8]| {
            check_offer(request, &s.phone, offer).unwrap_err().code()
        };
        // Links for another name, key or identity, each signed by a device of its chain.
        let other_name = PairRequest {
            name: "tablet".into(),
            ..s.request.clone()
        };
        let link = other_name.link(&s.chain, s.alice.public_key(), NOW);
        let offer = make_offer(&s.request, &link, &s.links, &s.alice).unwrap();
        assert_eq!(check(&s.request, &offer), "wrong_link");
        let other_key = PairRequest {
            device: SecretKey::from_seed(&[8; 32]).public_key(),
            ..s.request.clone()
        };
        let link = other_key.link(&s.chain, s.alice.public_key(), NOW);
        let offer = make_offer(&s.request, &link, &s.links, &s.alice).unwrap();
        assert_eq!(check(&s.request, &offer), "wrong_link");
        let mallory = SecretKey::from_seed(&[6; 32]);
        let op = Op::AddEndpoint(Endpoint {
            name: "nats".into(),
            kind: "nats".into(),
            address: "nats://127.0.0.1:4222".into(),
        });
        let first = UnsignedLink::first(mallory.public_key(), NOW, op)
            .sign(&mallory)
            .unwrap();
        let their_chain = Sigchain::start(first.bytes()).unwrap();
        let their_links = vec![String::from_utf8(first.bytes().to_vec()).unwrap()];
        let link = s.request.link(&their_chain, mallory.public_key(), NOW);
        let offer = make_offer(&s.request, &link, &their_links, &mallory).unwrap();
        assert_eq!(check(&s.request, &offer), "wrong_link");
        // A link signed by a key that is not a device of the chain.
        let link = s.request.link(&s.chain, mallory.public_key(), NOW);
        let offer = make_offer(&s.request, &link, &s.links, &mallory).unwrap();
        assert_eq!(check(&s.request, &offer), "bad_offer");
        // A link that does not follow the chain's head.
        let mut stale = s.request.link(&s.chain, s.alice.public_key(), NOW);
        stale.seq += 1;
        let offer = make_offer(&s.request, &stale, &s.links, &s.alice).unwrap();
        assert_eq!(check(&s.request, &offer), "wrong_link");
    }

    #[test]
    fn the_sync_must_come_from_an_active_device_for_this_request() {
        let s = setup();
        let (link, offer) = exchange(&s);
        let (counter_sig, _) = check_offer(&s.request, &s.phone, &offer).unwrap();
        let answer = make_answer(&s.request, &s.phone, Ok(&counter_sig));
        let signed = check_answer(&s.request, &link, &answer)
            .unwrap()
            .sign(&s.alice)
            .unwrap();
        let mut chain = s.chain.clone();
        chain.append(signed.bytes()).unwrap();
        let sync = Sync {
            nonce: s.request.nonce.to_hex(),
            identity: s.alice.public_key(),
            handle: "@alice@kez.test".into(),
            server: "nats://127.0.0.1:4222".into(),
            allow_plaintext: false,
            contacts: vec![],
        };
        let body = serde_json::to_vec(&sync).unwrap();
        let (_, sealed) = crate::envelope::seal(
            &s.alice,
            &s.phone.public_key(),
            SYNC_CONTENT_TYPE,
            &body,
            NOW,
        )
        .unwrap();
        let message = crate::envelope::open(&s.phone, &sealed).unwrap();
        assert_eq!(check_sync(&s.request, &chain, &message).unwrap(), sync);
        assert_eq!(
            check_sync(&s.request, &s.chain, &message)
                .unwrap_err()
                .code(),
            "bad_sync",
            "a chain without the new device"
        );
        let mallory = SecretKey::from_seed(&[6; 32]);
        let (_, sealed) = crate::envelope::seal(
            &mallory,
            &s.phone.public_key(),
            SYNC_CONTENT_TYPE,
            &body,
            NOW,
        )
        .unwrap();
        let message = crate::envelope::open(&s.phone, &sealed).unwrap();
        assert_eq!(
            check_sync(&s.request, &chain, &message).unwrap_err().code(),
            "bad_sync"
        );
    }
}
