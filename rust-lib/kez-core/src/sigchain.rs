//! The KEZ sigchain: a signed, hash-linked list of statements a key makes about itself.
//!
//! Each link is one canonical JSON object (see [`crate::canonical`]) signed by the key that is
//! current at that point of the chain. Walking the chain from its first link yields a
//! [`Sigchain`]: the current key, endpoints, shared-files manifest and claims — or a
//! [`ChainError`] naming the first link that fails and why. PROTOCOL.md specifies the byte format.
//!
//! Checks run in a fixed order so that every verifier names the same failure for the same bytes:
//! size, JSON syntax, version, shape, canonical form, chain id, seq, prev, signer is the current
//! key, signature, then the operation's own rules (rotation counter-signature, state changes).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::canonical;
use crate::key::{KeyError, PublicKey, SecretKey, Signature, SignatureDomain, decode_hex};

/// The only link format version this code knows.
pub const LINK_VERSION: u64 = 1;
/// Largest encoded link accepted, in bytes.
pub const MAX_LINK_BYTES: usize = 8 * 1024;
/// Largest length, in bytes, of a name, kind or service field.
pub const MAX_NAME_LEN: usize = 64;
/// Largest length, in bytes, of an address, identity, proof or provider field.
pub const MAX_VALUE_LEN: usize = 1024;
pub use crate::provider::MAX_PROVIDERS;
/// Most links a chain may have. With [`MAX_LINK_BYTES`] it bounds what a verifier reads (at
/// most 80 MiB, about a second of work); real chains stay far below it.
pub const MAX_LINKS: u64 = 10_000;
/// Most endpoints a chain's state may hold at once.
pub const MAX_ENDPOINTS: usize = 32;
/// Most claims a chain's state may hold at once.
pub const MAX_CLAIMS: usize = 64;
/// Most links with an operation the verifier does not know that a chain may have.
pub const MAX_UNKNOWN_OPS: usize = 64;

/// SHA-256 of a link's canonical bytes (signature included): the link's identity and the next
/// link's `prev`. Text form: 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkHash([u8; 32]);

impl LinkHash {
    /// Hashes encoded link bytes.
    pub fn of(link_bytes: &[u8]) -> Self {
        LinkHash(Sha256::digest(link_bytes).into())
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for LinkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for LinkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LinkHash({self})")
    }
}

impl FromStr for LinkHash {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        Ok(LinkHash(decode_hex::<32>(text)?))
    }
}

serde_as_text!(LinkHash);

/// A place where the chain's owner can be reached (a NATS inbox, an iroh node, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Unique among the chain's current endpoints; `remove_endpoint` names it.
    pub name: String,
    /// What the address is: `nats`, `iroh`, or a later kind.
    pub kind: String,
    /// The kind-specific address (PROTOCOL.md gives each kind's form).
    pub address: String,
}

/// The shared-files manifest the chain currently commits to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedFiles {
    /// BLAKE3 hash of the manifest blob, 64 lowercase hex digits.
    pub manifest: String,
    /// Where the manifest blob can be fetched (iroh endpoint addresses), at most 16.
    pub providers: Vec<String>,
}

/// A statement that the chain's owner also controls an identity elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// The service: `github`, `dns`, `nostr`, ...
    pub service: String,
    /// The identity on that service.
    pub identity: String,
    /// Where a verifier finds the proof (a URL or a record name).
    pub proof: String,
}

/// What a link does. Parsed from the link's `op` and `payload` members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `add_endpoint`: a new endpoint; its name must not be in use.
    AddEndpoint(Endpoint),
    /// `remove_endpoint`: drops the endpoint of that name, which must exist.
    RemoveEndpoint {
        /// The endpoint's name.
        name: String,
    },
    /// `set_shared_files`: replaces the committed shared-files manifest.
    SetSharedFiles(SharedFiles),
    /// `rotate`: from the next link on, `new_key` signs. The current key signs this link and the
    /// new key counter-signs it, so nobody can rotate to a key they do not hold.
    Rotate {
        /// The key that signs from the next link on.
        new_key: PublicKey,
        /// The new key's signature ([`SignatureDomain::SigchainRotate`]) over the link without
        /// `sig` and without `payload.counter_sig`.
        counter_sig: Signature,
    },
    /// `claim`: adds a claim; (service, identity) must not already be claimed.
    Claim(Claim),
    /// `revoke_claim`: withdraws the claim of that (service, identity), which must exist.
    RevokeClaim {
        /// The claim's service.
        service: String,
        /// The claim's identity.
        identity: String,
    },
    /// An operation this version does not know. It is verified for linkage and signature and
    /// recorded in [`Sigchain::unknown_ops`], but changes no state: older clients can still
    /// follow a chain that uses newer operations, and can tell their user they are behind.
    Unknown {
        /// The operation name (`[a-z][a-z0-9_]{0,31}`).
        op: String,
        /// The payload, an object, kept as it was.
        payload: Map<String, Value>,
    },
}

