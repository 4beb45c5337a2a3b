//! Hostile clients against a running server behind the auth callout (PROTOCOL.md §5.5): request
//! floods from one key (429 `rate_limited`, others unaffected, the broker-stamped caller cannot
//! be forged), registration floods from one address, connection floods with valid and invalid
//! credentials, garbage and huge messages in another user's inbox, and replayed registration
//! and append requests. Real nats-server, real kez-chat-server, loopback only.
//!
//! Each test prints one summary line: `hostile <test>: tried N, rejected M, panics 0`, where
//! panics are the server's 500 answers as its `/metrics` counts them (a handler panic is
//! answered 500); every test asserts there were none.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::future::join_all;
use kez_chat_server::config::ServerConfig;
use kez_chat_server::limits::{Limits, Rate};
use kez_chat_server::pin::PinConfig;
use kez_core::{SecretKey, UnsignedLink, envelope};
use kez_proto::subjects::{MAIL_STREAM, inbox_subject};
use kez_tests::callout::{CalloutStack, register};
use kez_tests::kez_server::{ServiceError, TEST_DOMAIN, call};
use kez_tests::person::{Person, key_of};
use kez_tests::requests::{mail, nats_endpoint, now, registration};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Operations tried and refused in one test, for its summary line.
#[derive(Default)]
struct Tally {
    tried: usize,
    rejected: usize,
}

impl Tally {
    fn count<T, E>(&mut self, result: &Result<T, E>) {
        self.tried += 1;
        if result.is_err() {
            self.rejected += 1;
        }
    }

    /// Prints the summary line and checks the server answered no request with 500.
    async fn finish(self, test: &str, stack: &CalloutStack) {
        let panics = server_errors(stack).await;
        println!(
            "hostile {test}: tried {}, rejected {}, panics {panics}",
            self.tried, self.rejected
        );
        assert_eq!(
            panics, 0,
            "the server answered 500 (a handler panicked or failed)"
        );
    }
}

