//! kez.registry.* and kez.sigchain.* against a real nats-server: the round trips, the refusals,
//! and the races that must have exactly one winner.

use futures::future::join_all;
use kez_core::{SecretKey, Sigchain, UnsignedLink};
use kez_tests::NatsServer;
use kez_tests::kez_server::{KezServer, TEST_DOMAIN, call, call_ok};
use kez_tests::requests::{nats_endpoint, now, registration};
use serde_json::{Value, json};
use std::time::Duration;

async fn setup() -> (NatsServer, KezServer, async_nats::Client) {
    let nats = NatsServer::start();
    let server = KezServer::start(&nats.url()).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    (nats, server, client)
}

/// [`setup`] with the rate limits off, for tests that send more than a key's burst.
async fn setup_unlimited() -> (NatsServer, KezServer, async_nats::Client) {
    let nats = NatsServer::start();
    let server = KezServer::start_with(&kez_chat_server::config::ServerConfig {
        limits: kez_chat_server::limits::Limits::OFF,
        ..kez_chat_server::config::ServerConfig::new(&nats.url(), TEST_DOMAIN)
    })
    .await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    (nats, server, client)
}

#[tokio::test]
async fn register_lookup_whois_round_trip() {
    let (_nats, _server, client) = setup().await;
    let alice = SecretKey::generate();
    let registered: Value = serde_json::from_slice(
        &call(
            &client,
            "kez.registry.register",
            registration(&alice, "alice"),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    assert_eq!(registered["handle"], "@alice@kez.test");
    assert_eq!(registered["key"], alice.public_key().to_string());

    for query in ["alice", "@alice", "@Alice@KEZ.test", "alice@kez.test"] {
        let found = call_ok(&client, "kez.registry.lookup", json!({ "handle": query })).await;
        assert_eq!(found["key"], alice.public_key().to_string(), "{query}");
        assert_eq!(found["registered_at"], registered["registered_at"]);
        assert_eq!(found["sigchain"], Value::Null);
    }
    let who = call_ok(
        &client,
        "kez.registry.whois",
        json!({ "key": alice.public_key() }),
    )
    .await;
    assert_eq!(who["handle"], "@alice@kez.test");

    let missing = call(
        &client,
        "kez.registry.lookup",
        serde_json::to_vec(&json!({"handle": "bob"})).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!((missing.code, missing.name.as_str()), (404, "not_found"));
    let elsewhere = call(
        &client,
        "kez.registry.lookup",
        serde_json::to_vec(&json!({"handle": "@alice@other.example"})).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(elsewhere.code, 404);
    assert!(
        elsewhere.name == "not_federated" && elsewhere.message.contains("does not federate"),
        "{elsewhere:?}"
    );
    let nobody = call(
        &client,
        "kez.registry.whois",
        serde_json::to_vec(&json!({"key": SecretKey::generate().public_key()})).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(nobody.code, 404);
}

#[tokio::test]
async fn first_come_first_served_and_one_handle_per_key() {
    let (_nats, _server, client) = setup().await;
    let (alice, mallory) = (SecretKey::generate(), SecretKey::generate());
    let request = registration(&alice, "alice");
    let first: Value = serde_json::from_slice(
        &call(&client, "kez.registry.register", request.clone())
            .await
            .unwrap(),
    )
    .unwrap();

    let taken = call(
        &client,
        "kez.registry.register",
        registration(&mallory, "alice"),
    )
    .await
    .unwrap_err();
    assert_eq!((taken.code, taken.name.as_str()), (409, "handle_taken"));

    let second = call(
        &client,
        "kez.registry.register",
        registration(&alice, "alice2"),
    )
    .await
    .unwrap_err();
    assert_eq!((second.code, second.name.as_str()), (409, "key_has_handle"));
    assert!(second.message.contains("@alice@kez.test"), "{second:?}");

    // A replay of the accepted request claims nothing new: same record, same time.
    let replay: Value = serde_json::from_slice(
        &call(&client, "kez.registry.register", request)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(replay, first);
    // mallory's failed attempt left no reverse entry behind: she can still register elsewhere.
    call(
        &client,
        "kez.registry.register",
        registration(&mallory, "mallory"),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn concurrent_registrations_of_one_handle_have_one_winner() {
    let (_nats, _server, client) = setup().await;
    let keys: Vec<SecretKey> = (0..100).map(|_| SecretKey::generate()).collect();
    let answers = join_all(keys.iter().map(|key| {
        call(
            &client,
            "kez.registry.register",
            registration(key, "popular"),
        )
    }))
    .await;
    let winners: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter_map(|(i, answer)| answer.is_ok().then_some(i))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one registration wins");
    for answer in answers.iter().filter(|answer| answer.is_err()) {
        let err = answer.as_ref().unwrap_err();
        assert_eq!(
            (err.code, err.name.as_str()),
            (409, "handle_taken"),
            "{err:?}"
        );
    }
    let winner = &keys[winners[0]];
    let found = call_ok(&client, "kez.registry.lookup", json!({"handle": "popular"})).await;
    assert_eq!(found["key"], winner.public_key().to_string());

    // The buckets agree: one reverse entry, the winner's; every loser is unknown.
    for key in &keys {
        let who = call(
            &client,
            "kez.registry.whois",
            serde_json::to_vec(&json!({"key": key.public_key()})).unwrap(),
        )
        .await;
        assert_eq!(who.is_ok(), key.public_key() == winner.public_key());
    }
    let js = async_nats::jetstream::new(client.clone());
    let reverse = js.get_key_value("kez_keys").await.unwrap();
    let mut live = 0;
    let mut keys_in_bucket = reverse.keys().await.unwrap();
    use futures::StreamExt;
    while let Some(key) = keys_in_bucket.next().await {
        key.unwrap();
        live += 1;
    }
    assert_eq!(live, 1, "exactly one reverse entry is left");
}

async fn register_with_chain(client: &async_nats::Client, key: &SecretKey, name: &str) -> Sigchain {
    call(client, "kez.registry.register", registration(key, name))
        .await
        .unwrap();
    let first = UnsignedLink::first(key.public_key(), now(), nats_endpoint("nats"))
        .sign(key)
        .unwrap();
    let head = call_ok_raw(client, "kez.sigchain.append", first.bytes().to_vec()).await;
    assert_eq!(head["seq"], 1);
    assert_eq!(head["head"], first.hash().to_string());
    Sigchain::start(first.bytes()).unwrap()
}

async fn call_ok_raw(client: &async_nats::Client, subject: &str, body: Vec<u8>) -> Value {
    match call(client, subject, body).await {
        Ok(answer) => serde_json::from_slice(&answer).unwrap(),
        Err(err) => panic!("{subject} failed: {err:?}"),
    }
}

#[tokio::test]
async fn sigchain_append_get_head() {
    let (_nats, _server, client) = setup().await;
    let alice = SecretKey::generate();
    let mut chain = register_with_chain(&client, &alice, "alice").await;
    let second = chain
        .next_link(now(), nats_endpoint("iroh"))
        .sign(&alice)
        .unwrap();
    call_ok_raw(&client, "kez.sigchain.append", second.bytes().to_vec()).await;
    chain.append(second.bytes()).unwrap();

    let head = call_ok(
        &client,
        "kez.sigchain.head",
        json!({"key": alice.public_key()}),
    )
    .await;
    assert_eq!(
        (head["seq"].as_u64(), head["head"].as_str()),
        (Some(2), Some(chain.head().to_string().as_str()))
    );
    let profile = call_ok(&client, "kez.registry.lookup", json!({"handle": "alice"})).await;
    assert_eq!(profile["sigchain"]["seq"], 2);

    let all = call_ok(
        &client,
        "kez.sigchain.get",
        json!({"key": alice.public_key()}),
    )
    .await;
    let links: Vec<String> = serde_json::from_value(all["links"].clone()).unwrap();
    assert_eq!(all["more"], false);
    assert_eq!(Sigchain::verify(&links).unwrap(), chain);
    let tail = call_ok(
        &client,
        "kez.sigchain.get",
        json!({"key": alice.public_key(), "from_seq": 2}),
    )
    .await;
    assert_eq!(tail["links"].as_array().unwrap().len(), 1);

    // Re-sending a stored link (a retry after a lost answer) is answered as before; another link
    // at a taken seq is a conflict carrying the head.
    let again = call_ok_raw(&client, "kez.sigchain.append", second.bytes().to_vec()).await;
    assert_eq!(
        (again["seq"].as_u64(), again["head"].as_str()),
        (Some(2), Some(second.hash().to_string().as_str()))
    );
    let stale = Sigchain::start(links[0].as_bytes())
        .unwrap()
        .next_link(now(), nats_endpoint("other"))
        .sign(&alice)
        .unwrap();
    let replay = call(&client, "kez.sigchain.append", stale.bytes().to_vec())
        .await
        .unwrap_err();
    assert_eq!(replay.code, 409);
    assert_eq!(
        replay.headers.get("Kez-Head-Seq").map(|v| v.as_str()),
        Some("2")
    );
    let mut forged = chain.next_link(now(), nats_endpoint("evil"));
    let mallory = SecretKey::generate();
    forged.signer = mallory.public_key();
    let forged = forged.sign(&mallory).unwrap();
    let refused = call(&client, "kez.sigchain.append", forged.bytes().to_vec())
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code, refused.name.as_str()),
        (403, "not_current_key")
    );
    let stranger = UnsignedLink::first(mallory.public_key(), now(), nats_endpoint("nats"))
        .sign(&mallory)
        .unwrap();
    let refused = call(&client, "kez.sigchain.append", stranger.bytes().to_vec())
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code, refused.name.as_str()),
        (403, "not_registered")
    );
    let none = call(
        &client,
        "kez.sigchain.get",
        serde_json::to_vec(&json!({"key": mallory.public_key()})).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(none.code, 404);
}

#[tokio::test]
async fn a_head_index_left_behind_is_read_past_and_moved_forward() {
    // An append stores its link, then moves the head index; when JetStream fails the second
    // step for long (a cluster electing the bucket's leader), the index stays behind, or is
    // never written for a first link. Lookups and heads must still answer the stored head,
    // and the index must catch up.
    let (_nats, _server, client) = setup().await;
    let alice = SecretKey::generate();
    let mut chain = register_with_chain(&client, &alice, "alice").await;
    let heads = async_nats::jetstream::new(client.clone())
        .get_key_value(kez_chat_server::store::HEADS_BUCKET)
        .await
        .unwrap();
    let key = alice.public_key().to_hex();
    let at_first = heads.get(&key).await.unwrap().unwrap();
    let second = chain
        .next_link(now(), nats_endpoint("iroh"))
        .sign(&alice)
        .unwrap();
    call_ok_raw(&client, "kez.sigchain.append", second.bytes().to_vec()).await;
    chain.append(second.bytes()).unwrap();
    let lookup = || call_ok(&client, "kez.registry.lookup", json!({"handle": "alice"}));
    let indexed_seq = || async {
        heads
            .get(&key)
            .await
            .unwrap()
            .map(|value| serde_json::from_slice::<Value>(&value).unwrap()["seq"].clone())
    };
    let index_reaches_two = || async {
        for _ in 0..100 {
            if indexed_seq().await == Some(json!(2)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the head index was not moved forward: {:?}",
            indexed_seq().await
        );
    };

    // The index left at the first link.
    heads.put(&key, at_first).await.unwrap();
    assert_eq!(lookup().await["sigchain"]["seq"], 2);
    index_reaches_two().await;

    // No index at all, as after a first link whose index update failed.
    heads.delete(&key).await.unwrap();
    let head = call_ok(
        &client,
        "kez.sigchain.head",
        json!({"key": alice.public_key()}),
    )
    .await;
    assert_eq!(head["seq"], 2);
    assert_eq!(head["head"], chain.head().to_string());
    index_reaches_two().await;

    // A retried append of the stored link answers its head too.
    let retried = call_ok_raw(&client, "kez.sigchain.append", second.bytes().to_vec()).await;
    assert_eq!(retried["seq"], 2);
}

#[tokio::test]
async fn concurrent_appends_at_one_seq_have_one_winner() {
    // 50 appends at once from one key are over the default per-key burst (PROTOCOL.md §5.5),
    // which is not what this test is about.
    let (_nats, _server, client) = setup_unlimited().await;
    let alice = SecretKey::generate();
    let chain = register_with_chain(&client, &alice, "alice").await;
    let candidates: Vec<_> = (0..50)
        .map(|i| {
            chain
                .next_link(now(), nats_endpoint(&format!("device-{i}")))
                .sign(&alice)
                .unwrap()
        })
        .collect();
    let answers = join_all(
        candidates
            .iter()
            .map(|link| call(&client, "kez.sigchain.append", link.bytes().to_vec())),
    )
    .await;
    let winners: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter_map(|(i, answer)| answer.is_ok().then_some(i))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one append lands");
    let winner = &candidates[winners[0]];
    for answer in answers.iter().filter_map(|answer| answer.as_ref().err()) {
        assert_eq!(answer.code, 409, "{answer:?}");
        assert_eq!(
            answer.headers.get("Kez-Head-Seq").map(|v| v.as_str()),
            Some("2")
        );
        assert_eq!(
            answer
                .headers
                .get("Kez-Head-Hash")
                .map(|v| v.as_str().to_owned()),
            Some(winner.hash().to_string())
        );
    }
    let all = call_ok(
        &client,
        "kez.sigchain.get",
        json!({"key": alice.public_key()}),
    )
    .await;
    let links: Vec<String> = serde_json::from_value(all["links"].clone()).unwrap();
    let stored = Sigchain::verify(&links).unwrap();
    assert_eq!(stored.seq(), 2);
    assert_eq!(stored.head(), winner.hash());
}

#[tokio::test]
async fn services_are_discoverable() {
    let (_nats, _server, client) = setup().await;
    for service in ["kez-registry", "kez-sigchain", "kez-server"] {
        let info: Value = serde_json::from_slice(
            &client
                .request(format!("$SRV.INFO.{service}"), "".into())
                .await
                .unwrap()
                .payload,
        )
        .unwrap();
        assert_eq!(info["name"], service);
        assert!(!info["endpoints"].as_array().unwrap().is_empty());
    }
    let info = call_ok(&client, "kez.server.info", json!({})).await;
    assert_eq!(info["domain"], TEST_DOMAIN);
    assert_eq!(info["limits"]["max_link_bytes"], 8192);
}

#[tokio::test]
async fn one_key_racing_itself_for_many_names_gets_one() {
    let (_nats, _server, client) = setup().await;
    let key = SecretKey::generate();
    let names: Vec<String> = (0..20).map(|i| format!("name{i}")).collect();
    let answers = join_all(
        names
            .iter()
            .map(|name| call(&client, "kez.registry.register", registration(&key, name))),
    )
    .await;
    assert_eq!(answers.iter().filter(|answer| answer.is_ok()).count(), 1);
    for err in answers.iter().filter_map(|answer| answer.as_ref().err()) {
        assert_eq!(
            (err.code, err.name.as_str()),
            (409, "key_has_handle"),
            "{err:?}"
        );
    }
    let mut held = Vec::new();
    for name in &names {
        if call(
            &client,
            "kez.registry.lookup",
            serde_json::to_vec(&json!({ "handle": name })).unwrap(),
        )
        .await
        .is_ok()
        {
            held.push(name.clone());
        }
    }
    assert_eq!(held.len(), 1, "the key holds exactly one handle: {held:?}");
    let who = call_ok(
        &client,
        "kez.registry.whois",
        json!({"key": key.public_key()}),
    )
    .await;
    assert_eq!(who["handle"], format!("@{}@kez.test", held[0]));
}

/// A registration interrupted between its two writes (a server killed mid-request) leaves a
/// reverse entry without its handle record. A retry for that name finishes the job at once; a
/// different name has to wait until the abandoned attempt is surely over.
#[tokio::test]
async fn an_interrupted_registration_is_finished_by_a_retry() {
    let (_nats, _server, client) = setup().await;
    let reverse = async_nats::jetstream::new(client.clone())
        .get_key_value("kez_keys")
        .await
        .unwrap();
    let alice = SecretKey::generate();
    reverse
        .put(
            alice.public_key().to_hex(),
            br#"{"name":"alice"}"#.to_vec().into(),
        )
        .await
        .unwrap();
    assert_eq!(
        call(
            &client,
            "kez.registry.whois",
            serde_json::to_vec(&json!({"key": alice.public_key()})).unwrap()
        )
        .await
        .unwrap_err()
        .code,
        404,
        "a reverse entry without its record is not trusted"
    );
    let other = call(
        &client,
        "kez.registry.register",
        registration(&alice, "alice_b"),
    )
    .await
    .unwrap_err();
    assert_eq!((other.code, other.name.as_str()), (409, "key_has_handle"));
    call(
        &client,
        "kez.registry.register",
        registration(&alice, "alice"),
    )
    .await
    .unwrap();
    let who = call_ok(
        &client,
        "kez.registry.whois",
        json!({"key": alice.public_key()}),
    )
    .await;
    assert_eq!(who["handle"], "@alice@kez.test");
}

/// Bodies are JSON objects; the positional array form serde would also accept is refused.
#[tokio::test]
async fn array_bodies_are_refused() {
    let (_nats, _server, client) = setup().await;
    let alice = SecretKey::generate();
    call(
        &client,
        "kez.registry.register",
        registration(&alice, "alice"),
    )
    .await
    .unwrap();
    for (subject, body) in [
        ("kez.registry.lookup", json!(["alice"])),
        ("kez.registry.whois", json!([alice.public_key()])),
        ("kez.sigchain.head", json!([alice.public_key()])),
    ] {
        let err = call(&client, subject, serde_json::to_vec(&body).unwrap())
            .await
            .unwrap_err();
        assert_eq!(
            (err.code, err.name.as_str()),
            (400, "malformed"),
            "{subject}"
        );
    }
}

/// An append verifies one link against the verified state the server keeps, not the whole
/// stored chain: a stored link damaged afterwards does not stop the next append. A chain
/// written by the previous release (no kept state) is verified once, at its next append, and
/// its state kept from then on; a state left behind by a crash is caught up the same way.
#[tokio::test]
async fn appends_verify_against_the_kept_state_and_old_chains_catch_up() {
    let (_nats, _server, client) = setup().await;
    let js = async_nats::jetstream::new(client.clone());
    let states = js
        .get_key_value(kez_chat_server::store::STATES_BUCKET)
        .await
        .unwrap();
    let links = js
        .get_key_value(kez_chat_server::store::LINKS_BUCKET)
        .await
        .unwrap();
    let append = |chain: &mut Sigchain, key: &SecretKey, name: &str| {
        let link = chain
            .next_link(now(), nats_endpoint(name))
            .sign(key)
            .unwrap();
        chain.append(link.bytes()).unwrap();
        link
    };
    let kept_seq = |key: &SecretKey| {
        let states = states.clone();
        let hex = key.public_key().to_hex();
        async move {
            let state = states.get(&hex).await.unwrap().expect("a kept state");
            Sigchain::from_trusted_state_json(&state).unwrap().seq()
        }
    };

    // Kept at every append.
    let alice = SecretKey::generate();
    let mut chain = register_with_chain(&client, &alice, "alice").await;
    assert_eq!(kept_seq(&alice).await, 1);
    let second = append(&mut chain, &alice, "iroh");
    call_ok_raw(&client, "kez.sigchain.append", second.bytes().to_vec()).await;
    assert_eq!(kept_seq(&alice).await, 2);
    // Damage link 1 in storage: an append that re-verified the stored chain would now fail.
    let hex = alice.public_key().to_hex();
    links
        .put(format!("{hex}.1"), b"{\"damaged\":true}".to_vec().into())
        .await
        .unwrap();
    let third = append(&mut chain, &alice, "desktop");
    let head = call_ok_raw(&client, "kez.sigchain.append", third.bytes().to_vec()).await;
    assert_eq!(head["seq"], 3);
    assert_eq!(kept_seq(&alice).await, 3);

    // A chain of the previous release: links and head index, no kept state.
    let bob = SecretKey::generate();
    let mut chain = register_with_chain(&client, &bob, "bob").await;
    for name in ["a", "b", "c"] {
        let link = append(&mut chain, &bob, name);
        call_ok_raw(&client, "kez.sigchain.append", link.bytes().to_vec()).await;
    }
    states.purge(bob.public_key().to_hex()).await.unwrap();
    // ... and a link stored past where a state would be.
    let past = append(&mut chain, &bob, "d");
    links
        .put(
            format!("{}.5", bob.public_key().to_hex()),
            past.bytes().to_vec().into(),
        )
        .await
        .unwrap();
    let next = append(&mut chain, &bob, "e");
    let head = call_ok_raw(&client, "kez.sigchain.append", next.bytes().to_vec()).await;
    assert_eq!(head["seq"], 6);
    assert_eq!(head["head"], chain.head().to_string());
    assert_eq!(kept_seq(&bob).await, 6);
    let state = states
        .get(bob.public_key().to_hex())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Sigchain::from_trusted_state_json(&state).unwrap(), chain);

    // Wrong seqs are refused before any signature is looked at, with the head.
    let stale = call(&client, "kez.sigchain.append", next.bytes().to_vec())
        .await
        .map(|_| ());
    assert!(stale.is_ok(), "a retry of the last link answers its head");
    let far = chain.next_link(now(), nats_endpoint("far"));
    let far = kez_core::UnsignedLink { seq: 9, ..far }.sign(&bob).unwrap();
    let refused = call(&client, "kez.sigchain.append", far.bytes().to_vec())
        .await
        .unwrap_err();
    assert_eq!((refused.code, refused.name.as_str()), (409, "wrong_seq"));
}

/// The state limits are enforced by the server (413, PROTOCOL.md §4.4) as by every verifier.
#[tokio::test]
async fn the_server_refuses_links_past_a_chains_limits() {
    let (_nats, _server, client) = setup_unlimited().await;
    let alice = SecretKey::generate();
    let mut chain = register_with_chain(&client, &alice, "alice").await;
    for i in 1..kez_core::sigchain::MAX_ENDPOINTS {
        let link = chain
            .next_link(now(), nats_endpoint(&format!("e{i}")))
            .sign(&alice)
            .unwrap();
        call_ok_raw(&client, "kez.sigchain.append", link.bytes().to_vec()).await;
        chain.append(link.bytes()).unwrap();
    }
    let one_more = chain
        .next_link(now(), nats_endpoint("one-more"))
        .sign(&alice)
        .unwrap();
    let refused = call(&client, "kez.sigchain.append", one_more.bytes().to_vec())
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code, refused.name.as_str()),
        (413, "too_many_endpoints")
    );
}
