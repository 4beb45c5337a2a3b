//! The NATS auth callout: a client's KEZ key is its NATS credential.
//!
//! nats-server sends every connecting client (except the server's own users) to
//! `$SYS.REQ.USER.AUTH` as a signed JWT. In callout mode nats-server does not check an nkey
//! client's signature itself, so this does: the client must have signed the connection nonce with
//! the key it names, under the KEZ connect tag (`kez_core::connect`). The key then gets one of
//! three permission profiles (PROTOCOL.md §6.2): a registered key's, an active device's (of a
//! registered identity, as the device index says), or the narrow one of a key without a
//! handle; a revoked device, a device still being added, and a key an operator disabled (or a
//! device of one) are refused.

use kez_core::connect::{LegacyProofs, ProofForm, verify_proof};
use kez_core::{PublicKey, Signature};
use kez_nats_jwt::{
    AuthorizationRequest, Decision, UserClaims, client_nonce_proof, decode_authorization_request,
    encode_authorization_response_for, encode_user_jwt,
};
use kez_proto::ErrorAnswer;
use kez_proto::answer::HandleRecord;
use kez_proto::federation::claimed_domain;
use kez_proto::subjects::{
    device_subscribe, peer_publish, registered_publish, registered_subscribe, unregistered_publish,
    unregistered_subscribe,
};
use nkeys::KeyPair;

use crate::federation::{DIALBACK_TIMEOUT, Federation, PinDecision, pin_decision};
use crate::limits::Limiter;
use crate::nats_conf::APP_ACCOUNT;
use crate::store::{DeviceRecord, DeviceState, DisabledRecord, Store};

/// How long a granted authorization lasts. When it ends nats-server disconnects the client,
/// whose reconnect runs the callout again: a disabled user is out within this time.
pub const AUTHORIZATION_LIFETIME_SECS: u64 = 3600;

/// When a granted authorization starts and ends, in seconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// When it was granted.
    pub from: u64,
    /// When nats-server ends it (and the connection).
    pub until: u64,
}

impl Validity {
    /// An authorization granted at `now` for `lifetime` seconds.
    pub fn starting(now: u64, lifetime: u64) -> Validity {
        Validity {
            from: now,
            until: now.saturating_add(lifetime),
        }
    }
}
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
    /// The nkeys of the server's own users, refused here: one reaching the callout is missing
    /// from nats-server's `auth_users` (a config older than the key), and must not be let in
    /// as a user of `APP`, where the server would take it for its own.
    server_users: Vec<String>,
    /// Federation, when on: peers are let in.
    federation: Option<std::sync::Arc<Federation>>,
    /// The registrations of keys seen connecting.
    registrations: Registrations,
    /// How long a granted authorization lasts, in seconds.
    lifetime: u64,
}

/// Most registrations [`Registrations`] remembers (~150 bytes each); past it, it starts afresh.
const MAX_KNOWN_REGISTRATIONS: usize = 100_000;

/// The handle records of keys this instance saw registered, so that their reconnects (a
/// broker restart: every user at once) read two entries, their disabled state and device
/// index entry, in one round trip instead of four in two. A registration, once complete (the
/// handle record names the key), is never changed or deleted by any instance or command, so a
/// remembered one never goes stale, across instances too. What can change at any moment,
/// written by any instance or by the operator's `admin` process, is never remembered: whether
/// the key is disabled and whether its chain revoked it are read at every connect, so a disable
/// or a revocation refuses the next connect at once. Bounded, and cleared when full.
#[derive(Debug, Default)]
struct Registrations {
    known: std::sync::Mutex<std::collections::HashMap<PublicKey, HandleRecord>>,
}

impl Registrations {
    fn get(&self, key: &PublicKey) -> Option<HandleRecord> {
        self.lock().get(key).cloned()
    }

    /// The key of a remembered registration whose bytes are `bytes`: checked when it was
    /// registered, so a reconnect skips [`PublicKey::from_bytes`]' point checks (a scalar
    /// multiplication and two field inversions, ~40 µs of every connect's callout).
    fn key_of(&self, bytes: &[u8; 32]) -> Option<PublicKey> {
        self.lock().get_key_value(bytes).map(|(key, _)| *key)
    }

