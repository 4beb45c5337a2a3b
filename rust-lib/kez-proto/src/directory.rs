//! The directory: what `kez.registry.lookup` and `whois` answer about this server's own users,
//! readable by clients with one JetStream direct get instead of a service request (PROTOCOL.md
//! §5.7). The home server writes one entry per handle and one per identity key into the
//! key-value bucket [`DIRECTORY_BUCKET`] and keeps them current on register and append; a
//! client reads one with the request [`DIRECT_GET_BODY`] to [`Slot::direct_get_subject`].
//!
//! A user may use only that form of direct get: nats-server answers it with the subject's last
//! message and refuses a body that names a sequence, a batch or several subjects, so the
//! directory cannot be walked by sequence. nats-server (2.15) does answer a subject with a
//! wildcard token, with the last entry any matching subject holds: so that it says nothing,
//! an entry's subject is a hash of the handle or key it is about, and its value is sealed
//! under a key derived from that handle or key. Only who already knows a name can find and
//! read its entry; a wildcard yields one opaque entry, or the public reconnect window
//! ([`crate::reconnect`]).
//!
//! Pure: the derivation, sealing and opening are functions of their inputs and the OS random
//! number generator (the sealing nonce).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use kez_core::key::PublicKey;
use rand_core::{OsRng, RngCore};
use sha2::Sha256;

use crate::answer::Profile;

/// The key-value bucket holding the entries.
pub const DIRECTORY_BUCKET: &str = "kez_directory";
/// The prefix of every direct get a client sends: `$JS.API.DIRECT.GET.<stream>.<subject
/// prefix>`; one more token, the slot's id, completes it.
pub const DIRECT_GET_PREFIX: &str = "$JS.API.DIRECT.GET.KV_kez_directory.$KV.kez_directory";
/// The body of a client's direct get: the subject form, asking nats-server to leave out the
/// headers it would add (stream, subject, sequence, time; a client needs none of them). An
/// empty body is answered the same but with those headers, which cost the broker and the client
/// about a fifth of a lookup's time when many are under way (BENCHMARKS.md, registry).
pub const DIRECT_GET_BODY: &[u8] = br#"{"no_hdr":true}"#;
/// What users may publish to reach the directory (and the service the broker's `SERVER`
/// account exports for it): the direct get of one subject, no body form.
pub const DIRECT_GET_SUBJECTS: &str = "$JS.API.DIRECT.GET.KV_kez_directory.$KV.kez_directory.*";
/// The salt of the derivation: names the directory and its version.
const DOMAIN: &[u8] = b"KEZ-DIRECTORY-V1";
/// The first byte of every entry: the format version.
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// The largest entry the server writes and a client accepts: a profile's JSON (a handle is at
/// most 288 bytes) with room to spare, plus the version, nonce and tag.
pub const MAX_ENTRY_BYTES: usize = 2048;

/// Where the entry about one handle or key lives and the key it is sealed under; both derived
/// from the handle's name or the key, so only who knows them finds and opens the entry.
#[derive(Clone)]
pub struct Slot {
    id: String,
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("id", &self.id).finish()
    }
}

/// Why an entry did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Larger than [`MAX_ENTRY_BYTES`].
    #[error("directory entry of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Not version 1, or too short to be one.
    #[error("directory entry is not in version 1 of the format")]
    Version,
    /// The seal does not open under this slot's key: another slot's entry, or altered.
    #[error("directory entry does not open under the name asked for")]
    Seal,
    /// Opened, but its content is not a profile.
    #[error("directory entry is not a profile: {0}")]
    Content(String),
}

impl Slot {
    /// The slot of the handle whose local part is `name` (as registered: the part before the
    /// domain, `alice` of `@alice@kez.lat`).
    pub fn handle(name: &str) -> Slot {
        Slot::derive(b"handle", name.as_bytes())
    }

    /// The slot of an identity key (a chain id).
    pub fn key(key: &PublicKey) -> Slot {
        Slot::derive(b"key", key.as_bytes())
    }

    fn derive(kind: &[u8], name: &[u8]) -> Slot {
        let mut input = Vec::with_capacity(kind.len() + 1 + name.len());
        input.extend_from_slice(kind);
        input.push(0);
        input.extend_from_slice(name);
        let mut okm = [0u8; 64];
        Hkdf::<Sha256>::new(Some(DOMAIN), &input)
            .expand(&[], &mut okm)
            .expect("64 bytes is a valid HKDF-SHA256 length");
        let id = okm[..32].iter().map(|b| format!("{b:02x}")).collect();
        let cipher = XChaCha20Poly1305::new_from_slice(&okm[32..]).expect("32-byte key");
        Slot { id, cipher }
    }

    /// The entry's key in [`DIRECTORY_BUCKET`]: 64 lowercase hex digits.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The subject a client sends its empty direct get request to.
    pub fn direct_get_subject(&self) -> String {
        format!("{DIRECT_GET_PREFIX}.{}", self.id)
    }

