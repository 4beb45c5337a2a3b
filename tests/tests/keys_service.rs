//! The key service (`kez.keys.*`, PROTOCOL.md §15.2) end to end, against a real nats-server with
//! the auth callout and in-process kez-chat-servers: publish, count and claim (also through
//! kez-client's calls); concurrent claims over two instances each take a distinct one-time key;
//! exhaustion and the per-target budget serve the fallback key; the per-claimer limit answers
//! 429; hostile bodies get stable error answers; a new Olm identity key replaces what was kept;
//! a revoked device cannot publish; a key without a handle cannot reach the service; and a
//! claim crosses to another domain's server with `domain`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use kez_chat_server::config::ServerConfig;
use kez_chat_server::limits::Limits;
use kez_core::prekey::{OlmKey, PrekeyKind, SignedPrekey};
use kez_core::sigchain::DeviceKind;
use kez_core::{PublicKey, SecretKey, Sigchain, SignedLink, UnsignedLink};
use kez_proto::keys::{ClaimAnswer, CountAnswer, PublishAnswer, PublishRequest};
use kez_tests::callout::{CalloutStack, Violation, connect_as, expect_violation, register};
use kez_tests::federation::Federation;
use kez_tests::kez_server::{KezServer, ServiceError, call};
use kez_tests::requests::{nats_endpoint, now};

const PUBLISH: &str = "kez.keys.publish";
const COUNT: &str = "kez.keys.count";
const CLAIM: &str = "kez.keys.claim";
/// How long any request may take to be answered: a refusal is as prompt as an answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A random Olm key (any 32 bytes will do for the service).
fn olm() -> OlmKey {
    OlmKey::from_bytes(*SecretKey::generate().public_key().as_bytes())
}

/// A publish request of `count` one-time keys (and a fallback key when `fallback`) for the
/// Olm identity `identity`, signed by `device`.
fn prekeys(device: &SecretKey, identity: OlmKey, count: usize, fallback: bool) -> PublishRequest {
    PublishRequest {
        identity_key: identity,
        one_time: (0..count)
            .map(|_| SignedPrekey::sign(device, &identity, olm(), PrekeyKind::OneTime))
            .collect(),
        fallback: fallback
            .then(|| SignedPrekey::sign(device, &identity, olm(), PrekeyKind::Fallback)),
    }
}

async fn call_within(
    client: &Client,
    subject: &str,
    body: impl Into<Bytes>,
) -> Result<Bytes, ServiceError> {
    tokio::time::timeout(ANSWER_WITHIN, call(client, subject, body))
        .await
        .unwrap_or_else(|_| panic!("{subject} was not answered within {ANSWER_WITHIN:?}"))
}

async fn publish(client: &Client, request: &PublishRequest) -> Result<PublishAnswer, ServiceError> {
    let answer = call_within(client, PUBLISH, serde_json::to_vec(request).unwrap()).await?;
    Ok(serde_json::from_slice(&answer).expect("a publish answer"))
}

async fn count(client: &Client) -> Result<CountAnswer, ServiceError> {
    let answer = call_within(client, COUNT, &b"{}"[..]).await?;
    Ok(serde_json::from_slice(&answer).expect("a count answer"))
}

async fn claim(
    client: &Client,
    device: &PublicKey,
    domain: Option<&str>,
) -> Result<ClaimAnswer, ServiceError> {
    let mut body = serde_json::json!({ "device": device });
    if let Some(domain) = domain {
        body["domain"] = domain.into();
    }
    let answer = call_within(client, CLAIM, serde_json::to_vec(&body).unwrap()).await?;
    let claimed: ClaimAnswer = serde_json::from_slice(&answer).expect("a claim answer");
    assert_eq!(
        claimed.device, *device,
        "the answer is about the device asked"
    );
    claimed
        .prekey
        .verify(device, &claimed.identity_key)
        .expect("a claimed prekey is signed by its device");
    Ok(claimed)
}