    /// Remembers `record`, read from the registry for its key just now.
    fn remember(&self, record: &HandleRecord) {
        let mut known = self.lock();
        if known.len() >= MAX_KNOWN_REGISTRATIONS {
            known.clear();
        }
        known.insert(record.key, record.clone());
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<PublicKey, HandleRecord>> {
        self.known
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// What the callout decided, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A registered, enabled key: the chat profile.
    Registered(PublicKey, ProofForm),
    /// An active device (the first key) of a registered, enabled identity (the second): the
    /// device profile.
    Device(PublicKey, PublicKey, ProofForm),
    /// A valid key without a handle: the narrow profile.
    Unregistered(PublicKey, ProofForm),
    /// A peer server of the domain named: the peer profile.
    Peer(PublicKey, String),
    /// Refused, with the reason nats-server logs.
    Denied(String),
    /// A connection claiming to be the server of `domain`, refused for `reason` (a stable
    /// name, for metrics) as `message` says.
    PeerRefused {
        /// The domain claimed.
        domain: String,
        /// Why, as a stable name.
        reason: &'static str,
        /// What nats-server logs.
        message: String,
    },
}

/// Why a connection is refused: the reason nats-server logs, and the peer domain it claimed
/// with a stable reason when it took the peer path.
struct Refusal {
    message: String,
    peer: Option<(String, &'static str)>,
}

impl From<String> for Refusal {
    fn from(message: String) -> Refusal {
        Refusal {
            message,
            peer: None,
        }
    }
}

/// The peer path's refusal of `domain` for `reason`.
fn peer_refusal(domain: &str, reason: &'static str, message: impl std::fmt::Display) -> Refusal {
    Refusal {
        message: format!("kez: peer {domain}: {message}"),
        peer: Some((domain.to_owned(), reason)),
    }
}

/// The stable reason of a pin or discovery refusal.
fn reason_of(err: &ErrorAnswer) -> &'static str {
    match err.name.as_ref() {
        "domain_blocked" => "domain_blocked",
        "peer_key_changed" => "peer_key_changed",
        "peer_key_in_use" => "peer_key_in_use",
        "unavailable" => "unavailable",
        _ => "other",
    }
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
            server_users: Vec::new(),
            federation: None,
            registrations: Registrations::default(),
            lifetime: AUTHORIZATION_LIFETIME_SECS,
        }
    }

    /// The same callout, granting authorizations for `lifetime` instead of
    /// [`AUTHORIZATION_LIFETIME_SECS`] (at least a second).
    pub fn with_authorization_lifetime(mut self, lifetime: std::time::Duration) -> Self {
        self.lifetime = lifetime.as_secs().max(1);
        self
    }

    /// The same callout, letting in peer servers through `federation` (none: refusing them).
    pub fn with_federation(mut self, federation: Option<std::sync::Arc<Federation>>) -> Self {
        self.federation = federation;
        self
    }