/// A callout stack with `limits` and the HTTP shim on (for `/metrics`).
async fn stack_with(limits: Limits) -> CalloutStack {
    CalloutStack::start_configured(|config: &mut ServerConfig| {
        config.limits = limits;
        config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await
}

/// `GET /metrics` from the stack's HTTP shim.
async fn metrics(stack: &CalloutStack) -> String {
    let addr = stack.server.http_addr().expect("the HTTP shim is on");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: kez.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// The sum of `kez_request_errors_total{…,code="500"}`.
async fn server_errors(stack: &CalloutStack) -> u64 {
    metrics(stack)
        .await
        .lines()
        .filter(|line| {
            line.starts_with("kez_request_errors_total") && line.contains("code=\"500\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn lookup(name: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({ "handle": name })).unwrap()
}

/// Polls `attempt` until it succeeds, up to `within`.
async fn until_ok<T, F, Fut>(within: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ServiceError>>,
{
    let deadline = Instant::now() + within;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(err) if Instant::now() < deadline => {
                let wait = err
                    .headers
                    .get("Kez-Retry-After-Ms")
                    .and_then(|ms| ms.as_str().parse().ok())
                    .unwrap_or(50u64);
                tokio::time::sleep(Duration::from_millis(wait.min(500))).await;
            }
            Err(err) => panic!("still refused after {within:?}: {err:?}"),
        }
    }
}

/// One key floods the services: past its burst it gets 429 `rate_limited` with a retry time,
/// on every limited endpoint (`kez.mail.fetch` included), while another user's requests all
/// succeed at the same time. A `Nats-Request-Info` header the flooder sends naming the other
/// user changes nothing: the broker writes that header itself. After the retry time the
/// flooder is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_key_gets_429_and_other_users_are_unaffected() {
    let burst = 20;
    let per_sec = 2.0;
    // With pinning on, so that the kez.pin.* endpoints are there to be limited too.
    let pin_dir = tempfile::tempdir().unwrap();
    let stack = CalloutStack::start_configured(|config: &mut ServerConfig| {
        config.limits = Limits {
            per_key: Rate::new(per_sec, burst),
            ..Limits::OFF
        };
        config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.pin = Some(PinConfig {
            dial_private: true,
            ..PinConfig::new(pin_dir.path().to_path_buf())
        });
    })
    .await;
    let mut tally = Tally::default();
    let (mallory_key, mallory) = stack.registered("mallory").await;
    let (bob_key, bob) = stack.registered("bob").await;
    let server = stack.server_client().await;

    // The flood: 200 lookups at once, each claiming to come from bob.
    let mut forged = HeaderMap::new();
    forged.insert(
        "Nats-Request-Info",
        json!({"acc": "APP", "user": bob_key.public_key().to_nkey(), "host": "10.9.9.9"})
            .to_string()
            .as_str(),
    );
    let started = Instant::now();
    let flood = (0..200).map(|_| {
        let mallory = mallory.clone();
        let forged = forged.clone();
        async move {
            mallory
                .request_with_headers("kez.registry.lookup", forged, lookup("bob").into())
                .await
                .expect("every request is answered")
        }
    });
    // Meanwhile bob asks ten times.
    let bob_asks = async {
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(call(&bob, "kez.registry.lookup", lookup("mallory")).await);
        }
        answers
    };
    let (answers, bob_answers) = tokio::join!(join_all(flood), bob_asks);
    let elapsed = started.elapsed().as_secs_f64();
    let mut ok = 0;
    let mut limited = 0;
    for answer in &answers {
        let headers = answer.headers.as_ref();
        match headers.and_then(|h| h.get("Nats-Service-Error-Code")) {
            None => ok += 1,
            Some(code) => {
                let headers = headers.unwrap();
                assert_eq!(code.as_str(), "429");
                assert_eq!(headers.get("Kez-Error").unwrap().as_str(), "rate_limited");
                assert!(
                    headers
                        .get("Nats-Service-Error")
                        .unwrap()
                        .as_str()
                        .contains("too many requests"),
                );
                let retry: u64 = headers
                    .get("Kez-Retry-After-Ms")
                    .expect("a 429 says when to retry")
                    .as_str()
                    .parse()
                    .unwrap();
                assert!((1..=1000).contains(&retry), "retry after {retry} ms");
                limited += 1;
            }
        }
        tally.tried += 1;
    }
    tally.rejected += limited;
    let allowed = f64::from(burst) + elapsed * per_sec + 1.0;
    // mallory's registration took one request of her burst: the callout names both of her
    // connections, narrow and full, by her key, and the limit counts by that name.
    assert!(
        ok >= burst as usize - 1 && ok as f64 <= allowed,
        "{ok} of 200 answered in {elapsed:.2} s; the limit allows {allowed:.0}"
    );
    assert_eq!(ok + limited, 200);
    for answer in &bob_answers {
        tally.count(answer);
    }
    assert!(
        bob_answers.iter().all(Result::is_ok),
        "bob is unaffected by mallory's flood: {bob_answers:?}"
    );

    // Every limited endpoint refuses mallory now, whatever the body.
    let hex = mallory_key.public_key();
    let key_body = serde_json::to_vec(&json!({ "key": hex.to_string() })).unwrap();
    for (subject, body) in [
        ("kez.registry.whois", key_body.clone()),
        ("kez.sigchain.head", key_body.clone()),
        ("kez.sigchain.get", key_body.clone()),
        ("kez.sigchain.append", b"garbage".to_vec()),
        (
            "kez.registry.register",
            registration(&mallory_key, "mallory2"),
        ),
        // Limited before the body is read: an unsigned body is refused as 429 all the same.
        ("kez.pin.add", b"garbage".to_vec()),
        ("kez.pin.remove", b"garbage".to_vec()),
        ("kez.pin.list", b"garbage".to_vec()),
        ("kez.pin.status", b"garbage".to_vec()),
        ("kez.mail.fetch", b"garbage".to_vec()),
        (
            "kez.mail.fetch",
            serde_json::to_vec(&json!({"after": 0, "max": 256, "time": 0})).unwrap(),
        ),
    ] {
        let answer = call(&mallory, subject, body).await;
        tally.count(&answer);
        let err = answer.expect_err(subject);
        assert_eq!(
            (err.code, err.name.as_str()),
            (429, "rate_limited"),
            "{subject}"
        );
    }
    // Server info is not limited: it answers from memory.
    let info = call(&mallory, "kez.server.info", Bytes::new()).await;
    tally.count(&info);
    info.expect("info answers");
    // Nothing was registered by the refused request.
    let whois = call(&server, "kez.registry.whois", key_body).await.unwrap();
    let whois: Value = serde_json::from_slice(&whois).unwrap();
    assert_eq!(whois["handle"], format!("@mallory@{TEST_DOMAIN}"));

    // After the retry time mallory is served again.
    let answer = until_ok(Duration::from_secs(10), || {
        call(&mallory, "kez.registry.lookup", lookup("bob"))
    })
    .await;
    tally.tried += 1;
    let profile: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(profile["key"], bob_key.public_key().to_string());
    tally.finish("rate_limit", &stack).await;
}

/// One client address may register a limited number of keys; past the limit every further
/// registration is 429 `too_many_registrations` and stores nothing, while lookups from the same
/// address and users already registered carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_limited_per_client_address() {
    let stack = stack_with(Limits {
        register_per_addr: Rate::new(1.0 / 3600.0, 3),
        ..Limits::OFF
    })
    .await;
    let mut tally = Tally::default();
    for name in ["r1", "r2", "r3"] {
        let key = Arc::new(SecretKey::generate());
        let (client, _) = stack.connect_as(&key).await.unwrap();
        let answer = call(&client, "kez.registry.register", registration(&key, name)).await;
        tally.count(&answer);
        answer.unwrap_or_else(|err| panic!("{name}: {err:?}"));
    }
    let server = stack.server_client().await;
    for name in ["r4", "r5"] {
        let key = Arc::new(SecretKey::generate());
        let (client, _) = stack.connect_as(&key).await.unwrap();
        let answer = call(&client, "kez.registry.register", registration(&key, name)).await;
        tally.count(&answer);
        let err = answer.expect_err(name);
        assert_eq!(
            (err.code, err.name.as_str()),
            (429, "too_many_registrations")
        );
        assert!(
            err.message
                .contains("too many registrations from this address")
        );
        assert!(err.headers.get("Kez-Retry-After-Ms").is_some());
        // Nothing stored.
        let lookup_answer = call(&server, "kez.registry.lookup", lookup(name)).await;
        assert_eq!(lookup_answer.expect_err("not registered").name, "not_found");
        // The same connection may still look handles up.
        let found = call(&client, "kez.registry.lookup", lookup("r1")).await;
        tally.count(&found);
        found.expect("lookups are not registrations");
    }
    tally.finish("registration_per_address", &stack).await;
}

/// Connection floods: many connections at once with invalid credentials (a nonce signed by
/// another key, a user and password, no credentials) are all refused, quickly; unregistered
/// keys past the per-address limit are refused; registered keys keep connecting (none of
/// their connections waits out the broker's callout timeout, so the callout never hangs), and
/// a registered user is answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_floods_are_refused_and_others_keep_being_served() {
    let stack = stack_with(Limits {
        unregistered_connects_per_addr: Rate::new(1.0 / 3600.0, 10),
        ..Limits::OFF
    })
    .await;
    let mut tally = Tally::default();
    let url = stack.nats.url();
    // Two registered users first (two unregistered connects of the budget of 10).
    let (_alice_key, alice) = stack.registered("alice").await;
    let (bob_key, _bob) = stack.registered("bob").await;

    // 60 connections with invalid credentials, at once.
    let invalid = (0..60).map(|i| {
        let url = url.clone();
        async move {
            let options = match i % 3 {
                0 => {
                    // Names one key, signs with another.
                    let named = SecretKey::generate().public_key().to_nkey();
                    let signer = Arc::new(SecretKey::generate());
                    async_nats::ConnectOptions::with_auth_callback(move |nonce| {
                        let named = named.clone();
                        let signer = signer.clone();
                        async move {
                            let mut auth = async_nats::Auth::new();
                            auth.nkey = Some(named);
                            auth.signature = Some(
                                kez_core::connect::sign_nonce(&signer, &nonce)
                                    .unwrap()
                                    .to_bytes()
                                    .to_vec(),
                            );
                            Ok(auth)
                        }
                    })
                }
                1 => async_nats::ConnectOptions::with_user_and_password(
                    "admin".into(),
                    "admin".into(),
                ),
                _ => async_nats::ConnectOptions::new(),
            };
            let started = Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(20),
                options
                    .connection_timeout(Duration::from_secs(15))
                    .connect(url),
            )
            .await
            .expect("a refused connection is refused, not left hanging");
            (result.map(|_| ()), started.elapsed())
        }
    });
    // At the same time: 30 fresh unregistered keys (the address has 8 connects left).
    let unregistered = (0..30).map(|_| {
        let url = url.clone();
        async move {
            let key = Arc::new(SecretKey::generate());
            kez_tests::callout::connect_as(&url, &key)
                .await
                .map(|(client, _)| client)
        }
    });
    // And 30 connections of the registered bob, and alice asking the registry.
    let bobs = (0..30).map(|_| {
        let url = url.clone();
        let bob_key = bob_key.clone();
        async move {
            let started = Instant::now();
            let result = kez_tests::callout::connect_as(&url, &bob_key).await;
            (result.map(|(client, _)| client), started.elapsed())
        }
    });
    let alice_asks = async {
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(call(&alice, "kez.registry.lookup", lookup("bob")).await);
        }
        answers
    };
    let (invalid, unregistered, bobs, alice_answers) = tokio::join!(
        join_all(invalid),
        join_all(unregistered),
        join_all(bobs),
        alice_asks
    );

    for (result, took) in &invalid {
        tally.count(result);
        let err = result
            .as_ref()
            .expect_err("invalid credentials are refused");
        assert_eq!(
            err.kind(),
            async_nats::ConnectErrorKind::AuthorizationViolation,
            "{err}"
        );
        assert!(*took < Duration::from_secs(20));
    }
    let admitted = unregistered.iter().filter(|result| result.is_ok()).count();
    for result in &unregistered {
        tally.count(result);
        if let Err(err) = result {
            assert_eq!(
                err.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation,
                "{err}"
            );
        }
    }
    assert_eq!(
        admitted, 8,
        "10 unregistered connections per address, 2 used by the registrations"
    );
    // Each of bob's connections needed the callout's answer within nats-server's authorization timeout.
    for (result, took) in &bobs {
        tally.count(result);
        assert!(
            result.is_ok(),
            "registered bob connects (after {took:?}): {result:?}"
        );
    }
    for answer in &alice_answers {
        tally.count(answer);
    }
    assert!(alice_answers.iter().all(Result::is_ok), "{alice_answers:?}");

    // The callout's decisions add up, and the stack still authorizes.
    let text = metrics(&stack).await;
    let decision = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| {
                line.strip_prefix(&format!(
                    "kez_callout_decisions_total{{decision=\"{name}\"}} "
                ))
            })
            .and_then(|count| count.parse().ok())
            .unwrap_or(0)
    };
    // The callout itself decided every refusal (none was nats-server giving up waiting for it):
    // the 60 invalid credentials and the 22 unregistered keys over the limit.
    assert_eq!(decision("denied"), 60 + 22, "{text}");
    assert_eq!(decision("registered"), 2 + 30, "{text}");
    let (_carol_key, carol) = registered_after_flood(&stack).await;
    let answer = call(&carol, "kez.server.info", Bytes::new()).await;
    tally.count(&answer);
    answer.expect("a registered user connects and is served after the flood");
    tally.finish("connection_flood", &stack).await;
}