fn error_of<T: std::fmt::Debug>(result: Result<T, ServiceError>) -> (u16, String) {
    let err = result.expect_err("a refusal");
    (err.code, err.name)
}

async fn stack_with(limits: Limits) -> CalloutStack {
    CalloutStack::start_configured(|config: &mut ServerConfig| config.limits = limits).await
}

#[tokio::test]
async fn publish_count_and_claim_round_trip() {
    let stack = CalloutStack::start().await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bob").await;
    let alice_pub = alice_key.public_key();

    // Nothing published yet.
    assert_eq!(
        error_of(claim(&bob, &alice_pub, None).await),
        (404, "no_prekeys".to_owned())
    );
    assert_eq!(
        count(&alice).await.unwrap(),
        CountAnswer {
            identity_key: None,
            one_time: 0,
            fallback: false
        }
    );

    let identity = olm();
    let request = prekeys(&alice_key, identity, 3, true);
    assert_eq!(
        publish(&alice, &request).await.unwrap(),
        PublishAnswer {
            one_time: 3,
            fallback: true
        }
    );
    // The same again adds nothing (a retried publish).
    assert_eq!(publish(&alice, &request).await.unwrap().one_time, 3);
    assert_eq!(
        count(&alice).await.unwrap(),
        CountAnswer {
            identity_key: Some(identity),
            one_time: 3,
            fallback: true
        }
    );

    let claimed = claim(&bob, &alice_pub, None).await.unwrap();
    assert_eq!(claimed.identity_key, identity);
    assert_eq!(claimed.prekey.kind, PrekeyKind::OneTime);
    assert!(request.one_time.contains(&claimed.prekey));
    assert_eq!(count(&alice).await.unwrap().one_time, 2);

    // kez-client's calls.
    let url = stack.nats.url();
    let conn = kez_client::Connection::connect(&url, alice_key.clone())
        .await
        .unwrap();
    assert_eq!(conn.keys_count().await.unwrap().one_time, 2);
    let more = prekeys(&alice_key, identity, 2, false);
    assert_eq!(conn.keys_publish(&more).await.unwrap().one_time, 4);
    let bob_conn = kez_client::Connection::connect(&url, bob_key.clone())
        .await
        .unwrap();
    let claimed = bob_conn.keys_claim(&alice_pub, None).await.unwrap();
    assert_eq!(claimed.prekey.kind, PrekeyKind::OneTime);
    assert_eq!(conn.keys_count().await.unwrap().one_time, 3);

    // A device that is nobody's here has nothing to claim.
    assert_eq!(
        error_of(claim(&bob, &SecretKey::generate().public_key(), None).await),
        (404, "no_prekeys".to_owned())
    );
}

/// Many claimers at once, served by two instances of the server: every one-time key is handed
/// out once, then the fallback key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_take_each_one_time_key_once() {
    let stack = stack_with(Limits::OFF).await;
    let mut config = CalloutStack::config(&stack.nats, &stack.keys_dir, &stack.keys);
    config.limits = Limits::OFF;
    let second = KezServer::start_with(&config).await;
    let (alice_key, alice) = stack.registered("alice").await;
    let request = prekeys(&alice_key, olm(), 40, true);
    publish(&alice, &request).await.unwrap();
    let fallback = request.fallback.unwrap();

    let mut claimers = Vec::new();
    for i in 0..10 {
        claimers.push(stack.registered(&format!("claimer{i}")).await.1);
    }
    let device = alice_key.public_key();
    let mut tasks = Vec::new();
    for client in &claimers {
        for _ in 0..6 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                claim(&client, &device, None).await.unwrap().prekey
            }));
        }
    }
    let mut one_time = Vec::new();
    let mut fallbacks = 0;
    for task in tasks {
        let prekey = task.await.unwrap();
        match prekey.kind {
            PrekeyKind::OneTime => one_time.push(prekey),
            PrekeyKind::Fallback => {
                assert_eq!(prekey, fallback);
                fallbacks += 1;
            }
        }
    }
    let distinct: HashSet<OlmKey> = one_time.iter().map(|prekey| prekey.key).collect();
    assert_eq!(one_time.len(), 40, "every one-time key handed out");
    assert_eq!(distinct.len(), 40, "none twice");
    assert!(
        one_time
            .iter()
            .all(|prekey| request.one_time.contains(prekey))
    );
    assert_eq!(fallbacks, 20);
    assert_eq!(count(&alice).await.unwrap().one_time, 0);
    second.stop().await;
}

