//! Pin requests: how a key asks its home server to keep (pin) an encrypted blob.
//!
//! Every request on `kez.pin.*` is signed by the owner key over a domain-separated canonical
//! message that binds the operation, its arguments, the key, the server's domain and the time,
//! so a signature made for one operation, blob or server is worthless for another, and an old
//! request expires. PROTOCOL.md §10.

use kez_core::canonical;
use kez_core::file::{BlobHash, FileOfferError, check_providers};
use kez_core::key::{PublicKey, SecretKey, Signature, SignatureDomain};
use serde::{Deserialize, Serialize};

use crate::endpoint::Endpoint;

/// How far, in seconds, a request's time may be from the server's clock, either way.
pub const PIN_WINDOW_SECS: u64 = 300;

/// What a pin request asks for; the last token of its subject (`kez.pin.<op>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinOp {
    /// Fetch a blob from the owner's providers and keep it.
    Add,
    /// Stop keeping a blob.
    Remove,
    /// The owner's pins and quota.
    List,
    /// Whether one blob is pinned.
    Status,
}

impl PinOp {
    /// Every operation.
    pub const ALL: [PinOp; 4] = [PinOp::Add, PinOp::Remove, PinOp::List, PinOp::Status];

    /// The operation's name: `add`, `remove`, `list` or `status`.
    pub fn name(self) -> &'static str {
        match self {
            PinOp::Add => "add",
            PinOp::Remove => "remove",
            PinOp::List => "list",
            PinOp::Status => "status",
        }
    }

    /// The endpoint the request goes to (`kez.pin.<name>`).
    pub fn endpoint(self) -> Endpoint {
        match self {
            PinOp::Add => Endpoint::PinAdd,
            PinOp::Remove => Endpoint::PinRemove,
            PinOp::List => Endpoint::PinList,
            PinOp::Status => Endpoint::PinStatus,
        }
    }

    /// The subject the request goes to: `kez.pin.<name>`.
    pub fn subject(self) -> &'static str {
        self.endpoint().subject()
    }
}

/// The body of a `kez.pin.*` request. Which of `blob`, `size` and `providers` are present
/// depends on `op`: `add` has all three, `remove` and `status` only `blob`, `list` none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    /// The operation; must match the subject.
    pub op: PinOp,
    /// The owner: the key that signs, and whose pins and quota these are.
    pub key: PublicKey,
    /// The domain of the server the request is for.
    pub domain: String,
    /// Seconds since the Unix epoch when the request was made.
    pub time: u64,
    /// The blob (`add`, `remove`, `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobHash>,
    /// The blob's size in bytes (`add`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Where to fetch the blob (`add`): provider strings, the rules of a file offer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub providers: Option<Vec<String>>,
    /// The key's signature over [`PinRequest::signed_message`].
    pub sig: Signature,
}

/// Why a pin request is refused. Each variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinRequestError {
    /// Members missing or present for the operation, another operation than the subject's,
    /// a size beyond 2^53−1, or providers breaking the rules.
    #[error("malformed pin request: {0}")]
    Malformed(String),
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
        "request time {time} is more than {PIN_WINDOW_SECS} s from the server's clock ({now}); check your clock and sign a fresh request"
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

impl PinRequestError {
    /// The failure's stable snake_case name.
    pub fn code(&self) -> &'static str {
        match self {
            PinRequestError::Malformed(_) => "malformed",
            PinRequestError::WrongDomain { .. } => "wrong_domain",
            PinRequestError::OutsideWindow { .. } => "outside_window",
            PinRequestError::BadSignature => "bad_signature",
        }
    }
}

impl PinRequest {
    /// An unsigned request by `key`'s public key for `domain` at `time`, without arguments.
    fn unsigned(key: &SecretKey, op: PinOp, domain: &str, time: u64) -> Self {
        PinRequest {
            op,
            key: key.public_key(),
            domain: domain.to_owned(),
            time,
            blob: None,
            size: None,
            providers: None,
            sig: Signature::from_bytes([0; 64]),
        }
    }

    fn signed(mut self, key: &SecretKey) -> Self {
        self.sig = key.sign(SignatureDomain::Pin, &self.signed_body());
        self
    }

    /// `add`: fetch `blob` (`size` bytes) from `providers` and keep it.
    pub fn add(
        key: &SecretKey,
        domain: &str,
        time: u64,
        blob: BlobHash,
        size: u64,
        providers: Vec<String>,
    ) -> Self {
        PinRequest {
            blob: Some(blob),
            size: Some(size),
            providers: Some(providers),
            ..PinRequest::unsigned(key, PinOp::Add, domain, time)
        }
        .signed(key)
    }

