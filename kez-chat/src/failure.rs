//! Failures for people: what went wrong, what to do, and the exit code that says which kind.

use kez_client::{ClientError, HomeError, StoreError};
use kez_core::Handle;
use kez_core::trust::PinRefusal;

/// Exit code: a runtime or network failure.
pub const RUNTIME: u8 = 1;
/// Exit code: a usage or setup error.
pub const USAGE: u8 = 2;
/// Exit code: something named does not exist.
pub const NOT_FOUND: u8 = 3;
/// Exit code: a conflict (taken handle, changed key).
pub const CONFLICT: u8 = 4;
/// Exit code: the server refused.
pub const REFUSED: u8 = 5;
/// Exit code: the home's own data is damaged or missing.
pub const DAMAGED: u8 = 6;

/// Why a command failed, and the exit code to end with.
#[derive(Debug)]
pub struct Failure {
    /// The exit code (see `EXIT_CODES`).
    pub code: u8,
    /// What went wrong and what to do, for people.
    pub message: String,
}

impl Failure {
    /// A failure with this code and message.
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// The home, its key or config failed.
    pub fn home(err: HomeError) -> Failure {
        use kez_client::home::KeyFileError;
        let code = match &err {
            HomeError::Exposed { .. }
            | HomeError::NoHome
            | HomeError::Key(KeyFileError::TooOpen { .. }) => USAGE,
            HomeError::Key(KeyFileError::NotFound { .. })
            | HomeError::Key(KeyFileError::NotAFile { .. })
            | HomeError::Key(KeyFileError::TooLarge { .. })
            | HomeError::Key(KeyFileError::NotText { .. })
            | HomeError::Key(KeyFileError::Malformed { .. })
            | HomeError::BadConfig { .. } => DAMAGED,
            _ => RUNTIME,
        };
        Failure::new(code, err.to_string())
    }

    /// `add` could not verify a contact: a changed key, an older or a forked chain is a loud
    /// conflict.
    pub fn contact(err: ClientError, handle: &Handle) -> Failure {
        Failure::key_check(
            err,
            handle,
            "Nothing was changed: the old key stays pinned.",
        )
    }

    /// `send` refused to send because the recipient did not verify.
    pub fn send_refused(err: ClientError, handle: &Handle) -> Failure {
        Failure::key_check(err, handle, "NOTHING WAS SENT.")
    }

    fn key_check(err: ClientError, handle: &Handle, consequence: &str) -> Failure {
        match err {
            ClientError::Store(StoreError::Refused {
                refusal: PinRefusal::KeyChanged { offered, .. },
                ..
            }) => Failure::new(
                CONFLICT,
                format!(
                    "WARNING: the key of {handle} changed! {err}. {consequence} This may be an attack or a new account. Check the new key with {handle} another way (in person, on a call); only if it is theirs, run `kez-chat add {handle} --accept-key {offered}`."
                ),
            ),
            ClientError::Store(StoreError::Refused { .. }) => {
                Failure::new(CONFLICT, format!("WARNING: {err}. {consequence}"))
            }
            other => Failure::client(other),
        }
    }

    /// The local store failed; a refused key is a conflict.
    pub fn store(err: StoreError) -> Failure {
        match err {
            StoreError::Refused { .. } => Failure::new(CONFLICT, format!("WARNING: {err}")),
            StoreError::Exposed { .. } => Failure::new(USAGE, err.to_string()),
            StoreError::Damaged { .. } | StoreError::Corrupt(_) => {
                Failure::new(DAMAGED, err.to_string())
            }
            other => Failure::new(RUNTIME, other.to_string()),
        }
    }

    /// A client call failed.
    pub fn client(err: ClientError) -> Failure {
        match err {
            ClientError::Url(err) => Failure::new(
                USAGE,
                format!(
                    "{err} (kez-chat --allow-plaintext; --server and KEZ_CHAT_SERVER set the URL)"
                ),
            ),
            ClientError::Connect { url, source }
                if source.kind() == async_nats::ConnectErrorKind::Authentication =>
            {
                Failure::new(
                    RUNTIME,
                    format!(
                        "did not prove this key to {url}: {source}. A broker that asks a key to sign something other than a nats-server nonce is not a kez server, or someone on the way is tampering with the connection: check --server, and use tls://"
                    ),
                )
            }
            ClientError::Connect { url, source } => {
                if source.kind() == async_nats::ConnectErrorKind::AuthorizationViolation {
                    Failure::new(
                        REFUSED,
                        format!(
                            "the server at {url} refused this key, also when asked again for a few seconds: either its auth service is not running (a server starting or broken: try again in a minute), this device was revoked from your sigchain (another of your devices lists it: `kez-chat devices`), or the operator disabled this account (ask them)"
                        ),
                    )
                } else {
                    Failure::new(
                        RUNTIME,
                        format!(
                            "cannot connect to {url}: {source}. The server may be down or the URL wrong (check --server / KEZ_CHAT_SERVER)"
                        ),
                    )
                }
            }
            ClientError::TooLarge { size, max } => Failure::new(
                USAGE,
                format!(
                    "the message is {size} bytes, and one message carries at most {max}: nothing was sent. Send a long text as a file: `kez-chat share @name FILE`"
                ),
            ),
            ClientError::Service(err) if err.answer.code == 429 => Failure::new(
                REFUSED,
                format!(
                    "{} (waited already; try again later)",
                    if err.answer.message.is_empty() {
                        err.to_string()
                    } else {
                        err.answer.message
                    }
                ),
            ),
            ClientError::Service(err) => {
                let code = match err.answer.code {
                    409 if err.answer.name == "inbox_full" => REFUSED,
                    400 | 413 => USAGE,
                    404 => NOT_FOUND,
                    409 => CONFLICT,
                    401 | 403 => REFUSED,
                    _ => RUNTIME,
                };
                // The service's message says what went wrong and what to do (PROTOCOL.md §5.1).
                if err.answer.message.is_empty() {
                    Failure::new(code, err.to_string())
                } else {
                    Failure::new(code, err.answer.message)
                }
            }
            ClientError::Request { subject, source } => Failure::new(
                RUNTIME,
                format!(
                    "{subject}: no answer from the server ({source}); try again, or check that the server is running"
                ),
            ),
            ClientError::Store(err) => Failure::store(err),
            ClientError::Handle(err) => Failure::new(USAGE, err.to_string()),
            err @ ClientError::NotAccepted { .. } => Failure::new(CONFLICT, err.to_string()),
            other => Failure::new(RUNTIME, other.to_string()),
        }
    }
}