#[tokio::test]
async fn exhaustion_serves_the_fallback_key_then_nothing_without_one() {
    let stack = CalloutStack::start().await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (carol_key, carol) = stack.registered("carol").await;
    let (_, bob) = stack.registered("bob").await;
    let request = prekeys(&alice_key, olm(), 2, true);
    publish(&alice, &request).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(
            claim(&bob, &alice_key.public_key(), None)
                .await
                .unwrap()
                .prekey,
        );
    }
    assert_eq!(got[0].kind, PrekeyKind::OneTime);
    assert_eq!(got[1].kind, PrekeyKind::OneTime);
    assert_ne!(got[0], got[1]);
    assert_eq!(got[2], request.fallback.unwrap());
    assert_eq!(got[3], request.fallback.unwrap());

    // Without a fallback key: one-time keys, then nothing.
    publish(&carol, &prekeys(&carol_key, olm(), 1, false))
        .await
        .unwrap();
    let first = claim(&bob, &carol_key.public_key(), None).await.unwrap();
    assert_eq!(first.prekey.kind, PrekeyKind::OneTime);
    assert_eq!(
        error_of(claim(&bob, &carol_key.public_key(), None).await),
        (404, "no_prekeys".to_owned())
    );
}

/// Past 20 one-time keys a minute for one device (the default), claims get its fallback key
/// while one-time keys remain.
#[tokio::test]
async fn the_per_target_budget_serves_the_fallback_key() {
    let stack = CalloutStack::start().await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (_, bob) = stack.registered("bob").await;
    let (_, carol) = stack.registered("carol").await;
    let request = prekeys(&alice_key, olm(), 30, true);
    publish(&alice, &request).await.unwrap();
    let device = alice_key.public_key();
    let mut one_time = 0;
    for i in 0..24 {
        // Two claimers: the budget is the target's, not the claimer's.
        let claimer = if i % 2 == 0 { &bob } else { &carol };
        match claim(claimer, &device, None).await.unwrap().prekey.kind {
            PrekeyKind::OneTime => one_time += 1,
            PrekeyKind::Fallback => {}
        }
    }
    assert_eq!(one_time, 20, "20 one-time keys, then the fallback key");
    assert_eq!(
        count(&alice).await.unwrap().one_time,
        10,
        "the rest is kept"
    );
}

#[tokio::test]
async fn a_claimer_past_its_budget_gets_429() {
    let stack = CalloutStack::start().await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (_, mallory) = stack.registered("mallory").await;
    let (_, bob) = stack.registered("bob").await;
    publish(&alice, &prekeys(&alice_key, olm(), 0, true))
        .await
        .unwrap();
    let device = alice_key.public_key();
    let mut limited = None;
    for i in 0..80 {
        match claim(&mallory, &device, None).await {
            Ok(_) => assert!(limited.is_none(), "claim {i} served after a 429"),
            Err(err) => {
                assert_eq!((err.code, err.name.as_str()), (429, "rate_limited"));
                let retry: u64 = err
                    .headers
                    .get("Kez-Retry-After-Ms")
                    .unwrap()
                    .as_str()
                    .parse()
                    .unwrap();
                assert!(retry > 0 && retry <= 1000, "{retry}");
                assert!(i >= 50, "the burst is 50; refused at {i}");
                limited.get_or_insert(i);
                break;
            }
        }
    }
    assert!(limited.is_some(), "the flood was limited");
    // Another claimer is not.
    assert_eq!(
        claim(&bob, &device, None).await.unwrap().prekey.kind,
        PrekeyKind::Fallback
    );
}

