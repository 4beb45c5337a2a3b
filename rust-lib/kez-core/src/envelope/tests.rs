//! Envelope tests and the committed vectors (`vectors/envelope/*.json`, PROTOCOL.md §8, and
//! `vectors/envelope-v2/*.json`, §15.5).
//! `make vectors` (KEZ_REGEN_VECTORS=1) rewrites the vectors; otherwise the test fails when
//! regeneration would change a byte.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::*;
use crate::olm::OlmAccount;

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
    // max_body_len leaves room for version 2's bound, so version 1 has that much to spare.
    let spare = ENVELOPE_V2_OVERHEAD_BOUND - ENVELOPE_FRAME;
    for time in [0, T0, 9_007_199_254_740_991] {
        for content_type in ["text", "file-offer", "x"] {
            let max = max_body_len(content_type, time).unwrap();
            let seal_v1 = |len: usize| {
                seal(
                    &key("alice"),
                    &key("bob").public_key(),
                    content_type,
                    &vec![0x41; len],
                    time,
                )
            };
            assert_eq!(
                seal_v1(max).unwrap().1.len(),
                MAX_ENVELOPE_BYTES - spare,
                "{content_type} at {time}"
            );
            assert_eq!(seal_v1(max + spare).unwrap().1.len(), MAX_ENVELOPE_BYTES);
            assert!(matches!(
                seal_v1(max + spare + 1),
                Err(EnvelopeError::TooLarge { .. })
            ));

            let (mut session, _, _) = session_pair();
            let sealed = seal_olm_to_bob(&mut session, content_type, &vec![0x41; max], time);
            assert!(sealed.unwrap().len() <= MAX_ENVELOPE_BYTES);
            let refused = seal_olm_to_bob(&mut session, content_type, &vec![0x41; max + 1], time);
            assert!(matches!(refused, Err(EnvelopeError::TooLarge { .. })));
        }
    }
    assert_eq!(max_body_len("", T0), None);
}

/// alice's outbound Olm session to bob's account, bob's account, and the prekey it used.
fn session_pair() -> (OlmSession, OlmAccount, OlmAccount) {
    let alice = OlmAccount::new();
    let mut bob = OlmAccount::new();
    let prekey = bob.generate_one_time_keys(1, &key("bob"))[0];
    let session = alice
        .create_outbound(&bob.identity_key(), &prekey.key)
        .unwrap();
    (session, alice, bob)
}

fn seal_olm_to_bob(
    session: &mut OlmSession,
    content_type: &str,
    body: &[u8],
    time: u64,
) -> Result<Vec<u8>, EnvelopeError> {
    seal_olm(
        &key("alice"),
        &key("bob").public_key(),
        session,
        content_type,
        body,
        time,
        id("v2"),
    )
}

fn olm_outer(opened: Opened) -> OlmEnvelope {
    match opened {
        Opened::Olm(outer) => outer,
        Opened::Sealed(message) => panic!("version 1: {message:?}"),
    }
}

#[test]
fn the_v2_overhead_bound_holds() {
    let (mut session, alice_account, mut bob_account) = session_pair();
    let (alice, bob) = (key("alice"), key("bob"));
    let max = max_body_len("text", T0).unwrap();
    let mut measured = Vec::new();
    for len in [0, 1, 15, 16, 17, 1000, max] {
        let body = vec![7; len];
        let plaintext_len =
            signed_plaintext(&alice, &bob.public_key(), 2, "text", &body, T0, id("x"))
                .unwrap()
                .len();
        let envelope = seal_olm_to_bob(&mut session, "text", &body, T0).unwrap();
        let overhead = envelope.len() - plaintext_len;
        assert!(overhead <= ENVELOPE_V2_OVERHEAD_BOUND, "{len}: {overhead}");
        measured.push(overhead);
    }
    // At the largest body every length takes its 3 varint bytes: the bound is loose only
    // by the chain index (1 byte here, 10 at most) and the padding (16 at most).
    let at_max = *measured.last().unwrap();
    assert!(
        at_max + 9 + 15 >= ENVELOPE_V2_OVERHEAD_BOUND,
        "{measured:?}"
    );
    // Normal messages are smaller.
    let first = seal_olm_to_bob(&mut session, "text", b"x", T0).unwrap();
    let outer = olm_outer(open_outer(&bob, &first).unwrap());
    let (mut bob_session, _) = bob_account
        .create_inbound(&alice_account.identity_key(), &outer.message)
        .unwrap();
    let reply = bob_session.encrypt(b"ack");
    session.decrypt(&reply).unwrap();
    let normal = seal_olm_to_bob(&mut session, "text", &vec![7; max], T0).unwrap();
    assert!(normal.len() < MAX_ENVELOPE_BYTES - 100);
    assert_eq!(ENVELOPE_V2_OVERHEAD_BOUND, 303);
}

