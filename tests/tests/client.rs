//! The client library (kez-client) against a real nats-server with the auth callout and a real
//! kez-chat-server: registration, the typed service calls, offline delivery through the inbox
//! stream (`KEZ_MAIL`, read and acknowledged through `kez.mail.fetch`), and what the receiving
//! client drops (replays, garbage, messages for others).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use kez_client::{
    CheckedContact, ClientError, Config, Connection, Direction, Home, PinChange, StoreError,
    VerifiedChain,
};
use kez_core::envelope;
use kez_core::sigchain::Endpoint;
use kez_core::trust::PinRefusal;
use kez_core::{Op, SecretKey, UnsignedLink};
use kez_proto::subjects::{MAIL_STREAM, inbox_subject};
use kez_tests::callout::CalloutStack;
use kez_tests::chat::inbox_held;
use kez_tests::kez_server::test_handle;
use kez_tests::requests::nats_endpoint;
use tempfile::TempDir;

/// A person with their own client home.
struct User {
    home: Home,
    key: Arc<SecretKey>,
    handle: String,
    _dir: TempDir,
}

impl User {
    /// Makes a home and key, registers `name` over the narrow profile, and records the server
    /// and handle in the home's config, as `kez-chat register` will.
    async fn register(stack: &CalloutStack, name: &str) -> User {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path().join("home")).unwrap();
        let (key, created) = home.key_or_create().unwrap();
        assert!(created, "a fresh home makes a key");
        let mode = std::fs::metadata(home.key_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key file is private");
        let key = Arc::new(key);

        let narrow = Connection::connect(&stack.nats.url(), key.clone())
            .await
            .expect("an unregistered key connects");
        let record = narrow
            .register(name)
            .await
            .unwrap_or_else(|err| panic!("registering {name}: {err}"));
        assert_eq!(record.key, key.public_key());
        narrow.close().await.unwrap();
        home.save_config(&Config {
            server: Some(stack.nats.url()),
            handle: Some(record.handle.to_string()),
            ..Config::default()
        })
        .unwrap();
        User {
            home,
            key,
            handle: record.handle.to_string(),
            _dir: dir,
        }
    }

    /// Writes the first sigchain link, as `kez-chat register` does: contacts verify the chain.
    async fn start_sigchain(&self) {
        let conn = self.connect().await;
        let first = UnsignedLink::first(
            self.key.public_key(),
            kez_client::now(),
            nats_endpoint("nats"),
        )
        .sign(&self.key)
        .unwrap();
        conn.append(first.bytes()).await.unwrap();
        conn.close().await.unwrap();
    }

    /// Connects with the registered profile.
    async fn connect(&self) -> Connection {
        let url = self.home.config().unwrap().server.expect("a server");
        Connection::connect(&url, self.key.clone())
            .await
            .expect("a registered key connects")
    }
}

/// How many messages `key`'s inbox holds, read as the server.
async fn held(js: &jetstream::Context, key: &SecretKey) -> u64 {
    inbox_held(js, &key.public_key())
        .await
        .expect("JetStream answers")
}

