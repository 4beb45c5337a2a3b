//! The authorization request nats-server sends on `$SYS.REQ.USER.AUTH`, and the check of the
//! client's nonce signature inside it.

use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::codec::{self, RawClaims, json_error_detail};
use crate::error::{JwtError, JwtPart, NkeyKind, clip};
use crate::{AUTHORIZATION_REQUEST_AUDIENCE, AUTHORIZATION_REQUEST_TYPE};

/// The server that sent a request (`nats.server_id`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ServerId {
    /// The server's name (its id unless configured).
    #[serde(default)]
    pub name: String,
    /// The host the server listens on.
    #[serde(default)]
    pub host: String,
    /// The server's public nkey, `N...`: the request's issuer and the response's audience.
    #[serde(default)]
    pub id: String,
    /// The server's version, e.g. `2.15.1`.
    #[serde(default)]
    pub version: String,
    /// The cluster name, if clustered.
    #[serde(default)]
    pub cluster: String,
    /// The server's configured tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The server's curve key (`X...`) when the callout is configured with an xkey.
    #[serde(default)]
    pub xkey: String,
}

/// What the server knows of the connecting client (`nats.client_info`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ClientInfo {
    /// The client's IP address.
    #[serde(default)]
    pub host: String,
    /// The server's connection id for the client.
    #[serde(default)]
    pub id: u64,
    /// The raw user the client authenticated as, if any.
    #[serde(default)]
    pub user: String,
    /// The connection name the client gave.
    #[serde(default)]
    pub name: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Name tag.
    #[serde(default)]
    pub name_tag: String,
    /// Connection kind, e.g. `Client`.
    #[serde(default)]
    pub kind: String,
    /// Client type, e.g. `nats`, `websocket`, `mqtt`.
    #[serde(default, rename = "type")]
    pub client_type: String,
    /// MQTT client id, for MQTT clients.
    #[serde(default)]
    pub mqtt_id: String,
    /// The nonce the server sent the client in INFO: the exact text the client signed. Present
    /// only when the client sent a signature.
    #[serde(default)]
    pub nonce: String,
}

/// What the client sent in CONNECT (`nats.connect_opts`).
///
/// The password and token are not kept: only whether the client sent one.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ConnectOpts {
    /// A user JWT the client presented. It may be a bearer credential, so `Debug` shows only
    /// its length.
    #[serde(default)]
    pub jwt: String,
    /// The client's public nkey, `U...`.
    #[serde(default)]
    pub nkey: String,
    /// The client's signature over the nonce (base64url, or standard base64).
    #[serde(default)]
    pub sig: String,
    /// Whether the client sent a non-empty `auth_token` (its value is dropped while parsing).
    #[serde(default, rename = "auth_token", deserialize_with = "non_empty_string")]
    pub has_auth_token: bool,
    /// The user name the client sent.
    #[serde(default)]
    pub user: String,
    /// Whether the client sent a non-empty password (its value is dropped while parsing).
    #[serde(default, rename = "pass", deserialize_with = "non_empty_string")]
    pub has_password: bool,
    /// The connection name.
    #[serde(default)]
    pub name: String,
    /// The client library's language, e.g. `rust`, `python3`.
    #[serde(default)]
    pub lang: String,
    /// The client library's version.
    #[serde(default)]
    pub version: String,
    /// The protocol version the client speaks.
    #[serde(default)]
    pub protocol: i64,
}

impl fmt::Debug for ConnectOpts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOpts")
            .field("jwt", &format_args!("<{} bytes>", self.jwt.len()))
            .field("nkey", &self.nkey)
            .field("sig", &self.sig)
            .field("has_auth_token", &self.has_auth_token)
            .field("user", &self.user)
            .field("has_password", &self.has_password)
            .field("name", &self.name)
            .field("lang", &self.lang)
            .field("version", &self.version)
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// Reads a string field, keeping only whether it was non-empty. `null` reads as empty.
fn non_empty_string<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
            Ok(!v.is_empty())
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<bool, E> {
            Ok(false)
        }
    }
    d.deserialize_any(Visitor)
}

/// The client's TLS state (`nats.client_tls`), when it connected over TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ClientTls {
    /// TLS version, e.g. `1.3`.
    #[serde(default)]
    pub version: String,
    /// Cipher suite.
    #[serde(default)]
    pub cipher: String,
    /// PEM client certificates, when not verified.
    #[serde(default)]
    pub certs: Vec<String>,
    /// PEM verified chains, the client's certificate first.
    #[serde(default)]
    pub verified_chains: Vec<Vec<String>>,
    /// The SNI server name.
    #[serde(default)]
    pub server_name: String,
}