/// A registered user connects after the flood: registered through the server's own
/// connection (the address's unregistered budget is spent), then connecting with the chat
/// profile.
async fn registered_after_flood(stack: &CalloutStack) -> (Arc<SecretKey>, Client) {
    let key = Arc::new(SecretKey::generate());
    let server = stack.server_client().await;
    register(&server, &key, "carol").await.unwrap();
    let (client, _) = stack
        .connect_as(&key)
        .await
        .expect("registered carol connects");
    (key, client)
}

/// A registered user sends garbage, a tampered envelope, a message sealed to someone else and
/// a huge random message (just under the 64 KiB envelope limit) to bob between two good
/// messages from alice; an empty message and one a byte over the limit the server refuses.
/// (An empty message in an inbox once stalled the client of the per-user consumers: nats-server
/// ends a streamed answer across a service import at an empty message, which cut a pull batch
/// short; users still cannot store one.) `kez-chat inbox` shows the two good messages, logs each
/// dropped one with its reason code (and nothing secret), and passes its floor over all six: the
/// next run's fetch acknowledges every one, so the stream no longer holds any of bob's, nothing
/// is redelivered, and that run is quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inbox_messages_are_dropped_with_a_reason_and_good_ones_delivered() {
    let stack = stack_with(Limits::default()).await;
    let mut tally = Tally::default();
    let url = stack.nats.url();
    let alice = Person::new();
    let bob = Person::new();
    alice.register(&url, "alice").await;
    bob.register(&url, "bob").await;
    let bob_key = key_of(&bob).public_key();
    let (_mallory_key, mallory) = stack.registered("mallory").await;
    let publish = |payload: Vec<u8>| {
        let mallory = mallory.clone();
        async move {
            call(
                &mallory,
                "kez.mail.send",
                mail(&bob_key, rand_id(), &payload),
            )
            .await
            .map(|_| ())
        }
    };

    alice.ok(&["send", "@bob", "one"]).await;
    // A genuine envelope from mallory, tampered with; one sealed to carol.
    let mallory_secret = SecretKey::generate();
    let (_, mut tampered) =
        envelope::seal(&mallory_secret, &bob_key, "text", b"hi", now()).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let carol = SecretKey::generate().public_key();
    let (_, for_carol) = envelope::seal(&mallory_secret, &carol, "text", b"hi", now()).unwrap();
    let huge: Vec<u8> = (0..64 * 1024 - 256)
        .map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let hostile = [b"garbage".to_vec(), tampered, for_carol, huge];
    for payload in hostile.iter().cloned() {
        let result = publish(payload).await;
        tally.count(&result);
        result.expect("any registered user may send to bob");
    }
    let empty = publish(Vec::new()).await;
    tally.count(&empty);
    let refused = empty.expect_err("an empty message");
    assert_eq!((refused.code, refused.name.as_str()), (400, "malformed"));
    // One byte over the envelope limit: the server refuses it, and says what to do.
    let too_big = publish(vec![0xAB; 64 * 1024 + 1]).await;
    tally.count(&too_big);
    let refused = too_big.expect_err("over the envelope limit");
    assert_eq!((refused.code, refused.name.as_str()), (413, "too_large"));
    assert!(refused.message.contains("as a file"), "{}", refused.message);
    alice.ok(&["send", "@bob", "two"]).await;

    let output = bob.run(&["inbox", "--json"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "bob's inbox works: {stderr}");
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    let texts: Vec<&str> = shown
        .as_array()
        .unwrap()
        .iter()
        .map(|message| message["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["one", "two"],
        "the good messages, in order; stderr: {stderr}"
    );
    // The warnings are the service's, which received the messages: in its log.
    let log = bob.service_log();
    let dropped: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("dropping a message that does not open"))
        .collect();
    assert_eq!(
        dropped.len(),
        hostile.len(),
        "one warning per dropped message: {stderr}"
    );
    for code in ["unknown_version", "decryption_failed"] {
        assert!(
            dropped
                .iter()
                .any(|line| line.contains(&format!("code=\"{code}\""))),
            "reason {code} logged: {stderr}"
        );
    }
    assert!(dropped.iter().all(|line| line.contains("WARN")), "{stderr}");
    // Nothing secret in the log: not the key file, not its secret half in hex.
    let key_file = std::fs::read_to_string(bob.home.join("key")).unwrap();
    for secret_line in key_file.lines().filter(|line| line.len() >= 32) {
        assert!(
            !stderr.contains(secret_line.trim()),
            "the key leaked into the log"
        );
    }

    // The next run has nothing new and drops nothing again: its fetch names the floor past all
    // six, which acknowledges them.
    let again = bob.run(&["inbox"]).await;
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success());
    assert!(!stderr.contains("dropping"), "{stderr}");
    assert!(stderr.contains("no new messages"), "{stderr}");
    // Every message was acknowledged, the dropped ones too: the stream holds none of bob's.
    let server_js = async_nats::jetstream::new(stack.server_client().await);
    let stream = server_js.get_stream(MAIL_STREAM).await.unwrap();
    let mut subjects = stream
        .info_with_subjects(inbox_subject(&bob_key, &bob_key))
        .await
        .unwrap();
    let mut left = 0;
    while let Some((_, count)) = futures::TryStreamExt::try_next(&mut subjects)
        .await
        .unwrap()
    {
        left += count;
    }
    assert_eq!(left, 0, "bob's inbox still holds {left} message(s)");
    tally.finish("hostile_inbox", &stack).await;
}

