//! Decoding authorization requests and checking client nonce signatures: the happy path and
//! every named failure.

mod common;

use common::{HEADER, NOW, Setup, b64, nkey_of_raw, not_a_point, sign, sign_raw};
use kez_nats_jwt::{
    JwtError, JwtPart, MAX_JWT_LEN, NkeyKind, client_nonce_proof, decode_authorization_request,
};
use nkeys::KeyPair;
use serde_json::json;

/// The first byte of a server nkey (`N...`).
const SERVER_PREFIX: u8 = 13 << 3;
/// The first byte of a user nkey (`U...`).
const USER_PREFIX: u8 = 20 << 3;

fn decode(jwt: &str) -> Result<kez_nats_jwt::AuthorizationRequest, JwtError> {
    decode_authorization_request(jwt, NOW)
}

#[test]
fn a_well_formed_request_decodes_with_every_field() {
    let s = Setup::new();
    let req = decode(&s.request()).unwrap();
    assert_eq!(req.issuer, s.server.public_key());
    assert_eq!(req.subject, s.issuer.public_key());
    assert_eq!(req.audience, "nats-authorization-request");
    assert_eq!(req.issued_at, Some(NOW));
    assert_eq!(req.expires_at, Some(NOW + 2));
    assert_eq!(req.alg, "ed25519-nkey");
    assert_eq!(req.server_id.id, s.server.public_key());
    assert_eq!(req.server_id.name, "kez-test");
    assert_eq!(req.server_id.version, "2.15.1");
    assert_eq!(req.user_nkey, s.user_nkey);
    assert_eq!(req.client_info.id, 8);
    assert_eq!(req.client_info.kind, "Client");
    assert_eq!(req.client_info.client_type, "nats");
    assert_eq!(req.client_info.nonce, s.nonce);
    assert_eq!(req.connect_opts.nkey, s.client.public_key());
    assert_eq!(req.connect_opts.lang, "rust");
    assert_eq!(req.connect_opts.protocol, 1);
    assert!(!req.connect_opts.has_password && !req.connect_opts.has_auth_token);
    assert_eq!(req.client_tls, None);

    let proof = client_nonce_proof(&req).unwrap();
    assert_eq!(proof.nkey, s.client.public_key());
    assert_eq!(
        proof.ed25519,
        nkeys::from_public_key(&s.client.public_key()).unwrap().1
    );
    assert_eq!(proof.nonce, s.nonce);
    s.client
        .verify(s.nonce.as_bytes(), &proof.signature)
        .expect("the signature as the client made it");
}

#[test]
fn unknown_fields_and_tls_state_are_accepted() {
    let s = Setup::new();
    let jwt = s.request_with(|c| {
        c["nats"]["some_future_field"] = json!({"x": 1});
        c["nats"]["client_tls"] = json!({"version": "1.3", "cipher": "TLS_AES_128_GCM_SHA256"});
        c["nats"]["client_info"]["name_tag"] = json!("tag");
    });
    let req = decode(&jwt).unwrap();
    assert_eq!(req.client_tls.unwrap().version, "1.3");
    assert_eq!(req.client_info.name_tag, "tag");
}

#[test]
fn the_old_alg_name_and_any_case_typ_are_accepted_as_nats_server_does() {
    let s = Setup::new();
    for header in [
        r#"{"typ":"JWT","alg":"ed25519"}"#,
        r#"{"typ":"jwt","alg":"ED25519-NKEY"}"#,
    ] {
        let jwt = sign_raw(
            &s.server,
            header.as_bytes(),
            s.claims().to_string().as_bytes(),
        );
        decode(&jwt).unwrap();
    }
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let garbage = "x".repeat(MAX_JWT_LEN + 1);
    assert_eq!(
        decode(&garbage),
        Err(JwtError::TooLarge {
            len: MAX_JWT_LEN + 1,
            max: MAX_JWT_LEN
        })
    );
    // A validly signed request that is merely too long is refused the same way.
    let s = Setup::new();
    let jwt = s.request_with(|c| c["nats"]["client_info"]["name"] = json!("n".repeat(MAX_JWT_LEN)));
    assert!(matches!(decode(&jwt), Err(JwtError::TooLarge { .. })));
}

#[test]
fn a_jwt_must_have_three_parts() {
    for (jwt, parts) in [("", 1), ("abc", 1), ("a.b", 2), ("a.b.c.d", 4)] {
        assert_eq!(
            decode(jwt),
            Err(JwtError::WrongPartCount { parts }),
            "{jwt:?}"
        );
    }
}