impl Op {
    /// The operation's name as it appears in the link's `op` member.
    pub fn name(&self) -> &str {
        match self {
            Op::AddEndpoint(_) => "add_endpoint",
            Op::RemoveEndpoint { .. } => "remove_endpoint",
            Op::SetSharedFiles(_) => "set_shared_files",
            Op::Rotate { .. } => "rotate",
            Op::Claim(_) => "claim",
            Op::RevokeClaim { .. } => "revoke_claim",
            Op::Unknown { op, .. } => op,
        }
    }

    fn payload(&self, with_counter_sig: bool) -> Value {
        match self {
            Op::AddEndpoint(endpoint) => json!(endpoint),
            Op::RemoveEndpoint { name } => json!({ "name": name }),
            Op::SetSharedFiles(files) => json!(files),
            Op::Rotate {
                new_key,
                counter_sig,
            } if with_counter_sig => {
                json!({ "new_key": new_key, "counter_sig": counter_sig.to_string() })
            }
            Op::Rotate { new_key, .. } => json!({ "new_key": new_key }),
            Op::Claim(claim) => json!(claim),
            Op::RevokeClaim { service, identity } => {
                json!({ "service": service, "identity": identity })
            }
            Op::Unknown { payload, .. } => Value::Object(payload.clone()),
        }
    }

    fn parse(op: &str, payload: Value) -> Result<Op, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Named {
            name: String,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RotatePayload {
            new_key: PublicKey,
            counter_sig: String,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ClaimRef {
            service: String,
            identity: String,
        }
        fn from<T: serde::de::DeserializeOwned>(op: &str, payload: Value) -> Result<T, String> {
            serde_json::from_value(payload).map_err(|err| format!("{op} payload: {err}"))
        }
        let parsed = match op {
            "add_endpoint" => Op::AddEndpoint(from(op, payload)?),
            "remove_endpoint" => Op::RemoveEndpoint {
                name: from::<Named>(op, payload)?.name,
            },
            "set_shared_files" => Op::SetSharedFiles(from(op, payload)?),
            "rotate" => {
                let rotate: RotatePayload = from(op, payload)?;
                Op::Rotate {
                    new_key: rotate.new_key,
                    counter_sig: rotate
                        .counter_sig
                        .parse()
                        .map_err(|err| format!("rotate counter_sig: {err}"))?,
                }
            }
            "claim" => Op::Claim(from(op, payload)?),
            "revoke_claim" => {
                let claim: ClaimRef = from(op, payload)?;
                Op::RevokeClaim {
                    service: claim.service,
                    identity: claim.identity,
                }
            }
            _ if is_op_name(op) => match payload {
                Value::Object(payload) => Op::Unknown {
                    op: op.to_owned(),
                    payload,
                },
                _ => return Err(format!("{op} payload must be a JSON object")),
            },
            _ => return Err(format!("op {op:?} is not a valid operation name")),
        };
        parsed.check_fields()?;
        Ok(parsed)
    }

    /// Field syntax rules, independent of chain state.
    fn check_fields(&self) -> Result<(), String> {
        match self {
            Op::AddEndpoint(endpoint) => {
                check_name("endpoint name", &endpoint.name)?;
                check_name("endpoint kind", &endpoint.kind)?;
                check_value("endpoint address", &endpoint.address)
            }
            Op::RemoveEndpoint { name } => check_name("endpoint name", name),
            Op::SetSharedFiles(files) => {
                if files.manifest.len() != 64
                    || !files
                        .manifest
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err("manifest must be 64 lowercase hex digits (a BLAKE3 hash)".into());
                }
                if files.providers.len() > MAX_PROVIDERS {
                    return Err(format!("at most {MAX_PROVIDERS} providers"));
                }
                files
                    .providers
                    .iter()
                    .try_for_each(|provider| check_value("provider", provider))
            }
            Op::Rotate { .. } | Op::Unknown { .. } => Ok(()),
            Op::Claim(claim) => {
                check_name("claim service", &claim.service)?;
                check_value("claim identity", &claim.identity)?;
                check_value("claim proof", &claim.proof)
            }
            Op::RevokeClaim { service, identity } => {
                check_name("claim service", service)?;
                check_value("claim identity", identity)
            }
        }
    }
}

fn is_op_name(op: &str) -> bool {
    let mut bytes = op.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && op.len() <= 32
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Names, kinds and services: 1 to 64 of `a-z 0-9 _ - .`.
fn check_name(what: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} must be 1 to {MAX_NAME_LEN} of a-z 0-9 _ - ."
        ))
    }
}

/// Free text values: 1 to 1024 bytes of UTF-8 without control characters.
fn check_value(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_VALUE_LEN || value.chars().any(char::is_control) {
        Err(format!(
            "{what} must be 1 to {MAX_VALUE_LEN} bytes without control characters"
        ))
    } else {
        Ok(())
    }
}

/// A link's content before it is signed. Build one with [`UnsignedLink::first`] or
/// [`Sigchain::next_link`], then [`sign`](UnsignedLink::sign) it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsignedLink {
    /// Format version; [`LINK_VERSION`].
    pub version: u64,
    /// The chain's id: the key that signed its first link.
    pub chain: PublicKey,
    /// Position in the chain, from 1.
    pub seq: u64,
    /// Hash of the previous link; `None` only for the first.
    pub prev: Option<LinkHash>,
    /// Seconds since the Unix epoch, as the signer's clock said.
    pub time: u64,
    /// The key that signs this link; must be the chain's current key.
    pub signer: PublicKey,
    /// What the link does.
    pub op: Op,
}