    /// The same callout, refusing the server's own users `nkeys` (`U...`).
    pub fn with_server_users(mut self, nkeys: Vec<String>) -> Self {
        self.server_users = nkeys;
        self
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
            Err(Refusal {
                message,
                peer: Some((domain, reason)),
            }) => (
                Err(message.clone()),
                Verdict::PeerRefused {
                    domain,
                    reason,
                    message,
                },
            ),
            Err(Refusal {
                message,
                peer: None,
            }) => (Err(message.clone()), Verdict::Denied(message)),
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
    ) -> Result<(String, Verdict), Refusal> {
        let proof = client_nonce_proof(request).map_err(|err| format!("kez: {err}"))?;
        let key = match self.registrations.key_of(&proof.ed25519) {
            Some(key) => key,
            None => PublicKey::from_bytes(&proof.ed25519)
                .map_err(|err| format!("kez: client key refused: {err}"))?,
        };
        if self.server_users.contains(&key.to_nkey()) {
            return Err(format!(
                "kez: {} is one of kez-chat-server's own users, which nats-server's config must list in auth_users: re-render it (kez-chat-server nats-conf) and reload nats-server",
                key.to_nkey()
            )
            .into());
        }
        let form = verify_proof(
            &key,
            &proof.nonce,
            &Signature::from_bytes(proof.signature),
            self.legacy_proofs,
        )
        .map_err(|err| format!("kez: {err}"))?;
        // Independent reads: all at once, so a connect waits for two round trips, not four;
        // one when the registration is remembered. The standing is read every time.
        let unavailable = |err: ErrorAnswer| format!("kez: registry unavailable: {}", err.message);
        let (record, disabled, device) = match self.registrations.get(&key) {
            Some(record) => {
                let (disabled, device) =
                    tokio::join!(self.store.disabled(key), self.store.device(key));
                (Ok(Some(record)), disabled, device)
            }
            None => tokio::join!(
                self.store.whois(key),
                self.store.disabled(key),
                self.store.device(key)
            ),
        };
        let (record, mut disabled, device) = (
            record.map_err(unavailable)?,
            disabled.map_err(unavailable)?,
            device.map_err(unavailable)?,
        );
        if let Some(record) = &record {
            self.registrations.remember(record);
        }
        // A device is out when its identity is.
        if record.is_none()
            && disabled.is_none()
            && let Some(device) = &device
        {
            disabled = self
                .store
                .disabled(device.identity)
                .await
                .map_err(unavailable)?;
        }
        // A key that is nobody here and names itself a peer server: the peer path.
        if record.is_none()
            && device.is_none()
            && disabled.is_none()
            && let Some(domain) = claimed_domain(&request.connect_opts.name)
        {
            let claims = self.peer(request, &key, &domain, now).await?;
            let user_jwt =
                encode_user_jwt(&self.issuer, &claims).map_err(|err| format!("kez: {err}"))?;
            return Ok((user_jwt, Verdict::Peer(key, domain)));
        }
        let standing = Standing {
            record: record.as_ref(),
            device: device.as_ref(),
            disabled: disabled.as_ref(),
        };
        let validity = Validity::starting(now, self.lifetime);
        let (claims, verdict) = match grant(&request.user_nkey, &key, standing, validity)? {
            Grant::Registered(claims) => (claims, Verdict::Registered(key, form)),
            Grant::Device(claims, identity) => (claims, Verdict::Device(key, identity, form)),
            Grant::Unregistered(claims) => {
                if let Some(limiter) = &self.connect_limit
                    && let Err(limited) = limiter.check(
                        &crate::limits::address_bucket(&request.client_info.host),
                        std::time::Instant::now(),
                    )
                {
                    return Err(format!(
                        "kez: too many unregistered connections from {}; retry in {} ms",
                        request.client_info.host,
                        limited.retry_after_ms()
                    )
                    .into());
                }
                (claims, Verdict::Unregistered(key, form))
            }
        };
        let user_jwt =
            encode_user_jwt(&self.issuer, &claims).map_err(|err| format!("kez: {err}"))?;
        Ok((user_jwt, verdict))
    }

