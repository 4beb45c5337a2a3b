//! Federation between home servers (PROTOCOL.md §14): how a server is found and authenticated,
//! how mail for another domain leaves (`kez.mail.relay`, the outbox) and arrives
//! (`kez.mail.deliver`), what a sender hears when it cannot be delivered (a bounce), and how
//! long the outbox waits between attempts.
//!
//! Servers are NATS clients of each other's brokers. A server has its own KEZ key (the server
//! key); its WebFinger answers `acct:kez@<domain>` with that key and the NATS URL peers connect
//! to. A peer connects with the server key, naming its domain in the connection's `name`
//! ([`peer_connection_name`]); the callout checks the key against that domain's WebFinger
//! (dialback) or the key pinned for it, and grants the peer profile
//! ([`crate::subjects::peer_publish`]).

use std::time::Duration;

use kez_core::envelope::MessageId;
use kez_core::handle::parse_domain;
use kez_core::key::PublicKey;
use serde::{Deserialize, Serialize};

use crate::error::ErrorAnswer;
use crate::mail::SendRequest;
use crate::webfinger::{Jrd, Link};

/// The account name a server answers WebFinger for, as `acct:kez@<domain>`: `kez` is a reserved
/// handle name (PROTOCOL.md §2), so no user can ever hold it.
pub const SERVER_ACCOUNT: &str = "kez";
/// Link relation of the NATS URL peer servers connect to.
pub const REL_FEDERATION: &str = "https://kez.lat/ns/rel/federation";
/// Property: the server's key (`ed25519:<hex>`).
pub const PROP_SERVER_KEY: &str = "https://kez.lat/ns/server-key";
/// Property: the domain the server serves.
pub const PROP_DOMAIN: &str = "https://kez.lat/ns/domain";
/// What a peer's connection `name` starts with; the domain follows.
pub const PEER_NAME_PREFIX: &str = "kez-peer ";
/// The content type of a bounce (sealed by the sender's home server to the sending device).
pub const BOUNCE_CONTENT_TYPE: &str = "kez.bounce";
/// The header `kez.mail.deliver` stores with a message from a peer: the peer's domain, which
/// a fetch with `origins` hands to the recipient (PROTOCOL.md §6.3).
pub const ORIGIN_HEADER: &str = "Kez-Origin";
/// The first wait before an outbox attempt is repeated; each next wait doubles.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The WebFinger resource of the server of `domain`: `acct:kez@<domain>`.
pub fn server_resource(domain: &str) -> String {
    format!("acct:{SERVER_ACCOUNT}@{domain}")
}

/// The connection `name` a server of `domain` uses on a peer's broker.
pub fn peer_connection_name(domain: &str) -> String {
    format!("{PEER_NAME_PREFIX}{domain}")
}

/// The domain a connection `name` claims, if it is a peer server's name with a valid domain.
pub fn claimed_domain(name: &str) -> Option<String> {
    parse_domain(name.strip_prefix(PEER_NAME_PREFIX)?).ok()
}

/// A domain in requests and configuration: a handle's domain rules (PROTOCOL.md §2), or a
/// 400 `malformed` naming `what`.
pub fn check_domain(what: &str, raw: &str) -> Result<String, ErrorAnswer> {
    parse_domain(raw).map_err(|err| ErrorAnswer::malformed(format!("{what}: {err}")))
}

/// What a server's WebFinger says of it: the key it connects with and where peers reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDiscovery {
    /// The domain asked about.
    pub domain: String,
    /// The server key.
    pub key: PublicKey,
    /// The NATS URL of its broker for peers.
    pub nats_url: String,
}

impl ServerDiscovery {
    /// The JRD the server of `domain` answers for [`server_resource`].
    pub fn jrd(&self) -> Jrd {
        Jrd {
            subject: server_resource(&self.domain),
            aliases: vec![self.key.to_string()],
            properties: [
                (PROP_SERVER_KEY.to_owned(), Some(self.key.to_string())),
                (PROP_DOMAIN.to_owned(), Some(self.domain.clone())),
            ]
            .into(),
            links: vec![Link {
                rel: REL_FEDERATION.to_owned(),
                href: self.nats_url.clone(),
                properties: Default::default(),
            }],
        }
    }

