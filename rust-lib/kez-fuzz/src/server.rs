//! The home server's request decoder ([`kez_proto::decode`]), one target per endpoint.

use kez_proto::Endpoint;
use kez_proto::request::{Request, request_limit};

/// The domain the decoding server serves: the vectors' (`kez.lat`).
pub const DOMAIN: &str = "kez.lat";
/// The decoding server's clock: the time of the registration vector.
pub const NOW: u64 = 1_767_225_600;

/// Decodes `data` for `route` and checks what holds for every endpoint: a body over the limit is
/// 413, and a refusal is a client error (4xx) with a name, never a server error.
fn decode(route: Endpoint, data: &[u8]) -> Option<Request<'_>> {
    match kez_proto::decode(route, data, DOMAIN, NOW) {
        Ok(request) => {
            assert!(data.len() <= request_limit(route));
            Some(request)
        }
        Err(err) => {
            assert!((400..500).contains(&err.code), "{route:?}: {err:?}");
            assert!(!err.name.is_empty());
            if data.len() > request_limit(route) {
                assert_eq!(err.code, 413);
            }
            None
        }
    }
}

/// `kez.registry.register`. Asserts: an accepted registration is for a handle on [`DOMAIN`],
/// and verifies again to the same handle.
pub fn server_register(data: &[u8]) -> bool {
    let Some(request) = decode(Endpoint::Register, data) else {
        return false;
    };
    let Request::Register { request, handle } = request else {
        panic!("register decoded as {request:?}");
    };
    assert_eq!(handle.domain(), DOMAIN);
    assert_eq!(request.verify(DOMAIN, NOW).as_ref(), Ok(&handle));
    true
}

/// `kez.registry.lookup`. Asserts: an accepted handle's full form decodes to the same handle
/// (another domain's too: the server asks that domain's server).
pub fn server_lookup(data: &[u8]) -> bool {
    let Some(request) = decode(Endpoint::Lookup, data) else {
        return false;
    };
    let Request::Lookup(handle) = request else {
        panic!("lookup decoded as {request:?}");
    };
    let again =
        serde_json::to_vec(&serde_json::json!({ "handle": handle.to_string() })).expect("encodes");
    assert!(matches!(decode(Endpoint::Lookup, &again), Some(Request::Lookup(h)) if h == handle));
    true
}

/// `kez.registry.whois`. Asserts: the key decodes again from its text form.
pub fn server_whois(data: &[u8]) -> bool {
    key_request(Endpoint::Whois, data)
}

/// `kez.sigchain.head`. Asserts: the key decodes again from its text form.
pub fn server_head(data: &[u8]) -> bool {
    key_request(Endpoint::Head, data)
}

fn key_request(route: Endpoint, data: &[u8]) -> bool {
    let (key, domain) = match decode(route, data) {
        None => return false,
        Some(Request::Whois(key, domain) | Request::Head(key, domain)) => (key, domain),
        Some(other) => panic!("{route:?} decoded as {other:?}"),
    };
    assert_ne!(
        domain.as_deref(),
        Some(DOMAIN),
        "the served domain is no remote"
    );
    let again = serde_json::to_vec(&kez_proto::request::KeyRequest {
        key,
        domain: domain.clone(),
    })
    .expect("encodes");
    assert!(matches!(
        decode(route, &again),
        Some(Request::Whois(k, d) | Request::Head(k, d)) if k == key && d == domain
    ));
    true
}

/// `kez.sigchain.append`. Asserts: an accepted link is the body's exact bytes, within
/// [`kez_core::sigchain::MAX_LINK_BYTES`].
pub fn server_append(data: &[u8]) -> bool {
    let Some(request) = decode(Endpoint::Append, data) else {
        return false;
    };
    let Request::Append(link) = request else {
        panic!("append decoded as {request:?}");
    };
    assert_eq!(link.bytes(), data);
    assert!(data.len() <= kez_core::sigchain::MAX_LINK_BYTES);
    true
}

