//! Error answers (PROTOCOL.md §5.1): a small, stable code set carried in NATS service headers,
//! with the empty body. The server makes them, the client reads them, both through
//! [`ErrorAnswer`].

use std::borrow::Cow;

use kez_core::ChainErrorKind;
use kez_core::sigchain::LinkHash;

use crate::answer::ChainHead;
use crate::mail::SendRequestError;
use crate::pin::PinRequestError;
use crate::registry::RegistrationError;

/// The error's number (NATS micro-services' own header).
pub const CODE_HEADER: &str = "Nats-Service-Error-Code";
/// The error's message for people (NATS micro-services' own header).
pub const MESSAGE_HEADER: &str = "Nats-Service-Error";
/// The error's stable machine-readable name, e.g. `handle_taken`.
pub const NAME_HEADER: &str = "Kez-Error";
/// On a `conflict` from `kez.sigchain.append`: the chain's current seq.
pub const HEAD_SEQ_HEADER: &str = "Kez-Head-Seq";
/// On a `conflict` from `kez.sigchain.append`: the chain's current head hash.
pub const HEAD_HASH_HEADER: &str = "Kez-Head-Hash";
/// On a 429 or a 503: milliseconds until the same request is expected to be accepted.
pub const RETRY_AFTER_HEADER: &str = "Kez-Retry-After-Ms";
/// The pause a 503 `unavailable` answer names before the same request is sent again.
pub const UNAVAILABLE_RETRY_MS: u64 = 1000;

/// An error answer: numeric code, stable name, a message a person can act on, and what some
/// errors carry besides (the chain's head, when to ask again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({name}, {code})")]
pub struct ErrorAnswer {
    /// One of 400, 401, 403, 404, 409, 413, 429, 500, 502, 503 (0 when an answer named none).
    pub code: u16,
    /// Stable snake_case name, e.g. `handle_taken`.
    pub name: Cow<'static, str>,
    /// What went wrong and what to do.
    pub message: String,
    /// On a `conflict` from `kez.sigchain.append`: the chain's current head.
    pub head: Option<ChainHead>,
    /// On a 429 or 503: milliseconds to wait before asking the same again.
    pub retry_after_ms: Option<u64>,
}

impl ErrorAnswer {
    /// An error that carries nothing besides.
    pub fn new(code: u16, name: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        ErrorAnswer {
            code,
            name: name.into(),
            message: message.into(),
            head: None,
            retry_after_ms: None,
        }
    }

    /// 400 `malformed`: the request cannot be understood.
    pub fn malformed(message: impl Into<String>) -> Self {
        ErrorAnswer::new(400, "malformed", message)
    }

    /// 404 `not_found`: nothing by that name.
    pub fn not_found(message: impl Into<String>) -> Self {
        ErrorAnswer::new(404, "not_found", message)
    }

    /// 413 `too_large`: `what` is `size` bytes, over `limit`.
    pub fn too_large(what: &str, size: usize, limit: usize) -> Self {
        ErrorAnswer::new(
            413,
            "too_large",
            format!("{what} is {size} bytes; the limit is {limit}"),
        )
    }

    /// 404 `no_prekeys` (`kez.keys.claim`, PROTOCOL.md §15.2): `device` has published no
    /// prekeys, or none is left.
    pub fn no_prekeys(device: &kez_core::PublicKey) -> Self {
        ErrorAnswer::new(
            404,
            "no_prekeys",
            format!("{device} has no prekeys on this server; send it a version 1 envelope"),
        )
    }

    /// 400 `too_many_keys` (`kez.keys.publish`, PROTOCOL.md §15.2): more one-time keys than
    /// one request may carry or the server keeps for a device.
    pub fn too_many_keys(message: impl Into<String>) -> Self {
        ErrorAnswer::new(400, "too_many_keys", message)
    }

