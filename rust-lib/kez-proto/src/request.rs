//! The requests of the home server's endpoints (PROTOCOL.md §5, §6.3, §10) and the decoder the
//! server runs on every body before it touches any state.

use kez_core::sigchain::MAX_LINK_BYTES;
use kez_core::{Handle, PublicKey, SignedLink};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::endpoint::Endpoint;
use crate::error::ErrorAnswer;
use crate::federation::{MAX_RELAY_BYTES, RelayRequest, check_domain};
use crate::keys::{ClaimRequest, CountRequest, PublishRequest};
use crate::mail::{FetchRequest, MAX_SEND_BYTES, SendRequest};
use crate::pair::{
    GetRequest as PairGetRequest, MAX_PAIR_REQUEST_BYTES, PutRequest as PairPutRequest,
};
use crate::pin::{PinOp, PinRequest};
use crate::registry::RegistrationRequest;

/// Largest request body the JSON endpoints accept, in bytes.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Most link bytes one `kez.sigchain.get` answer carries; `more` says when to ask again.
pub const MAX_CHAIN_PAGE_BYTES: usize = 256 * 1024;

/// The body of `kez.registry.lookup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupRequest {
    /// `alice`, `@alice` or `@alice@<the server's domain>`.
    pub handle: String,
}

/// The body of `kez.registry.whois` and `kez.sigchain.head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// The key asked about.
    pub key: PublicKey,
    /// The home domain of the key, when it is another server's: the home server asks that
    /// server (PROTOCOL.md §14.3). Absent (or the served domain): this server's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// The body of `kez.sigchain.get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetChainRequest {
    /// The chain's key.
    pub key: PublicKey,
    /// The first link wanted, counting from 1 (absent: 1).
    #[serde(default = "first_seq")]
    pub from_seq: u64,
    /// The chain's home domain, when it is another server's (as in [`KeyRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

fn first_seq() -> u64 {
    1
}

