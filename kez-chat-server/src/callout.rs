//! The NATS auth callout: a client's KEZ key is its NATS credential.
//!
//! nats-server sends every connecting client (except the server's own users) to
//! `$SYS.REQ.USER.AUTH` as a signed JWT. In callout mode nats-server does not check an nkey
//! client's signature itself, so this does: the client must have signed the connection nonce with
//! the key it names, under the KEZ connect tag (`kez_core::connect`). The key then gets one of
//! two permission profiles (PROTOCOL.md §6), or is refused if an operator disabled it.

use kez_core::connect::{LegacyProofs, ProofForm, verify_proof};
use kez_core::{PublicKey, Signature};
use kez_nats_jwt::{
    AuthorizationRequest, Decision, UserClaims, client_nonce_proof, decode_authorization_request,
    encode_authorization_response_for, encode_user_jwt,
};
use kez_proto::ErrorAnswer;
use kez_proto::answer::HandleRecord;
use kez_proto::subjects::{allowed_subscribe, registered_publish, unregistered_publish};
use nkeys::KeyPair;

use crate::limits::Limiter;
use crate::nats_conf::APP_ACCOUNT;
use crate::store::Store;

/// How long a granted authorization lasts. When it ends nats-server disconnects the client,
/// whose reconnect runs the callout again: a disabled user is out within this time.
pub const AUTHORIZATION_LIFETIME_SECS: u64 = 3600;
/// Most subscriptions one user connection may hold.
const MAX_SUBSCRIPTIONS: i64 = 1000;

/// Answers authorization requests.
pub struct Callout {
    issuer: KeyPair,
    store: Store,
    /// Unregistered-profile grants per client address.
    connect_limit: Option<Limiter>,
    /// Whether the untagged proofs of clients older than this release are accepted.
    legacy_proofs: LegacyProofs,
}

/// What the callout decided, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A registered, enabled key: the chat profile.
    Registered(PublicKey, ProofForm),
    /// A valid key without a handle: the narrow profile.
    Unregistered(PublicKey, ProofForm),
    /// Refused, with the reason nats-server logs.
    Denied(String),
}

impl Callout {
    /// A callout signing with `issuer` (an account key) and reading the registry in `store`,
    /// accepting connect proofs as `legacy_proofs` says.
    pub fn new(issuer: KeyPair, store: Store, legacy_proofs: LegacyProofs) -> Self {
        Callout {
            issuer,
            store,
            connect_limit: None,
            legacy_proofs,
        }
    }

    /// The same callout, granting the unregistered profile to at most what `limiter` allows
    /// per client address (`client_info.host`); more connections are refused.
    pub fn with_connect_limit(mut self, limiter: Limiter) -> Self {
        self.connect_limit = Some(limiter);
        self
    }

    /// The public key nats-server must be configured with (`auth_callout.issuer`).
    pub fn issuer_public_key(&self) -> String {
        self.issuer.public_key()
    }

    /// Decides on one request. Returns the signed response (empty when the request itself is
    /// unreadable: nats-server treats that as a refusal) and the verdict.
    pub async fn authorize(&self, request_jwt: &[u8], now: u64) -> (Vec<u8>, Verdict) {
        let text = String::from_utf8_lossy(request_jwt);
        let request = match decode_authorization_request(text.trim(), now) {
            Ok(request) => request,
            Err(err) => {
                return (
                    Vec::new(),
                    Verdict::Denied(format!("unreadable request: {err}")),
                );
            }
        };
        let (decision, verdict) = match self.decide(&request, now).await {
            Ok((user_jwt, verdict)) => (Ok(user_jwt), verdict),
            Err(reason) => (Err(reason.clone()), Verdict::Denied(reason)),
        };
        let decision = match &decision {
            Ok(user_jwt) => Decision::Allow { user_jwt },
            Err(reason) => Decision::Deny { reason },
        };
        match encode_authorization_response_for(&self.issuer, &request, decision, now) {
            Ok(response) => (response.into_bytes(), verdict),
            Err(err) => (
                Vec::new(),
                Verdict::Denied(format!("cannot sign the response: {err}")),
            ),
        }
    }

    async fn decide(
        &self,
        request: &AuthorizationRequest,
        now: u64,
    ) -> Result<(String, Verdict), String> {
        let proof = client_nonce_proof(request).map_err(|err| format!("kez: {err}"))?;
        let key = PublicKey::from_bytes(&proof.ed25519)
            .map_err(|err| format!("kez: client key refused: {err}"))?;
        let form = verify_proof(
            &key,
            &proof.nonce,
            &Signature::from_bytes(proof.signature),
            self.legacy_proofs,
        )
        .map_err(|err| format!("kez: {err}"))?;
        // Independent reads: both at once, so a connect waits for two round trips, not three.
        let (record, disabled) = tokio::join!(self.store.whois(key), self.store.disabled(key));
        let unavailable = |err: ErrorAnswer| format!("kez: registry unavailable: {}", err.message);
        let record = record.map_err(unavailable)?;
        if let Some(disabled) = disabled.map_err(unavailable)? {
            return Err(format!(
                "kez: {} is disabled by the operator",
                disabled.handle
            ));
        }
        let (claims, verdict) = match &record {
            Some(record) => (
                registered_profile(request, record, now),
                Verdict::Registered(key, form),
            ),
            None => {
                if let Some(limiter) = &self.connect_limit
                    && let Err(limited) = limiter.check(
                        &crate::limits::address_bucket(&request.client_info.host),
                        std::time::Instant::now(),
                    )
                {
                    return Err(format!(
                        "kez: too many unregistered connections from {}; retry in {} ms",
                        request.client_info.host,
                        limited.retry_after.as_millis().max(1)
                    ));
                }
                (
                    unregistered_profile(request, &key, now),
                    Verdict::Unregistered(key, form),
                )
            }
        };
        let user_jwt =
            encode_user_jwt(&self.issuer, &claims).map_err(|err| format!("kez: {err}"))?;
        Ok((user_jwt, verdict))
    }
}

fn base_claims(request: &AuthorizationRequest, name: String, now: u64) -> UserClaims {
    UserClaims::new(request.user_nkey.clone(), APP_ACCOUNT, now)
        .with_name(name)
        .with_expiry(now + AUTHORIZATION_LIFETIME_SECS)
        .with_max_subscriptions(MAX_SUBSCRIPTIONS)
}

/// A key without a handle may register, look handles up, read server info, and hear replies on
/// its own reply prefix. Nothing else.
pub fn unregistered_profile(
    request: &AuthorizationRequest,
    key: &PublicKey,
    now: u64,
) -> UserClaims {
    base_claims(request, key.to_string(), now)
        .allow_publish(unregistered_publish())
        .allow_subscribe(allowed_subscribe(key))
}

/// A registered key may use every kez service (sending mail through `kez.mail.send`, never
/// into an inbox directly), read and acknowledge only its own inbox consumer, and hear replies
/// only on its own reply prefix.
pub fn registered_profile(
    request: &AuthorizationRequest,
    record: &HandleRecord,
    now: u64,
) -> UserClaims {
    base_claims(request, record.handle.to_string(), now)
        .allow_publish(registered_publish(&record.key))
        .allow_subscribe(allowed_subscribe(&record.key))
}