/// `kez.sigchain.get`. Asserts: `from_seq` is at least 1, and key and `from_seq` decode again.
pub fn server_get(data: &[u8]) -> bool {
    let Some(request) = decode(Endpoint::GetChain, data) else {
        return false;
    };
    let Request::GetChain {
        key,
        from_seq,
        domain,
    } = request
    else {
        panic!("get decoded as {request:?}");
    };
    assert!(from_seq >= 1);
    let again = serde_json::to_vec(&kez_proto::request::GetChainRequest {
        key,
        from_seq,
        domain: domain.clone(),
    })
    .expect("encodes");
    assert!(matches!(
        decode(Endpoint::GetChain, &again),
        Some(Request::GetChain { key: k, from_seq: s, domain: d }) if k == key && s == from_seq && d == domain
    ));
    true
}

/// `kez.server.info`: any body within the limit is accepted (and ignored).
pub fn server_info(data: &[u8]) -> bool {
    let accepted = matches!(decode(Endpoint::Info, data), Some(Request::Info));
    assert_eq!(accepted, data.len() <= request_limit(Endpoint::Info));
    accepted
}

/// `kez.mail.send`. Asserts: an accepted body is a valid recipient key, a message id and an
/// envelope of 1 to 65536 bytes, and encodes back to the same bytes.
pub fn server_mail_send(data: &[u8]) -> bool {
    let Some(request) = decode(Endpoint::MailSend, data) else {
        return false;
    };
    let Request::MailSend(send) = request else {
        panic!("mail send decoded as {request:?}");
    };
    assert!(!send.envelope.is_empty());
    assert!(send.envelope.len() <= kez_core::envelope::MAX_ENVELOPE_BYTES);
    assert_eq!(
        kez_proto::mail::SendRequest::encode(&send.to, &send.id, send.envelope),
        data
    );
    true
}

/// `kez.mail.relay`. Asserts: an accepted request names a normalised domain and re-encodes
/// to its exact bytes.
pub fn server_mail_relay(data: &[u8]) -> bool {
    let Some(request) = decode(Endpoint::MailRelay, data) else {
        return false;
    };
    let Request::MailRelay(relay) = request else {
        panic!("mail relay decoded as {request:?}");
    };
    assert_eq!(
        kez_core::handle::parse_domain(&relay.domain).as_deref(),
        Ok(relay.domain.as_str())
    );
    let frame =
        kez_proto::mail::SendRequest::encode(&relay.send.to, &relay.send.id, relay.send.envelope);
    assert_eq!(
        kez_proto::federation::RelayRequest::encode(&relay.domain, &frame),
        data
    );
    true
}

/// `kez.mail.deliver` (a peer server's request). Asserts: it is a send request's frame.
pub fn server_mail_deliver(data: &[u8]) -> bool {
    let Some(request) = decode(Endpoint::MailDeliver, data) else {
        return false;
    };
    let Request::MailDeliver(send) = request else {
        panic!("mail deliver decoded as {request:?}");
    };
    assert_eq!(
        kez_proto::mail::SendRequest::encode(&send.to, &send.id, send.envelope),
        data
    );
    true
}

/// A peer server's WebFinger answer about itself, as the discovery reads it for
/// `b.localhost`. Asserts: what it accepts names that domain and a valid key, and its JRD reads
/// back the same.
pub fn server_discovery(data: &[u8]) -> bool {
    use kez_proto::federation::ServerDiscovery;
    let Ok(found) = ServerDiscovery::from_jrd("b.localhost", data) else {
        return false;
    };
    assert_eq!(found.domain, "b.localhost");
    let again = serde_json::to_vec(&found.jrd()).expect("encodes");
    assert_eq!(ServerDiscovery::from_jrd("b.localhost", &again), Ok(found));
    true
}

/// `kez.mail.fetch`. Asserts: an accepted request is within its bounds, and its JSON decodes
/// again to the same request.
pub fn server_mail_fetch(data: &[u8]) -> bool {
    let Some(request) = decode(Endpoint::MailFetch, data) else {
        return false;
    };
    let Request::MailFetch(fetch) = request else {
        panic!("mail fetch decoded as {request:?}");
    };
    assert_eq!(fetch.check(), Ok(()));
    let again: kez_proto::mail::FetchRequest =
        serde_json::from_slice(&serde_json::to_vec(&fetch).expect("encodes")).expect("decodes");
    assert_eq!(again, fetch);
    true
}