#[test]
fn a_v2_envelope_opens_in_two_steps_both_ways() {
    let (mut to_bob, alice_account, mut bob_account) = session_pair();
    let (alice, bob) = (key("alice"), key("bob"));
    let envelope = seal_olm_to_bob(&mut to_bob, "text", b"hello bob", T0).unwrap();
    assert_eq!(envelope[0], ENVELOPE_VERSION_OLM);
    assert_eq!(outer_id(&envelope), Some(id("v2")));
    let outer = olm_outer(open_outer(&bob, &envelope).unwrap());
    assert_eq!((outer.id, outer.sender), (id("v2"), alice.public_key()));
    assert!(outer.message.is_pre_key());
    assert_eq!(
        outer.message.sender_identity(),
        Some(alice_account.identity_key())
    );
    let (mut to_alice, plaintext) = bob_account
        .create_inbound(&alice_account.identity_key(), &outer.message)
        .unwrap();
    let message = open_inner(&bob.public_key(), &outer, &plaintext).unwrap();
    assert_eq!(
        message,
        Message {
            from: alice.public_key(),
            to: bob.public_key(),
            id: id("v2"),
            time: T0,
            content_type: "text".into(),
            body: b"hello bob".to_vec(),
        }
    );

    let reply = seal_olm(
        &bob,
        &alice.public_key(),
        &mut to_alice,
        "text",
        b"hi alice",
        T0 + 1,
        id("reply"),
    )
    .unwrap();
    let outer = olm_outer(open_outer(&alice, &reply).unwrap());
    assert!(!outer.message.is_pre_key());
    let plaintext = to_bob.decrypt(&outer.message).unwrap();
    let message = open_inner(&alice.public_key(), &outer, &plaintext).unwrap();
    assert_eq!(
        (message.from, message.body.as_slice()),
        (bob.public_key(), &b"hi alice"[..])
    );

    // A version 1 envelope opens in full through the same door.
    let v1 = sealed("good-text", "alice", "bob", "text", b"hello bob");
    assert_eq!(outer_id(&v1), None);
    assert_eq!(
        open_outer(&bob, &v1).unwrap(),
        Opened::Sealed(open(&bob, &v1).unwrap())
    );
}

#[test]
fn versions_never_pass_for_each_other() {
    let (alice, bob) = (key("alice"), key("bob"));
    let (mut session, _, _) = session_pair();
    let v2 = seal_olm_to_bob(&mut session, "text", b"x", T0).unwrap();
    assert_eq!(
        open(&bob, &v2),
        Err(EnvelopeError::UnknownVersion { version: 2 })
    );

    // A version 1 envelope around a header that says 2, and the reverse.
    let inner_v2 =
        signed_plaintext(&alice, &bob.public_key(), 2, "text", b"x", T0, id("x")).unwrap();
    let v1_of_v2 = encrypt(&bob.public_key(), &seed("ephemeral", "x"), &inner_v2).unwrap();
    assert_eq!(
        open(&bob, &v1_of_v2),
        Err(EnvelopeError::UnknownVersion { version: 2 })
    );
    assert_eq!(
        open_outer(&bob, &v1_of_v2),
        Err(EnvelopeError::UnknownVersion { version: 2 })
    );
    let inner_v1 =
        signed_plaintext(&alice, &bob.public_key(), 1, "text", b"x", T0, id("x")).unwrap();
    let outer = OlmEnvelope {
        id: id("x"),
        sender: alice.public_key(),
        message: OlmMessage::Normal(Vec::new()),
    };
    assert_eq!(
        open_inner(&bob.public_key(), &outer, &inner_v1),
        Err(EnvelopeError::UnknownVersion { version: 1 })
    );
    assert!(open_inner(&bob.public_key(), &outer, &inner_v2).is_ok());
    let mut future = v2.clone();
    future[0] = 3;
    assert_eq!(
        open_outer(&bob, &future),
        Err(EnvelopeError::UnknownVersion { version: 3 })
    );
}