    /// The peer path for `key`, claiming to be the server of `domain`: the lists and block,
    /// then the pinned key, or on first contact the dialback (the domain's WebFinger must name
    /// this very key) and the pin.
    async fn peer(
        &self,
        request: &AuthorizationRequest,
        key: &PublicKey,
        domain: &str,
        now: u64,
    ) -> Result<UserClaims, Refusal> {
        let Some(federation) = &self.federation else {
            return Err(peer_refusal(
                domain,
                "not_federated",
                "this server does not federate",
            ));
        };
        if domain == federation.discovery().domain {
            return Err(peer_refusal(
                domain,
                "forbidden",
                "that is this server's own domain",
            ));
        }
        federation
            .check_allowed(domain)
            .await
            .map_err(|err| peer_refusal(domain, reason_of(&err), &err.message))?;
        let pinned = federation
            .pins
            .record(domain)
            .await
            .map_err(|err| peer_refusal(domain, reason_of(&err), &err.message))?;
        match pin_decision(pinned.as_ref().map(|(record, _)| record), key) {
            PinDecision::Matches => {}
            PinDecision::Blocked => {
                return Err(peer_refusal(
                    domain,
                    "domain_blocked",
                    "blocked by the operator",
                ));
            }
            PinDecision::Changed(pinned) => {
                tracing::warn!(%domain, %pinned, offered = %key, "a peer connected with another server key than the one pinned; refused until the operator runs `kez-chat-server admin peer forget {domain}`");
                return Err(peer_refusal(
                    domain,
                    "peer_key_changed",
                    format!("connected with {key}, but {pinned} is pinned"),
                ));
            }
            PinDecision::Pin => {
                // A dialback is an HTTPS request a stranger makes this server send: as few per
                // address as unregistered connections.
                if let Some(limiter) = &self.connect_limit
                    && let Err(limited) = limiter.check(
                        &crate::limits::address_bucket(&request.client_info.host),
                        std::time::Instant::now(),
                    )
                {
                    return Err(peer_refusal(
                        domain,
                        "rate_limited",
                        format!(
                            "too many new peers from {}; retry in {} ms",
                            request.client_info.host,
                            limited.retry_after_ms()
                        ),
                    ));
                }
                let found = federation
                    .discover(domain, DIALBACK_TIMEOUT)
                    .await
                    .map_err(|why| peer_refusal(domain, "dialback_failed", why))?;
                if found.key != *key {
                    return Err(peer_refusal(
                        domain,
                        "dialback_failed",
                        format!("its WebFinger names {}, not {key}", found.key),
                    ));
                }
                federation
                    .pins
                    .pin(domain, key, now)
                    .await
                    .map_err(|err| peer_refusal(domain, reason_of(&err), &err.message))?;
            }
        }
        Ok(peer_profile(
            &request.user_nkey,
            key,
            Validity::starting(now, self.lifetime),
        ))
    }
}

/// What the callout grants a key that proved itself ([`Grant`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// The chat profile of a registered key.
    Registered(UserClaims),
    /// The device profile of an active device of the identity named.
    Device(UserClaims, PublicKey),
    /// The narrow profile of a key without a handle.
    Unregistered(UserClaims),
}

/// What the store says of a key that proved itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Standing<'a> {
    /// The handle it registered, if any.
    pub record: Option<&'a HandleRecord>,
    /// Its device index entry, if a chain other than its own added it.
    pub device: Option<&'a DeviceRecord>,
    /// Whether an operator disabled it or, for a device, its identity.
    pub disabled: Option<&'a DisabledRecord>,
}

/// The callout's decision for `key`, which proved itself on the connection nats-server calls
/// `user_nkey`, from its `standing` (PROTOCOL.md §6.2): a disabled key (or device of a disabled
/// identity) is refused (the reason nats-server logs), a registered one gets the chat profile,
/// an active device the device profile, a revoked device or one still being added is refused,
/// and any other key gets the narrow profile.
pub fn grant(
    user_nkey: &str,
    key: &PublicKey,
    standing: Standing<'_>,
    validity: Validity,
) -> Result<Grant, String> {
    if let Some(disabled) = standing.disabled {
        return Err(format!(
            "kez: {} is disabled by the operator",
            disabled.handle
        ));
    }
    Ok(match (standing.record, standing.device) {
        (Some(_), Some(device)) if device.state == DeviceState::Revoked => {
            return Err(format!(
                "kez: {key} holds its handle, but its own chain revoked it as a device; connect with one of its active devices"
            ));
        }
        (Some(record), _) => Grant::Registered(registered_profile(user_nkey, record, validity)),
        (None, Some(device)) => match device.state {
            DeviceState::Active => Grant::Device(
                device_profile(user_nkey, key, &device.identity, validity),
                device.identity,
            ),
            DeviceState::Revoked => {
                return Err(format!(
                    "kez: {key} is a revoked device of {}; add this device again with a new key",
                    device.identity
                ));
            }
            DeviceState::Adding => {
                return Err(format!(
                    "kez: {key} is not (yet) a device of {}: the link adding it is not stored; append it again",
                    device.identity
                ));
            }
        },
        (None, None) => Grant::Unregistered(unregistered_profile(user_nkey, key, validity)),
    })
}

