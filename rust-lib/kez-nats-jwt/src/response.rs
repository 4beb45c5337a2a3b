//! The authorization response the callout sends back: a signed "yes, as this user" or
//! "no, because".

use nkeys::KeyPair;
use serde::Serialize;

use crate::codec::{self, StdClaims};
use crate::error::{JwtError, NkeyKind};
use crate::request::AuthorizationRequest;
use crate::{AUTHORIZATION_RESPONSE_TYPE, CLAIMS_VERSION};

/// What the callout decided about a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Let the client in as the user JWT says (made by [`encode_user_jwt`](crate::encode_user_jwt)).
    Allow {
        /// The signed user JWT.
        user_jwt: &'a str,
    },
    /// Refuse the client. nats-server logs the reason; the client only sees
    /// "Authorization Violation".
    Deny {
        /// Why, for the server log.
        reason: &'a str,
    },
}

/// The `nats` section of a response, in the field order of nats-server's JWT library.
#[derive(Serialize)]
struct ResponseNats<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    jwt: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    error: &'a str,
    #[serde(rename = "type")]
    claim_type: &'static str,
    version: i64,
}

/// Signs an authorization response with the callout issuer account key (`A...`).
///
/// `sub` is `user_nkey` (the request's `user_nkey`), `aud` is `server_id` (the request's
/// `server_id.id`, `N...`), `iat` is `issued_at` (unix seconds), and `nats` holds the user JWT
/// or the error. The response has no `exp`. nats-server refuses a response whose subject,
/// audience or issuer differ from what it asked for, or that holds neither or both of `jwt`
/// and `error`; this refuses the same before signing ([`JwtError::WrongKeyKind`],
/// [`JwtError::InvalidKey`], [`JwtError::EmptyDecision`]).
pub fn encode_authorization_response(
    issuer: &KeyPair,
    server_id: &str,
    user_nkey: &str,
    decision: Decision<'_>,
    issued_at: u64,
) -> Result<String, JwtError> {
    codec::expect_key("response audience (server id)", server_id, NkeyKind::Server)?;
    codec::expect_key("response subject (user_nkey)", user_nkey, NkeyKind::User)?;
    let (jwt, error) = match decision {
        Decision::Allow { user_jwt: "" } => {
            return Err(JwtError::EmptyDecision { what: "user JWT" });
        }
        Decision::Deny { reason: "" } => {
            return Err(JwtError::EmptyDecision {
                what: "deny reason",
            });
        }
        Decision::Allow { user_jwt } => (user_jwt, ""),
        Decision::Deny { reason } => ("", reason),
    };
    let nats = ResponseNats {
        jwt,
        error,
        claim_type: AUTHORIZATION_RESPONSE_TYPE,
        version: CLAIMS_VERSION,
    };
    let std = StdClaims {
        aud: server_id,
        exp: 0,
        jti: "",
        iat: issued_at,
        iss: "",
        name: "",
        nbf: 0,
        sub: user_nkey,
    };
    codec::encode(issuer, std, &nats)
}

/// [`encode_authorization_response`] addressed from a decoded request: to its
/// `server_id.id`, about its `user_nkey`.
pub fn encode_authorization_response_for(
    issuer: &KeyPair,
    request: &AuthorizationRequest,
    decision: Decision<'_>,
    issued_at: u64,
) -> Result<String, JwtError> {
    encode_authorization_response(
        issuer,
        &request.server_id.id,
        &request.user_nkey,
        decision,
        issued_at,
    )
}
