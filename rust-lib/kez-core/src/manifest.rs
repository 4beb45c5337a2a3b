//! Shared-files manifests (PROTOCOL.md §11): the signed list of files a user shares, which a
//! `set_shared_files` sigchain link commits to by BLAKE3 hash.
//!
//! Public entries are plain. Each private entry is sealed separately to each of its recipients
//! (ECIES: ephemeral X25519, HKDF-SHA256, XChaCha20-Poly1305) into a box of one fixed size, and
//! the boxes are shuffled together with random decoys up to a multiple of [`SEALED_BATCH`]. A
//! reader trial-decrypts every box; nothing outside a box says whom it is for, and every box
//! looks alike, so the manifest reveals neither the recipients nor how many entries each has —
//! only the total number of boxes, rounded up.
//!
//! ```text
//! manifest = canonical JSON {"owner","public","sealed","sig","time","v","version"}
//! sig      = ed25519 by owner over "KEZ-MANIFEST-V1" || 0x00 || canonical JSON without "sig"
//! sealed_i = base64(ephemeral_x25519_public(32) || xchacha20poly1305(padded) (+16 tag))
//!            aad = "KEZ-MANIFEST-V1" || owner key (32 bytes)
//! padded   = u16be(len) || canonical JSON entry (len bytes) || zeros, 1024 bytes in all
//! ```

use std::collections::BTreeSet;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand_core::{CryptoRng, OsRng, RngCore};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::canonical;
use crate::file::{self, BlobHash, ContentKey, FileOffer};
use crate::key::{PublicKey, SecretKey, Signature, SignatureDomain};

/// The manifest format version (its `v` member).
pub const MANIFEST_VERSION: u64 = 1;
/// The start of every box's AAD (the tag of the owner's signature,
/// [`SignatureDomain::Manifest`], too).
pub const SEALED_ENTRY_AAD_PREFIX: &[u8] = b"KEZ-MANIFEST-V1";
/// HKDF `info` for a sealed entry's key and nonce.
pub const SEALED_ENTRY_KDF_INFO: &[u8] = b"KEZ-MANIFEST-ENTRY-V1";
/// Largest manifest, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 16 * 1024 * 1024;
/// Most public entries in one manifest.
pub const MAX_PUBLIC_ENTRIES: usize = 10_000;
/// Most sealed boxes (decoys included) in one manifest.
pub const MAX_SEALED_ENTRIES: usize = 10_000;
/// Size of a box's plaintext: length prefix, entry and zero padding.
pub const SEALED_PLAINTEXT_LEN: usize = 1024;
/// Size of one box: ephemeral public key, padded entry, tag.
pub const SEALED_ENTRY_LEN: usize = EPHEMERAL_LEN + SEALED_PLAINTEXT_LEN + TAG_LEN;
/// Writers add decoy boxes until the number of boxes is a multiple of this.
pub const SEALED_BATCH: usize = 8;

const EPHEMERAL_LEN: usize = 32;
const TAG_LEN: usize = 16;
const LENGTH_PREFIX: usize = 2;

