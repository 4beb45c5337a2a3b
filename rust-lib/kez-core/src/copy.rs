//! Copies of a sent message for the sender's other devices (PROTOCOL.md §8.5).
//!
//! A message goes to every active device of its recipient and, as a copy, to every other
//! active device of its sender, so that each of them shows the whole conversation. The copy is
//! an ordinary envelope from the sending device to the other device, with the message's id and
//! time, of content type [`SENT_COPY_CONTENT_TYPE`]; its body names the conversation and
//! carries the message:
//!
//! ```text
//! body = u16be(meta_len) || meta || message body
//! meta = canonical JSON {"content_type","to"}   (the message's content type; the recipient's identity)
//! ```
//!
//! A device takes a copy as its own sent message only when the envelope's sender is another
//! active device of its own identity (by its own verified sigchain); from anyone else it is
//! just a message of an unknown content type.

use serde::{Deserialize, Serialize};

use crate::canonical;
use crate::envelope::{self, check_content_type};
use crate::key::PublicKey;

/// The content type of a copy of a sent message.
pub const SENT_COPY_CONTENT_TYPE: &str = "kez.sent";
/// Largest `meta`, in bytes.
pub const MAX_META_BYTES: usize = 512;

/// A copy of a message the own identity sent, for another of its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentCopy {
    /// The identity the message was sent to: the conversation it belongs to.
    pub to: PublicKey,
    /// The message's content type.
    pub content_type: String,
    /// The message's body.
    pub body: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    content_type: String,
    to: PublicKey,
}

/// Why a copy's body is not a copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SentCopyError {
    /// Shorter than its length prefix says.
    #[error("a sent copy is truncated")]
    Truncated,
    /// The meta is not what §8.5 says.
    #[error("a sent copy's meta is not valid: {0}")]
    Malformed(String),
}

impl SentCopy {
    fn meta(&self) -> Vec<u8> {
        let meta = Meta {
            content_type: self.content_type.clone(),
            to: self.to,
        };
        canonical::encode(&serde_json::to_value(&meta).expect("meta serialises"))
            .expect("meta is canonical JSON")
    }