/// Replays of exact earlier requests against a real server: a registration answers the same
/// record again and changes nothing (PROTOCOL.md §5.2: safe retries), a captured one replayed
/// after its window is 401 `outside_window`; an append answers the same head again and changes
/// nothing (§5.3), also after the chain has moved on. Bucket revisions prove "nothing".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_registrations_and_appends_change_nothing() {
    let stack = stack_with(Limits::default()).await;
    let mut tally = Tally::default();
    let key = Arc::new(SecretKey::generate());
    let (narrow, _) = stack.connect_as(&key).await.unwrap();
    let request = registration(&key, "dave");
    let first = call(&narrow, "kez.registry.register", request.clone()).await;
    tally.count(&first);
    let first = first.unwrap();
    let server = stack.server_client().await;
    let js = async_nats::jetstream::new(server.clone());
    let handles = js.get_key_value("kez_handles").await.unwrap();
    let heads = js.get_key_value("kez_chain_heads").await.unwrap();
    let links = js.get_key_value("kez_chain_links").await.unwrap();
    let handle_revision = handles.entry("dave").await.unwrap().unwrap().revision;

    for _ in 0..3 {
        let again = call(&narrow, "kez.registry.register", request.clone()).await;
        tally.count(&again);
        assert_eq!(again.unwrap(), first, "a replay answers the same record");
    }
    assert_eq!(
        handles.entry("dave").await.unwrap().unwrap().revision,
        handle_revision,
        "the replays wrote nothing"
    );

    // A registration captured earlier and replayed after its 300 s window.
    let old_key = SecretKey::generate();
    let handle = kez_core::Handle::parse("erin", TEST_DOMAIN).unwrap();
    let old = kez_proto::registry::RegistrationRequest::sign(&old_key, &handle, now() - 301);
    let stale = call(
        &narrow,
        "kez.registry.register",
        serde_json::to_vec(&old).unwrap(),
    )
    .await;
    tally.count(&stale);
    let err = stale.expect_err("outside the window");
    assert_eq!((err.code, err.name.as_str()), (401, "outside_window"));
    assert!(handles.entry("erin").await.unwrap().is_none());
    narrow.drain().await.unwrap();

    // Appends.
    let (client, _) = stack.connect_as(&key).await.unwrap();
    let link1 = UnsignedLink::first(key.public_key(), now(), nats_endpoint("a"))
        .sign(&key)
        .unwrap();
    let head1 = call(&client, "kez.sigchain.append", link1.bytes().to_vec()).await;
    tally.count(&head1);
    let head1 = head1.unwrap();
    let hex = key.public_key().to_hex();
    let head_revision = heads.entry(&hex).await.unwrap().unwrap().revision;
    let again = call(&client, "kez.sigchain.append", link1.bytes().to_vec()).await;
    tally.count(&again);
    assert_eq!(
        again.unwrap(),
        head1,
        "a replayed append answers the same head"
    );
    assert_eq!(
        heads.entry(&hex).await.unwrap().unwrap().revision,
        head_revision
    );

    // The chain moves on; replaying link 1 still changes nothing.
    let chain = kez_core::Sigchain::verify(&[link1.bytes()]).unwrap();
    let link2 = chain
        .next_link(now(), nats_endpoint("b"))
        .sign(&key)
        .unwrap();
    let head2 = call(&client, "kez.sigchain.append", link2.bytes().to_vec()).await;
    tally.count(&head2);
    let head2: Value = serde_json::from_slice(&head2.unwrap()).unwrap();
    assert_eq!(head2["seq"], 2);
    let head_revision = heads.entry(&hex).await.unwrap().unwrap().revision;
    let link_revisions = (
        links
            .entry(format!("{hex}.1"))
            .await
            .unwrap()
            .unwrap()
            .revision,
        links
            .entry(format!("{hex}.2"))
            .await
            .unwrap()
            .unwrap()
            .revision,
    );
    for link in [link1.bytes(), link2.bytes()] {
        let replay = call(&client, "kez.sigchain.append", link.to_vec()).await;
        tally.count(&replay);
        replay.expect("a stored link's replay answers its own head");
    }
    assert_eq!(
        heads.entry(&hex).await.unwrap().unwrap().revision,
        head_revision
    );
    assert_eq!(
        (
            links
                .entry(format!("{hex}.1"))
                .await
                .unwrap()
                .unwrap()
                .revision,
            links
                .entry(format!("{hex}.2"))
                .await
                .unwrap()
                .unwrap()
                .revision,
        ),
        link_revisions
    );
    assert!(links.entry(format!("{hex}.3")).await.unwrap().is_none());
    let head = call(
        &client,
        "kez.sigchain.head",
        serde_json::to_vec(&json!({ "key": key.public_key().to_string() })).unwrap(),
    )
    .await
    .unwrap();
    let head: Value = serde_json::from_slice(&head).unwrap();
    assert_eq!(head["seq"], 2, "the chain is where it was");
    tally.finish("replay", &stack).await;
}

