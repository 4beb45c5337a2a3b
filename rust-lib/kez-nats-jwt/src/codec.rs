//! The JWT envelope shared by every claim kind: parts, base64, header, standard claims,
//! signature, `jti`, and nkey parsing.

use std::sync::LazyLock;

use data_encoding::{BASE32_NOPAD, BASE64, BASE64_NOPAD, BASE64URL_NOPAD, Encoding};
use ed25519_dalek::{Signature, VerifyingKey};
use nkeys::{KeyPair, KeyPairType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512_256};

use crate::error::{JwtError, JwtPart, NkeyKind, clip};
use crate::{CLAIMS_VERSION, MAX_JWT_LEN};

/// The header every JWT this crate writes carries, as nats-server's JWT library writes it.
const HEADER_JSON: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// base64url without padding, not insisting that unused trailing bits are zero (as Go's
/// `base64.RawURLEncoding`, which nats-server uses, does not).
static URL_NOPAD: LazyLock<Encoding> = LazyLock::new(|| lenient(&BASE64URL_NOPAD));
/// Standard base64 with padding, lenient about trailing bits like Go's `base64.StdEncoding`.
static STD_PAD: LazyLock<Encoding> = LazyLock::new(|| lenient(&BASE64));
/// Standard base64 without padding, lenient about trailing bits.
static STD_NOPAD: LazyLock<Encoding> = LazyLock::new(|| lenient(&BASE64_NOPAD));

fn lenient(encoding: &Encoding) -> Encoding {
    let mut spec = encoding.specification();
    spec.check_trailing_bits = false;
    spec.encoding()
        .expect("a built-in base64 specification with check_trailing_bits off is valid")
}

/// Decodes a JWT part (base64url, no padding).
pub(crate) fn decode_part(part: JwtPart, text: &str) -> Result<Vec<u8>, JwtError> {
    URL_NOPAD
        .decode(text.as_bytes())
        .map_err(|_| JwtError::BadBase64 { part })
}

/// Decodes a client's nonce signature (PROTOCOL.md §6.1): base64url without padding, which
/// clients send, else standard base64 with padding (what nats-server itself also accepts), else
/// standard base64 without padding (which nats-server does not; the callout always has, and
/// still does, so that no client it admitted before is refused).
pub(crate) fn decode_nonce_signature(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    URL_NOPAD
        .decode(bytes)
        .or_else(|_| STD_PAD.decode(bytes))
        .or_else(|_| STD_NOPAD.decode(bytes))
        .ok()
}

/// The JWT header.
#[derive(Debug, Deserialize)]
struct Header {
    #[serde(default)]
    typ: String,
    #[serde(default)]
    alg: String,
}

/// The standard claims as decoded. Absent fields are empty or zero, as in nats-server.
#[derive(Debug, Deserialize)]
pub(crate) struct RawClaims {
    #[serde(default)]
    pub aud: String,
    #[serde(default)]
    pub exp: i64,
    #[serde(default)]
    pub jti: String,
    #[serde(default)]
    pub iat: i64,
    #[serde(default)]
    pub iss: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub nbf: i64,
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub nats: serde_json::Value,
}

impl RawClaims {
    /// `nats.type`, or empty.
    pub fn claim_type(&self) -> &str {
        self.nats
            .get("type")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
    }

    /// `nats.version`, or 0.
    fn version(&self) -> i64 {
        self.nats
            .get("version")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or_default()
    }

    /// A positive time claim, or `None` (nats-server ignores zero and negative ones).
    pub fn time(value: i64) -> Option<u64> {
        u64::try_from(value).ok().filter(|&t| t > 0)
    }

    /// Refuses the claims if `exp` has passed or `nbf` has not come, with the comparisons
    /// nats-server makes (`now > exp`, `nbf > now`).
    pub fn check_times(&self, now: u64) -> Result<(), JwtError> {
        match (Self::time(self.exp), Self::time(self.nbf)) {
            (Some(exp), _) if now > exp => Err(JwtError::Expired { exp, now }),
            (_, Some(nbf)) if nbf > now => Err(JwtError::NotYetValid { nbf, now }),
            _ => Ok(()),
        }
    }
}

