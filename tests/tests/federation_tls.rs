//! Federation over its production path (PROTOCOL.md §14): WebFinger over HTTPS and peer
//! brokers over TLS, with `allow_http` off. Two stacks on loopback, `a.localhost` and
//! `b.localhost` ([`Federation::start_tls`]): each broker speaks TLS with the test PKI's
//! certificate (tests/fixtures/tls), each HTTP shim sits behind a TLS-terminating proxy, and
//! each server trusts the test CA through `federation_ca`. A user of A looks a user of B up
//! and relays a message B's user fetches with its origin; without the CA the peer is
//! unavailable (an unknown issuer) and nothing is pinned; an `http://` WebFinger base is
//! refused without `allow_http`, at start and at discovery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use kez_chat_server::config::Settings;
use kez_core::SecretKey;
use kez_core::envelope::MessageId;
use kez_proto::answer::{Delivered, Profile};
use kez_proto::federation::RelayRequest;
use kez_proto::mail::{FetchAnswer, FetchRequest, SendRequest};
use kez_tests::federation::{Federation, federation_of};
use kez_tests::kez_server::{ServiceError, call};
use kez_tests::requests::now;
use serde_json::json;

const A: &str = "a.localhost";
const B: &str = "b.localhost";
/// How long a message may take through the outbox.
const THROUGH_WITHIN: Duration = Duration::from_secs(15);

/// `kez.registry.lookup` of `handle` over `client`.
async fn lookup(client: &Client, handle: &str) -> Result<Profile, ServiceError> {
    let body = serde_json::to_vec(&json!({ "handle": handle })).unwrap();
    let answer = call(client, "kez.registry.lookup", body).await?;
    Ok(serde_json::from_slice(&answer).expect("a profile"))
}

/// Relays `envelope` for `to` on `domain` under `id` through the caller's own server.
async fn relay(
    client: &Client,
    domain: &str,
    to: &kez_core::PublicKey,
    id: &MessageId,
    envelope: &[u8],
) -> Result<Delivered, ServiceError> {
    let body = RelayRequest::encode(domain, &SendRequest::encode(to, id, envelope));
    let answer = call(client, "kez.mail.relay", body).await?;
    Ok(serde_json::from_slice(&answer).unwrap())
}

