//! The named failures of this crate.

use std::fmt;

/// How many characters of an untrusted value an error keeps (the rest is cut, marked `…`).
///
/// Errors end up in logs; a request is attacker-influenced, so they never carry more of it
/// than it takes to recognise the value. Values are shown with `{:?}`, which escapes control
/// characters.
pub const MAX_ERROR_VALUE_CHARS: usize = 64;

/// Which of the three dot-separated parts of a JWT a decoding error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtPart {
    /// The first part: `{"typ":"JWT","alg":"ed25519-nkey"}`.
    Header,
    /// The second part: the claims.
    Claims,
    /// The third part: the ed25519 signature over `header.claims`.
    Signature,
}

impl fmt::Display for JwtPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JwtPart::Header => "header",
            JwtPart::Claims => "claims",
            JwtPart::Signature => "signature",
        })
    }
}

/// The kind of an nkey public key, told by its first letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NkeyKind {
    /// A server identity, `N...`: the issuer of authorization requests.
    Server,
    /// An account, `A...`: the issuer of user JWTs and authorization responses.
    Account,
    /// A user, `U...`: a connecting client's key, and the `user_nkey` of a request.
    User,
    /// Any other valid nkey kind (operator, cluster, module, service, curve).
    Other,
}

impl fmt::Display for NkeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NkeyKind::Server => "a server key (N...)",
            NkeyKind::Account => "an account key (A...)",
            NkeyKind::User => "a user key (U...)",
            NkeyKind::Other => "another kind of key",
        })
    }
}