    /// `remove`: stop keeping `blob`.
    pub fn remove(key: &SecretKey, domain: &str, time: u64, blob: BlobHash) -> Self {
        PinRequest {
            blob: Some(blob),
            ..PinRequest::unsigned(key, PinOp::Remove, domain, time)
        }
        .signed(key)
    }

    /// `list`: the owner's pins and quota.
    pub fn list(key: &SecretKey, domain: &str, time: u64) -> Self {
        PinRequest::unsigned(key, PinOp::List, domain, time).signed(key)
    }

    /// `status`: whether `blob` is pinned.
    pub fn status(key: &SecretKey, domain: &str, time: u64, blob: BlobHash) -> Self {
        PinRequest {
            blob: Some(blob),
            ..PinRequest::unsigned(key, PinOp::Status, domain, time)
        }
        .signed(key)
    }

    /// What the key signs: [`SignatureDomain::Pin`]'s tag, a zero byte and the canonical JSON
    /// of the request without `sig` (absent members left out).
    pub fn signed_message(&self) -> Vec<u8> {
        SignatureDomain::Pin.message(&self.signed_body())
    }

    /// The canonical JSON of the request without `sig`.
    pub fn signed_body(&self) -> Vec<u8> {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.remove("sig");
        }
        // Numbers beyond 2^53−1 have no canonical form: `verify` refuses them before this is
        // called, and a signature over the empty encoding cannot verify for a real request.
        canonical::encode(&value).unwrap_or_default()
    }

    /// Checks the request as the answer to `op` (the subject's operation) for the server of
    /// `served_domain` whose clock reads `now`, in this order: shape (`malformed`), domain
    /// (`wrong_domain`), time (`outside_window`), signature (`bad_signature`).
    pub fn verify(&self, op: PinOp, served_domain: &str, now: u64) -> Result<(), PinRequestError> {
        self.check_shape(op)?;
        if self.domain != served_domain {
            return Err(PinRequestError::WrongDomain {
                requested: self.domain.clone(),
                served: served_domain.to_owned(),
            });
        }
        if self.time.abs_diff(now) > PIN_WINDOW_SECS || self.time > canonical::MAX_SAFE_INTEGER {
            return Err(PinRequestError::OutsideWindow {
                time: self.time,
                now,
            });
        }
        self.key
            .verify(SignatureDomain::Pin, &self.signed_body(), &self.sig)
            .map_err(|_| PinRequestError::BadSignature)
    }

    fn check_shape(&self, op: PinOp) -> Result<(), PinRequestError> {
        let malformed = |reason: &str| Err(PinRequestError::Malformed(reason.to_owned()));
        if self.op != op {
            return Err(PinRequestError::Malformed(format!(
                "op is {:?} but the request was sent to {}",
                self.op.name(),
                op.subject()
            )));
        }
        let (blob, size, providers) = (
            self.blob.is_some(),
            self.size.is_some(),
            self.providers.is_some(),
        );
        match op {
            PinOp::Add if !(blob && size && providers) => {
                return malformed("add needs blob, size and providers");
            }
            PinOp::Remove | PinOp::Status if !blob || size || providers => {
                return malformed("remove and status take blob only");
            }
            PinOp::List if blob || size || providers => {
                return malformed("list takes no blob, size or providers");
            }
            _ => {}
        }
        if self
            .size
            .is_some_and(|size| size > canonical::MAX_SAFE_INTEGER)
        {
            return malformed("size must be at most 2^53-1");
        }
        if let Some(providers) = &self.providers {
            check_providers(providers).map_err(|err| match err {
                FileOfferError::BadProviders(reason) => {
                    PinRequestError::Malformed(format!("providers: {reason}"))
                }
                other => PinRequestError::Malformed(other.to_string()),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_767_225_600;
    const DOMAIN: &str = "kez.lat";

    fn alice() -> SecretKey {
        SecretKey::from_seed(&[1; 32])
    }

    fn blob() -> BlobHash {
        BlobHash::from_bytes([7; 32])
    }

    fn add(time: u64) -> PinRequest {
        PinRequest::add(
            &alice(),
            DOMAIN,
            time,
            blob(),
            45,
            vec!["iroh:provider".into()],
        )
    }

    #[test]
    fn signed_requests_verify_within_the_window() {
        let key = alice();
        for time in [NOW, NOW - 300, NOW + 300] {
            assert_eq!(add(time).verify(PinOp::Add, DOMAIN, NOW), Ok(()));
            let remove = PinRequest::remove(&key, DOMAIN, time, blob());
            assert_eq!(remove.verify(PinOp::Remove, DOMAIN, NOW), Ok(()));
            let list = PinRequest::list(&key, DOMAIN, time);
            assert_eq!(list.verify(PinOp::List, DOMAIN, NOW), Ok(()));
            let status = PinRequest::status(&key, DOMAIN, time, blob());
            assert_eq!(status.verify(PinOp::Status, DOMAIN, NOW), Ok(()));
        }
    }

    #[test]
    fn stale_or_future_requests_are_refused() {
        for time in [NOW - 301, NOW + 301, 0, canonical::MAX_SAFE_INTEGER + 5] {
            assert!(matches!(
                add(time).verify(PinOp::Add, DOMAIN, NOW),
                Err(PinRequestError::OutsideWindow { .. })
            ));
        }
    }

    #[test]
    fn the_signature_binds_every_member() {
        let good = add(NOW);
        let other = SecretKey::from_seed(&[2; 32]).public_key();
        let mut tampered = vec![good.clone(); 5];
        tampered[0].key = other;
        tampered[1].time += 1;
        tampered[2].blob = Some(BlobHash::from_bytes([8; 32]));
        tampered[3].size = Some(46);
        tampered[4].providers = Some(vec!["iroh:elsewhere".into()]);
        for request in tampered {
            assert_eq!(
                request.verify(PinOp::Add, DOMAIN, NOW),
                Err(PinRequestError::BadSignature)
            );
        }
        // A remove signed for one blob is no status request, and not for another server.
        let mut remove = PinRequest::remove(&alice(), DOMAIN, NOW, blob());
        remove.op = PinOp::Status;
        assert_eq!(
            remove.verify(PinOp::Status, DOMAIN, NOW),
            Err(PinRequestError::BadSignature)
        );
        let mut elsewhere = good;
        elsewhere.domain = "evil.example".into();
        assert_eq!(
            elsewhere
                .verify(PinOp::Add, DOMAIN, NOW)
                .unwrap_err()
                .code(),
            "wrong_domain"
        );
    }

    #[test]
    fn shapes_are_checked_per_operation() {
        let key = alice();
        assert_eq!(
            add(NOW)
                .verify(PinOp::Remove, DOMAIN, NOW)
                .unwrap_err()
                .code(),
            "malformed"
        );
        let mut no_size = add(NOW);
        no_size.size = None;
        assert_eq!(
            no_size.verify(PinOp::Add, DOMAIN, NOW).unwrap_err().code(),
            "malformed"
        );
        let mut list = PinRequest::list(&key, DOMAIN, NOW);
        list.blob = Some(blob());
        assert_eq!(
            list.verify(PinOp::List, DOMAIN, NOW).unwrap_err().code(),
            "malformed"
        );
        for providers in [
            vec![],
            vec!["a".to_owned(), "a".to_owned()],
            vec!["bad\nline".to_owned()],
            vec!["x".to_owned(); 17],
        ] {
            let request = PinRequest::add(&key, DOMAIN, NOW, blob(), 1, providers);
            assert_eq!(
                request.verify(PinOp::Add, DOMAIN, NOW).unwrap_err().code(),
                "malformed"
            );
        }
        let huge = PinRequest::add(
            &key,
            DOMAIN,
            NOW,
            blob(),
            canonical::MAX_SAFE_INTEGER + 1,
            vec!["p".into()],
        );
        assert_eq!(
            huge.verify(PinOp::Add, DOMAIN, NOW).unwrap_err().code(),
            "malformed"
        );
    }

    #[test]
    fn the_wire_form_is_plain_json_without_absent_members() {
        let list = PinRequest::list(&alice(), DOMAIN, NOW);
        let text = serde_json::to_string(&list).unwrap();
        assert!(text.starts_with("{\"op\":\"list\",\"key\":\"ed25519:"));
        assert!(!text.contains("blob") && !text.contains("null"));
        let back: PinRequest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, list);
        let request = add(NOW);
        let back: PinRequest =
            serde_json::from_slice(&serde_json::to_vec(&request).unwrap()).unwrap();
        assert_eq!(back, request);
        assert!(
            serde_json::from_str::<PinRequest>(&text.replace("{\"op\"", "{\"x\":1,\"op\""))
                .is_err()
        );
        assert!(
            serde_json::from_str::<PinRequest>(&text.replace("\"list\"", "\"delete\"")).is_err()
        );
    }
}
