//! Mail through the home server (PROTOCOL.md §6.3): `kez.mail.send` hands a sealed envelope
//! over for a recipient's inbox, `kez.mail.fetch` reads the caller's own inbox and acknowledges
//! what the caller has stored.
//!
//! Clients do not touch the inbox stream themselves: the server checks that the recipient is
//! registered and that the sender is within its budget, then stores the envelope; and it reads
//! and purges only the inbox of the connection that asks. Envelopes travel as they are, in
//! binary bodies:
//!
//! ```text
//! send request = recipient identity key (32 bytes) || message id (16 bytes) || envelope (1..=65536 bytes)
//! fetch answer = pending (u64 BE) || { seq (u64 BE) || time (u64 BE) || length (u32 BE) || envelope (length bytes) }*
//! ```

use kez_core::envelope::{MAX_ENVELOPE_BYTES, MessageId};
use kez_core::key::{KeyError, PublicKey};
use serde::{Deserialize, Serialize};

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

/// Most messages one fetch answer carries, and the largest `max` a fetch may ask for.
pub const MAX_FETCH_MESSAGES: u32 = 256;
/// Envelope bytes after which the server ends a fetch answer (it always carries the first
/// message, whatever its size): with the frames, an answer stays well under the broker's 1 MiB
/// payload limit.
pub const MAX_FETCH_BYTES: usize = 512 * 1024;
/// The largest `after` and `time` a fetch may name: 2^53 − 1, the largest integer every JSON
/// reader holds exactly (as microseconds, the year 2255).
pub const MAX_FETCH_AFTER: u64 = (1 << 53) - 1;
/// Bytes of a fetch answer before its first message: the pending count.
pub const FETCH_HEADER_LEN: usize = 8;
/// Bytes before each message's envelope in a fetch answer: its sequence, time and length.
pub const FETCH_FRAME_LEN: usize = 8 + 8 + 4;

/// The body of `kez.mail.fetch`: the caller's messages after `after`, at most `max`; and the
/// acknowledgement of every message up to `after`, which the server then deletes.
///
/// `after` is the highest inbox sequence the caller has stored (0: none yet) and `time` when
/// the stream stored that message. Sequences alone cannot tell a stream restored from a backup
/// or recreated (which counts them again, for other messages) from the one the caller read: a
/// message of the caller's stored after `time` but numbered at most `after` shows it, and the
/// server then deletes nothing. Whose inbox is read is never in the body: it is the
/// connection's key, as nats-server vouches for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// Every message up to this sequence is stored by the caller (0: none).
    pub after: u64,
    /// Most messages wanted, 1 to [`MAX_FETCH_MESSAGES`].
    pub max: u32,
    /// When the message at `after` was stored, microseconds since the Unix epoch, from the
    /// answer that brought it (0 with `after` 0).
    pub time: u64,
    /// Whether each message of the answer names the peer domain it came from (PROTOCOL.md
    /// §6.3, §14.5): a client that federates asks for it. Absent: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub origins: bool,
}

impl FetchRequest {
    /// The request's bounds (PROTOCOL.md §6.3): `after` and `time` at most
    /// [`MAX_FETCH_AFTER`], `max` from 1 to [`MAX_FETCH_MESSAGES`], a `time` with any `after`
    /// but 0. The message says what to send instead.
    pub fn check(&self) -> Result<(), String> {
        if self.after > MAX_FETCH_AFTER || self.time > MAX_FETCH_AFTER {
            return Err(format!(
                "after is {} and time {}; neither may be above {MAX_FETCH_AFTER}",
                self.after, self.time
            ));
        }
        if self.max == 0 || self.max > MAX_FETCH_MESSAGES {
            return Err(format!(
                "max is {}; ask for 1 to {MAX_FETCH_MESSAGES} messages",
                self.max
            ));
        }
        if self.after > 0 && self.time == 0 {
            return Err(
                "after names a stored message: send the time the answer that brought it gave"
                    .into(),
            );
        }
        Ok(())
    }
}