    /// Reads the JRD a server answered for `domain`'s [`server_resource`]: it must be about
    /// exactly that resource and domain and carry one valid key and one federation link.
    pub fn from_jrd(domain: &str, body: &[u8]) -> Result<ServerDiscovery, String> {
        let jrd: Jrd = serde_json::from_slice(body)
            .map_err(|err| format!("the WebFinger answer is not a JRD: {err}"))?;
        let expected = server_resource(domain);
        if jrd.subject != expected {
            return Err(format!(
                "asked for {expected}, the WebFinger answer is about {:?}",
                jrd.subject
            ));
        }
        if jrd
            .properties
            .get(PROP_DOMAIN)
            .cloned()
            .flatten()
            .as_deref()
            != Some(domain)
        {
            return Err(format!(
                "the WebFinger answer does not name the domain {domain}"
            ));
        }
        let key = jrd
            .properties
            .get(PROP_SERVER_KEY)
            .cloned()
            .flatten()
            .ok_or("the WebFinger answer has no server key")?;
        let key: PublicKey = key
            .parse()
            .map_err(|err| format!("the WebFinger answer's server key: {err}"))?;
        let mut federation = jrd.links.iter().filter(|link| link.rel == REL_FEDERATION);
        let (Some(link), None) = (federation.next(), federation.next()) else {
            return Err("the WebFinger answer needs exactly one federation link".into());
        };
        if link.href.is_empty() || link.href.len() > 2048 {
            return Err("the WebFinger answer's federation URL is empty or too long".into());
        }
        Ok(ServerDiscovery {
            domain: domain.to_owned(),
            key,
            nats_url: link.href.clone(),
        })
    }
}

/// Largest `kez.mail.relay` body: a length byte, the longest domain and a send request.
pub const MAX_RELAY_BYTES: usize = 1 + 253 + crate::mail::MAX_SEND_BYTES;

/// The body of `kez.mail.relay`: an envelope for a device whose identity lives on another
/// domain, handed to the own home server's outbox.
///
/// ```text
/// relay request = domain length (u8) || domain (ASCII) || send request (PROTOCOL.md §6.3)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRequest<'a> {
    /// The recipient's home domain (normalised).
    pub domain: String,
    /// The recipient, the message id and the envelope, as `kez.mail.send` takes them.
    pub send: SendRequest<'a>,
}

impl<'a> RelayRequest<'a> {
    /// The body for `send`'s frame (`SendRequest::encode`) to `domain`.
    pub fn encode(domain: &str, send_frame: &[u8]) -> Vec<u8> {
        let length = u8::try_from(domain.len()).expect("a domain is at most 253 bytes");
        let mut body = Vec::with_capacity(1 + domain.len() + send_frame.len());
        body.push(length);
        body.extend_from_slice(domain.as_bytes());
        body.extend_from_slice(send_frame);
        body
    }

    /// Reads a body: the domain (handle rules, PROTOCOL.md §2), then the send frame.
    pub fn decode(body: &'a [u8]) -> Result<RelayRequest<'a>, ErrorAnswer> {
        let Some((&length, rest)) = body.split_first() else {
            return Err(ErrorAnswer::malformed(
                "a relay request is a domain length byte, the domain and a send request",
            ));
        };
        let length = usize::from(length);
        if length == 0 || rest.len() < length {
            return Err(ErrorAnswer::malformed(
                "a relay request's domain is empty or cut short",
            ));
        }
        let (domain, frame) = rest.split_at(length);
        let domain = std::str::from_utf8(domain)
            .map_err(|_| ErrorAnswer::malformed("a relay request's domain is not ASCII"))?;
        let domain = check_domain("the relay request's domain", domain)?;
        Ok(RelayRequest {
            domain,
            send: SendRequest::decode(frame)?,
        })
    }
}

/// The body of a bounce: what could not be delivered, to whom, and why. The sender's home
/// server seals it as an envelope of [`BOUNCE_CONTENT_TYPE`] with its server key to the device
/// that sent the message (PROTOCOL.md §14.4); a client believes it only from its own home
/// server's key (`kez.server.info`'s `federation.key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bounce {
    /// The message that was not delivered (32 hex digits, the envelope's id).
    pub id: String,
    /// The recipient device it was for.
    pub to: PublicKey,
    /// The recipient's home domain.
    pub domain: String,
    /// The stable error name (`unknown_recipient`, `expired`, `domain_blocked`, …).
    pub reason: String,
    /// What went wrong, for people (the peer's words are not in it: a client shows it as
    /// peer-controlled text anyway).
    pub message: String,
    /// When the home server took the message, unix seconds.
    pub queued_at: u64,
}

