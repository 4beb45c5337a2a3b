//! Olm wrapper tests: sessions both ways, replays, pickles, one-time and fallback keys, the
//! message encoding and its refusals.

use super::*;

struct Device {
    key: SecretKey,
    account: OlmAccount,
}

fn device(seed: u8) -> Device {
    Device {
        key: SecretKey::from_seed(&[seed; 32]),
        account: OlmAccount::new(),
    }
}

/// alice's outbound session to bob from one of bob's one-time keys, and bob's one-time key.
fn outbound(alice: &Device, bob: &mut Device) -> (OlmSession, SignedPrekey) {
    let prekey = bob.account.generate_one_time_keys(1, &bob.key)[0];
    let session = alice
        .account
        .create_outbound(&bob.account.identity_key(), &prekey.key)
        .unwrap();
    (session, prekey)
}

#[test]
fn a_session_works_both_ways_pre_key_then_normal() {
    let (alice, mut bob) = (device(1), device(2));
    let (mut to_bob, _) = outbound(&alice, &mut bob);
    assert!(!to_bob.has_received());
    let first = to_bob.encrypt(b"hello bob");
    assert!(first.is_pre_key());
    assert_eq!(first.sender_identity(), Some(alice.account.identity_key()));
    let (mut to_alice, plaintext) = bob
        .account
        .create_inbound(&alice.account.identity_key(), &first)
        .unwrap();
    assert_eq!(plaintext.as_slice(), b"hello bob");
    assert_eq!(to_alice.session_id(), to_bob.session_id());
    assert!(to_alice.has_received());
    assert!(to_alice.matches(&first));

    // Until alice hears back, her messages stay pre-key messages of the same session.
    let second = to_bob.encrypt(b"still there?");
    assert!(second.is_pre_key() && to_alice.matches(&second));
    assert_eq!(
        to_alice.decrypt(&second).unwrap().as_slice(),
        b"still there?"
    );

    let answer = to_alice.encrypt(b"hi alice");
    assert!(!answer.is_pre_key());
    assert!(!to_bob.matches(&answer), "a normal message matches nothing");
    assert_eq!(answer.sender_identity(), None);
    assert_eq!(to_bob.decrypt(&answer).unwrap().as_slice(), b"hi alice");
    assert!(to_bob.has_received());
    let third = to_bob.encrypt(b"normal now");
    assert!(!third.is_pre_key());
    assert_eq!(to_alice.decrypt(&third).unwrap().as_slice(), b"normal now");
}

#[test]
fn out_of_order_messages_decrypt_and_a_replay_does_not() {
    let (alice, mut bob) = (device(1), device(2));
    let (mut to_bob, _) = outbound(&alice, &mut bob);
    let first = to_bob.encrypt(b"0");
    let (mut to_alice, _) = bob
        .account
        .create_inbound(&alice.account.identity_key(), &first)
        .unwrap();
    let answer = to_alice.encrypt(b"ack");
    to_bob.decrypt(&answer).unwrap();
    let messages: Vec<OlmMessage> = (1..=5).map(|i| to_bob.encrypt(&[i])).collect();
    for i in [4, 1, 0, 3, 2] {
        assert_eq!(
            to_alice.decrypt(&messages[i]).unwrap().as_slice(),
            [i as u8 + 1]
        );
    }
    for message in &messages {
        assert_eq!(
            to_alice.decrypt(message),
            Err(OlmError::MissingMessageKey),
            "a replay"
        );
    }
    assert_eq!(
        to_alice.decrypt(&first),
        Err(OlmError::MissingMessageKey),
        "the first message, replayed"
    );
    assert_eq!(
        OlmError::MissingMessageKey.code(),
        "olm_missing_message_key"
    );
}