impl UnsignedLink {
    /// The first link of a new chain whose id is `key`.
    pub fn first(key: PublicKey, time: u64, op: Op) -> Self {
        UnsignedLink {
            version: LINK_VERSION,
            chain: key,
            seq: 1,
            prev: None,
            time,
            signer: key,
            op,
        }
    }

    /// Signs as `key` and returns the link's canonical bytes. The caller picks the signer, so a
    /// link by the wrong key can be built (to test verifiers); verification rejects it.
    pub fn sign(&self, key: &SecretKey) -> Result<SignedLink, LinkBuildError> {
        let sig = key.sign(SignatureDomain::SigchainLink, &self.encode(None, true)?);
        let bytes = self.encode(Some(&sig), true)?;
        if bytes.len() > MAX_LINK_BYTES {
            return Err(LinkBuildError::TooLarge(bytes.len()));
        }
        Ok(SignedLink {
            hash: LinkHash::of(&bytes),
            bytes,
            link: self.clone(),
            sig,
        })
    }

    /// Makes this link a rotation to `new`, counter-signed by `new`, and signs it with `current`.
    pub fn sign_rotation(
        mut self,
        current: &SecretKey,
        new: &SecretKey,
    ) -> Result<SignedLink, LinkBuildError> {
        self.op = Op::Rotate {
            new_key: new.public_key(),
            counter_sig: Signature::from_bytes([0; 64]),
        };
        let counter_sig = new.sign(SignatureDomain::SigchainRotate, &self.rotation_body()?);
        self.op = Op::Rotate {
            new_key: new.public_key(),
            counter_sig,
        };
        self.sign(current)
    }

    /// What the new key of a `rotate` link signs ([`SignatureDomain::SigchainRotate`]): the
    /// link without `sig` and without `payload.counter_sig`.
    fn rotation_body(&self) -> Result<Vec<u8>, canonical::CanonicalError> {
        self.encode(None, false)
    }

    fn encode(
        &self,
        sig: Option<&Signature>,
        with_counter_sig: bool,
    ) -> Result<Vec<u8>, canonical::CanonicalError> {
        let mut object = Map::new();
        object.insert("v".into(), json!(self.version));
        object.insert("chain".into(), json!(self.chain));
        object.insert("seq".into(), json!(self.seq));
        object.insert("prev".into(), json!(self.prev));
        object.insert("time".into(), json!(self.time));
        object.insert("signer".into(), json!(self.signer));
        object.insert("op".into(), json!(self.op.name()));
        object.insert("payload".into(), self.op.payload(with_counter_sig));
        if let Some(sig) = sig {
            object.insert("sig".into(), json!(sig.to_string()));
        }
        canonical::encode(&Value::Object(object))
    }
}

/// Why a link could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkBuildError {
    /// A number in the link exceeds 2^53-1.
    #[error("link has no canonical form: {0}")]
    NotCanonical(#[from] canonical::CanonicalError),
    /// The signed link would exceed [`MAX_LINK_BYTES`].
    #[error("link is {0} bytes; the limit is {MAX_LINK_BYTES}")]
    TooLarge(usize),
}

/// A signed link: its exact bytes, its hash, and what they say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedLink {
    bytes: Vec<u8>,
    hash: LinkHash,
    link: UnsignedLink,
    sig: Signature,
}

impl SignedLink {
    /// Parses one link's bytes: size, syntax, version, shape and canonical form. Chain rules
    /// (seq, prev, signer, signature) are checked by [`Sigchain`].
    pub fn parse(bytes: &[u8]) -> Result<SignedLink, ChainErrorKind> {
        if bytes.len() > MAX_LINK_BYTES {
            return Err(ChainErrorKind::TooLarge { size: bytes.len() });
        }
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|err| ChainErrorKind::Malformed(format!("not JSON: {err}")))?;
        match value.get("v").and_then(Value::as_u64) {
            Some(LINK_VERSION) => {}
            Some(version) => return Err(ChainErrorKind::UnknownVersion { version }),
            None => {
                return Err(ChainErrorKind::Malformed(
                    "missing a whole-number `v` (version) member".into(),
                ));
            }
        }

        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wire {
            v: u64,
            chain: PublicKey,
            seq: u64,
            prev: Option<LinkHash>,
            time: u64,
            signer: PublicKey,
            op: String,
            payload: Value,
            sig: String,
        }
        let wire: Wire = serde_json::from_value(value)
            .map_err(|err| ChainErrorKind::Malformed(err.to_string()))?;
        let sig: Signature = wire
            .sig
            .parse()
            .map_err(|err| ChainErrorKind::Malformed(format!("sig: {err}")))?;
        let link = UnsignedLink {
            version: wire.v,
            chain: wire.chain,
            seq: wire.seq,
            prev: wire.prev,
            time: wire.time,
            signer: wire.signer,
            op: Op::parse(&wire.op, wire.payload).map_err(ChainErrorKind::Malformed)?,
        };
        // Re-encoding must give back the very same bytes: one byte form per link.
        let canonical = link
            .encode(Some(&sig), true)
            .map_err(|err| ChainErrorKind::Malformed(err.to_string()))?;
        if canonical != bytes {
            return Err(ChainErrorKind::Malformed(
                canonical::CanonicalError::NotCanonical.to_string(),
            ));
        }
        Ok(SignedLink {
            hash: LinkHash::of(bytes),
            bytes: canonical,
            link,
            sig,
        })
    }

    /// The exact bytes, as stored and hashed.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The link's hash.
    pub fn hash(&self) -> LinkHash {
        self.hash
    }

    /// What the link says.
    pub fn link(&self) -> &UnsignedLink {
        &self.link
    }

    /// The signature by [`UnsignedLink::signer`].
    pub fn signature(&self) -> Signature {
        self.sig
    }
}

