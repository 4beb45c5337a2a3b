//! Requests captured from a real nats-server 2.15.1, and the responses to them that it
//! accepted or refused (see `tests/fixtures/nats-server-2.15.1/README.md`).

use std::path::PathBuf;
use std::time::Duration;

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use kez_nats_jwt::{
    AuthorizationRequest, Decision, JwtError, UserClaims, client_nonce_proof, decode_any,
    decode_authorization_request, encode_authorization_response_for, encode_user_jwt,
};
use serde_json::Value;
use sha2::{Digest, Sha512_256};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nats-server-2.15.1")
}

fn read(name: &str) -> String {
    let text = std::fs::read_to_string(dir().join(name)).unwrap();
    text.trim_end().to_owned()
}

fn capture() -> Value {
    serde_json::from_str(&read("capture.json")).unwrap()
}

fn entry(file: &str) -> Value {
    capture()["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["file"] == file)
        .unwrap()
        .clone()
}

fn issuer() -> nkeys::KeyPair {
    nkeys::KeyPair::from_seed(capture()["issuer_seed_test_only"].as_str().unwrap()).unwrap()
}

/// Decodes a captured request at its `iat` and checks what every request holds.
fn decode_captured(file: &str) -> (String, AuthorizationRequest) {
    let meta = entry(file);
    let jwt = read(file);
    let iat = meta["iat"].as_u64().unwrap();
    let req = decode_authorization_request(&jwt, iat).unwrap();

    assert_eq!(req.issued_at, Some(iat));
    assert_eq!(req.expires_at, meta["exp"].as_u64());
    assert_eq!(req.alg, "ed25519-nkey");
    assert_eq!(req.audience, "nats-authorization-request");
    assert!(req.issuer.starts_with('N'));
    assert_eq!(req.issuer, req.server_id.id);
    // In non-operator mode the server puts the configured callout issuer in `sub`.
    assert_eq!(req.subject, capture()["issuer"].as_str().unwrap());
    assert_eq!(req.server_id.name, "kez-capture");
    assert_eq!(req.server_id.version, "2.15.1");
    assert!(req.user_nkey.starts_with('U'));
    assert_ne!(req.user_nkey, req.connect_opts.nkey);
    assert_eq!(req.client_info.kind, "Client");
    assert_eq!(req.client_info.client_type, "nats");
    assert_eq!(req.client_info.host, "127.0.0.1");
    // The server fills `client_info.user` with the nkey the client claimed.
    assert_eq!(req.client_info.user, req.connect_opts.nkey);
    assert_eq!(req.client_info.nonce.len(), 15);

    // The client (async-nats with a plain nkey, which signs the nonce untagged) proves the
    // key it claims.
    let proof = client_nonce_proof(&req).unwrap();
    assert_eq!(proof.nkey, meta["client_nkey"].as_str().unwrap());
    nkeys::KeyPair::from_public_key(&proof.nkey)
        .unwrap()
        .verify(proof.nonce.as_bytes(), &proof.signature)
        .expect("the captured client's signature verifies");

    // The request is good for `exp - iat` seconds (the authorization timeout), then refused.
    let exp = req.expires_at.unwrap();
    assert_eq!(exp - iat, 2);
    decode_authorization_request(&jwt, exp).unwrap();
    assert_eq!(
        decode_authorization_request(&jwt, exp + 1),
        Err(JwtError::Expired { exp, now: exp + 1 })
    );
    (jwt, req)
}

#[test]
fn a_request_for_an_async_nats_client_verifies() {
    let (_, req) = decode_captured("request-async-nats.jwt");
    assert_eq!(req.connect_opts.lang, "rust");
    assert_eq!(req.connect_opts.version, "0.51.0");
    // async-nats signs in base64url without padding.
    assert!(!req.connect_opts.sig.contains(['+', '/', '=']));
}

#[test]
fn a_request_for_a_nats_py_client_verifies() {
    let (_, req) = decode_captured("request-nats-py.jwt");
    assert_eq!(req.connect_opts.lang, "python3");
    // nats-py signs in standard base64 with padding, which the server also accepts.
    assert!(req.connect_opts.sig.ends_with("=="));
    assert!(req.connect_opts.sig.contains(['+', '/']));
}

#[test]
fn the_deny_request_verifies_too() {
    decode_captured("request-deny.jwt");
}

#[test]
fn a_changed_byte_breaks_the_server_signature() {
    let (jwt, _) = decode_captured("request-async-nats.jwt");
    let iat = entry("request-async-nats.jwt")["iat"].as_u64().unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    let claims = BASE64URL_NOPAD.decode(parts[1].as_bytes()).unwrap();
    let text = String::from_utf8(claims).unwrap();
    let changed = text.replace("\"id\":8", "\"id\":9");
    assert_ne!(changed, text);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        BASE64URL_NOPAD.encode(changed.as_bytes()),
        parts[2]
    );
    assert_eq!(
        decode_authorization_request(&forged, iat),
        Err(JwtError::BadSignature)
    );
}