/// One message of a fetch answer, borrowing the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched<'a> {
    /// Its sequence in the inbox stream: what the next fetch names as `after` once it is stored.
    pub seq: u64,
    /// When the stream stored it, microseconds since the Unix epoch: the next fetch's `time`.
    pub time: u64,
    /// The sealed envelope (PROTOCOL.md §8), as the sender handed it over.
    pub envelope: &'a [u8],
    /// The domain of the peer server that handed it over (`None`: a sender of this server),
    /// only in an answer to a fetch with `origins`.
    pub origin: Option<&'a str>,
}

/// A decoded `kez.mail.fetch` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchAnswer<'a> {
    /// How many messages of the caller's inbox came after the last one here when the server
    /// read it: more than 0 means fetch again at once.
    pub pending: u64,
    /// The messages, in ascending sequence.
    pub messages: Vec<Fetched<'a>>,
}

/// Why a fetch answer does not decode: a server that sends one is broken or hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchAnswerError {
    /// The answer ends inside its header or inside the frame starting at this byte.
    #[error("the fetch answer is cut short in the frame starting at byte {0}")]
    Truncated(usize),
    /// A frame announces an envelope larger than [`MAX_ENVELOPE_BYTES`] (or an empty one).
    #[error(
        "the fetch answer holds a message of {0} bytes; envelopes are 1 to {MAX_ENVELOPE_BYTES}"
    )]
    BadLength(u32),
    /// Sequences do not ascend.
    #[error("the fetch answer's sequences do not ascend ({previous}, then {seq})")]
    OutOfOrder {
        /// The earlier message's sequence.
        previous: u64,
        /// The next one's.
        seq: u64,
    },
    /// More messages than any fetch may carry.
    #[error("the fetch answer holds more than {MAX_FETCH_MESSAGES} messages")]
    TooMany,
    /// The frame starting at this byte names an origin that is not a normalised domain.
    #[error("the fetch answer's frame at byte {0} names an origin that is not a domain")]
    BadOrigin(usize),
}

