//! kez-chat-server when things go wrong around it, against real processes: the broker restarts,
//! one of two instances is killed mid-load, the server is stopped with requests in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, RequestErrorKind};
use bytes::Bytes;
use futures::StreamExt;
use kez_chat_server::store::{HANDLES_BUCKET, KEYS_BUCKET, KeyRecord};
use kez_core::{SecretKey, Sigchain, UnsignedLink};
use kez_proto::answer::HandleRecord;
use kez_proto::subjects::{MAIL_STREAM, inbox_subject, new_mail_subject};
use kez_tests::NatsServer;
use kez_tests::kez_server::{KezServer, TEST_DOMAIN, call, call_ok};
use kez_tests::process::KezServerProcess;
use kez_tests::requests::{self, nats_endpoint, now};
use serde_json::{Value, json};

const REGISTER: &str = "kez.registry.register";

/// A new key and its signed registration request for `name`.
fn registration(name: &str) -> (SecretKey, Bytes) {
    let key = SecretKey::generate();
    let body = requests::registration(&key, name);
    (key, body.into())
}

/// A client that reconnects by itself (the default, made explicit) with a short request timeout,
/// so a request lost with a dying instance is noticed quickly.
async fn client(url: &str, request_timeout: Duration) -> Client {
    ConnectOptions::new()
        .max_reconnects(None)
        .request_timeout(Some(request_timeout))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// How one request ended.
#[derive(Debug)]
// Some fields are only read through `Debug`, in failure messages.
#[allow(dead_code)]
enum Outcome {
    /// A success answer.
    Ok(Bytes),
    /// An error answer: code, `Kez-Error` name, message.
    Refused(u16, String, String),
    /// No answer: timeout, no responders, or no connection.
    NoAnswer(RequestErrorKind),
}

async fn request(client: &Client, subject: &str, body: Bytes) -> Outcome {
    let answer = match client.request(subject.to_owned(), body).await {
        Ok(answer) => answer,
        Err(err) => return Outcome::NoAnswer(err.kind()),
    };
    let header = |name: &str| {
        answer
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .map(|value| value.as_str().to_owned())
    };
    match header("Nats-Service-Error-Code") {
        None => Outcome::Ok(answer.payload),
        Some(code) => Outcome::Refused(
            code.parse().expect("numeric error code"),
            header("Kez-Error").unwrap_or_default(),
            header("Nats-Service-Error").unwrap_or_default(),
        ),
    }
}

/// Repeats `body` on `subject` until it is answered OK, for at most `patience`: what a client
/// does across a broker restart. Returns the answer and how many attempts failed first.
async fn until_ok(
    client: &Client,
    subject: &str,
    body: Bytes,
    patience: Duration,
) -> (Value, usize) {
    let deadline = Instant::now() + patience;
    let mut failures = 0;
    loop {
        let outcome = request(client, subject, body.clone()).await;
        match outcome {
            Outcome::Ok(answer) => return (serde_json::from_slice(&answer).unwrap(), failures),
            // No answer (the server is not back yet) or storage unavailable: both pass.
            Outcome::Refused(503, ..) | Outcome::NoAnswer(_) => {}
            Outcome::Refused(..) => panic!("{subject}: refused: {outcome:?}"),
        }
        failures += 1;
        assert!(
            Instant::now() < deadline,
            "{subject}: no OK answer within {patience:?} ({failures} attempts); last: {outcome:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn broker_restart_keeps_every_handle_and_chain_and_the_server_reconnects() {
    let mut nats = NatsServer::start();
    let server = KezServerProcess::spawn(&nats.url()).await;
    let client = client(&nats.url(), Duration::from_secs(2)).await;

    let (alice, body) = registration("alice");
    call(&client, REGISTER, body).await.unwrap();
    let first = UnsignedLink::first(alice.public_key(), now(), nats_endpoint("inbox"))
        .sign(&alice)
        .unwrap();
    call(&client, "kez.sigchain.append", first.bytes().to_vec())
        .await
        .unwrap();
    let mut chain = Sigchain::start(first.bytes()).unwrap();
    let second = chain
        .next_link(now(), nats_endpoint("phone"))
        .sign(&alice)
        .unwrap();
    call(&client, "kez.sigchain.append", second.bytes().to_vec())
        .await
        .unwrap();
    chain.append(second.bytes()).unwrap();

    let port = nats.port();
    nats.restart();
    assert_eq!(nats.port(), port);

    // The first request may find the server not yet reconnected, or JetStream still recovering.
    let lookup = Bytes::from(json!({ "handle": "alice" }).to_string());
    let (profile, failures) = until_ok(
        &client,
        "kez.registry.lookup",
        lookup,
        Duration::from_secs(10),
    )
    .await;
    eprintln!("first lookup after the restart answered after {failures} failed attempts");
    assert_eq!(profile["handle"], format!("@alice@{TEST_DOMAIN}"));
    assert_eq!(profile["key"], alice.public_key().to_string());
    assert_eq!(profile["sigchain"]["seq"], 2);
    assert_eq!(profile["sigchain"]["head"], chain.head().to_string());

    let whois = call_ok(
        &client,
        "kez.registry.whois",
        json!({ "key": alice.public_key() }),
    )
    .await;
    assert_eq!(whois, profile);
    let head = call_ok(
        &client,
        "kez.sigchain.head",
        json!({ "key": alice.public_key() }),
    )
    .await;
    assert_eq!(head["seq"], 2);
    let page = call_ok(
        &client,
        "kez.sigchain.get",
        json!({ "key": alice.public_key() }),
    )
    .await;
    let links: Vec<&str> = page["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|link| link.as_str().unwrap())
        .collect();
    assert_eq!(
        links,
        [first.bytes(), second.bytes()].map(|b| std::str::from_utf8(b).unwrap())
    );
    let stored = Sigchain::verify(&links).unwrap();
    assert_eq!(stored.head(), chain.head());

    // New writes work too: a registration and a third link.
    let (bob, body) = registration("bob");
    call(&client, REGISTER, body).await.unwrap();
    let whois = call_ok(
        &client,
        "kez.registry.whois",
        json!({ "key": bob.public_key() }),
    )
    .await;
    assert_eq!(whois["handle"], format!("@bob@{TEST_DOMAIN}"));
    let third = chain
        .next_link(now(), nats_endpoint("laptop"))
        .sign(&alice)
        .unwrap();
    call(&client, "kez.sigchain.append", third.bytes().to_vec())
        .await
        .unwrap();

    // The same process served throughout: it saw the broker go and came back by itself.
    let log = server.log();
    assert!(
        log.contains("disconnected from NATS"),
        "the server did not notice the restart:\n{log}"
    );
}

/// How the registrations of one load ended.
#[derive(Default)]
struct Load {
    /// Answered OK (possibly after retries): handle name → key.
    registered: BTreeMap<String, SecretKey>,
    /// Lost with the killed instance after it had written the key's reverse entry but not the
    /// handle: the retry is refused with 409 `key_has_handle` (the server reclaims such an
    /// entry only once it is a minute old). Never answered OK: handle name → key.
    interrupted: BTreeMap<String, SecretKey>,
    /// Attempts that got no answer and were retried.
    retries: usize,
}

/// Registers `names`, `concurrency` at a time. A request that gets no answer (its instance
/// died) is sent again, the same signed bytes, for up to 20 s. `answered` counts OK answers.
async fn register_all(
    client: &Client,
    names: Vec<String>,
    concurrency: usize,
    answered: &AtomicUsize,
) -> Load {
    let outcomes: Vec<(String, SecretKey, Option<Value>, usize)> = futures::stream::iter(names)
        .map(|name| async move {
            let (key, body) = registration(&name);
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut failures = 0;
            loop {
                let outcome = request(client, REGISTER, body.clone()).await;
                match outcome {
                    Outcome::Ok(answer) => {
                        answered.fetch_add(1, Ordering::SeqCst);
                        let record = serde_json::from_slice(&answer).unwrap();
                        return (name, key, Some(record), failures);
                    }
                    Outcome::Refused(409, ref error, _)
                        if failures > 0 && error == "key_has_handle" =>
                    {
                        return (name, key, None, failures);
                    }
                    Outcome::Refused(503, ..) | Outcome::NoAnswer(_) => {}
                    Outcome::Refused(..) => panic!("registering {name}: {outcome:?}"),
                }
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "registering {name}: no answer within 20 s ({failures} attempts)"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut load = Load::default();
    for (name, key, record, failures) in outcomes {
        load.retries += failures;
        match record {
            Some(record) => {
                assert_eq!(record["handle"], format!("@{name}@{TEST_DOMAIN}"));
                assert_eq!(record["key"], key.public_key().to_string());
                load.registered.insert(name, key);
            }
            None => {
                load.interrupted.insert(name, key);
            }
        }
    }
    load
}

/// `$SRV.STATS.kez-registry` from every instance: service id → requests its register endpoint
/// answered.
async fn register_stats(client: &Client) -> BTreeMap<String, u64> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.STATS.kez-registry", inbox, Bytes::new())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut stats = BTreeMap::new();
    while let Ok(Some(answer)) =
        tokio::time::timeout(Duration::from_millis(500), answers.next()).await
    {
        let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
        let register = answer["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|endpoint| endpoint["subject"] == REGISTER)
            .unwrap_or_else(|| panic!("no register endpoint in {answer}"));
        stats.insert(
            answer["id"].as_str().unwrap().to_owned(),
            register["num_requests"].as_u64().unwrap(),
        );
    }
    stats
}

#[tokio::test]
async fn two_instances_share_the_load_and_losing_one_loses_no_answered_request() {
    let nats = NatsServer::start();
    let mut first = KezServerProcess::spawn(&nats.url()).await;
    let second = KezServerProcess::spawn(&nats.url()).await;
    let client = client(&nats.url(), Duration::from_secs(2)).await;
    let answered = AtomicUsize::new(0);

    // Both instances take part.
    let names: Vec<String> = (0..200).map(|i| format!("first_{i}")).collect();
    let load = register_all(&client, names, 16, &answered).await;
    assert_eq!(load.registered.len(), 200);
    assert_eq!(load.retries, 0, "retries with both instances up");
    let mut registered = load.registered;
    let stats = register_stats(&client).await;
    assert_eq!(stats.len(), 2, "expected two instances in {stats:?}");
    assert!(
        stats.values().all(|&requests| requests > 0),
        "an instance answered no registration: {stats:?}"
    );
    assert_eq!(stats.values().sum::<u64>(), 200, "{stats:?}");

    // One instance dies mid-load: what it had not answered is retried on the other.
    answered.store(0, Ordering::SeqCst);
    let names: Vec<String> = (0..300).map(|i| format!("second_{i}")).collect();
    let load = register_all(&client, names, 16, &answered);
    let killer = async {
        while answered.load(Ordering::SeqCst) < 60 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        first.kill();
    };
    let (load, ()) = tokio::join!(load, killer);
    eprintln!(
        "second load: {} registered, {} interrupted between their two writes, {} attempts retried",
        load.registered.len(),
        load.interrupted.len(),
        load.retries,
    );
    assert_eq!(load.registered.len() + load.interrupted.len(), 300);
    assert!(load.retries > 0 || load.interrupted.is_empty());
    registered.extend(load.registered);
    let interrupted = load.interrupted;
    let stats = register_stats(&client).await;
    assert_eq!(
        stats.len(),
        1,
        "the killed instance still answers: {stats:?}"
    );

    // Every answered registration is there, both ways.
    let lookups = futures::stream::iter(&registered)
        .map(|(name, key)| {
            let client = &client;
            async move {
                let by_name =
                    call_ok(client, "kez.registry.lookup", json!({ "handle": name })).await;
                let by_key = call_ok(
                    client,
                    "kez.registry.whois",
                    json!({ "key": key.public_key() }),
                )
                .await;
                assert_eq!(by_name["key"], key.public_key().to_string(), "{name}");
                assert_eq!(by_name, by_key, "{name}");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>();
    lookups.await;
    // An interrupted one is not half visible: neither way finds it.
    for (name, key) in &interrupted {
        let by_name = call(
            &client,
            "kez.registry.lookup",
            json!({ "handle": name }).to_string(),
        )
        .await;
        assert_eq!(by_name.unwrap_err().code, 404, "{name}");
        let by_key = call(
            &client,
            "kez.registry.whois",
            json!({ "key": key.public_key() }).to_string(),
        )
        .await;
        assert_eq!(by_key.unwrap_err().code, 404, "{name}");
    }

    // And the buckets hold exactly one consistent record per answered handle; the only other
    // entries are the interrupted registrations' reverse entries, which nothing trusts.
    let js = async_nats::jetstream::new(client.clone());
    let handles = bucket::<HandleRecord>(&js, HANDLES_BUCKET).await;
    let keys = bucket::<KeyRecord>(&js, KEYS_BUCKET).await;
    assert_eq!(
        handles.keys().cloned().collect::<BTreeSet<_>>(),
        registered.keys().cloned().collect::<BTreeSet<_>>()
    );
    for (name, key) in &registered {
        let record = &handles[name];
        assert_eq!(record.key, key.public_key(), "{name}");
        assert_eq!(record.handle.name(), name);
        assert_eq!(keys[&key.public_key().to_hex()].name, *name);
    }
    let expected_keys: BTreeSet<String> = registered
        .values()
        .chain(interrupted.values())
        .map(|key| key.public_key().to_hex())
        .collect();
    let stray: Vec<&String> = keys
        .keys()
        .filter(|key| !expected_keys.contains(*key))
        .collect();
    assert!(
        stray.is_empty(),
        "reverse entries of unknown keys: {stray:?}"
    );
    drop(second);
}

/// Returns once a message published now has come back: the broker has then handled every
/// message this client published before (`Client::flush` only writes the socket; it does not
/// wait for the broker).
async fn round_trip(client: &Client) {
    let subject = client.new_inbox();
    let mut echo = client.subscribe(subject.clone()).await.unwrap();
    client.publish(subject, Bytes::new()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), echo.next())
        .await
        .expect("no echo from the broker within 5 s")
        .expect("echo subscription closed");
}

/// Every live entry of a bucket, decoded.
async fn bucket<T: serde::de::DeserializeOwned>(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> BTreeMap<String, T> {
    let store = js.get_key_value(name).await.unwrap();
    let names: Vec<String> = store
        .keys()
        .await
        .unwrap()
        .map(|key| key.unwrap())
        .collect()
        .await;
    let mut entries = BTreeMap::new();
    for key in names {
        if let Some(value) = store.get(&key).await.unwrap() {
            entries.insert(key, serde_json::from_slice(&value).unwrap());
        }
    }
    entries
}

/// Registration requests published without waiting for their answers, which arrive on one
/// wildcard inbox.
struct Fired {
    answers: async_nats::Subscriber,
    /// Request number → handle name and key.
    sent: BTreeMap<usize, (String, SecretKey)>,
}

/// Publishes `n` registrations, then returns once the broker has routed them all.
async fn fire_registrations(client: &Client, n: usize) -> Fired {
    let inbox = client.new_inbox();
    let answers = client.subscribe(format!("{inbox}.*")).await.unwrap();
    let mut sent = BTreeMap::new();
    for i in 0..n {
        let name = format!("user_{i}");
        let (key, body) = registration(&name);
        client
            .publish_with_reply(REGISTER, format!("{inbox}.{i}"), body)
            .await
            .unwrap();
        sent.insert(i, (name, key));
    }
    // Once our own echo is back, the broker has routed every request to the server.
    round_trip(client).await;
    Fired { answers, sent }
}

impl Fired {
    /// Collects the answers until each request has one or none comes for 3 s; asserts that
    /// every request was answered OK, and that each answered registration is stored.
    async fn assert_all_answered(mut self, client: &Client, stopped_how: &str) {
        let n = self.sent.len();
        let mut unanswered: BTreeSet<usize> = self.sent.keys().copied().collect();
        let mut refused = Vec::new();
        while !unanswered.is_empty() {
            let Ok(Some(answer)) =
                tokio::time::timeout(Duration::from_secs(3), self.answers.next()).await
            else {
                break;
            };
            let i: usize = answer.subject.rsplit('.').next().unwrap().parse().unwrap();
            assert!(unanswered.remove(&i), "two answers to request {i}");
            if answer.status.is_some() {
                // A status from the broker, not an answer: no responders when it was routed.
                refused.push((i, format!("{:?}", answer.status)));
            } else if let Some(code) = answer
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Nats-Service-Error-Code"))
            {
                refused.push((i, code.to_string()));
            }
        }
        assert!(
            unanswered.is_empty(),
            "{} of {n} requests sent before {stopped_how} got no answer (e.g. {:?})",
            unanswered.len(),
            unanswered.iter().take(10).collect::<Vec<_>>()
        );
        assert!(refused.is_empty(), "refused: {refused:?}");
        self.sent_were_stored(client).await;
    }

    /// Every registration answered OK is stored (checked through a fresh server).
    async fn sent_were_stored(&self, client: &Client) {
        let js = async_nats::jetstream::new(client.clone());
        let handles = bucket::<HandleRecord>(&js, HANDLES_BUCKET).await;
        for (name, key) in self.sent.values() {
            assert_eq!(
                handles.get(name).map(|record| record.key),
                Some(key.public_key()),
                "{name}"
            );
        }
    }
}

/// A request now gets "no responders" from the broker at once, rather than hanging.
async fn assert_no_responders(client: &Client) {
    let started = Instant::now();
    let err = client
        .request("kez.server.info", Bytes::new())
        .await
        .expect_err("a stopped server answered");
    assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_answers_every_request_sent_before_it() {
    let nats = NatsServer::start();
    let server = KezServer::start(&nats.url()).await;
    let client = client(&nats.url(), Duration::from_secs(2)).await;

    let fired = fire_registrations(&client, 300).await;
    server.stop().await;
    fired.assert_all_answered(&client, "stop()").await;
    assert_no_responders(&client).await;
}

#[tokio::test]
async fn sigterm_answers_every_request_sent_before_it() {
    let nats = NatsServer::start();
    let mut server = KezServerProcess::spawn(&nats.url()).await;
    let client = client(&nats.url(), Duration::from_secs(2)).await;

    let fired = fire_registrations(&client, 300).await;
    let status = server.terminate();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        server.log()
    );
    fired.assert_all_answered(&client, "SIGTERM").await;
    assert_no_responders(&client).await;
}

/// Every JetStream API request (`$JS.API.…`) one start of the server makes, in order. On this
/// broker without accounts the server's account is the test client's, which sees them go by
/// on `api`, its subscription to `$JS.API.>`.
async fn api_requests_of_a_start(
    client: &Client,
    api: &mut async_nats::Subscriber,
    nats_url: &str,
) -> (KezServer, Vec<String>) {
    // Whatever came before is not this start's.
    round_trip(client).await;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), api.next()).await {}
    let server = KezServer::start(nats_url).await;
    round_trip(client).await;
    let mut requests = Vec::new();
    while let Ok(Some(request)) = tokio::time::timeout(Duration::from_millis(300), api.next()).await
    {
        requests.push(request.subject.to_string());
    }
    (server, requests)
}

/// A registered user costs the broker key-value entries only: no consumer, nothing a start
/// has to create, list or check. A start with twice the users asks JetStream exactly what a
/// start with half of them does, and neither touches the consumer API.
#[tokio::test]
async fn a_start_does_no_jetstream_work_per_registered_user() {
    const USERS: usize = 150;
    let nats = NatsServer::start();
    let client = client(&nats.url(), Duration::from_secs(5)).await;
    let mut api = client.subscribe("$JS.API.>").await.unwrap();
    let answered = AtomicUsize::new(0);
    let mut starts = Vec::new();
    for round in 0..3 {
        let (server, requests) = api_requests_of_a_start(&client, &mut api, &nats.url()).await;
        starts.push(requests);
        if round < 2 {
            let names = (0..USERS).map(|i| format!("user{round}_{i}")).collect();
            let load = register_all(&client, names, 32, &answered).await;
            assert_eq!(load.registered.len(), USERS);
        }
        server.stop().await;
    }
    for (users, requests) in [0, USERS, 2 * USERS].iter().zip(&starts) {
        assert!(
            !requests.is_empty(),
            "the start with {users} users was not seen"
        );
        let consumers: Vec<&String> = requests
            .iter()
            .filter(|subject| subject.starts_with("$JS.API.CONSUMER."))
            .collect();
        assert!(
            consumers.is_empty(),
            "the start with {users} registered users used the consumer API: {consumers:?}"
        );
    }
    let sorted = |requests: &[String]| {
        let mut requests = requests.to_vec();
        requests.sort();
        requests
    };
    assert_eq!(
        sorted(&starts[2]),
        sorted(&starts[1]),
        "a start with {} users asked JetStream otherwise than one with {USERS}",
        2 * USERS
    );
    let js = async_nats::jetstream::new(client.clone());
    let mut inbox = js.get_stream(MAIL_STREAM).await.unwrap();
    assert_eq!(inbox.info().await.unwrap().state.consumer_count, 0);
}

/// `inbox_sweep_secs` swept the inbox stream of an earlier release. It is retired, and a
/// deployment that still sets it (as a flag or in its config file) keeps starting and serving,
/// with a warning that names the setting.
#[tokio::test]
async fn the_retired_inbox_sweep_setting_still_lets_a_server_start() {
    let nats = NatsServer::start();
    let client = client(&nats.url(), Duration::from_secs(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kez-chat-server.toml");
    // The earlier release's smallest interval; it refused 0.
    std::fs::write(&config, "inbox_sweep_secs = 1\n").unwrap();
    let config = config.to_str().unwrap();
    for (how, args) in [
        ("flag", ["--inbox-sweep-secs", "300"]),
        ("config file", ["--config", config]),
    ] {
        let mut server = KezServerProcess::spawn_with_args(&nats.url(), &args).await;
        let log = server.log();
        assert!(
            log.contains("no longer does anything") && log.contains("inbox_sweep_secs"),
            "{how}: no warning naming the setting:\n{log}"
        );
        let (_, body) = registration(&format!("by_{}", how.replace(' ', "_")));
        call(&client, REGISTER, body)
            .await
            .unwrap_or_else(|err| panic!("{how}: {err:?}"));
        let status = server.terminate();
        assert!(
            status.success(),
            "{how}: {status:?}; log:\n{}",
            server.log()
        );
    }
}

/// A `KEZ_MAIL` stream whose settings have drifted (no byte bound, 64 KiB messages, no direct
/// reads, no new-mail notifications, as an operator's edit or an older build may leave it) is
/// brought back in place by the next start, and every stored message still waits for its
/// recipient; a byte bound the operator set is kept by a start that sets none.
#[tokio::test]
async fn an_inbox_stream_with_drifted_settings_is_repaired_and_keeps_its_messages() {
    let nats = NatsServer::start();
    let server = KezServer::start(&nats.url()).await;
    let client = client(&nats.url(), Duration::from_secs(5)).await;
    let (bob, body) = registration("bob");
    call(&client, REGISTER, body).await.unwrap();
    server.stop().await;
    let bob = bob.public_key();

    let js = async_nats::jetstream::new(client.clone());
    let mut inbox = js.get_stream(MAIL_STREAM).await.unwrap();
    let mut old = inbox.info().await.unwrap().config.clone();
    old.max_bytes = -1;
    old.max_message_size = 64 * 1024;
    old.allow_direct = false;
    old.republish = None;
    js.update_stream(&old).await.unwrap();
    for i in 0..3 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{i:032x}").as_str());
        js.publish_with_headers(
            inbox_subject(&bob, &bob),
            headers,
            format!("sealed {i}").into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let server = KezServer::start(&nats.url()).await;
    let upgraded = inbox.info().await.unwrap().config.clone();
    assert_eq!(
        upgraded.max_bytes,
        kez_chat_server::store::DEFAULT_INBOX_MAX_BYTES as i64
    );
    assert_eq!(
        upgraded.max_message_size,
        kez_chat_server::store::INBOX_MAX_STORED_BYTES
    );
    assert!(upgraded.allow_direct);
    assert!(upgraded.republish.is_some());
    assert_eq!(
        kez_tests::chat::inbox_held(&js, &bob).await,
        Some(3),
        "every message still waits"
    );
    let state = inbox.info().await.unwrap().state.clone();
    let mut waiting = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        waiting.push(inbox.get_raw_message(seq).await.unwrap().payload);
    }
    assert_eq!(waiting, ["sealed 0", "sealed 1", "sealed 2"]);
    // The new-mail notifications are back: headers only, on bob's own subject.
    let mut new_mail = client
        .subscribe(new_mail_subject(&bob, &bob))
        .await
        .unwrap();
    round_trip(&client).await;
    js.publish(inbox_subject(&bob, &bob), "sealed 3".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let notification = tokio::time::timeout(Duration::from_secs(5), new_mail.next())
        .await
        .expect("a new-mail notification")
        .unwrap();
    assert!(notification.payload.is_empty(), "{notification:?}");

    // A bound the operator set is kept by a start that sets none.
    let mut bounded = upgraded.clone();
    bounded.max_bytes = 64 << 20;
    js.update_stream(&bounded).await.unwrap();
    server.stop().await;
    let server = KezServer::start(&nats.url()).await;
    assert_eq!(inbox.info().await.unwrap().config.max_bytes, 64 << 20);
    server.stop().await;
}

/// A SIGTERM while the broker is down still stops the server, by itself and promptly (it once
/// logged "shutting down" and was still running ten minutes later).
#[tokio::test]
async fn sigterm_with_the_broker_down_stops_the_server() {
    let mut nats = NatsServer::start();
    let mut server = KezServerProcess::spawn(&nats.url()).await;
    nats.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("disconnected from NATS") {
        assert!(
            Instant::now() < deadline,
            "the server did not notice the broker going"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // terminate() sends SIGTERM and SIGKILLs only after its timeout: success is a clean exit.
    let status = server.terminate();
    assert!(status.success(), "{status:?}; log:\n{}", server.log());
}

/// A broker whose certificate comes from a private CA: without that CA the server says why it
/// cannot connect (at WARN, with the TLS cause, in a log without colour codes), and with
/// `SSL_CERT_FILE` naming the CA it serves (what deploy/DEPLOY.md tells operators to do).
#[tokio::test]
async fn a_private_ca_is_trusted_through_ssl_cert_file_and_a_tls_failure_names_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    // The committed test PKI (tests/fixtures/tls): a private CA no system store trusts.
    let nats = NatsServer::start_with(&format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n",
        kez_tests::tls::server_cert_file().display().to_string(),
        kez_tests::tls::server_key_file().display().to_string()
    ));
    let url = format!("tls://127.0.0.1:{}", nats.port());

    /// A child killed when dropped, also when the test fails.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let run = |ca: Option<String>, log: &str| {
        let mut command = kez_tests::process::kez_chat_server_command();
        command
            .args(["run", "--nats-url", &url, "--domain", TEST_DOMAIN])
            .env_remove("SSL_CERT_FILE")
            .env_remove("NO_COLOR")
            .stdout(std::fs::File::create(path(log)).unwrap())
            .stderr(std::fs::File::create(path(&format!("{log}.err"))).unwrap());
        if let Some(ca) = ca {
            command.env("SSL_CERT_FILE", ca);
        }
        Running(command.spawn().unwrap())
    };
    let wait_for = |log: &str, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(path(log)).unwrap_or_default()
                + &std::fs::read_to_string(path(&format!("{log}.err"))).unwrap_or_default();
            if let Some(line) = text.lines().find(|line| line.contains(what)) {
                return line.to_owned();
            }
            assert!(Instant::now() < deadline, "no {what:?} in the log:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let untrusting = run(None, "untrusting.log");
    let warning = wait_for("untrusting.log", "cannot connect to the broker");
    drop(untrusting);
    assert!(
        warning.contains("WARN") && warning.contains("UnknownIssuer"),
        "{warning}"
    );
    // That run had no NO_COLOR: a log written to a file has no colour codes either.
    let log = std::fs::read_to_string(path("untrusting.log")).unwrap()
        + &std::fs::read_to_string(path("untrusting.log.err")).unwrap();
    assert!(!log.contains('\u{1b}'), "colour codes in a file:\n{log}");

    let _trusting = run(
        Some(kez_tests::tls::ca_file().display().to_string()),
        "trusting.log",
    );
    wait_for("trusting.log", "kez-chat-server serving");
}