/// A fresh random message id.
fn rand_id() -> [u8; 16] {
    *kez_core::envelope::MessageId::random().as_bytes()
}

/// Bytes `KEZ_MAIL` holds now, read as the server's own user.
async fn inbox_bytes(stack: &CalloutStack) -> u64 {
    let js = async_nats::jetstream::new(stack.server_client().await);
    let mut stream = js.get_stream(MAIL_STREAM).await.unwrap();
    stream.info().await.unwrap().state.bytes
}

/// One registered key once stored 175 MiB in 1.2 s by publishing into 300 invented inbox
/// subjects. Now: writing into an inbox directly is a permission violation, a send to a key
/// without a handle stores nothing, and a flood at a real user stops at the sender's byte
/// budget (429 with the time to wait), while another sender is served as before. The stream
/// itself is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_cannot_fill_the_brokers_disk_through_inboxes() {
    let stack = stack_with(Limits::default()).await;
    let mut tally = Tally::default();
    let (_bob_key, _bob) = stack.registered("bob").await;
    let bob = _bob_key.public_key();
    let (_alice_key, alice) = stack.registered("alice").await;
    let (_mallory_key, mallory) = stack.registered("mallory").await;
    let (_flooder_key, flooder) = stack.registered("flooder").await;
    let before = inbox_bytes(&stack).await;

    // Straight into invented inbox subjects (and bob's): the broker refuses the publish.
    let js = async_nats::jetstream::new(mallory.clone());
    for i in 0..4 {
        let subject = match i {
            3 => inbox_subject(&bob, &bob),
            _ => format!("kez.inbox.{:064x}.{:064x}", i + 1, i + 1),
        };
        let stored = tokio::time::timeout(Duration::from_secs(1), async {
            js.publish(subject, vec![0x5a; 60_000].into())
                .await
                .map_err(|err| err.to_string())?
                .await
                .map_err(|err| err.to_string())
        })
        .await;
        assert!(
            !matches!(stored, Ok(Ok(_))),
            "an inbox publish was stored: {stored:?}"
        );
    }
    // To 150 keys that hold no handle: refused, nothing stored (each counts against
    // mallory's message budget).
    for i in 0..150u32 {
        let nobody = SecretKey::from_seed(&[(i % 251) as u8 + 1; 32]).public_key();
        let sent = call(&mallory, "kez.mail.send", mail(&nobody, rand_id(), b"x")).await;
        tally.count(&sent);
        let refused = sent.expect_err("no inbox for a key without a handle");
        assert_eq!(
            (refused.code, refused.name.as_str()),
            (404, "unknown_recipient"),
            "{refused:?}"
        );
    }
    assert_eq!(inbox_bytes(&stack).await, before, "nothing was stored");

    // At bob, 60 KB at a time: the byte budget (8 MiB at once) ends the flood.
    let envelope = vec![0xA5; 60_000];
    let mut accepted = 0u64;
    let limited = loop {
        let sent = call(&flooder, "kez.mail.send", mail(&bob, rand_id(), &envelope)).await;
        tally.count(&sent);
        match sent {
            Ok(_) => accepted += 1,
            Err(err) => break err,
        }
        assert!(accepted < 1000, "the flood was never limited");
    };
    assert_eq!((limited.code, limited.name.as_str()), (429, "rate_limited"));
    let retry_ms: u64 = limited
        .headers
        .get("Kez-Retry-After-Ms")
        .expect("the time to wait")
        .as_str()
        .parse()
        .unwrap();
    assert!(retry_ms > 0);
    let budget = kez_chat_server::limits::DEFAULT_SEND_BYTES_PER_KEY.burst as u64;
    assert!(
        accepted * 60_000 <= budget + 60_000,
        "{accepted} messages of 60 KB went through a budget of {budget} bytes"
    );
    let stored = inbox_bytes(&stack).await - before;
    assert!(
        stored < budget + budget / 4,
        "mallory stored {stored} bytes for bob (budget {budget})"
    );
    println!(
        "one key flooding bob: {accepted} messages, {stored} bytes stored, then 429 (retry in {retry_ms} ms)"
    );
    assert!(
        retry_ms > 1000,
        "the byte budget, not the message rate, stopped it: retry in {retry_ms} ms"
    );
    // Another sender is not affected.
    let sent = call(&alice, "kez.mail.send", mail(&bob, rand_id(), b"hello bob")).await;
    tally.count(&sent);
    sent.expect("alice still reaches bob");
    // The stream is bounded.
    let js = async_nats::jetstream::new(stack.server_client().await);
    let config = js
        .get_stream(MAIL_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(
        config.max_bytes,
        kez_chat_server::store::DEFAULT_INBOX_MAX_BYTES as i64
    );
    tally.finish("inbox_flood", &stack).await;
}