/// Why a manifest cannot be built or is refused. Each variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {size} bytes; the limit is {MAX_MANIFEST_BYTES}")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Its BLAKE3 hash is not the one the sigchain commits to.
    #[error("manifest hash {found} is not {expected}, the one the sigchain commits to")]
    HashMismatch {
        /// The committed hash.
        expected: BlobHash,
        /// The manifest's hash.
        found: BlobHash,
    },
    /// Not canonical JSON, or members missing, unknown or of the wrong type.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// A format version this code does not know.
    #[error("manifest format version {version} is not supported; upgrade")]
    UnknownVersion {
        /// The version found.
        version: u64,
    },
    /// More entries or boxes than the limits allow.
    #[error("manifest has {count} {what}; the limit is {limit}")]
    TooManyEntries {
        /// `public entries` or `sealed entries`.
        what: &'static str,
        /// How many.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// Owned (signed) by a key that is no active device of the chain.
    #[error("manifest is owned by {found}, which is no active device of the chain")]
    WrongOwner {
        /// The manifest's owner.
        found: PublicKey,
    },
    /// The owner's signature does not verify.
    #[error("manifest signature does not verify")]
    BadSignature,
    /// An entry's name breaks the file-name rules (PROTOCOL.md §9.3).
    #[error("entry {name:?}: bad file name: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Which rule.
        reason: String,
    },
    /// An entry's `cipher_size` is not the ciphertext length of its `size`.
    #[error("entry {name:?}: size {size} does not match encrypted size {cipher_size}")]
    SizeMismatch {
        /// The entry's name.
        name: String,
        /// The plaintext size.
        size: u64,
        /// The ciphertext size.
        cipher_size: u64,
    },
    /// Two entries a reader sees have the same name.
    #[error("two entries are named {0:?}")]
    DuplicateName(String),
    /// A box opened for this reader, but its inside is not a padded entry.
    #[error("an entry sealed for you is malformed: {0}")]
    BadSealedEntry(String),
    /// A private entry with no recipient (building only).
    #[error("private entry {0:?} has no recipient")]
    NoRecipients(String),
}

impl ManifestError {
    /// The failure's stable snake_case name.
    pub fn code(&self) -> &'static str {
        match self {
            ManifestError::TooLarge { .. } => "too_large",
            ManifestError::HashMismatch { .. } => "hash_mismatch",
            ManifestError::Malformed(_) => "malformed",
            ManifestError::UnknownVersion { .. } => "unknown_version",
            ManifestError::TooManyEntries { .. } => "too_many_entries",
            ManifestError::WrongOwner { .. } => "wrong_owner",
            ManifestError::BadSignature => "bad_signature",
            ManifestError::BadName { .. } => "bad_name",
            ManifestError::SizeMismatch { .. } => "size_mismatch",
            ManifestError::DuplicateName(_) => "duplicate_name",
            ManifestError::BadSealedEntry(_) => "bad_sealed_entry",
            ManifestError::NoRecipients(_) => "no_recipients",
        }
    }
}

/// One shared file: what a reader needs to fetch, check and decrypt it. It holds the file's
/// content key: never log it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// The file's name ([`file::check_name`] rules); unique among what one reader sees.
    pub name: String,
    /// Plaintext size in bytes.
    pub size: u64,
    /// When it was published, seconds since the Unix epoch.
    pub time: u64,
    /// BLAKE3 hash of the encrypted blob (PROTOCOL.md §9.1).
    pub blob: BlobHash,
    /// Size of the encrypted blob: [`file::ciphertext_len`] of `size`.
    pub cipher_size: u64,
    /// The file's content key; in a wrapped entry, the content key XOR the recipient's wrap
    /// (§11.5), which arrived in a forward-secret [`FileKey`] message.
    pub key: ContentKey,
    /// Whether `key` is wrapped: only in a private entry sealed to a device with an Olm key
    /// (PROTOCOL.md §11.5). Absent (never `false`) when it is not, so an entry of an earlier
    /// release keeps its one form.
    #[serde(
        default,
        skip_serializing_if = "std::ops::Not::not",
        deserialize_with = "only_true"
    )]
    pub wrapped: bool,
}

impl ManifestEntry {
    /// Checks the name, then the sizes.
    pub fn validate(&self) -> Result<(), ManifestError> {
        file::check_name(&self.name).map_err(|err| ManifestError::BadName {
            name: self.name.clone(),
            reason: err.to_string(),
        })?;
        if file::ciphertext_len(self.size) != Some(self.cipher_size) {
            return Err(ManifestError::SizeMismatch {
                name: self.name.clone(),
                size: self.size,
                cipher_size: self.cipher_size,
            });
        }
        Ok(())
    }