    /// 429 `rate_limited`: too many requests; the same request is accepted after `ms`.
    pub fn rate_limited(message: impl Into<String>, ms: u64) -> Self {
        ErrorAnswer::new(429, "rate_limited", message).with_retry_after_ms(ms)
    }

    /// 500 `internal`: a bug or corrupt state. The message is for the server's log; the
    /// caller gets [`ErrorAnswer::status`]'s generic one.
    pub fn internal(message: impl Into<String>) -> Self {
        ErrorAnswer::new(500, "internal", message)
    }

    /// 503 `unavailable`: storage did not answer (while a cluster elects a leader, say); the
    /// same request is expected to work after [`UNAVAILABLE_RETRY_MS`].
    pub fn unavailable(what: impl std::fmt::Display) -> Self {
        ErrorAnswer::new(
            503,
            "unavailable",
            format!("storage is unavailable ({what}); retry shortly"),
        )
        .with_retry_after_ms(UNAVAILABLE_RETRY_MS)
    }

    /// The same error, naming when to ask again.
    pub fn with_retry_after_ms(self, ms: u64) -> Self {
        ErrorAnswer {
            retry_after_ms: Some(ms),
            ..self
        }
    }

    /// The same error, naming the chain's current head.
    pub fn with_head(self, head: ChainHead) -> Self {
        ErrorAnswer {
            head: Some(head),
            ..self
        }
    }

    /// The `Nats-Service-Error` text: the message with control characters made spaces (a
    /// header value cannot hold CR or LF), or a generic text for a 500, whose message stays in
    /// the server's log.
    pub fn status(&self) -> String {
        match self.code {
            500 => "internal error; the server log has the details".to_owned(),
            _ => self.message.replace(|c: char| c.is_control(), " "),
        }
    }

    /// The headers besides `Nats-Service-Error-Code` and `Nats-Service-Error` (which NATS
    /// micro-services write): `Kez-Error`, and `Kez-Retry-After-Ms` and `Kez-Head-*` when set.
    pub fn kez_headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![(NAME_HEADER, self.name.to_string())];
        if let Some(ms) = self.retry_after_ms {
            headers.push((RETRY_AFTER_HEADER, ms.to_string()));
        }
        if let Some(head) = self.head {
            headers.push((HEAD_SEQ_HEADER, head.seq.to_string()));
            headers.push((HEAD_HASH_HEADER, head.head.to_string()));
        }
        headers
    }

    /// Reads an error answer from its headers (`header` gives a header's value), or `None`
    /// when they carry no `Nats-Service-Error-Code` (the answer is a success). Members that do
    /// not parse are left out (a code that does not is 0).
    pub fn from_headers<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<ErrorAnswer> {
        let code = header(CODE_HEADER)?;
        let text = |name| header(name).unwrap_or_default();
        let head = match (
            text(HEAD_SEQ_HEADER).parse::<u64>(),
            text(HEAD_HASH_HEADER).parse::<LinkHash>(),
        ) {
            (Ok(seq), Ok(head)) => Some(ChainHead { seq, head }),
            _ => None,
        };
        Some(ErrorAnswer {
            code: code.parse().unwrap_or(0),
            name: text(NAME_HEADER).to_owned().into(),
            message: text(MESSAGE_HEADER).to_owned(),
            head,
            retry_after_ms: text(RETRY_AFTER_HEADER).parse().ok(),
        })
    }
}

impl From<RegistrationError> for ErrorAnswer {
    fn from(err: RegistrationError) -> Self {
        let message = err.to_string();
        match err {
            RegistrationError::BadHandle(handle) => ErrorAnswer::new(400, handle.code(), message),
            RegistrationError::NotNormalised { .. } => {
                ErrorAnswer::new(400, "not_normalised", message)
            }
            RegistrationError::WrongDomain { .. } => ErrorAnswer::new(400, "wrong_domain", message),
            RegistrationError::OutsideWindow { .. } => {
                ErrorAnswer::new(401, "outside_window", message)
            }
            RegistrationError::BadSignature => ErrorAnswer::new(401, "bad_signature", message),
        }
    }
}