/// A `kez.mail.fetch` answer, as a client reads what a (possibly hostile) server sent.
/// Asserts: an accepted answer's messages ascend, are within the size and count bounds, and
/// encode back to the same bytes.
pub fn mail_fetch_answer(data: &[u8]) -> bool {
    fetch_answer(data, false)
}

/// A `kez.mail.fetch` answer with origins (a federating client's fetch). Asserts as
/// [`mail_fetch_answer`], and every origin is a normalised domain.
pub fn mail_fetch_origins(data: &[u8]) -> bool {
    fetch_answer(data, true)
}

fn fetch_answer(data: &[u8], origins: bool) -> bool {
    use kez_proto::mail::{FetchAnswer, MAX_FETCH_MESSAGES};
    let Ok(answer) = FetchAnswer::decode(data, origins) else {
        return false;
    };
    assert!(answer.messages.len() <= MAX_FETCH_MESSAGES as usize);
    assert!(
        answer
            .messages
            .windows(2)
            .all(|pair| pair[0].seq < pair[1].seq)
    );
    assert!(answer.messages.iter().all(|message| {
        !message.envelope.is_empty()
            && message.envelope.len() <= kez_core::envelope::MAX_ENVELOPE_BYTES
    }));
    assert!(answer.messages.iter().all(|message| {
        message
            .origin
            .is_none_or(|origin| kez_core::handle::parse_domain(origin).as_deref() == Ok(origin))
            && (origins || message.origin.is_none())
    }));
    assert_eq!(
        FetchAnswer::encode(answer.pending, &answer.messages, origins),
        data
    );
    true
}

/// `kez.pin.*`: the first byte picks the operation (`add`, `remove`, `list`, `status`), the
/// rest is the body. Asserts: an accepted request is for that operation, verifies again, has
/// the members its operation needs, and its JSON decodes again to the same request.
pub fn server_pin(data: &[u8]) -> bool {
    let (mode, body) = crate::mode(data);
    let op = kez_proto::pin::PinOp::ALL[usize::from(mode % 4)];
    let Some(request) = decode(op.endpoint(), body) else {
        return false;
    };
    let Request::Pin(request) = request else {
        panic!("{op:?} decoded as {request:?}");
    };
    assert_eq!(request.op, op);
    assert_eq!(request.verify(op, DOMAIN, NOW), Ok(()));
    assert_eq!(request.blob.is_some(), op != kez_proto::pin::PinOp::List);
    let again = serde_json::to_vec(&request).expect("encodes");
    assert!(matches!(
        decode(op.endpoint(), &again),
        Some(Request::Pin(same)) if same == request
    ));
    true
}

/// `kez.pair.put` and `kez.pair.get` (PROTOCOL.md §5.6): an even first byte picks `put`, an odd
/// one `get`; the rest is the body. Asserts: an accepted request's nonce is 32 hex digits, and
/// its JSON decodes again to the same request.
pub fn server_pair(data: &[u8]) -> bool {
    let (mode, body) = crate::mode(data);
    let endpoint = if mode % 2 == 0 {
        Endpoint::PairPut
    } else {
        Endpoint::PairGet
    };
    let Some(request) = decode(endpoint, body) else {
        return false;
    };
    match (&request, decode(endpoint, &encode_pair(&request))) {
        (Request::PairPut(put), Some(Request::PairPut(again))) => {
            assert!(kez_core::pair::Nonce::from_hex(&put.nonce).is_some());
            assert_eq!(*put, again);
        }
        (Request::PairGet(get), Some(Request::PairGet(again))) => {
            assert!(kez_core::pair::Nonce::from_hex(&get.nonce).is_some());
            assert_eq!(*get, again);
        }
        (request, again) => panic!("{endpoint:?}: {request:?} decoded again as {again:?}"),
    }
    true
}