#[test]
fn the_servers_jti_is_the_hash_of_its_standard_claims() {
    for file in [
        "request-async-nats.jwt",
        "request-nats-py.jwt",
        "request-deny.jwt",
    ] {
        let (_, req) = decode_captured(file);
        let standard = format!(
            r#"{{"aud":"{}","exp":{},"iat":{},"iss":"{}","sub":"{}"}}"#,
            req.audience,
            req.expires_at.unwrap(),
            req.issued_at.unwrap(),
            req.issuer,
            req.subject
        );
        let jti = BASE32_NOPAD.encode(&Sha512_256::digest(standard.as_bytes()));
        assert_eq!(req.jti, jti, "{file}");
    }
}

/// The user JWT the capture program gave the async-nats client.
fn capture_profile(req: &AuthorizationRequest, client_nkey: &str, now: u64) -> UserClaims {
    UserClaims::new(&req.user_nkey, "APP", now)
        .with_name(format!("kez-{}", &client_nkey[..12]))
        .with_expiry(now + 300)
        .allow_publish(["kez.ok.>"])
        .allow_subscribe(["kez.ok.>", "_INBOX.>"])
        .allow_responses(1, Duration::from_secs(5))
}

#[test]
fn the_accepted_allow_response_is_reproduced_byte_for_byte() {
    let (_, req) = decode_captured("request-async-nats.jwt");
    let iat = req.issued_at.unwrap();
    let key = client_nonce_proof(&req).unwrap();
    let issuer = issuer();

    let user_jwt = encode_user_jwt(&issuer, &capture_profile(&req, &key.nkey, iat)).unwrap();
    let response = encode_authorization_response_for(
        &issuer,
        &req,
        Decision::Allow {
            user_jwt: &user_jwt,
        },
        iat,
    )
    .unwrap();
    assert_eq!(response, read("response-allow.jwt"));

    // And it reads back as what nats-server acted on.
    let d = decode_any(&response, &issuer.public_key(), iat).unwrap();
    assert_eq!(d.audience, req.server_id.id);
    assert_eq!(d.subject, req.user_nkey);
    let inner = d.nats["jwt"].as_str().unwrap();
    let user = decode_any(inner, &issuer.public_key(), iat).unwrap();
    assert_eq!(user.audience, "APP");
    assert_eq!(user.name, "kez-UBS2MBQLAHG6");
    assert_eq!(user.subject, req.user_nkey);
    assert_eq!(user.nats["pub"]["allow"][0], "kez.ok.>");
}

#[test]
fn the_refused_deny_response_is_reproduced_byte_for_byte() {
    let (_, req) = decode_captured("request-deny.jwt");
    let iat = req.issued_at.unwrap();
    let response = encode_authorization_response_for(
        &issuer(),
        &req,
        Decision::Deny {
            reason: "kez test: denied by policy",
        },
        iat,
    )
    .unwrap();
    assert_eq!(response, read("response-deny.jwt"));
}
