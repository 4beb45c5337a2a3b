//! Encoding user JWTs and authorization responses: they decode back to what was meant, in the
//! shape nats-server reads, and what nats-server would refuse is refused before signing.

mod common;

use std::time::Duration;

use common::{NOW, Setup};
use data_encoding::BASE32_NOPAD;
use kez_nats_jwt::{
    Decision, JwtError, NkeyKind, UserClaims, decode_any, decode_authorization_request,
    encode_authorization_response, encode_authorization_response_for, encode_user_jwt,
};
use nkeys::KeyPair;
use serde_json::json;
use sha2::{Digest, Sha512_256};

fn profile(user_nkey: &str) -> UserClaims {
    UserClaims::new(user_nkey, "APP", NOW)
        .with_name("alice")
        .with_expiry(NOW + 3600)
        .allow_publish(["kez.registry.>", "kez.inbox.*"])
        .deny_publish(["$JS.API.>"])
        .allow_subscribe(["_INBOX.alice.>", "kez.work q1"])
        .deny_subscribe(["$SYS.>"])
        .allow_responses(1, Duration::from_secs(5))
        .with_max_subscriptions(100)
        .with_max_data(1 << 20)
        .with_max_payload(65536)
}

#[test]
fn a_user_jwt_decodes_to_the_claims_it_was_made_from() {
    let s = Setup::new();
    let jwt = encode_user_jwt(&s.issuer, &profile(&s.user_nkey)).unwrap();
    let d = decode_any(&jwt, &s.issuer.public_key(), NOW).unwrap();
    assert_eq!(d.alg, "ed25519-nkey");
    assert_eq!(d.issuer, s.issuer.public_key());
    assert_eq!(d.subject, s.user_nkey);
    assert_eq!(d.audience, "APP");
    assert_eq!(d.name, "alice");
    assert_eq!(d.issued_at, Some(NOW));
    assert_eq!(d.expires_at, Some(NOW + 3600));
    assert_eq!(d.not_before, None);
    assert_eq!(d.claim_type, "user");
    assert_eq!(
        d.nats,
        json!({
            "pub": {"allow": ["kez.registry.>", "kez.inbox.*"], "deny": ["$JS.API.>"]},
            "sub": {"allow": ["_INBOX.alice.>", "kez.work q1"], "deny": ["$SYS.>"]},
            "resp": {"max": 1, "ttl": 5_000_000_000u64},
            "subs": 100,
            "data": 1_048_576,
            "payload": 65536,
            "type": "user",
            "version": 2
        })
    );
    // Expiry is enforced on decode too.
    assert_eq!(
        decode_any(&jwt, &s.issuer.public_key(), NOW + 3601),
        Err(JwtError::Expired {
            exp: NOW + 3600,
            now: NOW + 3601
        })
    );
}

#[test]
fn the_wire_form_is_that_of_nats_servers_jwt_library() {
    let s = Setup::new();
    let claims = UserClaims::new(&s.user_nkey, "APP", NOW)
        .allow_publish(["a"])
        .deny_subscribe([">"]);
    let jwt = encode_user_jwt(&s.issuer, &claims).unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts[0], "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ");
    let payload = String::from_utf8(
        data_encoding::BASE64URL_NOPAD
            .decode(parts[1].as_bytes())
            .unwrap(),
    )
    .unwrap();

    // Field order and omissions as Go writes them; jti over the standard claims alone.
    let standard = format!(
        r#"{{"aud":"APP","iat":{NOW},"iss":"{}","sub":"{}"}}"#,
        s.issuer.public_key(),
        s.user_nkey
    );
    let jti = BASE32_NOPAD.encode(&Sha512_256::digest(standard.as_bytes()));
    let expected = format!(
        r#"{{"aud":"APP","jti":"{jti}","iat":{NOW},"iss":"{}","sub":"{}","nats":{{"pub":{{"allow":["a"]}},"sub":{{"deny":[">"]}},"subs":-1,"data":-1,"payload":-1,"type":"user","version":2}}}}"#,
        s.issuer.public_key(),
        s.user_nkey
    );
    assert_eq!(payload, expected);

    // Deterministic: the same claims give the same bytes.
    assert_eq!(encode_user_jwt(&s.issuer, &claims).unwrap(), jwt);
}