/// The `nats` section of a request.
#[derive(Deserialize)]
struct RequestNats {
    #[serde(default)]
    server_id: ServerId,
    #[serde(default)]
    user_nkey: String,
    #[serde(default)]
    client_info: ClientInfo,
    #[serde(default)]
    connect_opts: ConnectOpts,
    #[serde(default)]
    client_tls: Option<ClientTls>,
    #[serde(default)]
    request_nonce: String,
    #[serde(default)]
    tags: Vec<String>,
}

/// A verified authorization request: its server signature, issuer, audience, type and times
/// have been checked by [`decode_authorization_request`]. The client's own signature has not:
/// that is [`client_nonce_proof`] and the application's check of it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthorizationRequest {
    /// `iss`: the server's public key, `N...` (equal to `server_id.id`).
    pub issuer: String,
    /// `sub`: the configured callout issuer account (`A...`) in non-operator mode.
    pub subject: String,
    /// `aud`: always [`AUTHORIZATION_REQUEST_AUDIENCE`].
    pub audience: String,
    /// `iat`, unix seconds, if set.
    pub issued_at: Option<u64>,
    /// `exp`, unix seconds, if set: nats-server sets it to the time it stops waiting for the
    /// answer (now + the authorization timeout).
    pub expires_at: Option<u64>,
    /// `jti`.
    pub jti: String,
    /// The header `alg` (`ed25519-nkey`).
    pub alg: String,
    /// The server that asks.
    pub server_id: ServerId,
    /// A fresh user key (`U...`) the server made for this connection attempt: the subject of
    /// the response and of the user JWT in it.
    pub user_nkey: String,
    /// The client as the server sees it.
    pub client_info: ClientInfo,
    /// What the client sent in CONNECT.
    pub connect_opts: ConnectOpts,
    /// TLS state, for TLS clients.
    pub client_tls: Option<ClientTls>,
    /// `request_nonce`, if the server sent one.
    pub request_nonce: String,
    /// Tags of the request.
    pub tags: Vec<String>,
}

/// Decodes and verifies an authorization request JWT as received on `$SYS.REQ.USER.AUTH`
/// (the plain JWT text; the callout is not configured with an xkey).
///
/// Checks, in order, each failure with its own [`JwtError`]:
/// 1. size at most [`MAX_JWT_LEN`](crate::MAX_JWT_LEN) bytes, before any parsing
///    ([`TooLarge`](JwtError::TooLarge));
/// 2. three parts ([`WrongPartCount`](JwtError::WrongPartCount)), each base64url
///    ([`BadBase64`](JwtError::BadBase64)), header and claims JSON
///    ([`BadJson`](JwtError::BadJson));
/// 3. header `typ` is `JWT`, `alg` is `ed25519-nkey` or `ed25519`
///    ([`UnsupportedType`](JwtError::UnsupportedType),
///    [`UnsupportedAlgorithm`](JwtError::UnsupportedAlgorithm)); the signature is 64 bytes;
/// 4. `nats.version` is 2 ([`UnsupportedVersion`](JwtError::UnsupportedVersion));
/// 5. `iss` is a server key, `N...` ([`InvalidKey`](JwtError::InvalidKey),
///    [`WrongKeyKind`](JwtError::WrongKeyKind)), and the signature over `header.claims`
///    verifies with it ([`BadSignature`](JwtError::BadSignature));
/// 6. `nats.type` is `authorization_request` ([`WrongClaimType`](JwtError::WrongClaimType)),
///    and `aud` is `nats-authorization-request` ([`WrongAudience`](JwtError::WrongAudience));
/// 7. `exp`, if set, has not passed (`now_unix > exp` is [`Expired`](JwtError::Expired)), and
///    `nbf`, if set, has come ([`NotYetValid`](JwtError::NotYetValid)); the comparisons are
///    nats-server's, with no leeway: the server stops waiting for an answer at `exp` anyway;
/// 8. `iss` equals `nats.server_id.id` ([`IssuerMismatch`](JwtError::IssuerMismatch)), and
///    `nats.user_nkey` is a user key, `U...` ([`InvalidKey`](JwtError::InvalidKey),
///    [`WrongKeyKind`](JwtError::WrongKeyKind)).
///
/// Which server keys to trust is the caller's choice: anyone can mint a validly signed request
/// with a server key of their own. What makes a request trustworthy is that it arrived on
/// `$SYS.REQ.USER.AUTH`, which only the server can publish to; the signature check guards the
/// parsing, not the origin.
pub fn decode_authorization_request(
    jwt: &str,
    now_unix: u64,
) -> Result<AuthorizationRequest, JwtError> {
    let parsed = codec::parse(jwt)?;
    parsed.verify_issuer(NkeyKind::Server)?;
    let claims = parsed.claims;

    if claims.claim_type() != AUTHORIZATION_REQUEST_TYPE {
        return Err(JwtError::WrongClaimType {
            expected: AUTHORIZATION_REQUEST_TYPE,
            found: clip(claims.claim_type()),
        });
    }
    if claims.aud != AUTHORIZATION_REQUEST_AUDIENCE {
        return Err(JwtError::WrongAudience {
            expected: AUTHORIZATION_REQUEST_AUDIENCE.to_owned(),
            found: clip(&claims.aud),
        });
    }
    claims.check_times(now_unix)?;
    let RawClaims {
        aud,
        exp,
        jti,
        iat,
        iss,
        sub,
        nats,
        ..
    } = claims;
    let nats: RequestNats = serde_json::from_value(nats).map_err(|e| JwtError::BadJson {
        part: JwtPart::Claims,
        detail: json_error_detail(&e),
    })?;
    if nats.server_id.id != iss {
        return Err(JwtError::IssuerMismatch {
            expected: clip(&nats.server_id.id),
            found: clip(&iss),
        });
    }
    codec::expect_key("nats.user_nkey", &nats.user_nkey, NkeyKind::User)?;

    Ok(AuthorizationRequest {
        issuer: iss,
        subject: sub,
        audience: aud,
        issued_at: RawClaims::time(iat),
        expires_at: RawClaims::time(exp),
        jti,
        alg: parsed.alg,
        server_id: nats.server_id,
        user_nkey: nats.user_nkey,
        client_info: nats.client_info,
        connect_opts: nats.connect_opts,
        client_tls: nats.client_tls,
        request_nonce: nats.request_nonce,
        tags: nats.tags,
    })
}

