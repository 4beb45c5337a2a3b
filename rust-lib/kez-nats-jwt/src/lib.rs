//! The NATS JWTs of nats-server's auth callout (nats-server 2.10 and later), hand-rolled.
//!
//! A pure crate: no I/O, no clock (every function that needs the time takes `now` in unix
//! seconds), no async. The callout service in kez-chat-server does the NATS part.
//!
//! The flow, in non-operator mode without an xkey (the only mode kez-chat uses):
//!
//! 1. A client connects with its key as an nkey (`U...`), signing the server's nonce.
//! 2. nats-server publishes an authorization request JWT on [`AUTH_CALLOUT_SUBJECT`]. It is
//!    signed by the server's key (`N...`). [`decode_authorization_request`] checks it.
//! 3. nats-server does **not** check the client's nonce signature in callout mode:
//!    [`client_nonce_proof`] reads the key, nonce and signature the client offers, and the
//!    callout checks it (for KEZ: `kez_core::connect::verify_proof`).
//! 4. The callout answers with [`encode_authorization_response`], signed by the configured
//!    issuer account key (`A...`): either [`Decision::Allow`] with a user JWT from
//!    [`encode_user_jwt`] (subject: the request's `user_nkey`; audience: the account to land
//!    in; permissions; expiry), or [`Decision::Deny`] with a reason for the server log.
//!
//! The wire format follows nats-server's JWT library (`nats-io/jwt/v2`): header
//! `{"typ":"JWT","alg":"ed25519-nkey"}`, parts in base64url without padding, an ed25519
//! signature over `header.claims`, claims version 2, and `jti` as base32 of SHA-512/256 over
//! the standard claims. The tests include a request captured from nats-server 2.15.1
//! (`tests/fixtures/`).
//!
//! ```
//! use kez_nats_jwt::{Decision, UserClaims, decode_any, encode_authorization_response, encode_user_jwt};
//!
//! let issuer = nkeys::KeyPair::new_account();
//! let server = nkeys::KeyPair::new_server().public_key();
//! let user_nkey = nkeys::KeyPair::new_user().public_key(); // from the request
//! let now = 1_800_000_000;
//!
//! let claims = UserClaims::new(&user_nkey, "APP", now)
//!     .with_expiry(now + 3600)
//!     .allow_publish(["app.requests.>"])
//!     .allow_subscribe(["_INBOX.me.>"]);
//! let user_jwt = encode_user_jwt(&issuer, &claims)?;
//! let response = encode_authorization_response(
//!     &issuer, &server, &user_nkey, Decision::Allow { user_jwt: &user_jwt }, now)?;
//!
//! let decoded = decode_any(&response, &issuer.public_key(), now)?;
//! assert_eq!(decoded.claim_type, "authorization_response");
//! assert_eq!(decoded.nats["jwt"], user_jwt.as_str());
//! # Ok::<(), kez_nats_jwt::JwtError>(())
//! ```

mod any;
mod codec;
mod error;
mod request;
mod response;
mod user;

pub use any::{DecodedJwt, decode_any};
pub use error::{JwtError, JwtPart, MAX_ERROR_VALUE_CHARS, NkeyKind};
pub use request::{
    AuthorizationRequest, ClientInfo, ClientNonceProof, ClientTls, ConnectOpts, ServerId,
    client_nonce_proof, decode_authorization_request,
};
pub use response::{Decision, encode_authorization_response, encode_authorization_response_for};
pub use user::{Permission, ResponsePermission, UserClaims, encode_user_jwt};

/// The subject nats-server sends authorization requests on.
pub const AUTH_CALLOUT_SUBJECT: &str = "$SYS.REQ.USER.AUTH";

/// The `aud` of every authorization request.
pub const AUTHORIZATION_REQUEST_AUDIENCE: &str = "nats-authorization-request";

/// The `nats.type` of an authorization request.
pub const AUTHORIZATION_REQUEST_TYPE: &str = "authorization_request";

/// The `nats.type` of an authorization response.
pub const AUTHORIZATION_RESPONSE_TYPE: &str = "authorization_response";

/// The `nats.type` of a user JWT.
pub const USER_TYPE: &str = "user";

/// The claims version written and accepted (`nats.version`).
pub const CLAIMS_VERSION: i64 = 2;

/// "No limit" for the `subs`, `data` and `payload` limits of a user JWT.
pub const NO_LIMIT: i64 = -1;

/// The longest JWT decoded, in bytes, checked before parsing. A real request is 1–2 KiB; TLS
/// client certificate chains in it make it larger.
pub const MAX_JWT_LEN: usize = 64 * 1024;
