//! The user JWT an allowing callout puts in its response: where the client lands and what it
//! may do there.

use std::time::Duration;

use nkeys::KeyPair;
use serde::Serialize;

use crate::codec::{self, StdClaims};
use crate::error::{JwtError, NkeyKind, clip};
use crate::{CLAIMS_VERSION, NO_LIMIT, USER_TYPE};

/// Subjects allowed and denied in one direction (publish or subscribe).
///
/// nats-server semantics: a subject must match an allow entry (if any allow entry exists) and
/// no deny entry. Both lists empty means *everything is allowed*, which
/// [`encode_user_jwt`] refuses ([`JwtError::UnrestrictedPermissions`]); allow `>` to mean it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Permission {
    /// Subjects allowed (wildcards `*` and `>` work). Subscribe entries may carry a queue
    /// group after one space (`subject queue`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Subjects denied; deny wins over allow.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// Lets the user publish replies to the reply subjects of requests it received, whatever its
/// publish permissions say (nats-server's `allow_responses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsePermission {
    /// How many replies per request (`max`; nats-server's default is 1).
    pub max: i64,
    /// For how long after the request (`ttl`; zero means no limit).
    pub ttl: Duration,
}

/// The claims of a user JWT made by the callout.
///
/// Build one with [`UserClaims::new`] and the `with_*`/`allow_*`/`deny_*` methods, then sign
/// it with [`encode_user_jwt`]. Limits default to [`NO_LIMIT`] (-1).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UserClaims {
    /// `sub`: the request's `user_nkey` (not the client's own key).
    pub user_nkey: String,
    /// `aud`: the name of the account to place the user in (non-operator mode), e.g. `APP`.
    pub account: String,
    /// `name`: if set, nats-server shows it as the connection's user name.
    pub name: Option<String>,
    /// `iat`, unix seconds.
    pub issued_at: u64,
    /// `exp`, unix seconds: nats-server disconnects the client when it passes.
    pub expires_at: Option<u64>,
    /// Publish permissions (`nats.pub`).
    pub publish: Permission,
    /// Subscribe permissions (`nats.sub`).
    pub subscribe: Permission,
    /// Response permission (`nats.resp`).
    pub responses: Option<ResponsePermission>,
    /// Most subscriptions (`nats.subs`), -1 for no limit.
    pub max_subscriptions: i64,
    /// Most data bytes (`nats.data`), -1 for no limit.
    pub max_data: i64,
    /// Largest message payload (`nats.payload`), -1 for no limit.
    pub max_payload: i64,
}

impl UserClaims {
    /// Claims for `user_nkey` (the request's `user_nkey`), placed in `account`, issued at
    /// `issued_at` (unix seconds), with no permissions yet and no limits.
    pub fn new(user_nkey: impl Into<String>, account: impl Into<String>, issued_at: u64) -> Self {
        Self {
            user_nkey: user_nkey.into(),
            account: account.into(),
            name: None,
            issued_at,
            expires_at: None,
            publish: Permission::default(),
            subscribe: Permission::default(),
            responses: None,
            max_subscriptions: NO_LIMIT,
            max_data: NO_LIMIT,
            max_payload: NO_LIMIT,
        }
    }

    /// Sets `name`.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets `exp` (unix seconds).
    pub fn with_expiry(mut self, expires_at: u64) -> Self {
        self.expires_at = Some(expires_at);
        self
    }

    /// Adds publish allow entries.
    pub fn allow_publish<S: Into<String>>(mut self, subjects: impl IntoIterator<Item = S>) -> Self {
        self.publish
            .allow
            .extend(subjects.into_iter().map(Into::into));
        self
    }

    /// Adds publish deny entries.
    pub fn deny_publish<S: Into<String>>(mut self, subjects: impl IntoIterator<Item = S>) -> Self {
        self.publish
            .deny
            .extend(subjects.into_iter().map(Into::into));
        self
    }

    /// Adds subscribe allow entries.
    pub fn allow_subscribe<S: Into<String>>(
        mut self,
        subjects: impl IntoIterator<Item = S>,
    ) -> Self {
        self.subscribe
            .allow
            .extend(subjects.into_iter().map(Into::into));
        self
    }

    /// Adds subscribe deny entries.
    pub fn deny_subscribe<S: Into<String>>(
        mut self,
        subjects: impl IntoIterator<Item = S>,
    ) -> Self {
        self.subscribe
            .deny
            .extend(subjects.into_iter().map(Into::into));
        self
    }

