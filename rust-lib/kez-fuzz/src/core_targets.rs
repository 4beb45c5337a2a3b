//! Targets for kez-core: sigchain links and chains (and the `set_olm_key` payload), envelopes
//! of both versions, Olm messages, sent copies, chat bodies, pairing requests, files and
//! offers, manifests, handles, keys, provider strings.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use kez_core::SignatureDomain;
use kez_core::chat::{self, ChatContent, ChatError};
use kez_core::copy::{MAX_META_BYTES, SENT_COPY_CONTENT_TYPE, SentCopy};
use kez_core::envelope::{
    self, ENVELOPE_KDF_INFO, ENVELOPE_VERSION, ENVELOPE_VERSION_OLM, MessageId, OlmEnvelope, Opened,
};
use kez_core::file::{self, ContentKey, FileOffer, SEGMENT_LEN};
use kez_core::handle::{self, DOMAIN_MAX_LEN, NAME_MAX_LEN, NAME_MIN_LEN};
use kez_core::manifest::{
    self, FileKey, MAX_FILE_KEY_BYTES, MAX_PUBLIC_ENTRIES, MAX_SEALED_ENTRIES, Manifest,
    ManifestEntry, ManifestError,
};
use kez_core::olm::{MAX_OLM_MESSAGE_BYTES, OLM_TYPE_NORMAL, OLM_TYPE_PRE_KEY, OlmMessage};
use kez_core::pair::{PairRequest, REQUEST_PREFIX};
use kez_core::prekey::OlmKey;
use kez_core::provider::{MAX_PROVIDER_ADDRS, MAX_PROVIDER_LEN, Provider};
use kez_core::sigchain::{DeviceKind, LinkHash, MAX_LINK_BYTES};
use kez_core::{Handle, Op, PublicKey, SecretKey, Sigchain, Signature, SignedLink};
use sha2::{Digest, Sha256};

use crate::{keys, mode};

/// Sigchain links: the input split at `\n` (canonical links never hold a raw newline), each
/// link parsed on its own, then all of them verified as one chain.
///
/// Asserts: a parsed link's bytes are its input and its hash is theirs, and it parses again to
/// the same link; a verified chain has one seq per link, the last link's hash as head, the first
/// link's chain id, and verifies again to the same state; a failing chain's prefix before the
/// failing link verifies, and appending the failing link to it fails the same way and leaves it
/// unchanged. Returns whether the chain verified.
pub fn sigchain(data: &[u8]) -> bool {
    let links: Vec<&[u8]> = data.split(|&byte| byte == b'\n').collect();
    for bytes in &links {
        if let Ok(link) = SignedLink::parse(bytes) {
            assert!(bytes.len() <= MAX_LINK_BYTES);
            assert_eq!(link.bytes(), *bytes);
            assert_eq!(link.hash(), LinkHash::of(bytes));
            assert_eq!(SignedLink::parse(link.bytes()).as_ref(), Ok(&link));
        }
    }
    match Sigchain::verify(&links) {
        Ok(chain) => {
            let first = SignedLink::parse(links[0]).expect("a verified chain's first link parses");
            assert_eq!(chain.seq(), links.len() as u64);
            assert_eq!(chain.head(), LinkHash::of(links[links.len() - 1]));
            assert_eq!(chain.chain_id(), first.link().chain);
            assert_eq!(Sigchain::verify(&links).as_ref(), Ok(&chain));
            // A link already in the chain never applies again.
            let mut again = chain.clone();
            assert!(again.append(links[0]).is_err());
            assert_eq!(again, chain);
            true
        }
        Err(err) => {
            assert!(err.position <= links.len());
            if err.position > 1 {
                let failing = links[err.position - 1];
                let mut prefix = Sigchain::verify(&links[..err.position - 1])
                    .expect("the links before the failing one verify");
                let before = prefix.clone();
                assert_eq!(prefix.append(failing).err(), Some(err.kind));
                assert_eq!(prefix, before);
            }
            false
        }
    }
}