#[test]
fn a_tampered_message_fails_and_leaves_the_session_working() {
    let (alice, mut bob) = (device(1), device(2));
    let (mut to_bob, _) = outbound(&alice, &mut bob);
    let first = to_bob.encrypt(b"0");
    let (mut to_alice, _) = bob
        .account
        .create_inbound(&alice.account.identity_key(), &first)
        .unwrap();
    let message = to_bob.encrypt(b"secret");
    let OlmMessage::PreKey(bytes) = &message else {
        panic!("pre-key until alice hears back")
    };
    let mut refused = 0;
    for i in 0..bytes.len() {
        let mut changed = bytes.clone();
        changed[i] ^= 0x01;
        let result = to_alice.decrypt(&OlmMessage::PreKey(changed));
        assert!(result.is_err(), "byte {i}");
        refused += 1;
    }
    assert_eq!(refused, bytes.len());
    assert_eq!(to_alice.decrypt(&message).unwrap().as_slice(), b"secret");
}

#[test]
fn a_one_time_key_opens_one_session_only() {
    let (alice, mut bob) = (device(1), device(2));
    let (mut to_bob, _) = outbound(&alice, &mut bob);
    let first = to_bob.encrypt(b"once");
    let mut bob_before = OlmAccount::from_pickle(&bob.account.pickle(&bob.key), &bob.key).unwrap();
    bob.account
        .create_inbound(&alice.account.identity_key(), &first)
        .unwrap();
    assert_eq!(
        bob.account
            .create_inbound(&alice.account.identity_key(), &first)
            .unwrap_err(),
        OlmError::UnknownOneTimeKey
    );
    // The key is used up only by a message that decrypted: a forged one burns nothing.
    let OlmMessage::PreKey(bytes) = &first else {
        panic!()
    };
    let mut forged = bytes.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(
        bob_before
            .create_inbound(&alice.account.identity_key(), &OlmMessage::PreKey(forged))
            .unwrap_err(),
        OlmError::DecryptFailed
    );
    bob_before
        .create_inbound(&alice.account.identity_key(), &first)
        .unwrap();
}

#[test]
fn the_fallback_key_works_without_one_time_keys_and_survives_one_rotation() {
    let (alice, carol, mut bob) = (device(1), device(3), device(2));
    let fallback = bob.account.generate_fallback_key(&bob.key);
    assert_eq!(fallback.kind, PrekeyKind::Fallback);
    fallback
        .verify(&bob.key.public_key(), &bob.account.identity_key())
        .unwrap();
    let bob_identity = bob.account.identity_key();
    for sender in [&alice, &carol] {
        let mut session = sender
            .account
            .create_outbound(&bob_identity, &fallback.key)
            .unwrap();
        let message = session.encrypt(b"via fallback");
        let (_, plaintext) = bob
            .account
            .create_inbound(&sender.account.identity_key(), &message)
            .unwrap();
        assert_eq!(
            plaintext.as_slice(),
            b"via fallback",
            "a fallback key is reused"
        );
    }
    let mut late = alice
        .account
        .create_outbound(&bob_identity, &fallback.key)
        .unwrap();
    let newer = bob.account.generate_fallback_key(&bob.key);
    assert_ne!(newer.key, fallback.key);
    let message = late.encrypt(b"claimed before the new one");
    assert!(
        bob.account
            .create_inbound(&alice.account.identity_key(), &message)
            .is_ok()
    );
    bob.account.generate_fallback_key(&bob.key);
    let mut too_late = alice
        .account
        .create_outbound(&bob_identity, &fallback.key)
        .unwrap();
    assert_eq!(
        bob.account
            .create_inbound(&alice.account.identity_key(), &too_late.encrypt(b"x"))
            .unwrap_err(),
        OlmError::UnknownOneTimeKey,
        "two generations back is forgotten"
    );
}