/// Why a chain does not verify. Each variant has a stable [`code`](ChainErrorKind::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainErrorKind {
    /// No links at all.
    #[error("the chain has no links")]
    Empty,
    /// The link is larger than [`MAX_LINK_BYTES`].
    #[error("link is {size} bytes; the limit is {MAX_LINK_BYTES}")]
    TooLarge {
        /// Its size in bytes.
        size: usize,
    },
    /// The link's `v` is not a version this code knows.
    #[error("link version {version} is not supported (this client knows version 1); upgrade")]
    UnknownVersion {
        /// The version found.
        version: u64,
    },
    /// Not JSON, wrong members or types, invalid fields, or not in canonical form.
    #[error("malformed link: {0}")]
    Malformed(String),
    /// The link names a different chain id than the chain's first link.
    #[error("link belongs to chain {found}, not {expected}")]
    WrongChain {
        /// This chain's id.
        expected: PublicKey,
        /// The id the link names.
        found: PublicKey,
    },
    /// The link's seq is not one more than the previous link's.
    #[error("expected seq {expected}, found {found}")]
    WrongSeq {
        /// The seq the link must have.
        expected: u64,
        /// The seq it has.
        found: u64,
    },
    /// `prev` is not the hash of the previous link (or not null on the first link).
    #[error("prev does not match the hash of the previous link")]
    WrongPrev,
    /// The link is signed by a key that is not the chain's current key.
    #[error("link is signed by {signer}, but the chain's current key is {current}")]
    NotCurrentKey {
        /// The chain's current key.
        current: PublicKey,
        /// The key the link names as signer.
        signer: PublicKey,
    },
    /// The signature does not verify.
    #[error("link signature does not verify")]
    BadSignature,
    /// A `rotate` link's counter-signature by the new key does not verify.
    #[error("rotation counter-signature by the new key does not verify")]
    BadCounterSignature,
    /// `rotate` to the key that is already current.
    #[error("rotation to the key that is already current")]
    RotateToSameKey,
    /// `add_endpoint` with a name already in use.
    #[error("an endpoint named {name:?} already exists; remove it first")]
    DuplicateEndpoint {
        /// The endpoint name.
        name: String,
    },
    /// `remove_endpoint` of a name that is not there.
    #[error("no endpoint named {name:?} to remove")]
    UnknownEndpoint {
        /// The endpoint name.
        name: String,
    },
    /// `claim` of a (service, identity) already claimed.
    #[error("{service}:{identity} is already claimed")]
    DuplicateClaim {
        /// The service.
        service: String,
        /// The identity.
        identity: String,
    },
    /// `revoke_claim` of a (service, identity) that is not claimed.
    #[error("{service}:{identity} is not claimed, so it cannot be revoked")]
    UnknownClaim {
        /// The service.
        service: String,
        /// The identity.
        identity: String,
    },
    /// The link would make the chain longer than [`MAX_LINKS`].
    #[error("a chain has at most {MAX_LINKS} links")]
    TooManyLinks,
    /// `add_endpoint` when [`MAX_ENDPOINTS`] are in use.
    #[error("a chain has at most {MAX_ENDPOINTS} endpoints at once; remove one first")]
    TooManyEndpoints,
    /// `claim` when [`MAX_CLAIMS`] are made.
    #[error("a chain has at most {MAX_CLAIMS} claims at once; revoke one first")]
    TooManyClaims,
    /// An unknown operation when [`MAX_UNKNOWN_OPS`] links already used one.
    #[error(
        "a chain has at most {MAX_UNKNOWN_OPS} links with operations this version does not know"
    )]
    TooManyUnknownOps,
}