/// Envelopes opened with bob's key (§8). Mode byte 0: the rest is an envelope as received.
/// Otherwise the rest is `header length (u16 BE) ‖ header ‖ body`, which the target signs with
/// alice's key and encrypts to bob as [`envelope::seal`] would (fixed ephemeral key), so the
/// header parsing behind the AEAD and the signature is reached.
///
/// Asserts: an opened message is addressed to bob, has a valid content type, and opens again
/// identically; for a built envelope, its sender is alice, its body is the input's, and sealing
/// the opened message again with the same randomness gives the very same envelope bytes (one
/// byte form per header). Returns whether it opened.
pub fn envelope(data: &[u8]) -> bool {
    let bob = keys::bob();
    let (mode, rest) = mode(data);
    if mode == 0 {
        let Ok(message) = envelope::open(&bob, rest) else {
            return false;
        };
        assert_eq!(message.to, bob.public_key());
        assert!(message.body.len() < rest.len());
        assert!(content_type_ok(&message.content_type));
        assert_eq!(envelope::open(&bob, rest).as_ref(), Ok(&message));
        return true;
    }
    let (header, body) = match rest.split_first_chunk::<2>() {
        Some((len, rest)) => rest.split_at(usize::from(u16::from_be_bytes(*len)).min(rest.len())),
        None => (rest, &[][..]),
    };
    let alice = keys::alice();
    let built = build_envelope(&alice, &bob.public_key(), header, body);
    let Ok(message) = envelope::open(&bob, &built) else {
        return false;
    };
    assert_eq!(message.from, alice.public_key());
    assert_eq!(message.to, bob.public_key());
    assert_eq!(message.body, body);
    assert!(content_type_ok(&message.content_type));
    let resealed = envelope::seal_with_fixed_randomness(
        &alice,
        &message.to,
        &message.content_type,
        &message.body,
        message.time,
        message.id,
        &EPHEMERAL,
    )
    .expect("an opened message seals again");
    assert_eq!(resealed, built, "one byte form per envelope");
    true
}

const EPHEMERAL: [u8; 32] = [0x42; 32];

/// The id of the version 2 envelopes [`envelope_v2`] builds.
const V2_ID: [u8; 16] = [0x24; 16];

/// Version 2 envelopes (PROTOCOL.md §15.3), bob the recipient, alice the sender. Mode byte 0:
/// the rest is an envelope as received, opened with [`envelope::open_outer`]. Mode 1: the rest
/// is an Olm message as the outer layer carries it (type byte, message bytes), which the
/// target seals from alice to bob (fixed id and ephemeral key) and opens, so the Olm decoder
/// behind the AEAD is reached. Mode 2: the rest is `header length (u16 BE) ‖ header ‖ body`,
/// signed with alice's key as the Olm plaintext of an outer layer from alice with the fixed
/// id, and checked with [`envelope::open_inner`].
///
/// Asserts: an opened outer layer's id is the clear one [`envelope::outer_id`] reads, its Olm
/// message re-encodes to itself, and (mode 1) it is the input, from alice, and sealing it again
/// gives the same bytes; a version 1 envelope opens to bob; an opened inside is from alice, to
/// bob, with the outer id and the input's body. Returns whether it opened.
pub fn envelope_v2(data: &[u8]) -> bool {
    let bob = keys::bob();
    let alice = keys::alice();
    let id = MessageId::from_bytes(V2_ID);
    let (mode, rest) = mode(data);
    match mode {
        0 => match envelope::open_outer(&bob, rest) {
            Ok(Opened::Olm(outer)) => {
                assert_eq!(envelope::outer_id(rest), Some(outer.id));
                let bytes = outer.message.to_bytes();
                assert_eq!(OlmMessage::from_bytes(&bytes).as_ref(), Ok(&outer.message));
                assert!(bytes.len() < rest.len());
                true
            }
            Ok(Opened::Sealed(message)) => {
                assert_eq!(rest.first(), Some(&ENVELOPE_VERSION));
                assert_eq!(message.to, bob.public_key());
                true
            }
            Err(_) => false,
        },
        1 => {
            let message = match rest.split_first() {
                Some((&OLM_TYPE_PRE_KEY, bytes)) => OlmMessage::PreKey(bytes.to_vec()),
                Some((&OLM_TYPE_NORMAL, bytes)) => OlmMessage::Normal(bytes.to_vec()),
                _ => {
                    assert!(OlmMessage::from_bytes(rest).is_err());
                    return false;
                }
            };
            let Ok(built) = envelope::seal_olm_outer_with_fixed_randomness(
                &bob.public_key(),
                id,
                &alice.public_key(),
                &message,
                &EPHEMERAL,
            ) else {
                return false;
            };
            assert_eq!(built[0], ENVELOPE_VERSION_OLM);
            let Ok(Opened::Olm(outer)) = envelope::open_outer(&bob, &built) else {
                assert!(OlmMessage::from_bytes(rest).is_err());
                return false;
            };
            assert_eq!((outer.id, outer.sender), (id, alice.public_key()));
            assert_eq!(outer.message, message);
            assert_eq!(outer.message.to_bytes(), rest);
            let resealed = envelope::seal_olm_outer_with_fixed_randomness(
                &bob.public_key(),
                outer.id,
                &outer.sender,
                &outer.message,
                &EPHEMERAL,
            );
            assert_eq!(
                resealed.as_ref(),
                Ok(&built),
                "one byte form per outer layer"
            );
            true
        }
        _ => {
            let (header, body) = match rest.split_first_chunk::<2>() {
                Some((len, rest)) => {
                    rest.split_at(usize::from(u16::from_be_bytes(*len)).min(rest.len()))
                }
                None => (rest, &[][..]),
            };
            let plaintext = signed_plaintext(&alice, header, body);
            let outer = OlmEnvelope {
                id,
                sender: alice.public_key(),
                message: OlmMessage::Normal(Vec::new()),
            };
            let Ok(message) = envelope::open_inner(&bob.public_key(), &outer, &plaintext) else {
                return false;
            };
            assert_eq!(message.from, alice.public_key());
            assert_eq!(message.to, bob.public_key());
            assert_eq!(message.id, id);
            assert_eq!(message.body, body);
            assert!(content_type_ok(&message.content_type));
            true
        }
    }
}

