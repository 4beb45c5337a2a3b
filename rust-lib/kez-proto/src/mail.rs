//! Handing a sealed envelope to the home server for delivery (`kez.mail.send`, PROTOCOL.md §6.3).
//!
//! Clients do not write into inboxes themselves: the server checks that the recipient is
//! registered and that the sender is within its budget, then stores the envelope in the
//! recipient's inbox. The request body is binary, so an envelope travels as it is:
//!
//! ```text
//! body = recipient identity key (32 bytes) || message id (16 bytes) || envelope (1..=65536 bytes)
//! ```

use kez_core::envelope::{MAX_ENVELOPE_BYTES, MessageId};
use kez_core::key::{KeyError, PublicKey};

/// Bytes before the envelope: the recipient's key and the message id.
pub const SEND_FRAME_LEN: usize = 32 + 16;
/// Largest send request body.
pub const MAX_SEND_BYTES: usize = SEND_FRAME_LEN + MAX_ENVELOPE_BYTES;

/// A decoded send request, borrowing the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest<'a> {
    /// The recipient's identity: the inbox the envelope goes to.
    pub to: PublicKey,
    /// The message's id, the de-duplication key of the inbox stream (`Nats-Msg-Id`).
    pub id: MessageId,
    /// The sealed envelope (PROTOCOL.md §8), opaque to the server.
    pub envelope: &'a [u8],
}

/// Why a send request body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendRequestError {
    /// Shorter than the frame plus one envelope byte.
    #[error(
        "a send request is a 32-byte key, a 16-byte message id and the envelope; got {0} bytes"
    )]
    Truncated(usize),
    /// The envelope is larger than [`MAX_ENVELOPE_BYTES`].
    #[error(
        "the message is {0} bytes sealed; the limit is {MAX_ENVELOPE_BYTES}: share a long text as a file"
    )]
    TooLarge(usize),
    /// The recipient bytes are not a valid key.
    #[error("the recipient is not a valid key: {0}")]
    BadRecipient(KeyError),
}

impl SendRequestError {
    /// The stable wire name (PROTOCOL.md §5.1).
    pub fn code(&self) -> &'static str {
        match self {
            SendRequestError::Truncated(_) | SendRequestError::BadRecipient(_) => "malformed",
            SendRequestError::TooLarge(_) => "too_large",
        }
    }
}

impl<'a> SendRequest<'a> {
    /// The request body for `envelope` to `to` under `id`.
    pub fn encode(to: &PublicKey, id: &MessageId, envelope: &[u8]) -> Vec<u8> {
        let mut body = Vec::with_capacity(SEND_FRAME_LEN + envelope.len());
        body.extend_from_slice(to.as_bytes());
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(envelope);
        body
    }

    /// Reads a request body: the size first, then the recipient key.
    pub fn decode(body: &'a [u8]) -> Result<SendRequest<'a>, SendRequestError> {
        if body.len() <= SEND_FRAME_LEN {
            return Err(SendRequestError::Truncated(body.len()));
        }
        let envelope = &body[SEND_FRAME_LEN..];
        if envelope.len() > MAX_ENVELOPE_BYTES {
            return Err(SendRequestError::TooLarge(envelope.len()));
        }
        let to = PublicKey::from_bytes(body[..32].try_into().expect("32 bytes"))
            .map_err(SendRequestError::BadRecipient)?;
        let id = MessageId::from_bytes(body[32..SEND_FRAME_LEN].try_into().expect("16 bytes"));
        Ok(SendRequest { to, id, envelope })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kez_core::key::SecretKey;

    #[test]
    fn a_request_round_trips_and_bad_ones_have_codes() {
        let to = SecretKey::from_seed(&[3; 32]).public_key();
        let id = MessageId::from_bytes([7; 16]);
        let body = SendRequest::encode(&to, &id, b"sealed");
        assert_eq!(&body[..32], to.as_bytes());
        assert_eq!(&body[32..48], &[7; 16]);
        let request = SendRequest::decode(&body).unwrap();
        assert_eq!(
            (request.to, request.id, request.envelope),
            (to, id, &b"sealed"[..])
        );

        assert_eq!(
            SendRequest::decode(&body[..48]),
            Err(SendRequestError::Truncated(48))
        );
        let largest = SendRequest::encode(&to, &id, &vec![0; MAX_ENVELOPE_BYTES]);
        assert_eq!(largest.len(), MAX_SEND_BYTES);
        assert!(SendRequest::decode(&largest).is_ok());
        let mut too_large = largest;
        too_large.push(0);
        let err = SendRequest::decode(&too_large).unwrap_err();
        assert_eq!(err, SendRequestError::TooLarge(MAX_ENVELOPE_BYTES + 1));
        assert_eq!(err.code(), "too_large");
        let mut weak = body.clone();
        weak[..32].copy_from_slice(&[0; 32]);
        weak[0] = 1;
        let err = SendRequest::decode(&weak).unwrap_err();
        assert!(matches!(
            err,
            SendRequestError::BadRecipient(KeyError::WeakKey)
        ));
        assert_eq!(err.code(), "malformed");
    }
}
