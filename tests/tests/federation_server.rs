//! Federation at the NATS level (PROTOCOL.md §14): two stacks on loopback, `a.localhost` and
//! `b.localhost`, each a nats-server with the auth callout and an in-process kez-chat-server
//! that federates, finding the other through its HTTP shim. A user of A looks a user of B up
//! and reads B's chain through A, relays a message that B's user fetches with its origin, and
//! hears of a message B refused through a bounce sealed with A's server key. A connection that
//! claims to be A's server with another key is refused (before and after A's key is pinned),
//! and so is a blocked domain, both ways.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use kez_core::envelope::MessageId;
use kez_core::{PublicKey, SecretKey, UnsignedLink};
use kez_proto::answer::{ChainPage, Delivered, HeadAnswer, Profile, ServerInfo};
use kez_proto::federation::{BOUNCE_CONTENT_TYPE, Bounce, RelayRequest, peer_connection_name};
use kez_proto::mail::{FetchAnswer, FetchRequest, SendRequest};
use kez_tests::callout::{CalloutStack, Violation, connect_as, expect_violation};
use kez_tests::federation::{Federation, Home, federation_of, reserve_port};
use kez_tests::kez_server::{ServiceError, call};
use kez_tests::requests::{nats_endpoint, now};
use serde_json::json;

const A: &str = "a.localhost";
const B: &str = "b.localhost";
/// How long a message may take through the outbox (and a bounce back).
const THROUGH_WITHIN: Duration = Duration::from_secs(15);

async fn json<T: serde::de::DeserializeOwned>(
    client: &Client,
    subject: &str,
    body: serde_json::Value,
) -> Result<T, ServiceError> {
    let answer = call(client, subject, serde_json::to_vec(&body).unwrap()).await?;
    Ok(serde_json::from_slice(&answer).unwrap_or_else(|err| panic!("{subject}: {err}")))
}

/// Relays `envelope` for `to` on `domain` under `id` through the caller's own server.
async fn relay(
    client: &Client,
    domain: &str,
    to: &PublicKey,
    id: &MessageId,
    envelope: &[u8],
) -> Result<Delivered, ServiceError> {
    let body = RelayRequest::encode(domain, &SendRequest::encode(to, id, envelope));
    let answer = call(client, "kez.mail.relay", body).await?;
    Ok(serde_json::from_slice(&answer).unwrap())
}

/// A fetched message, owned: sequence, origin, envelope.
type Fetched = (u64, Option<String>, Bytes);