/// Olm messages as envelope version 2 carries them (type byte, then vodozemac's encoding),
/// decoded with [`OlmMessage::from_bytes`].
///
/// Asserts: an accepted message is at most [`MAX_OLM_MESSAGE_BYTES`], re-encodes to its input,
/// is a pre-key message exactly when its type byte says so, and names a sender identity exactly
/// then. Returns whether it decoded.
pub fn olm_message(data: &[u8]) -> bool {
    let Ok(message) = OlmMessage::from_bytes(data) else {
        return false;
    };
    assert!(data.len() <= MAX_OLM_MESSAGE_BYTES);
    assert_eq!(message.to_bytes(), data);
    assert_eq!(message.is_pre_key(), data[0] == OLM_TYPE_PRE_KEY);
    assert_eq!(message.sender_identity().is_some(), message.is_pre_key());
    true
}

/// The payload of a `set_olm_key` link (PROTOCOL.md §4.3): the input is parsed as JSON and, if
/// an object, signed into a link with that payload. Mode byte 0: alice's version 1 chain, alice
/// signs. Otherwise: bob is added as a device (version 2) and signs, then is revoked.
///
/// Asserts: an accepted payload is exactly `{"key": <its key>}`, binds that key to the signer
/// and nobody else, survives the state JSON, and is dropped when the signer is revoked.
/// Returns whether the link was accepted.
pub fn sigchain_olm_key(data: &[u8]) -> bool {
    let (mode, rest) = mode(data);
    let Ok(serde_json::Value::Object(payload)) = serde_json::from_slice(rest) else {
        return false;
    };
    let (alice, bob) = (keys::alice(), keys::bob());
    let nats = kez_core::sigchain::Endpoint {
        name: "nats".into(),
        kind: "nats".into(),
        address: "nats://127.0.0.1:4222".into(),
    };
    let first = kez_core::UnsignedLink::first(alice.public_key(), 100, Op::AddEndpoint(nats))
        .sign(&alice)
        .expect("a small link signs");
    let mut chain = Sigchain::start(first.bytes()).expect("a valid first link");
    let signer = if mode == 0 {
        &alice
    } else {
        let add = chain
            .add_device_link(101, &alice, &bob, "laptop", DeviceKind::Desktop)
            .expect("a small link signs");
        chain.append(add.bytes()).expect("a valid device");
        &bob
    };
    let op = Op::Unknown {
        op: "set_olm_key".into(),
        payload: payload.clone(),
    };
    let Ok(link) = chain
        .next_link_by(signer.public_key(), 102, op)
        .sign(signer)
    else {
        return false;
    };
    let before = chain.clone();
    if chain.append(link.bytes()).is_err() {
        assert_eq!(chain, before);
        return false;
    }
    assert_eq!(payload.len(), 1);
    let key: OlmKey = serde_json::from_value(payload["key"].clone()).expect("the bound key");
    assert_eq!(chain.olm_key(&signer.public_key()), Some(key));
    assert_eq!(chain.olm_keys().len(), 1);
    let kept = Sigchain::from_trusted_state_json(&chain.to_state_json()).expect("state reads back");
    assert_eq!(kept, chain);
    if mode != 0 {
        let revoke = chain
            .revoke_device_link(103, &alice, bob.public_key(), None)
            .expect("a small link signs");
        chain.append(revoke.bytes()).expect("bob can be revoked");
        assert_eq!(chain.olm_key(&bob.public_key()), None);
    }
    true
}