#[test]
fn each_part_must_be_base64url_without_padding() {
    let s = Setup::new();
    let jwt = s.request();
    let parts: Vec<&str> = jwt.split('.').collect();
    let cases = [
        (format!("!!!.{}.{}", parts[1], parts[2]), JwtPart::Header),
        (
            format!("{}.{}=.{}", parts[0], parts[1], parts[2]),
            JwtPart::Claims,
        ),
        (
            format!("{}.{}.{}+/", parts[0], parts[1], parts[2]),
            JwtPart::Signature,
        ),
        // 89 characters: no base64 text has a length of 1 modulo 4.
        (
            format!("{}.{}.{}AAA", parts[0], parts[1], parts[2]),
            JwtPart::Signature,
        ),
    ];
    for (jwt, part) in cases {
        assert_eq!(decode(&jwt), Err(JwtError::BadBase64 { part }), "{part}");
    }
}

#[test]
fn header_and_claims_must_be_json_of_the_right_shape() {
    let s = Setup::new();
    let claims = s.claims().to_string();
    let not_json = sign_raw(&s.server, b"not json", claims.as_bytes());
    assert!(matches!(
        decode(&not_json),
        Err(JwtError::BadJson {
            part: JwtPart::Header,
            ..
        })
    ));
    let bad_claims = sign_raw(&s.server, HEADER.as_bytes(), b"{\"aud\":");
    assert!(matches!(
        decode(&bad_claims),
        Err(JwtError::BadJson {
            part: JwtPart::Claims,
            ..
        })
    ));
    // Right JSON, wrong types: a string `exp`, a string connection id.
    let string_exp = s.request_with(|c| c["exp"] = json!("soon"));
    assert!(matches!(
        decode(&string_exp),
        Err(JwtError::BadJson {
            part: JwtPart::Claims,
            ..
        })
    ));
    let string_id = s.request_with(|c| c["nats"]["client_info"]["id"] = json!("eight"));
    let err = decode(&string_id).unwrap_err();
    assert!(
        matches!(
            err,
            JwtError::BadJson {
                part: JwtPart::Claims,
                ..
            }
        ),
        "{err:?}"
    );
    // The detail names the position, not the value.
    assert!(!err.to_string().contains("eight"), "{err}");
}