#[test]
fn responses_decode_to_the_decision() {
    let s = Setup::new();
    let server_id = s.server.public_key();
    let user_jwt = encode_user_jwt(&s.issuer, &profile(&s.user_nkey)).unwrap();

    let allow = encode_authorization_response(
        &s.issuer,
        &server_id,
        &s.user_nkey,
        Decision::Allow {
            user_jwt: &user_jwt,
        },
        NOW,
    )
    .unwrap();
    let d = decode_any(&allow, &s.issuer.public_key(), NOW).unwrap();
    assert_eq!(d.subject, s.user_nkey);
    assert_eq!(d.audience, server_id);
    assert_eq!(d.issued_at, Some(NOW));
    assert_eq!(d.expires_at, None);
    assert_eq!(
        d.nats,
        json!({"jwt": user_jwt, "type": "authorization_response", "version": 2})
    );

    let deny = encode_authorization_response(
        &s.issuer,
        &server_id,
        &s.user_nkey,
        Decision::Deny {
            reason: "key not registered",
        },
        NOW,
    )
    .unwrap();
    let d = decode_any(&deny, &s.issuer.public_key(), NOW).unwrap();
    assert_eq!(
        d.nats,
        json!({"error": "key not registered", "type": "authorization_response", "version": 2})
    );
}

#[test]
fn a_response_for_a_request_is_addressed_to_its_server_and_user_nkey() {
    let s = Setup::new();
    let req = decode_authorization_request(&s.request(), NOW).unwrap();
    let jwt =
        encode_authorization_response_for(&s.issuer, &req, Decision::Deny { reason: "no" }, NOW)
            .unwrap();
    let d = decode_any(&jwt, &s.issuer.public_key(), NOW).unwrap();
    assert_eq!(d.audience, s.server.public_key());
    assert_eq!(d.subject, s.user_nkey);
}

#[test]
fn only_an_account_key_with_its_seed_can_sign() {
    let s = Setup::new();
    let claims = profile(&s.user_nkey);
    for key in [
        KeyPair::new_user(),
        KeyPair::new_server(),
        KeyPair::new_operator(),
    ] {
        assert_eq!(
            encode_user_jwt(&key, &claims),
            Err(JwtError::UnusableSigningKey {
                reason: "it is not an account key"
            })
        );
    }
    let public_only = KeyPair::from_public_key(&s.issuer.public_key()).unwrap();
    assert_eq!(
        encode_user_jwt(&public_only, &claims),
        Err(JwtError::UnusableSigningKey {
            reason: "it holds no seed"
        })
    );
    assert!(matches!(
        encode_authorization_response(
            &KeyPair::new_user(),
            &s.server.public_key(),
            &s.user_nkey,
            Decision::Deny { reason: "no" },
            NOW
        ),
        Err(JwtError::UnusableSigningKey { .. })
    ));
}

#[test]
fn user_jwts_nats_server_would_refuse_are_refused() {
    let s = Setup::new();
    let account_key = KeyPair::new_account().public_key();
    assert!(matches!(
        encode_user_jwt(&s.issuer, &profile(&account_key)),
        Err(JwtError::WrongKeyKind {
            expected: NkeyKind::User,
            ..
        })
    ));
    assert!(matches!(
        encode_user_jwt(&s.issuer, &profile("garbage")),
        Err(JwtError::InvalidKey { .. })
    ));
    let mut no_account = profile(&s.user_nkey);
    no_account.account = " ".into();
    assert_eq!(
        encode_user_jwt(&s.issuer, &no_account),
        Err(JwtError::EmptyAudience)
    );

    let base = || UserClaims::new(&s.user_nkey, "APP", NOW).deny_subscribe([">"]);
    for (subject, reason) in [
        ("", "empty subject"),
        ("a\tb", "whitespace in subject"),
        (".a", "subject starts or ends with '.'"),
        ("a.", "subject starts or ends with '.'"),
        ("a..b", "subject contains '..'"),
        ("a q", "publish subjects cannot name a queue"),
        ("a b c", "too many spaces"),
        ("a  b", "too many spaces"),
    ] {
        assert_eq!(
            encode_user_jwt(&s.issuer, &base().allow_publish([subject])),
            Err(JwtError::InvalidSubject {
                subject: subject.into(),
                reason
            }),
            "{subject:?}"
        );
    }
    // A queue group is fine on a subscribe entry, but must itself be a valid token.
    let ok = UserClaims::new(&s.user_nkey, "APP", NOW)
        .allow_publish(["a"])
        .allow_subscribe(["a q"]);
    encode_user_jwt(&s.issuer, &ok).unwrap();
    let bad_queue = UserClaims::new(&s.user_nkey, "APP", NOW)
        .allow_publish(["a"])
        .allow_subscribe(["a .q"]);
    assert!(matches!(
        encode_user_jwt(&s.issuer, &bad_queue),
        Err(JwtError::InvalidSubject { .. })
    ));
}