/// `u32be(header_len) ‖ header ‖ body ‖ signature` signed by `sender`, the header as is.
fn signed_plaintext(sender: &SecretKey, header: &[u8], body: &[u8]) -> Vec<u8> {
    let signature = sender.sign(
        SignatureDomain::Message,
        &envelope::signed_body(header, body),
    );
    let mut plaintext = Vec::with_capacity(4 + header.len() + body.len() + 64);
    plaintext.extend_from_slice(&(header.len() as u32).to_be_bytes());
    plaintext.extend_from_slice(header);
    plaintext.extend_from_slice(body);
    plaintext.extend_from_slice(&signature.to_bytes());
    plaintext
}

fn content_type_ok(content_type: &str) -> bool {
    (1..=envelope::MAX_CONTENT_TYPE_LEN).contains(&content_type.len())
        && content_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.+/-".contains(&b))
}

/// An envelope around `header` and `body` as PROTOCOL.md §8 builds it, the header taken as is.
fn build_envelope(
    sender: &SecretKey,
    recipient: &PublicKey,
    header: &[u8],
    body: &[u8],
) -> Vec<u8> {
    let plaintext = signed_plaintext(sender, header, body);
    let secret = x25519_dalek::StaticSecret::from(EPHEMERAL);
    let ephemeral_public = x25519_dalek::PublicKey::from(&secret).to_bytes();
    let recipient = recipient.to_x25519();
    let shared = secret.diffie_hellman(&recipient);
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&ephemeral_public);
    salt[32..].copy_from_slice(recipient.as_bytes());
    let mut okm = [0u8; 56];
    Hkdf::<Sha256>::new(Some(&salt), shared.as_bytes())
        .expand(ENVELOPE_KDF_INFO, &mut okm)
        .expect("56 bytes");
    let cipher = XChaCha20Poly1305::new_from_slice(&okm[..32]).expect("32-byte key");
    let mut aad = [0u8; 33];
    aad[0] = ENVELOPE_VERSION;
    aad[1..].copy_from_slice(&ephemeral_public);
    let ciphertext = cipher
        .encrypt(
            XNonce::from_slice(&okm[32..]),
            Payload {
                msg: &plaintext,
                aad: &aad,
            },
        )
        .expect("encrypts");
    let mut out = aad.to_vec();
    out.extend_from_slice(&ciphertext);
    out
}

/// Most segments the round-trip mode adds to its plaintext (so at most this many times 64 KiB).
const MAX_EXTRA_SEGMENTS: usize = 2;

