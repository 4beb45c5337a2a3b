//! Hostile input at every kez-chat-server endpoint, against a real nats-server: empty bodies,
//! binary garbage, malformed JSON, JSON of the wrong shape, unknown fields and 1 MiB bodies must
//! each get an error answer with the right code, stable name and a message; the server must stay
//! healthy afterwards. Then the registration and append refusals a client can provoke on purpose.

use kez_core::{SecretKey, Sigchain, Signature, SignatureDomain, UnsignedLink};
use kez_proto::registry::RegistrationRequest;
use kez_tests::NatsServer;
use kez_tests::kez_server::{KezServer, ServiceError, TEST_DOMAIN, call, call_ok};
use kez_tests::requests::{nats_endpoint, now, registration};
use serde_json::{Value, json};

/// The seven subjects.
const REGISTER: &str = "kez.registry.register";
const LOOKUP: &str = "kez.registry.lookup";
const WHOIS: &str = "kez.registry.whois";
const APPEND: &str = "kez.sigchain.append";
const GET: &str = "kez.sigchain.get";
const HEAD: &str = "kez.sigchain.head";
const INFO: &str = "kez.server.info";

/// 1 MiB: far over every endpoint's limit, under the fixture broker's `max_payload: 2MB`.
const MIB: usize = 1024 * 1024;

/// A registration request with any fields, correctly signed by `signer`.
fn signed_request(
    signer: &SecretKey,
    key: &SecretKey,
    handle: &str,
    domain: &str,
    time: u64,
) -> RegistrationRequest {
    let mut request = RegistrationRequest {
        handle: handle.to_owned(),
        domain: domain.to_owned(),
        key: key.public_key(),
        time,
        sig: Signature::from_bytes([0; 64]),
    };
    request.sig = signer.sign(SignatureDomain::Register, &request.signed_body());
    request
}

/// Deterministic bytes that are not UTF-8 (they start with 0xFF, never valid in UTF-8).
fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    bytes[0] = 0xFF;
    assert!(std::str::from_utf8(&bytes).is_err());
    bytes
}