    /// The entry with its key wrapped by `wrap` (`key XOR wrap`, `wrapped` set): what a box
    /// for a device with an Olm key carries. Wrapping a wrapped entry is a bug.
    pub fn wrap(&self, wrap: &ContentKey) -> ManifestEntry {
        debug_assert!(!self.wrapped, "an entry is wrapped once");
        ManifestEntry {
            key: xor_keys(&self.key, wrap),
            wrapped: true,
            ..self.clone()
        }
    }

    /// The entry with its key unwrapped by `wrap` (the [`FileKey`] that came for its blob),
    /// `wrapped` cleared. An entry that is not wrapped comes back as it is.
    pub fn unwrap_with(&self, wrap: &ContentKey) -> ManifestEntry {
        if !self.wrapped {
            return self.clone();
        }
        ManifestEntry {
            key: xor_keys(&self.key, wrap),
            wrapped: false,
            ..self.clone()
        }
    }

    /// The entry as a file offer fetched from `providers` (the providers of the
    /// `set_shared_files` link), so a download takes the same path as an offered file. The
    /// caller unwraps a wrapped entry first ([`ManifestEntry::unwrap_with`]): its key does not
    /// decrypt the file.
    pub fn offer(&self, providers: Vec<String>) -> FileOffer {
        FileOffer {
            name: self.name.clone(),
            size: self.size,
            blob: self.blob,
            cipher_size: self.cipher_size,
            providers,
            key: self.key.clone(),
            pinned: false,
        }
    }

    fn to_canonical(&self) -> Zeroizing<Vec<u8>> {
        let value = serde_json::to_value(self).expect("an entry serialises");
        Zeroizing::new(canonical::encode(&value).expect("an entry has a canonical form"))
    }
}

/// A private entry and the keys it is sealed to (building only).
#[derive(Debug, Clone)]
pub struct PrivateEntry {
    /// The file.
    pub entry: ManifestEntry,
    /// Who may see it: each recipient's current key. At least one.
    pub recipients: Vec<PublicKey>,
}

/// Who an entry a reader sees was shared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// Everybody.
    Public,
    /// The reader (and possibly others, which the reader cannot tell).
    Private,
}

/// An entry a reader can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisibleEntry {
    /// The file.
    pub entry: ManifestEntry,
    /// Public, or sealed to the reader.
    pub audience: Audience,
}

/// The BLAKE3 hash of a manifest's bytes: what `set_shared_files` commits to, and the address
/// of the manifest blob.
pub fn manifest_hash(bytes: &[u8]) -> BlobHash {
    BlobHash::from_bytes(*blake3::hash(bytes).as_bytes())
}

/// Builds and signs manifest number `version` of `owner` at `time`: the public entries in
/// name order, each private entry sealed to each of its recipients, decoys added, the boxes
/// shuffled.
pub fn build(
    owner: &SecretKey,
    version: u64,
    time: u64,
    public: &[ManifestEntry],
    private: &[PrivateEntry],
) -> Result<Vec<u8>, ManifestError> {
    build_with_rng(owner, version, time, public, private, &mut OsRng)
}