/// File decryption (§9). Mode byte 0: `key (32) ‖ claimed ciphertext length (u64 BE) ‖
/// ciphertext` through [`file::decrypt_exact`]; the claimed length only limits reading, never
/// sizes a buffer. Otherwise: `key (32) ‖ extra segments (1) ‖ bit to flip (u32 BE) ‖
/// plaintext`: the plaintext, lengthened by 0 to 2 whole segments of its own bytes (a fixed
/// bound), is encrypted, decrypted, then decrypted again with one bit flipped.
///
/// Asserts: a successful decryption consumed exactly the claimed length, which is a valid
/// ciphertext length for what it wrote ([`file::plaintext_len`]); a round trip gives the
/// plaintext back at [`file::ciphertext_len`]; a flipped bit is always refused. Returns whether
/// the (first) decryption succeeded.
pub fn file_decrypt(data: &[u8]) -> bool {
    let (mode, rest) = mode(data);
    let Some((key, rest)) = rest.split_first_chunk::<32>() else {
        return false;
    };
    let key = ContentKey::from_bytes(*key);
    if mode == 0 {
        let Some((claimed, ciphertext)) = rest.split_first_chunk::<8>() else {
            return false;
        };
        let claimed = u64::from_be_bytes(*claimed);
        let mut plaintext = Vec::new();
        let Ok(written) = file::decrypt_exact(&key, ciphertext, &mut plaintext, claimed) else {
            return false;
        };
        assert_eq!(written, plaintext.len() as u64);
        assert_eq!(claimed, ciphertext.len() as u64);
        assert_eq!(file::plaintext_len(claimed), Some(written));
        assert_eq!(file::ciphertext_len(written), Some(claimed));
        return true;
    }
    let Some(([extra], rest)) = rest.split_first_chunk::<1>() else {
        return false;
    };
    let Some((flip, own)) = rest.split_first_chunk::<4>() else {
        return false;
    };
    let extra = usize::from(*extra) % (MAX_EXTRA_SEGMENTS + 1) * SEGMENT_LEN;
    let plaintext: Vec<u8> = own
        .iter()
        .copied()
        .chain(
            own.iter()
                .copied()
                .cycle()
                .take(if own.is_empty() { 0 } else { extra }),
        )
        .chain(std::iter::repeat_n(
            0x5a,
            if own.is_empty() { extra } else { 0 },
        ))
        .collect();
    let mut ciphertext = Vec::new();
    let written = file::encrypt(&key, plaintext.as_slice(), &mut ciphertext).expect("encrypts");
    assert_eq!(written, ciphertext.len() as u64);
    assert_eq!(file::ciphertext_len(plaintext.len() as u64), Some(written));
    assert_eq!(file::plaintext_len(written), Some(plaintext.len() as u64));
    let mut decrypted = Vec::new();
    let read = file::decrypt_exact(&key, ciphertext.as_slice(), &mut decrypted, written)
        .expect("a fresh ciphertext decrypts");
    assert_eq!(read, plaintext.len() as u64);
    assert_eq!(decrypted, plaintext);
    let bit = u32::from_be_bytes(*flip) as usize % (ciphertext.len() * 8);
    ciphertext[bit / 8] ^= 1 << (bit % 8);
    let mut sink = Vec::new();
    assert!(
        file::decrypt_exact(&key, ciphertext.as_slice(), &mut sink, written).is_err(),
        "flipped bit {bit} accepted"
    );
    assert!(file::decrypt(&key, ciphertext.as_slice(), &mut sink).is_err());
    true
}

/// [`FileOffer::from_json`] on the input; also [`file::safe_name`] on it as text.
///
/// Asserts: an accepted offer validates, encodes ([`FileOffer::to_json`]) to canonical JSON
/// that parses back to the same offer and encodes again to the same bytes, and its sizes agree
/// ([`file::ciphertext_len`]); `safe_name` of any text is a valid name, and a valid name is
/// left unchanged. Returns whether the offer was accepted.
pub fn file_offer(data: &[u8]) -> bool {
    if let Ok(text) = std::str::from_utf8(data) {
        let safe = file::safe_name(text);
        assert!(file::check_name(&safe).is_ok(), "safe_name gave {safe:?}");
        if file::check_name(text).is_ok() {
            assert_eq!(safe, text);
        }
    }
    let Ok(offer) = FileOffer::from_json(data) else {
        return false;
    };
    assert_eq!(offer.validate(), Ok(()));
    assert_eq!(file::ciphertext_len(offer.size), Some(offer.cipher_size));
    assert!(!offer.providers.is_empty() && offer.providers.len() <= file::MAX_PROVIDERS);
    let json = offer.to_json().expect("an accepted offer encodes");
    let again = FileOffer::from_json(&json).expect("an encoded offer parses");
    assert_eq!(again, offer);
    assert_eq!(*again.to_json().expect("encodes"), *json);
    true
}