/// A JWT split, its header checked, its claims parsed, its signature decoded but not yet
/// verified.
#[derive(Debug)]
pub(crate) struct Parsed<'a> {
    /// `header.claims`, the bytes the signature covers.
    signing_input: &'a str,
    signature: [u8; 64],
    /// The claims.
    pub claims: RawClaims,
    /// The header `alg`.
    pub alg: String,
}

/// Checks the size, splits the JWT, checks the header, parses the claims, decodes the
/// signature and checks the claims version. Verifies nothing cryptographic.
pub(crate) fn parse(jwt: &str) -> Result<Parsed<'_>, JwtError> {
    if jwt.len() > MAX_JWT_LEN {
        return Err(JwtError::TooLarge {
            len: jwt.len(),
            max: MAX_JWT_LEN,
        });
    }
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header_b64, claims_b64, sig_b64] = parts[..] else {
        return Err(JwtError::WrongPartCount { parts: parts.len() });
    };

    let header: Header = parse_json(JwtPart::Header, &decode_part(JwtPart::Header, header_b64)?)?;
    if !header.typ.eq_ignore_ascii_case("JWT") {
        return Err(JwtError::UnsupportedType {
            found: clip(&header.typ),
        });
    }
    let alg = header.alg.to_ascii_lowercase();
    if alg != "ed25519-nkey" && alg != "ed25519" {
        return Err(JwtError::UnsupportedAlgorithm {
            found: clip(&header.alg),
        });
    }

    let claims: RawClaims =
        parse_json(JwtPart::Claims, &decode_part(JwtPart::Claims, claims_b64)?)?;
    let signature: [u8; 64] = decode_part(JwtPart::Signature, sig_b64)?
        .try_into()
        .map_err(|_| JwtError::BadSignature)?;

    // Version 1 JWTs were signed over the claims part alone; nats-server has written version 2
    // (signed over `header.claims`) since auth callout exists.
    if claims.version() != CLAIMS_VERSION {
        return Err(JwtError::UnsupportedVersion {
            found: claims.version(),
        });
    }

    Ok(Parsed {
        signing_input: &jwt[..header_b64.len() + 1 + claims_b64.len()],
        signature,
        claims,
        alg: header.alg,
    })
}

fn parse_json<T: for<'de> Deserialize<'de>>(part: JwtPart, bytes: &[u8]) -> Result<T, JwtError> {
    serde_json::from_slice(bytes).map_err(|e| JwtError::BadJson {
        part,
        detail: json_error_detail(&e),
    })
}

/// A serde_json error without the value that caused it (its message may quote one).
pub(crate) fn json_error_detail(e: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

impl Parsed<'_> {
    /// Checks the issuer is a key of `kind` on the curve and the signature verifies with it.
    pub fn verify_issuer(&self, kind: NkeyKind) -> Result<(), JwtError> {
        let raw = expect_key("iss", &self.claims.iss, kind)?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|_| JwtError::InvalidKey {
            field: "iss",
            found: clip(&self.claims.iss),
        })?;
        key.verify_strict(
            self.signing_input.as_bytes(),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| JwtError::BadSignature)
    }
}

/// Parses an nkey public key as nats-server's nkeys library does (a known prefix, base32, the
/// CRC, 32 key bytes), returning its kind and its raw bytes. Whether the bytes are a curve
/// point is not asked here: decoding one costs a square root (~4 µs here, five more per
/// authorization otherwise), and only a key that verifies a signature needs it
/// ([`Parsed::verify_issuer`]; the application checks a client's key with its own rules).
pub(crate) fn parse_key(field: &'static str, key: &str) -> Result<(NkeyKind, [u8; 32]), JwtError> {
    let invalid = || JwtError::InvalidKey {
        field,
        found: clip(key),
    };
    let (prefix, raw) = nkeys::from_public_key(key).map_err(|_| invalid())?;
    let kind = match KeyPairType::from(prefix) {
        KeyPairType::Server => NkeyKind::Server,
        KeyPairType::Account => NkeyKind::Account,
        KeyPairType::User => NkeyKind::User,
        _ => NkeyKind::Other,
    };
    Ok((kind, raw))
}

/// Parses an nkey public key that must be of `kind` ([`parse_key`]), returning its raw bytes.
pub(crate) fn expect_key(
    field: &'static str,
    key: &str,
    kind: NkeyKind,
) -> Result<[u8; 32], JwtError> {
    let (found, raw) = parse_key(field, key)?;
    if found != kind {
        return Err(JwtError::WrongKeyKind {
            field,
            expected: kind,
            found: clip(key),
        });
    }
    Ok(raw)
}