impl ChainErrorKind {
    /// Every failure code, in the order [`code`](Self::code) documents them.
    pub const ALL_CODES: &'static [&'static str] = &[
        "empty",
        "too_large",
        "unknown_version",
        "malformed",
        "wrong_chain",
        "wrong_seq",
        "wrong_prev",
        "not_current_key",
        "bad_signature",
        "bad_counter_signature",
        "rotate_to_same_key",
        "duplicate_endpoint",
        "unknown_endpoint",
        "duplicate_claim",
        "unknown_claim",
        "too_many_links",
        "too_many_endpoints",
        "too_many_claims",
        "too_many_unknown_ops",
    ];

    /// The failure's stable snake_case name, used in vectors and wire errors.
    pub fn code(&self) -> &'static str {
        match self {
            ChainErrorKind::Empty => "empty",
            ChainErrorKind::TooLarge { .. } => "too_large",
            ChainErrorKind::UnknownVersion { .. } => "unknown_version",
            ChainErrorKind::Malformed(_) => "malformed",
            ChainErrorKind::WrongChain { .. } => "wrong_chain",
            ChainErrorKind::WrongSeq { .. } => "wrong_seq",
            ChainErrorKind::WrongPrev => "wrong_prev",
            ChainErrorKind::NotCurrentKey { .. } => "not_current_key",
            ChainErrorKind::BadSignature => "bad_signature",
            ChainErrorKind::BadCounterSignature => "bad_counter_signature",
            ChainErrorKind::RotateToSameKey => "rotate_to_same_key",
            ChainErrorKind::DuplicateEndpoint { .. } => "duplicate_endpoint",
            ChainErrorKind::UnknownEndpoint { .. } => "unknown_endpoint",
            ChainErrorKind::DuplicateClaim { .. } => "duplicate_claim",
            ChainErrorKind::UnknownClaim { .. } => "unknown_claim",
            ChainErrorKind::TooManyLinks => "too_many_links",
            ChainErrorKind::TooManyEndpoints => "too_many_endpoints",
            ChainErrorKind::TooManyClaims => "too_many_claims",
            ChainErrorKind::TooManyUnknownOps => "too_many_unknown_ops",
        }
    }
}

/// A chain failed to verify at link number `position` (1-based, in the order given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sigchain link {position}: {kind}")]
pub struct ChainError {
    /// Which link failed, counting from 1 (0 for an empty chain).
    pub position: usize,
    /// Why.
    pub kind: ChainErrorKind,
}

/// A verified chain's derived state. Only [`Sigchain::verify`] and [`Sigchain::append`] make
/// or change one, so holding a `Sigchain` means its links verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sigchain {
    chain: PublicKey,
    current_key: PublicKey,
    seq: u64,
    head: LinkHash,
    time: u64,
    endpoints: BTreeMap<String, Endpoint>,
    shared_files: Option<SharedFiles>,
    claims: Vec<Claim>,
    unknown_ops: Vec<UnknownOpRecord>,
}

/// Where a chain used an operation this version ignores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnknownOpRecord {
    /// The link's seq.
    pub seq: u64,
    /// The operation's name.
    pub op: String,
}

/// [`Sigchain`]'s members as its state JSON (PROTOCOL.md §4.4) has them: the form
/// [`Sigchain::to_state_json`] writes and [`Sigchain::from_trusted_state_json`] reads. Private,
/// so that no other path makes a `Sigchain` from JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateJson {
    chain: PublicKey,
    current_key: PublicKey,
    seq: u64,
    head: LinkHash,
    time: u64,
    endpoints: BTreeMap<String, Endpoint>,
    shared_files: Option<SharedFiles>,
    claims: Vec<Claim>,
    unknown_ops: Vec<UnknownOpRecord>,
}

