//! kez-chat-server's request decoders ([`handlers::decode`]), one target per endpoint.

use kez_chat_server::handlers::{self, Request, Route, request_limit};

/// The domain the decoding server serves: the vectors' (`kez.lat`).
pub const DOMAIN: &str = "kez.lat";
/// The decoding server's clock: the time of the registration vector.
pub const NOW: u64 = 1_767_225_600;

/// Decodes `data` for `route` and checks what holds for every endpoint: a body over the limit is
/// 413, and a refusal is a client error (4xx) with a name, never a server error.
fn decode(route: Route, data: &[u8]) -> Option<Request> {
    match handlers::decode(route, data, DOMAIN, NOW) {
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
    let Some(request) = decode(Route::Register, data) else {
        return false;
    };
    let Request::Register { request, handle } = request else {
        panic!("register decoded as {request:?}");
    };
    assert_eq!(handle.domain(), DOMAIN);
    assert_eq!(request.verify(DOMAIN, NOW).as_ref(), Ok(&handle));
    true
}

/// `kez.registry.lookup`. Asserts: an accepted handle is on [`DOMAIN`], and its full form
/// decodes to the same handle.
pub fn server_lookup(data: &[u8]) -> bool {
    let Some(request) = decode(Route::Lookup, data) else {
        return false;
    };
    let Request::Lookup(handle) = request else {
        panic!("lookup decoded as {request:?}");
    };
    assert_eq!(handle.domain(), DOMAIN);
    let again =
        serde_json::to_vec(&serde_json::json!({ "handle": handle.to_string() })).expect("encodes");
    assert!(matches!(decode(Route::Lookup, &again), Some(Request::Lookup(h)) if h == handle));
    true
}

/// `kez.registry.whois`. Asserts: the key decodes again from its text form.
pub fn server_whois(data: &[u8]) -> bool {
    key_request(Route::Whois, data)
}

/// `kez.sigchain.head`. Asserts: the key decodes again from its text form.
pub fn server_head(data: &[u8]) -> bool {
    key_request(Route::Head, data)
}

fn key_request(route: Route, data: &[u8]) -> bool {
    let key = match decode(route, data) {
        None => return false,
        Some(Request::Whois(key) | Request::Head(key)) => key,
        Some(other) => panic!("{route:?} decoded as {other:?}"),
    };
    let again = serde_json::to_vec(&serde_json::json!({ "key": key })).expect("encodes");
    assert!(matches!(
        decode(route, &again),
        Some(Request::Whois(k) | Request::Head(k)) if k == key
    ));
    true
}

/// `kez.sigchain.append`. Asserts: an accepted link is the body's exact bytes, within
/// [`kez_core::sigchain::MAX_LINK_BYTES`].
pub fn server_append(data: &[u8]) -> bool {
    let Some(request) = decode(Route::Append, data) else {
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
    let Some(request) = decode(Route::GetChain, data) else {
        return false;
    };
    let Request::GetChain { key, from_seq } = request else {
        panic!("get decoded as {request:?}");
    };
    assert!(from_seq >= 1);
    let again = serde_json::to_vec(&serde_json::json!({ "key": key, "from_seq": from_seq }))
        .expect("encodes");
    assert!(matches!(
        decode(Route::GetChain, &again),
        Some(Request::GetChain { key: k, from_seq: s }) if k == key && s == from_seq
    ));
    true
}

/// `kez.server.info`: any body within the limit is accepted (and ignored).
pub fn server_info(data: &[u8]) -> bool {
    let accepted = matches!(decode(Route::Info, data), Some(Request::Info));
    assert_eq!(accepted, data.len() <= request_limit(Route::Info));
    accepted
}

/// `kez.mail.send`. Asserts: an accepted body is a valid recipient key, a message id and an
/// envelope of 1 to 65536 bytes, and encodes back to the same bytes.
pub fn server_mail_send(data: &[u8]) -> bool {
    let Some(request) = decode(Route::MailSend, data) else {
        return false;
    };
    assert!(
        matches!(request, Request::MailSend),
        "decoded as {request:?}"
    );
    let send = kez_core::mail::SendRequest::decode(data).expect("decode accepted it");
    assert!(!send.envelope.is_empty());
    assert!(send.envelope.len() <= kez_core::envelope::MAX_ENVELOPE_BYTES);
    assert_eq!(
        kez_core::mail::SendRequest::encode(&send.to, &send.id, send.envelope),
        data
    );
    true
}