#[test]
fn prekeys_are_signed_for_the_device_and_account() {
    let mut bob = device(2);
    let keys = bob.account.generate_one_time_keys(5, &bob.key);
    assert_eq!(keys.len(), 5);
    let identity = bob.account.identity_key();
    for key in &keys {
        assert_eq!(key.kind, PrekeyKind::OneTime);
        key.verify(&bob.key.public_key(), &identity).unwrap();
        assert!(key.verify(&device(3).key.public_key(), &identity).is_err());
    }
    let mut distinct: Vec<OlmKey> = keys.iter().map(|key| key.key).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 5);
    assert_eq!(bob.account.max_one_time_keys(), 50);
    assert!(format!("{:?}", bob.account).contains(&identity.to_string()));
}

#[test]
fn a_pre_key_message_from_another_identity_is_refused() {
    let (alice, mallory, mut bob) = (device(1), device(4), device(2));
    let (mut to_bob, _) = outbound(&alice, &mut bob);
    let message = to_bob.encrypt(b"hi");
    let err = bob
        .account
        .create_inbound(&mallory.account.identity_key(), &message)
        .unwrap_err();
    assert_eq!(
        (err.clone(), err.code()),
        (OlmError::WrongIdentity, "olm_wrong_identity")
    );
    // The one-time key is still there for alice.
    bob.account
        .create_inbound(&alice.account.identity_key(), &message)
        .unwrap();
}

#[test]
fn a_normal_message_makes_no_session() {
    let (alice, mut bob) = (device(1), device(2));
    let (mut to_bob, _) = outbound(&alice, &mut bob);
    let first = to_bob.encrypt(b"0");
    let (mut to_alice, _) = bob
        .account
        .create_inbound(&alice.account.identity_key(), &first)
        .unwrap();
    let normal = to_alice.encrypt(b"1");
    assert_eq!(
        bob.account
            .create_inbound(&alice.account.identity_key(), &normal)
            .unwrap_err(),
        OlmError::NotPreKey
    );
}

#[test]
fn non_contributory_keys_are_refused_not_a_panic() {
    let (alice, bob) = (device(1), device(2));
    let zero = OlmKey::from_bytes([0; 32]);
    let good = bob.account.identity_key();
    for (identity, prekey) in [(zero, good), (good, zero), (zero, zero)] {
        let err = alice
            .account
            .create_outbound(&identity, &prekey)
            .unwrap_err();
        assert_eq!(
            (err.clone(), err.code()),
            (OlmError::WeakKey, "olm_weak_key")
        );
    }
}

#[test]
fn pickles_round_trip_and_need_the_device_key() {
    let (alice, mut bob) = (device(1), device(2));
    let (mut to_bob, _) = outbound(&alice, &mut bob);
    let first = to_bob.encrypt(b"0");

    let pickle = bob.account.pickle(&bob.key);
    assert!(!pickle.contains(&bob.account.identity_key().to_string()));
    let wrong = SecretKey::from_seed(&[9; 32]);
    assert_eq!(
        OlmAccount::from_pickle(&pickle, &wrong).unwrap_err(),
        OlmError::BadPickle
    );
    assert_eq!(
        OlmAccount::from_pickle("not a pickle", &bob.key).unwrap_err(),
        OlmError::BadPickle
    );
    let mut restored = OlmAccount::from_pickle(&pickle, &bob.key).unwrap();
    assert_eq!(restored.identity_key(), bob.account.identity_key());
    let (to_alice, _) = restored
        .create_inbound(&alice.account.identity_key(), &first)
        .unwrap();

    let pickle = to_alice.pickle(&bob.key);
    assert_eq!(
        OlmSession::from_pickle(&pickle, &wrong).unwrap_err(),
        OlmError::BadPickle
    );
    assert_eq!(
        OlmAccount::from_pickle(&pickle, &bob.key).unwrap_err(),
        OlmError::BadPickle,
        "a session's pickle is not an account's"
    );
    let mut to_alice = OlmSession::from_pickle(&pickle, &bob.key).unwrap();
    assert_eq!(to_alice.session_id(), to_bob.session_id());
    assert!(format!("{to_alice:?}").contains(&to_alice.session_id()));
    let answer = to_alice.encrypt(b"restored");
    assert_eq!(to_bob.decrypt(&answer).unwrap().as_slice(), b"restored");
    // The pickle key is HKDF-SHA256(seed, info KEZ-OLM-PICKLE-V1), nothing else.
    let mut expected = [0u8; 32];
    Hkdf::<Sha256>::new(None, &[2; 32])
        .expand(b"KEZ-OLM-PICKLE-V1", &mut expected)
        .unwrap();
    assert_eq!(*pickle_key(&bob.key), expected);
}