impl Bounce {
    /// The message id as bytes, if `id` is 32 hex digits.
    pub fn message_id(&self) -> Option<MessageId> {
        let bytes = hex_16(&self.id)?;
        Some(MessageId::from_bytes(bytes))
    }
}

fn hex_16(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let digit = |b: u8| char::from(b).to_digit(16);
        let (high, low) = (digit(chunk[0])?, digit(chunk[1])?);
        if chunk.iter().any(u8::is_ascii_uppercase) {
            return None;
        }
        out[i] = u8::try_from(high << 4 | low).ok()?;
    }
    Some(out)
}

/// What the outbox does after an attempt failed with `err` (a peer's answer, or the home
/// server's own when the peer could not be reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Try again later: the peer is down, busy, or limiting.
    Retry,
    /// Give up and bounce: the peer said no for good.
    Bounce,
}

/// Whether an error from delivering to a peer is worth another attempt: 429, 503, 502 and an
/// inbox that is full may pass; a recipient that does not exist, a refusal or a malformed
/// request will not.
pub fn after_failure(err: &ErrorAnswer) -> Attempt {
    match (err.code, err.name.as_ref()) {
        (_, "inbox_full" | "store_full" | "unavailable" | "rate_limited" | "peer_unavailable") => {
            Attempt::Retry
        }
        (429 | 502 | 503 | 0, _) => Attempt::Retry,
        _ => Attempt::Bounce,
    }
}

/// How long the outbox waits before attempt `attempt` + 1 (attempt 1 is the first): the
/// first wait is [`FIRST_RETRY`], each next one doubles, never more than `longest` (and a
/// peer's `Kez-Retry-After-Ms`, when longer, is waited instead).
pub fn retry_delay(attempt: u64, longest: Duration, retry_after_ms: Option<u64>) -> Duration {
    let doubled = FIRST_RETRY.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let wait = doubled.min(longest);
    match retry_after_ms {
        Some(ms) => wait
            .max(Duration::from_millis(ms))
            .min(longest.max(FIRST_RETRY)),
        None => wait,
    }
}

/// 404 `not_federated`: this server does not talk to other servers.
pub fn not_federated(domain: &str, served: &str) -> ErrorAnswer {
    ErrorAnswer::new(
        404,
        "not_federated",
        format!(
            "{domain} is another server, and this one ({served}) does not federate; ask its operator to enable federation"
        ),
    )
}

/// 403 `domain_blocked`: the operator does not let this server talk to `domain`.
pub fn domain_blocked(domain: &str) -> ErrorAnswer {
    ErrorAnswer::new(
        403,
        "domain_blocked",
        format!("this server does not exchange mail with {domain} (blocked by its operator)"),
    )
}

/// 503 `peer_unavailable`: `domain`'s server could not be reached or found.
pub fn peer_unavailable(domain: &str, why: impl std::fmt::Display) -> ErrorAnswer {
    ErrorAnswer::new(
        503,
        "peer_unavailable",
        format!("{domain}'s server cannot be reached now ({why}); try again later"),
    )
    .with_retry_after_ms(5_000)
}

/// 403 `peer_key_changed`: `domain`'s WebFinger names another server key than the one pinned.
pub fn peer_key_changed(domain: &str, pinned: &PublicKey, offered: &PublicKey) -> ErrorAnswer {
    ErrorAnswer::new(
        403,
        "peer_key_changed",
        format!(
            "{domain}'s server key changed from {pinned} to {offered}; refused until this server's operator accepts it (kez-chat-server admin peer forget {domain})"
        ),
    )
}

#[cfg(test)]
mod tests {
    use kez_core::SecretKey;

    use super::*;
    use crate::mail::SendRequest;