/// What a connecting client offers as proof of its key: the key it claims, the nonce the
/// server sent it and its signature. Not verified: what the signature must cover is the
/// application's rule (KEZ: `kez_core::connect::verify_proof`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientNonceProof {
    /// The nkey, `U...`, as the client sent it.
    pub nkey: String,
    /// The raw ed25519 public key inside it.
    pub ed25519: [u8; 32],
    /// `client_info.nonce`: the text the server sent the client in INFO.
    pub nonce: String,
    /// The 64 signature bytes of `connect_opts.sig`.
    pub signature: [u8; 64],
}

/// Reads the connecting client's proof of its key from the request: `connect_opts.nkey` (a
/// user key, `U...`), `client_info.nonce` and `connect_opts.sig`.
///
/// nats-server does not check the signature in callout mode; the callout must, over what its
/// protocol says the client signs. The signature is decoded as PROTOCOL.md §6.1 says (base64url
/// without padding, else standard base64 with or without padding). Errors:
/// [`MissingClientKey`](JwtError::MissingClientKey), [`InvalidKey`](JwtError::InvalidKey),
/// [`WrongKeyKind`](JwtError::WrongKeyKind),
/// [`MissingNonceSignature`](JwtError::MissingNonceSignature),
/// [`MissingNonce`](JwtError::MissingNonce) (an empty nonce is never accepted),
/// [`MalformedNonceSignature`](JwtError::MalformedNonceSignature).
pub fn client_nonce_proof(request: &AuthorizationRequest) -> Result<ClientNonceProof, JwtError> {
    let opts = &request.connect_opts;
    if opts.nkey.is_empty() {
        return Err(JwtError::MissingClientKey);
    }
    let raw = codec::expect_key("connect_opts.nkey", &opts.nkey, NkeyKind::User)?;
    if opts.sig.is_empty() {
        return Err(JwtError::MissingNonceSignature);
    }
    let nonce = &request.client_info.nonce;
    if nonce.is_empty() {
        return Err(JwtError::MissingNonce);
    }
    let signature: [u8; 64] = codec::decode_nonce_signature(&opts.sig)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(JwtError::MalformedNonceSignature)?;
    Ok(ClientNonceProof {
        nkey: opts.nkey.clone(),
        ed25519: raw,
        nonce: nonce.clone(),
        signature,
    })
}