#[test]
fn messages_encode_with_a_type_byte_and_decode_strictly() {
    let (alice, mut bob) = (device(1), device(2));
    let (mut to_bob, _) = outbound(&alice, &mut bob);
    let first = to_bob.encrypt(b"0");
    let bytes = first.to_bytes();
    assert_eq!(bytes[0], OLM_TYPE_PRE_KEY);
    assert_eq!(OlmMessage::from_bytes(&bytes).unwrap(), first);
    let (mut to_alice, _) = bob
        .account
        .create_inbound(&alice.account.identity_key(), &first)
        .unwrap();
    let normal = to_alice.encrypt(b"1");
    let normal_bytes = normal.to_bytes();
    assert_eq!(normal_bytes[0], OLM_TYPE_NORMAL);
    assert_eq!(OlmMessage::from_bytes(&normal_bytes).unwrap(), normal);

    let malformed = |bytes: &[u8]| {
        let err = OlmMessage::from_bytes(bytes).unwrap_err();
        assert_eq!(err.code(), "olm_malformed", "{bytes:?}");
    };
    malformed(&[]);
    malformed(&[0]);
    malformed(&[1]);
    malformed(&[2, 4, 0, 0]);
    let mut wrong_type = bytes.clone();
    wrong_type[0] = OLM_TYPE_NORMAL;
    malformed(&wrong_type);
    // Every truncation is refused.
    for len in 1..bytes.len() {
        malformed(&bytes[..len]);
    }
    // Version 1's truncated-MAC messages are not KEZ's.
    let mut version_1 = normal_bytes.clone();
    version_1[1] = 3;
    malformed(&version_1);
    // One byte form: an extra protobuf field (tag 5, varint 0) before the MAC is refused.
    let mut extra = normal_bytes[..normal_bytes.len() - 32].to_vec();
    extra.extend_from_slice(&[0x28, 0x00]);
    extra.extend_from_slice(&normal_bytes[normal_bytes.len() - 32..]);
    malformed(&extra);
    let mut huge = vec![OLM_TYPE_NORMAL];
    huge.resize(MAX_OLM_MESSAGE_BYTES + 1, 0);
    malformed(&huge);
    // Values built around bad bytes are refused where they are used.
    assert_eq!(OlmMessage::PreKey(vec![3]).sender_identity(), None);
    assert!(!to_alice.matches(&OlmMessage::PreKey(vec![])));
    assert_eq!(
        to_alice
            .decrypt(&OlmMessage::Normal(vec![4, 1]))
            .unwrap_err()
            .code(),
        "olm_malformed"
    );
    assert_eq!(
        bob.account
            .create_inbound(&alice.account.identity_key(), &OlmMessage::PreKey(vec![]))
            .unwrap_err()
            .code(),
        "olm_malformed"
    );
}

#[test]
fn every_error_has_a_distinct_code() {
    let all = [
        OlmError::Malformed(String::new()),
        OlmError::DecryptFailed,
        OlmError::MissingMessageKey,
        OlmError::MessageGap,
        OlmError::WeakKey,
        OlmError::UnknownOneTimeKey,
        OlmError::WrongIdentity,
        OlmError::WrongSession,
        OlmError::NotPreKey,
        OlmError::BadPickle,
    ];
    let mut codes: Vec<&str> = all.iter().map(OlmError::code).collect();
    assert!(codes.iter().all(|code| code.starts_with("olm_")));
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), all.len());
}
