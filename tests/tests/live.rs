//! Live notices (typing, presence; PROTOCOL.md §8.6 "Live notices") on the kez-client library,
//! against a real nats-server with the auth callout: alice's typing notice reaches both of
//! bob's running devices; a stranger's notice, a forged or misdirected envelope, a stale or
//! future one, a replay and a non-ephemeral content type are dropped; and nothing lands in
//! JetStream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::{Stream, StreamExt, TryStreamExt};
use kez_client::{Connection, LIVE_WINDOW_SECS, LiveError, LiveNotice, Store};
use kez_core::chat::{ChatContent, Presence, PresenceState, Receipt, ReceiptKind, Typing};
use kez_core::envelope::{self, MessageId};
use kez_core::sigchain::DeviceKind;
use kez_core::{PublicKey, SecretKey};
use kez_proto::subjects::{MAIL_STREAM, live_subject};
use kez_tests::callout::CalloutStack;
use kez_tests::chat::ChatUser;
use kez_tests::kez_server::test_handle;

/// How long a step may take before the test fails (each takes milliseconds).
const PATIENCE: Duration = Duration::from_secs(10);

/// How long a notice gets to arrive.
const ARRIVES_WITHIN: Duration = Duration::from_secs(5);

type Notices<'a> = Pin<Box<dyn Stream<Item = LiveNotice> + 'a>>;