/// [`build`] with the randomness (ephemeral keys, decoys, order) drawn from `rng`: for test
/// vectors. Production code uses [`build`].
pub fn build_with_rng<R: RngCore + CryptoRng>(
    owner: &SecretKey,
    version: u64,
    time: u64,
    public: &[ManifestEntry],
    private: &[PrivateEntry],
    rng: &mut R,
) -> Result<Vec<u8>, ManifestError> {
    let owner_key = owner.public_key();
    let mut public = public.to_vec();
    public.sort_by(|a, b| a.name.cmp(&b.name));
    check_entries(&public)?;
    let mut boxes: Vec<[u8; SEALED_ENTRY_LEN]> = Vec::new();
    for private in private {
        private.entry.validate()?;
        if private.recipients.is_empty() {
            return Err(ManifestError::NoRecipients(private.entry.name.clone()));
        }
        for recipient in &private.recipients {
            let mut ephemeral = Zeroizing::new([0u8; 32]);
            rng.fill_bytes(ephemeral.as_mut());
            boxes.push(seal_entry(
                &owner_key,
                recipient,
                &private.entry,
                &ephemeral,
            )?);
        }
    }
    while !boxes.len().is_multiple_of(SEALED_BATCH) {
        boxes.push(decoy(rng));
    }
    check_count("public entries", public.len(), MAX_PUBLIC_ENTRIES)?;
    check_count("sealed entries", boxes.len(), MAX_SEALED_ENTRIES)?;
    // Fisher–Yates, so a box's position says nothing about its entry or recipient.
    for i in (1..boxes.len()).rev() {
        let j = uniform_below(rng, i as u64 + 1) as usize;
        boxes.swap(i, j);
    }
    let mut body = serde_json::json!({
        "v": MANIFEST_VERSION,
        "owner": owner_key,
        "version": version,
        "time": time,
        "public": public,
        "sealed": boxes.iter().map(|b| data_encoding::BASE64.encode(b)).collect::<Vec<_>>(),
    });
    let unsigned =
        canonical::encode(&body).map_err(|err| ManifestError::Malformed(err.to_string()))?;
    let signature = owner.sign(SignatureDomain::Manifest, &unsigned);
    body["sig"] = serde_json::json!(signature);
    let bytes =
        canonical::encode(&body).map_err(|err| ManifestError::Malformed(err.to_string()))?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge { size: bytes.len() });
    }
    Ok(bytes)
}

/// A manifest whose hash, owner and signature verified. Only [`Manifest::open`] makes one.
#[derive(Debug, Clone)]
pub struct Manifest {
    owner: PublicKey,
    version: u64,
    time: u64,
    public: Vec<ManifestEntry>,
    sealed: Vec<[u8; SEALED_ENTRY_LEN]>,
}

/// The members of a manifest, as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    #[serde(rename = "v")]
    _version_checked_first: u64,
    owner: PublicKey,
    version: u64,
    time: u64,
    public: Vec<ManifestEntry>,
    sealed: Vec<String>,
    sig: Signature,
}