/// [`FileKey::decode`] on the input: a `kez.file-key` body (PROTOCOL.md §11.5), which a
/// contact controls and the store decodes while recording the message.
///
/// Asserts: an accepted body fits [`MAX_FILE_KEY_BYTES`] and encodes back to the input exactly
/// (its one form), and unwrapping a wrapped entry with it gives back the entry it wrapped.
/// Returns whether the body was accepted.
pub fn file_key(data: &[u8]) -> bool {
    let Ok(file_key) = FileKey::decode(data) else {
        return false;
    };
    assert!(data.len() <= MAX_FILE_KEY_BYTES);
    assert_eq!(*file_key.encode(), data, "one form");
    let entry = ManifestEntry {
        name: "f".into(),
        size: 0,
        time: 0,
        blob: file_key.blob,
        cipher_size: file::ciphertext_len(0).expect("empty file"),
        key: ContentKey::from_bytes([5; 32]),
        wrapped: false,
    };
    let wrapped = entry.wrap(&file_key.wrap);
    assert!(wrapped.wrapped);
    assert_eq!(wrapped.unwrap_with(&file_key.wrap), entry);
    true
}

/// [`SentCopy::decode`] on the input: a sent copy's body (PROTOCOL.md §8.5), which another
/// device of the own identity controls.
///
/// Asserts: an accepted copy names a valid content type other than the copy's own, its meta
/// fits [`MAX_META_BYTES`], and it encodes back to the input exactly (the meta is canonical),
/// so a copy has one form. Returns whether the copy was accepted.
pub fn sent_copy(data: &[u8]) -> bool {
    let Ok(copy) = SentCopy::decode(data) else {
        return false;
    };
    assert_ne!(copy.content_type, SENT_COPY_CONTENT_TYPE);
    assert!(
        content_type_ok(&copy.content_type),
        "{:?}",
        copy.content_type
    );
    let encoded = copy.encode();
    assert!(encoded.len() - copy.body.len() <= 2 + MAX_META_BYTES);
    assert_eq!(encoded, data, "a copy has one encoding");
    true
}

/// [`ChatContent::decode`] on a chat body (PROTOCOL.md §8.6), which any sender controls: the
/// first byte picks the content type (modulo one more than the number of
/// [`chat::CONTENT_TYPES`]: the last is `kez.resend`, [`chat::Resend::decode`], §15.4), the
/// rest is the body.
///
/// Asserts: an accepted body is of the content type it was read as, passes its own checks,
/// encodes back to the input exactly (one form), and names at most [`chat::MAX_RECEIPT_IDS`]
/// messages (a resend request [`chat::MAX_RESEND_IDS`]); a refused one is refused with a code.
/// Returns whether the body was accepted.
pub fn chat(data: &[u8]) -> bool {
    let (mode, body) = mode(data);
    let choice = usize::from(mode) % (chat::CONTENT_TYPES.len() + 1);
    if choice == chat::CONTENT_TYPES.len() {
        return match chat::Resend::decode(body) {
            Ok(resend) => {
                assert!((1..=chat::MAX_RESEND_IDS).contains(&resend.ids.len()));
                assert_eq!(resend.encode().as_deref(), Ok(body), "one form");
                true
            }
            Err(err) => {
                assert!(!err.code().is_empty());
                false
            }
        };
    }
    let content_type = chat::CONTENT_TYPES[choice];
    let content = match ChatContent::decode(content_type, body) {
        Ok(content) => content,
        Err(err) => {
            assert!(!err.code().is_empty());
            assert!(
                !matches!(err, ChatError::NotChat(_)),
                "{content_type} is chat"
            );
            return false;
        }
    };
    assert_eq!(content.content_type(), content_type);
    let encoded = content.encode().expect("an accepted body encodes");
    assert_eq!(encoded, body, "a chat body has one encoding");
    if let Some((_, ids)) = content.change() {
        assert!((1..=chat::MAX_RECEIPT_IDS).contains(&ids.len()));
    }
    assert_eq!(
        ChatContent::decode(content_type, &encoded).as_ref(),
        Ok(&content)
    );
    true
}

/// When [`pair_request`] parses: 2026-01-01.
pub const PAIR_NOW: u64 = 1_767_225_600;

