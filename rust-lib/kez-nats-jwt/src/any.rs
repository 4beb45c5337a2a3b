//! Decoding any NATS JWT from a known issuer: for tests, and for looking at what was signed.

use crate::codec;
use crate::error::{JwtError, clip};

/// A NATS JWT whose signature by the expected issuer has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DecodedJwt {
    /// The header `alg`.
    pub alg: String,
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `aud`.
    pub audience: String,
    /// `name`.
    pub name: String,
    /// `iat`, if set.
    pub issued_at: Option<u64>,
    /// `exp`, if set.
    pub expires_at: Option<u64>,
    /// `nbf`, if set.
    pub not_before: Option<u64>,
    /// `jti`.
    pub jti: String,
    /// `nats.type`.
    pub claim_type: String,
    /// The whole `nats` section.
    pub nats: serde_json::Value,
}

/// Decodes a NATS JWT (version 2) of any type, requiring `iss == expected_issuer` and a
/// signature by that key, and checking `exp`/`nbf` against `now_unix`.
///
/// Runs the same envelope checks as
/// [`decode_authorization_request`](crate::decode_authorization_request) (size, parts,
/// base64, JSON, header, version), then [`JwtError::IssuerMismatch`], the key checks,
/// [`JwtError::BadSignature`], and the time checks. It checks nothing of the claims' meaning.
pub fn decode_any(jwt: &str, expected_issuer: &str, now_unix: u64) -> Result<DecodedJwt, JwtError> {
    let parsed = codec::parse(jwt)?;
    if parsed.claims.iss != expected_issuer {
        return Err(JwtError::IssuerMismatch {
            expected: clip(expected_issuer),
            found: clip(&parsed.claims.iss),
        });
    }
    let (kind, _) = codec::parse_key("iss", expected_issuer)?;
    parsed.verify_issuer(kind)?;
    parsed.claims.check_times(now_unix)?;
    let claims = parsed.claims;
    Ok(DecodedJwt {
        alg: parsed.alg,
        claim_type: claims.claim_type().to_owned(),
        issuer: claims.iss,
        subject: claims.sub,
        audience: claims.aud,
        name: claims.name,
        issued_at: codec::RawClaims::time(claims.iat),
        expires_at: codec::RawClaims::time(claims.exp),
        not_before: codec::RawClaims::time(claims.nbf),
        jti: claims.jti,
        nats: claims.nats,
    })
}