impl Manifest {
    /// Checks `bytes` as the manifest a verified sigchain commits to: its BLAKE3 hash must be
    /// `expected_hash` and its owner one of `owners` (the chain's active devices: any of them
    /// may publish). The first failure is the answer, in the order of PROTOCOL.md §11.3.
    pub fn open(
        bytes: &[u8],
        expected_hash: &BlobHash,
        owners: &[PublicKey],
    ) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { size: bytes.len() });
        }
        let found = manifest_hash(bytes);
        if found != *expected_hash {
            return Err(ManifestError::HashMismatch {
                expected: *expected_hash,
                found,
            });
        }
        let mut value =
            canonical::decode(bytes).map_err(|err| ManifestError::Malformed(err.to_string()))?;
        match value.get("v").and_then(Value::as_u64) {
            Some(MANIFEST_VERSION) => {}
            Some(version) => return Err(ManifestError::UnknownVersion { version }),
            None => return Err(ManifestError::Malformed("no version `v`".into())),
        }
        let wire =
            Wire::deserialize(&value).map_err(|err| ManifestError::Malformed(err.to_string()))?;
        check_count("public entries", wire.public.len(), MAX_PUBLIC_ENTRIES)?;
        check_count("sealed entries", wire.sealed.len(), MAX_SEALED_ENTRIES)?;
        let mut sealed = Vec::with_capacity(wire.sealed.len());
        for text in &wire.sealed {
            let decoded = data_encoding::BASE64
                .decode(text.as_bytes())
                .map_err(|err| ManifestError::Malformed(format!("sealed entry: {err}")))?;
            let sealed_box: [u8; SEALED_ENTRY_LEN] = decoded.try_into().map_err(|_| {
                ManifestError::Malformed(format!("a sealed entry is not {SEALED_ENTRY_LEN} bytes"))
            })?;
            sealed.push(sealed_box);
        }
        if !owners.contains(&wire.owner) {
            return Err(ManifestError::WrongOwner { found: wire.owner });
        }
        value
            .as_object_mut()
            .expect("a manifest is an object")
            .remove("sig");
        let unsigned =
            canonical::encode(&value).map_err(|err| ManifestError::Malformed(err.to_string()))?;
        wire.owner
            .verify(SignatureDomain::Manifest, &unsigned, &wire.sig)
            .map_err(|_| ManifestError::BadSignature)?;
        check_entries(&wire.public)?;
        Ok(Manifest {
            owner: wire.owner,
            version: wire.version,
            time: wire.time,
            public: wire.public,
            sealed,
        })
    }

    /// The owner's key.
    pub fn owner(&self) -> PublicKey {
        self.owner
    }

    /// The owner's publish counter.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the owner built it, seconds since the Unix epoch.
    pub fn time(&self) -> u64 {
        self.time
    }

    /// The public entries.
    pub fn public(&self) -> &[ManifestEntry] {
        &self.public
    }

    /// How many sealed boxes it holds (decoys included): all anyone but their recipients learns.
    pub fn sealed_count(&self) -> usize {
        self.sealed.len()
    }

    /// What `reader` may see: the public entries, then those sealed to `reader`, in box order.
    /// Every box is tried. Names must be unique among them.
    pub fn visible_to(&self, reader: &SecretKey) -> Result<Vec<VisibleEntry>, ManifestError> {
        let secret = reader.to_x25519();
        let aad = box_aad(&self.owner);
        let mut visible: Vec<VisibleEntry> = self
            .public
            .iter()
            .map(|entry| VisibleEntry {
                entry: entry.clone(),
                audience: Audience::Public,
            })
            .collect();
        let mut names: BTreeSet<String> = self.public.iter().map(|e| e.name.clone()).collect();
        for sealed in &self.sealed {
            let (ephemeral_public, ciphertext) = sealed.split_at(EPHEMERAL_LEN);
            let ephemeral_public: [u8; 32] = ephemeral_public.try_into().expect("32 bytes");
            let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(ephemeral_public));
            if !shared.was_contributory() {
                continue;
            }
            let (cipher, nonce) =
                box_cipher(shared.as_bytes(), &ephemeral_public, reader.x25519_public());
            let Ok(padded) = cipher.decrypt(
                &nonce,
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            ) else {
                continue;
            };
            let entry = unpad_entry(&Zeroizing::new(padded))?;
            if !names.insert(entry.name.clone()) {
                return Err(ManifestError::DuplicateName(entry.name));
            }
            visible.push(VisibleEntry {
                entry,
                audience: Audience::Private,
            });
        }
        Ok(visible)
    }
}

fn check_count(what: &'static str, count: usize, limit: usize) -> Result<(), ManifestError> {
    if count > limit {
        return Err(ManifestError::TooManyEntries { what, count, limit });
    }
    Ok(())
}

/// Validates public entries: each entry (never wrapped), then unique names.
fn check_entries(entries: &[ManifestEntry]) -> Result<(), ManifestError> {
    let mut names = BTreeSet::new();
    for entry in entries {
        entry.validate()?;
        if entry.wrapped {
            return Err(ManifestError::Malformed(format!(
                "public entry {:?} is wrapped; only a private entry may be",
                entry.name
            )));
        }
        if !names.insert(entry.name.as_str()) {
            return Err(ManifestError::DuplicateName(entry.name.clone()));
        }
    }
    Ok(())
}

/// A decoy box that cannot be told from a real one without a recipient's key: a fresh X25519
/// public key, as every real box starts with (random bytes would be a point in the prime-order
/// subgroup only 1 time in 16), then random bytes where a box has ciphertext.
fn decoy<R: RngCore + CryptoRng>(rng: &mut R) -> [u8; SEALED_ENTRY_LEN] {
    let mut secret = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(secret.as_mut());
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret));
    let mut decoy = [0u8; SEALED_ENTRY_LEN];
    decoy[..EPHEMERAL_LEN].copy_from_slice(public.as_bytes());
    rng.fill_bytes(&mut decoy[EPHEMERAL_LEN..]);
    decoy
}