/// Named by the KEZ key's nkey (`user_nkey` is the key nats-server made for the connection,
/// not the client's): nats-server reports a user's name as the `user` of the
/// `Nats-Request-Info` header it stamps on every request the user sends across a service
/// import, so the kez services learn the caller's key from it (`kez.mail.fetch` serves that
/// key's inbox; the limits count by it), not a name they would have to look up.
fn base_claims(user_nkey: &str, key: &PublicKey, validity: Validity) -> UserClaims {
    UserClaims::new(user_nkey, APP_ACCOUNT, validity.from)
        .with_name(key.to_nkey())
        .with_expiry(validity.until)
        .with_max_subscriptions(MAX_SUBSCRIPTIONS)
}

/// A key without a handle may register, look handles up, read server info, and hear replies on
/// its own reply prefix. Nothing else.
fn unregistered_profile(user_nkey: &str, key: &PublicKey, validity: Validity) -> UserClaims {
    base_claims(user_nkey, key, validity)
        .allow_publish(unregistered_publish())
        .allow_subscribe(unregistered_subscribe(key))
}

/// A registered key may use every kez service (mail goes in through `kez.mail.send` and out
/// through `kez.mail.fetch`, never through JetStream) and send live notices to anyone's devices
/// (core NATS, PROTOCOL.md §8.6), hear replies only on its own reply prefix, and hear of new
/// mail and live notices only for its own inbox.
fn registered_profile(user_nkey: &str, record: &HandleRecord, validity: Validity) -> UserClaims {
    base_claims(user_nkey, &record.key, validity)
        .allow_publish(registered_publish())
        .allow_subscribe(registered_subscribe(&record.key))
}

/// A peer server may hand over mail and read what anyone may read (`subjects::peer_publish`),
/// and hear replies on its own reply prefix. Nothing else: no live notices, no registration.
pub fn peer_profile(user_nkey: &str, key: &PublicKey, validity: Validity) -> UserClaims {
    base_claims(user_nkey, key, validity)
        .allow_publish(peer_publish())
        .allow_subscribe(unregistered_subscribe(key))
}

/// An active device of `identity` may do what its registered key may, as itself: replies on
/// its own reply prefix, new mail and live notices only for itself.
fn device_profile(
    user_nkey: &str,
    device: &PublicKey,
    identity: &PublicKey,
    validity: Validity,
) -> UserClaims {
    base_claims(user_nkey, device, validity)
        .allow_publish(registered_publish())
        .allow_subscribe(device_subscribe(identity, device))
}

#[cfg(test)]
mod tests {
    use kez_core::{Handle, SecretKey};

    use super::*;

    const NOW: u64 = 1_767_225_600;
    const VALID: Validity = Validity {
        from: NOW,
        until: NOW + AUTHORIZATION_LIFETIME_SECS,
    };

    #[test]
    fn a_peer_gets_the_federation_subjects_and_its_own_replies_only() {
        let key = SecretKey::from_seed(&[7; 32]).public_key();
        let claims = peer_profile("UCONNECTION", &key, VALID);
        assert_eq!(claims.publish.allow, peer_publish());
        for endpoint in [
            kez_proto::Endpoint::MailDeliver,
            kez_proto::Endpoint::Lookup,
            kez_proto::Endpoint::Whois,
            kez_proto::Endpoint::GetChain,
            kez_proto::Endpoint::Head,
            kez_proto::Endpoint::Info,
            kez_proto::Endpoint::KeysClaim,
        ] {
            assert!(
                claims
                    .publish
                    .allow
                    .contains(&endpoint.subject().to_owned()),
                "{endpoint:?}"
            );
        }
        assert_eq!(claims.publish.allow.len(), 7);
        assert_eq!(
            claims.subscribe.allow,
            [format!("_INBOX.{}.>", key.to_hex())]
        );
        assert_eq!(claims.name, Some(key.to_nkey()), "named by the server key");
        assert_eq!(claims.account, APP_ACCOUNT);
        assert_eq!(claims.expires_at, Some(NOW + AUTHORIZATION_LIFETIME_SECS));
        assert!(
            !claims
                .publish
                .allow
                .iter()
                .any(|subject| subject.contains('>') || subject.contains('*')),
            "no wildcard: not kez.mail.send, not kez.mail.relay"
        );
    }