/// Pairing request lines (PROTOCOL.md §4.7), the text a user pastes, parsed at [`PAIR_NOW`].
/// Mode byte 0: the rest is the line. Mode 1: the rest is a request's bytes without their
/// checksum; the harness appends it (SHA-256 of `KEZ-PAIR-REQUEST-V1` || 0x00 || bytes, first
/// 4 bytes) and encodes the line, so mutated inputs reach the checks past the checksum.
///
/// Asserts: an accepted request is not expired and not a paper key; it encodes to a line that
/// parses to the same request; its fingerprint is 6 groups of 4 base32 characters. Returns
/// whether the line was accepted.
pub fn pair_request(data: &[u8]) -> bool {
    let (mode, rest) = mode(data);
    let line = if mode == 1 {
        let sum = Sha256::new()
            .chain_update(b"KEZ-PAIR-REQUEST-V1\0")
            .chain_update(rest)
            .finalize();
        let mut bytes = rest.to_vec();
        bytes.extend_from_slice(&sum[..4]);
        format!(
            "{REQUEST_PREFIX}{}",
            data_encoding::BASE32_NOPAD.encode(&bytes)
        )
    } else {
        String::from_utf8_lossy(rest).into_owned()
    };
    let Ok(request) = PairRequest::parse(&line, PAIR_NOW) else {
        return false;
    };
    assert!(request.expires > PAIR_NOW);
    assert_ne!(request.kind, kez_core::sigchain::DeviceKind::Paper);
    let again = PairRequest::parse(&request.to_line(), PAIR_NOW).expect("its own line parses");
    assert_eq!(again, request);
    let fingerprint = request.fingerprint();
    let groups: Vec<&str> = fingerprint.split('-').collect();
    assert_eq!(groups.len(), 6, "{fingerprint}");
    assert!(groups.iter().all(|group| {
        group.len() == 4
            && group
                .bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
    }));
    true
}

/// Shared-files manifests (§11) read by bob. Mode byte 0: the rest is a manifest as fetched,
/// checked against its own BLAKE3 hash and alice's key. Mode 1: the rest is a manifest body
/// that the harness signs with alice's key first, so the checks past the signature (entries,
/// boxes) are reached by mutated inputs too.
///
/// Asserts: an opened manifest is alice's, within the entry limits, with valid public entries
/// of distinct names; what bob sees is valid and distinctly named; opening again gives the same
/// view; the same bytes against another hash are `hash_mismatch`. Returns whether bob could read
/// it.
pub fn manifest(data: &[u8]) -> bool {
    let alice = keys::alice();
    let (mode, rest) = mode(data);
    let bytes = match mode {
        0 => rest.to_vec(),
        1 => match sign_manifest_body(rest, &alice) {
            Some(bytes) => bytes,
            None => return false,
        },
        _ => return false,
    };
    let hash = manifest::manifest_hash(&bytes);
    let opened = Manifest::open(&bytes, &hash, &[alice.public_key()]);
    let wrong = manifest::manifest_hash(b"another manifest");
    assert!(matches!(
        Manifest::open(&bytes, &wrong, &[alice.public_key()]),
        Err(ManifestError::TooLarge { .. } | ManifestError::HashMismatch { .. })
    ));
    let Ok(opened) = opened else {
        return false;
    };
    assert_eq!(opened.owner(), alice.public_key());
    assert!(opened.public().len() <= MAX_PUBLIC_ENTRIES);
    assert!(opened.sealed_count() <= MAX_SEALED_ENTRIES);
    let mut names = std::collections::BTreeSet::new();
    for entry in opened.public() {
        assert_eq!(entry.validate(), Ok(()));
        assert!(names.insert(entry.name.clone()));
    }
    let Ok(visible) = opened.visible_to(&keys::bob()) else {
        return false;
    };
    let mut seen = std::collections::BTreeSet::new();
    for item in &visible {
        assert_eq!(item.entry.validate(), Ok(()));
        assert!(seen.insert(item.entry.name.clone()));
    }
    let again = Manifest::open(&bytes, &hash, &[alice.public_key()])
        .expect("an opened manifest opens again")
        .visible_to(&keys::bob())
        .expect("and reads the same");
    assert_eq!(again, visible);
    true
}

/// `body` (JSON) as a manifest signed by `signer`: any `sig` replaced. `None` when `body` is
/// not a JSON object with a canonical form.
fn sign_manifest_body(body: &[u8], signer: &SecretKey) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.as_object_mut()?.remove("sig");
    let unsigned = kez_core::canonical::encode(&value).ok()?;
    value["sig"] = serde_json::json!(signer.sign(SignatureDomain::Manifest, &unsigned));
    kez_core::canonical::encode(&value).ok()
}