#[test]
fn the_header_must_say_jwt_and_ed25519() {
    let s = Setup::new();
    let claims = s.claims().to_string();
    let jws = sign_raw(
        &s.server,
        br#"{"typ":"JWS","alg":"ed25519-nkey"}"#,
        claims.as_bytes(),
    );
    assert_eq!(
        decode(&jws),
        Err(JwtError::UnsupportedType {
            found: "JWS".into()
        })
    );
    for alg in ["HS256", "none", "ed25519-nkeyX", ""] {
        let header = format!(r#"{{"typ":"JWT","alg":"{alg}"}}"#);
        let jwt = sign_raw(&s.server, header.as_bytes(), claims.as_bytes());
        assert_eq!(
            decode(&jwt),
            Err(JwtError::UnsupportedAlgorithm { found: alg.into() })
        );
    }
}

#[test]
fn only_claims_version_2_is_accepted() {
    let s = Setup::new();
    let v1 = s.request_with(|c| c["nats"]["version"] = json!(1));
    assert_eq!(decode(&v1), Err(JwtError::UnsupportedVersion { found: 1 }));
    let none = s.request_with(|c| {
        c["nats"].as_object_mut().unwrap().remove("version");
    });
    assert_eq!(
        decode(&none),
        Err(JwtError::UnsupportedVersion { found: 0 })
    );
}

#[test]
fn a_tampered_or_foreign_signature_is_refused() {
    let s = Setup::new();
    let jwt = s.request();
    let parts: Vec<&str> = jwt.split('.').collect();

    // Claims changed after signing (user_nkey swapped).
    let mut claims = s.claims();
    claims["nats"]["user_nkey"] = json!(KeyPair::new_user().public_key());
    let tampered = format!("{}.{}.{}", parts[0], b64(claims.to_string()), parts[2]);
    assert_eq!(decode(&tampered), Err(JwtError::BadSignature));

    // Signature of the wrong length.
    let short = format!("{}.{}.{}", parts[0], parts[1], b64([7u8; 63]));
    assert_eq!(decode(&short), Err(JwtError::BadSignature));

    // Signed by another server key than the one in `iss`.
    let other = sign(&KeyPair::new_server(), &s.claims());
    assert_eq!(decode(&other), Err(JwtError::BadSignature));

    // The version 1 signing input (claims only) does not verify as version 2.
    let claims_b64 = b64(s.claims().to_string());
    let v1_sig = b64(s.server.sign(claims_b64.as_bytes()).unwrap());
    let v1 = format!("{}.{claims_b64}.{v1_sig}", parts[0]);
    assert_eq!(decode(&v1), Err(JwtError::BadSignature));
}

#[test]
fn the_issuer_must_be_a_server_key() {
    let s = Setup::new();
    let garbage = s.request_with(|c| c["iss"] = json!("NOT-A-KEY"));
    assert_eq!(
        decode(&garbage),
        Err(JwtError::InvalidKey {
            field: "iss",
            found: "NOT-A-KEY".into()
        })
    );
    // A server key's text whose bytes are no curve point: nothing can verify with it.
    let off_curve = nkey_of_raw(SERVER_PREFIX, &not_a_point());
    let off_curve_issuer = s.request_with(|c| c["iss"] = json!(off_curve));
    assert_eq!(
        decode(&off_curve_issuer),
        Err(JwtError::InvalidKey {
            field: "iss",
            found: off_curve.clone()
        })
    );
    // Signed by an account key and naming it: valid signature, wrong kind of issuer.
    let account = KeyPair::new_account();
    let mut claims = s.claims();
    claims["iss"] = json!(account.public_key());
    assert_eq!(
        decode(&sign(&account, &claims)),
        Err(JwtError::WrongKeyKind {
            field: "iss",
            expected: NkeyKind::Server,
            found: account.public_key()
        })
    );
    let user = KeyPair::new_user();
    claims["iss"] = json!(user.public_key());
    assert!(matches!(
        decode(&sign(&user, &claims)),
        Err(JwtError::WrongKeyKind {
            expected: NkeyKind::Server,
            ..
        })
    ));
}

#[test]
fn the_issuer_must_be_the_server_named_in_the_request() {
    let s = Setup::new();
    let impostor = KeyPair::new_server();
    let mut claims = s.claims();
    claims["iss"] = json!(impostor.public_key());
    assert_eq!(
        decode(&sign(&impostor, &claims)),
        Err(JwtError::IssuerMismatch {
            expected: s.server.public_key(),
            found: impostor.public_key()
        })
    );
}

#[test]
fn the_audience_and_type_must_be_those_of_a_request() {
    let s = Setup::new();
    let aud = s.request_with(|c| c["aud"] = json!("APP"));
    assert_eq!(
        decode(&aud),
        Err(JwtError::WrongAudience {
            expected: "nats-authorization-request".into(),
            found: "APP".into()
        })
    );
    let no_aud = s.request_with(|c| {
        c.as_object_mut().unwrap().remove("aud");
    });
    assert!(matches!(
        decode(&no_aud),
        Err(JwtError::WrongAudience { .. })
    ));
    let response = s.request_with(|c| c["nats"]["type"] = json!("authorization_response"));
    assert_eq!(
        decode(&response),
        Err(JwtError::WrongClaimType {
            expected: "authorization_request",
            found: "authorization_response".into()
        })
    );
}

#[test]
fn expiry_and_not_before_are_checked_like_nats_server() {
    let s = Setup::new();
    let jwt = s.request();
    decode_authorization_request(&jwt, NOW + 2).unwrap(); // now == exp: still valid
    assert_eq!(
        decode_authorization_request(&jwt, NOW + 3),
        Err(JwtError::Expired {
            exp: NOW + 2,
            now: NOW + 3
        })
    );
    // No exp (or zero): no expiry.
    let forever = s.request_with(|c| c["exp"] = json!(0));
    decode_authorization_request(&forever, u64::MAX).unwrap();
    let later = s.request_with(|c| c["nbf"] = json!(NOW + 1));
    assert_eq!(
        decode(&later),
        Err(JwtError::NotYetValid {
            nbf: NOW + 1,
            now: NOW
        })
    );
    decode_authorization_request(&later, NOW + 1).unwrap();
}

#[test]
fn the_user_nkey_must_be_a_user_key() {
    let s = Setup::new();
    let empty = s.request_with(|c| c["nats"]["user_nkey"] = json!(""));
    assert!(matches!(
        decode(&empty),
        Err(JwtError::InvalidKey {
            field: "nats.user_nkey",
            ..
        })
    ));
    let account =
        s.request_with(|c| c["nats"]["user_nkey"] = json!(KeyPair::new_account().public_key()));
    assert!(matches!(
        decode(&account),
        Err(JwtError::WrongKeyKind {
            field: "nats.user_nkey",
            expected: NkeyKind::User,
            ..
        })
    ));
    // Only named back (the response's subject), never verified with: its form is checked as
    // nats-server's nkeys library checks it (prefix, CRC), not whether it is a curve point.
    let off_curve = nkey_of_raw(USER_PREFIX, &not_a_point());
    let named = s.request_with(|c| c["nats"]["user_nkey"] = json!(off_curve));
    assert_eq!(decode(&named).unwrap().user_nkey, off_curve);
}

#[test]
fn secrets_of_the_client_are_not_kept_nor_shown() {
    let s = Setup::new();
    let jwt = s.request_with(|c| {
        let opts = &mut c["nats"]["connect_opts"];
        opts["user"] = json!("alice");
        opts["pass"] = json!("hunter2-secret");
        opts["auth_token"] = json!("token-secret");
        opts["jwt"] = json!("eyJbearer-secret");
    });
    let req = decode(&jwt).unwrap();
    assert!(req.connect_opts.has_password);
    assert!(req.connect_opts.has_auth_token);
    assert_eq!(req.connect_opts.user, "alice");
    let shown = format!("{req:?} {req:#?}");
    for secret in ["hunter2", "token-secret", "bearer-secret"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("<16 bytes>"), "{shown}");

    let empty = s.request_with(|c| {
        c["nats"]["connect_opts"]["pass"] = json!("");
        c["nats"]["connect_opts"]["auth_token"] = json!(null);
    });
    let req = decode(&empty).unwrap();
    assert!(!req.connect_opts.has_password && !req.connect_opts.has_auth_token);
}

#[test]
fn errors_cut_long_untrusted_values() {
    let s = Setup::new();
    let long = "A".repeat(5000);
    let jwt = s.request_with(|c| c["aud"] = json!(long));
    let err = decode(&jwt).unwrap_err();
    assert!(err.to_string().len() < 300, "{err}");
}

// ----- the client's nonce signature -----

fn request_with(
    s: &Setup,
    edit: impl FnOnce(&mut serde_json::Value),
) -> kez_nats_jwt::AuthorizationRequest {
    decode(&s.request_with(edit)).unwrap()
}

#[test]
fn nonce_signatures_in_standard_base64_are_accepted_as_the_server_does() {
    let s = Setup::new();
    let padded = s.client_sig_std();
    assert!(padded.ends_with("=="));
    for sig in [padded.clone(), padded.trim_end_matches('=').to_owned()] {
        let req = request_with(&s, |c| c["nats"]["connect_opts"]["sig"] = json!(sig));
        let proof = client_nonce_proof(&req).unwrap();
        assert_eq!(proof.nkey, s.client.public_key());
        s.client
            .verify(s.nonce.as_bytes(), &proof.signature)
            .expect("decoded to the bytes the client signed");
    }
}

#[test]
fn a_missing_nkey_signature_or_nonce_is_refused() {
    let s = Setup::new();
    let no_key = request_with(&s, |c| {
        c["nats"]["connect_opts"]
            .as_object_mut()
            .unwrap()
            .remove("nkey");
    });
    assert_eq!(client_nonce_proof(&no_key), Err(JwtError::MissingClientKey));
    let no_sig = request_with(&s, |c| {
        c["nats"]["connect_opts"]
            .as_object_mut()
            .unwrap()
            .remove("sig");
    });
    assert_eq!(
        client_nonce_proof(&no_sig),
        Err(JwtError::MissingNonceSignature)
    );
    // No nonce, with a signature over the empty string: never accepted.
    let empty_sig = s.client_sig(b"");
    let no_nonce = request_with(&s, |c| {
        c["nats"]["client_info"]
            .as_object_mut()
            .unwrap()
            .remove("nonce");
        c["nats"]["connect_opts"]["sig"] = json!(empty_sig);
    });
    assert_eq!(client_nonce_proof(&no_nonce), Err(JwtError::MissingNonce));
}

#[test]
fn the_client_key_must_be_a_valid_user_key() {
    let s = Setup::new();
    let garbage = request_with(&s, |c| c["nats"]["connect_opts"]["nkey"] = json!("UNOPE"));
    assert!(matches!(
        client_nonce_proof(&garbage),
        Err(JwtError::InvalidKey {
            field: "connect_opts.nkey",
            ..
        })
    ));
    // An account key holding a valid signature is still not a client key.
    let account = KeyPair::new_account();
    let sig = b64(account.sign(s.nonce.as_bytes()).unwrap());
    let req = request_with(&s, |c| {
        c["nats"]["connect_opts"]["nkey"] = json!(account.public_key());
        c["nats"]["connect_opts"]["sig"] = json!(sig);
    });
    assert_eq!(
        client_nonce_proof(&req),
        Err(JwtError::WrongKeyKind {
            field: "connect_opts.nkey",
            expected: NkeyKind::User,
            found: account.public_key()
        })
    );
}

#[test]
fn the_proof_is_read_as_offered_for_the_callout_to_check() {
    // Whether the signature verifies is the callout's rule (it decides what the client signs);
    // the proof carries the claimed key, the nonce and the signature bytes exactly as sent.
    let s = Setup::new();
    let thief = KeyPair::new_user();
    let stolen = thief.sign(s.nonce.as_bytes()).unwrap();
    let req = request_with(&s, |c| {
        c["nats"]["connect_opts"]["sig"] = json!(b64(&stolen))
    });
    let proof = client_nonce_proof(&req).unwrap();
    assert_eq!(proof.nkey, s.client.public_key());
    assert_eq!(proof.nonce, s.nonce);
    assert_eq!(proof.signature.to_vec(), stolen);
    assert!(
        s.client
            .verify(s.nonce.as_bytes(), &proof.signature)
            .is_err()
    );
}

#[test]
fn garbage_signatures_are_refused() {
    let s = Setup::new();
    for sig in [
        "garbage!!".to_owned(),
        b64([1u8; 63]),
        b64([1u8; 65]),
        String::new() + "=",
    ] {
        let req = request_with(&s, |c| c["nats"]["connect_opts"]["sig"] = json!(sig));
        assert_eq!(
            client_nonce_proof(&req),
            Err(JwtError::MalformedNonceSignature),
            "{sig}"
        );
    }
    let req = request_with(&s, |c| {
        c["nats"]["connect_opts"]["sig"] = json!(b64([1u8; 64]))
    });
    assert_eq!(client_nonce_proof(&req).unwrap().signature, [1u8; 64]);
}

/// PROTOCOL.md §6.1: the three forms the callout reads (base64url without padding, standard
/// base64 with or without padding), lenient about the unused low bits of the last character,
/// and nothing else.
#[test]
fn nonce_signatures_are_read_in_exactly_three_forms() {
    use data_encoding::{BASE64, BASE64_NOPAD, BASE64URL};
    let s = Setup::new();
    let proof = |sig: &str| {
        client_nonce_proof(&request_with(&s, |c| {
            c["nats"]["connect_opts"]["sig"] = json!(sig)
        }))
    };
    // 0xfb bytes encode to `+/` in standard base64 and `-_` in base64url.
    let bytes = [0xfbu8; 64];
    let url = b64(bytes);
    let (std_pad, std_nopad) = (BASE64.encode(&bytes), BASE64_NOPAD.encode(&bytes));
    assert!(url.contains(['-', '_']) && std_pad.contains(['+', '/']) && std_pad.ends_with("=="));
    for accepted in [&url, &std_pad, &std_nopad] {
        assert_eq!(proof(accepted).unwrap().signature, bytes, "{accepted}");
    }
    // The 86th character carries 2 bits of the signature and 4 unused ones: set, they are
    // ignored (as Go's decoder, which nats-server uses, ignores them).
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let last = url.chars().last().unwrap();
    let index = alphabet.find(last).unwrap() | 0x0f;
    let sloppy = format!("{}{}", &url[..85], &alphabet[index..=index]);
    assert_ne!(sloppy, url);
    assert_eq!(proof(&sloppy).unwrap().signature, bytes);
    for refused in [
        BASE64URL.encode(&bytes),                  // base64url with padding
        url.replacen('-', "+", 1),                 // both alphabets
        format!("{}\n{}", &url[..43], &url[43..]), // a line break (Go's decoder would skip it)
        format!("{}\r\n{}", &url[..43], &url[43..]),
        format!(" {url}"),
        format!("{url}="),
        format!("{std_nopad}="), // padding that does not fit
    ] {
        assert_eq!(
            proof(&refused),
            Err(JwtError::MalformedNonceSignature),
            "{refused:?}"
        );
    }
}