/// The next notice of `stream`; fails the test if none comes in time.
async fn next(stream: &mut Notices<'_>, who: &str) -> LiveNotice {
    tokio::time::timeout(ARRIVES_WITHIN, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{who} got no notice"))
        .expect("the stream goes on")
}

/// Connects `key` as a device of `identity`, retrying while the broker's callout catches up.
async fn connect_device(url: &str, key: &Arc<SecretKey>, identity: PublicKey) -> Connection {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match Connection::connect(url, key.clone()).await {
            Ok(conn) => return conn.as_device_of(identity),
            Err(err) => assert!(
                Instant::now() < deadline,
                "the device cannot connect: {err}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn typing(typing: bool) -> ChatContent {
    ChatContent::Typing(Typing { typing })
}

fn presence(state: PresenceState) -> ChatContent {
    ChatContent::Presence(Presence { state })
}

#[tokio::test]
async fn typing_reaches_every_device_and_nothing_else_gets_through() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let alice = ChatUser::register(&url, "alice", PATIENCE).await;
    let bob = ChatUser::register(&url, "bob", PATIENCE).await;
    let carol = ChatUser::register(&url, "carol", PATIENCE).await;
    let bob_id = bob.key.public_key();

    // bob's second running device, "desk", added by his chain, with a store of its own.
    let laptop = bob.connect(&url, PATIENCE).await;
    let desk_key = Arc::new(SecretKey::generate());
    let chain = laptop.chain(&bob_id).await.unwrap();
    let add = chain
        .add_device_link(
            kez_client::now(),
            &bob.key,
            &desk_key,
            "desk",
            DeviceKind::Desktop,
        )
        .unwrap();
    laptop.append(add.bytes()).await.unwrap();
    let desk = connect_device(&url, &desk_key, bob_id).await;
    let desk_dir = tempfile::tempdir().unwrap();
    let desk_store = Store::open(desk_dir.path().join("store.redb")).unwrap();

    // Both of bob's devices pin alice; alice pins bob with both devices; carol pins bob, but
    // bob does not know carol.
    bob.add(&laptop, "alice", PATIENCE).await;
    desk.verify_contact(&desk_store, &test_handle("alice"))
        .await
        .unwrap();
    let alice_conn = alice.connect(&url, PATIENCE).await;
    let bob_for_alice = alice.add(&alice_conn, "bob", PATIENCE).await;
    assert_eq!(bob_for_alice.recipient_keys().len(), 2, "bob's two devices");
    let carol_conn = carol.connect(&url, PATIENCE).await;
    let bob_for_carol = carol.add(&carol_conn, "bob", PATIENCE).await;

    let mut on_laptop: Notices<'_> = Box::pin(laptop.live_notices(&bob.store).await.unwrap());
    let mut on_desk: Notices<'_> = Box::pin(desk.live_notices(&desk_store).await.unwrap());

    // alice types: both of bob's devices hear it, from alice.
    alice_conn
        .send_live(&bob_for_alice, &typing(true))
        .await
        .unwrap();
    let heard = [
        next(&mut on_laptop, "laptop").await,
        next(&mut on_desk, "desk").await,
    ];
    for notice in &heard {
        assert_eq!(notice.handle, "@alice@kez.test");
        assert_eq!(notice.identity, alice.key.public_key());
        assert_eq!(notice.device, alice.key.public_key());
        assert_eq!(notice.content, typing(true));
        assert!(notice.time.abs_diff(kez_client::now()) <= 2);
    }
    assert_eq!(heard[0].id, heard[1].id, "one notice, one id");

    // Only ephemeral content types are sent live.
    let receipt = ChatContent::Receipt(Receipt {
        ids: [MessageId::random()].into(),
        kind: ReceiptKind::Read,
    });
    assert!(matches!(
        alice_conn.send_live(&bob_for_alice, &receipt).await,
        Err(LiveError::NotEphemeral("kez.receipt"))
    ));

    // What must be dropped, each followed by nothing; then one good marker per device proves
    // the drops happened (a connection's messages arrive in order, and a round trip orders
    // carol's before alice's).
    carol_conn
        .send_live(&bob_for_carol, &typing(true))
        .await
        .unwrap();
    // A round trip on carol's connection: the broker has handled her notice once it answers.
    carol_conn.server_info().await.unwrap();
    let laptop_subject = live_subject(&bob_id, &bob_id);
    let desk_subject = live_subject(&bob_id, &desk_key.public_key());
    let raw = |subject: &str, bytes: Vec<u8>| {
        let nats = alice_conn.nats().clone();
        let subject = subject.to_owned();
        async move { nats.publish(subject, bytes.into()).await.unwrap() }
    };
    let sealed = |to: &PublicKey, content_type: &str, body: &[u8], time: u64| {
        envelope::seal(&alice.key, to, content_type, body, time)
            .unwrap()
            .1
    };
    let now = kez_client::now();
    let typing_body = typing(true).encode().unwrap();
    // Forged: garbage, and alice's envelope for the laptop sent to the desk (not for it).
    raw(&laptop_subject, b"not an envelope at all".to_vec()).await;
    raw(
        &desk_subject,
        sealed(&bob_id, "kez.typing", &typing_body, now),
    )
    .await;
    // Not ephemeral: a text and a receipt sealed by alice, published live.
    raw(&laptop_subject, sealed(&bob_id, "text", b"hello", now)).await;
    raw(
        &laptop_subject,
        sealed(&bob_id, "kez.receipt", &receipt.encode().unwrap(), now),
    )
    .await;
    // A malformed typing body.
    raw(
        &laptop_subject,
        sealed(&bob_id, "kez.typing", b"{\"typing\":1}", now),
    )
    .await;
    // Stale, and from the future.
    let window = LIVE_WINDOW_SECS;
    raw(
        &laptop_subject,
        sealed(&bob_id, "kez.typing", &typing_body, now - window - 5),
    )
    .await;
    raw(
        &laptop_subject,
        sealed(&bob_id, "kez.typing", &typing_body, now + window + 5),
    )
    .await;
    // A replay: the first notice the laptop took, sealed once more with the same id by a
    // sender who recorded it, is dropped; a fresh id is not.
    let replayed = envelope::seal_with_id(
        &alice.key,
        &bob_id,
        "kez.typing",
        &typing_body,
        heard[0].time,
        heard[0].id,
    )
    .unwrap();
    raw(&laptop_subject, replayed).await;

    alice_conn
        .send_live(&bob_for_alice, &presence(PresenceState::Away))
        .await
        .unwrap();
    for (stream, who) in [(&mut on_laptop, "laptop"), (&mut on_desk, "desk")] {
        let marker = next(stream, who).await;
        assert_eq!(
            marker.content,
            presence(PresenceState::Away),
            "{who}: everything before the marker was dropped"
        );
        assert_ne!(marker.id, heard[0].id);
    }

    // An identical envelope delivered twice (a replay on the wire) is taken once.
    let twice = sealed(&bob_id, "kez.typing", &typing(false).encode().unwrap(), now);
    raw(&laptop_subject, twice.clone()).await;
    raw(&laptop_subject, twice).await;
    alice_conn
        .send_live(&bob_for_alice, &presence(PresenceState::Offline))
        .await
        .unwrap();
    assert_eq!(next(&mut on_laptop, "laptop").await.content, typing(false));
    assert_eq!(
        next(&mut on_laptop, "laptop").await.content,
        presence(PresenceState::Offline),
        "the second copy was dropped"
    );

    // Nothing of it is stored: no stream of the server's account holds a live subject, the
    // inboxes are empty, and bob's stores have no history.
    let server = stack.server_client().await;
    let js = jetstream::new(server);
    let names: Vec<String> = js.stream_names().try_collect().await.unwrap();
    assert!(names.contains(&MAIL_STREAM.to_owned()), "{names:?}");
    for name in &names {
        let stream = js.get_stream(name).await.unwrap();
        let mut held = stream.info_with_subjects("kez.live.>").await.unwrap();
        assert!(
            held.try_next().await.unwrap().is_none(),
            "{name} holds a live notice"
        );
    }
    let mut mail = js.get_stream(MAIL_STREAM).await.unwrap();
    assert_eq!(mail.info().await.unwrap().state.messages, 0, "no mail");
    for store in [&bob.store, &desk_store] {
        assert!(store.conversations().unwrap().is_empty(), "nothing stored");
    }
}