#[tokio::test]
async fn hostile_bodies_get_stable_errors() {
    let stack = CalloutStack::start().await;
    let (alice_key, alice) = stack.registered("alice").await;
    let other = SecretKey::generate();
    let identity = olm();

    // Signed by another key, or for another identity key.
    let forged = prekeys(&other, identity, 3, true);
    assert_eq!(
        error_of(publish(&alice, &forged).await),
        (401, "bad_signature".to_owned())
    );
    let mut mixed = prekeys(&alice_key, identity, 12, true);
    mixed.one_time[11] = SignedPrekey::sign(&alice_key, &olm(), olm(), PrekeyKind::OneTime);
    assert_eq!(
        error_of(publish(&alice, &mixed).await),
        (401, "bad_signature".to_owned())
    );
    let mut bad_fallback = prekeys(&alice_key, identity, 1, true);
    bad_fallback.fallback.as_mut().unwrap().key = olm();
    assert_eq!(
        error_of(publish(&alice, &bad_fallback).await),
        (401, "bad_signature".to_owned())
    );
    // Wrong kinds.
    let mut wrong = prekeys(&alice_key, identity, 2, false);
    wrong.fallback = Some(wrong.one_time.pop().unwrap());
    assert_eq!(
        error_of(publish(&alice, &wrong).await),
        (400, "malformed".to_owned())
    );
    let mut wrong = prekeys(&alice_key, identity, 1, true);
    wrong.one_time.push(wrong.fallback.unwrap());
    assert_eq!(
        error_of(publish(&alice, &wrong).await),
        (400, "malformed".to_owned())
    );
    // Too many in one request; too many kept.
    assert_eq!(
        error_of(publish(&alice, &prekeys(&alice_key, identity, 51, false)).await),
        (400, "too_many_keys".to_owned())
    );
    publish(&alice, &prekeys(&alice_key, identity, 50, false))
        .await
        .unwrap();
    publish(&alice, &prekeys(&alice_key, identity, 50, false))
        .await
        .unwrap();
    assert_eq!(
        error_of(publish(&alice, &prekeys(&alice_key, identity, 1, false)).await),
        (400, "too_many_keys".to_owned())
    );
    assert_eq!(
        count(&alice).await.unwrap().one_time,
        100,
        "nothing of it kept"
    );
    // Oversize.
    let huge = format!(
        r#"{{"identity_key":"{identity}","one_time":[{}]}}"#,
        " ".repeat(20_000)
    );
    assert_eq!(
        error_of(call_within(&alice, PUBLISH, huge.into_bytes()).await),
        (413, "too_large".to_owned())
    );
    // Malformed, on every endpoint.
    let device = alice_key.public_key();
    for (subject, body) in [
        (PUBLISH, String::new()),
        (PUBLISH, "[]".to_owned()),
        (PUBLISH, "{".to_owned()),
        (PUBLISH, r#"{"identity_key":"00"}"#.to_owned()),
        (
            PUBLISH,
            format!(r#"{{"identity_key":"{identity}","extra":1}}"#),
        ),
        (
            PUBLISH,
            format!(r#"{{"identity_key":"{identity}","identity_key":"{identity}"}}"#),
        ),
        (
            PUBLISH,
            format!(
                r#"{{"identity_key":"{identity}","one_time":[{{"key":"{identity}","kind":"other","sig":"00"}}]}}"#
            ),
        ),
        (COUNT, String::new()),
        (COUNT, r#"{"device":1}"#.to_owned()),
        (CLAIM, "{}".to_owned()),
        (CLAIM, r#"{"device":"ed25519:zz"}"#.to_owned()),
        (CLAIM, format!(r#"{{"device":"{device}","more":true}}"#)),
        (
            CLAIM,
            format!(r#"{{"device":"{device}","domain":"not a domain"}}"#),
        ),
    ] {
        let err = call_within(&alice, subject, body.clone().into_bytes())
            .await
            .expect_err(&body);
        assert_eq!(
            (err.code, err.name.as_str()),
            (400, "malformed"),
            "{subject} {body}: {}",
            err.message
        );
    }
    // Another domain, on a server that does not federate.
    assert_eq!(
        error_of(claim(&alice, &device, Some("b.example")).await),
        (404, "not_federated".to_owned())
    );
    // The server still serves.
    assert_eq!(count(&alice).await.unwrap().one_time, 100);
}

#[tokio::test]
async fn a_new_identity_key_replaces_what_was_kept() {
    let stack = CalloutStack::start().await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (_, bob) = stack.registered("bob").await;
    publish(&alice, &prekeys(&alice_key, olm(), 5, true))
        .await
        .unwrap();
    let new_identity = olm();
    let request = prekeys(&alice_key, new_identity, 2, false);
    assert_eq!(
        publish(&alice, &request).await.unwrap(),
        PublishAnswer {
            one_time: 2,
            fallback: false
        }
    );
    let claimed = claim(&bob, &alice_key.public_key(), None).await.unwrap();
    assert_eq!(claimed.identity_key, new_identity);
    assert!(request.one_time.contains(&claimed.prekey));
    assert_eq!(
        count(&alice).await.unwrap().identity_key,
        Some(new_identity)
    );
}

async fn append(client: &Client, link: &SignedLink) {
    call(client, "kez.sigchain.append", link.bytes().to_vec())
        .await
        .expect("the append");
}

#[tokio::test]
async fn a_device_publishes_until_revoked() {
    let stack = CalloutStack::start().await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (_, bob) = stack.registered("bob").await;
    let first = UnsignedLink::first(alice_key.public_key(), now(), nats_endpoint("nats"))
        .sign(&alice_key)
        .unwrap();
    append(&alice, &first).await;
    let mut chain = Sigchain::start(first.bytes()).unwrap();
    let laptop = Arc::new(SecretKey::generate());
    let add = chain
        .add_device_link(now(), &alice_key, &laptop, "laptop", DeviceKind::Desktop)
        .unwrap();
    append(&alice, &add).await;
    chain.append(add.bytes()).unwrap();

    let (laptop_client, _) = stack
        .connect_as(&laptop)
        .await
        .expect("the device connects");
    publish(&laptop_client, &prekeys(&laptop, olm(), 2, true))
        .await
        .unwrap();
    assert_eq!(
        claim(&bob, &laptop.public_key(), None)
            .await
            .unwrap()
            .prekey
            .kind,
        PrekeyKind::OneTime
    );

    let revoke = chain
        .revoke_device_link(now(), &alice_key, laptop.public_key(), None)
        .unwrap();
    append(&alice, &revoke).await;
    // Its open connection is refused (unless the broker has closed it already).
    let attempt = tokio::time::timeout(
        ANSWER_WITHIN,
        laptop_client.request(
            PUBLISH,
            serde_json::to_vec(&prekeys(&laptop, olm(), 1, false))
                .unwrap()
                .into(),
        ),
    )
    .await;
    if let Ok(Ok(answer)) = attempt {
        let headers = answer.headers.expect("an error answer");
        assert_eq!(headers.get("Kez-Error").unwrap().as_str(), "revoked_device");
    }
    // Nobody gets its prekeys any more.
    assert_eq!(
        error_of(claim(&bob, &laptop.public_key(), None).await),
        (404, "no_prekeys".to_owned())
    );
    // The identity key still publishes.
    publish(&alice, &prekeys(&alice_key, olm(), 1, false))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_key_without_a_handle_cannot_reach_the_service() {
    let stack = CalloutStack::start().await;
    let (alice_key, alice) = stack.registered("alice").await;
    publish(&alice, &prekeys(&alice_key, olm(), 1, true))
        .await
        .unwrap();
    let stranger = Arc::new(SecretKey::generate());
    let (narrow, mut errors) = connect_as(&stack.nats.url(), &stranger).await.unwrap();
    for subject in [CLAIM, PUBLISH, COUNT] {
        let body = serde_json::json!({ "device": alice_key.public_key() });
        narrow
            .publish(subject, serde_json::to_vec(&body).unwrap().into())
            .await
            .unwrap();
        narrow.flush().await.unwrap();
        expect_violation(&mut errors, Violation::Publish, subject, ANSWER_WITHIN)
            .await
            .unwrap();
    }
    // Once registered, it may.
    register(&narrow, &stranger, "stranger").await.unwrap();
    let (client, _) = connect_as(&stack.nats.url(), &stranger).await.unwrap();
    claim(&client, &alice_key.public_key(), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_crosses_to_another_domain() {
    const A: &str = "a.localhost";
    const B: &str = "b.localhost";
    let federation = Federation::start().await;
    let (a, b) = (federation.home(A), federation.home(B));
    let (_alice_key, alice) = a.registered("alice").await;
    let (bob_key, bob) = b.registered("bob").await;
    let request = prekeys(&bob_key, olm(), 1, true);
    publish(&bob, &request).await.unwrap();
    let device = bob_key.public_key();

    let first = claim(&alice, &device, Some(B)).await.unwrap();
    assert_eq!(first.prekey, request.one_time[0]);
    let second = claim(&alice, &device, Some(B)).await.unwrap();
    assert_eq!(second.prekey, request.fallback.unwrap());
    assert_eq!(count(&bob).await.unwrap().one_time, 0);
    // The peer's refusals are passed on.
    assert_eq!(
        error_of(claim(&alice, &SecretKey::generate().public_key(), Some(B)).await),
        (404, "no_prekeys".to_owned())
    );
    // The served domain is this server's own.
    assert_eq!(
        error_of(claim(&alice, &device, Some(A)).await),
        (404, "no_prekeys".to_owned())
    );
}

/// A broker configuration from before the key service (no `kez.keys.>` export or import): the
/// server starts and serves everything else; clients get no responders on `kez.keys.*`.
#[tokio::test]
async fn a_broker_config_without_the_key_service_serves_everything_else() {
    use kez_chat_server::nats_conf;
    let keys_dir = tempfile::tempdir().unwrap();
    let (keys, _) = nats_conf::keygen(keys_dir.path()).unwrap();
    let old_config: String = nats_conf::render_auth(&keys)
        .lines()
        .filter(|line| !line.contains("kez.keys"))
        .map(|line| format!("{line}\n"))
        .collect();
    let nats = kez_tests::NatsServer::start_with(&old_config);
    let server = KezServer::start_with(&CalloutStack::config(&nats, &keys_dir, &keys)).await;
    let key = Arc::new(SecretKey::generate());
    let (narrow, _) = connect_as(&nats.url(), &key).await.unwrap();
    register(&narrow, &key, "alice").await.unwrap();
    let (client, _) = connect_as(&nats.url(), &key).await.unwrap();
    let err = client
        .request(COUNT, Bytes::from_static(b"{}"))
        .await
        .expect_err("nobody answers kez.keys.* in APP");
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
    let profile = call_within(
        &client,
        "kez.registry.lookup",
        serde_json::to_vec(&serde_json::json!({ "handle": "alice" })).unwrap(),
    )
    .await
    .expect("the registry serves");
    assert!(String::from_utf8_lossy(&profile).contains("alice"));
    server.stop().await;
}