/// Everything that can go wrong decoding, verifying or encoding a NATS JWT.
///
/// Decoding errors name the first check that failed; the checks run in the order listed on
/// [`decode_authorization_request`](crate::decode_authorization_request). Values taken from the
/// JWT are cut to [`MAX_ERROR_VALUE_CHARS`] characters. No error carries a password, token or
/// seed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The JWT is longer than the limit, checked before anything is parsed.
    #[error("JWT is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The JWT is not three parts separated by dots.
    #[error("JWT must be three dot-separated parts, found {parts}")]
    WrongPartCount {
        /// How many parts there were.
        parts: usize,
    },
    /// A part is not base64url without padding.
    #[error("JWT {part} is not base64url without padding")]
    BadBase64 {
        /// The part.
        part: JwtPart,
    },
    /// A part decoded but is not JSON of the expected shape.
    #[error("JWT {part} is not JSON of the expected shape: {detail}")]
    BadJson {
        /// The part.
        part: JwtPart,
        /// What the JSON parser said (positions and types, never values).
        detail: String,
    },
    /// The header's `typ` is not `JWT`.
    #[error("JWT header typ {found:?} is not \"JWT\"")]
    UnsupportedType {
        /// The `typ` found.
        found: String,
    },
    /// The header's `alg` is neither `ed25519-nkey` nor `ed25519`.
    #[error("JWT header alg {found:?} is neither \"ed25519-nkey\" nor \"ed25519\"")]
    UnsupportedAlgorithm {
        /// The `alg` found.
        found: String,
    },
    /// The claims' `nats.version` is not 2, the only version that signs `header.claims`.
    #[error("JWT claims version {found} is not supported (only version 2)")]
    UnsupportedVersion {
        /// The `nats.version` found (0 when absent).
        found: i64,
    },
    /// A field that must hold an nkey public key does not.
    #[error("{field} {found:?} is not a valid nkey public key")]
    InvalidKey {
        /// Which field, e.g. `iss` or `connect_opts.nkey`.
        field: &'static str,
        /// The value found.
        found: String,
    },
    /// A field holds a valid nkey, but of the wrong kind.
    #[error("{field} must be {expected}, found {found:?}")]
    WrongKeyKind {
        /// Which field.
        field: &'static str,
        /// The kind required.
        expected: NkeyKind,
        /// The key found.
        found: String,
    },
    /// The issuer is not the one expected (for a request: `iss` differs from
    /// `nats.server_id.id`).
    #[error("JWT issuer {found:?} is not the expected {expected:?}")]
    IssuerMismatch {
        /// The issuer expected.
        expected: String,
        /// The `iss` found.
        found: String,
    },
    /// The ed25519 signature of the JWT does not verify with the issuer's key.
    #[error("JWT signature does not verify with the issuer's key")]
    BadSignature,
    /// The audience (`aud`) is not the one expected.
    #[error("JWT audience {found:?} is not {expected:?}")]
    WrongAudience {
        /// The audience expected.
        expected: String,
        /// The `aud` found.
        found: String,
    },
    /// `nats.type` is not the one expected.
    #[error("JWT claims type {found:?} is not {expected:?}")]
    WrongClaimType {
        /// The type expected.
        expected: &'static str,
        /// The `nats.type` found.
        found: String,
    },
    /// `exp` has passed.
    #[error("JWT expired at {exp} (unix seconds), now is {now}")]
    Expired {
        /// The `exp` claim.
        exp: u64,
        /// The time given as now.
        now: u64,
    },
    /// `nbf` has not come yet.
    #[error("JWT is not valid before {nbf} (unix seconds), now is {now}")]
    NotYetValid {
        /// The `nbf` claim.
        nbf: u64,
        /// The time given as now.
        now: u64,
    },
    /// The connecting client presented no nkey (`connect_opts.nkey` is empty).
    #[error("client presented no nkey (connect_opts.nkey is empty)")]
    MissingClientKey,
    /// The connecting client sent no nonce signature (`connect_opts.sig` is empty).
    #[error("client sent no nonce signature (connect_opts.sig is empty)")]
    MissingNonceSignature,
    /// The request carries no nonce (`client_info.nonce` is empty), so there is nothing the
    /// client's signature could prove. nats-server only sends nonces when its config holds at
    /// least one nkey user.
    #[error("request carries no nonce (client_info.nonce is empty): cannot check the client's key")]
    MissingNonce,
    /// `connect_opts.sig` is neither base64url nor standard base64 of 64 bytes.
    #[error("client nonce signature is not base64 of a 64-byte ed25519 signature")]
    MalformedNonceSignature,
    /// The signing key is not an account key that holds its seed.
    #[error("signing key must be an account key (A...) with its seed: {reason}")]
    UnusableSigningKey {
        /// Why.
        reason: &'static str,
    },
    /// A permission subject would be refused by nats-server's user JWT validation.
    #[error("permission subject {subject:?} is invalid: {reason}")]
    InvalidSubject {
        /// The subject.
        subject: String,
        /// Why.
        reason: &'static str,
    },
    /// Both the allow and the deny list of a direction are empty, which nats-server reads as
    /// "everything allowed".
    #[error(
        "{direction} permissions have neither allow nor deny entries, which nats-server treats as \
         allow-all; allow \">\" explicitly if that is meant"
    )]
    UnrestrictedPermissions {
        /// `publish` or `subscribe`.
        direction: &'static str,
    },
    /// A user JWT needs an audience: the account the user is placed in.
    #[error("user JWT audience (the target account name) is empty")]
    EmptyAudience,
    /// An allow decision needs a user JWT, a deny decision a reason.
    #[error("authorization response {what} is empty")]
    EmptyDecision {
        /// `user JWT` or `deny reason`.
        what: &'static str,
    },
}

/// Cuts an untrusted value to [`MAX_ERROR_VALUE_CHARS`] characters for an error.
pub(crate) fn clip(value: &str) -> String {
    match value.char_indices().nth(MAX_ERROR_VALUE_CHARS) {
        None => value.to_owned(),
        Some((cut, _)) => format!("{}…", &value[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_values_and_cuts_long_ones() {
        assert_eq!(clip("abc"), "abc");
        let long = "é".repeat(MAX_ERROR_VALUE_CHARS + 10);
        let cut = clip(&long);
        assert_eq!(cut.chars().count(), MAX_ERROR_VALUE_CHARS + 1);
        assert!(cut.ends_with('…'));
    }
}