/// The inbox stream's state, read as the server.
async fn mail_state(js: &jetstream::Context) -> jetstream::stream::State {
    js.get_stream(MAIL_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone()
}

fn bodies(messages: &[envelope::Message]) -> Vec<&[u8]> {
    messages.iter().map(|m| m.body.as_slice()).collect()
}

#[tokio::test]
async fn registration_and_service_calls() {
    let stack = CalloutStack::start().await;
    let alice = User::register(&stack, "alice").await;
    let bob = User::register(&stack, "bob").await;
    assert_eq!(alice.handle, "@alice@kez.test");

    // A taken handle is a service error with its stable name.
    let carol = Arc::new(SecretKey::generate());
    let narrow = Connection::connect(&stack.nats.url(), carol).await.unwrap();
    match narrow.register("bob").await {
        Err(ClientError::Service(err)) => {
            assert_eq!(
                (err.answer.code, err.answer.name.as_ref()),
                (409, "handle_taken"),
                "{err}"
            );
        }
        other => panic!("registering a taken handle: {other:?}"),
    }

    let conn = alice.connect().await;
    let info = conn.server_info().await.unwrap();
    assert_eq!(info.domain, "kez.test");
    let profile = conn.lookup(&test_handle("@bob")).await.unwrap();
    assert_eq!(profile.key, bob.key.public_key());
    assert_eq!(profile.handle.to_string(), bob.handle);
    assert_eq!(profile.sigchain, None);
    let whois = conn.whois(&bob.key.public_key(), None).await.unwrap();
    assert_eq!(whois.handle.to_string(), bob.handle);
    match conn.lookup(&test_handle("@nobody")).await {
        Err(ClientError::Service(err)) => assert_eq!(err.answer.name, "not_found"),
        other => panic!("looking up nobody: {other:?}"),
    }
    match conn.chain(&bob.key.public_key()).await {
        Err(ClientError::Service(err)) => assert_eq!(err.answer.code, 404),
        other => panic!("bob has no chain: {other:?}"),
    }

    // alice writes her first link; head and the verified chain agree with append's answer.
    let link = UnsignedLink::first(
        alice.key.public_key(),
        kez_client::now(),
        nats_endpoint("inbox"),
    )
    .sign(&alice.key)
    .unwrap();
    let head = conn.append(link.bytes()).await.unwrap();
    assert_eq!((head.seq, head.head), (1, link.hash()));
    assert_eq!(conn.head(&alice.key.public_key()).await.unwrap(), head);
    let chain = conn.chain(&alice.key.public_key()).await.unwrap();
    assert_eq!((chain.seq(), chain.head()), (1, link.hash()));
    assert!(chain.endpoints().contains_key("inbox"));
    assert_eq!(
        conn.lookup(&test_handle("@alice")).await.unwrap().sigchain,
        Some(head),
        "the profile carries the head"
    );
}

#[tokio::test]
async fn offline_delivery_exactly_once() {
    let stack = CalloutStack::start().await;
    let server_js = jetstream::new(stack.server_client().await);
    let alice = User::register(&stack, "alice").await;
    let bob = User::register(&stack, "bob").await;
    bob.start_sigchain().await;

    // alice looks bob up, pins his key, and sends while bob is offline.
    let alice_conn = alice.connect().await;
    let alice_store = alice.home.store().unwrap();
    let verified = alice_conn
        .verify_contact(&alice_store, &test_handle("@bob"))
        .await
        .unwrap();
    assert_eq!(verified.change, PinChange::New);
    let profile = verified.contact;
    assert_eq!(profile.key, bob.key.public_key());
    assert_eq!(profile.current_key, profile.key);
    let mut sent = Vec::new();
    for text in ["one", "two", "three"] {
        let message = alice_conn
            .send(&profile, "text", text.as_bytes())
            .await
            .expect("the stream stores it");
        assert!(
            alice_store
                .record_outgoing(&message, kez_client::now())
                .unwrap()
        );
        sent.push(message);
    }
    let alice_history = alice_store.history(&profile.key).unwrap();
    assert_eq!(alice_history.len(), 3);
    assert!(
        alice_history
            .iter()
            .all(|m| m.direction == Direction::Outgoing)
    );
    // What the broker stores: to be replayed below.
    let first_envelope = server_js
        .get_stream(MAIL_STREAM)
        .await
        .unwrap()
        .get_raw_message(sent[0].stream_sequence)
        .await
        .unwrap()
        .payload;

    // A lying server hands alice another key for bob, with a chain that verifies: the pinned
    // key wins.
    let impostor = SecretKey::generate();
    let impostor_chain = VerifiedChain::verify(&[UnsignedLink::first(
        impostor.public_key(),
        kez_client::now(),
        Op::AddEndpoint(Endpoint {
            name: "inbox".into(),
            kind: "nats".into(),
            address: "kez.inbox.x".into(),
        }),
    )
    .sign(&impostor)
    .unwrap()
    .bytes()])
    .unwrap();
    match alice_store.pin(&profile.handle, &impostor_chain, kez_client::now()) {
        Err(StoreError::Refused {
            refusal: PinRefusal::KeyChanged { pinned, offered },
            ..
        }) => {
            assert_eq!((pinned, offered), (profile.key, impostor.public_key()));
        }
        other => panic!("a changed key was accepted: {other:?}"),
    }

    // bob comes online: exactly the three, decrypted and verified, in order. Asked for two,
    // he gets two, stored but not acknowledged: that is his next fetch, naming what he stored.
    let bob_conn = bob.connect().await;
    let bob_store = bob.home.store().unwrap();
    let mut received = bob_conn
        .receive(&bob_store, 2, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(bodies(&received), [&b"one"[..], b"two"]);
    assert_eq!(held(&server_js, &bob.key).await, 3);
    // A receive fetches until a fetch brings nothing new, so what it returns is acknowledged.
    received.extend(
        bob_conn
            .receive(&bob_store, 10, Duration::ZERO)
            .await
            .unwrap(),
    );
    assert_eq!(bodies(&received), [&b"one"[..], b"two", b"three"]);
    for (message, sent) in received.iter().zip(&sent) {
        assert_eq!(message.id, sent.id);
        assert_eq!(message.from, alice.key.public_key());
        assert_eq!(message.to, bob.key.public_key());
        assert_eq!(message.content_type, "text");
    }
    assert_eq!(held(&server_js, &bob.key).await, 0, "acknowledged, deleted");
    assert!(
        bob_conn
            .receive(&bob_store, 10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty(),
        "nothing new the second time"
    );

    // A replay of the same envelope bytes (no Nats-Msg-Id, so the stream stores it): dropped.
    let bob_inbox = inbox_subject(&bob.key.public_key(), &bob.key.public_key());
    server_js
        .publish(bob_inbox.clone(), first_envelope)
        .await
        .unwrap()
        .await
        .unwrap();
    // Garbage, and a genuine message for someone else, in bob's inbox: dropped too.
    server_js
        .publish(bob_inbox.clone(), Bytes::from_static(b"garbage"))
        .await
        .unwrap()
        .await
        .unwrap();
    let carol = SecretKey::generate().public_key();
    let (_, for_carol) =
        envelope::seal(&alice.key, &carol, "text", b"hi carol", kez_client::now()).unwrap();
    server_js
        .publish(bob_inbox.clone(), for_carol.into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(held(&server_js, &bob.key).await, 3);
    assert!(
        bob_conn
            .receive(&bob_store, 10, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty(),
        "replay, garbage and a message for carol are all dropped"
    );
    // Passed over and acknowledged, not retried: nothing is left behind, and none comes back.
    assert_eq!(held(&server_js, &bob.key).await, 0, "nothing left behind");
    assert!(
        bob_conn
            .receive(&bob_store, 10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );

    // bob keeps working.
    alice_conn.send(&profile, "text", b"four").await.unwrap();
    let received = bob_conn
        .receive(&bob_store, 10, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(bodies(&received), [b"four"]);
    // A user costs the broker key-value entries only: the inbox stream has no consumers.
    assert_eq!(mail_state(&server_js).await.consumer_count, 0);

    // The store survives reopening: history and seen ids persist.
    drop(bob_store);
    let bob_store = bob.home.store().unwrap();
    let history = bob_store.history(&alice.key.public_key()).unwrap();
    let texts: Vec<&[u8]> = history.iter().map(|m| m.body.as_slice()).collect();
    assert_eq!(texts, [&b"one"[..], b"two", b"three", b"four"]);
    assert!(history.iter().all(|m| m.direction == Direction::Incoming));
    assert!(bob_store.is_seen(&sent[0].id).unwrap());
    assert!(
        !bob_store
            .record_incoming(&received[0], kez_client::now())
            .unwrap(),
        "a seen id stays seen after reopening"
    );
}

/// A receive that waits for mail wakes when a message arrives (the stream's new-mail
/// notification on bob's own subject), not when its wait runs out.
#[tokio::test]
async fn a_waiting_receive_wakes_when_mail_arrives() {
    let stack = CalloutStack::start().await;
    let server_js = jetstream::new(stack.server_client().await);
    let alice = User::register(&stack, "alice").await;
    let bob = User::register(&stack, "bob").await;
    bob.start_sigchain().await;
    let alice_conn = alice.connect().await;
    let alice_store = alice.home.store().unwrap();
    let to_bob = alice_conn
        .verify_contact(&alice_store, &test_handle("@bob"))
        .await
        .unwrap()
        .contact;
    let bob_conn = bob.connect().await;
    let bob_store = bob.home.store().unwrap();

    for text in ["first", "second"] {
        let sending = tokio::spawn({
            let (alice_conn, to_bob) = (alice_conn.clone(), to_bob.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                alice_conn.send(&to_bob, "text", text.as_bytes()).await
            }
        });
        let started = Instant::now();
        let received = bob_conn
            .receive(&bob_store, 10, Duration::from_secs(30))
            .await
            .unwrap();
        let took = started.elapsed();
        sending.await.unwrap().unwrap();
        assert_eq!(bodies(&received), [text.as_bytes()]);
        assert!(
            took < Duration::from_secs(10),
            "the receive slept through the notification: {took:?}"
        );
    }
    assert_eq!(held(&server_js, &bob.key).await, 0, "both acknowledged");
}

/// One connection each for alice and bob, kept across a broker restart (same port and store):
/// both reconnect by themselves (re-authenticating through the callout), and a message sent
/// after the restart arrives, as does one sent before it.
#[tokio::test]
async fn connections_survive_a_broker_restart() {
    let mut stack = CalloutStack::start().await;
    let alice = User::register(&stack, "alice").await;
    let bob = User::register(&stack, "bob").await;
    bob.start_sigchain().await;
    let alice_conn = alice.connect().await;
    let alice_store = alice.home.store().unwrap();
    let bob_conn = bob.connect().await;
    let bob_store = bob.home.store().unwrap();
    let to_bob = alice_conn
        .verify_contact(&alice_store, &test_handle("@bob"))
        .await
        .unwrap()
        .contact;
    alice_conn
        .send(&to_bob, "text", b"before the restart")
        .await
        .unwrap();

    stack.nats.restart();

    // The first attempts may fail while the clients reconnect; the same connections must
    // recover within the deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match alice_conn.send(&to_bob, "text", b"after the restart").await {
            Ok(_) => break,
            Err(err) => {
                assert!(Instant::now() < deadline, "alice never recovered: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let mut received = Vec::new();
    while received.len() < 2 {
        match bob_conn
            .receive(&bob_store, 10, Duration::from_secs(1))
            .await
        {
            Ok(messages) => received.extend(messages),
            Err(err) => assert!(Instant::now() < deadline, "bob never recovered: {err}"),
        }
        assert!(Instant::now() < deadline, "got only {received:?}");
    }
    assert_eq!(
        bodies(&received),
        [&b"before the restart"[..], b"after the restart"]
    );
}

/// Whatever a broker (or someone on the path of a plain connection) sends as its nonce, the
/// client signs only a nats-server nonce, and only under the KEZ connect tag: a nonce that is
/// a KEZ statement in disguise is refused, and no signature leaves the client.
#[tokio::test]
async fn a_client_signs_only_nats_server_nonces_and_only_under_the_connect_tag() {
    use kez_core::connect::{LegacyProofs, ProofForm, verify_proof};
    use kez_tests::fake_broker::{AfterPong, FakeBroker};

    let key = Arc::new(SecretKey::generate());
    // A rotation of the victim's chain to the attacker's key, as a broker would offer it for
    // signing: the sigchain tag, a zero byte and the link's canonical bytes.
    let attacker = SecretKey::generate();
    let forged = UnsignedLink::first(key.public_key(), 100, nats_endpoint("x"))
        .sign_rotation(&key, &attacker)
        .unwrap();
    let mut disguised = String::from("KEZ-SIGCHAIN-LINK-V1\0");
    disguised.push_str(std::str::from_utf8(forged.bytes()).unwrap());
    for nonce in [
        disguised,
        "a".repeat(65),
        "abc def".to_owned(),
        "abc=".to_owned(),
    ] {
        let broker = FakeBroker::start(&nonce, &[], AfterPong::Stay).await;
        let err = Connection::connect(&broker.url(), key.clone())
            .await
            .expect_err("a nonce no nats-server sends is not signed");
        assert!(
            matches!(&err, ClientError::Connect { source, .. }
                if source.kind() == async_nats::ConnectErrorKind::Authentication),
            "{err}"
        );
        assert!(
            broker
                .connects()
                .iter()
                .all(|connect| connect.get("sig").is_none()),
            "a signature left the client for {nonce:?}: {:?}",
            broker.connects()
        );
    }

    // A real nonce is signed, under the connect tag: the signature proves the key to the
    // callout and is nothing else.
    let nonce = "pQ1rX_-9aZk0Lm3";
    let broker = FakeBroker::start(nonce, &[], AfterPong::Stay).await;
    let conn = Connection::connect(&broker.url(), key.clone())
        .await
        .expect("a nats-server nonce is signed");
    let connect = broker.connects().pop().expect("the client sent CONNECT");
    assert_eq!(connect["nkey"], key.public_key().to_nkey());
    let sig: [u8; 64] = data_encoding::BASE64URL_NOPAD
        .decode(connect["sig"].as_str().unwrap().as_bytes())
        .unwrap()
        .try_into()
        .unwrap();
    let sig = kez_core::Signature::from_bytes(sig);
    assert_eq!(
        verify_proof(&key.public_key(), nonce, &sig, LegacyProofs::Refuse),
        Ok(ProofForm::Tagged)
    );
    for domain in kez_core::SignatureDomain::ALL {
        if domain != kez_core::SignatureDomain::NatsConnect {
            assert!(
                key.public_key()
                    .verify(domain, nonce.as_bytes(), &sig)
                    .is_err()
            );
        }
    }
    drop(conn);
}

/// A broker's INFO may advertise other servers (`connect_urls`); a kez client connects only
/// to the URLs its user gave, so a broker (or someone on the path) cannot send it elsewhere.
#[tokio::test]
async fn servers_a_broker_advertises_are_never_dialled() {
    use kez_tests::fake_broker::{AfterPong, FakeBroker};

    let elsewhere = FakeBroker::start("pQ1rX_-9aZk0Lm3", &[], AfterPong::Stay).await;
    let advertised = elsewhere.url().trim_start_matches("nats://").to_owned();
    // The first broker hangs up after every PONG, so the client keeps reconnecting.
    let broker = FakeBroker::start("pQ1rX_-9aZk0Lm3", &[advertised], AfterPong::Hang).await;
    let key = Arc::new(SecretKey::generate());
    let conn = Connection::connect(&broker.url(), key).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while broker.accepted() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        broker.accepted() >= 4,
        "the client reconnected to the broker it was given ({} connections)",
        broker.accepted()
    );
    assert_eq!(
        elsewhere.accepted(),
        0,
        "the client dialled a server only the broker named"
    );
    drop(conn);
}

/// A lying home server answers a lookup for @bob with another spelling of the handle and its
/// own key. The client checks the answer against what it asked and pins under the handle it
/// asked for, so it sees the changed key and refuses, instead of pinning a "new" contact that
/// `send @bob` would then seal to. The test plays the home server on a real nats-server.
#[tokio::test]
async fn a_lookup_answer_cannot_choose_the_handle_a_pin_is_checked_under() {
    use std::sync::atomic::{AtomicU8, Ordering};

    use futures::StreamExt;
    use kez_client::Store;

    let nats = kez_tests::NatsServer::start();
    let bob = SecretKey::generate();
    let mallory = SecretKey::generate();
    let first_link = |key: &SecretKey| {
        UnsignedLink::first(key.public_key(), 100, nats_endpoint("nats"))
            .sign(key)
            .unwrap()
    };
    let (bob_link, mallory_link) = (first_link(&bob), first_link(&mallory));
    // 0: the truth; 1: "@Bob@kez.test" with mallory's key; 2: "@carol@kez.test".
    let answer = Arc::new(AtomicU8::new(0));
    let server = async_nats::connect(nats.url()).await.unwrap();
    let mut lookups = server.subscribe("kez.registry.lookup").await.unwrap();
    let mut gets = server.subscribe("kez.sigchain.get").await.unwrap();
    {
        let (server, answer) = (server.clone(), answer.clone());
        let (bob_key, mallory_key) = (bob.public_key(), mallory.public_key());
        let (bob_head, mallory_head) = (bob_link.hash(), mallory_link.hash());
        tokio::spawn(async move {
            while let Some(request) = lookups.next().await {
                let (handle, key, head) = match answer.load(Ordering::SeqCst) {
                    0 => ("@bob@kez.test", bob_key, bob_head),
                    1 => ("@Bob@kez.test", mallory_key, mallory_head),
                    _ => ("@carol@kez.test", mallory_key, mallory_head),
                };
                let body = serde_json::json!({
                    "handle": handle, "key": key, "registered_at": 1,
                    "sigchain": { "seq": 1, "head": head },
                });
                let reply = request.reply.unwrap();
                server
                    .publish(reply, body.to_string().into())
                    .await
                    .unwrap();
            }
        });
    }
    {
        let server = server.clone();
        let links = [
            (bob.public_key(), bob_link.bytes().to_vec()),
            (mallory.public_key(), mallory_link.bytes().to_vec()),
        ];
        tokio::spawn(async move {
            while let Some(request) = gets.next().await {
                let asked: serde_json::Value = serde_json::from_slice(&request.payload).unwrap();
                let (key, link) = links
                    .iter()
                    .find(|(key, _)| asked["key"] == key.to_string())
                    .unwrap();
                let body = serde_json::json!({
                    "key": key, "from_seq": 1,
                    "links": [String::from_utf8(link.clone()).unwrap()], "more": false,
                });
                let reply = request.reply.unwrap();
                server
                    .publish(reply, body.to_string().into())
                    .await
                    .unwrap();
            }
        });
    }
    answer_server_info(&server, None).await;
    server.flush().await.unwrap();

    let dir = TempDir::new().unwrap();
    let store = Store::open(dir.path().join("store.redb")).unwrap();
    let alice = Connection::connect(&nats.url(), Arc::new(SecretKey::generate()))
        .await
        .unwrap();
    let bob_handle = test_handle("@bob");
    let pinned = alice.verify_contact(&store, &bob_handle).await.unwrap();
    assert_eq!(pinned.change, PinChange::New);
    assert_eq!(pinned.contact.key, bob.public_key());

    answer.store(1, Ordering::SeqCst);
    match alice.verify_contact(&store, &bob_handle).await {
        Err(ClientError::Store(StoreError::Refused {
            refusal: PinRefusal::KeyChanged { offered, .. },
            ..
        })) => {
            assert_eq!(offered, mallory.public_key());
        }
        other => panic!("a changed key under another spelling was not refused: {other:?}"),
    }
    let err = alice
        .accept_key_change(&store, &bob_handle, &bob.public_key())
        .await
        .expect_err("the server names mallory's key, not the one accepted");
    assert!(matches!(err, ClientError::NotAccepted { .. }), "{err}");

    answer.store(2, Ordering::SeqCst);
    let err = alice
        .verify_contact(&store, &bob_handle)
        .await
        .expect_err("an answer about another handle");
    assert!(
        matches!(&err, ClientError::BadAnswer { reason, .. } if reason.contains("@carol@kez.test")),
        "{err}"
    );

    let contacts = store.contacts().unwrap();
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(contacts[0].handle, "@bob@kez.test");
    assert_eq!(contacts[0].key, bob.public_key());
}

/// A file that keeps growing while it is shared (a log being written) is read only up to the
/// size it had when the share began, the share is refused as changed, and nothing of it stays
/// in the blob store: no tag, no blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_growing_while_shared_is_read_to_its_size_and_leaves_nothing() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

    const SIZE: u64 = 8 << 20;
    const MOST_APPENDED: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let node = kez_blobs::BlobNode::open(&dir.path().join("node"), Default::default())
        .await
        .unwrap();
    let path = dir.path().join("growing.log");
    std::fs::write(&path, vec![7u8; SIZE as usize]).unwrap();
    let (reading, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let writer = std::thread::spawn({
        let (path, reading, stop) = (path.clone(), reading.clone(), stop.clone());
        move || {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            // From the moment the share has opened the file and read from it.
            while !reading.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut appended = 0;
            while !stop.load(Ordering::SeqCst) && appended < MOST_APPENDED {
                file.write_all(&[1u8; 1 << 16]).unwrap();
                appended += 1 << 16;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    let mut read = 0;
    let shared = kez_client::files::share_file(
        &node,
        &path,
        "share/growing",
        vec![node.provider()],
        |so_far| {
            reading.store(true, Ordering::SeqCst);
            read = read.max(so_far);
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    assert!(
        matches!(shared, Err(kez_client::files::FileError::Changed { .. })),
        "a growing file was shared: {shared:?}"
    );
    assert!(read <= SIZE, "read {read} bytes of a file that had {SIZE}");
    assert!(node.tags().await.unwrap().is_empty());
    let usage = node.usage().await.unwrap();
    assert_eq!((usage.complete_blobs, usage.partial_blobs), (0, 0));
    node.shutdown().await.unwrap();
}

/// Answers `kez.server.info` on `server` (a stand-in for the home server) as a server of
/// `kez.test`, federating with `federation` as its server key when given: the client asks it
/// once per connection, before it chooses where a contact's requests and mail go.
async fn answer_server_info(server: &async_nats::Client, federation: Option<kez_core::PublicKey>) {
    use futures::StreamExt;
    let mut infos = server
        .subscribe(kez_proto::Endpoint::Info.subject())
        .await
        .unwrap();
    let server = server.clone();
    tokio::spawn(async move {
        let mut info = serde_json::json!({
            "domain": kez_tests::kez_server::TEST_DOMAIN,
            "version": "test",
            "limits": {
                "max_request_bytes": 16384,
                "max_link_bytes": 16384,
                "max_chain_page_bytes": 65536,
                "registration_window_secs": 300,
            },
        });
        if let Some(key) = federation {
            info["federation"] = serde_json::json!({ "key": key });
        }
        while let Some(request) = infos.next().await {
            let reply = request.reply.unwrap();
            server
                .publish(reply, info.to_string().into())
                .await
                .unwrap();
        }
    });
}

/// The headers of a 503 `unavailable` answer (PROTOCOL.md §5.1), naming a pause in
/// milliseconds when `pause_ms` is given.
fn unavailable(pause_ms: Option<&str>) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Service-Error-Code", "503");
    headers.insert("Kez-Error", "unavailable");
    headers.insert(
        "Nats-Service-Error",
        "storage is unavailable; retry shortly",
    );
    if let Some(pause_ms) = pause_ms {
        headers.insert("Kez-Retry-After-Ms", pause_ms);
    }
    headers
}

/// A server that answers 503 `unavailable` with `Kez-Retry-After-Ms` (a cluster electing a
/// stream's leader) is asked the same again after that pause, and the call succeeds once it
/// answers; a 503 that names no pause is the caller's at once.
#[tokio::test]
async fn an_unavailable_server_that_names_a_pause_is_asked_again() {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let nats = kez_tests::NatsServer::start();
    let server = async_nats::connect(nats.url()).await.unwrap();
    let mut heads = server.subscribe("kez.sigchain.head").await.unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let bob = SecretKey::generate();
    let link = UnsignedLink::first(bob.public_key(), 100, nats_endpoint("nats"))
        .sign(&bob)
        .unwrap();
    {
        let (server, asked) = (server.clone(), asked.clone());
        let (key, head) = (bob.public_key(), link.hash());
        tokio::spawn(async move {
            while let Some(request) = heads.next().await {
                let reply = request.reply.unwrap();
                let attempt = asked.fetch_add(1, Ordering::SeqCst);
                let pause = match attempt {
                    // The first two: unavailable, with a pause; then the answer.
                    0 | 1 => Some("200"),
                    2 => {
                        let body = serde_json::json!({ "key": key, "seq": 1, "head": head });
                        server
                            .publish(reply, body.to_string().into())
                            .await
                            .unwrap();
                        continue;
                    }
                    // Later: unavailable without a pause.
                    _ => None,
                };
                let headers = unavailable(pause);
                server
                    .publish_with_headers(reply, headers, bytes::Bytes::new())
                    .await
                    .unwrap();
            }
        });
    }
    server.flush().await.unwrap();
    let alice = Connection::connect(&nats.url(), Arc::new(SecretKey::generate()))
        .await
        .unwrap();
    let started = Instant::now();
    let head = alice.head(&bob.public_key()).await.unwrap();
    assert_eq!((head.seq, head.head), (1, link.hash()));
    assert_eq!(asked.load(Ordering::SeqCst), 3);
    assert!(started.elapsed() >= Duration::from_millis(400));

    match alice.head(&bob.public_key()).await {
        Err(ClientError::Service(err)) => {
            assert_eq!((err.answer.code, err.answer.retry_after_ms), (503, None));
        }
        other => panic!("a 503 without a pause is the caller's: {other:?}"),
    }
    assert_eq!(asked.load(Ordering::SeqCst), 4);
}

/// `kez.mail.send` answered `duplicate: true`: after the client's own repeat (the first attempt
/// met a 503 that named a pause, and was stored after all) the message is sent; to a request
/// sent once, it is someone else's message with that id, and a failure.
#[tokio::test]
async fn a_duplicate_answer_to_a_repeated_send_is_a_delivery() {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let nats = kez_tests::NatsServer::start();
    let server = async_nats::connect(nats.url()).await.unwrap();
    let mut sends = server
        .subscribe(kez_proto::Endpoint::MailSend.subject())
        .await
        .unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    {
        let (server, asked) = (server.clone(), asked.clone());
        tokio::spawn(async move {
            while let Some(request) = sends.next().await {
                let reply = request.reply.unwrap();
                let answer = match asked.fetch_add(1, Ordering::SeqCst) {
                    // First send: unavailable, with a pause; its repeat: already stored.
                    0 => None,
                    1 => Some(r#"{"seq":7,"duplicate":true}"#),
                    // Second send, once: a duplicate of a message that is not ours.
                    _ => Some(r#"{"seq":8,"duplicate":true}"#),
                };
                match answer {
                    Some(body) => server.publish(reply, body.into()).await.unwrap(),
                    None => server
                        .publish_with_headers(reply, unavailable(Some("100")), bytes::Bytes::new())
                        .await
                        .unwrap(),
                }
            }
        });
    }
    answer_server_info(&server, None).await;
    server.flush().await.unwrap();
    let alice = Connection::connect(&nats.url(), Arc::new(SecretKey::generate()))
        .await
        .unwrap();
    let bob = SecretKey::generate().public_key();
    let contact = kez_client::Contact {
        handle: "@bob@kez.test".into(),
        key: bob,
        current_key: bob,
        chain_seq: 1,
        chain_head: kez_core::sigchain::LinkHash::of(b"bob's first link"),
        added_at: 0,
        devices: Vec::new(),
        moved_from: Vec::new(),
        olm_keys: Default::default(),
    };
    let sent = alice.send(&contact, "text", b"hi").await.unwrap();
    assert_eq!(sent.stream_sequence, 7);
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    match alice.send(&contact, "text", b"hi again").await {
        Err(ClientError::Duplicate { .. }) => {}
        other => panic!("a duplicate of a request sent once was taken: {other:?}"),
    }
}

/// Through a home server that federates (a stand-in answering on the broker): mail for a
/// contact on another domain is handed to `kez.mail.relay` naming that domain, a fetch asks
/// for origins, a stranger's origin is remembered and its `whois` asked at that domain, and a
/// bounce counts only when the home server's key sealed it: it is recorded on the sent
/// message, while the same bounce from anyone else is an ordinary (unknown) message.
#[tokio::test]
async fn a_federating_home_server_relays_remote_mail_and_its_bounces_are_recorded() {
    use futures::StreamExt;
    use kez_proto::federation::{BOUNCE_CONTENT_TYPE, Bounce, RelayRequest};
    use kez_proto::mail::{FetchAnswer, Fetched};

    let nats = kez_tests::NatsServer::start();
    let server = async_nats::connect(nats.url()).await.unwrap();
    let server_key = SecretKey::generate();
    let alice = Arc::new(SecretKey::generate());
    let bob = SecretKey::generate();
    let carol = SecretKey::generate();
    answer_server_info(&server, Some(server_key.public_key())).await;

    // kez.mail.relay: the request, as the server got it.
    let (relayed_tx, mut relayed) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let mut relays = server
        .subscribe(kez_proto::Endpoint::MailRelay.subject())
        .await
        .unwrap();
    {
        let server = server.clone();
        tokio::spawn(async move {
            while let Some(request) = relays.next().await {
                relayed_tx.send(request.payload.clone()).unwrap();
                let reply = request.reply.unwrap();
                let body = r#"{"seq":41,"duplicate":false}"#;
                server.publish(reply, body.into()).await.unwrap();
            }
        });
    }
    // kez.registry.whois: the requests, and carol's profile on b.test.
    let (whois_tx, mut whoised) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let mut whoises = server
        .subscribe(kez_proto::Endpoint::Whois.subject())
        .await
        .unwrap();
    {
        let server = server.clone();
        let carol = carol.public_key();
        tokio::spawn(async move {
            while let Some(request) = whoises.next().await {
                whois_tx
                    .send(serde_json::from_slice(&request.payload).unwrap())
                    .unwrap();
                let profile = serde_json::json!({
                    "handle": "@carol@b.test", "key": carol,
                    "registered_at": 1, "sigchain": null,
                });
                let reply = request.reply.unwrap();
                server
                    .publish(reply, profile.to_string().into())
                    .await
                    .unwrap();
            }
        });
    }
    server.flush().await.unwrap();

    let dir = TempDir::new().unwrap();
    let store = kez_client::Store::open(dir.path().join("store.redb")).unwrap();
    let bob_chain = VerifiedChain::verify(&[UnsignedLink::first(
        bob.public_key(),
        100,
        Op::AddEndpoint(Endpoint {
            name: "bob".into(),
            kind: "nats".into(),
            address: "kez.inbox.bob".into(),
        }),
    )
    .sign(&bob)
    .unwrap()
    .bytes()
    .to_vec()])
    .unwrap();
    let (contact, _) = store
        .pin("@bob@b.test", &bob_chain, kez_client::now())
        .unwrap();
    let conn = Connection::connect(&nats.url(), alice.clone())
        .await
        .unwrap();
    let sent = conn.send(&contact, "text", b"hi bob").await.unwrap();
    store.record_outgoing(&sent, kez_client::now()).unwrap();
    let body = relayed.recv().await.unwrap();
    let request = RelayRequest::decode(&body).unwrap();
    assert_eq!(request.domain, "b.test");
    assert_eq!(
        (request.send.to, request.send.id),
        (bob.public_key(), sent.id)
    );
    assert_eq!(
        sent.stream_sequence, 0,
        "an outbox sequence is no inbox order"
    );

    // The inbox: the server's bounce of that message, the same bounce sealed by carol (who
    // is nobody's contact, on b.test), then nothing.
    let bounce = Bounce {
        id: sent.id.to_string(),
        to: bob.public_key(),
        domain: "b.test".into(),
        reason: "unknown_recipient".into(),
        message: "@bob@b.test does not exist".into(),
        queued_at: sent.time,
    };
    let json = serde_json::to_vec(&bounce).unwrap();
    let seal = |by: &SecretKey| {
        envelope::seal(
            by,
            &alice.public_key(),
            BOUNCE_CONTENT_TYPE,
            &json,
            sent.time + 1,
        )
        .unwrap()
    };
    let (_, real) = seal(&server_key);
    let (forged_id, forged) = seal(&carol);
    let (_, again) = seal(&server_key);
    let later = FetchAnswer::encode(
        0,
        &[Fetched {
            seq: 3,
            time: 1_002,
            envelope: &again,
            origin: None,
        }],
        true,
    );
    let bounce_later = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answer = FetchAnswer::encode(
        0,
        &[
            Fetched {
                seq: 1,
                time: 1_000,
                envelope: &real,
                origin: None,
            },
            Fetched {
                seq: 2,
                time: 1_001,
                envelope: &forged,
                origin: Some("b.test"),
            },
        ],
        true,
    );
    let mut fetches = server
        .subscribe(kez_proto::Endpoint::MailFetch.subject())
        .await
        .unwrap();
    {
        let server = server.clone();
        let bounce_later = bounce_later.clone();
        tokio::spawn(async move {
            while let Some(request) = fetches.next().await {
                let asked: serde_json::Value = serde_json::from_slice(&request.payload).unwrap();
                assert_eq!(asked["origins"], true, "{asked}");
                let body = match asked["after"].as_u64() {
                    Some(0) => answer.clone(),
                    Some(2) if bounce_later.load(std::sync::atomic::Ordering::SeqCst) => {
                        later.clone()
                    }
                    _ => FetchAnswer::encode(0, &[], true),
                };
                let reply = request.reply.unwrap();
                server.publish(reply, body.into()).await.unwrap();
            }
        });
    }
    server.flush().await.unwrap();
    let received = conn.receive(&store, 10, Duration::ZERO).await.unwrap();
    let ids: Vec<_> = received.iter().map(|message| message.id).collect();
    assert_eq!(ids, [forged_id], "the server's bounce is no message");
    assert_eq!(received[0].content_type, BOUNCE_CONTENT_TYPE);
    let asked = whoised.recv().await.unwrap();
    assert_eq!(
        (&asked["key"], &asked["domain"]),
        (
            &serde_json::json!(carol.public_key()),
            &serde_json::json!("b.test")
        )
    );
    assert_eq!(
        store.origin(&carol.public_key()).unwrap().as_deref(),
        Some("b.test")
    );
    let whois = conn
        .whois(&carol.public_key(), Some("b.test"))
        .await
        .unwrap();
    assert_eq!(whois.handle.to_string(), "@carol@b.test");

    let view = store.message(&contact.key, &sent.id).unwrap().unwrap();
    assert_eq!(view.undelivered.len(), 1);
    let undelivered = &view.undelivered[0];
    assert_eq!(
        (
            undelivered.device,
            undelivered.reason.as_str(),
            undelivered.message.as_str()
        ),
        (
            bob.public_key(),
            "unknown_recipient",
            "@bob@b.test does not exist"
        )
    );
    assert_eq!(store.unshown_undelivered().unwrap().len(), 1);
    assert!(store.history(&carol.public_key()).unwrap().len() == 1);

    // A fetch that brings only a bounce ends a waiting receive at once (a listener has a note
    // to show), though it returns no message; the same bounce again is noted once.
    bounce_later.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = Instant::now();
    let received = conn
        .receive(&store, 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(received.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(store.inbox_floor().unwrap().seq, 3);
    let view = store.message(&contact.key, &sent.id).unwrap().unwrap();
    assert_eq!(view.undelivered.len(), 1);
}

/// Lookups of the home server's own users read its directory (PROTOCOL.md §5.7) and answer
/// exactly what the services answer, current right after each append; a send checks its
/// contact with one lookup and fetches and verifies the chain again only when its head moved.
#[tokio::test]
async fn lookups_match_the_services_and_contacts_are_verified_again_only_when_their_chain_moves() {
    let stack = CalloutStack::start().await;
    let alice = User::register(&stack, "alice").await;
    let bob = User::register(&stack, "bob").await;
    let conn = alice.connect().await;
    assert!(conn.home_server().await.unwrap().directory);
    let bob_key = bob.key.public_key();
    let as_the_services_say = |conn: Connection| async move {
        let lookup: kez_client::Profile = serde_json::from_value(
            kez_tests::kez_server::call_ok(
                conn.nats(),
                "kez.registry.lookup",
                serde_json::json!({ "handle": "@bob" }),
            )
            .await,
        )
        .unwrap();
        let whois: kez_client::Profile = serde_json::from_value(
            kez_tests::kez_server::call_ok(
                conn.nats(),
                "kez.registry.whois",
                serde_json::json!({ "key": bob_key.to_string() }),
            )
            .await,
        )
        .unwrap();
        assert_eq!(lookup, whois);
        lookup
    };
    let lookup = conn.lookup(&test_handle("@bob")).await.unwrap();
    assert_eq!(lookup, as_the_services_say(conn.clone()).await);
    assert_eq!(lookup.sigchain, None);
    assert_eq!(conn.whois(&bob_key, None).await.unwrap(), lookup);

    bob.start_sigchain().await;
    let store = alice.home.store().unwrap();
    let bob_handle = test_handle("@bob");
    let check = || conn.check_contact(&store, &bob_handle);
    let first = match check().await.unwrap() {
        CheckedContact::Verified(verified) => *verified,
        other => panic!("a new contact is verified: {other:?}"),
    };
    assert_eq!(first.change, PinChange::New);
    for _ in 0..2 {
        match check().await.unwrap() {
            CheckedContact::Unchanged(contact) => assert_eq!(contact, first.contact),
            other => panic!("bob's chain did not move: {other:?}"),
        }
    }

    // bob appends: the very next lookup sees the new head, and the contact is verified again.
    let bob_conn = bob.connect().await;
    let next = bob_conn
        .chain(&bob_key)
        .await
        .unwrap()
        .next_link(kez_client::now(), nats_endpoint("second"))
        .sign(&bob.key)
        .unwrap();
    let head = bob_conn.append(next.bytes()).await.unwrap();
    let lookup = conn.lookup(&test_handle("@bob")).await.unwrap();
    assert_eq!(lookup.sigchain, Some(head));
    assert_eq!(lookup, as_the_services_say(conn.clone()).await);
    assert_eq!(conn.whois(&bob_key, None).await.unwrap(), lookup);
    assert_eq!(conn.head(&bob_key).await.unwrap(), head);
    match check().await.unwrap() {
        CheckedContact::Verified(verified) => {
            assert_eq!(verified.change, PinChange::Same);
            assert_eq!(verified.contact.chain_seq, 2);
            assert_eq!(verified.chain.head(), next.hash());
        }
        other => panic!("bob's chain moved: {other:?}"),
    }
    assert!(matches!(
        check().await.unwrap(),
        CheckedContact::Unchanged(contact) if contact.chain_seq == 2
    ));
}
