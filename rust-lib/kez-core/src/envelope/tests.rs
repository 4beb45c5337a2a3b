//! Envelope tests and the committed vectors (`vectors/envelope/*.json`, PROTOCOL.md §8).
//! `make vectors` (KEZ_REGEN_VECTORS=1) rewrites the vectors; otherwise the test fails when
//! regeneration would change a byte.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::*;

/// 2026-01-01T00:00:00Z, as in the sigchain vectors.
const T0: u64 = 1_767_225_600;

fn seed(label: &str, name: &str) -> [u8; 32] {
    Sha256::digest(format!("kez test vector {label}: {name}")).into()
}

fn key(name: &str) -> SecretKey {
    SecretKey::from_seed(&seed("key", name))
}

fn id(name: &str) -> MessageId {
    MessageId::from_bytes(seed("id", name)[..16].try_into().unwrap())
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn sealed(name: &str, from: &str, to: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    seal_with_fixed_randomness(
        &key(from),
        &key(to).public_key(),
        content_type,
        body,
        T0,
        id(name),
        &seed("ephemeral", name),
    )
    .unwrap()
}

/// The plaintext of a message with the given header fields, signed by `signer`.
fn plaintext(header: &Value, body: &[u8], signer: &str) -> Vec<u8> {
    let header = canonical::encode(header).unwrap();
    let signature = key(signer).sign(SignatureDomain::Message, &signed_body(&header, body));
    let mut out = (header.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    out.extend_from_slice(&signature.to_bytes());
    out
}

fn header(name: &str, from: &str, to: &str) -> Value {
    json!({
        "v": 1,
        "from": key(from).public_key(),
        "to": key(to).public_key(),
        "id": id(name),
        "time": T0,
        "content_type": "text",
    })
}

struct Vector {
    name: &'static str,
    description: &'static str,
    opener: &'static str,
    envelope: Vec<u8>,
}

fn vectors() -> Vec<Vector> {
    let hello = b"hello bob".as_slice();
    let good = sealed("good-text", "alice", "bob", "text", hello);
    let mut tampered = good.clone();
    tampered[60] ^= 0x01;
    let mut future = good.clone();
    future[0] = 2;
    let forwarded = encrypt(
        &key("carol").public_key(),
        &seed("ephemeral", "forwarded"),
        &plaintext(&header("forwarded", "alice", "bob"), hello, "alice"),
    )
    .unwrap();
    let impostor = encrypt(
        &key("bob").public_key(),
        &seed("ephemeral", "bad_signature"),
        &plaintext(&header("bad_signature", "alice", "bob"), hello, "mallory"),
    )
    .unwrap();
    let mut bad_header = header("malformed", "alice", "bob");
    bad_header["content_type"] = json!("Text/Plain");
    let malformed = encrypt(
        &key("bob").public_key(),
        &seed("ephemeral", "malformed"),
        &plaintext(&bad_header, hello, "alice"),
    )
    .unwrap();
    let mut weak = vec![ENVELOPE_VERSION];
    weak.extend_from_slice(&[0u8; 32]);
    weak.extend_from_slice(&[0x55; 100]);
    vec![
        Vector {
            name: "good-text",
            description: "alice to bob: text 'hello bob'",
            opener: "bob",
            envelope: good.clone(),
        },
        Vector {
            name: "good-binary",
            description: "alice to bob: 300 bytes 0..=255,0..=43 as content type file_offer",
            opener: "bob",
            envelope: sealed(
                "good-binary",
                "alice",
                "bob",
                "file_offer",
                &(0..300).map(|i| i as u8).collect::<Vec<_>>(),
            ),
        },
        Vector {
            name: "decryption_failed-wrong-recipient",
            description: "good-text opened by carol",
            opener: "carol",
            envelope: good.clone(),
        },
        Vector {
            name: "decryption_failed-tampered",
            description: "good-text with byte 60 flipped",
            opener: "bob",
            envelope: tampered,
        },
        Vector {
            name: "wrong_recipient",
            description: "alice's message signed for bob, re-encrypted by bob to carol (forwarding)",
            opener: "carol",
            envelope: forwarded,
        },
        Vector {
            name: "bad_signature",
            description: "header says from alice, signed by mallory",
            opener: "bob",
            envelope: impostor,
        },
        Vector {
            name: "malformed",
            description: "header content_type 'Text/Plain' (uppercase)",
            opener: "bob",
            envelope: malformed,
        },
        Vector {
            name: "truncated",
            description: "the first 80 bytes of good-text",
            opener: "bob",
            envelope: good[..80].to_vec(),
        },
        Vector {
            name: "unknown_version",
            description: "good-text with version byte 2",
            opener: "bob",
            envelope: future,
        },
        Vector {
            name: "weak_key",
            description: "ephemeral public key all zero (small order): the shared secret is zero",
            opener: "bob",
            envelope: weak,
        },
    ]
}

fn render(vector: &Vector) -> String {
    let expect = match open(&key(vector.opener), &vector.envelope) {
        Ok(message) => json!({"ok": {
            "from": message.from,
            "to": message.to,
            "id": message.id,
            "time": message.time,
            "content_type": message.content_type,
            "body_hex": hex(&message.body),
        }}),
        Err(err) => json!({"error": err.code()}),
    };
    let value = json!({
        "name": vector.name,
        "description": vector.description,
        "keys": {
            "alice": hex(&seed("key", "alice")),
            "bob": hex(&seed("key", "bob")),
            "carol": hex(&seed("key", "carol")),
            "mallory": hex(&seed("key", "mallory")),
        },
        "opener": vector.opener,
        "envelope_hex": hex(&vector.envelope),
        "expect": expect,
    });
    serde_json::to_string_pretty(&value).unwrap() + "\n"
}

#[test]
fn committed_vectors_are_reproduced_and_name_each_failure() {
    let vectors = vectors();
    let rendered: Vec<(String, String)> = vectors
        .iter()
        .map(|vector| (vector.name.to_string(), render(vector)))
        .collect();
    crate::committed_vectors::check("envelope", &rendered, |error| error);
}

#[test]
fn seal_and_open_round_trip() {
    let (alice, bob) = (SecretKey::generate(), SecretKey::generate());
    let (id, envelope) = seal(&alice, &bob.public_key(), "text", b"hi", 42).unwrap();
    let message = open(&bob, &envelope).unwrap();
    assert_eq!(message.from, alice.public_key());
    assert_eq!(message.to, bob.public_key());
    assert_eq!((message.id, message.time), (id, 42));
    assert_eq!(
        (message.content_type.as_str(), message.body.as_slice()),
        ("text", &b"hi"[..])
    );
    let header_len = u32::from_be_bytes(open_plaintext_len(&bob, &envelope)) as usize;
    assert_eq!(
        envelope.len(),
        ENVELOPE_FRAME + PLAINTEXT_FRAME + header_len + 2
    );
    // Two seals of the same message share nothing an observer could link.
    let (other_id, again) = seal(&alice, &bob.public_key(), "text", b"hi", 42).unwrap();
    assert_ne!(other_id, id);
    assert_ne!(again[1..33], envelope[1..33]);
}

fn open_plaintext_len(recipient: &SecretKey, envelope: &[u8]) -> [u8; 4] {
    decrypt(recipient, envelope).unwrap()[..4]
        .try_into()
        .unwrap()
}

#[test]
fn every_single_byte_change_is_refused() {
    let (alice, bob) = (key("alice"), key("bob"));
    let envelope = sealed("good-text", "alice", "bob", "text", b"hello bob");
    for i in 0..envelope.len() {
        let mut changed = envelope.clone();
        changed[i] ^= 0x80;
        assert!(open(&bob, &changed).is_err(), "byte {i}");
    }
    assert_eq!(open(&bob, &envelope).unwrap().from, alice.public_key());
}

#[test]
fn oversized_messages_are_refused_both_ways() {
    let (alice, bob) = (key("alice"), key("bob"));
    let body = vec![0u8; MAX_ENVELOPE_BYTES];
    assert!(matches!(
        seal(&alice, &bob.public_key(), "text", &body, T0),
        Err(EnvelopeError::TooLarge { .. })
    ));
    let huge = vec![ENVELOPE_VERSION; MAX_ENVELOPE_BYTES + 1];
    assert!(matches!(
        open(&bob, &huge),
        Err(EnvelopeError::TooLarge { .. })
    ));
    assert_eq!(open(&bob, &[]), Err(EnvelopeError::Truncated));
}

#[test]
fn a_header_length_past_the_end_is_truncation_not_a_panic() {
    let bob = key("bob");
    let mut plaintext = u32::MAX.to_be_bytes().to_vec();
    plaintext.extend_from_slice(&[0u8; 100]);
    let envelope = encrypt(&bob.public_key(), &seed("ephemeral", "x"), &plaintext).unwrap();
    assert!(matches!(
        open(&bob, &envelope),
        Err(EnvelopeError::Malformed(_))
    ));
    let mut plaintext = 500u32.to_be_bytes().to_vec();
    plaintext.extend_from_slice(&[b'{'; 100]);
    let envelope = encrypt(&bob.public_key(), &seed("ephemeral", "y"), &plaintext).unwrap();
    assert_eq!(open(&bob, &envelope), Err(EnvelopeError::Truncated));
}

#[test]
fn the_largest_body_fits_and_one_more_byte_does_not() {
    for time in [0, T0, 9_007_199_254_740_991] {
        for content_type in ["text", "file-offer", "x"] {
            let max = max_body_len(content_type, time).unwrap();
            let body = vec![0x41; max];
            let sealed = seal(
                &key("alice"),
                &key("bob").public_key(),
                content_type,
                &body,
                time,
            )
            .unwrap()
            .1;
            assert_eq!(sealed.len(), MAX_ENVELOPE_BYTES, "{content_type} at {time}");
            let one_more = vec![0x41; max + 1];
            assert!(matches!(
                seal(
                    &key("alice"),
                    &key("bob").public_key(),
                    content_type,
                    &one_more,
                    time
                ),
                Err(EnvelopeError::TooLarge { .. })
            ));
        }
    }
    assert_eq!(max_body_len("", T0), None);
}
