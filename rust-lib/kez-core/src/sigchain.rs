//! The KEZ sigchain: a signed, hash-linked list of statements a key makes about itself.
//!
//! Each link is one canonical JSON object (see [`crate::canonical`]) signed by a key the chain
//! allows at that point: in a version 1 link the chain's current key, in a version 2 link any
//! active device (the chain id's key is the first device; `add_device` and `revoke_device`
//! change the set). Walking the chain from its first link yields a [`Sigchain`]: the devices,
//! the current key, endpoints, shared-files manifest and claims — or a [`ChainError`] naming
//! the first link that fails and why. PROTOCOL.md §4 specifies the byte format.
//!
//! Checks run in a fixed order so that every verifier names the same failure for the same bytes:
//! size, JSON syntax, version (and no return to version 1 after version 2), shape, canonical
//! form, chain id, seq, prev, signer, signature, then the operation's own rules
//! (counter-signatures, state changes).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::canonical;
use crate::key::{KeyError, PublicKey, SecretKey, Signature, SignatureDomain, decode_hex};
use crate::prekey::OlmKey;

/// Link format version 1: the chain's current key signs every link; there are no devices to
/// add or revoke (PROTOCOL.md §4.1).
pub const LINK_VERSION_1: u64 = 1;
/// Link format version 2: any active device of the chain signs, and `add_device` and
/// `revoke_device` exist. Once a chain has a version 2 link, every later link is version 2.
pub const LINK_VERSION_2: u64 = 2;
/// Largest encoded link accepted, in bytes.
pub const MAX_LINK_BYTES: usize = 8 * 1024;
/// Largest length, in bytes, of a name, kind or service field.
pub const MAX_NAME_LEN: usize = 64;
/// Largest length, in bytes, of an address, identity, proof, provider or reason field.
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
/// Most devices a chain may have active at once (`add_device` past it is `too_many_devices`).
pub const MAX_ACTIVE_DEVICES: usize = 32;
/// Most device entries, revoked ones included, that `add_device` and a version 2 `rotate` may
/// bring a chain to: the state, and what a contact encrypts to, stay small.
pub const MAX_DEVICE_ENTRIES: usize = 256;
/// The name of every chain's first device, the chain id's own key.
pub const PRIMARY_DEVICE_NAME: &str = "primary";

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

/// What kind of device holds a device key (PROTOCOL.md §4.3). Text form: the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// A desktop or laptop running a graphical client.
    Desktop,
    /// A phone or tablet.
    Mobile,
    /// A command-line client; also the kind of every chain's first device.
    Cli,
    /// A paper key: a seed written down for recovery, kept off any machine.
    Paper,
}

impl DeviceKind {
    /// Every kind, in the order PROTOCOL.md lists them.
    pub const ALL: [DeviceKind; 4] = [
        DeviceKind::Desktop,
        DeviceKind::Mobile,
        DeviceKind::Cli,
        DeviceKind::Paper,
    ];

    /// The kind's text form, as links and states write it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Desktop => "desktop",
            DeviceKind::Mobile => "mobile",
            DeviceKind::Cli => "cli",
            DeviceKind::Paper => "paper",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device kind that is none of `desktop`, `mobile`, `cli`, `paper`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device kind {0:?} is not one of desktop, mobile, cli, paper")]
pub struct UnknownDeviceKind(pub String);

impl FromStr for DeviceKind {
    type Err = UnknownDeviceKind;

    fn from_str(text: &str) -> Result<Self, UnknownDeviceKind> {
        DeviceKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| UnknownDeviceKind(text.to_owned()))
    }
}

serde_as_text!(DeviceKind);

/// One device of a chain: a key that may sign the chain's version 2 links while it is active.
/// The state lists every device ever added, in the order added (PROTOCOL.md §4.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The device's key.
    pub key: PublicKey,
    /// Its name (the *name* rule); no two active devices share one.
    pub name: String,
    /// What kind of device it is.
    pub kind: DeviceKind,
    /// The seq of the link that added it (1 for the chain id's key).
    pub added: u64,
    /// The seq of the link that revoked it (`revoke_device`, or a `rotate` away from it);
    /// `None` while it is active.
    pub revoked: Option<u64>,
}

