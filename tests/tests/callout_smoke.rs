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
