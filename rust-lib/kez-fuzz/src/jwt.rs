//! The auth callout's request decoder (kez-nats-jwt).

use data_encoding::BASE64URL_NOPAD;
use kez_nats_jwt::{
    AUTHORIZATION_REQUEST_AUDIENCE, client_nonce_proof, decode_any, decode_authorization_request,
};
use nkeys::{KeyPair, KeyPairType};

use crate::mode;

/// The clock for the target: the `iat` of the request captured from nats-server 2.15.1
/// (`rust-lib/kez-nats-jwt/tests/fixtures`), so the captured requests decode.
pub const NOW: u64 = 1_795_703_421;

/// The server key that signs built requests (mode 1): a fixed test key.
pub fn server_key() -> KeyPair {
    KeyPair::new_from_raw(KeyPairType::Server, [7; 32]).expect("a server key")
}

/// The header nats-server writes.
const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// [`decode_authorization_request`] at [`NOW`], then [`client_nonce_proof`] and the KEZ connect
/// proof check on what it accepts. Mode byte 0: the rest is the JWT text as received (also given to [`decode_any`]).
/// Otherwise the rest is the claims JSON: if it is an object, its `iss` is set to
/// [`server_key`], and the target signs it, so the checks behind the signature are reached.
///
/// Asserts: an accepted request has the request audience, an issuer equal to its server id,
/// a user nkey `U...`, and decodes again identically; a client proof carries the 32 bytes of
/// the nkey it names and the request's nonce. Returns whether the request was accepted.
pub fn callout_jwt(data: &[u8]) -> bool {
    let (mode, rest) = mode(data);
    let jwt = if mode == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return false;
        };
        let _ = decode_any(text, &server_key().public_key(), NOW);
        text.to_owned()
    } else {
        build(rest)
    };
    let Ok(request) = decode_authorization_request(&jwt, NOW) else {
        return false;
    };
    assert_eq!(request.audience, AUTHORIZATION_REQUEST_AUDIENCE);
    assert_eq!(request.issuer, request.server_id.id);
    assert!(request.issuer.starts_with('N'));
    assert!(request.user_nkey.starts_with('U'));
    assert_eq!(
        decode_authorization_request(&jwt, NOW).as_ref(),
        Ok(&request)
    );
    if let Ok(proof) = client_nonce_proof(&request) {
        assert_eq!(proof.nkey, request.connect_opts.nkey);
        assert_eq!(proof.nonce, request.client_info.nonce);
        let (_, raw) = nkeys::from_public_key(&proof.nkey).expect("a proof's nkey parses");
        assert_eq!(raw, proof.ed25519);
        if let Ok(key) = kez_core::PublicKey::from_bytes(&proof.ed25519) {
            let _ = kez_core::connect::verify_proof(
                &key,
                &proof.nonce,
                &kez_core::Signature::from_bytes(proof.signature),
                kez_core::connect::LegacyProofs::Accept,
            );
        }
    }
    true
}

/// A JWT signed by [`server_key`] around `claims` (with `iss` set if it is a JSON object).
fn build(claims: &[u8]) -> String {
    let server = server_key();
    let claims = match serde_json::from_slice::<serde_json::Value>(claims) {
        Ok(serde_json::Value::Object(mut object)) => {
            object.insert("iss".into(), server.public_key().into());
            serde_json::to_vec(&object).expect("a JSON object encodes")
        }
        _ => claims.to_vec(),
    };
    let signed = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(HEADER.as_bytes()),
        BASE64URL_NOPAD.encode(&claims)
    );
    let signature = server.sign(signed.as_bytes()).expect("signs");
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature))
}