impl Device {
    /// Whether the device may still sign.
    pub fn is_active(&self) -> bool {
        self.revoked.is_none()
    }
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
    /// `rotate`: the signer's device is replaced by `new_key`, with the same name and kind. The
    /// signer signs this link and the new key counter-signs it, so nobody can rotate to a key
    /// they do not hold. In a chain without devices (version 1) that is the current key
    /// handing over to the next one.
    Rotate {
        /// The key that takes the signer's place from the next link on.
        new_key: PublicKey,
        /// The new key's signature ([`SignatureDomain::SigchainRotate`]) over the link without
        /// `sig` and without `payload.counter_sig`.
        counter_sig: Signature,
    },
    /// `add_device` (version 2 links only): `key` becomes an active device, which may sign from
    /// the next link on. An active device signs this link and the new key counter-signs it,
    /// so nobody can add a key they do not hold.
    AddDevice {
        /// The new device's key; never before a device of this chain.
        key: PublicKey,
        /// Its name (the *name* rule), unique among the active devices.
        name: String,
        /// What kind of device it is.
        kind: DeviceKind,
        /// The new key's signature ([`SignatureDomain::SigchainAddDevice`]) over the link
        /// without `sig` and without `payload.counter_sig`.
        counter_sig: Signature,
    },
    /// `revoke_device` (version 2 links only): the device `key` signs no later link. At least
    /// one device stays active; a device may revoke itself.
    RevokeDevice {
        /// The active device to revoke.
        key: PublicKey,
        /// Why, for people (the *text* rule); may be left out.
        reason: Option<String>,
    },
    /// `set_olm_key`: binds the Olm identity key `key` to the link's signer, the device that
    /// holds that Olm account (PROTOCOL.md §15.1), replacing what it bound before. The
    /// binding ends when the device is revoked or rotated away.
    SetOlmKey {
        /// The device's Olm (Curve25519) identity key.
        key: OlmKey,
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
            Op::AddDevice { .. } => "add_device",
            Op::RevokeDevice { .. } => "revoke_device",
            Op::SetOlmKey { .. } => "set_olm_key",
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
            Op::AddDevice {
                key,
                name,
                kind,
                counter_sig,
            } => {
                let mut payload = json!({ "key": key, "name": name, "kind": kind });
                if with_counter_sig {
                    payload["counter_sig"] = json!(counter_sig.to_string());
                }
                payload
            }
            Op::RevokeDevice { key, reason } => {
                let mut payload = json!({ "key": key });
                if let Some(reason) = reason {
                    payload["reason"] = json!(reason);
                }
                payload
            }
            Op::SetOlmKey { key } => json!({ "key": key }),
            Op::Claim(claim) => json!(claim),
            Op::RevokeClaim { service, identity } => {
                json!({ "service": service, "identity": identity })
            }
            Op::Unknown { payload, .. } => Value::Object(payload.clone()),
        }
    }

    /// Whether a version 1 link can carry this operation: every operation but the device ones,
    /// which a verifier of version 1 would ignore as unknown and so must never meet there.
    pub fn exists_in_version_1(&self) -> bool {
        !matches!(self, Op::AddDevice { .. } | Op::RevokeDevice { .. })
    }

    /// Reads the operation `op` of a link of format `version` from its payload, with the field
    /// rules of PROTOCOL.md §4.3.
    fn parse(version: u64, op: &str, payload: Value) -> Result<Op, String> {
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
        struct AddDevicePayload {
            key: PublicKey,
            name: String,
            kind: DeviceKind,
            counter_sig: String,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RevokeDevicePayload {
            key: PublicKey,
            reason: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SetOlmKeyPayload {
            key: OlmKey,
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
        if matches!(op, "add_device" | "revoke_device") && version < LINK_VERSION_2 {
            return Err(format!(
                "{op} exists only in version 2 links (a version 1 verifier would ignore it)"
            ));
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
            "add_device" => {
                let device: AddDevicePayload = from(op, payload)?;
                Op::AddDevice {
                    key: device.key,
                    name: device.name,
                    kind: device.kind,
                    counter_sig: device
                        .counter_sig
                        .parse()
                        .map_err(|err| format!("add_device counter_sig: {err}"))?,
                }
            }
            "revoke_device" => {
                // Absent and text are the two forms; a null would re-encode as absent.
                if payload.get("reason").is_some_and(Value::is_null) {
                    return Err("revoke_device reason must be a text or left out, not null".into());
                }
                let revocation: RevokeDevicePayload = from(op, payload)?;
                Op::RevokeDevice {
                    key: revocation.key,
                    reason: revocation.reason,
                }
            }
            "set_olm_key" => Op::SetOlmKey {
                key: from::<SetOlmKeyPayload>(op, payload)?.key,
            },
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
            Op::Rotate { .. } | Op::SetOlmKey { .. } | Op::Unknown { .. } => Ok(()),
            Op::AddDevice { name, .. } => check_name("device name", name),
            Op::RevokeDevice { reason, .. } => reason
                .as_deref()
                .map_or(Ok(()), |reason| check_value("revocation reason", reason)),
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

/// A link's content before it is signed. Build one with [`UnsignedLink::first`],
/// [`Sigchain::next_link`] or [`Sigchain::next_link_by`], then [`sign`](UnsignedLink::sign)
/// it; [`Sigchain::add_device_link`] and [`Sigchain::revoke_device_link`] build and sign the
/// device operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsignedLink {
    /// Format version: [`LINK_VERSION_1`] or [`LINK_VERSION_2`]. The builders write version 1
    /// whenever the link can be said in it, so that verifiers of the release before devices
    /// keep following the chain until its owner uses devices.
    pub version: u64,
    /// The chain's id: the key that signed its first link.
    pub chain: PublicKey,
    /// Position in the chain, from 1.
    pub seq: u64,
    /// Hash of the previous link; `None` only for the first.
    pub prev: Option<LinkHash>,
    /// Seconds since the Unix epoch, as the signer's clock said.
    pub time: u64,
    /// The key that signs this link: in version 1 the chain's current key, in version 2 any
    /// active device.
    pub signer: PublicKey,
    /// What the link does.
    pub op: Op,
}

impl UnsignedLink {
    /// The first link of a new chain whose id is `key`: version 1 unless `op` exists only in
    /// version 2.
    pub fn first(key: PublicKey, time: u64, op: Op) -> Self {
        UnsignedLink {
            version: if op.exists_in_version_1() {
                LINK_VERSION_1
            } else {
                LINK_VERSION_2
            },
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

    /// Makes this link a rotation to `new`, counter-signed by `new`, and signs it with `signer`,
    /// the key the link names as signer (the current key in version 1, an active device in
    /// version 2): `new` takes the signer's place.
    pub fn sign_rotation(
        mut self,
        signer: &SecretKey,
        new: &SecretKey,
    ) -> Result<SignedLink, LinkBuildError> {
        self.op = Op::Rotate {
            new_key: new.public_key(),
            counter_sig: Signature::from_bytes([0; 64]),
        };
        let counter_sig = new.sign(
            SignatureDomain::SigchainRotate,
            &self.counter_signed_body()?,
        );
        self.op = Op::Rotate {
            new_key: new.public_key(),
            counter_sig,
        };
        self.sign(signer)
    }

    /// Reads back what [`UnsignedLink::counter_signed_body`] wrote (a pairing offer carries
    /// it): the link is parsed as strictly as a signed one, and must give back exactly `bytes`.
    pub fn from_counter_signed_body(bytes: &[u8]) -> Result<UnsignedLink, ChainErrorKind> {
        if bytes.len() > MAX_LINK_BYTES {
            return Err(ChainErrorKind::TooLarge { size: bytes.len() });
        }
        let mut value: Value = serde_json::from_slice(bytes)
            .map_err(|err| ChainErrorKind::Malformed(format!("not JSON: {err}")))?;
        let zero = "0".repeat(128);
        let Some(object) = value.as_object_mut() else {
            return Err(ChainErrorKind::Malformed("not an object".into()));
        };
        match object.get_mut("payload").and_then(Value::as_object_mut) {
            Some(payload) if !payload.contains_key("counter_sig") => {
                payload.insert("counter_sig".into(), json!(zero));
            }
            _ => {
                return Err(ChainErrorKind::Malformed(
                    "no payload, or one with a counter_sig".into(),
                ));
            }
        }
        if object.contains_key("sig") {
            return Err(ChainErrorKind::Malformed("it has a sig".into()));
        }
        object.insert("sig".into(), json!(zero));
        let full =
            canonical::encode(&value).map_err(|err| ChainErrorKind::Malformed(err.to_string()))?;
        let link = SignedLink::parse(&full)?.link;
        let again = link
            .counter_signed_body()
            .map_err(|err| ChainErrorKind::Malformed(err.to_string()))?;
        if again != bytes {
            return Err(ChainErrorKind::Malformed(
                canonical::CanonicalError::NotCanonical.to_string(),
            ));
        }
        Ok(link)
    }

    /// What the new key of a `rotate` or `add_device` link counter-signs: the link without
    /// `sig` and without `payload.counter_sig`.
    pub fn counter_signed_body(&self) -> Result<Vec<u8>, canonical::CanonicalError> {
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
    /// (version downgrade, seq, prev, signer, signature) are checked by [`Sigchain`].
    pub fn parse(bytes: &[u8]) -> Result<SignedLink, ChainErrorKind> {
        let (_, value) = read_version(bytes)?;
        SignedLink::from_json(bytes, value)
    }

    /// Steps 4 and 5 of PROTOCOL.md §4.4 for the link `bytes`, parsed as `value` by
    /// [`read_version`]: members, types, fields, and the canonical form.
    fn from_json(bytes: &[u8], value: Value) -> Result<SignedLink, ChainErrorKind> {
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
            op: Op::parse(wire.v, &wire.op, wire.payload).map_err(ChainErrorKind::Malformed)?,
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

/// Steps 1 to 3 of PROTOCOL.md §4.4, the ones that need no chain: size, JSON syntax, and a `v`
/// this code knows. Returns that version and the parsed link for the remaining steps; the
/// version is read before anything else because it decides how the rest is read.
fn read_version(bytes: &[u8]) -> Result<(u64, Value), ChainErrorKind> {
    if bytes.len() > MAX_LINK_BYTES {
        return Err(ChainErrorKind::TooLarge { size: bytes.len() });
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|err| ChainErrorKind::Malformed(format!("not JSON: {err}")))?;
    match value.get("v").and_then(Value::as_u64) {
        Some(version @ (LINK_VERSION_1 | LINK_VERSION_2)) => Ok((version, value)),
        Some(version) => Err(ChainErrorKind::UnknownVersion { version }),
        None => Err(ChainErrorKind::Malformed(
            "missing a whole-number `v` (version) member".into(),
        )),
    }
}

/// Checks the counter-signature of a `rotate` or `add_device` link: `new_key` signed the link
/// without `sig` and without `payload.counter_sig` in `domain` — else `bad_counter_signature`.
fn check_counter_signature(
    link: &UnsignedLink,
    domain: SignatureDomain,
    new_key: &PublicKey,
    counter_sig: &Signature,
) -> Result<(), ChainErrorKind> {
    let body = link
        .counter_signed_body()
        .map_err(|err| ChainErrorKind::Malformed(err.to_string()))?;
    new_key
        .verify(domain, &body, counter_sig)
        .map_err(|_| ChainErrorKind::BadCounterSignature)
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
    #[error(
        "link version {version} is not supported (this client knows versions 1 and 2); upgrade"
    )]
    UnknownVersion {
        /// The version found.
        version: u64,
    },
    /// A version 1 link after a version 2 link: once a chain uses version 2, verifiers of
    /// version 1 no longer follow it, and a version 1 link would evade the device rules.
    #[error(
        "a version 1 link cannot follow a version 2 link; write it as version 2, signed by an active device"
    )]
    VersionDowngrade,
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
    /// A version 1 link signed by a key that is not the chain's current key.
    #[error("link is signed by {signer}, but the chain's current key is {current}")]
    NotCurrentKey {
        /// The chain's current key.
        current: PublicKey,
        /// The key the link names as signer.
        signer: PublicKey,
    },
    /// A version 2 link signed by a key that was a device of the chain and has been revoked
    /// (by `revoke_device`, or by a rotation away from it).
    #[error("link is signed by {signer}, a device this chain revoked")]
    RevokedSigner {
        /// The key the link names as signer.
        signer: PublicKey,
    },
    /// A version 2 link signed by a key that was never a device of the chain.
    #[error("link is signed by {signer}, which is not a device of this chain")]
    NotADevice {
        /// The key the link names as signer.
        signer: PublicKey,
    },
    /// The signature does not verify.
    #[error("link signature does not verify")]
    BadSignature,
    /// A `rotate` or `add_device` link's counter-signature by the new key does not verify (or
    /// was made for another purpose).
    #[error("counter-signature by the new key does not verify")]
    BadCounterSignature,
    /// `rotate` to the key that signs the link.
    #[error("rotation to the key that signs it")]
    RotateToSameKey,
    /// `add_device`, or a version 2 `rotate`, to a key that is or was a device of the chain
    /// (the chain id's key included): a revoked key never comes back.
    #[error("{key} is or was a device of this chain already; a new device needs a new key")]
    DuplicateDevice {
        /// The key.
        key: PublicKey,
    },
    /// `add_device` with the name of an active device.
    #[error("an active device is named {name:?} already; choose another name")]
    DuplicateDeviceName {
        /// The name.
        name: String,
    },
    /// `revoke_device` of a key that was never a device of the chain.
    #[error("{key} is not a device of this chain, so it cannot be revoked")]
    UnknownDevice {
        /// The key.
        key: PublicKey,
    },
    /// `revoke_device` of a device already revoked.
    #[error("device {key} is revoked already")]
    DeviceRevoked {
        /// The key.
        key: PublicKey,
    },
    /// `revoke_device` of the only active device: nobody could sign the chain again.
    #[error("device {key} is the chain's last active device; add another before revoking it")]
    LastDevice {
        /// The key.
        key: PublicKey,
    },
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
    /// `add_device` when [`MAX_ACTIVE_DEVICES`] are active, or `add_device` or a version 2
    /// `rotate` when the chain has [`MAX_DEVICE_ENTRIES`] device entries.
    #[error(
        "a chain has at most {MAX_ACTIVE_DEVICES} active devices and {MAX_DEVICE_ENTRIES} devices in all; revoke one first, or start a new identity"
    )]
    TooManyDevices,
}

impl ChainErrorKind {
    /// Every failure code, in the order [`code`](Self::code) documents them.
    pub const ALL_CODES: &'static [&'static str] = &[
        "empty",
        "too_large",
        "unknown_version",
        "version_downgrade",
        "malformed",
        "wrong_chain",
        "wrong_seq",
        "wrong_prev",
        "not_current_key",
        "revoked_signer",
        "not_a_device",
        "bad_signature",
        "bad_counter_signature",
        "rotate_to_same_key",
        "duplicate_endpoint",
        "unknown_endpoint",
        "duplicate_claim",
        "unknown_claim",
        "duplicate_device",
        "duplicate_device_name",
        "unknown_device",
        "device_revoked",
        "last_device",
        "too_many_links",
        "too_many_endpoints",
        "too_many_claims",
        "too_many_unknown_ops",
        "too_many_devices",
    ];

    /// The failure's stable snake_case name, used in vectors and wire errors.
    pub fn code(&self) -> &'static str {
        match self {
            ChainErrorKind::Empty => "empty",
            ChainErrorKind::TooLarge { .. } => "too_large",
            ChainErrorKind::UnknownVersion { .. } => "unknown_version",
            ChainErrorKind::VersionDowngrade => "version_downgrade",
            ChainErrorKind::Malformed(_) => "malformed",
            ChainErrorKind::WrongChain { .. } => "wrong_chain",
            ChainErrorKind::WrongSeq { .. } => "wrong_seq",
            ChainErrorKind::WrongPrev => "wrong_prev",
            ChainErrorKind::NotCurrentKey { .. } => "not_current_key",
            ChainErrorKind::RevokedSigner { .. } => "revoked_signer",
            ChainErrorKind::NotADevice { .. } => "not_a_device",
            ChainErrorKind::BadSignature => "bad_signature",
            ChainErrorKind::BadCounterSignature => "bad_counter_signature",
            ChainErrorKind::RotateToSameKey => "rotate_to_same_key",
            ChainErrorKind::DuplicateEndpoint { .. } => "duplicate_endpoint",
            ChainErrorKind::UnknownEndpoint { .. } => "unknown_endpoint",
            ChainErrorKind::DuplicateClaim { .. } => "duplicate_claim",
            ChainErrorKind::UnknownClaim { .. } => "unknown_claim",
            ChainErrorKind::DuplicateDevice { .. } => "duplicate_device",
            ChainErrorKind::DuplicateDeviceName { .. } => "duplicate_device_name",
            ChainErrorKind::UnknownDevice { .. } => "unknown_device",
            ChainErrorKind::DeviceRevoked { .. } => "device_revoked",
            ChainErrorKind::LastDevice { .. } => "last_device",
            ChainErrorKind::TooManyLinks => "too_many_links",
            ChainErrorKind::TooManyEndpoints => "too_many_endpoints",
            ChainErrorKind::TooManyClaims => "too_many_claims",
            ChainErrorKind::TooManyUnknownOps => "too_many_unknown_ops",
            ChainErrorKind::TooManyDevices => "too_many_devices",
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
    version: u64,
    devices: Vec<Device>,
    endpoints: BTreeMap<String, Endpoint>,
    shared_files: Option<SharedFiles>,
    claims: Vec<Claim>,
    unknown_ops: Vec<UnknownOpRecord>,
    /// Active device → the Olm identity key it bound. Left out of the state JSON while empty,
    /// so that the state of a chain without `set_olm_key` is what the release before wrote.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    olm_keys: BTreeMap<PublicKey, OlmKey>,
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
    /// Absent from the states of the release before devices, like `devices`.
    version: Option<u64>,
    devices: Option<Vec<Device>>,
    endpoints: BTreeMap<String, Endpoint>,
    shared_files: Option<SharedFiles>,
    claims: Vec<Claim>,
    unknown_ops: Vec<UnknownOpRecord>,
    /// Absent from the states of releases before Olm, and while no device bound a key.
    #[serde(default)]
    olm_keys: BTreeMap<PublicKey, OlmKey>,
}

/// Why [`Sigchain::from_trusted_state_json`] refused a kept state.
#[derive(Debug, thiserror::Error)]
pub enum StateJsonError {
    /// Not the JSON of a chain state.
    #[error("not a chain state: {0}")]
    Json(#[from] serde_json::Error),
    /// A state the release before devices wrote (no `version`, no `devices`). It does not say
    /// which keys the chain rotated away from, which the device rules need: verify the chain's
    /// links again instead, and keep the state that gives.
    #[error(
        "the chain state was written by a release without devices; verify the chain's links again"
    )]
    BeforeDevices,
    /// A state whose members contradict each other, which no verifier writes.
    #[error("the chain state is inconsistent: {0}")]
    Inconsistent(String),
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
    /// links instead. A state of the release before devices is refused with
    /// [`StateJsonError::BeforeDevices`]: verify the links again.
    pub fn from_trusted_state_json(bytes: &[u8]) -> Result<Sigchain, StateJsonError> {
        let state: StateJson = serde_json::from_slice(bytes)?;
        let (version, devices) = match (state.version, state.devices) {
            (Some(version), Some(devices)) => (version, devices),
            (None, None) => return Err(StateJsonError::BeforeDevices),
            _ => {
                return Err(StateJsonError::Inconsistent(
                    "it has one of `version` and `devices` without the other".into(),
                ));
            }
        };
        if !matches!(version, LINK_VERSION_1 | LINK_VERSION_2) {
            return Err(StateJsonError::Inconsistent(format!(
                "link version {version} is not 1 or 2"
            )));
        }
        let chain = Sigchain {
            chain: state.chain,
            current_key: state.current_key,
            seq: state.seq,
            head: state.head,
            time: state.time,
            version,
            devices,
            endpoints: state.endpoints,
            shared_files: state.shared_files,
            claims: state.claims,
            unknown_ops: state.unknown_ops,
            olm_keys: state.olm_keys,
        };
        if chain.earliest_active_device() != Some(chain.current_key) {
            return Err(StateJsonError::Inconsistent(
                "current_key is not the earliest active device".into(),
            ));
        }
        if let Some(device) = chain
            .olm_keys
            .keys()
            .find(|device| chain.active_device_index(device).is_none())
        {
            return Err(StateJsonError::Inconsistent(format!(
                "olm_keys binds a key to {device}, which is not an active device"
            )));
        }
        Ok(chain)
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

    /// Verifies a first link and returns the one-link chain. Before it the chain has one
    /// device, the chain id's key ([`PRIMARY_DEVICE_NAME`], kind `cli`, added at seq 1).
    pub fn start(bytes: &[u8]) -> Result<Sigchain, ChainErrorKind> {
        let signed = SignedLink::parse(bytes)?;
        let link = signed.link();
        let mut chain = Sigchain {
            chain: link.chain,
            current_key: link.chain,
            seq: 0,
            head: LinkHash([0; 32]),
            time: link.time,
            version: LINK_VERSION_1,
            devices: vec![Device {
                key: link.chain,
                name: PRIMARY_DEVICE_NAME.into(),
                kind: DeviceKind::Cli,
                added: 1,
                revoked: None,
            }],
            endpoints: BTreeMap::new(),
            shared_files: None,
            claims: Vec::new(),
            unknown_ops: Vec::new(),
            olm_keys: BTreeMap::new(),
        };
        chain.apply(&signed)?;
        Ok(chain)
    }

    /// Verifies `bytes` as the next link and applies it. On error the chain is unchanged.
    pub fn append(&mut self, bytes: &[u8]) -> Result<SignedLink, ChainErrorKind> {
        let (version, value) = read_version(bytes)?;
        // Step 3 still: a chain that went to version 2 never goes back, and the version
        // decides how the rest of the link is read, so nothing else of it is looked at.
        if version < self.version {
            return Err(ChainErrorKind::VersionDowngrade);
        }
        let signed = SignedLink::from_json(bytes, value)?;
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
        let signer_device = self.check_signer(link)?;
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
        self.version = link.version;
        match &link.op {
            Op::AddEndpoint(endpoint) => {
                self.endpoints
                    .insert(endpoint.name.clone(), endpoint.clone());
            }
            Op::RemoveEndpoint { name } => {
                self.endpoints.remove(name);
            }
            Op::SetSharedFiles(files) => self.shared_files = Some(files.clone()),
            Op::Rotate { new_key, .. } => {
                // The new key is a new device: it binds its own Olm key, if it has one.
                self.olm_keys.remove(&link.signer);
                let replaced = &mut self.devices[signer_device];
                replaced.revoked = Some(link.seq);
                let successor = Device {
                    key: *new_key,
                    name: replaced.name.clone(),
                    kind: replaced.kind,
                    added: link.seq,
                    revoked: None,
                };
                self.devices.push(successor);
                self.follow_current_key();
            }
            Op::AddDevice {
                key, name, kind, ..
            } => self.devices.push(Device {
                key: *key,
                name: name.clone(),
                kind: *kind,
                added: link.seq,
                revoked: None,
            }),
            Op::RevokeDevice { key, .. } => {
                if let Some(index) = self.active_device_index(key) {
                    self.devices[index].revoked = Some(link.seq);
                }
                self.olm_keys.remove(key);
                self.follow_current_key();
            }
            Op::SetOlmKey { key } => {
                self.olm_keys.insert(link.signer, *key);
            }
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

    /// After a device was revoked, the current key becomes the earliest-added device still
    /// active. There always is one: `revoke_device` refuses the last, and a rotation adds the
    /// successor of the device it revokes. (Adding a device never changes the current key.)
    fn follow_current_key(&mut self) {
        if let Some(current) = self.earliest_active_device() {
            self.current_key = current;
        }
    }

    /// Step 9 of PROTOCOL.md §4.4: a version 1 link is signed by the current key, a version 2
    /// link by an active device. Returns the index of the signer's device in
    /// [`Sigchain::devices`].
    fn check_signer(&self, link: &UnsignedLink) -> Result<usize, ChainErrorKind> {
        if link.version == LINK_VERSION_1 && link.signer != self.current_key {
            return Err(ChainErrorKind::NotCurrentKey {
                current: self.current_key,
                signer: link.signer,
            });
        }
        // The current key is always an active device, so a version 1 link passes here too.
        self.active_device_index(&link.signer).ok_or_else(|| {
            if self.was_device(&link.signer) {
                ChainErrorKind::RevokedSigner {
                    signer: link.signer,
                }
            } else {
                ChainErrorKind::NotADevice {
                    signer: link.signer,
                }
            }
        })
    }

    /// The operation's own rules against the state before `link`: the counter-signatures
    /// (PROTOCOL.md §4.4, step 12), then the state rules and limits (step 13).
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
            // The signer is an active device (checked above), and any Olm key may be bound.
            Op::SetSharedFiles(_) | Op::SetOlmKey { .. } => {}
            Op::Rotate {
                new_key,
                counter_sig,
            } => {
                if *new_key == link.signer {
                    return Err(ChainErrorKind::RotateToSameKey);
                }
                check_counter_signature(
                    link,
                    SignatureDomain::SigchainRotate,
                    new_key,
                    counter_sig,
                )?;
                // Version 1 rotations keep their meaning (a key may come back, and nothing
                // limits how often), so that every chain that verified before still does.
                if link.version >= LINK_VERSION_2 {
                    if self.was_device(new_key) {
                        return Err(ChainErrorKind::DuplicateDevice { key: *new_key });
                    }
                    if self.devices.len() >= MAX_DEVICE_ENTRIES {
                        return Err(ChainErrorKind::TooManyDevices);
                    }
                }
            }
            Op::AddDevice {
                key,
                name,
                counter_sig,
                ..
            } => {
                check_counter_signature(
                    link,
                    SignatureDomain::SigchainAddDevice,
                    key,
                    counter_sig,
                )?;
                if self.was_device(key) {
                    return Err(ChainErrorKind::DuplicateDevice { key: *key });
                }
                if self.active_devices().any(|device| device.name == *name) {
                    return Err(ChainErrorKind::DuplicateDeviceName { name: name.clone() });
                }
                if self.active_devices().count() >= MAX_ACTIVE_DEVICES
                    || self.devices.len() >= MAX_DEVICE_ENTRIES
                {
                    return Err(ChainErrorKind::TooManyDevices);
                }
            }
            Op::RevokeDevice { key, .. } => {
                if self.active_device_index(key).is_none() {
                    return Err(if self.was_device(key) {
                        ChainErrorKind::DeviceRevoked { key: *key }
                    } else {
                        ChainErrorKind::UnknownDevice { key: *key }
                    });
                }
                if self.active_devices().count() == 1 {
                    return Err(ChainErrorKind::LastDevice { key: *key });
                }
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

    /// The index of `key`'s active device entry. A key has at most one: only a version 1
    /// rotation may bring a key back, and it revokes the key it replaces. Searched from the
    /// end, where a version 1 chain keeps its one active device.
    fn active_device_index(&self, key: &PublicKey) -> Option<usize> {
        self.devices
            .iter()
            .rposition(|device| device.key == *key && device.is_active())
    }

    /// Whether `key` is or ever was a device of this chain.
    fn was_device(&self, key: &PublicKey) -> bool {
        self.devices.iter().any(|device| device.key == *key)
    }

    /// The current key's definition: the earliest-added device still active.
    fn earliest_active_device(&self) -> Option<PublicKey> {
        self.active_devices().next().map(|device| device.key)
    }

    /// An unsigned next link, signed by the current key, for the caller to
    /// [`UnsignedLink::sign`]; its version as [`Sigchain::next_link_by`] chooses it.
    pub fn next_link(&self, time: u64, op: Op) -> UnsignedLink {
        self.next_link_by(self.current_key, time, op)
    }

    /// An unsigned next link that `signer` will sign: an active device of the chain (in a
    /// chain without version 2 links, the current key or another device once it is added).
    /// It is version 1 when that version can say it — the chain has no version 2 link yet,
    /// `signer` is the current key and `op` exists in version 1 — so that contacts whose
    /// verifier knows only version 1 keep following the chain until its owner uses devices;
    /// version 2 otherwise.
    pub fn next_link_by(&self, signer: PublicKey, time: u64, op: Op) -> UnsignedLink {
        let version = if self.version == LINK_VERSION_1
            && signer == self.current_key
            && op.exists_in_version_1()
        {
            LINK_VERSION_1
        } else {
            LINK_VERSION_2
        };
        UnsignedLink {
            version,
            chain: self.chain,
            seq: self.seq + 1,
            prev: Some(self.head),
            time,
            signer,
            op,
        }
    }

    /// The next link (version 2): `add_device` of `device`'s key, named `name`, of `kind`,
    /// counter-signed by `device` and signed by `signer`, an active device of the chain.
    /// Append it, or send it to the home server, like any link; the new device may sign from
    /// the link after it.
    pub fn add_device_link(
        &self,
        time: u64,
        signer: &SecretKey,
        device: &SecretKey,
        name: &str,
        kind: DeviceKind,
    ) -> Result<SignedLink, LinkBuildError> {
        let add = |counter_sig| Op::AddDevice {
            key: device.public_key(),
            name: name.to_owned(),
            kind,
            counter_sig,
        };
        let mut link = self.next_link_by(
            signer.public_key(),
            time,
            add(Signature::from_bytes([0; 64])),
        );
        let counter_sig = device.sign(
            SignatureDomain::SigchainAddDevice,
            &link.counter_signed_body()?,
        );
        link.op = add(counter_sig);
        link.sign(signer)
    }

    /// The next link (version 2): `revoke_device` of `device`, with `reason` for people if
    /// given, signed by `signer`, an active device of the chain. A device may revoke itself
    /// while another stays active; the revoked key signs no later link.
    pub fn revoke_device_link(
        &self,
        time: u64,
        signer: &SecretKey,
        device: PublicKey,
        reason: Option<&str>,
    ) -> Result<SignedLink, LinkBuildError> {
        let revoke = Op::RevokeDevice {
            key: device,
            reason: reason.map(str::to_owned),
        };
        self.next_link_by(signer.public_key(), time, revoke)
            .sign(signer)
    }

    /// The chain's id: the key that signed the first link.
    pub fn chain_id(&self) -> PublicKey {
        self.chain
    }

    /// The key that signs the next link of version 1: the earliest-added device still active.
    /// In a chain that never added a device, the chain id's key or the key it last rotated to.
    pub fn current_key(&self) -> PublicKey {
        self.current_key
    }

    /// The highest link version so far: 2 once a link was version 2, and then every later
    /// link must be version 2 too.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Every device the chain ever had, in the order added: the chain id's key first, revoked
    /// devices with the seq that revoked them.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The devices that may sign the next link (of version 2), in the order added.
    pub fn active_devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter(|device| device.is_active())
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

    /// The Olm identity key `device` bound with `set_olm_key`, while it is an active device of
    /// the chain: messages to it may use envelope version 2 (PROTOCOL.md §15).
    pub fn olm_key(&self, device: &PublicKey) -> Option<OlmKey> {
        self.olm_keys.get(device).copied()
    }

    /// Every active device's bound Olm identity key.
    pub fn olm_keys(&self) -> &BTreeMap<PublicKey, OlmKey> {
        &self.olm_keys
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

        let laptop = key(3);
        let add = chain
            .add_device_link(103, &alice2, &laptop, "laptop", DeviceKind::Desktop)
            .unwrap();
        chain.append(add.bytes()).unwrap();
        links.push(add.bytes().to_vec());

        let mut kept = Sigchain::from_trusted_state_json(&chain.to_state_json()).unwrap();
        assert_eq!(kept, chain);
        // The kept state knows the chain went to version 2 and which keys were devices.
        let downgrade = UnsignedLink {
            version: LINK_VERSION_1,
            ..chain.next_link(104, endpoint("iroh"))
        }
        .sign(&alice2)
        .unwrap();
        assert_refused(&mut kept, &downgrade, ChainErrorKind::VersionDowngrade);
        let by_rotated_away_key = chain
            .next_link_by(alice.public_key(), 104, endpoint("iroh"))
            .sign(&alice)
            .unwrap();
        assert_refused(
            &mut kept,
            &by_rotated_away_key,
            ChainErrorKind::RevokedSigner {
                signer: alice.public_key(),
            },
        );
        let next = chain
            .next_link_by(laptop.public_key(), 104, endpoint("iroh"))
            .sign(&laptop)
            .unwrap();
        kept.append(next.bytes()).unwrap();
        links.push(next.bytes().to_vec());
        assert_eq!(kept, Sigchain::verify(&links).unwrap());
        assert!(matches!(
            Sigchain::from_trusted_state_json(b"{\"chain\":1}"),
            Err(StateJsonError::Json(_))
        ));
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
    /// Appends `link` to `chain` and to `links`, which must succeed.
    fn push(chain: &mut Sigchain, links: &mut Vec<Vec<u8>>, link: SignedLink) {
        chain
            .append(link.bytes())
            .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(link.bytes())));
        links.push(link.bytes().to_vec());
    }

    /// `link` fails as the next link of `chain` with `expected`, and leaves it unchanged.
    fn assert_refused(chain: &mut Sigchain, link: &SignedLink, expected: ChainErrorKind) {
        assert_refused_bytes(chain, link.bytes(), expected);
    }

    fn assert_refused_bytes(chain: &mut Sigchain, bytes: &[u8], expected: ChainErrorKind) {
        let before = chain.clone();
        assert_eq!(chain.append(bytes).unwrap_err(), expected);
        assert_eq!(*chain, before, "a failing link changes nothing");
    }

    /// Like [`assert_refused_bytes`] for any `malformed` reason.
    fn assert_malformed(chain: &mut Sigchain, bytes: &[u8]) {
        let before = chain.clone();
        let err = chain.append(bytes).unwrap_err();
        assert!(matches!(err, ChainErrorKind::Malformed(_)), "{err}");
        assert_eq!(*chain, before);
    }

    /// The JSON of `link` without `sig`, to edit into links the builder would not make.
    fn unsigned_json(link: &UnsignedLink) -> Value {
        serde_json::from_slice(&link.encode(None, true).unwrap()).unwrap()
    }

    /// `value` (a link without `sig`) signed by `key`: its canonical bytes with `sig`.
    fn sign_json(mut value: Value, key: &SecretKey) -> Vec<u8> {
        let body = canonical::encode(&value).unwrap();
        let sig = key.sign(SignatureDomain::SigchainLink, &body);
        value["sig"] = json!(sig.to_string());
        canonical::encode(&value).unwrap()
    }

    /// alice's one-link chain with her laptop added by link 2.
    fn with_laptop(alice: &SecretKey, laptop: &SecretKey) -> (Sigchain, Vec<Vec<u8>>) {
        let (mut chain, mut links) = start(alice);
        let add = chain
            .add_device_link(101, alice, laptop, "laptop", DeviceKind::Desktop)
            .unwrap();
        push(&mut chain, &mut links, add);
        (chain, links)
    }

    fn claim(identity: &str) -> Op {
        Op::Claim(Claim {
            service: "dns".into(),
            identity: identity.into(),
            proof: "txt".into(),
        })
    }

    /// Issue 21: a chain of the release before devices still verifies, and its owner can add a
    /// device. The builders write version 1 until then, and version 2 from then on.
    #[test]
    fn a_version_1_chain_verifies_as_before_and_its_owner_adds_a_device() {
        let (alice, laptop) = (key(1), key(3));
        let (mut chain, mut links) = start(&alice);
        let second = chain.next_link(101, endpoint("iroh")).sign(&alice).unwrap();
        assert_eq!(second.link().version, LINK_VERSION_1);
        push(&mut chain, &mut links, second);
        assert_eq!(chain.version(), LINK_VERSION_1);
        assert_eq!(
            chain.devices(),
            [Device {
                key: alice.public_key(),
                name: PRIMARY_DEVICE_NAME.into(),
                kind: DeviceKind::Cli,
                added: 1,
                revoked: None,
            }]
        );

        let add = chain
            .add_device_link(102, &alice, &laptop, "laptop", DeviceKind::Desktop)
            .unwrap();
        assert_eq!(add.link().version, LINK_VERSION_2);
        push(&mut chain, &mut links, add);
        assert_eq!(chain.version(), LINK_VERSION_2);
        assert_eq!(chain.current_key(), alice.public_key());
        assert_eq!(
            chain.devices()[1],
            Device {
                key: laptop.public_key(),
                name: "laptop".into(),
                kind: DeviceKind::Desktop,
                added: 3,
                revoked: None,
            }
        );
        let by_alice = chain.next_link(103, claim("a.example"));
        assert_eq!(by_alice.version, LINK_VERSION_2, "no way back to version 1");
        push(&mut chain, &mut links, by_alice.sign(&alice).unwrap());
        let by_laptop = chain
            .next_link_by(laptop.public_key(), 104, claim("b.example"))
            .sign(&laptop)
            .unwrap();
        push(&mut chain, &mut links, by_laptop);
        assert_eq!(Sigchain::verify(&links).unwrap(), chain);
    }

    /// PROTOCOL.md §4.1: a link is version 1 exactly when version 1 can say it.
    #[test]
    fn writers_choose_version_1_while_it_can_say_the_link() {
        let (alice, laptop) = (key(1), key(3));
        let (chain, _) = start(&alice);
        let version =
            |signer: &SecretKey, op: Op| chain.next_link_by(signer.public_key(), 101, op).version;
        assert_eq!(version(&alice, claim("a.example")), LINK_VERSION_1);
        assert_eq!(
            version(
                &alice,
                Op::RevokeDevice {
                    key: laptop.public_key(),
                    reason: None
                }
            ),
            LINK_VERSION_2
        );
        assert_eq!(version(&laptop, claim("a.example")), LINK_VERSION_2);
        assert_eq!(
            UnsignedLink::first(alice.public_key(), 100, claim("a.example")).version,
            LINK_VERSION_1
        );
        let first_revocation = Op::RevokeDevice {
            key: alice.public_key(),
            reason: None,
        };
        assert_eq!(
            UnsignedLink::first(alice.public_key(), 100, first_revocation).version,
            LINK_VERSION_2
        );
    }

    /// PROTOCOL.md §4.4 step 3: after a version 2 link, a version 1 link is refused before its
    /// shape is read; `add_device` and `revoke_device` never appear in version 1.
    #[test]
    fn version_1_links_after_version_2_and_device_operations_in_version_1_are_refused() {
        let (alice, laptop, phone) = (key(1), key(3), key(4));
        let (mut v1_chain, _) = start(&alice);
        let mut in_v1 = unsigned_json(
            &v1_chain
                .add_device_link(101, &alice, &phone, "phone", DeviceKind::Mobile)
                .unwrap()
                .link,
        );
        in_v1["v"] = json!(1);
        assert_malformed(&mut v1_chain, &sign_json(in_v1.clone(), &alice));
        let mut revocation = unsigned_json(&v1_chain.next_link(
            101,
            Op::RevokeDevice {
                key: alice.public_key(),
                reason: None,
            },
        ));
        revocation["v"] = json!(1);
        assert_malformed(&mut v1_chain, &sign_json(revocation, &alice));

        let (mut chain, _) = with_laptop(&alice, &laptop);
        let downgrade = UnsignedLink {
            version: LINK_VERSION_1,
            ..chain.next_link(102, claim("a.example"))
        }
        .sign(&alice)
        .unwrap();
        assert_refused(&mut chain, &downgrade, ChainErrorKind::VersionDowngrade);
        // A version 1 link that is also malformed: the version decides first.
        let mut malformed = unsigned_json(&chain.next_link(102, claim("a.example")));
        malformed["v"] = json!(1);
        malformed.as_object_mut().unwrap().remove("time");
        assert_refused_bytes(
            &mut chain,
            &sign_json(malformed, &alice),
            ChainErrorKind::VersionDowngrade,
        );
        for unknown in [0, 3] {
            let mut link = unsigned_json(&chain.next_link(102, claim("a.example")));
            link["v"] = json!(unknown);
            assert_refused_bytes(
                &mut chain,
                &sign_json(link, &alice),
                ChainErrorKind::UnknownVersion { version: unknown },
            );
        }
    }

    /// PROTOCOL.md §4.4 step 9 for version 2: an active device signs; a revoked one is
    /// `revoked_signer`, any other key `not_a_device`; the first link too.
    #[test]
    fn version_2_links_are_signed_by_active_devices() {
        let (alice, alice2, laptop, bob) = (key(1), key(2), key(3), key(9));
        let (mut chain, _) = with_laptop(&alice, &laptop);
        let by_bob = chain
            .next_link_by(bob.public_key(), 102, claim("a.example"))
            .sign(&bob)
            .unwrap();
        assert_refused(
            &mut chain,
            &by_bob,
            ChainErrorKind::NotADevice {
                signer: bob.public_key(),
            },
        );
        let revoke = chain
            .revoke_device_link(102, &laptop, alice.public_key(), None)
            .unwrap();
        chain.append(revoke.bytes()).unwrap();
        let by_revoked = chain
            .next_link_by(alice.public_key(), 103, claim("a.example"))
            .sign(&alice)
            .unwrap();
        assert_refused(
            &mut chain,
            &by_revoked,
            ChainErrorKind::RevokedSigner {
                signer: alice.public_key(),
            },
        );
        let adding = chain
            .add_device_link(103, &alice, &alice2, "phone", DeviceKind::Mobile)
            .unwrap();
        assert_refused(
            &mut chain,
            &adding,
            ChainErrorKind::RevokedSigner {
                signer: alice.public_key(),
            },
        );

        // A key a version 1 rotation replaced is a revoked device too.
        let (mut rotated, _) = start(&alice);
        let rotate = rotated
            .next_link(101, endpoint("x"))
            .sign_rotation(&alice, &alice2)
            .unwrap();
        rotated.append(rotate.bytes()).unwrap();
        let by_old_key = rotated
            .next_link_by(alice.public_key(), 102, claim("a.example"))
            .sign(&alice)
            .unwrap();
        assert_eq!(by_old_key.link().version, LINK_VERSION_2);
        assert_refused(
            &mut rotated,
            &by_old_key,
            ChainErrorKind::RevokedSigner {
                signer: alice.public_key(),
            },
        );

        let first_by_bob = UnsignedLink {
            version: LINK_VERSION_2,
            signer: bob.public_key(),
            ..UnsignedLink::first(alice.public_key(), 100, claim("a.example"))
        }
        .sign(&bob)
        .unwrap();
        assert_eq!(
            Sigchain::start(first_by_bob.bytes()).unwrap_err(),
            ChainErrorKind::NotADevice {
                signer: bob.public_key(),
            }
        );
    }

    /// PROTOCOL.md §4.2: the new key counter-signs `add_device` in its own domain; a missing
    /// counter-signature is `malformed`.
    #[test]
    fn add_device_needs_the_new_keys_counter_signature() {
        let (alice, laptop, bob) = (key(1), key(3), key(9));
        let (mut chain, _) = start(&alice);
        let good = chain
            .add_device_link(101, &alice, &laptop, "laptop", DeviceKind::Desktop)
            .unwrap();
        let body = good.link().counter_signed_body().unwrap();
        let wrong = [
            bob.sign(SignatureDomain::SigchainAddDevice, &body),
            laptop.sign(SignatureDomain::SigchainRotate, &body),
            laptop.sign(SignatureDomain::SigchainLink, &body),
            laptop.sign(SignatureDomain::SigchainAddDevice, b"{}"),
        ];
        for counter_sig in wrong {
            let mut link = good.link().clone();
            if let Op::AddDevice {
                counter_sig: slot, ..
            } = &mut link.op
            {
                *slot = counter_sig;
            }
            assert_refused(
                &mut chain,
                &link.sign(&alice).unwrap(),
                ChainErrorKind::BadCounterSignature,
            );
        }
        let mut missing = unsigned_json(good.link());
        missing["payload"]
            .as_object_mut()
            .unwrap()
            .remove("counter_sig");
        assert_malformed(&mut chain, &sign_json(missing, &alice));
        chain.append(good.bytes()).unwrap();
    }

    /// PROTOCOL.md §4.3: a device key is new to the chain, its name unused among the active
    /// devices, its name and kind well-formed.
    #[test]
    fn add_device_needs_a_new_key_a_free_name_and_a_known_kind() {
        let (alice, alice2, laptop, phone) = (key(1), key(2), key(3), key(4));
        let (mut chain, _) = with_laptop(&alice, &laptop);
        for (device, name, expected) in [
            (
                &alice,
                "other",
                ChainErrorKind::DuplicateDevice {
                    key: alice.public_key(),
                },
            ),
            (
                &laptop,
                "other",
                ChainErrorKind::DuplicateDevice {
                    key: laptop.public_key(),
                },
            ),
            (
                &phone,
                "laptop",
                ChainErrorKind::DuplicateDeviceName {
                    name: "laptop".into(),
                },
            ),
            (
                &phone,
                PRIMARY_DEVICE_NAME,
                ChainErrorKind::DuplicateDeviceName {
                    name: PRIMARY_DEVICE_NAME.into(),
                },
            ),
        ] {
            let link = chain
                .add_device_link(102, &alice, device, name, DeviceKind::Mobile)
                .unwrap();
            assert_refused(&mut chain, &link, expected);
        }
        for bad_name in ["", "Laptop", "my laptop", &"x".repeat(MAX_NAME_LEN + 1)] {
            let link = chain
                .add_device_link(102, &alice, &phone, bad_name, DeviceKind::Mobile)
                .unwrap();
            assert_malformed(&mut chain, link.bytes());
        }
        let mut bad_kind = unsigned_json(
            chain
                .add_device_link(102, &alice, &phone, "phone", DeviceKind::Mobile)
                .unwrap()
                .link(),
        );
        for kind in ["laptop", "Mobile", ""] {
            bad_kind["payload"]["kind"] = json!(kind);
            assert_malformed(&mut chain, &sign_json(bad_kind.clone(), &alice));
        }

        // A revoked device's name is free again; its key never is.
        let revoke = chain
            .revoke_device_link(102, &alice, laptop.public_key(), None)
            .unwrap();
        chain.append(revoke.bytes()).unwrap();
        let again = chain
            .add_device_link(103, &alice, &laptop, "laptop2", DeviceKind::Desktop)
            .unwrap();
        assert_refused(
            &mut chain,
            &again,
            ChainErrorKind::DuplicateDevice {
                key: laptop.public_key(),
            },
        );
        let renamed = chain
            .add_device_link(103, &alice, &phone, "laptop", DeviceKind::Mobile)
            .unwrap();
        chain.append(renamed.bytes()).unwrap();

        // A key a version 1 rotation replaced never comes back as a device.
        let (mut rotated, _) = start(&alice);
        let rotate = rotated
            .next_link(101, endpoint("x"))
            .sign_rotation(&alice, &alice2)
            .unwrap();
        rotated.append(rotate.bytes()).unwrap();
        let back = rotated
            .add_device_link(102, &alice2, &alice, "old", DeviceKind::Cli)
            .unwrap();
        assert_refused(
            &mut rotated,
            &back,
            ChainErrorKind::DuplicateDevice {
                key: alice.public_key(),
            },
        );
    }

    fn numbered_key(n: u16) -> SecretKey {
        let mut seed = [0xa5; 32];
        seed[..2].copy_from_slice(&n.to_le_bytes());
        SecretKey::from_seed(&seed)
    }

    /// PROTOCOL.md §4.4 step 13: at most 32 active devices.
    #[test]
    fn at_most_32_devices_are_active() {
        let alice = key(1);
        let (mut chain, _) = start(&alice);
        for n in 1..MAX_ACTIVE_DEVICES as u16 {
            let add = chain
                .add_device_link(
                    100,
                    &alice,
                    &numbered_key(n),
                    &format!("d{n}"),
                    DeviceKind::Cli,
                )
                .unwrap();
            chain.append(add.bytes()).unwrap();
        }
        assert_eq!(chain.active_devices().count(), MAX_ACTIVE_DEVICES);
        let extra = numbered_key(1000);
        let one_more = chain
            .add_device_link(100, &alice, &extra, "extra", DeviceKind::Cli)
            .unwrap();
        assert_refused(&mut chain, &one_more, ChainErrorKind::TooManyDevices);
        let revoke = chain
            .revoke_device_link(100, &alice, numbered_key(1).public_key(), None)
            .unwrap();
        chain.append(revoke.bytes()).unwrap();
        let room = chain
            .add_device_link(100, &alice, &extra, "extra", DeviceKind::Cli)
            .unwrap();
        chain.append(room.bytes()).unwrap();
    }

    /// PROTOCOL.md §4.4 step 13: `add_device` and version 2 `rotate` stop at 256 device
    /// entries, which version 1 rotations may pass (every chain that verified still does).
    #[test]
    fn at_most_256_device_entries_except_by_version_1_rotations() {
        let alice = key(1);
        let (mut chain, mut links) = start(&alice);
        let mut current = alice;
        for n in 1..MAX_DEVICE_ENTRIES as u16 {
            let next = numbered_key(n);
            let rotate = chain
                .next_link(100, endpoint("x"))
                .sign_rotation(&current, &next)
                .unwrap();
            assert_eq!(rotate.link().version, LINK_VERSION_1);
            push(&mut chain, &mut links, rotate);
            current = next;
        }
        assert_eq!(chain.devices().len(), MAX_DEVICE_ENTRIES);
        assert_eq!(chain.active_devices().count(), 1);

        let device = numbered_key(1000);
        let add = chain
            .add_device_link(100, &current, &device, "laptop", DeviceKind::Desktop)
            .unwrap();
        assert_refused(&mut chain, &add, ChainErrorKind::TooManyDevices);
        let rotate_v2 = UnsignedLink {
            version: LINK_VERSION_2,
            ..chain.next_link(100, endpoint("x"))
        }
        .sign_rotation(&current, &device)
        .unwrap();
        assert_refused(&mut chain, &rotate_v2, ChainErrorKind::TooManyDevices);
        let rotate_v1 = chain
            .next_link(100, endpoint("x"))
            .sign_rotation(&current, &device)
            .unwrap();
        push(&mut chain, &mut links, rotate_v1);
        assert_eq!(chain.devices().len(), MAX_DEVICE_ENTRIES + 1);
        assert_eq!(Sigchain::verify(&links).unwrap(), chain);
    }

    /// PROTOCOL.md §4.3: `revoke_device` names an active device and never the last one; a
    /// device may revoke itself; the reason is optional text.
    #[test]
    fn revoke_device_rules() {
        let (alice, laptop, bob) = (key(1), key(3), key(9));
        let (mut alone, _) = start(&alice);
        let last = alone
            .revoke_device_link(101, &alice, alice.public_key(), None)
            .unwrap();
        assert_refused(
            &mut alone,
            &last,
            ChainErrorKind::LastDevice {
                key: alice.public_key(),
            },
        );

        let (mut chain, mut links) = with_laptop(&alice, &laptop);
        let unknown = chain
            .revoke_device_link(102, &alice, bob.public_key(), None)
            .unwrap();
        assert_refused(
            &mut chain,
            &unknown,
            ChainErrorKind::UnknownDevice {
                key: bob.public_key(),
            },
        );
        for bad_reason in ["", "line\nbreak", &"x".repeat(MAX_VALUE_LEN + 1)] {
            let link = chain
                .revoke_device_link(102, &alice, laptop.public_key(), Some(bad_reason))
                .unwrap();
            assert_malformed(&mut chain, link.bytes());
        }
        let mut null_reason = unsigned_json(
            &chain
                .revoke_device_link(102, &alice, laptop.public_key(), None)
                .unwrap()
                .link,
        );
        null_reason["payload"]["reason"] = Value::Null;
        assert_malformed(&mut chain, &sign_json(null_reason, &alice));

        let itself = chain
            .revoke_device_link(102, &laptop, laptop.public_key(), Some("sold — wiped"))
            .unwrap();
        assert_eq!(
            itself.link().op,
            Op::RevokeDevice {
                key: laptop.public_key(),
                reason: Some("sold — wiped".into())
            }
        );
        push(&mut chain, &mut links, itself);
        assert_eq!(chain.devices()[1].revoked, Some(3));
        let again = chain
            .revoke_device_link(103, &alice, laptop.public_key(), None)
            .unwrap();
        assert_refused(
            &mut chain,
            &again,
            ChainErrorKind::DeviceRevoked {
                key: laptop.public_key(),
            },
        );
        let last = chain
            .revoke_device_link(103, &alice, alice.public_key(), None)
            .unwrap();
        assert_refused(
            &mut chain,
            &last,
            ChainErrorKind::LastDevice {
                key: alice.public_key(),
            },
        );
        assert_eq!(Sigchain::verify(&links).unwrap(), chain);
    }

    /// PROTOCOL.md §4.3: a rotation revokes the signer's device and adds the new key with its
    /// name and kind. In version 1 a key may come back; in version 2 it must be new.
    #[test]
    fn rotation_replaces_the_signers_device() {
        let (alice, alice2, laptop, laptop2) = (key(1), key(2), key(3), key(5));
        let (mut chain, mut links) = start(&alice);
        for (time, (from, to)) in (101..).zip([(&alice, &alice2), (&alice2, &alice)]) {
            let rotate = chain
                .next_link(time, endpoint("x"))
                .sign_rotation(from, to)
                .unwrap();
            push(&mut chain, &mut links, rotate);
        }
        let keys: Vec<_> = chain
            .devices()
            .iter()
            .map(|device| {
                (
                    device.key,
                    device.name.as_str(),
                    device.added,
                    device.revoked,
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                (alice.public_key(), PRIMARY_DEVICE_NAME, 1, Some(2)),
                (alice2.public_key(), PRIMARY_DEVICE_NAME, 2, Some(3)),
                (alice.public_key(), PRIMARY_DEVICE_NAME, 3, None),
            ],
            "a version 1 rotation back to an earlier key appends it again"
        );
        assert_eq!(chain.current_key(), alice.public_key());

        let add = chain
            .add_device_link(104, &alice, &laptop, "laptop", DeviceKind::Desktop)
            .unwrap();
        push(&mut chain, &mut links, add);
        let rotation = |chain: &Sigchain, signer: &SecretKey, new: &SecretKey| {
            chain
                .next_link_by(signer.public_key(), 105, endpoint("x"))
                .sign_rotation(signer, new)
                .unwrap()
        };
        let to_itself = rotation(&chain, &laptop, &laptop);
        assert_refused(&mut chain, &to_itself, ChainErrorKind::RotateToSameKey);
        for (new, key) in [(&alice, alice.public_key()), (&alice2, alice2.public_key())] {
            let to_a_device = rotation(&chain, &laptop, new);
            assert_refused(
                &mut chain,
                &to_a_device,
                ChainErrorKind::DuplicateDevice { key },
            );
        }
        let mut unsigned_by_new_key = rotation(&chain, &laptop, &laptop2).link().clone();
        unsigned_by_new_key.op = Op::Rotate {
            new_key: laptop2.public_key(),
            counter_sig: laptop.sign(
                SignatureDomain::SigchainRotate,
                &unsigned_by_new_key.counter_signed_body().unwrap(),
            ),
        };
        assert_refused(
            &mut chain,
            &unsigned_by_new_key.sign(&laptop).unwrap(),
            ChainErrorKind::BadCounterSignature,
        );
        let laptop_rotates = rotation(&chain, &laptop, &laptop2);
        assert_eq!(laptop_rotates.link().version, LINK_VERSION_2);
        push(&mut chain, &mut links, laptop_rotates);
        assert_eq!(
            chain.devices()[3..],
            [
                Device {
                    key: laptop.public_key(),
                    name: "laptop".into(),
                    kind: DeviceKind::Desktop,
                    added: 4,
                    revoked: Some(5),
                },
                Device {
                    key: laptop2.public_key(),
                    name: "laptop".into(),
                    kind: DeviceKind::Desktop,
                    added: 5,
                    revoked: None,
                },
            ]
        );
        assert_eq!(
            chain.current_key(),
            alice.public_key(),
            "alice was added first"
        );
        assert_eq!(Sigchain::verify(&links).unwrap(), chain);
    }

    /// PROTOCOL.md §4.4: the current key is the earliest-added device still active.
    #[test]
    fn the_current_key_is_the_earliest_active_device() {
        let (alice, laptop, phone) = (key(1), key(3), key(4));
        let (mut chain, _) = with_laptop(&alice, &laptop);
        let add = chain
            .add_device_link(102, &laptop, &phone, "phone", DeviceKind::Mobile)
            .unwrap();
        chain.append(add.bytes()).unwrap();
        assert_eq!(chain.current_key(), alice.public_key());
        for (time, revoked, next_current) in [(103, &alice, &laptop), (104, &laptop, &phone)] {
            let revoke = chain
                .revoke_device_link(time, &phone, revoked.public_key(), None)
                .unwrap();
            chain.append(revoke.bytes()).unwrap();
            assert_eq!(chain.current_key(), next_current.public_key());
        }
    }

    /// PROTOCOL.md §4.3: the four kinds, lowercase, and nothing else.
    #[test]
    fn device_kinds_have_one_text_form() {
        for kind in DeviceKind::ALL {
            assert_eq!(kind.to_string().parse::<DeviceKind>(), Ok(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), json!(kind.as_str()));
        }
        let names: Vec<&str> = DeviceKind::ALL.iter().map(|kind| kind.as_str()).collect();
        assert_eq!(names, ["desktop", "mobile", "cli", "paper"]);
        for other in ["Paper", "laptop", "", " cli"] {
            assert_eq!(
                other.parse::<DeviceKind>(),
                Err(UnknownDeviceKind(other.to_owned()))
            );
        }
    }

    /// good-full's state byte for byte as the release before devices wrote it (its
    /// `to_state_json`, run on good-full's links).
    const STATE_BEFORE_DEVICES: &str = r#"{"chain":"ed25519:6c189c7295667995fb2374d35df7acf47324296c8ca04c1814206fa70dddcd4f","current_key":"ed25519:b5c2470c675a135a7850c16a70f32b0c465035873a2c40ca3aea430eb07c5e01","seq":11,"head":"f3840be96f5bfaf29a4e7bbbe4cf73fde8e6a5ed37b2c648e4efe8451ce96010","time":1767226200,"endpoints":{"iroh-phone":{"name":"iroh-phone","kind":"iroh","address":"3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"},"nats":{"name":"nats","kind":"nats","address":"nats://chat.kez.lat:4222"}},"shared_files":{"manifest":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","providers":[]},"claims":[{"service":"dns","identity":"alice.example","proof":"_kez.alice.example TXT"}],"unknown_ops":[{"seq":5,"op":"set_avatar"}]}"#;

    /// A state of the release before devices does not say that good-full's chain rotated away
    /// from its id key, which the device rules need: it is refused, so that its keeper
    /// verifies the links again, which gives the same state and the devices.
    #[test]
    fn a_state_from_the_release_before_devices_is_refused_and_the_links_say_more() {
        assert!(matches!(
            Sigchain::from_trusted_state_json(STATE_BEFORE_DEVICES.as_bytes()),
            Err(StateJsonError::BeforeDevices)
        ));
        let vector: Value =
            serde_json::from_str(include_str!("../vectors/sigchain/good-full.json")).unwrap();
        let links: Vec<&str> = vector["links"]
            .as_array()
            .unwrap()
            .iter()
            .map(|link| link.as_str().unwrap())
            .collect();
        let verified = Sigchain::verify(&links).unwrap();
        let mut state: Value = serde_json::from_slice(&verified.to_state_json()).unwrap();
        let devices = state.as_object_mut().unwrap().remove("devices").unwrap();
        assert_eq!(
            state.as_object_mut().unwrap().remove("version"),
            Some(json!(1))
        );
        assert_eq!(
            state,
            serde_json::from_str::<Value>(STATE_BEFORE_DEVICES).unwrap()
        );
        assert_eq!(
            devices[0]["revoked"],
            json!(6),
            "alice's key was rotated away"
        );
    }

    /// A kept state whose members contradict each other is refused, not used.
    #[test]
    fn an_inconsistent_kept_state_is_refused() {
        let (alice, laptop) = (key(1), key(3));
        let (chain, _) = with_laptop(&alice, &laptop);
        let good: Value = serde_json::from_slice(&chain.to_state_json()).unwrap();
        let edits: [(&str, Value); 4] = [
            ("current_key", json!(laptop.public_key())),
            ("version", json!(3)),
            ("version", Value::Null),
            ("devices", json!([])),
        ];
        for (member, value) in edits {
            let mut state = good.clone();
            state[member] = value;
            let bytes = serde_json::to_vec(&state).unwrap();
            assert!(
                matches!(
                    Sigchain::from_trusted_state_json(&bytes),
                    Err(StateJsonError::Inconsistent(_))
                ),
                "{member}"
            );
        }
    }

    fn olm(byte: u8) -> OlmKey {
        OlmKey::from_bytes([byte; 32])
    }

    fn set_olm_key(byte: u8) -> Op {
        Op::SetOlmKey { key: olm(byte) }
    }

    /// `set_olm_key` binds the key to the link's signer, a later one replaces it, and the
    /// state JSON carries the map and reads back.
    #[test]
    fn set_olm_key_binds_the_key_to_its_signer() {
        let (alice, laptop) = (key(1), key(3));
        let (mut chain, mut links) = with_laptop(&alice, &laptop);
        assert_eq!(chain.olm_key(&laptop.public_key()), None);
        let before = chain.to_state_json();
        assert!(!String::from_utf8_lossy(&before).contains("olm_keys"));

        let by_laptop = chain
            .next_link_by(laptop.public_key(), 102, set_olm_key(7))
            .sign(&laptop)
            .unwrap();
        assert_eq!(by_laptop.link().version, LINK_VERSION_2);
        push(&mut chain, &mut links, by_laptop);
        let by_alice = chain.next_link(103, set_olm_key(8)).sign(&alice).unwrap();
        push(&mut chain, &mut links, by_alice);
        assert_eq!(chain.olm_key(&laptop.public_key()), Some(olm(7)));
        assert_eq!(chain.olm_key(&alice.public_key()), Some(olm(8)));
        assert!(chain.unknown_ops().is_empty());

        let again = chain
            .next_link_by(laptop.public_key(), 104, set_olm_key(9))
            .sign(&laptop)
            .unwrap();
        push(&mut chain, &mut links, again);
        assert_eq!(
            chain.olm_key(&laptop.public_key()),
            Some(olm(9)),
            "replaced"
        );
        assert_eq!(chain.olm_keys().len(), 2);

        let state: Value = serde_json::from_slice(&chain.to_state_json()).unwrap();
        assert_eq!(
            state["olm_keys"],
            json!({
                alice.public_key().to_string(): olm(8).to_string(),
                laptop.public_key().to_string(): olm(9).to_string(),
            })
        );
        let kept = Sigchain::from_trusted_state_json(&chain.to_state_json()).unwrap();
        assert_eq!(kept, chain);
        assert_eq!(kept.to_state_json(), chain.to_state_json());
        assert_eq!(Sigchain::verify(&links).unwrap(), chain);
    }

    /// A version 1 chain may bind its key's Olm key without going to version 2 (older
    /// verifiers keep reading it, as an unknown op), and a version 1 rotation drops it.
    #[test]
    fn set_olm_key_exists_in_version_1_and_a_rotation_drops_the_binding() {
        let (alice, alice2) = (key(1), key(2));
        let (mut chain, mut links) = start(&alice);
        let op = set_olm_key(7);
        assert!(op.exists_in_version_1());
        assert_eq!(op.name(), "set_olm_key");
        let link = chain.next_link(101, op).sign(&alice).unwrap();
        assert_eq!(link.link().version, LINK_VERSION_1);
        assert!(String::from_utf8_lossy(link.bytes()).contains(&format!(
            "\"op\":\"set_olm_key\",\"payload\":{{\"key\":\"{}\"}}",
            olm(7)
        )));
        push(&mut chain, &mut links, link);
        assert_eq!(chain.olm_key(&alice.public_key()), Some(olm(7)));
        let rotate = chain
            .next_link(102, endpoint("x"))
            .sign_rotation(&alice, &alice2)
            .unwrap();
        push(&mut chain, &mut links, rotate);
        assert_eq!(chain.olm_key(&alice.public_key()), None);
        assert_eq!(chain.olm_key(&alice2.public_key()), None);
        assert!(chain.olm_keys().is_empty());
        // Rotating back does not bring the binding back.
        let back = chain
            .next_link(103, endpoint("y"))
            .sign_rotation(&alice2, &alice)
            .unwrap();
        push(&mut chain, &mut links, back);
        assert_eq!(chain.olm_key(&alice.public_key()), None);
        assert_eq!(Sigchain::verify(&links).unwrap(), chain);
    }

    #[test]
    fn revoking_or_rotating_a_device_drops_its_olm_key_only() {
        let (alice, laptop, phone, phone2) = (key(1), key(3), key(4), key(5));
        let (mut chain, mut links) = with_laptop(&alice, &laptop);
        let add = chain
            .add_device_link(102, &alice, &phone, "phone", DeviceKind::Mobile)
            .unwrap();
        push(&mut chain, &mut links, add);
        for (device, byte) in [(&alice, 1), (&laptop, 3), (&phone, 4)] {
            let link = chain
                .next_link_by(device.public_key(), 103, set_olm_key(byte))
                .sign(device)
                .unwrap();
            push(&mut chain, &mut links, link);
        }
        let revoke = chain
            .revoke_device_link(104, &alice, laptop.public_key(), None)
            .unwrap();
        push(&mut chain, &mut links, revoke);
        assert_eq!(chain.olm_key(&laptop.public_key()), None);
        assert_eq!(chain.olm_key(&alice.public_key()), Some(olm(1)));
        let rotate = chain
            .next_link_by(phone.public_key(), 105, endpoint("p"))
            .sign_rotation(&phone, &phone2)
            .unwrap();
        push(&mut chain, &mut links, rotate);
        assert_eq!(chain.olm_key(&phone.public_key()), None);
        assert_eq!(chain.olm_key(&phone2.public_key()), None);
        assert_eq!(chain.olm_keys().len(), 1);
        // A revoked device binds nothing.
        let late = chain
            .next_link_by(laptop.public_key(), 106, set_olm_key(9))
            .sign(&laptop)
            .unwrap();
        assert_refused(
            &mut chain,
            &late,
            ChainErrorKind::RevokedSigner {
                signer: laptop.public_key(),
            },
        );
        assert_eq!(Sigchain::verify(&links).unwrap(), chain);
        let kept = Sigchain::from_trusted_state_json(&chain.to_state_json()).unwrap();
        assert_eq!(kept, chain);
    }

    #[test]
    fn set_olm_key_payload_has_one_form() {
        let alice = key(1);
        let (mut chain, _) = start(&alice);
        let good = unsigned_json(&chain.next_link(101, set_olm_key(7)));
        let payloads = [
            json!({}),
            json!({"key": olm(7), "extra": 1}),
            json!({"key": "07".repeat(31)}),
            json!({"key": "0A".repeat(32)}),
            json!({"key": 7}),
            json!({"key": null}),
            json!([olm(7)]),
        ];
        for payload in payloads {
            let mut link = good.clone();
            link["payload"] = payload;
            assert_malformed(&mut chain, &sign_json(link, &alice));
        }
        chain.append(sign_json(good, &alice).as_slice()).unwrap();
    }

    /// States written before `set_olm_key` existed (no `olm_keys`) still load and re-encode
    /// byte for byte; a state binding a key to a device that is not active is refused.
    #[test]
    fn states_without_olm_keys_load_and_bindings_must_name_active_devices() {
        let (alice, laptop) = (key(1), key(3));
        let (chain, _) = with_laptop(&alice, &laptop);
        let written = chain.to_state_json();
        assert!(!String::from_utf8_lossy(&written).contains("olm_keys"));
        let kept = Sigchain::from_trusted_state_json(&written).unwrap();
        assert_eq!(kept.to_state_json(), written);
        let mut state: Value = serde_json::from_slice(&written).unwrap();
        state["olm_keys"] = json!({});
        let empty =
            Sigchain::from_trusted_state_json(&serde_json::to_vec(&state).unwrap()).unwrap();
        assert_eq!(empty.to_state_json(), written, "an empty map is left out");
        state["olm_keys"] = json!({ key(9).public_key().to_string(): olm(1) });
        assert!(matches!(
            Sigchain::from_trusted_state_json(&serde_json::to_vec(&state).unwrap()),
            Err(StateJsonError::Inconsistent(_))
        ));
        state["olm_keys"] = json!({ "not a key": olm(1) });
        assert!(matches!(
            Sigchain::from_trusted_state_json(&serde_json::to_vec(&state).unwrap()),
            Err(StateJsonError::Json(_))
        ));
    }
}