/// When the inbox stream reaches its bound, sends are refused (503 `store_full`) and the
/// registry keeps working: the stream's reservation leaves the buckets their room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_inbox_stream_refuses_mail_and_leaves_the_registry_working() {
    let stack = CalloutStack::start_configured(|config: &mut ServerConfig| {
        config.limits = Limits::OFF;
        config.inbox_max_bytes = Some(1 << 20);
    })
    .await;
    let (bob_key, _bob) = stack.registered("bob").await;
    let (mallory_key, mallory) = stack.registered("mallory").await;
    let envelope = vec![0x5A; 60_000];
    let mut accepted = 0;
    let refused = loop {
        match call(
            &mallory,
            "kez.mail.send",
            mail(&bob_key.public_key(), rand_id(), &envelope),
        )
        .await
        {
            Ok(_) => accepted += 1,
            Err(err) => break err,
        }
        assert!(
            accepted < 100,
            "a 1 MiB stream took {accepted} messages of 60 KB"
        );
    };
    assert_eq!((refused.code, refused.name.as_str()), (503, "store_full"));
    assert!(accepted >= 10, "only {accepted} messages fit in 1 MiB");
    // The registry still writes: a registration and a sigchain link.
    let (_carol_key, _carol) = stack.registered("carol").await;
    let link = UnsignedLink::first(mallory_key.public_key(), now(), nats_endpoint("nats"))
        .sign(&mallory_key)
        .unwrap();
    call(&mallory, "kez.sigchain.append", link.bytes().to_vec())
        .await
        .expect("the buckets have their room");
}