#[test]
fn empty_permissions_which_nats_server_reads_as_allow_all_are_refused() {
    let s = Setup::new();
    let nothing = UserClaims::new(&s.user_nkey, "APP", NOW);
    assert_eq!(
        encode_user_jwt(&s.issuer, &nothing),
        Err(JwtError::UnrestrictedPermissions {
            direction: "publish"
        })
    );
    assert_eq!(
        encode_user_jwt(&s.issuer, &nothing.clone().allow_publish(["a"])),
        Err(JwtError::UnrestrictedPermissions {
            direction: "subscribe"
        })
    );
    // Saying it explicitly works.
    encode_user_jwt(
        &s.issuer,
        &nothing.allow_publish([">"]).allow_subscribe([">"]),
    )
    .unwrap();
}

#[test]
fn responses_nats_server_would_refuse_are_refused() {
    let s = Setup::new();
    let server_id = s.server.public_key();
    let deny = Decision::Deny { reason: "no" };
    assert!(matches!(
        encode_authorization_response(&s.issuer, "APP", &s.user_nkey, deny, NOW),
        Err(JwtError::InvalidKey { .. })
    ));
    assert!(matches!(
        encode_authorization_response(&s.issuer, &s.issuer.public_key(), &s.user_nkey, deny, NOW),
        Err(JwtError::WrongKeyKind {
            expected: NkeyKind::Server,
            ..
        })
    ));
    assert!(matches!(
        encode_authorization_response(&s.issuer, &server_id, &server_id, deny, NOW),
        Err(JwtError::WrongKeyKind {
            expected: NkeyKind::User,
            ..
        })
    ));
    assert_eq!(
        encode_authorization_response(
            &s.issuer,
            &server_id,
            &s.user_nkey,
            Decision::Deny { reason: "" },
            NOW
        ),
        Err(JwtError::EmptyDecision {
            what: "deny reason"
        })
    );
    assert_eq!(
        encode_authorization_response(
            &s.issuer,
            &server_id,
            &s.user_nkey,
            Decision::Allow { user_jwt: "" },
            NOW
        ),
        Err(JwtError::EmptyDecision { what: "user JWT" })
    );
}

#[test]
fn decode_any_checks_issuer_signature_and_times() {
    let s = Setup::new();
    let jwt = encode_user_jwt(&s.issuer, &profile(&s.user_nkey)).unwrap();
    let other = KeyPair::new_account().public_key();
    assert_eq!(
        decode_any(&jwt, &other, NOW),
        Err(JwtError::IssuerMismatch {
            expected: other.clone(),
            found: s.issuer.public_key()
        })
    );
    // Claims re-signed... by nobody: swap the payload of another JWT in.
    let other_jwt =
        encode_user_jwt(&s.issuer, &profile(&KeyPair::new_user().public_key())).unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    let other_parts: Vec<&str> = other_jwt.split('.').collect();
    let spliced = format!("{}.{}.{}", parts[0], other_parts[1], parts[2]);
    assert_eq!(
        decode_any(&spliced, &s.issuer.public_key(), NOW),
        Err(JwtError::BadSignature)
    );
    // A not-yet-valid JWT (nbf) from the server's point of view.
    let claims =
        json!({"iss": s.server.public_key(), "nbf": NOW + 10, "nats": {"type": "x", "version": 2}});
    let early = common::sign(&s.server, &claims);
    assert_eq!(
        decode_any(&early, &s.server.public_key(), NOW),
        Err(JwtError::NotYetValid {
            nbf: NOW + 10,
            now: NOW
        })
    );
    assert_eq!(
        decode_any(&early, &s.server.public_key(), NOW + 10)
            .unwrap()
            .claim_type,
        "x"
    );
    // Any kind of issuer key works, but it must be one.
    let claims = json!({"iss": "garbage", "nats": {"type": "x", "version": 2}});
    let unkeyed = common::sign(&s.server, &claims);
    assert_eq!(
        decode_any(&unkeyed, "garbage", NOW),
        Err(JwtError::InvalidKey {
            field: "iss",
            found: "garbage".into()
        })
    );
}
