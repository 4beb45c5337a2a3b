//! Registration requests: how a key claims a handle on a home server.
//!
//! The request is signed by the key over a domain-separated canonical message that binds the
//! handle's name, the key, the server's domain and the time, so a signature made for one server
//! or one name is worthless for another, and an old request expires. PROTOCOL.md §5.2.

use serde::{Deserialize, Serialize};
use serde_json::json;

use kez_core::canonical;
use kez_core::handle::{Handle, HandleError};
use kez_core::key::{PublicKey, SecretKey, Signature, SignatureDomain};

/// How far, in seconds, a request's time may be from the server's clock, either way.
pub const REGISTRATION_WINDOW_SECS: u64 = 300;

/// The body of a `kez.registry.register` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationRequest {
    /// The handle's name, normalised (`alice`, not `@Alice`).
    pub handle: String,
    /// The domain of the server the request is for.
    pub domain: String,
    /// The key claiming the handle; it becomes the handle's primary key and sigchain id.
    pub key: PublicKey,
    /// Seconds since the Unix epoch when the request was made.
    pub time: u64,
    /// The key's signature over [`RegistrationRequest::signed_message`].
    pub sig: Signature,
}

/// Why a registration request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    /// The name breaks the handle rules.
    #[error("{0}")]
    BadHandle(#[from] HandleError),
    /// The name is valid but not in its normalised form, which is what must be signed.
    #[error("send the handle in normalised form: {normalised:?}")]
    NotNormalised {
        /// The normalised name.
        normalised: String,
    },
    /// The request was made for another server.
    #[error("this request is for {requested:?}, but this server is {served:?}")]
    WrongDomain {
        /// The domain named in the request.
        requested: String,
        /// The domain this server serves.
        served: String,
    },
    /// The request's time is too far from the server's clock.
    #[error(
        "request time {time} is more than {REGISTRATION_WINDOW_SECS} s from the server's clock ({now}); check your clock and sign a fresh request"
    )]
    OutsideWindow {
        /// The request's time.
        time: u64,
        /// The server's time.
        now: u64,
    },
    /// The signature does not verify for the key.
    #[error("the signature does not verify for this key and request")]
    BadSignature,
}

impl RegistrationRequest {
    /// A request by `key` for `handle`'s name on `handle`'s domain, made at `time`.
    pub fn sign(key: &SecretKey, handle: &Handle, time: u64) -> Self {
        let mut request = RegistrationRequest {
            handle: handle.name().to_owned(),
            domain: handle.domain().to_owned(),
            key: key.public_key(),
            time,
            sig: Signature::from_bytes([0; 64]),
        };
        request.sig = key.sign(SignatureDomain::Register, &request.signed_body());
        request
    }

    /// What the key signs: [`SignatureDomain::Register`]'s tag, a zero byte and
    /// [`RegistrationRequest::signed_body`].
    pub fn signed_message(&self) -> Vec<u8> {
        SignatureDomain::Register.message(&self.signed_body())
    }

    /// The canonical `{"domain","handle","key","time"}` object.
    pub fn signed_body(&self) -> Vec<u8> {
        let body = json!({
            "domain": self.domain,
            "handle": self.handle,
            "key": self.key,
            "time": self.time,
        });
        // `time` is checked against the window before this is called on a received request, and
        // a larger number would only make the signature (which then cannot verify) cover "".
        canonical::encode(&body).unwrap_or_default()
    }

    /// Checks the request for the server of `served_domain` whose clock reads `now`, and
    /// returns the handle it claims.
    pub fn verify(&self, served_domain: &str, now: u64) -> Result<Handle, RegistrationError> {
        let handle = Handle::parse(&self.handle, served_domain)?;
        if handle.name() != self.handle {
            return Err(RegistrationError::NotNormalised {
                normalised: handle.name().to_owned(),
            });
        }
        if self.domain != served_domain {
            return Err(RegistrationError::WrongDomain {
                requested: self.domain.clone(),
                served: served_domain.to_owned(),
            });
        }
        if self.time.abs_diff(now) > REGISTRATION_WINDOW_SECS {
            return Err(RegistrationError::OutsideWindow {
                time: self.time,
                now,
            });
        }
        self.key
            .verify(SignatureDomain::Register, &self.signed_body(), &self.sig)
            .map_err(|_| RegistrationError::BadSignature)?;
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_767_225_600;

    fn alice() -> (SecretKey, Handle) {
        (
            SecretKey::from_seed(&[1; 32]),
            Handle::parse("alice", "kez.lat").unwrap(),
        )
    }

    #[test]
    fn a_signed_request_verifies_within_the_window() {
        let (key, handle) = alice();
        for time in [NOW, NOW - 300, NOW + 300] {
            let request = RegistrationRequest::sign(&key, &handle, time);
            assert_eq!(request.verify("kez.lat", NOW), Ok(handle.clone()));
        }
    }

    #[test]
    fn stale_or_future_requests_are_refused() {
        let (key, handle) = alice();
        for time in [NOW - 301, NOW + 301, 0, canonical::MAX_SAFE_INTEGER + 5] {
            let request = RegistrationRequest::sign(&key, &handle, time);
            assert!(matches!(
                request.verify("kez.lat", NOW),
                Err(RegistrationError::OutsideWindow { .. })
            ));
        }
    }

    #[test]
    fn the_signature_binds_every_field() {
        let (key, handle) = alice();
        let good = RegistrationRequest::sign(&key, &handle, NOW);
        let other_key = SecretKey::from_seed(&[2; 32]).public_key();
        let mut tampered = vec![good.clone(), good.clone(), good.clone()];
        tampered[0].handle = "alicf".into();
        tampered[1].key = other_key;
        tampered[2].time += 1;
        for request in tampered {
            assert_eq!(
                request.verify("kez.lat", NOW),
                Err(RegistrationError::BadSignature)
            );
        }
        let mut elsewhere = good;
        elsewhere.domain = "evil.example".into();
        assert!(matches!(
            elsewhere.verify("kez.lat", NOW),
            Err(RegistrationError::WrongDomain { .. })
        ));
    }

    #[test]
    fn handles_must_be_valid_and_normalised() {
        let (key, handle) = alice();
        let mut request = RegistrationRequest::sign(&key, &handle, NOW);
        request.handle = "Alice".into();
        assert!(matches!(
            request.verify("kez.lat", NOW),
            Err(RegistrationError::NotNormalised { .. })
        ));
        request.handle = "admin".into();
        assert!(matches!(
            request.verify("kez.lat", NOW),
            Err(RegistrationError::BadHandle(HandleError::Reserved { .. }))
        ));
    }

    #[test]
    fn the_wire_form_is_plain_json() {
        let (key, handle) = alice();
        let request = RegistrationRequest::sign(&key, &handle, NOW);
        let text = serde_json::to_string(&request).unwrap();
        assert!(text.contains("\"key\":\"ed25519:"));
        let back: RegistrationRequest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, request);
    }
}