    /// The copy's body, as sealed into the envelope.
    pub fn encode(&self) -> Vec<u8> {
        let meta = self.meta();
        let length = u16::try_from(meta.len()).expect("meta fits a u16");
        let mut bytes = Vec::with_capacity(2 + meta.len() + self.body.len());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend_from_slice(&meta);
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// Reads a copy's body.
    pub fn decode(bytes: &[u8]) -> Result<SentCopy, SentCopyError> {
        let (length, rest) = bytes.split_at_checked(2).ok_or(SentCopyError::Truncated)?;
        let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
        if length > MAX_META_BYTES {
            return Err(SentCopyError::Malformed(format!(
                "meta is {length} bytes; the limit is {MAX_META_BYTES}"
            )));
        }
        let (meta, body) = rest
            .split_at_checked(length)
            .ok_or(SentCopyError::Truncated)?;
        let value =
            canonical::decode(meta).map_err(|err| SentCopyError::Malformed(err.to_string()))?;
        let meta: Meta = serde_json::from_value(value)
            .map_err(|err| SentCopyError::Malformed(err.to_string()))?;
        check_content_type(&meta.content_type)
            .map_err(|err| SentCopyError::Malformed(err.to_string()))?;
        if meta.content_type == SENT_COPY_CONTENT_TYPE {
            return Err(SentCopyError::Malformed("a copy of a copy".into()));
        }
        Ok(SentCopy {
            to: meta.to,
            content_type: meta.content_type,
            body: body.to_vec(),
        })
    }

    /// The largest message body of `content_type` sealed at `time` whose copy still fits an
    /// envelope: a message to several devices is sent whole or not at all.
    pub fn max_body_len(content_type: &str, time: u64) -> Option<usize> {
        let copy = SentCopy {
            to: crate::SecretKey::from_seed(&[0; 32]).public_key(),
            content_type: content_type.to_owned(),
            body: Vec::new(),
        };
        let framing = copy.encode().len();
        envelope::max_body_len(content_type, time)?
            .min(envelope::max_body_len(SENT_COPY_CONTENT_TYPE, time)?.checked_sub(framing)?)
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;
    use crate::envelope::{MessageId, open, seal_with_id};

    fn copy(body: &[u8]) -> SentCopy {
        SentCopy {
            to: SecretKey::from_seed(&[9; 32]).public_key(),
            content_type: "text".into(),
            body: body.to_vec(),
        }
    }

    #[test]
    fn a_copy_reads_back_as_written() {
        let written = copy(b"hello \x00 bytes");
        assert_eq!(SentCopy::decode(&written.encode()).unwrap(), written);
        assert_eq!(SentCopy::decode(&copy(b"").encode()).unwrap(), copy(b""));
    }

    #[test]
    fn a_broken_copy_is_refused() {
        let bytes = copy(b"hi").encode();
        assert_eq!(SentCopy::decode(&bytes[..1]), Err(SentCopyError::Truncated));
        assert_eq!(
            SentCopy::decode(&bytes[..10]),
            Err(SentCopyError::Truncated)
        );
        let mut long = bytes.clone();
        long[0] = 0xff;
        assert!(matches!(
            SentCopy::decode(&long),
            Err(SentCopyError::Malformed(_))
        ));
        let mut bad_meta = bytes.clone();
        bad_meta[2] = b'[';
        assert!(matches!(
            SentCopy::decode(&bad_meta),
            Err(SentCopyError::Malformed(_))
        ));
        let nested = SentCopy {
            content_type: SENT_COPY_CONTENT_TYPE.into(),
            ..copy(b"")
        };
        assert!(matches!(
            SentCopy::decode(&nested.encode()),
            Err(SentCopyError::Malformed(_))
        ));
        let odd_type = SentCopy {
            content_type: "Not A Type".into(),
            ..copy(b"")
        };
        assert!(matches!(
            SentCopy::decode(&odd_type.encode()),
            Err(SentCopyError::Malformed(_))
        ));
    }

    #[test]
    fn the_largest_body_still_fits_as_a_copy_and_one_more_byte_does_not() {
        let time = 1_767_225_600;
        let max = SentCopy::max_body_len("text", time).unwrap();
        assert_eq!(
            (max, envelope::max_body_len("text", time).unwrap()),
            (64_807, 64_916),
            "PROTOCOL.md §8.5 names these"
        );
        let sender = SecretKey::from_seed(&[1; 32]);
        let device = SecretKey::from_seed(&[2; 32]).public_key();
        let id = MessageId::from_bytes([5; 16]);
        // The copy's own limit is envelope::max_body_len, which holds for both envelope
        // versions (envelope's tests check that it fits each).
        let copy_max = envelope::max_body_len(SENT_COPY_CONTENT_TYPE, time).unwrap();
        let fits = copy(&vec![b'x'; max]).encode();
        assert_eq!(fits.len(), copy_max);
        seal_with_id(&sender, &device, SENT_COPY_CONTENT_TYPE, &fits, time, id).unwrap();
        let too_big = copy(&vec![b'x'; max + 1]).encode();
        assert_eq!(too_big.len(), copy_max + 1);
    }

    #[test]
    fn a_copy_travels_in_an_envelope_with_the_messages_id() {
        let sender = SecretKey::from_seed(&[1; 32]);
        let other_device = SecretKey::from_seed(&[2; 32]);
        let id = MessageId::from_bytes([7; 16]);
        let written = copy(b"see you");
        let sealed = seal_with_id(
            &sender,
            &other_device.public_key(),
            SENT_COPY_CONTENT_TYPE,
            &written.encode(),
            100,
            id,
        )
        .unwrap();
        let message = open(&other_device, &sealed).unwrap();
        assert_eq!(message.id, id);
        assert_eq!(message.content_type, SENT_COPY_CONTENT_TYPE);
        assert_eq!(SentCopy::decode(&message.body).unwrap(), written);
    }
}