    #[test]
    fn peer_names_carry_a_valid_domain() {
        assert_eq!(peer_connection_name("a.localhost"), "kez-peer a.localhost");
        assert_eq!(
            claimed_domain("kez-peer A.Localhost").as_deref(),
            Some("a.localhost")
        );
        for bad in [
            "",
            "kez-peer ",
            "kez-peer a b",
            "peer a.localhost",
            "kez-peer -a",
        ] {
            assert_eq!(claimed_domain(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_server_jrd_round_trips_and_is_checked_against_the_domain_asked() {
        let key = SecretKey::from_seed(&[9; 32]).public_key();
        let found = ServerDiscovery {
            domain: "b.localhost".into(),
            key,
            nats_url: "nats://127.0.0.1:4333".into(),
        };
        let body = serde_json::to_vec(&found.jrd()).unwrap();
        assert_eq!(ServerDiscovery::from_jrd("b.localhost", &body), Ok(found));
        let err = ServerDiscovery::from_jrd("a.localhost", &body).unwrap_err();
        assert!(err.contains("asked for acct:kez@a.localhost"), "{err}");
        assert!(ServerDiscovery::from_jrd("b.localhost", b"{}").is_err());
        assert!(ServerDiscovery::from_jrd("b.localhost", b"[1]").is_err());
    }

    #[test]
    fn relay_requests_round_trip_and_bad_ones_are_malformed() {
        let to = SecretKey::from_seed(&[3; 32]).public_key();
        let id = MessageId::from_bytes([7; 16]);
        let frame = SendRequest::encode(&to, &id, b"sealed");
        let body = RelayRequest::encode("b.localhost", &frame);
        let request = RelayRequest::decode(&body).unwrap();
        assert_eq!(request.domain, "b.localhost");
        assert_eq!(
            (request.send.to, request.send.envelope),
            (to, &b"sealed"[..])
        );
        for bad in [
            Vec::new(),
            vec![0],
            vec![5, b'a'],
            RelayRequest::encode("b_x", &frame),
            RelayRequest::encode("b.localhost", &frame[..40]),
        ] {
            assert_eq!(RelayRequest::decode(&bad).unwrap_err().code, 400, "{bad:?}");
        }
    }

    #[test]
    fn the_outbox_retries_what_may_pass_and_bounces_the_rest() {
        let retry = [
            "inbox_full",
            "rate_limited",
            "unavailable",
            "peer_unavailable",
        ];
        for name in retry {
            assert_eq!(
                after_failure(&ErrorAnswer::new(409, name, "")),
                Attempt::Retry
            );
        }
        for name in [
            "unknown_recipient",
            "recipient_revoked",
            "forbidden",
            "domain_blocked",
        ] {
            assert_eq!(
                after_failure(&ErrorAnswer::new(404, name, "")),
                Attempt::Bounce
            );
        }
        let longest = Duration::from_secs(300);
        assert_eq!(retry_delay(1, longest, None), Duration::from_secs(1));
        assert_eq!(retry_delay(4, longest, None), Duration::from_secs(8));
        assert_eq!(retry_delay(60, longest, None), longest);
        assert_eq!(
            retry_delay(1, longest, Some(5_000)),
            Duration::from_secs(5),
            "a peer's retry-after is waited"
        );
        assert_eq!(retry_delay(1, longest, Some(u64::MAX)), longest);
    }

    #[test]
    fn a_bounce_names_its_message() {
        let bounce = Bounce {
            id: "07".repeat(16),
            to: SecretKey::from_seed(&[3; 32]).public_key(),
            domain: "b.localhost".into(),
            reason: "unknown_recipient".into(),
            message: "no such user".into(),
            queued_at: 7,
        };
        assert_eq!(bounce.message_id(), Some(MessageId::from_bytes([7; 16])));
        let json = serde_json::to_string(&bounce).unwrap();
        assert_eq!(serde_json::from_str::<Bounce>(&json).unwrap(), bounce);
        for bad in ["07", &"0G".repeat(16), &"AB".repeat(16)] {
            let other = Bounce {
                id: bad.to_string(),
                ..bounce.clone()
            };
            assert_eq!(other.message_id(), None, "{bad}");
        }
    }
}