    /// Sets the response permission.
    pub fn allow_responses(mut self, max: i64, ttl: Duration) -> Self {
        self.responses = Some(ResponsePermission { max, ttl });
        self
    }

    /// Sets the subscription limit (-1: none).
    pub fn with_max_subscriptions(mut self, max: i64) -> Self {
        self.max_subscriptions = max;
        self
    }

    /// Sets the data limit in bytes (-1: none).
    pub fn with_max_data(mut self, max: i64) -> Self {
        self.max_data = max;
        self
    }

    /// Sets the payload limit in bytes (-1: none).
    pub fn with_max_payload(mut self, max: i64) -> Self {
        self.max_payload = max;
        self
    }
}

/// The `nats` section of a user JWT, in the field order of nats-server's JWT library.
#[derive(Serialize)]
struct UserNats<'a> {
    #[serde(rename = "pub")]
    publish: &'a Permission,
    #[serde(rename = "sub")]
    subscribe: &'a Permission,
    #[serde(skip_serializing_if = "Option::is_none")]
    resp: Option<RespJson>,
    subs: i64,
    data: i64,
    payload: i64,
    #[serde(rename = "type")]
    claim_type: &'static str,
    version: i64,
}

#[derive(Serialize)]
struct RespJson {
    max: i64,
    /// A Go `time.Duration`: nanoseconds.
    ttl: i64,
}

/// Signs a user JWT with the callout issuer account key (`A...`, the configured
/// `auth_callout.issuer`).
///
/// Refuses, before signing, what nats-server would refuse or what would grant more than
/// meant: a `user_nkey` that is not a user key, an empty account, a permission subject that is
/// empty, holds a space (but one `subject queue` space in subscribe entries), starts or ends
/// with `.` or holds `..` ([`JwtError::InvalidSubject`]), and a direction with neither allow nor
/// deny entries ([`JwtError::UnrestrictedPermissions`]).
pub fn encode_user_jwt(issuer: &KeyPair, claims: &UserClaims) -> Result<String, JwtError> {
    codec::expect_key("user JWT subject", &claims.user_nkey, NkeyKind::User)?;
    if claims.account.trim().is_empty() {
        return Err(JwtError::EmptyAudience);
    }
    check_permission("publish", &claims.publish, false)?;
    check_permission("subscribe", &claims.subscribe, true)?;

    let nats = UserNats {
        publish: &claims.publish,
        subscribe: &claims.subscribe,
        resp: claims.responses.map(|r| RespJson {
            max: r.max,
            ttl: i64::try_from(r.ttl.as_nanos()).unwrap_or(i64::MAX),
        }),
        subs: claims.max_subscriptions,
        data: claims.max_data,
        payload: claims.max_payload,
        claim_type: USER_TYPE,
        version: CLAIMS_VERSION,
    };
    let std = StdClaims {
        aud: &claims.account,
        exp: claims.expires_at.unwrap_or(0),
        jti: "",
        iat: claims.issued_at,
        iss: "",
        name: claims.name.as_deref().unwrap_or_default(),
        nbf: 0,
        sub: &claims.user_nkey,
    };
    codec::encode(issuer, std, &nats)
}

fn check_permission(
    direction: &'static str,
    permission: &Permission,
    queue_allowed: bool,
) -> Result<(), JwtError> {
    if permission.allow.is_empty() && permission.deny.is_empty() {
        return Err(JwtError::UnrestrictedPermissions { direction });
    }
    for entry in permission.allow.iter().chain(&permission.deny) {
        let invalid = |reason| JwtError::InvalidSubject {
            subject: clip(entry),
            reason,
        };
        let mut words = entry.split(' ');
        let subject = words.next().unwrap_or_default();
        check_subject(subject).map_err(invalid)?;
        match (words.next(), words.next()) {
            (None, _) => {}
            (Some(queue), None) if queue_allowed => check_subject(queue).map_err(invalid)?,
            (Some(_), None) => return Err(invalid("publish subjects cannot name a queue")),
            (Some(_), Some(_)) => return Err(invalid("too many spaces")),
        }
    }
    Ok(())
}

/// nats-server's JWT subject validation.
fn check_subject(subject: &str) -> Result<(), &'static str> {
    if subject.is_empty() {
        Err("empty subject")
    } else if subject.chars().any(char::is_whitespace) {
        Err("whitespace in subject")
    } else if subject.starts_with('.') || subject.ends_with('.') {
        Err("subject starts or ends with '.'")
    } else if subject.contains("..") {
        Err("subject contains '..'")
    } else {
        Ok(())
    }
}