impl<'a> FetchAnswer<'a> {
    /// The answer body: `pending`, then each message framed; with `origins` (the request's),
    /// each frame names its origin (a length byte, then the domain; 0 for none).
    pub fn encode(pending: u64, messages: &[Fetched<'_>], origins: bool) -> Vec<u8> {
        let size = FETCH_HEADER_LEN
            + messages
                .iter()
                .map(|message| {
                    FETCH_FRAME_LEN
                        + message.envelope.len()
                        + usize::from(origins) * (1 + message.origin.map_or(0, str::len))
                })
                .sum::<usize>();
        let mut body = Vec::with_capacity(size);
        body.extend_from_slice(&pending.to_be_bytes());
        for message in messages {
            let length = u32::try_from(message.envelope.len()).expect("an envelope fits a u32");
            body.extend_from_slice(&message.seq.to_be_bytes());
            body.extend_from_slice(&message.time.to_be_bytes());
            body.extend_from_slice(&length.to_be_bytes());
            if origins {
                let origin = message.origin.unwrap_or_default();
                body.push(u8::try_from(origin.len()).expect("a domain is at most 253 bytes"));
                body.extend_from_slice(origin.as_bytes());
            }
            body.extend_from_slice(message.envelope);
        }
        body
    }

    /// Reads an answer body, checking every frame (sequences ascending, sizes in bounds);
    /// `origins` as the request asked.
    pub fn decode(body: &'a [u8], origins: bool) -> Result<FetchAnswer<'a>, FetchAnswerError> {
        let (header, mut rest) = body
            .split_first_chunk::<FETCH_HEADER_LEN>()
            .ok_or(FetchAnswerError::Truncated(0))?;
        let pending = u64::from_be_bytes(*header);
        let mut messages: Vec<Fetched<'a>> = Vec::new();
        while !rest.is_empty() {
            let at = body.len() - rest.len();
            let (frame, after_frame) = rest
                .split_first_chunk::<FETCH_FRAME_LEN>()
                .ok_or(FetchAnswerError::Truncated(at))?;
            let seq = u64::from_be_bytes(frame[..8].try_into().expect("8 bytes"));
            let time = u64::from_be_bytes(frame[8..16].try_into().expect("8 bytes"));
            let length = u32::from_be_bytes(frame[16..].try_into().expect("4 bytes"));
            if length == 0 || length as usize > MAX_ENVELOPE_BYTES {
                return Err(FetchAnswerError::BadLength(length));
            }
            let (origin, after_frame) = match origins {
                false => (None, after_frame),
                true => {
                    let (&origin_length, rest) = after_frame
                        .split_first()
                        .ok_or(FetchAnswerError::Truncated(at))?;
                    if rest.len() < usize::from(origin_length) {
                        return Err(FetchAnswerError::Truncated(at));
                    }
                    let (origin, rest) = rest.split_at(usize::from(origin_length));
                    let origin = match origin {
                        [] => None,
                        bytes => Some(
                            std::str::from_utf8(bytes)
                                .ok()
                                .filter(|text| {
                                    kez_core::handle::parse_domain(text).as_deref() == Ok(*text)
                                })
                                .ok_or(FetchAnswerError::BadOrigin(at))?,
                        ),
                    };
                    (origin, rest)
                }
            };
            if after_frame.len() < length as usize {
                return Err(FetchAnswerError::Truncated(at));
            }
            if let Some(previous) = messages.last().map(|message| message.seq)
                && seq <= previous
            {
                return Err(FetchAnswerError::OutOfOrder { previous, seq });
            }
            if messages.len() == MAX_FETCH_MESSAGES as usize {
                return Err(FetchAnswerError::TooMany);
            }
            let (envelope, next) = after_frame.split_at(length as usize);
            messages.push(Fetched {
                seq,
                time,
                envelope,
                origin,
            });
            rest = next;
        }
        Ok(FetchAnswer { pending, messages })
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

    #[test]
    fn fetch_requests_are_bounded() {
        let ok = |after, max, time| {
            FetchRequest {
                after,
                max,
                time,
                origins: false,
            }
            .check()
        };
        assert_eq!(ok(0, 1, 0), Ok(()));
        assert_eq!(
            ok(MAX_FETCH_AFTER, MAX_FETCH_MESSAGES, MAX_FETCH_AFTER),
            Ok(())
        );
        assert!(ok(0, 0, 0).unwrap_err().contains("ask for 1 to 256"));
        assert!(ok(0, MAX_FETCH_MESSAGES + 1, 0).is_err());
        assert!(ok(MAX_FETCH_AFTER + 1, 1, 7).unwrap_err().contains("above"));
        assert!(ok(3, 1, MAX_FETCH_AFTER + 1).unwrap_err().contains("above"));
        assert!(ok(1, 1, 0).unwrap_err().contains("time"));
    }

    #[test]
    fn fetch_answers_round_trip_and_bad_frames_are_refused() {
        let messages = [
            Fetched {
                seq: 3,
                time: 1_000,
                envelope: b"one",
                origin: None,
            },
            Fetched {
                seq: 9,
                time: 2_000,
                envelope: b"two!",
                origin: None,
            },
        ];
        let body = FetchAnswer::encode(5, &messages, false);
        assert_eq!(body.len(), 8 + 20 + 3 + 20 + 4);
        assert_eq!(&body[..8], &5u64.to_be_bytes());
        assert_eq!(&body[8..16], &3u64.to_be_bytes());
        assert_eq!(&body[16..24], &1_000u64.to_be_bytes());
        assert_eq!(&body[24..28], &3u32.to_be_bytes());
        let answer = FetchAnswer::decode(&body, false).unwrap();
        assert_eq!((answer.pending, &answer.messages[..]), (5, &messages[..]));
        let empty = FetchAnswer::encode(0, &[], false);
        assert_eq!(FetchAnswer::decode(&empty, false).unwrap().messages, []);

        assert_eq!(
            FetchAnswer::decode(&body[..7], false),
            Err(FetchAnswerError::Truncated(0))
        );
        for cut in [9, 27, 30] {
            assert_eq!(
                FetchAnswer::decode(&body[..cut], false),
                Err(FetchAnswerError::Truncated(8)),
                "{cut}"
            );
        }
        assert_eq!(
            FetchAnswer::decode(&body[..body.len() - 1], false),
            Err(FetchAnswerError::Truncated(31))
        );
        let backwards = FetchAnswer::encode(0, &[messages[1], messages[0]], false);
        assert_eq!(
            FetchAnswer::decode(&backwards, false),
            Err(FetchAnswerError::OutOfOrder {
                previous: 9,
                seq: 3
            })
        );
        let repeated = FetchAnswer::encode(0, &[messages[0], messages[0]], false);
        assert!(FetchAnswer::decode(&repeated, false).is_err());
        let mut empty_envelope = FetchAnswer::encode(0, &[], false);
        empty_envelope.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        empty_envelope.extend_from_slice(&[0; 12]);
        assert_eq!(
            FetchAnswer::decode(&empty_envelope, false),
            Err(FetchAnswerError::BadLength(0))
        );
        let mut huge = FetchAnswer::encode(0, &[], false);
        huge.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        huge.extend_from_slice(&[0; 8]);
        huge.extend_from_slice(&(MAX_ENVELOPE_BYTES as u32 + 1).to_be_bytes());
        assert!(matches!(
            FetchAnswer::decode(&huge, false),
            Err(FetchAnswerError::BadLength(_))
        ));
        let many: Vec<Fetched> = (1..=u64::from(MAX_FETCH_MESSAGES) + 1)
            .map(|seq| Fetched {
                seq,
                time: seq,
                envelope: b"x",
                origin: None,
            })
            .collect();
        assert!(FetchAnswer::decode(&FetchAnswer::encode(0, &many[1..], false), false).is_ok());
        assert_eq!(
            FetchAnswer::decode(&FetchAnswer::encode(0, &many, false), false),
            Err(FetchAnswerError::TooMany)
        );
    }

    #[test]
    fn fetch_answers_with_origins_name_each_peer_domain() {
        let messages = [
            Fetched {
                seq: 3,
                time: 1,
                envelope: b"local",
                origin: None,
            },
            Fetched {
                seq: 4,
                time: 2,
                envelope: b"from a peer",
                origin: Some("a.localhost"),
            },
        ];
        let body = FetchAnswer::encode(0, &messages, true);
        assert_eq!(body.len(), 8 + 20 + 1 + 5 + 20 + 1 + 11 + 11);
        assert_eq!(FetchAnswer::decode(&body, true).unwrap().messages, messages);
        assert!(
            FetchAnswer::decode(&body, false).is_err(),
            "the flag is the request's"
        );
        for (bad, err) in [("A.localhost", 8), ("a b", 8)] {
            let mut frame = FetchAnswer::encode(0, &messages[..1], true);
            frame.truncate(8 + 20);
            frame.push(u8::try_from(bad.len()).unwrap());
            frame.extend_from_slice(bad.as_bytes());
            frame.extend_from_slice(b"local");
            assert_eq!(
                FetchAnswer::decode(&frame, true),
                Err(FetchAnswerError::BadOrigin(err)),
                "{bad}"
            );
        }
        let cut = FetchAnswer::encode(0, &messages[1..], true);
        assert_eq!(
            FetchAnswer::decode(&cut[..8 + 20 + 5], true),
            Err(FetchAnswerError::Truncated(8))
        );
    }
}