/// A box's AAD binds it to its manifest's owner: a box copied into someone else's manifest
/// does not open.
fn box_aad(owner: &PublicKey) -> Vec<u8> {
    let mut aad = SEALED_ENTRY_AAD_PREFIX.to_vec();
    aad.extend_from_slice(owner.as_bytes());
    aad
}

/// The AEAD key and nonce of one box, as for an envelope (PROTOCOL.md §8) with its own `info`;
/// `None` for a small-order ephemeral key.
fn box_cipher(
    shared: &[u8; 32],
    ephemeral_public: &[u8; 32],
    recipient: &x25519_dalek::PublicKey,
) -> (XChaCha20Poly1305, XNonce) {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral_public);
    salt[32..].copy_from_slice(recipient.as_bytes());
    let mut okm = Zeroizing::new([0u8; 56]);
    Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(SEALED_ENTRY_KDF_INFO, okm.as_mut())
        .expect("56 bytes is a valid HKDF-SHA256 length");
    let cipher = XChaCha20Poly1305::new_from_slice(&okm[..32]).expect("32-byte key");
    (cipher, *XNonce::from_slice(&okm[32..]))
}

fn seal_entry(
    owner: &PublicKey,
    recipient: &PublicKey,
    entry: &ManifestEntry,
    ephemeral: &[u8; 32],
) -> Result<[u8; SEALED_ENTRY_LEN], ManifestError> {
    let json = entry.to_canonical();
    if json.len() > SEALED_PLAINTEXT_LEN - LENGTH_PREFIX {
        return Err(ManifestError::Malformed(format!(
            "entry {:?} does not fit a sealed entry",
            entry.name
        )));
    }
    let mut padded = Zeroizing::new([0u8; SEALED_PLAINTEXT_LEN]);
    padded[..LENGTH_PREFIX].copy_from_slice(&(json.len() as u16).to_be_bytes());
    padded[LENGTH_PREFIX..LENGTH_PREFIX + json.len()].copy_from_slice(&json);
    seal_padded(owner, recipient, &padded, ephemeral)
}

/// Encrypts one box's plaintext to `recipient`.
fn seal_padded(
    owner: &PublicKey,
    recipient: &PublicKey,
    padded: &[u8; SEALED_PLAINTEXT_LEN],
    ephemeral: &[u8; 32],
) -> Result<[u8; SEALED_ENTRY_LEN], ManifestError> {
    let ephemeral_public =
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*ephemeral)).to_bytes();
    let (shared, recipient) = recipient.x25519_agree(ephemeral).ok_or_else(|| {
        ManifestError::Malformed("the recipient key is a small-order point".into())
    })?;
    let (cipher, nonce) = box_cipher(&shared, &ephemeral_public, &recipient);
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: padded.as_slice(),
                aad: &box_aad(owner),
            },
        )
        .expect("a 1024-byte plaintext encrypts");
    let mut sealed = [0u8; SEALED_ENTRY_LEN];
    sealed[..EPHEMERAL_LEN].copy_from_slice(&ephemeral_public);
    sealed[EPHEMERAL_LEN..].copy_from_slice(&ciphertext);
    Ok(sealed)
}