/// The first message of the caller's inbox, with its origin, once there is one.
async fn first_message(client: &Client) -> (Option<String>, Bytes) {
    let deadline = Instant::now() + THROUGH_WITHIN;
    loop {
        let request = FetchRequest {
            after: 0,
            max: 1,
            time: 0,
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
        if let Some(message) = answer.messages.first() {
            return (
                message.origin.map(str::to_owned),
                Bytes::copy_from_slice(message.envelope),
            );
        }
        assert!(
            Instant::now() < deadline,
            "no message within {THROUGH_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_federate_over_https_and_tls_brokers_trusting_the_operators_ca() {
    let federation = Federation::start_tls(&[A, B], |_, _| {}).await;
    let (a, b) = (federation.home(A), federation.home(B));
    assert!(a.webfinger().starts_with("https://127.0.0.1:"));
    assert!(a.url().starts_with("tls://127.0.0.1:"));
    let (alice_key, alice) = a.registered("alice").await;
    let (bob_key, bob) = b.registered("bob").await;

    // The brokers speak only verified TLS to who asks for it: a client without the CA is
    // refused by its own side of the handshake.
    let stranger = Arc::new(SecretKey::generate());
    let untrusting = kez_client::Connection::options(&stranger)
        .require_tls(true)
        .connect(b.url())
        .await;
    assert!(untrusting.is_err(), "no CA, no connection");

    // A finds B over HTTPS, pins its key, and reads through B's broker over TLS.
    let profile = lookup(&alice, "@bob@b.localhost").await.unwrap();
    assert_eq!(profile.key, bob_key.public_key());
    let a_pins = kez_chat_server::open_pins(&a.config).await.unwrap();
    let pinned = a_pins.record(B).await.unwrap().expect("B is pinned at A").0;
    assert_eq!(pinned.key, Some(b.server_key().public_key()));

    // A message through A's outbox; B's dialback checks A over HTTPS before it pins A.
    let (id, envelope) = kez_core::envelope::seal(
        &alice_key,
        &bob_key.public_key(),
        "text",
        b"hello over tls",
        now(),
    )
    .unwrap();
    relay(&alice, B, &bob_key.public_key(), &id, &envelope)
        .await
        .unwrap();
    let (origin, fetched) = first_message(&bob).await;
    assert_eq!(origin.as_deref(), Some(A), "the origin is A");
    let opened = kez_core::envelope::open(&bob_key, &fetched).unwrap();
    assert_eq!(
        (opened.from, opened.body.as_slice()),
        (alice_key.public_key(), &b"hello over tls"[..])
    );
    let b_pins = kez_chat_server::open_pins(&b.config).await.unwrap();
    let pinned = b_pins.record(A).await.unwrap().expect("A is pinned at B").0;
    assert_eq!(pinned.key, Some(a.server_key().public_key()));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_ca_a_peer_is_unavailable_and_nothing_is_pinned() {
    let federation = Federation::start_tls(&[A, B], |domain, config| {
        if domain == A {
            federation_of(config).ca_file = None;
        }
    })
    .await;
    let (a, b) = (federation.home(A), federation.home(B));
    let (_, alice) = a.registered("alice").await;
    let _bob = b.registered("bob").await;
    let err = lookup(&alice, "@bob@b.localhost").await.unwrap_err();
    assert_eq!(
        (err.code, err.name.as_str()),
        (503, "peer_unavailable"),
        "{err:?}"
    );
    assert!(err.message.contains("UnknownIssuer"), "{}", err.message);
    let a_pins = kez_chat_server::open_pins(&a.config).await.unwrap();
    assert!(a_pins.record(B).await.unwrap().is_none(), "B is not pinned");
    let b_pins = kez_chat_server::open_pins(&b.config).await.unwrap();
    assert!(b_pins.list().await.unwrap().is_empty(), "nothing reached B");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_http_webfinger_base_is_refused_without_allow_http() {
    // Through the operator's settings: refused at start.
    let settings = Settings {
        federate: Some(true),
        keys_dir: Some("/k".into()),
        callout_issuer: Some("AX".into()),
        peer_webfinger: Some(vec![(B.to_owned(), "http://127.0.0.1:8080".to_owned())]),
        ..Settings::default()
    };
    let err = settings.resolve().unwrap_err();
    assert!(err.contains("--federation-allow-http"), "{err}");

    // A config made otherwise (the library's, as in this fixture) is refused at discovery:
    // A is pointed at B's real shim over plain HTTP, which would answer.
    let mut federation = Federation::start_tls(&[A, B], |_, _| {}).await;
    let b_shim = format!("http://{}", federation.home(B).http);
    let a = federation.home_mut(A);
    a.stop_server().await;
    federation_of(&mut a.config)
        .peer_webfinger
        .insert(B.to_owned(), b_shim);
    a.start_server().await;
    let a = federation.home(A);
    let (_, alice) = a.registered("alice").await;
    let err = lookup(&alice, "@bob@b.localhost").await.unwrap_err();
    assert_eq!(
        (err.code, err.name.as_str()),
        (503, "peer_unavailable"),
        "{err:?}"
    );
    assert!(
        err.message.contains("--federation-allow-http"),
        "{}",
        err.message
    );
    let a_pins = kez_chat_server::open_pins(&a.config).await.unwrap();
    assert!(a_pins.record(B).await.unwrap().is_none(), "B is not pinned");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_broker_whose_certificate_is_not_trusted_is_unavailable_and_says_why() {
    // A finds B over plain HTTP (the dev allowance), so discovery succeeds and B's key is
    // pinned; B's broker still speaks TLS with a certificate A has no CA for.
    let mut federation = Federation::start_tls(&[A, B], |_, _| {}).await;
    let b_shim = format!("http://{}", federation.home(B).http);
    let a = federation.home_mut(A);
    a.stop_server().await;
    let settings = federation_of(&mut a.config);
    settings.ca_file = None;
    settings.allow_http = true;
    settings.peer_webfinger.insert(B.to_owned(), b_shim);
    a.start_server().await;
    let a = federation.home(A);
    let (_, alice) = a.registered("alice").await;
    let err = lookup(&alice, "@bob@b.localhost").await.unwrap_err();
    assert_eq!(
        (err.code, err.name.as_str()),
        (503, "peer_unavailable"),
        "{err:?}"
    );
    assert!(
        err.message.contains("its broker at tls://127.0.0.1:")
            && err.message.contains("UnknownIssuer"),
        "the cause, not just \"IO error\": {}",
        err.message
    );
}
