//! The callout lets a KEZ key connect: unregistered with the narrow profile, registered (after a
//! reconnect) with the chat profile.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kez_core::{Handle, SecretKey};
use kez_proto::registry::RegistrationRequest;
use kez_tests::callout::CalloutStack;
use kez_tests::kez_server::{TEST_DOMAIN, call};

#[tokio::test]
async fn register_over_the_narrow_profile_then_reconnect_with_the_full_one() {
    let stack = CalloutStack::start().await;
    let alice = Arc::new(SecretKey::generate());
    let (client, _errors) = stack
        .connect_as(&alice)
        .await
        .expect("unregistered key connects");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let request =
        RegistrationRequest::sign(&alice, &Handle::parse("alice", TEST_DOMAIN).unwrap(), now);
    call(
        &client,
        "kez.registry.register",
        serde_json::to_vec(&request).unwrap(),
    )
    .await
    .expect("registration over the narrow profile");
    let (client, _errors) = stack
        .connect_as(&alice)
        .await
        .expect("registered key connects");
    let head = call(
        &client,
        "kez.sigchain.head",
        serde_json::to_vec(&serde_json::json!({"key": alice.public_key()})).unwrap(),
    )
    .await;
    assert_eq!(
        head.unwrap_err().code,
        404,
        "the full profile reaches kez.sigchain.*"
    );
}

/// The server advertises the reconnect window for the connections its broker holds (PROTOCOL.md
/// §6.1): at 1 authorization per second, one second per connection. Every client may read it,
/// unregistered or registered, and a kez-client connection learns it for its reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_advertises_the_reconnect_window_for_the_connections_held() {
    let stack = CalloutStack::start_configured(|config| {
        config
            .callout
            .as_mut()
            .expect("a callout stack")
            .reconnects_per_sec = 1;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let key = Arc::new(SecretKey::generate());
        held.push(stack.connect_as(&key).await.expect("a new key connects").0);
    }
    // Counted every 5 s: the window reaches the 8 clients (and the server's own connections).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let window = loop {
        let window = kez_client::reconnect::learn_window(&held[0])
            .await
            .expect("an unregistered client reads the window");
        if let Some(window) = window.filter(|window| window.as_secs() >= 8) {
            break window;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the window is {window:?} with 8 clients held at 1 per second"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    // The server's own connections are a handful, not another 8.
    assert!(window.as_secs() < 16, "{window:?}");

    let (_bob, registered) = stack.registered("bob").await;
    let read = kez_client::reconnect::learn_window(&registered)
        .await
        .expect("a registered client reads the window");
    assert!(read.is_some_and(|read| read.as_secs() >= 8), "{read:?}");
    assert!(
        kez_client::reconnect::advertised_window().is_some_and(|kept| kept.as_secs() >= 8),
        "the window read is kept for this process's reconnects"
    );
}

/// A broker that keeps no directory (no kez server behind it, or a configuration of an earlier
/// release) advertises no window: the client keeps its own.
#[tokio::test]
async fn a_broker_without_the_window_leaves_the_clients_own() {
    let nats = kez_tests::NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    assert_eq!(kez_client::reconnect::learn_window(&client).await, Ok(None));
}

/// A connection whose authorization expired comes back at once, not after the reconnect window:
/// nats-server says so (`-ERR 'User Authentication Expired'`) before it closes it, and only a
/// broker restart drops everyone at the same time (PROTOCOL.md §6.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_authorization_expired_does_not_wait_out_the_window() {
    const CLIENTS: usize = 10;
    let stack = CalloutStack::start_configured(|config| {
        let callout = config.callout.as_mut().expect("a callout stack");
        // Past the server's second count of the connections (5 s after its start).
        callout.authorization_lifetime = std::time::Duration::from_secs(10);
        // One second of window per connection held.
        callout.reconnects_per_sec = 1;
    })
    .await;
    let url = stack.nats.url();
    let started = std::time::Instant::now();
    // Per client: when it lost its connection and when it was back, seconds since `started`.
    type LostAndBack = (Option<f64>, Option<f64>);
    let times = Arc::new(std::sync::Mutex::new(vec![LostAndBack::default(); CLIENTS]));
    let mut connections = Vec::new();
    for slot in 0..CLIENTS {
        let key = Arc::new(SecretKey::generate());
        let times = times.clone();
        let options = kez_client::Connection::options_with_events(&key, move |event| {
            let now = started.elapsed().as_secs_f64();
            let mut times = times.lock().unwrap();
            match event {
                async_nats::Event::Disconnected if times[slot].0.is_none() => {
                    times[slot].0 = Some(now);
                }
                async_nats::Event::Connected if times[slot].0.is_some() => {
                    times[slot].1.get_or_insert(now);
                }
                _ => {}
            }
            std::future::ready(())
        });
        let connection = kez_client::Connection::connect_with(
            &url,
            key,
            options,
            kez_client::Plaintext::LoopbackOnly,
        )
        .await
        .expect("a new key connects");
        connections.push(connection);
    }
    // The window for the clients, learnt by this process before their authorizations expire.
    let window = loop {
        let window = kez_client::reconnect::learn_window(connections[0].nats())
            .await
            .unwrap();
        if let Some(window) = window.filter(|window| window.as_secs() >= CLIENTS as u64) {
            break window;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(9),
            "no window for {CLIENTS} clients advertised: {window:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };

    let deadline = started + std::time::Duration::from_secs(30);
    loop {
        let done = times.lock().unwrap().iter().all(|(_, back)| back.is_some());
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every connection came back after its authorization expired: {:?}",
            times.lock().unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let times = times.lock().unwrap().clone();
    for (lost, back) in &times {
        let away = back.unwrap() - lost.unwrap();
        // Its own 1 s window and a connect, not the advertised one.
        assert!(
            away < 1.6,
            "away {away:.2} s of a {window:?} window after an expired authorization: {times:?}"
        );
    }
}

/// A deployment whose broker config is the previous release's (the system user may not ask
/// STATSZ): the server serves as before and advertises no window, and its clients keep their
/// own (DEPLOY.md, Upgrades).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_config_of_the_previous_release_serves_without_a_window() {
    let keys_dir = tempfile::Builder::new()
        .prefix("kez-keys-")
        .tempdir()
        .unwrap();
    let keys = kez_chat_server::nats_conf::keygen(keys_dir.path())
        .unwrap()
        .0;
    let current = kez_chat_server::nats_conf::render_auth(&keys);
    let previous = current.replace(
        &format!(
            "\"{}\", ",
            kez_chat_server::reconnect_window::STATSZ_SUBJECT
        ),
        "",
    );
    assert_ne!(previous, current, "the previous release's SYS permissions");
    let nats = kez_tests::NatsServer::start_with(&previous);
    let server = kez_tests::kez_server::KezServer::start_with(&CalloutStack::config(
        &nats, &keys_dir, &keys,
    ))
    .await;
    let stack = CalloutStack {
        server,
        nats,
        keys_dir,
        keys,
    };
    // Serving: a new key registers and comes back with the chat profile.
    let (_bob, client) = stack.registered("bob").await;
    // Past the server's first count, which the broker refused.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(kez_client::reconnect::learn_window(&client).await, Ok(None));
}