/// The entry inside an opened box: length prefix, canonical JSON, zeros.
fn unpad_entry(padded: &[u8]) -> Result<ManifestEntry, ManifestError> {
    let bad = |reason: String| ManifestError::BadSealedEntry(reason);
    let (length, rest) = padded.split_at(LENGTH_PREFIX);
    let length = u16::from_be_bytes(length.try_into().expect("2 bytes")) as usize;
    if length > rest.len() {
        return Err(bad(format!("length {length} is past the end")));
    }
    let (json, padding) = rest.split_at(length);
    if padding.iter().any(|&b| b != 0) {
        return Err(bad("padding is not zeros".into()));
    }
    let value = canonical::decode(json).map_err(|err| bad(err.to_string()))?;
    let entry = ManifestEntry::deserialize(&value).map_err(|err| bad(err.to_string()))?;
    entry.validate()?;
    Ok(entry)
}

/// `wrapped` as sent: `true` or absent. An explicit `false` is a second form of an entry that is
/// not wrapped, and refused.
fn only_true<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    match bool::deserialize(deserializer)? {
        true => Ok(true),
        false => Err(serde::de::Error::custom(
            "`wrapped` is true or absent, never false",
        )),
    }
}

/// `key XOR wrap`, byte by byte.
fn xor_keys(key: &ContentKey, wrap: &ContentKey) -> ContentKey {
    let mut out = Zeroizing::new([0u8; 32]);
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = key.as_bytes()[i] ^ wrap.as_bytes()[i];
    }
    ContentKey::from_bytes(*out)
}

/// The envelope content type of a [`FileKey`] message (PROTOCOL.md §11.5). Not a message a
/// person sees ([`crate::chat::is_message`]).
pub const FILE_KEY_CONTENT_TYPE: &str = "kez.file-key";
/// Largest [`FileKey`] body, in bytes: its one form is 149.
pub const MAX_FILE_KEY_BYTES: usize = 256;

/// The body of a [`FILE_KEY_CONTENT_TYPE`] message: the wrap of the sender's private manifest
/// entries for the blob `blob` that are sealed to the recipient's devices with an Olm key
/// (PROTOCOL.md §11.5). It travels in a forward-secret message, so a device key stolen later
/// opens the box but not the file. The owner is the message's verified sender: a body names no
/// owner, so no one can set the wrap of someone else's files. Canonical JSON, exactly
/// `{"blob":"<64 hex>","wrap":"<64 hex>"}`. It holds key material: never log it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKey {
    /// BLAKE3 hash of the encrypted blob whose entries it unwraps.
    pub blob: BlobHash,
    /// The wrap: a wrapped entry's key XOR it is the file's content key.
    pub wrap: ContentKey,
}

impl FileKey {
    /// This body's content type.
    pub const CONTENT_TYPE: &'static str = FILE_KEY_CONTENT_TYPE;

    /// The body's one form (canonical JSON), zeroized when dropped.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let value = serde_json::to_value(self).expect("a file key serialises");
        Zeroizing::new(canonical::encode(&value).expect("a file key has a canonical form"))
    }

    /// Reads a body: at most [`MAX_FILE_KEY_BYTES`], canonical JSON with exactly `blob` and
    /// `wrap`, and nothing but its one form.
    pub fn decode(bytes: &[u8]) -> Result<FileKey, ManifestError> {
        let bad = |reason: String| ManifestError::Malformed(format!("file key: {reason}"));
        if bytes.len() > MAX_FILE_KEY_BYTES {
            return Err(bad(format!(
                "{} bytes; the limit is {MAX_FILE_KEY_BYTES}",
                bytes.len()
            )));
        }
        let value = canonical::decode(bytes).map_err(|err| bad(err.to_string()))?;
        let key = FileKey::deserialize(&value).map_err(|err| bad(err.to_string()))?;
        if *key.encode() != bytes {
            return Err(bad("not the body's one canonical form".into()));
        }
        Ok(key)
    }
}

/// A uniform integer in `0..bound` (`bound` ≥ 1), by rejection so no value is favoured.
fn uniform_below<R: RngCore>(rng: &mut R, bound: u64) -> u64 {
    let zone = u64::MAX - u64::MAX % bound;
    loop {
        let value = rng.next_u64();
        if value < zone {
            return value % bound;
        }
    }
}

#[cfg(test)]
mod tests;