#[test]
fn open_inner_checks_every_link_to_the_outer_layer() {
    let (alice, bob, carol, mallory) = (key("alice"), key("bob"), key("carol"), key("mallory"));
    let outer = OlmEnvelope {
        id: id("x"),
        sender: alice.public_key(),
        message: OlmMessage::Normal(Vec::new()),
    };
    let signed = |signer: &SecretKey, to: &SecretKey, id: MessageId| {
        signed_plaintext(signer, &to.public_key(), 2, "text", b"x", T0, id).unwrap()
    };
    let cases = [
        (
            signed(&alice, &carol, id("x")),
            EnvelopeError::WrongRecipient,
        ),
        (signed(&carol, &bob, id("x")), EnvelopeError::SenderMismatch),
        (signed(&alice, &bob, id("y")), EnvelopeError::IdMismatch),
    ];
    for (plaintext, expected) in cases {
        assert_eq!(
            open_inner(&bob.public_key(), &outer, &plaintext),
            Err(expected)
        );
    }
    // mallory signs a header naming alice.
    let mut forged = signed(&alice, &bob, id("x")).to_vec();
    let header_len = u32::from_be_bytes(forged[..4].try_into().unwrap()) as usize;
    let body_end = forged.len() - 64;
    let signature = mallory.sign(
        SignatureDomain::Message,
        &signed_body(
            &forged[4..4 + header_len],
            &forged[4 + header_len..body_end],
        ),
    );
    forged[body_end..].copy_from_slice(&signature.to_bytes());
    assert_eq!(
        open_inner(&bob.public_key(), &outer, &forged),
        Err(EnvelopeError::BadSignature)
    );
    assert_eq!(
        open_inner(&bob.public_key(), &outer, &[0, 0]),
        Err(EnvelopeError::Truncated)
    );
    assert_eq!(EnvelopeError::SenderMismatch.code(), "sender_mismatch");
    assert_eq!(EnvelopeError::IdMismatch.code(), "id_mismatch");
}

#[test]
fn every_single_byte_change_of_a_v2_envelope_is_refused() {
    let bob = key("bob");
    let (mut session, _, _) = session_pair();
    let envelope = seal_olm_to_bob(&mut session, "text", b"hello bob", T0).unwrap();
    for i in 0..envelope.len() {
        let mut changed = envelope.clone();
        changed[i] ^= 0x80;
        let err = open_outer(&bob, &changed).unwrap_err();
        let expected = match i {
            0 => "unknown_version",
            _ => "decryption_failed",
        };
        assert_eq!(err.code(), expected, "byte {i}");
    }
    // The clear id is bound: another id is refused, not reported.
    let mut other_id = envelope.clone();
    other_id[1..17].copy_from_slice(id("other").as_bytes());
    assert_eq!(outer_id(&other_id), Some(id("other")));
    assert_eq!(
        open_outer(&bob, &other_id),
        Err(EnvelopeError::DecryptionFailed)
    );
    assert!(open_outer(&bob, &envelope).is_ok());
    assert_eq!(
        open_outer(&key("carol"), &envelope),
        Err(EnvelopeError::DecryptionFailed)
    );
}

#[test]
fn hostile_v2_frames_are_refused_not_a_panic() {
    let (alice, bob) = (key("alice"), key("bob"));
    assert_eq!(open_outer(&bob, &[]), Err(EnvelopeError::Truncated));
    for len in 1..ENVELOPE_V2_FRAME + OUTER_PREFIX {
        assert_eq!(
            open_outer(&bob, &vec![2; len]),
            Err(EnvelopeError::Truncated),
            "{len}"
        );
    }
    let mut weak = vec![2];
    weak.extend_from_slice(&[9; 16]);
    weak.extend_from_slice(&[0; 32]);
    weak.extend_from_slice(&[0x55; 100]);
    assert_eq!(open_outer(&bob, &weak), Err(EnvelopeError::WeakKey));
    let huge = vec![2; MAX_ENVELOPE_BYTES + 1];
    assert!(matches!(
        open_outer(&bob, &huge),
        Err(EnvelopeError::TooLarge { .. })
    ));
    assert_eq!(outer_id(&huge), None);
    assert_eq!(outer_id(&[2; 16]), None);
    assert_eq!(outer_id(&[2; 17]), Some(MessageId::from_bytes([2; 16])));
    assert_eq!(outer_id(&[1; 100]), None);

    // A sealed outer layer whose Olm message is garbage, or whose sender is no key.
    let seal_outer = |outer: &[u8]| {
        let ephemeral_secret = seed("ephemeral", "outer");
        let message = OlmMessage::Normal(outer.to_vec());
        seal_olm_outer_with_fixed_randomness(
            &bob.public_key(),
            id("x"),
            &alice.public_key(),
            &message,
            &ephemeral_secret,
        )
        .unwrap()
    };
    assert!(matches!(
        open_outer(&bob, &seal_outer(&[4, 1, 2, 3])),
        Err(EnvelopeError::Malformed(_))
    ));
    assert!(matches!(
        seal_olm_outer_with_fixed_randomness(
            &PublicKey::from_bytes(&[0; 32]).unwrap_or(bob.public_key()),
            id("x"),
            &alice.public_key(),
            &OlmMessage::Normal(vec![0; MAX_ENVELOPE_BYTES]),
            &seed("ephemeral", "outer"),
        ),
        Err(EnvelopeError::TooLarge { .. })
    ));
}