/// A request decoded and checked without touching any state: what the server acts on.
///
/// [`decode`] makes one from a request body; it is pure (no I/O, no clock but `now`), so it
/// can be fuzzed on its own (`rust-lib/kez-fuzz`).
#[derive(Debug, Clone)]
pub enum Request<'a> {
    /// `kez.registry.register`: a registration whose signature, time and domain verified.
    Register {
        /// The request as sent.
        request: RegistrationRequest,
        /// The handle it registers (on the served domain).
        handle: Handle,
    },
    /// `kez.registry.lookup`: a handle, on the served domain or (asked of its own server
    /// through federation) another.
    Lookup(Handle),
    /// `kez.registry.whois`: a key, and its home domain when that is another server's.
    Whois(PublicKey, Option<String>),
    /// `kez.sigchain.append`: a link that parsed (its chain rules are the store's to check).
    Append(SignedLink),
    /// `kez.sigchain.get`: a key and the first seq wanted (at least 1).
    GetChain {
        /// The chain's key.
        key: PublicKey,
        /// The first link wanted, counting from 1.
        from_seq: u64,
        /// The chain's home domain when that is another server's.
        domain: Option<String>,
    },
    /// `kez.sigchain.head`: a key, and its home domain when that is another server's.
    Head(PublicKey, Option<String>),
    /// `kez.server.info` (the body is ignored).
    Info,
    /// `$SYS.REQ.USER.AUTH`: the body is nats-server's JWT, which the callout decodes.
    Authorize,
    /// `kez.pin.*`: a request whose shape, domain, time and signature verified for the
    /// subject's operation (whether its key may pin is the server's to check).
    Pin(PinRequest),
    /// `kez.mail.send`: a recipient, a message id and an envelope of an acceptable size.
    MailSend(SendRequest<'a>),
    /// `kez.mail.fetch`: a sequence and a count within their bounds.
    MailFetch(FetchRequest),
    /// `kez.mail.relay`: a domain (another server's, checked by the server) and a send
    /// request for it.
    MailRelay(RelayRequest<'a>),
    /// `kez.mail.deliver`: a send request from a peer server.
    MailDeliver(SendRequest<'a>),
    /// `kez.pair.put`, checked at the time given to [`decode`].
    PairPut(PairPutRequest),
    /// `kez.pair.get`.
    PairGet(PairGetRequest),
    /// `kez.keys.publish`: bounded, every prekey of its member's kind, none twice (the
    /// signatures are the server's to verify with the caller's key).
    KeysPublish(PublishRequest),
    /// `kez.keys.count` (`{}`).
    KeysCount,
    /// `kez.keys.claim`: a device, and its home domain when that is another server's.
    KeysClaim(PublicKey, Option<String>),
}

/// The largest body `endpoint` accepts: [`MAX_REQUEST_BYTES`], or
/// [`kez_nats_jwt::MAX_JWT_LEN`] for nats-server's own authorization requests, or a frame and
/// the largest envelope for `kez.mail.send`.
pub fn request_limit(endpoint: Endpoint) -> usize {
    match endpoint {
        Endpoint::Authorize => kez_nats_jwt::MAX_JWT_LEN,
        Endpoint::MailSend | Endpoint::MailDeliver => MAX_SEND_BYTES,
        Endpoint::MailRelay => MAX_RELAY_BYTES,
        Endpoint::PairPut => MAX_PAIR_REQUEST_BYTES,
        _ => MAX_REQUEST_BYTES,
    }
}

/// Decodes and checks a request body for `endpoint` on a server for `domain` at `now` (unix
/// seconds): the size limits, the JSON, and every check that needs no state. Errors are the
/// answers the server gives for them (400, 401, 404 for a handle of another domain, 413, and
/// the registration, pin and link failures of PROTOCOL.md §5.1).
pub fn decode<'a>(
    endpoint: Endpoint,
    body: &'a [u8],
    domain: &str,
    now: u64,
) -> Result<Request<'a>, ErrorAnswer> {
    let limit = request_limit(endpoint);
    // A send request's frame checks its size itself, naming the envelope's.
    let frames_size = matches!(
        endpoint,
        Endpoint::MailSend | Endpoint::MailDeliver | Endpoint::MailRelay
    );
    if !frames_size && body.len() > limit {
        return Err(ErrorAnswer::too_large("request", body.len(), limit));
    }
    match endpoint {
        Endpoint::Register => {
            let request: RegistrationRequest = parse(body)?;
            let handle = request.verify(domain, now)?;
            Ok(Request::Register { request, handle })
        }
        Endpoint::Lookup => {
            let request: LookupRequest = parse(body)?;
            let handle = Handle::parse(&request.handle, domain)
                .map_err(|err| ErrorAnswer::new(400, err.code(), err.to_string()))?;
            Ok(Request::Lookup(handle))
        }
        Endpoint::Whois => {
            let request: KeyRequest = parse(body)?;
            Ok(Request::Whois(request.key, remote(request.domain, domain)?))
        }
        Endpoint::Append => {
            if body.len() > MAX_LINK_BYTES {
                return Err(ErrorAnswer::too_large("link", body.len(), MAX_LINK_BYTES));
            }
            Ok(Request::Append(SignedLink::parse(body)?))
        }
        Endpoint::GetChain => {
            let request: GetChainRequest = parse(body)?;
            if request.from_seq == 0 {
                return Err(ErrorAnswer::malformed("from_seq counts from 1"));
            }
            Ok(Request::GetChain {
                key: request.key,
                from_seq: request.from_seq,
                domain: remote(request.domain, domain)?,
            })
        }
        Endpoint::Head => {
            let request: KeyRequest = parse(body)?;
            Ok(Request::Head(request.key, remote(request.domain, domain)?))
        }
        Endpoint::Info => Ok(Request::Info),
        Endpoint::Authorize => Ok(Request::Authorize),
        Endpoint::PinAdd => pin(PinOp::Add, body, domain, now),
        Endpoint::PinRemove => pin(PinOp::Remove, body, domain, now),
        Endpoint::PinList => pin(PinOp::List, body, domain, now),
        Endpoint::PinStatus => pin(PinOp::Status, body, domain, now),
        Endpoint::MailSend => Ok(Request::MailSend(SendRequest::decode(body)?)),
        Endpoint::MailFetch => {
            let request: FetchRequest = parse(body)?;
            request.check().map_err(ErrorAnswer::malformed)?;
            Ok(Request::MailFetch(request))
        }
        Endpoint::PairPut => {
            let request: PairPutRequest = parse(body)?;
            request.check(now)?;
            Ok(Request::PairPut(request))
        }
        Endpoint::PairGet => {
            let request: PairGetRequest = parse(body)?;
            request.check()?;
            Ok(Request::PairGet(request))
        }
        Endpoint::MailRelay => {
            if body.len() > MAX_RELAY_BYTES {
                return Err(ErrorAnswer::too_large("relay request", body.len(), limit));
            }
            Ok(Request::MailRelay(RelayRequest::decode(body)?))
        }
        Endpoint::MailDeliver => Ok(Request::MailDeliver(SendRequest::decode(body)?)),
        Endpoint::KeysPublish => {
            let request: PublishRequest = parse(body)?;
            request.check()?;
            Ok(Request::KeysPublish(request))
        }
        Endpoint::KeysCount => {
            let CountRequest {} = parse(body)?;
            Ok(Request::KeysCount)
        }
        Endpoint::KeysClaim => {
            let request: ClaimRequest = parse(body)?;
            Ok(Request::KeysClaim(
                request.device,
                remote(request.domain, domain)?,
            ))
        }
    }
}

/// The `domain` member of a request, checked: `None` for this server's own (absent, or the
/// served domain), else another server's domain, normalised.
fn remote(asked: Option<String>, served: &str) -> Result<Option<String>, ErrorAnswer> {
    let Some(asked) = asked else {
        return Ok(None);
    };
    let asked = check_domain("domain", &asked)?;
    Ok((asked != served).then_some(asked))
}