/// Fetches the caller's inbox (with origins) until `count` messages after `after` are there.
async fn fetch_until(client: &Client, after: u64, time: u64, count: usize) -> Vec<Fetched> {
    let deadline = Instant::now() + THROUGH_WITHIN;
    loop {
        let request = FetchRequest {
            after,
            max: 16,
            time,
            origins: true,
        };
        let body = call(
            client,
            "kez.mail.fetch",
            serde_json::to_vec(&request).unwrap(),
        )
        .await
        .unwrap();
        let answer = FetchAnswer::decode(&body, true).unwrap();
        if answer.messages.len() >= count {
            return answer
                .messages
                .iter()
                .map(|message| {
                    (
                        message.seq,
                        message.origin.map(str::to_owned),
                        Bytes::copy_from_slice(message.envelope),
                    )
                })
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{count} messages did not arrive within {THROUGH_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The bounce sealed to `device` by `server` in `envelope`.
fn opened_bounce(device: &SecretKey, server: &PublicKey, envelope: &[u8]) -> Bounce {
    let opened = kez_core::envelope::open(device, envelope).expect("a bounce opens");
    assert_eq!(&opened.from, server, "sealed with the home server's key");
    assert_eq!(opened.content_type, BOUNCE_CONTENT_TYPE);
    serde_json::from_slice(&opened.body).expect("a bounce body")
}

async fn get_metrics(home: &Home) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(home.http).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn users_of_two_servers_look_each_other_up_and_exchange_mail() {
    let federation = Federation::start().await;
    let (a, b) = (federation.home(A), federation.home(B));
    let a_key = a.server_key();
    let (alice_key, alice) = a.registered("alice").await;
    let (bob_key, bob) = b.registered("bob").await;
    let link = UnsignedLink::first(bob_key.public_key(), now(), nats_endpoint("home"))
        .sign(&bob_key)
        .unwrap();
    call(&bob, "kez.sigchain.append", link.bytes().to_vec())
        .await
        .unwrap();

    // Before any contact: a key that is not A's, claiming A's name, fails the dialback.
    let impostor = Arc::new(SecretKey::generate());
    assert!(
        b.connect_as_peer(&impostor, A).await.is_err(),
        "an impostor of a.localhost is refused (dialback)"
    );

    // A's info names its server key; B's names B's.
    let info: ServerInfo = json(&alice, "kez.server.info", json!({})).await.unwrap();
    assert_eq!(info.federation.map(|f| f.key), Some(a_key.public_key()));

    // Reads through A, of B's user.
    let profile: Profile = json(
        &alice,
        "kez.registry.lookup",
        json!({"handle": "@bob@b.localhost"}),
    )
    .await
    .unwrap();
    assert_eq!(profile.handle.to_string(), "@bob@b.localhost");
    assert_eq!(profile.key, bob_key.public_key());
    let whois: Profile = json(
        &alice,
        "kez.registry.whois",
        json!({"key": bob_key.public_key(), "domain": B}),
    )
    .await
    .unwrap();
    assert_eq!(whois, profile);
    let head: HeadAnswer = json(
        &alice,
        "kez.sigchain.head",
        json!({"key": bob_key.public_key(), "domain": B}),
    )
    .await
    .unwrap();
    assert_eq!((head.key, head.seq), (bob_key.public_key(), 1));
    let page: ChainPage = json(
        &alice,
        "kez.sigchain.get",
        json!({"key": bob_key.public_key(), "domain": B}),
    )
    .await
    .unwrap();
    assert_eq!(
        page.links,
        [String::from_utf8(link.bytes().to_vec()).unwrap()]
    );
    assert!(!page.more);
    let missing = json::<Profile>(
        &alice,
        "kez.registry.lookup",
        json!({"handle": "@nobody@b.localhost"}),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (missing.code, missing.name.as_str()),
        (404, "not_found"),
        "B's refusal is relayed as it is"
    );

    // A message through A's outbox to B, fetched by bob with its origin.
    let (id, envelope) = kez_core::envelope::seal(
        &alice_key,
        &bob_key.public_key(),
        "text",
        b"hello from a",
        now(),
    )
    .unwrap();
    let queued = relay(&alice, B, &bob_key.public_key(), &id, &envelope)
        .await
        .unwrap();
    assert!(!queued.duplicate);
    let again = relay(&alice, B, &bob_key.public_key(), &id, &envelope)
        .await
        .unwrap();
    assert_eq!(
        (again.seq, again.duplicate),
        (queued.seq, true),
        "a relay repeated is taken once"
    );
    let fetched = fetch_until(&bob, 0, 0, 1).await;
    assert_eq!(fetched.len(), 1, "delivered once");
    assert_eq!(fetched[0].1.as_deref(), Some(A), "the origin is A");
    let opened = kez_core::envelope::open(&bob_key, &fetched[0].2).unwrap();
    assert_eq!(
        (opened.from, opened.body.as_slice()),
        (alice_key.public_key(), &b"hello from a"[..])
    );

    // A's key is pinned at B now: an impostor is refused by the pin, A's key gets the peer
    // profile, which does not reach kez.mail.relay.
    assert!(b.connect_as_peer(&impostor, A).await.is_err());
    let a_key = Arc::new(a_key);
    let (peer, mut peer_errors) = b
        .connect_as_peer(&a_key, A)
        .await
        .expect("A's own key connects as A");
    let b_info: ServerInfo = json(&peer, "kez.server.info", json!({})).await.unwrap();
    assert_eq!(b_info.domain, B);
    // A peer reads B's own users; it cannot make B reach out to a third domain, and neither
    // can a key without a handle on A.
    let bob_again: Profile = json(
        &peer,
        "kez.registry.lookup",
        json!({"handle": "@bob@b.localhost"}),
    )
    .await
    .unwrap();
    assert_eq!(bob_again.key, bob_key.public_key());
    let third = json::<Profile>(
        &peer,
        "kez.registry.lookup",
        json!({"handle": "@carol@c.localhost"}),
    )
    .await
    .unwrap_err();
    assert_eq!((third.code, third.name.as_str()), (403, "forbidden"));
    let (stranger_client, _) = connect_as(&a.url(), &Arc::new(SecretKey::generate()))
        .await
        .unwrap();
    let narrow = json::<Profile>(
        &stranger_client,
        "kez.registry.lookup",
        json!({"handle": "@bob@b.localhost"}),
    )
    .await
    .unwrap_err();
    assert_eq!((narrow.code, narrow.name.as_str()), (403, "forbidden"));
    peer.publish("kez.mail.relay", Bytes::from_static(b"x"))
        .await
        .unwrap();
    expect_violation(
        &mut peer_errors,
        Violation::Publish,
        "kez.mail.relay",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    drop(peer);

    // A message B refuses (no such recipient) bounces into alice's inbox, sealed by A.
    let stranger = SecretKey::generate().public_key();
    let (lost_id, lost) =
        kez_core::envelope::seal(&alice_key, &stranger, "text", b"anyone?", now()).unwrap();
    relay(&alice, B, &stranger, &lost_id, &lost).await.unwrap();
    let bounced = fetch_until(&alice, 0, 0, 1).await;
    assert_eq!(bounced[0].1, None, "a bounce has no origin: it is A's own");
    let bounce = opened_bounce(&alice_key, &a_key.public_key(), &bounced[0].2);
    assert_eq!(bounce.message_id(), Some(lost_id));
    assert_eq!(
        (bounce.to, bounce.domain.as_str(), bounce.reason.as_str()),
        (stranger, B, "unknown_recipient")
    );

    // Hostile or mistaken requests have their stable answers.
    let garbage = call(&alice, "kez.mail.relay", Bytes::from_static(b"\x05b.loc"))
        .await
        .unwrap_err();
    assert_eq!((garbage.code, garbage.name.as_str()), (400, "malformed"));
    let not_a_peer = call(
        &alice,
        "kez.mail.deliver",
        SendRequest::encode(&bob_key.public_key(), &id, &envelope),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (not_a_peer.code, not_a_peer.name.as_str()),
        (403, "forbidden")
    );

    // Relaying to the own domain is a mistake of the client's.
    let own = relay(&alice, A, &bob_key.public_key(), &id, &envelope)
        .await
        .unwrap_err();
    assert_eq!((own.code, own.name.as_str()), (400, "malformed"));

    let metrics = get_metrics(b).await;
    assert!(
        metrics.contains("kez_federation_received_total{domain=\"a.localhost\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kez_callout_decisions_total{decision=\"peer\"} 2"),
        "A's pool and the test's own connection as A"
    );
    assert!(metrics.contains(
        "kez_federation_refused_total{domain=\"a.localhost\",reason=\"peer_key_changed\"} 1"
    ));
    assert!(metrics.contains(
        "kez_federation_refused_total{domain=\"a.localhost\",reason=\"dialback_failed\"} 1"
    ));
    assert!(metrics.contains(
        "kez_federation_refused_total{domain=\"a.localhost\",reason=\"unknown_recipient\"} 1"
    ));
    let metrics = get_metrics(a).await;
    assert!(metrics.contains("kez_federation_sent_total{domain=\"b.localhost\"} 1"));
    assert!(metrics.contains(
        "kez_federation_bounced_total{domain=\"b.localhost\",reason=\"unknown_recipient\"} 1"
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_domain_is_refused_both_ways() {
    let federation = Federation::start_with(&[A, B], |domain, config| {
        if domain == A {
            federation_of(config).bounce_after = Duration::from_secs(3);
        }
    })
    .await;
    let (a, b) = (federation.home(A), federation.home(B));
    let a_key = Arc::new(a.server_key());
    let (alice_key, alice) = a.registered("alice").await;
    let (bob_key, _bob) = b.registered("bob").await;
    // A first message goes through: A is pinned at B, and A's pool holds a connection.
    let (id, envelope) =
        kez_core::envelope::seal(&alice_key, &bob_key.public_key(), "text", b"one", now()).unwrap();
    relay(&alice, B, &bob_key.public_key(), &id, &envelope)
        .await
        .unwrap();
    let b_pins = kez_chat_server::open_pins(&b.config).await.unwrap();
    let deadline = Instant::now() + THROUGH_WITHIN;
    while b_pins
        .domain_of(&a_key.public_key())
        .await
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "A never reached B");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (open, _) = b.connect_as_peer(&a_key, A).await.unwrap();

    // B's operator blocks A: A's open connections end, and a new one is refused.
    let record = b_pins.set_blocked(A, true, now()).await.unwrap();
    assert_eq!(record.key, Some(a_key.public_key()), "the pin stays");
    let deadline = Instant::now() + Duration::from_secs(10);
    while open.connection_state() == async_nats::connection::State::Connected {
        assert!(
            Instant::now() < deadline,
            "a blocked peer's open connection was not ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(open);
    // What A sends meanwhile is refused (or cannot get through), and bounces.
    let (blocked_id, blocked) =
        kez_core::envelope::seal(&alice_key, &bob_key.public_key(), "text", b"two", now()).unwrap();
    relay(&alice, B, &bob_key.public_key(), &blocked_id, &blocked)
        .await
        .unwrap();
    let bounced = fetch_until(&alice, 0, 0, 1).await;
    let bounce = opened_bounce(&alice_key, &a_key.public_key(), &bounced[0].2);
    assert_eq!(bounce.message_id(), Some(blocked_id));
    assert!(
        ["domain_blocked", "expired"].contains(&bounce.reason.as_str()),
        "{bounce:?}"
    );
    assert!(
        b.connect_as_peer(&a_key, A).await.is_err(),
        "a new connection of the blocked domain is refused"
    );
    let listed = b_pins.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].blocked);

    // A's operator blocks B: lookups and relays for B are refused at once.
    let a_pins = kez_chat_server::open_pins(&a.config).await.unwrap();
    a_pins.set_blocked(B, true, now()).await.unwrap();
    let lookup = json::<Profile>(
        &alice,
        "kez.registry.lookup",
        json!({"handle": "@bob@b.localhost"}),
    )
    .await
    .unwrap_err();
    assert_eq!((lookup.code, lookup.name.as_str()), (403, "domain_blocked"));
    let relayed = relay(&alice, B, &bob_key.public_key(), &id, &envelope)
        .await
        .unwrap_err();
    assert_eq!(
        (relayed.code, relayed.name.as_str()),
        (403, "domain_blocked")
    );

    // Forgetting a pin keeps the block; with both blocks lifted B is asked again (once A's
    // last failure to reach it, remembered for a few seconds, is past), and pinned anew.
    let forgotten = a_pins.forget(B).await.unwrap().expect("B was pinned");
    assert!(forgotten.key.is_some());
    assert!(a_pins.record(B).await.unwrap().unwrap().0.blocked);
    a_pins.set_blocked(B, false, now()).await.unwrap();
    b_pins.set_blocked(A, false, now()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let profile = loop {
        match json::<Profile>(
            &alice,
            "kez.registry.lookup",
            json!({"handle": "@bob@b.localhost"}),
        )
        .await
        {
            Ok(profile) => break profile,
            Err(err) if err.name == "peer_unavailable" && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => panic!("{err:?}"),
        }
    };
    assert_eq!(profile.key, bob_key.public_key());
    assert!(a_pins.record(B).await.unwrap().unwrap().0.key.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_does_not_federate_says_so() {
    let stack = CalloutStack::start().await;
    let (_, alice) = stack.registered("alice").await;
    let info: ServerInfo = json(&alice, "kez.server.info", json!({})).await.unwrap();
    assert_eq!(info.federation, None);
    let lookup = json::<Profile>(
        &alice,
        "kez.registry.lookup",
        json!({"handle": "@bob@b.localhost"}),
    )
    .await
    .unwrap_err();
    assert_eq!((lookup.code, lookup.name.as_str()), (404, "not_federated"));
    let to = SecretKey::generate().public_key();
    let err = relay(&alice, B, &to, &MessageId::random(), b"x")
        .await
        .unwrap_err();
    assert_eq!((err.code, err.name.as_str()), (404, "not_federated"));
    // A key claiming to be a peer server is refused outright.
    let key = Arc::new(SecretKey::generate());
    let url = stack.nats.url();
    let refused = kez_client::Connection::options(&key)
        .name(peer_connection_name(A))
        .connect(url)
        .await;
    assert!(refused.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_for_a_server_that_stays_down_is_retried_then_bounced() {
    // c.localhost's WebFinger is a port nobody listens on.
    let nowhere = format!("http://{}", reserve_port());
    let federation = Federation::start_with(&[A], |_, config| {
        let federation = federation_of(config);
        federation.bounce_after = Duration::from_secs(3);
        federation
            .peer_webfinger
            .insert("c.localhost".to_owned(), nowhere.clone());
    })
    .await;
    let a = federation.home(A);
    let a_key = a.server_key();
    let (alice_key, alice) = a.registered("alice").await;
    let to = SecretKey::generate().public_key();
    let (id, envelope) =
        kez_core::envelope::seal(&alice_key, &to, "text", b"hello?", now()).unwrap();
    relay(&alice, "c.localhost", &to, &id, &envelope)
        .await
        .unwrap();
    let lookup = json::<Profile>(
        &alice,
        "kez.registry.lookup",
        json!({"handle": "@carol@c.localhost"}),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (lookup.code, lookup.name.as_str()),
        (503, "peer_unavailable"),
        "a read of a server that is down fails at once, to be retried"
    );
    let bounced = fetch_until(&alice, 0, 0, 1).await;
    let bounce = opened_bounce(&alice_key, &a_key.public_key(), &bounced[0].2);
    assert_eq!(
        (
            bounce.message_id(),
            bounce.reason.as_str(),
            bounce.domain.as_str()
        ),
        (Some(id), "expired", "c.localhost")
    );
    let metrics = get_metrics(a).await;
    assert!(
        metrics
            .contains("kez_federation_bounced_total{domain=\"c.localhost\",reason=\"expired\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("kez_federation_retries_total{domain=\"c.localhost\"} 0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_peer_is_slowed_down_and_its_mail_still_arrives() {
    // B takes 2 messages at once from a peer, then one a second.
    let federation = Federation::start_with(&[A, B], |domain, config| {
        if domain == B {
            federation_of(config).peer_limits.messages = kez_chat_server::limits::Rate::new(1.0, 2);
        }
    })
    .await;
    let (a, b) = (federation.home(A), federation.home(B));
    let (alice_key, alice) = a.registered("alice").await;
    let (bob_key, bob) = b.registered("bob").await;
    for text in ["one", "two", "three", "four"] {
        let (id, envelope) = kez_core::envelope::seal(
            &alice_key,
            &bob_key.public_key(),
            "text",
            text.as_bytes(),
            now(),
        )
        .unwrap();
        relay(&alice, B, &bob_key.public_key(), &id, &envelope)
            .await
            .unwrap();
    }
    let fetched = fetch_until(&bob, 0, 0, 4).await;
    let mut texts: Vec<Vec<u8>> = fetched
        .iter()
        .map(|(_, origin, envelope)| {
            assert_eq!(origin.as_deref(), Some(A));
            kez_core::envelope::open(&bob_key, envelope).unwrap().body
        })
        .collect();
    texts.sort();
    assert_eq!(texts, [&b"four"[..], b"one", b"three", b"two"]);
    let metrics = get_metrics(b).await;
    assert!(
        metrics.contains(
            "kez_federation_refused_total{domain=\"a.localhost\",reason=\"rate_limited\"}"
        ),
        "{metrics}"
    );
    let metrics = get_metrics(a).await;
    assert!(metrics.contains("kez_federation_sent_total{domain=\"b.localhost\"} 4"));
    assert!(!metrics.contains("kez_federation_retries_total{domain=\"b.localhost\"} 0"));
}
