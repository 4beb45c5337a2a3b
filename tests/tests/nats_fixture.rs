//! Checks the [`NatsServer`] fixture against a real nats-server: clients connect, JetStream
//! key-value works, every fixture gets its own port, and dropping it stops the server.

use std::net::TcpStream;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use kez_tests::NatsServer;

#[tokio::test]
async fn jetstream_key_value_round_trip() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url())
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}; log:\n{}", nats.url(), nats.log()));
    assert_eq!(client.server_info().port, nats.port());

    let js = jetstream::new(client);
    let store = js
        .create_key_value(kv::Config {
            bucket: "fixture_check".to_string(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create KV bucket: {e}; log:\n{}", nats.log()));

    let revision = store.put("alice", "ed25519:00".into()).await.unwrap();
    assert_eq!(revision, 1);
    let got = store.get("alice").await.unwrap();
    assert_eq!(got.as_deref(), Some(&b"ed25519:00"[..]));
    assert_eq!(store.get("bob").await.unwrap(), None);

    // The bucket's stream lives in the fixture's store directory.
    let stream_dir = nats
        .store_dir()
        .join("jetstream/$G/streams/KV_fixture_check");
    assert!(
        stream_dir.is_dir(),
        "{} missing; log:\n{}",
        stream_dir.display(),
        nats.log()
    );
}

#[test]
fn each_fixture_has_its_own_port_and_drop_stops_it() {
    let a = NatsServer::start();
    let b = NatsServer::start();
    assert_ne!(a.port(), b.port());
    for nats in [&a, &b] {
        assert_ne!(
            nats.port(),
            4222,
            "the fixture must never use the default port"
        );
        assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));
        TcpStream::connect(("127.0.0.1", nats.port()))
            .unwrap_or_else(|e| panic!("connect to {}: {e}; log:\n{}", nats.url(), nats.log()));
    }

    let (port, dir) = (a.port(), a.store_dir());
    drop(a);
    let refused =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2));
    assert!(
        refused.is_err(),
        "port {port} still accepts connections after drop"
    );
    assert!(!dir.exists(), "{} not removed after drop", dir.display());

    // The other server is unaffected.
    TcpStream::connect(("127.0.0.1", b.port())).expect("second server still up");
}

#[tokio::test]
async fn start_with_appends_config() {
    let nats = NatsServer::start_with("max_payload: 2MB");
    let client = async_nats::connect(nats.url()).await.unwrap();
    assert_eq!(client.server_info().max_payload, 2 * 1024 * 1024);
}

#[test]
#[should_panic(expected = "nats-server exited before it was ready")]
fn bad_config_panics_with_the_log() {
    NatsServer::start_with("this_is_not { valid");
}

#[tokio::test]
async fn restart_keeps_the_port_and_the_jetstream_store() {
    let mut nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let store = jetstream::new(client)
        .create_key_value(kv::Config {
            bucket: "restart_check".to_string(),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    store.put("alice", "before".into()).await.unwrap();

    let port = nats.port();
    nats.restart();
    assert_eq!(nats.port(), port);
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    let log = nats.log();
    assert!(log.contains("--- kez-tests: restart ---"), "log:\n{log}");
    // Both runs are in the one log, and the old one shut down cleanly (SIGTERM, not SIGKILL).
    assert_eq!(log.matches("Server is ready").count(), 2, "log:\n{log}");
    assert!(log.contains("Server Exiting"), "log:\n{log}");

    // A fresh client finds the data.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let store = jetstream::new(client)
        .get_key_value("restart_check")
        .await
        .unwrap_or_else(|e| panic!("bucket gone after restart: {e}; log:\n{}", nats.log()));
    let value = store.get("alice").await.unwrap();
    assert_eq!(value.as_deref(), Some(&b"before"[..]));
}