fn pin<'a>(op: PinOp, body: &[u8], domain: &str, now: u64) -> Result<Request<'a>, ErrorAnswer> {
    let request: PinRequest = parse(body)?;
    request.verify(op, domain, now)?;
    Ok(Request::Pin(request))
}

/// Reads a JSON request body: one JSON object, as PROTOCOL.md describes for the endpoint.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ErrorAnswer> {
    if body.is_empty() {
        return Err(ErrorAnswer::malformed(
            "empty request body; send a JSON object as PROTOCOL.md describes",
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|err| ErrorAnswer::malformed(format!("bad request JSON: {err}")))?;
    // serde would also take a struct from a JSON array; the protocol has objects only.
    if !value.is_object() {
        return Err(ErrorAnswer::malformed("the request must be a JSON object"));
    }
    // From the bytes, not the value: a value keeps the last of a repeated member, the
    // struct's own reader refuses the repeat.
    serde_json::from_slice(body)
        .map_err(|err| ErrorAnswer::malformed(format!("bad request: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetch(body: &str) -> Result<FetchRequest, ErrorAnswer> {
        match decode(Endpoint::MailFetch, body.as_bytes(), "kez.lat", 0)? {
            Request::MailFetch(request) => Ok(request),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fetch_decodes_within_its_bounds_and_nothing_else_does() {
        assert_eq!(
            fetch(r#"{"after":7,"max":10,"time":1764900000123456}"#).unwrap(),
            FetchRequest {
                after: 7,
                max: 10,
                time: 1_764_900_000_123_456,
                origins: false,
            }
        );
        assert!(
            fetch(r#"{"after":0,"max":1,"time":0,"origins":true}"#)
                .unwrap()
                .origins
        );
        for bad in [
            r#"{"after":7,"max":10}"#,
            r#"{"after":7,"max":10,"time":0}"#,
            r#"{"after":-1,"max":10,"time":1}"#,
            r#"{"after":0,"max":0,"time":0}"#,
            r#"{"after":0,"max":10,"time":0,"key":"x"}"#,
            r#"[0,10,0]"#,
        ] {
            let err = fetch(bad).unwrap_err();
            assert_eq!((err.code, err.name.as_ref()), (400, "malformed"), "{bad}");
        }
    }

    #[test]
    fn key_service_bodies_decode_strictly() {
        let device = kez_core::SecretKey::from_seed(&[9; 32]).public_key();
        let claim = |body: String| match decode(Endpoint::KeysClaim, body.as_bytes(), "kez.lat", 0)
        {
            Ok(Request::KeysClaim(key, domain)) => Ok(Request::KeysClaim(key, domain)),
            Ok(other) => panic!("{other:?}"),
            Err(err) => Err(err),
        };
        assert!(matches!(
            claim(format!(r#"{{"device":"{device}"}}"#)),
            Ok(Request::KeysClaim(key, None)) if key == device
        ));
        assert!(matches!(
            claim(format!(r#"{{"device":"{device}","domain":"kez.lat"}}"#)),
            Ok(Request::KeysClaim(_, None))
        ));
        assert!(matches!(
            claim(format!(r#"{{"device":"{device}","domain":"b.example"}}"#)),
            Ok(Request::KeysClaim(_, Some(domain))) if domain == "b.example"
        ));
        for bad in [
            "{}".to_owned(),
            format!(r#"{{"device":"{device}","x":1}}"#),
            format!(r#"{{"device":"{device}","domain":"not a domain"}}"#),
        ] {
            assert_eq!(claim(bad.clone()).unwrap_err().name, "malformed", "{bad}");
        }
        assert!(matches!(
            decode(Endpoint::KeysCount, b"{}", "kez.lat", 0),
            Ok(Request::KeysCount)
        ));
        for bad in [&b""[..], b"[]", b"{\"a\":1}"] {
            let err = decode(Endpoint::KeysCount, bad, "kez.lat", 0).unwrap_err();
            assert_eq!(err.name, "malformed");
        }
        let huge = vec![b' '; MAX_REQUEST_BYTES + 1];
        let err = decode(Endpoint::KeysPublish, &huge, "kez.lat", 0).unwrap_err();
        assert_eq!((err.code, err.name.as_ref()), (413, "too_large"));
    }

    /// A JSON value keeps the last of a repeated member; a request with one is refused, so a
    /// reader that keeps the first cannot be told something else than the server acted on.
    #[test]
    fn a_member_given_twice_is_malformed() {
        let err = fetch(r#"{"after":0,"max":1,"time":0,"max":256}"#).unwrap_err();
        assert_eq!(err.name, "malformed");
        assert!(err.message.contains("duplicate field"), "{}", err.message);
        let err = decode(
            Endpoint::Lookup,
            br#"{"handle":"alice","handle":"bob"}"#,
            "kez.lat",
            0,
        )
        .unwrap_err();
        assert_eq!(err.name, "malformed");
    }
}