/// A JSON object of about `len` bytes: `{"handle":"aaaa…"}`.
fn big_json(len: usize) -> Vec<u8> {
    let mut body = br#"{"handle":""#.to_vec();
    body.resize(len - 2, b'a');
    body.extend_from_slice(br#""}"#);
    body
}

fn json_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

/// `value` (an object) with `field` set to `replacement`.
fn with(value: &Value, field: &str, replacement: Value) -> Vec<u8> {
    let mut value = value.clone();
    value[field] = replacement;
    json_bytes(&value)
}

/// `value` (an object) with `field` set to the JSON text `raw` (for numbers `Value` cannot hold).
fn with_raw(value: &Value, field: &str, raw: &str) -> Vec<u8> {
    let marker = "\u{1}raw\u{1}";
    let text = String::from_utf8(with(value, field, json!(marker))).unwrap();
    let quoted = serde_json::to_string(marker).unwrap();
    assert!(text.contains(&quoted));
    text.replace(&quoted, raw).into_bytes()
}

/// `value` (an object) without `field`.
fn without(value: &Value, field: &str) -> Vec<u8> {
    let mut value = value.clone();
    value.as_object_mut().unwrap().remove(field);
    json_bytes(&value)
}

/// One hostile request and the error it must get.
struct Case {
    what: String,
    body: Vec<u8>,
    code: u16,
    name: &'static str,
}

fn case(what: impl Into<String>, body: impl Into<Vec<u8>>, code: u16, name: &'static str) -> Case {
    Case {
        what: what.into(),
        body: body.into(),
        code,
        name,
    }
}

/// What every endpoint must refuse the same way: no body, garbage, broken JSON, JSON that is
/// not the object it wants, oversized bodies.
fn common_cases() -> Vec<Case> {
    let mut cases = vec![
        case("empty body", Vec::new(), 400, "malformed"),
        case(
            "16 bytes of binary garbage",
            garbage(16, 1),
            400,
            "malformed",
        ),
        case(
            "4 KiB of binary garbage",
            garbage(4096, 2),
            400,
            "malformed",
        ),
        case("one zero byte", vec![0], 400, "malformed"),
        case(
            "a UTF-8 BOM then {}",
            b"\xEF\xBB\xBF{}".to_vec(),
            400,
            "malformed",
        ),
        case("1 MiB JSON object", big_json(MIB), 413, "too_large"),
        case("1 MiB of garbage", garbage(MIB, 3), 413, "too_large"),
        case("1 MiB of zeros", vec![0; MIB], 413, "too_large"),
        case(
            "just over 16 KiB",
            big_json(16 * 1024 + 1),
            413,
            "too_large",
        ),
    ];
    for text in [
        "{",
        "}",
        r#"{"handle":"#,
        r#"{"handle":"alice""#,
        r#"{"handle":"alice",}"#,
        r#"{'handle':'alice'}"#,
        r#"{handle:"alice"}"#,
        r#"{"handle":"al\uZZZZice"}"#,
        r#"{"handle":"alice"} trailing"#,
        r#"{"key":"ed25519:00"}{"key":"ed25519:00"}"#,
        "nul",
        "tru",
        "\"unterminated",
        "[1,2",
        "   ",
        "\n",
    ] {
        cases.push(case(
            format!("malformed JSON {text:?}"),
            text,
            400,
            "malformed",
        ));
    }
    for text in [
        "[]",
        "[{}]",
        "\"x\"",
        "null",
        "5",
        "-1.5e300",
        "true",
        "{}",
        r#"{"handle": 5}"#,
        r#"{"key": 5}"#,
        r#"{"handle": null, "key": null}"#,
        r#"{"handle": ["alice"], "key": {"k": "v"}}"#,
    ] {
        cases.push(case(
            format!("wrong JSON shape {text}"),
            text,
            400,
            "malformed",
        ));
    }
    // Deep nesting must be refused without overflowing a stack (8000 bytes: under every limit).
    let deep = format!("{}{}", "[".repeat(4000), "]".repeat(4000));
    cases.push(case("4000-deep nested arrays", deep, 400, "malformed"));
    let deep = format!("{}{}", r#"{"v":"#.repeat(1200), "}".repeat(1200));
    cases.push(case("1200-deep nested objects", deep, 400, "malformed"));
    // Unknown member names are echoed in the error message, which travels in a NATS header:
    // line breaks in it must not break (or inject into) the header block.
    for name in [
        "x\r\nKez-Error: ok",
        "x\ny",
        "x\rNats-Service-Error-Code: 200",
        "x\u{0}y",
    ] {
        let body = format!("{{{}:1,\"v\":1}}", serde_json::to_string(name).unwrap());
        cases.push(case(
            format!("unknown member {name:?}"),
            body,
            400,
            "malformed",
        ));
    }
    cases
}

/// A nats-server that accepts 1 MiB bodies, a kez-chat-server, and a client.
async fn setup() -> (NatsServer, KezServer, async_nats::Client) {
    let nats = NatsServer::start_with("max_payload: 2MB");
    let server = KezServer::start(&nats.url()).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    (nats, server, client)
}

/// A registered user with a one-link chain.
struct User {
    key: SecretKey,
    name: String,
    chain: Sigchain,
}

async fn register_user(client: &async_nats::Client, name: &str) -> User {
    let key = SecretKey::generate();
    call(client, REGISTER, registration(&key, name))
        .await
        .unwrap_or_else(|err| panic!("registering {name}: {err:?}"));
    let first = UnsignedLink::first(key.public_key(), now(), nats_endpoint("inbox"))
        .sign(&key)
        .unwrap();
    call(client, APPEND, first.bytes().to_vec())
        .await
        .unwrap_or_else(|err| panic!("first link of {name}: {err:?}"));
    User {
        key,
        name: name.to_owned(),
        chain: Sigchain::start(first.bytes()).unwrap(),
    }
}

/// Sends every case to `subject`, checks each answer, then checks the server still serves.
async fn refuse_all(client: &async_nats::Client, subject: &str, cases: Vec<Case>) {
    assert!(!cases.is_empty());
    for case in &cases {
        let answer = call(client, subject, case.body.clone()).await;
        let err: ServiceError = match answer {
            Err(err) => err,
            Ok(body) => panic!(
                "{subject} answered OK to {}: {}",
                case.what,
                String::from_utf8_lossy(&body)
            ),
        };
        assert_eq!(
            (err.code, err.name.as_str()),
            (case.code, case.name),
            "{subject}, {}: wrong error: {err:?}",
            case.what
        );
        assert!(
            !err.message.trim().is_empty(),
            "{subject}, {}: empty error message: {err:?}",
            case.what
        );
    }
    // Requests without a reply subject are dropped, and must not upset the server either.
    for case in &cases {
        client
            .publish(subject.to_owned(), case.body.clone().into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
}

/// The server still answers: info, and a lookup of `user` with its current head.
async fn assert_healthy(client: &async_nats::Client, user: &User) {
    let info = call_ok(client, INFO, json!({})).await;
    assert_eq!(info["domain"], TEST_DOMAIN);
    let profile = call_ok(client, LOOKUP, json!({ "handle": user.name })).await;
    assert_eq!(profile["key"], user.key.public_key().to_string());
    assert_eq!(profile["sigchain"]["seq"], user.chain.seq());
    assert_eq!(profile["sigchain"]["head"], user.chain.head().to_string());
}

#[tokio::test]
async fn register_refuses_hostile_bodies() {
    let (_nats, _server, client) = setup().await;
    let alice = register_user(&client, "alice").await;

    let key = SecretKey::generate();
    let valid =
        serde_json::to_value(signed_request(&key, &key, "bob", TEST_DOMAIN, now())).unwrap();
    let mut cases = common_cases();
    for (field, bad) in [
        ("handle", json!(5)),
        ("handle", json!(null)),
        ("handle", json!(["bob"])),
        ("domain", json!(null)),
        ("domain", json!(7)),
        ("key", json!(5)),
        ("key", json!("bob")),
        ("key", json!(format!("ed25519:{}", "0".repeat(63)))),
        ("key", json!(key.public_key().to_nkey())),
        ("time", json!("now")),
        ("time", json!(-1)),
        ("time", json!(1.5)),
        ("sig", json!(5)),
        ("sig", json!("abc")),
        ("sig", json!("00".repeat(63))),
    ] {
        cases.push(case(
            format!("{field}: {bad}"),
            with(&valid, field, bad),
            400,
            "malformed",
        ));
    }
    for field in ["handle", "domain", "key", "time", "sig"] {
        cases.push(case(
            format!("missing {field}"),
            without(&valid, field),
            400,
            "malformed",
        ));
    }
    cases.push(case(
        "unknown extra field",
        with(&valid, "admin", json!(true)),
        400,
        "malformed",
    ));
    for raw in ["18446744073709551616", "1e400", "1.0"] {
        cases.push(case(
            format!("time: {raw}"),
            with_raw(&valid, "time", raw),
            400,
            "malformed",
        ));
    }
    refuse_all(&client, REGISTER, cases).await;

    // Nothing of the refused requests was stored, and a valid request still works.
    let whois = call(
        &client,
        WHOIS,
        json_bytes(&json!({ "key": key.public_key() })),
    )
    .await;
    assert_eq!(whois.unwrap_err().code, 404);
    assert_healthy(&client, &alice).await;
    let record = call_ok(&client, REGISTER, valid).await;
    assert_eq!(record["handle"], format!("@bob@{TEST_DOMAIN}"));
}

#[tokio::test]
async fn lookup_refuses_hostile_bodies() {
    let (_nats, _server, client) = setup().await;
    let alice = register_user(&client, "alice").await;

    let valid = json!({ "handle": "alice" });
    let mut cases = common_cases();
    for bad in [
        json!(5),
        json!(null),
        json!(["alice"]),
        json!({ "name": "alice" }),
    ] {
        cases.push(case(
            format!("handle: {bad}"),
            with(&valid, "handle", bad),
            400,
            "malformed",
        ));
    }
    cases.push(case(
        "name instead of handle",
        r#"{"name":"alice"}"#,
        400,
        "malformed",
    ));
    cases.push(case(
        "unknown extra field",
        with(&valid, "domain", json!(TEST_DOMAIN)),
        400,
        "malformed",
    ));
    // Strings that are not handles get the handle rules' own names.
    for (text, name) in [
        ("", "empty"),
        ("@", "empty_name"),
        ("al ice", "whitespace"),
        ("\u{0430}lice", "non_ascii"),
        ("@alice@@kez.test", "too_many_at"),
        ("a", "too_short"),
        ("1alice", "must_start_with_letter"),
        ("al!ce", "bad_character"),
    ] {
        cases.push(case(
            format!("handle {text:?}"),
            json_bytes(&json!({ "handle": text })),
            400,
            name,
        ));
    }
    let long = "a".repeat(10_000);
    cases.push(case(
        "a 10 000-character handle",
        json_bytes(&json!({ "handle": long })),
        400,
        "too_long",
    ));
    refuse_all(&client, LOOKUP, cases).await;

    assert_healthy(&client, &alice).await;
    call_ok(&client, LOOKUP, valid).await;
}

#[tokio::test]
async fn whois_refuses_hostile_bodies() {
    let (_nats, _server, client) = setup().await;
    let alice = register_user(&client, "alice").await;
    key_endpoint_refuses(&client, WHOIS, &alice).await;
    assert_healthy(&client, &alice).await;
    let profile = call_ok(&client, WHOIS, json!({ "key": alice.key.public_key() })).await;
    assert_eq!(profile["handle"], format!("@alice@{TEST_DOMAIN}"));
}

#[tokio::test]
async fn head_refuses_hostile_bodies() {
    let (_nats, _server, client) = setup().await;
    let alice = register_user(&client, "alice").await;
    key_endpoint_refuses(&client, HEAD, &alice).await;
    assert_healthy(&client, &alice).await;
    let head = call_ok(&client, HEAD, json!({ "key": alice.key.public_key() })).await;
    assert_eq!(head["seq"], 1);
}

#[tokio::test]
async fn get_refuses_hostile_bodies() {
    let (_nats, _server, client) = setup().await;
    let alice = register_user(&client, "alice").await;
    key_endpoint_refuses(&client, GET, &alice).await;

    let valid = json!({ "key": alice.key.public_key(), "from_seq": 1 });
    let mut cases = Vec::new();
    for bad in [
        json!(0),
        json!(-1),
        json!(1.5),
        json!("1"),
        json!(null),
        json!([1]),
    ] {
        cases.push(case(
            format!("from_seq: {bad}"),
            with(&valid, "from_seq", bad),
            400,
            "malformed",
        ));
    }
    refuse_all(&client, GET, cases).await;

    assert_healthy(&client, &alice).await;
    let page = call_ok(&client, GET, valid).await;
    assert_eq!(page["links"].as_array().unwrap().len(), 1);
    // Far past the end is not an error: an empty page.
    let past = call_ok(
        &client,
        GET,
        json!({ "key": alice.key.public_key(), "from_seq": u64::MAX }),
    )
    .await;
    assert_eq!(page["key"], past["key"]);
    assert_eq!(past["links"], json!([]));
    assert_eq!(past["more"], false);
}

/// The cases of the endpoints whose body is `{"key": ...}` (whois, head, get).
async fn key_endpoint_refuses(client: &async_nats::Client, subject: &str, user: &User) {
    let valid = json!({ "key": user.key.public_key() });
    let hex = user.key.public_key().to_hex();
    let mut cases = common_cases();
    for bad in [
        json!(5),
        json!(null),
        json!(true),
        json!([hex]),
        json!({ "key": hex }),
        json!(hex),
        json!(format!("ed25519:{}", &hex[1..])),
        json!(format!("ed25519:{hex}0")),
        json!(format!("ed25519:{}", hex.to_uppercase())),
        json!(format!("ED25519:{hex}")),
        json!(format!(" ed25519:{hex}")),
        json!(format!("ed25519:{}", "zz".repeat(32))),
        json!(user.key.public_key().to_nkey()),
        json!(format!("@{}", user.name)),
    ] {
        cases.push(case(
            format!("key: {bad}"),
            with(&valid, "key", bad),
            400,
            "malformed",
        ));
    }
    cases.push(case(
        "handle instead of key",
        r#"{"handle":"alice"}"#,
        400,
        "malformed",
    ));
    cases.push(case(
        "unknown extra field",
        with(&valid, "handle", json!(user.name)),
        400,
        "malformed",
    ));
    refuse_all(client, subject, cases).await;
}

#[tokio::test]
async fn append_refuses_hostile_bodies() {
    let (_nats, _server, client) = setup().await;
    let mut alice = register_user(&client, "alice").await;

    let next = alice
        .chain
        .next_link(now(), nats_endpoint("second"))
        .sign(&alice.key)
        .unwrap();
    let valid: Value = serde_json::from_slice(next.bytes()).unwrap();
    let mut cases = common_cases();
    // An oversized link is refused by size before anything is parsed.
    cases.push(case(
        "just over 8 KiB",
        big_json(8 * 1024 + 1),
        413,
        "too_large",
    ));
    for (field, bad) in [
        ("v", json!("1")),
        ("v", json!(null)),
        ("chain", json!(5)),
        ("chain", json!("alice")),
        ("seq", json!(-2)),
        ("seq", json!("2")),
        ("prev", json!(7)),
        ("time", json!(1.5)),
        ("signer", json!(null)),
        ("op", json!(5)),
        ("payload", json!("x")),
        ("sig", json!(5)),
        ("sig", json!("abc")),
    ] {
        cases.push(case(
            format!("{field}: {bad}"),
            with(&valid, field, bad),
            400,
            "malformed",
        ));
    }
    for field in [
        "v", "chain", "seq", "prev", "time", "signer", "op", "payload", "sig",
    ] {
        cases.push(case(
            format!("missing {field}"),
            without(&valid, field),
            400,
            "malformed",
        ));
    }
    cases.push(case(
        "unknown extra field",
        with(&valid, "extra", json!(1)),
        400,
        "malformed",
    ));
    // Version 2 is the devices' format (PROTOCOL.md §4.1); 3 is unknown.
    cases.push(case(
        "version 3",
        with(&valid, "v", json!(3)),
        400,
        "unknown_version",
    ));
    // The same link, pretty-printed: not its canonical bytes.
    cases.push(case(
        "non-canonical bytes",
        serde_json::to_vec_pretty(&valid).unwrap(),
        400,
        "malformed",
    ));
    // The same link with a trailing newline.
    let mut newline = next.bytes().to_vec();
    newline.push(b'\n');
    cases.push(case("trailing newline", newline, 400, "malformed"));
    refuse_all(&client, APPEND, cases).await;

    // The chain is untouched, and the valid link still lands.
    assert_healthy(&client, &alice).await;
    let head = match call(&client, APPEND, next.bytes().to_vec()).await {
        Ok(body) => serde_json::from_slice::<Value>(&body).unwrap(),
        Err(err) => panic!("valid append refused: {err:?}"),
    };
    assert_eq!(head["seq"], 2);
    alice.chain.append(next.bytes()).unwrap();
    assert_healthy(&client, &alice).await;
}

#[tokio::test]
async fn info_ignores_its_body_but_not_its_size() {
    let (_nats, _server, client) = setup().await;
    let alice = register_user(&client, "alice").await;

    for case in common_cases() {
        match call(&client, INFO, case.body.clone()).await {
            // The size limit holds at every endpoint, info included.
            Err(err) if case.code == 413 => {
                assert_eq!(
                    (err.code, err.name.as_str()),
                    (413, "too_large"),
                    "{}",
                    case.what
                );
                assert!(!err.message.is_empty());
            }
            Ok(body) if case.code != 413 => {
                let info: Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("{}: info is not JSON: {e}", case.what));
                assert_eq!(info["domain"], TEST_DOMAIN, "{}", case.what);
                assert!(info["version"].is_string(), "{}", case.what);
                assert!(
                    info["limits"]["max_request_bytes"].is_u64(),
                    "{}",
                    case.what
                );
            }
            other => panic!("{INFO}, {}: unexpected answer {other:?}", case.what),
        }
    }
    assert_healthy(&client, &alice).await;
}

#[tokio::test]
async fn registration_refusals_name_the_problem() {
    let (_nats, _server, client) = setup().await;
    let alice = register_user(&client, "alice").await;
    let now = now();
    let key = SecretKey::generate();
    let other = SecretKey::generate();

    let refusals = [
        // U+0430 CYRILLIC SMALL LETTER A, which looks like `a`.
        (
            "Cyrillic a",
            signed_request(&key, &key, "\u{0430}lice", TEST_DOMAIN, now),
            400,
            "non_ascii",
        ),
        (
            "Cyrillic o",
            signed_request(&key, &key, "b\u{043e}b", TEST_DOMAIN, now),
            400,
            "non_ascii",
        ),
        (
            "reserved name",
            signed_request(&key, &key, "admin", TEST_DOMAIN, now),
            400,
            "reserved",
        ),
        (
            "reserved name",
            signed_request(&key, &key, "postmaster", TEST_DOMAIN, now),
            400,
            "reserved",
        ),
        (
            "uppercase",
            signed_request(&key, &key, "Carol", TEST_DOMAIN, now),
            400,
            "not_normalised",
        ),
        (
            "with @",
            signed_request(&key, &key, "@carol", TEST_DOMAIN, now),
            400,
            "not_normalised",
        ),
        (
            "too short",
            signed_request(&key, &key, "c", TEST_DOMAIN, now),
            400,
            "too_short",
        ),
        (
            "empty",
            signed_request(&key, &key, "", TEST_DOMAIN, now),
            400,
            "empty",
        ),
        (
            "other domain",
            signed_request(&key, &key, "carol", "other.example", now),
            400,
            "wrong_domain",
        ),
        (
            "stale",
            signed_request(&key, &key, "carol", TEST_DOMAIN, now - 600),
            401,
            "outside_window",
        ),
        (
            "future",
            signed_request(&key, &key, "carol", TEST_DOMAIN, now + 600),
            401,
            "outside_window",
        ),
        (
            "time 0",
            signed_request(&key, &key, "carol", TEST_DOMAIN, 0),
            401,
            "outside_window",
        ),
        (
            "time u64::MAX",
            signed_request(&key, &key, "carol", TEST_DOMAIN, u64::MAX),
            401,
            "outside_window",
        ),
        (
            "signed by another key",
            signed_request(&other, &key, "carol", TEST_DOMAIN, now),
            401,
            "bad_signature",
        ),
    ];
    for (what, request, code, name) in refusals {
        let err = call(&client, REGISTER, serde_json::to_vec(&request).unwrap())
            .await
            .expect_err(what);
        assert_eq!(
            (err.code, err.name.as_str()),
            (code, name),
            "{what}: {err:?}"
        );
        assert!(!err.message.is_empty(), "{what}");
    }

    // A valid signature over other fields than those sent.
    let good = signed_request(&key, &key, "carol", TEST_DOMAIN, now);
    let mut tampered = [good.clone(), good.clone(), good.clone()];
    tampered[0].handle = "carla".into();
    tampered[1].time += 1;
    tampered[2].key = alice.key.public_key();
    for request in tampered {
        let err = call(&client, REGISTER, serde_json::to_vec(&request).unwrap())
            .await
            .unwrap_err();
        assert_eq!(
            (err.code, err.name.as_str()),
            (401, "bad_signature"),
            "{request:?}"
        );
    }

    // Alice's own key, signing for a second name: one handle per key.
    let second = signed_request(&alice.key, &alice.key, "alice2", TEST_DOMAIN, now);
    let err = call(&client, REGISTER, serde_json::to_vec(&second).unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code, err.name.as_str()),
        (409, "key_has_handle"),
        "{err:?}"
    );

    // None of it left anything behind.
    for (subject, body) in [
        (WHOIS, json!({ "key": key.public_key() })),
        (WHOIS, json!({ "key": other.public_key() })),
        (LOOKUP, json!({ "handle": "carol" })),
        (LOOKUP, json!({ "handle": "carla" })),
        (LOOKUP, json!({ "handle": "alice2" })),
    ] {
        let err = call(&client, subject, json_bytes(&body)).await.unwrap_err();
        assert_eq!(
            (err.code, err.name.as_str()),
            (404, "not_found"),
            "{subject} {body}"
        );
    }
    assert_healthy(&client, &alice).await;

    // The key can still register once it signs properly.
    call_ok(&client, REGISTER, serde_json::to_value(&good).unwrap()).await;
    let profile = call_ok(&client, WHOIS, json!({ "key": key.public_key() })).await;
    assert_eq!(profile["handle"], format!("@carol@{TEST_DOMAIN}"));
    assert_eq!(profile["sigchain"], Value::Null);
}

#[tokio::test]
async fn append_refusals_name_the_problem() {
    let (_nats, _server, client) = setup().await;
    let alice = register_user(&client, "alice").await;

    // A well-formed first link by a key that never registered.
    let stranger = SecretKey::generate();
    let first = UnsignedLink::first(stranger.public_key(), now(), nats_endpoint("inbox"))
        .sign(&stranger)
        .unwrap();
    let err = call(&client, APPEND, first.bytes().to_vec())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code, err.name.as_str()),
        (403, "not_registered"),
        "{err:?}"
    );
    assert!(err.message.contains("register"), "{err:?}");
    for subject in [HEAD, GET] {
        let err = call(
            &client,
            subject,
            json_bytes(&json!({ "key": stranger.public_key() })),
        )
        .await
        .unwrap_err();
        assert_eq!(
            (err.code, err.name.as_str()),
            (404, "not_found"),
            "{subject}"
        );
    }

    // Alice's next link with its signature bytes flipped: a signature that does not verify.
    let next = alice
        .chain
        .next_link(now(), nats_endpoint("second"))
        .sign(&alice.key)
        .unwrap();
    let mut value: Value = serde_json::from_slice(next.bytes()).unwrap();
    let sig = value["sig"].as_str().unwrap().to_owned();
    let flipped = format!(
        "{}{}",
        if sig.starts_with('0') { '1' } else { '0' },
        &sig[1..]
    );
    value["sig"] = json!(flipped);
    let tampered = kez_core::canonical::encode(&value).unwrap();
    let err = call(&client, APPEND, tampered).await.unwrap_err();
    assert_eq!(
        (err.code, err.name.as_str()),
        (401, "bad_signature"),
        "{err:?}"
    );

    // Alice's next link signed by the stranger: not the chain's current key.
    let mut by_stranger = alice.chain.next_link(now(), nats_endpoint("second"));
    by_stranger.signer = stranger.public_key();
    let by_stranger = by_stranger.sign(&stranger).unwrap();
    let err = call(&client, APPEND, by_stranger.bytes().to_vec())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code, err.name.as_str()),
        (403, "not_current_key"),
        "{err:?}"
    );

    assert_healthy(&client, &alice).await;
}