/// A well-formed Olm version 2 message with fixed bytes, for the vectors: Olm draws its keys
/// from the OS inside vodozemac, so the vectors pin the outer layer around fixed Olm bytes and
/// the inner signed plaintext separately. The ciphertext decrypts under no session.
fn fixed_olm_message(pre_key: bool) -> OlmMessage {
    let field = |tag: u8, bytes: &[u8]| {
        let mut out = vec![tag, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    };
    let mut inner = vec![4];
    inner.extend(field(0x0a, &seed("olm ratchet key", "v2")));
    inner.extend([0x10, 0x00]);
    inner.extend(field(0x22, &seed("olm ciphertext", "v2")));
    inner.extend_from_slice(&seed("olm mac", "v2"));
    let message = if pre_key {
        let mut outer = vec![3];
        outer.extend(field(0x0a, &seed("olm one-time key", "v2")));
        outer.extend(field(0x12, &seed("olm base key", "v2")));
        outer.extend(field(0x1a, &seed("olm identity key", "alice")));
        outer.extend(field(0x22, &inner));
        OlmMessage::PreKey(outer)
    } else {
        OlmMessage::Normal(inner)
    };
    OlmMessage::from_bytes(&message.to_bytes()).expect("the fixed message is well formed")
}

struct VectorV2 {
    name: &'static str,
    description: &'static str,
    opener: &'static str,
    envelope: Vec<u8>,
    /// What the opener's Olm session gives for the envelope's Olm message.
    olm_plaintext: Vec<u8>,
}

fn header_v2(name: &str, from: &str, to: &str) -> Value {
    let mut header = header(name, from, to);
    header["v"] = json!(2);
    header
}

/// An envelope v2 from `sender` (the outer layer's) to `to`, with the case's id and
/// ephemeral key, around the fixed Olm message.
fn sealed_v2(name: &str, sender: &str, to: &str, message: &OlmMessage) -> Vec<u8> {
    seal_olm_outer_with_fixed_randomness(
        &key(to).public_key(),
        id(name),
        &key(sender).public_key(),
        message,
        &seed("ephemeral", name),
    )
    .unwrap()
}

fn vectors_v2() -> Vec<VectorV2> {
    let pre_key = fixed_olm_message(true);
    let good = sealed_v2("good-text", "alice", "bob", &pre_key);
    let good_plaintext = plaintext(
        &header_v2("good-text", "alice", "bob"),
        b"hello bob",
        "alice",
    );
    let with = |name: &'static str, description: &'static str, envelope: Vec<u8>| VectorV2 {
        name,
        description,
        opener: "bob",
        envelope,
        olm_plaintext: good_plaintext.clone(),
    };
    let edited = |index: usize, xor: u8| {
        let mut envelope = good.clone();
        envelope[index] ^= xor;
        envelope
    };
    let inner = |name: &'static str, description: &'static str, plaintext: Vec<u8>| VectorV2 {
        name,
        description,
        opener: "bob",
        envelope: sealed_v2(name, "alice", "bob", &pre_key),
        olm_plaintext: plaintext,
    };
    let binary: Vec<u8> = (0..300).map(|i| i as u8).collect();
    let mut binary_header = header_v2("good-binary", "alice", "bob");
    binary_header["content_type"] = json!("file_offer");
    let mut v1_header = header("unknown_version-inner-v1", "alice", "bob");
    v1_header["v"] = json!(1);
    let mut malformed_header = header_v2("malformed", "alice", "bob");
    malformed_header["content_type"] = json!("Text/Plain");
    let mut weak = vec![ENVELOPE_VERSION_OLM];
    weak.extend_from_slice(id("weak_key").as_bytes());
    weak.extend_from_slice(&[0; 32]);
    weak.extend_from_slice(&[0x55; 100]);
    let mut future = good.clone();
    future[0] = 3;
    vec![
        VectorV2 {
            name: "good-text",
            description: "alice's `hello bob` to bob around a pre-key Olm message",
            opener: "bob",
            envelope: good.clone(),
            olm_plaintext: good_plaintext.clone(),
        },
        VectorV2 {
            name: "good-binary",
            description: "300 bytes i mod 256 around a normal Olm message",
            opener: "bob",
            envelope: sealed_v2("good-binary", "alice", "bob", &fixed_olm_message(false)),
            olm_plaintext: plaintext(&binary_header, &binary, "alice"),
        },
        with(
            "decryption_failed-id",
            "good-text with another clear id (byte 1 flipped): the AEAD binds it",
            edited(1, 0x01),
        ),
        with(
            "decryption_failed-tampered",
            "good-text with byte 80 flipped",
            edited(80, 0x01),
        ),
        VectorV2 {
            name: "decryption_failed-wrong-recipient",
            description: "good-text opened by carol",
            opener: "carol",
            envelope: good.clone(),
            olm_plaintext: good_plaintext.clone(),
        },
        with("unknown_version", "good-text with byte 0 = 3", future),
        with(
            "truncated",
            "the first 97 bytes of good-text",
            good[..97].to_vec(),
        ),
        with(
            "weak_key",
            "an all-zero ephemeral public key: the shared secret is zero",
            weak,
        ),
        with(
            "malformed-olm",
            "the sealed outer layer carries a normal Olm message of 4 bytes, not a message",
            sealed_v2(
                "malformed-olm",
                "alice",
                "bob",
                &OlmMessage::Normal(vec![4, 1, 2, 3]),
            ),
        ),
        VectorV2 {
            name: "sender_mismatch",
            description: "the outer layer names carol; alice signed the inside",
            opener: "bob",
            envelope: sealed_v2("sender_mismatch", "carol", "bob", &pre_key),
            olm_plaintext: plaintext(
                &header_v2("sender_mismatch", "alice", "bob"),
                b"hi",
                "alice",
            ),
        },
        inner(
            "id_mismatch",
            "the signed header's id is good-text's, not the envelope's",
            good_plaintext.clone(),
        ),
        inner(
            "wrong_recipient",
            "alice signed for carol; the envelope is sealed to bob",
            plaintext(
                &header_v2("wrong_recipient", "alice", "carol"),
                b"hi",
                "alice",
            ),
        ),
        inner(
            "bad_signature",
            "mallory signed a header naming alice",
            plaintext(
                &header_v2("bad_signature", "alice", "bob"),
                b"hi",
                "mallory",
            ),
        ),
        inner(
            "unknown_version-inner-v1",
            "the signed header says v 1 inside a version 2 envelope",
            plaintext(&v1_header, b"hi", "alice"),
        ),
        inner(
            "malformed",
            "the signed header's content type is Text/Plain",
            plaintext(&malformed_header, b"hi", "alice"),
        ),
    ]
}

/// Opens a v2 vector as a receiver would: the outer layer, then (in place of the Olm session)
/// the vector's plaintext through `open_inner`.
fn open_v2(vector: &VectorV2) -> Result<(OlmEnvelope, Message), EnvelopeError> {
    let recipient = key(vector.opener);
    let outer = olm_outer(open_outer(&recipient, &vector.envelope)?);
    let message = open_inner(&recipient.public_key(), &outer, &vector.olm_plaintext)?;
    Ok((outer, message))
}

fn render_v2(vector: &VectorV2) -> String {
    let expect = match open_v2(vector) {
        Ok((outer, message)) => {
            let olm = outer.message.to_bytes();
            json!({"ok": {
                "id": outer.id,
                "sender": outer.sender,
                "olm_type": olm[0],
                "olm_message_hex": hex(&olm[1..]),
                "from": message.from,
                "to": message.to,
                "time": message.time,
                "content_type": message.content_type,
                "body_hex": hex(&message.body),
            }})
        }
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
        "olm_plaintext_hex": hex(&vector.olm_plaintext),
        "expect": expect,
    });
    serde_json::to_string_pretty(&value).unwrap() + "\n"
}

#[test]
fn committed_v2_vectors_are_reproduced_and_name_each_failure() {
    let vectors = vectors_v2();
    let rendered: Vec<(String, String)> = vectors
        .iter()
        .map(|vector| (vector.name.to_string(), render_v2(vector)))
        .collect();
    crate::committed_vectors::check("envelope-v2", &rendered, |error| error);
}