    #[test]
    fn the_grant_follows_registration_and_the_operators_word() {
        let key = SecretKey::from_seed(&[5; 32]).public_key();
        let handle = Handle::parse("alice", "kez.lat").unwrap();
        let record = HandleRecord {
            handle: handle.clone(),
            key,
            registered_at: NOW - 60,
        };
        let user = "UCONNECTION";

        let nothing = Standing::default();
        let Ok(Grant::Unregistered(narrow)) = grant(user, &key, nothing, VALID) else {
            panic!("a key without a handle gets the narrow profile");
        };
        assert_eq!(narrow.publish.allow, unregistered_publish());
        assert_eq!(
            (narrow.user_nkey.as_str(), narrow.account.as_str()),
            (user, APP_ACCOUNT)
        );

        let registered = Standing {
            record: Some(&record),
            ..nothing
        };
        let Ok(Grant::Registered(chat)) = grant(user, &key, registered, VALID) else {
            panic!("a registered key gets the chat profile");
        };
        assert_eq!(chat.publish.allow, registered_publish());
        assert_eq!(chat.subscribe.allow, registered_subscribe(&key));
        assert_eq!(chat.name, Some(key.to_nkey()), "named by the KEZ key");
        assert_eq!(chat.expires_at, Some(NOW + AUTHORIZATION_LIFETIME_SECS));

        let laptop = SecretKey::from_seed(&[6; 32]).public_key();
        let device = |state| DeviceRecord {
            identity: key,
            state,
            seq: 2,
        };
        let active = device(DeviceState::Active);
        let as_device = Standing {
            device: Some(&active),
            ..nothing
        };
        let Ok(Grant::Device(claims, identity)) = grant(user, &laptop, as_device, VALID) else {
            panic!("an active device gets the device profile");
        };
        assert_eq!(identity, key);
        assert_eq!(claims.publish.allow, registered_publish());
        assert_eq!(claims.subscribe.allow, device_subscribe(&key, &laptop));
        let live = kez_proto::subjects::live_subject(&key, &laptop);
        assert!(
            claims.subscribe.allow.contains(&live),
            "its own live notices"
        );
        assert!(
            claims
                .publish
                .allow
                .contains(&kez_proto::subjects::LIVE_SUBJECTS.to_owned()),
            "live notices to anyone"
        );
        assert!(
            !narrow
                .publish
                .allow
                .iter()
                .any(|s| s.starts_with("kez.live"))
                && !narrow
                    .subscribe
                    .allow
                    .iter()
                    .any(|s| s.starts_with("kez.live")),
            "the narrow profile has no live notices"
        );
        assert_eq!(
            claims.name,
            Some(laptop.to_nkey()),
            "named by the device key"
        );
        for (state, reason) in [
            (DeviceState::Revoked, "revoked device"),
            (DeviceState::Adding, "not (yet) a device"),
        ] {
            let record = device(state);
            let standing = Standing {
                device: Some(&record),
                ..nothing
            };
            let refused = grant(user, &laptop, standing, VALID).unwrap_err();
            assert!(refused.contains(reason), "{refused}");
        }
        // The identity's own key, revoked by its chain, is refused although it holds the handle.
        let revoked = device(DeviceState::Revoked);
        let revoked_identity = Standing {
            device: Some(&revoked),
            ..registered
        };
        let refused = grant(user, &key, revoked_identity, VALID).unwrap_err();
        assert!(refused.contains("revoked it as a device"), "{refused}");

        let disabled = DisabledRecord { handle, since: NOW };
        for standing in [registered, nothing, as_device] {
            let standing = Standing {
                disabled: Some(&disabled),
                ..standing
            };
            let refused = grant(user, &key, standing, VALID).unwrap_err();
            assert!(refused.contains("disabled by the operator"), "{refused}");
        }
    }
}