/// A pairing request's JSON.
fn encode_pair(request: &Request<'_>) -> Vec<u8> {
    match request {
        Request::PairPut(put) => serde_json::to_vec(put),
        Request::PairGet(get) => serde_json::to_vec(get),
        other => panic!("not a pairing request: {other:?}"),
    }
    .expect("encodes")
}

/// `kez.keys.publish` (PROTOCOL.md §15.2). Asserts: an accepted request holds at most
/// [`kez_proto::keys::MAX_PUBLISH_ONE_TIME`] one-time keys, each member of its kind, no prekey
/// twice, and its JSON decodes again to the same request. (The signatures are the server's to
/// verify with the caller's key.)
pub fn server_keys_publish(data: &[u8]) -> bool {
    use kez_core::prekey::PrekeyKind;
    let Some(request) = decode(Endpoint::KeysPublish, data) else {
        return false;
    };
    let Request::KeysPublish(request) = request else {
        panic!("publish decoded as {request:?}");
    };
    assert!(request.one_time.len() <= kez_proto::keys::MAX_PUBLISH_ONE_TIME);
    assert!(
        request
            .one_time
            .iter()
            .all(|prekey| prekey.kind == PrekeyKind::OneTime)
    );
    assert!(
        request
            .fallback
            .is_none_or(|prekey| prekey.kind == PrekeyKind::Fallback)
    );
    let keys: std::collections::HashSet<_> = request.prekeys().map(|prekey| prekey.key).collect();
    assert_eq!(keys.len(), request.prekeys().count(), "no prekey twice");
    let again = serde_json::to_vec(&request).expect("encodes");
    assert!(matches!(
        decode(Endpoint::KeysPublish, &again),
        Some(Request::KeysPublish(same)) if same == request
    ));
    true
}

/// `kez.keys.count`. Asserts: only an empty object is accepted.
pub fn server_keys_count(data: &[u8]) -> bool {
    let Some(request) = decode(Endpoint::KeysCount, data) else {
        return false;
    };
    assert!(matches!(request, Request::KeysCount), "{request:?}");
    let value: serde_json::Value = serde_json::from_slice(data).expect("accepted JSON");
    assert_eq!(value, serde_json::json!({}));
    true
}

/// `kez.keys.claim`. Asserts: an accepted domain is another than [`DOMAIN`], and the request
/// with it decodes again to the same device and domain.
pub fn server_keys_claim(data: &[u8]) -> bool {
    let Some(request) = decode(Endpoint::KeysClaim, data) else {
        return false;
    };
    let Request::KeysClaim(device, domain) = request else {
        panic!("claim decoded as {request:?}");
    };
    assert_ne!(domain.as_deref(), Some(DOMAIN));
    let again = serde_json::to_vec(&kez_proto::keys::ClaimRequest {
        device,
        domain: domain.clone(),
    })
    .expect("encodes");
    assert!(matches!(
        decode(Endpoint::KeysClaim, &again),
        Some(Request::KeysClaim(same, same_domain)) if same == device && same_domain == domain
    ));
    true
}

/// The WebFinger query (`/.well-known/webfinger?<query>`, PROTOCOL.md §7.1). Asserts: an
/// accepted query names a handle on [`DOMAIN`], which its plain `acct:` form names again.
pub fn webfinger_query(data: &[u8]) -> bool {
    let Ok(query) = std::str::from_utf8(data) else {
        return false;
    };
    use kez_proto::webfinger::{Asked, account};
    let Ok((asked, _rels)) = account(Some(query), DOMAIN) else {
        return false;
    };
    let plain = match &asked {
        Asked::User(handle) => {
            assert_eq!(handle.domain(), DOMAIN);
            format!("resource=acct:{}@{}", handle.name(), handle.domain())
        }
        Asked::Server => format!("resource=acct:kez@{DOMAIN}"),
    };
    let (again, rels) = account(Some(&plain), DOMAIN).expect("accepted");
    assert_eq!((again, rels.len()), (asked, 0));
    true
}