/// [`Handle::parse`]: the input as UTF-8, `input`, then optionally `\n` and a default domain
/// (else the empty default domain, which refuses the bare forms).
/// Also [`handle::parse_domain`] on the default domain and `FromStr` on the input.
///
/// Asserts: a parsed handle's name and domain are within the length rules and lowercase; its
/// text form (`@name@domain`) parses back to it, with any default domain and by `FromStr`;
/// [`Handle::display_for`] parses back with that default domain; `FromStr` agrees with `parse`
/// on full forms; `parse_domain` is idempotent. Returns whether the handle parsed.
pub fn handle(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let (input, default_domain) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok(domain) = handle::parse_domain(default_domain) {
        assert!(domain.len() <= DOMAIN_MAX_LEN);
        assert_eq!(handle::parse_domain(&domain).as_ref(), Ok(&domain));
    }
    if let Ok(full) = input.parse::<Handle>() {
        assert_eq!(Handle::parse(input, default_domain).as_ref(), Ok(&full));
    }
    let Ok(parsed) = Handle::parse(input, default_domain) else {
        return false;
    };
    assert!((NAME_MIN_LEN..=NAME_MAX_LEN).contains(&parsed.name().len()));
    assert!(parsed.domain().len() <= DOMAIN_MAX_LEN);
    assert!(!parsed.name().bytes().any(|b| b.is_ascii_uppercase()));
    assert!(!parsed.domain().bytes().any(|b| b.is_ascii_uppercase()));
    let text = parsed.to_string();
    assert_eq!(text.parse::<Handle>().as_ref(), Ok(&parsed));
    assert_eq!(Handle::parse(&text, "example.org").as_ref(), Ok(&parsed));
    assert_eq!(
        Handle::parse(&parsed.display_for(default_domain), default_domain).as_ref(),
        Ok(&parsed)
    );
    true
}

/// Public key parsing in every form: `ed25519:<hex>` ([`PublicKey`]'s `FromStr`), the NATS
/// nkey ([`PublicKey::from_nkey`]), 32 raw bytes ([`PublicKey::from_bytes`]), and beside them
/// signatures (`FromStr`) and secret key files ([`SecretKey::from_key_file`]).
///
/// Asserts: one text per key and signature (a parsed one prints as its input); the forms
/// convert into each other and back; a key file's key survives writing and reading. Returns
/// whether any form parsed.
pub fn public_key(data: &[u8]) -> bool {
    let mut accepted = false;
    if let Ok(bytes) = <&[u8; 32]>::try_from(data)
        && let Ok(key) = PublicKey::from_bytes(bytes)
    {
        assert_eq!(key.as_bytes(), bytes);
        check_key(key);
        accepted = true;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return accepted;
    };
    if let Ok(key) = text.parse::<PublicKey>() {
        assert_eq!(key.to_string(), text);
        assert_eq!(key.to_hex(), text["ed25519:".len()..]);
        check_key(key);
        accepted = true;
    }
    if let Ok(key) = PublicKey::from_nkey(text) {
        assert_eq!(key.to_nkey(), text);
        check_key(key);
        accepted = true;
    }
    if let Ok(signature) = text.parse::<Signature>() {
        assert_eq!(signature.to_string(), text);
        accepted = true;
    }
    if let Ok(secret) = SecretKey::from_key_file(text) {
        let again =
            SecretKey::from_key_file(&secret.to_key_file()).expect("a written key file reads");
        assert_eq!(again.public_key(), secret.public_key());
        accepted = true;
    }
    accepted
}

fn check_key(key: PublicKey) {
    assert_eq!(key.to_string().parse::<PublicKey>(), Ok(key));
    assert_eq!(PublicKey::from_nkey(&key.to_nkey()), Ok(key));
    assert_eq!(PublicKey::from_bytes(key.as_bytes()), Ok(key));
    assert_eq!(key.to_nkey().len(), kez_core::key::NKEY_LEN);
}

/// Provider strings (`kez_core::provider`, PROTOCOL.md §9.5). Asserts: an accepted provider is
/// within the limits, names no address twice, and its text form is exactly the input.
pub fn provider(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(provider) = Provider::parse(text) else {
        return false;
    };
    assert!(text.len() <= MAX_PROVIDER_LEN);
    assert!(provider.addrs.len() <= MAX_PROVIDER_ADDRS);
    for (i, addr) in provider.addrs.iter().enumerate() {
        assert!(!provider.addrs[..i].contains(addr));
    }
    assert_eq!(provider.to_string(), text);
    true
}