impl From<PinRequestError> for ErrorAnswer {
    fn from(err: PinRequestError) -> Self {
        let code = match err {
            PinRequestError::Malformed(_) | PinRequestError::WrongDomain { .. } => 400,
            PinRequestError::OutsideWindow { .. } | PinRequestError::BadSignature => 401,
        };
        ErrorAnswer::new(code, err.code(), err.to_string())
    }
}

impl From<SendRequestError> for ErrorAnswer {
    fn from(err: SendRequestError) -> Self {
        let code = match err {
            SendRequestError::TooLarge(_) => 413,
            SendRequestError::Truncated(_) | SendRequestError::BadRecipient(_) => 400,
        };
        ErrorAnswer::new(code, err.code(), err.to_string())
    }
}

impl From<ChainErrorKind> for ErrorAnswer {
    fn from(err: ChainErrorKind) -> Self {
        let code = match err {
            ChainErrorKind::TooLarge { .. }
            | ChainErrorKind::TooManyLinks
            | ChainErrorKind::TooManyEndpoints
            | ChainErrorKind::TooManyClaims
            | ChainErrorKind::TooManyUnknownOps
            | ChainErrorKind::TooManyDevices => 413,
            ChainErrorKind::BadSignature | ChainErrorKind::BadCounterSignature => 401,
            ChainErrorKind::NotCurrentKey { .. }
            | ChainErrorKind::RevokedSigner { .. }
            | ChainErrorKind::NotADevice { .. } => 403,
            ChainErrorKind::WrongSeq { .. } | ChainErrorKind::WrongPrev => 409,
            ChainErrorKind::Empty
            | ChainErrorKind::UnknownVersion { .. }
            | ChainErrorKind::VersionDowngrade
            | ChainErrorKind::Malformed(_)
            | ChainErrorKind::WrongChain { .. }
            | ChainErrorKind::RotateToSameKey
            | ChainErrorKind::DuplicateEndpoint { .. }
            | ChainErrorKind::UnknownEndpoint { .. }
            | ChainErrorKind::DuplicateClaim { .. }
            | ChainErrorKind::UnknownClaim { .. }
            | ChainErrorKind::DuplicateDevice { .. }
            | ChainErrorKind::DuplicateDeviceName { .. }
            | ChainErrorKind::UnknownDevice { .. }
            | ChainErrorKind::DeviceRevoked { .. }
            | ChainErrorKind::LastDevice { .. } => 400,
        };
        ErrorAnswer::new(code, err.code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn an_error_reads_back_from_the_headers_it_writes() {
        let head = ChainHead {
            seq: 7,
            head: LinkHash::of(b"link"),
        };
        let conflict = ErrorAnswer::new(409, "conflict", "the chain moved").with_head(head);
        let slow = ErrorAnswer::new(429, "rate_limited", "slow\r\ndown").with_retry_after_ms(250);
        for sent in [conflict, slow, ErrorAnswer::unavailable("no leader")] {
            let mut headers: HashMap<&str, String> = sent.kez_headers().into_iter().collect();
            headers.insert(CODE_HEADER, sent.code.to_string());
            headers.insert(MESSAGE_HEADER, sent.status());
            let read = ErrorAnswer::from_headers(|name| headers.get(name).map(String::as_str))
                .expect("an error answer");
            assert_eq!(read.code, sent.code);
            assert_eq!(read.name, sent.name);
            assert_eq!(
                (read.head, read.retry_after_ms),
                (sent.head, sent.retry_after_ms)
            );
            assert!(!read.message.contains(['\r', '\n']));
        }
        assert_eq!(ErrorAnswer::from_headers(|_| None), None);
    }

    #[test]
    fn an_internal_error_keeps_its_message_to_the_server() {
        let err = ErrorAnswer::internal("bucket kez_handles: corrupt record for alice");
        assert!(!err.status().contains("alice"));
    }
}