/// The standard claims as written, in the field order of nats-server's JWT library. Empty and
/// zero fields are left out, as that library does.
#[derive(Debug, Serialize)]
pub(crate) struct StdClaims<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    pub aud: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    pub exp: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub jti: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    pub iat: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub iss: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub name: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    pub nbf: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub sub: &'a str,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The `jti` nats-server's JWT library writes: base32 (no padding) of SHA-512/256 over the
/// JSON of the standard claims alone (not `nats`), with `jti` empty and so left out.
///
/// nats-server does not check `jti`. Go's JSON writer escapes `<`, `>` and `&` in strings
/// (`\u003c`...) where serde_json does not, so for values holding them the two differ.
pub(crate) fn jti(claims: &StdClaims<'_>) -> String {
    let unnamed = StdClaims { jti: "", ..*claims };
    let json = serde_json::to_vec(&unnamed).expect("standard claims always serialize");
    BASE32_NOPAD.encode(&Sha512_256::digest(&json))
}

#[derive(Serialize)]
struct Full<'a, N: Serialize> {
    #[serde(flatten)]
    std: &'a StdClaims<'a>,
    nats: &'a N,
}

/// Signs `nats` under standard claims with an account key: sets `iss` to the key and `jti`
/// to the hash of the standard claims.
pub(crate) fn encode<N: Serialize>(
    issuer: &KeyPair,
    std: StdClaims<'_>,
    nats: &N,
) -> Result<String, JwtError> {
    if issuer.key_pair_type() != KeyPairType::Account {
        return Err(JwtError::UnusableSigningKey {
            reason: "it is not an account key",
        });
    }
    let iss = issuer.public_key();
    let std = StdClaims { iss: &iss, ..std };
    let jti = jti(&std);
    let std = StdClaims { jti: &jti, ..std };
    let claims =
        serde_json::to_vec(&Full { std: &std, nats }).expect("claims always serialize to JSON");

    let mut jwt = URL_NOPAD.encode(HEADER_JSON.as_bytes());
    jwt.push('.');
    jwt.push_str(&URL_NOPAD.encode(&claims));
    let signature = issuer
        .sign(jwt.as_bytes())
        .map_err(|_| JwtError::UnusableSigningKey {
            reason: "it holds no seed",
        })?;
    jwt.push('.');
    jwt.push_str(&URL_NOPAD.encode(&signature));
    Ok(jwt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_the_one_nats_writes() {
        assert_eq!(
            URL_NOPAD.encode(HEADER_JSON.as_bytes()),
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ"
        );
    }

    #[test]
    fn nonce_signatures_decode_in_every_form_the_server_accepts() {
        let bytes: Vec<u8> = (0u8..64)
            .map(|i| i.wrapping_mul(37).wrapping_add(250))
            .collect();
        for text in [
            BASE64URL_NOPAD.encode(&bytes),
            BASE64.encode(&bytes),
            BASE64_NOPAD.encode(&bytes),
        ] {
            assert_eq!(
                decode_nonce_signature(&text).as_deref(),
                Some(&bytes[..]),
                "{text}"
            );
        }
        assert_eq!(decode_nonce_signature("not base64!"), None);
    }

    #[test]
    fn parts_are_lenient_about_trailing_bits_like_go() {
        // "QR" has non-zero unused bits; Go's RawURLEncoding accepts it as "A".
        assert_eq!(decode_part(JwtPart::Claims, "QR").unwrap(), b"A");
        assert_eq!(
            decode_part(JwtPart::Claims, "QQ=="),
            Err(JwtError::BadBase64 {
                part: JwtPart::Claims
            })
        );
    }

    #[test]
    fn jti_leaves_out_empty_fields_and_hashes_the_standard_claims() {
        let std = StdClaims {
            aud: "APP",
            exp: 0,
            jti: "ignored",
            iat: 1,
            iss: "I",
            name: "",
            nbf: 0,
            sub: "S",
        };
        let expected = BASE32_NOPAD.encode(&Sha512_256::digest(
            br#"{"aud":"APP","iat":1,"iss":"I","sub":"S"}"#,
        ));
        assert_eq!(jti(&std), expected);
        assert_eq!(expected.len(), 52);
    }
}
