//! The errors a service endpoint answers with: a small, stable code set (PROTOCOL.md §5.1).

use kez_core::ChainErrorKind;
use kez_core::registry::RegistrationError;

/// Header carrying the error's stable machine-readable name, beside the standard
/// `Nats-Service-Error-Code` (number) and `Nats-Service-Error` (message for people).
pub const ERROR_NAME_HEADER: &str = "Kez-Error";
/// On a `conflict` from `kez.sigchain.append`: the chain's current seq.
pub const HEAD_SEQ_HEADER: &str = "Kez-Head-Seq";
/// On a `conflict` from `kez.sigchain.append`: the chain's current head hash.
pub const HEAD_HASH_HEADER: &str = "Kez-Head-Hash";

/// On a 429: milliseconds until a request would be accepted again.
pub const RETRY_AFTER_HEADER: &str = "Kez-Retry-After-Ms";
/// The pause a 503 `unavailable` answer suggests before the same request is sent again.
pub const UNAVAILABLE_RETRY_MS: u64 = 1000;

/// An error answer: numeric code, stable name, a message a person can act on, extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// One of 400, 401, 403, 404, 409, 413, 429, 500, 502, 503.
    pub code: u16,
    /// Stable snake_case name, e.g. `handle_taken`.
    pub name: &'static str,
    /// What went wrong and what to do.
    pub message: String,
    /// Extra headers, e.g. the current head on a conflict.
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    /// An error with no extra headers.
    pub fn new(code: u16, name: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            name,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// 400: the request cannot be understood.
    pub fn malformed(message: impl Into<String>) -> Self {
        ApiError::new(400, "malformed", message)
    }

    /// 404: nothing by that name.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(404, "not_found", message)
    }

    /// 500: a bug or corrupt state; the message is logged, the caller gets a generic one.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(500, "internal", message)
    }

    /// 503: JetStream did not answer (while a cluster elects a stream's leader, say); the same
    /// request is expected to work after [`UNAVAILABLE_RETRY_MS`], which the answer names in
    /// `Kez-Retry-After-Ms`.
    pub fn unavailable(what: impl std::fmt::Display) -> Self {
        ApiError::new(
            503,
            "unavailable",
            format!("storage is unavailable ({what}); retry shortly"),
        )
        .with_header(RETRY_AFTER_HEADER, UNAVAILABLE_RETRY_MS.to_string())
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

impl From<RegistrationError> for ApiError {
    fn from(err: RegistrationError) -> Self {
        let message = err.to_string();
        match err {
            RegistrationError::BadHandle(handle) => ApiError::new(400, handle.code(), message),
            RegistrationError::NotNormalised { .. } => {
                ApiError::new(400, "not_normalised", message)
            }
            RegistrationError::WrongDomain { .. } => ApiError::new(400, "wrong_domain", message),
            RegistrationError::OutsideWindow { .. } => {
                ApiError::new(401, "outside_window", message)
            }
            RegistrationError::BadSignature => ApiError::new(401, "bad_signature", message),
        }
    }
}

impl From<kez_core::mail::SendRequestError> for ApiError {
    fn from(err: kez_core::mail::SendRequestError) -> Self {
        let code = match err {
            kez_core::mail::SendRequestError::TooLarge(_) => 413,
            _ => 400,
        };
        ApiError::new(code, err.code(), err.to_string())
    }
}

impl From<ChainErrorKind> for ApiError {
    fn from(err: ChainErrorKind) -> Self {
        let code = match err {
            ChainErrorKind::TooLarge { .. }
            | ChainErrorKind::TooManyLinks
            | ChainErrorKind::TooManyEndpoints
            | ChainErrorKind::TooManyClaims
            | ChainErrorKind::TooManyUnknownOps => 413,
            ChainErrorKind::BadSignature | ChainErrorKind::BadCounterSignature => 401,
            ChainErrorKind::NotCurrentKey { .. } => 403,
            ChainErrorKind::WrongSeq { .. } | ChainErrorKind::WrongPrev => 409,
            ChainErrorKind::Empty
            | ChainErrorKind::UnknownVersion { .. }
            | ChainErrorKind::Malformed(_)
            | ChainErrorKind::WrongChain { .. }
            | ChainErrorKind::RotateToSameKey
            | ChainErrorKind::DuplicateEndpoint { .. }
            | ChainErrorKind::UnknownEndpoint { .. }
            | ChainErrorKind::DuplicateClaim { .. }
            | ChainErrorKind::UnknownClaim { .. } => 400,
        };
        ApiError::new(code, err.code(), err.to_string())
    }
}