    /// The entry for `profile`: version, random nonce, and the profile's JSON sealed with the
    /// slot's id as associated data.
    pub fn seal(&self, profile: &Profile) -> Vec<u8> {
        let plaintext = serde_json::to_vec(profile).expect("a profile serializes");
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: self.id.as_bytes(),
                },
            )
            .expect("sealing in memory cannot fail");
        let mut entry = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        entry.push(VERSION);
        entry.extend_from_slice(&nonce);
        entry.extend_from_slice(&sealed);
        entry
    }

    /// Opens an entry of this slot. The profile is still the server's word: the caller checks
    /// it is about the handle or key it asked for.
    pub fn open(&self, entry: &[u8]) -> Result<Profile, EntryError> {
        if entry.len() > MAX_ENTRY_BYTES {
            return Err(EntryError::TooLarge(entry.len()));
        }
        if entry.len() < 1 + NONCE_LEN + TAG_LEN || entry[0] != VERSION {
            return Err(EntryError::Version);
        }
        let (nonce, sealed) = entry[1..].split_at(NONCE_LEN);
        let plaintext = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: self.id.as_bytes(),
                },
            )
            .map_err(|_| EntryError::Seal)?;
        serde_json::from_slice(&plaintext).map_err(|err| EntryError::Content(err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::ChainHead;
    use kez_core::SecretKey;

    fn profile(name: &str) -> Profile {
        Profile {
            handle: format!("@{name}@kez.lat").parse().unwrap(),
            key: SecretKey::generate().public_key(),
            registered_at: 1_700_000_000,
            sigchain: Some(ChainHead {
                seq: 3,
                head: kez_core::sigchain::LinkHash::of(b"link"),
            }),
        }
    }

    #[test]
    fn an_entry_opens_only_under_its_own_slot() {
        let alice = profile("alice");
        let entry = Slot::handle("alice").seal(&alice);
        assert_eq!(Slot::handle("alice").open(&entry).unwrap(), alice);
        assert_eq!(Slot::handle("alicf").open(&entry), Err(EntryError::Seal));
        assert_eq!(Slot::key(&alice.key).open(&entry), Err(EntryError::Seal));
        let by_key = Slot::key(&alice.key).seal(&alice);
        assert_eq!(Slot::key(&alice.key).open(&by_key).unwrap(), alice);
    }

    #[test]
    fn ids_are_hex_and_name_neither_the_handle_nor_the_key() {
        let key = SecretKey::generate().public_key();
        let slots = [Slot::handle("alice"), Slot::handle("bob"), Slot::key(&key)];
        for slot in &slots {
            assert_eq!(slot.id().len(), 64);
            assert!(
                slot.id()
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert_ne!(slot.id(), key.to_hex());
            assert_eq!(
                slot.direct_get_subject(),
                format!("{DIRECT_GET_PREFIX}.{}", slot.id())
            );
        }
        assert_ne!(slots[0].id(), slots[1].id());
        // A handle named like a key's hex is still another slot.
        assert_ne!(Slot::handle(&key.to_hex()).id(), Slot::key(&key).id());
        // Derived, so every client and server agrees.
        assert_eq!(Slot::handle("alice").id(), slots[0].id());
    }

    #[test]
    fn a_sealed_entry_reveals_nothing_of_the_profile() {
        let alice = profile("alice");
        let entry = Slot::handle("alice").seal(&alice);
        let text = String::from_utf8_lossy(&entry);
        assert!(!text.contains("alice") && !text.contains(&alice.key.to_hex()));
        // A fresh nonce each time: two seals of one profile differ.
        assert_ne!(entry, Slot::handle("alice").seal(&alice));
    }

    #[test]
    fn damaged_entries_are_refused_with_a_reason() {
        let slot = Slot::handle("alice");
        let entry = slot.seal(&profile("alice"));
        let mut flipped = entry.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(slot.open(&flipped), Err(EntryError::Seal));
        let mut version = entry.clone();
        version[0] = 2;
        assert_eq!(slot.open(&version), Err(EntryError::Version));
        assert_eq!(slot.open(&entry[..40]), Err(EntryError::Version));
        assert_eq!(slot.open(&[]), Err(EntryError::Version));
        assert_eq!(
            slot.open(&vec![1; MAX_ENTRY_BYTES + 1]),
            Err(EntryError::TooLarge(MAX_ENTRY_BYTES + 1))
        );
        // A sealed non-profile.
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let sealed = slot
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: b"[1,2,3]",
                    aad: slot.id().as_bytes(),
                },
            )
            .unwrap();
        let mut junk = vec![VERSION];
        junk.extend_from_slice(&nonce);
        junk.extend_from_slice(&sealed);
        assert!(matches!(slot.open(&junk), Err(EntryError::Content(_))));
    }
}