impl Sigchain {
    /// The chain's derived state as JSON (PROTOCOL.md §4.4, the vectors' `ok` form), to keep
    /// beside the links so that the next link can be verified without reading them again.
    pub fn to_state_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a chain state serialises")
    }

    /// A chain state that [`Sigchain::to_state_json`] wrote for a chain the caller verified
    /// itself, read back **without verifying anything**: only for state kept where nobody else
    /// writes (the home server's own bucket). Never for state from anyone else: verify their
    /// links instead.
    pub fn from_trusted_state_json(bytes: &[u8]) -> Result<Sigchain, serde_json::Error> {
        let state: StateJson = serde_json::from_slice(bytes)?;
        Ok(Sigchain {
            chain: state.chain,
            current_key: state.current_key,
            seq: state.seq,
            head: state.head,
            time: state.time,
            endpoints: state.endpoints,
            shared_files: state.shared_files,
            claims: state.claims,
            unknown_ops: state.unknown_ops,
        })
    }

    /// Verifies a whole chain, first link first.
    pub fn verify<B: AsRef<[u8]>>(links: &[B]) -> Result<Sigchain, ChainError> {
        let (first, rest) = links.split_first().ok_or(ChainError {
            position: 0,
            kind: ChainErrorKind::Empty,
        })?;
        let mut chain =
            Sigchain::start(first.as_ref()).map_err(|kind| ChainError { position: 1, kind })?;
        for (index, link) in rest.iter().enumerate() {
            chain.append(link.as_ref()).map_err(|kind| ChainError {
                position: index + 2,
                kind,
            })?;
        }
        Ok(chain)
    }

    /// Verifies a first link and returns the one-link chain.
    pub fn start(bytes: &[u8]) -> Result<Sigchain, ChainErrorKind> {
        let signed = SignedLink::parse(bytes)?;
        let link = signed.link();
        let mut chain = Sigchain {
            chain: link.chain,
            current_key: link.chain,
            seq: 0,
            head: LinkHash([0; 32]),
            time: link.time,
            endpoints: BTreeMap::new(),
            shared_files: None,
            claims: Vec::new(),
            unknown_ops: Vec::new(),
        };
        chain.apply(&signed)?;
        Ok(chain)
    }

    /// Verifies `bytes` as the next link and applies it. On error the chain is unchanged.
    pub fn append(&mut self, bytes: &[u8]) -> Result<SignedLink, ChainErrorKind> {
        let signed = SignedLink::parse(bytes)?;
        self.apply(&signed)?;
        Ok(signed)
    }

    /// Checks `signed` as the next link (every rule, cheapest first) and, only if all pass,
    /// applies it in place: a chain of n links costs O(n) to verify, and a failing link
    /// changes nothing.
    fn apply(&mut self, signed: &SignedLink) -> Result<(), ChainErrorKind> {
        let link = signed.link();
        if link.chain != self.chain {
            return Err(ChainErrorKind::WrongChain {
                expected: self.chain,
                found: link.chain,
            });
        }
        if link.seq != self.seq + 1 {
            return Err(ChainErrorKind::WrongSeq {
                expected: self.seq + 1,
                found: link.seq,
            });
        }
        let expected_prev = (self.seq > 0).then_some(self.head);
        if link.prev != expected_prev {
            return Err(ChainErrorKind::WrongPrev);
        }
        if link.signer != self.current_key {
            return Err(ChainErrorKind::NotCurrentKey {
                current: self.current_key,
                signer: link.signer,
            });
        }
        let body = link
            .encode(None, true)
            .map_err(|err| ChainErrorKind::Malformed(err.to_string()))?;
        link.signer
            .verify(SignatureDomain::SigchainLink, &body, &signed.signature())
            .map_err(|_| ChainErrorKind::BadSignature)?;
        if link.seq > MAX_LINKS {
            return Err(ChainErrorKind::TooManyLinks);
        }
        self.check_op(link)?;

        // Everything is checked: from here on nothing fails.
        self.seq = link.seq;
        self.head = signed.hash();
        self.time = link.time;
        match &link.op {
            Op::AddEndpoint(endpoint) => {
                self.endpoints
                    .insert(endpoint.name.clone(), endpoint.clone());
            }
            Op::RemoveEndpoint { name } => {
                self.endpoints.remove(name);
            }
            Op::SetSharedFiles(files) => self.shared_files = Some(files.clone()),
            Op::Rotate { new_key, .. } => self.current_key = *new_key,
            Op::Claim(claim) => self.claims.push(claim.clone()),
            Op::RevokeClaim { service, identity } => {
                if let Some(index) = self.claim_index(service, identity) {
                    self.claims.remove(index);
                }
            }
            Op::Unknown { op, .. } => self.unknown_ops.push(UnknownOpRecord {
                seq: link.seq,
                op: op.clone(),
            }),
        }
        Ok(())
    }

    /// The operation's own rules (PROTOCOL.md §4.3, step 12), against the state before `link`.
    fn check_op(&self, link: &UnsignedLink) -> Result<(), ChainErrorKind> {
        match &link.op {
            Op::AddEndpoint(endpoint) => {
                if self.endpoints.contains_key(&endpoint.name) {
                    return Err(ChainErrorKind::DuplicateEndpoint {
                        name: endpoint.name.clone(),
                    });
                }
                if self.endpoints.len() >= MAX_ENDPOINTS {
                    return Err(ChainErrorKind::TooManyEndpoints);
                }
            }
            Op::RemoveEndpoint { name } => {
                if !self.endpoints.contains_key(name) {
                    return Err(ChainErrorKind::UnknownEndpoint { name: name.clone() });
                }
            }
            Op::SetSharedFiles(_) => {}
            Op::Rotate {
                new_key,
                counter_sig,
            } => {
                if *new_key == self.current_key {
                    return Err(ChainErrorKind::RotateToSameKey);
                }
                let body = link
                    .rotation_body()
                    .map_err(|err| ChainErrorKind::Malformed(err.to_string()))?;
                new_key
                    .verify(SignatureDomain::SigchainRotate, &body, counter_sig)
                    .map_err(|_| ChainErrorKind::BadCounterSignature)?;
            }
            Op::Claim(claim) => {
                if self.claim_index(&claim.service, &claim.identity).is_some() {
                    return Err(ChainErrorKind::DuplicateClaim {
                        service: claim.service.clone(),
                        identity: claim.identity.clone(),
                    });
                }
                if self.claims.len() >= MAX_CLAIMS {
                    return Err(ChainErrorKind::TooManyClaims);
                }
            }
            Op::RevokeClaim { service, identity } => {
                if self.claim_index(service, identity).is_none() {
                    return Err(ChainErrorKind::UnknownClaim {
                        service: service.clone(),
                        identity: identity.clone(),
                    });
                }
            }
            Op::Unknown { .. } => {
                if self.unknown_ops.len() >= MAX_UNKNOWN_OPS {
                    return Err(ChainErrorKind::TooManyUnknownOps);
                }
            }
        }
        Ok(())
    }

    fn claim_index(&self, service: &str, identity: &str) -> Option<usize> {
        self.claims
            .iter()
            .position(|claim| claim.service == service && claim.identity == identity)
    }

    /// An unsigned next link, signed by the current key, for the caller to [`UnsignedLink::sign`].
    pub fn next_link(&self, time: u64, op: Op) -> UnsignedLink {
        UnsignedLink {
            version: LINK_VERSION,
            chain: self.chain,
            seq: self.seq + 1,
            prev: Some(self.head),
            time,
            signer: self.current_key,
            op,
        }
    }

    /// The chain's id: the key that signed the first link.
    pub fn chain_id(&self) -> PublicKey {
        self.chain
    }

    /// The key that must sign the next link.
    pub fn current_key(&self) -> PublicKey {
        self.current_key
    }

    /// The last link's seq (the number of links).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The last link's hash.
    pub fn head(&self) -> LinkHash {
        self.head
    }

    /// The last link's time.
    pub fn time(&self) -> u64 {
        self.time
    }

    /// The ops that make `wanted` one of the chain's endpoints (advertising a node's current
    /// address): none when an endpoint of that name says exactly that already, else the
    /// removal of the stale one (if any) and the addition of `wanted`, in that order.
    pub fn ops_to_advertise(&self, wanted: &Endpoint) -> Vec<Op> {
        match self.endpoints().get(&wanted.name) {
            Some(current) if current == wanted => Vec::new(),
            Some(_) => vec![
                Op::RemoveEndpoint {
                    name: wanted.name.clone(),
                },
                Op::AddEndpoint(wanted.clone()),
            ],
            None => vec![Op::AddEndpoint(wanted.clone())],
        }
    }

    /// Current endpoints by name.
    pub fn endpoints(&self) -> &BTreeMap<String, Endpoint> {
        &self.endpoints
    }

    /// The shared-files manifest last set, if any.
    pub fn shared_files(&self) -> Option<&SharedFiles> {
        self.shared_files.as_ref()
    }

    /// Current claims, in the order they were made.
    pub fn claims(&self) -> &[Claim] {
        &self.claims
    }

    /// Links whose operation this version ignored.
    pub fn unknown_ops(&self) -> &[UnknownOpRecord] {
        &self.unknown_ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    fn endpoint(name: &str) -> Op {
        Op::AddEndpoint(Endpoint {
            name: name.into(),
            kind: "nats".into(),
            address: "nats://127.0.0.1:4222".into(),
        })
    }

    fn start(alice: &SecretKey) -> (Sigchain, Vec<Vec<u8>>) {
        let first = UnsignedLink::first(alice.public_key(), 100, endpoint("nats"))
            .sign(alice)
            .unwrap();
        let chain = Sigchain::start(first.bytes()).unwrap();
        (chain, vec![first.bytes().to_vec()])
    }

    #[test]
    fn a_fresh_chain_verifies_and_tracks_state() {
        let alice = key(1);
        let (mut chain, mut links) = start(&alice);
        let next = chain.next_link(101, endpoint("iroh")).sign(&alice).unwrap();
        chain.append(next.bytes()).unwrap();
        links.push(next.bytes().to_vec());
        assert_eq!(chain.seq(), 2);
        assert_eq!(chain.head(), next.hash());
        assert_eq!(chain.endpoints().len(), 2);
        assert_eq!(Sigchain::verify(&links).unwrap(), chain);
    }

    #[test]
    fn a_chain_holds_at_most_max_links() {
        let alice = key(1);
        let (mut chain, _) = start(&alice);
        let op = |seq: u64| {
            Op::SetSharedFiles(SharedFiles {
                manifest: format!("{seq:064x}"),
                providers: Vec::new(),
            })
        };
        while chain.seq() < MAX_LINKS {
            let next = chain.next_link(100, op(chain.seq())).sign(&alice).unwrap();
            chain.append(next.bytes()).unwrap();
        }
        let before = chain.clone();
        let one_more = chain.next_link(100, op(MAX_LINKS)).sign(&alice).unwrap();
        assert_eq!(
            chain.append(one_more.bytes()).unwrap_err(),
            ChainErrorKind::TooManyLinks
        );
        assert_eq!(chain, before);
    }

    #[test]
    fn a_kept_state_continues_the_chain_as_verifying_all_links_would() {
        let (alice, alice2) = (key(1), key(2));
        let (mut chain, mut links) = start(&alice);
        let claim = Op::Claim(Claim {
            service: "dns".into(),
            identity: "alice.example".into(),
            proof: "txt".into(),
        });
        for op in [
            claim,
            Op::Unknown {
                op: "later".into(),
                payload: Map::new(),
            },
        ] {
            let next = chain.next_link(101, op).sign(&alice).unwrap();
            chain.append(next.bytes()).unwrap();
            links.push(next.bytes().to_vec());
        }
        let rotate = chain
            .next_link(102, endpoint("x"))
            .sign_rotation(&alice, &alice2)
            .unwrap();
        chain.append(rotate.bytes()).unwrap();
        links.push(rotate.bytes().to_vec());

        let mut kept = Sigchain::from_trusted_state_json(&chain.to_state_json()).unwrap();
        assert_eq!(kept, chain);
        let next = chain
            .next_link(103, endpoint("iroh"))
            .sign(&alice2)
            .unwrap();
        kept.append(next.bytes()).unwrap();
        links.push(next.bytes().to_vec());
        assert_eq!(kept, Sigchain::verify(&links).unwrap());
        assert!(Sigchain::from_trusted_state_json(b"{\"chain\":1}").is_err());
    }

    #[test]
    fn a_failed_append_leaves_the_chain_unchanged() {
        let alice = key(1);
        let (mut chain, _) = start(&alice);
        let before = chain.clone();
        let dup = chain.next_link(101, endpoint("nats")).sign(&alice).unwrap();
        assert!(matches!(
            chain.append(dup.bytes()),
            Err(ChainErrorKind::DuplicateEndpoint { .. })
        ));
        assert_eq!(chain, before);
    }

    #[test]
    fn rotation_hands_signing_to_the_new_key() {
        let (alice, alice2) = (key(1), key(2));
        let (mut chain, _) = start(&alice);
        let rotate = chain
            .next_link(101, endpoint("unused"))
            .sign_rotation(&alice, &alice2)
            .unwrap();
        chain.append(rotate.bytes()).unwrap();
        assert_eq!(chain.current_key(), alice2.public_key());
        assert_eq!(chain.chain_id(), alice.public_key());
        let by_old = chain.next_link(102, endpoint("x")).sign(&alice).unwrap();
        assert_eq!(
            chain.append(by_old.bytes()),
            Err(ChainErrorKind::BadSignature),
            "the link names the new key as signer but the old key signed it"
        );
        let by_new = chain.next_link(102, endpoint("x")).sign(&alice2).unwrap();
        chain.append(by_new.bytes()).unwrap();
    }

    #[test]
    fn a_node_is_advertised_by_the_fewest_links_that_make_it_current() {
        let alice = key(1);
        let (mut chain, _) = start(&alice);
        let node = |address: &str| Endpoint {
            name: "iroh".into(),
            kind: "iroh".into(),
            address: address.into(),
        };
        let ops = chain.ops_to_advertise(&node("iroh:a"));
        assert_eq!(ops, [Op::AddEndpoint(node("iroh:a"))]);
        for (time, op) in (101..).zip(ops) {
            let link = chain.next_link(time, op).sign(&alice).unwrap();
            chain.append(link.bytes()).unwrap();
        }
        assert!(chain.ops_to_advertise(&node("iroh:a")).is_empty());
        let ops = chain.ops_to_advertise(&node("iroh:b"));
        assert_eq!(
            ops,
            [
                Op::RemoveEndpoint {
                    name: "iroh".into()
                },
                Op::AddEndpoint(node("iroh:b"))
            ]
        );
        for (time, op) in (110..).zip(ops) {
            let link = chain.next_link(time, op).sign(&alice).unwrap();
            chain.append(link.bytes()).unwrap();
        }
        assert_eq!(chain.endpoints()["iroh"], node("iroh:b"));
    }

    #[test]
    fn empty_chain_is_named() {
        let none: [&[u8]; 0] = [];
        assert_eq!(
            Sigchain::verify(&none).unwrap_err().kind,
            ChainErrorKind::Empty
        );
    }

    #[test]
    fn every_code_is_listed_once() {
        let mut codes = ChainErrorKind::ALL_CODES.to_vec();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ChainErrorKind::ALL_CODES.len());
    }

    #[test]
    fn field_rules_are_enforced_at_parse() {
        let alice = key(1);
        for op in [
            Op::AddEndpoint(Endpoint {
                name: "Bad Name".into(),
                kind: "nats".into(),
                address: "x".into(),
            }),
            Op::AddEndpoint(Endpoint {
                name: "ok".into(),
                kind: "nats".into(),
                address: "line\nbreak".into(),
            }),
            Op::SetSharedFiles(SharedFiles {
                manifest: "ABC".into(),
                providers: vec![],
            }),
        ] {
            let link = UnsignedLink::first(alice.public_key(), 1, op)
                .sign(&alice)
                .unwrap();
            assert!(matches!(
                Sigchain::start(link.bytes()),
                Err(ChainErrorKind::Malformed(_))
            ));
        }
    }

    /// PROTOCOL.md §4.3: `set_shared_files` may name no provider, or one twice; at most 16,
    /// each a text (1 to 1024 bytes, no control character), kept as they are in the state.
    #[test]
    fn shared_files_providers_may_be_empty_or_repeated_up_to_16() {
        let alice = key(1);
        let files = |providers: Vec<String>| {
            Op::SetSharedFiles(SharedFiles {
                manifest: "ab".repeat(32),
                providers,
            })
        };
        let verify = |op: Op| {
            let link = UnsignedLink::first(alice.public_key(), 1, op)
                .sign(&alice)
                .unwrap();
            Sigchain::start(link.bytes())
        };
        for providers in [
            vec![],
            vec!["iroh:x".to_owned(), "iroh:x".to_owned()],
            vec!["not a provider string".to_owned(); MAX_PROVIDERS],
        ] {
            let chain = verify(files(providers.clone())).unwrap();
            assert_eq!(chain.shared_files().unwrap().providers, providers);
        }
        for providers in [
            vec!["p".to_owned(); MAX_PROVIDERS + 1],
            vec![String::new()],
            vec!["x".repeat(MAX_VALUE_LEN + 1)],
            vec!["tab\there".to_owned()],
        ] {
            assert!(matches!(
                verify(files(providers)),
                Err(ChainErrorKind::Malformed(_))
            ));
        }
    }
}
