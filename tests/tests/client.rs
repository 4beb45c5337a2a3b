//! The client library (kez-client) against a real nats-server with the auth callout and a real
//! kez-chat-server: registration, the typed service calls, offline delivery through the inbox
//! stream, and what the receiving client drops (replays, garbage, messages for others).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use kez_client::{
    ClientError, Config, Connection, Direction, Home, PinChange, StoreError, VerifiedChain,
};
use kez_core::envelope;
use kez_core::sigchain::Endpoint;
use kez_core::subjects::{INBOX_STREAM, inbox_subject};
use kez_core::{Op, SecretKey, UnsignedLink};
use kez_tests::callout::CalloutStack;
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
            handle: Some(record.handle.clone()),
            iroh_bind: None,
            iroh_relay: None,
        })
        .unwrap();
        User {
            home,
            key,
            handle: record.handle,
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

/// How many messages the inbox stream holds, read as the server.
async fn stored_in_inbox(js: &jetstream::Context) -> u64 {
    js.get_stream(INBOX_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// Waits until the inbox stream is empty (everything acknowledged).
async fn wait_until_inbox_empty(js: &jetstream::Context) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while stored_in_inbox(js).await != 0 {
        assert!(Instant::now() < deadline, "the inbox was not acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
                (err.code, err.name.as_str()),
                (409, "handle_taken"),
                "{err}"
            );
        }
        other => panic!("registering a taken handle: {other:?}"),
    }

    let conn = alice.connect().await;
    let info = conn.server_info().await.unwrap();
    assert_eq!(info.domain, "kez.test");
    let profile = conn.lookup("@bob").await.unwrap();
    assert_eq!(profile.key, bob.key.public_key());
    assert_eq!(profile.handle, bob.handle);
    assert_eq!(profile.sigchain, None);
    let whois = conn.whois(&bob.key.public_key()).await.unwrap();
    assert_eq!(whois.handle, bob.handle);
    match conn.lookup("@nobody").await {
        Err(ClientError::Service(err)) => assert_eq!(err.name, "not_found"),
        other => panic!("looking up nobody: {other:?}"),
    }
    match conn.chain(&bob.key.public_key()).await {
        Err(ClientError::Service(err)) => assert_eq!(err.code, 404),
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
        conn.lookup("@alice").await.unwrap().sigchain,
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
        .verify_contact(&alice_store, "@bob")
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
        .get_stream(INBOX_STREAM)
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
        Err(StoreError::KeyChanged {
            pinned, offered, ..
        }) => {
            assert_eq!((pinned, offered), (profile.key, impostor.public_key()));
        }
        other => panic!("a changed key was accepted: {other:?}"),
    }

    // bob comes online: exactly the three, decrypted and verified, in order.
    let bob_conn = bob.connect().await;
    let bob_store = bob.home.store().unwrap();
    let received = bob_conn
        .receive(&bob_store, 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(bodies(&received), [&b"one"[..], b"two", b"three"]);
    for (message, sent) in received.iter().zip(&sent) {
        assert_eq!(message.id, sent.id);
        assert_eq!(message.from, alice.key.public_key());
        assert_eq!(message.to, bob.key.public_key());
        assert_eq!(message.content_type, "text");
    }
    wait_until_inbox_empty(&server_js).await;
    assert!(
        bob_conn
            .receive(&bob_store, 10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty(),
        "nothing new the second time"
    );

    // A replay of the same envelope bytes (no Nats-Msg-Id, so the stream stores it): dropped.
    let bob_inbox = inbox_subject(&bob.key.public_key());
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
    assert_eq!(stored_in_inbox(&server_js).await, 3);
    assert!(
        bob_conn
            .receive(&bob_store, 10, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty(),
        "replay, garbage and a message for carol are all dropped"
    );
    wait_until_inbox_empty(&server_js).await;

    // bob keeps working.
    alice_conn.send(&profile, "text", b"four").await.unwrap();
    let received = bob_conn
        .receive(&bob_store, 10, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(bodies(&received), [b"four"]);

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
        .verify_contact(&alice_store, "@bob")
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
