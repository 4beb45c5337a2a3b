//! Pinning (PROTOCOL.md §10) end to end: a real nats-server with the auth callout, an
//! in-process kez-chat-server with a pin node, and clients with real kez-blobs nodes on
//! loopback. The pin node fetches what owners name, serves it after the owner left, keeps every
//! owner within the quota under concurrent adds on two instances, gives the bytes back on remove
//! (GC reclaims the data), and answers hostile requests with stable errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kez_blobs::{BlobNode, BlobState, Hash, NodeConfig, parse_provider};
use kez_chat_server::config::ServerConfig;
use kez_chat_server::pin::{PINS_BUCKET, PinConfig};
use kez_client::{ClientError, Connection, PinState};
use kez_core::SecretKey;
use kez_core::file::BlobHash;
use kez_proto::pin::{PinOp, PinRequest};
use kez_tests::callout::{CalloutStack, register};
use kez_tests::kez_server::{KezServer, TEST_DOMAIN, call};
use kez_tests::requests::now;
use serde_json::{Value, json};
use tempfile::TempDir;

/// A callout stack whose server pins into a temporary directory with `quota` bytes per owner
/// and GC every second.
async fn pin_stack(quota: u64) -> (CalloutStack, TempDir) {
    let pin_dir = tempfile::Builder::new()
        .prefix("kez-pin-")
        .tempdir()
        .unwrap();
    let dir = pin_dir.path().join("node");
    let stack = CalloutStack::start_configured(|config| {
        config.pin = Some(pin_config(dir, quota));
        // These tests send bursts of pin requests from one key, over the default per-key
        // limit (PROTOCOL.md §5.5); tests/tests/hostile_clients.rs is where limits are tested.
        config.limits = kez_chat_server::limits::Limits::OFF;
    })
    .await;
    (stack, pin_dir)
}

fn pin_config(dir: std::path::PathBuf, quota: u64) -> PinConfig {
    PinConfig {
        quota_bytes: quota,
        gc_interval: Duration::from_secs(1),
        fetch_timeout: Duration::from_secs(20),
        dial_private: true,
        ..PinConfig::new(dir)
    }
}

/// A registered user with a kez-client connection and a blob node of their own.
struct Owner {
    key: Arc<SecretKey>,
    conn: Connection,
    node: BlobNode,
    _dir: TempDir,
}

impl Owner {
    async fn register(stack: &CalloutStack, name: &str) -> Owner {
        let key = Arc::new(SecretKey::generate());
        let server = stack.server_client().await;
        register(&server, &key, name).await.expect("registers");
        let conn = Connection::connect(&stack.nats.url(), key.clone())
            .await
            .expect("a registered key connects");
        let dir = tempfile::Builder::new()
            .prefix("kez-owner-")
            .tempdir()
            .unwrap();
        let node = BlobNode::open(&dir.path().join("node"), NodeConfig::default())
            .await
            .unwrap();
        Owner {
            key,
            conn,
            node,
            _dir: dir,
        }
    }

    /// Imports `len` pseudo-random bytes (distinct per `seed`) as a blob.
    async fn blob(&self, len: usize, seed: u8) -> (BlobHash, u64, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u64 * 31 + u64::from(seed) * 101 + (i as u64 >> 8)) as u8)
            .collect();
        let chunks =
            futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from(data.clone()))]);
        let (hash, size) = self
            .node
            .import_stream(chunks, &format!("share/{seed}"))
            .await
            .unwrap();
        (BlobHash::from_bytes(*hash.as_bytes()), size, data)
    }

    fn providers(&self) -> Vec<String> {
        vec![self.node.provider()]
    }
}

fn hash_of(blob: &BlobHash) -> Hash {
    Hash::from_bytes(*blob.as_bytes())
}

fn service_error(err: ClientError) -> kez_proto::ErrorAnswer {
    match err {
        ClientError::Service(err) => err.answer,
        other => panic!("expected a service error, got {other}"),
    }
}

/// The owner's pins entry as stored in the bucket.
async fn stored_pins(stack: &CalloutStack, key: &SecretKey) -> Value {
    let js = async_nats::jetstream::new(stack.server_client().await);
    let bucket = js.get_key_value(PINS_BUCKET).await.unwrap();
    let value = bucket
        .get(key.public_key().to_hex())
        .await
        .unwrap()
        .expect("an entry");
    serde_json::from_slice(&value).unwrap()
}

#[tokio::test]
async fn a_pinned_blob_is_served_by_the_pin_node_after_its_owner_left() {
    let (stack, _pin_dir) = pin_stack(1 << 30).await;
    let alice = Owner::register(&stack, "alice").await;

    let info = alice.conn.server_info().await.unwrap();
    let pin = info.pin.expect("server info names the pin node");
    assert_eq!(pin.quota_bytes, 1 << 30);
    let pin_node = stack.server.pin_node().expect("pinning is on");
    assert_eq!(pin.provider, pin_node.provider());

    let (blob, size, data) = alice.blob(300_000, 1).await;
    let record = alice
        .conn
        .pin_add(&blob, size, &alice.providers())
        .await
        .unwrap();
    assert_eq!((record.blob, record.size), (blob, size));
    assert_eq!(record.state, PinState::Pinned);
    assert_eq!(record.node, pin_node.id().to_string());
    assert_eq!(
        pin_node.has(hash_of(&blob)).await.unwrap(),
        BlobState::Complete { size }
    );
    let status = alice.conn.pin_status(&blob).await.unwrap();
    assert!(status.pinned);
    assert_eq!(status.pin.as_ref().map(|pin| pin.size), Some(size));

    // Again: the same record, nothing counted twice.
    let again = alice
        .conn
        .pin_add(&blob, size, &alice.providers())
        .await
        .unwrap();
    assert_eq!(again, record);
    let list = alice.conn.pin_list().await.unwrap();
    assert_eq!(list.pins, vec![record]);
    assert_eq!((list.used, list.quota_bytes), (size, 1 << 30));

    // The owner goes away; a stranger fetches from the pin node.
    let Owner {
        node, _dir: _kept, ..
    } = alice;
    node.shutdown().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stranger = BlobNode::open(&dir.path().join("node"), NodeConfig::default())
        .await
        .unwrap();
    let provider = parse_provider(&pin.provider).unwrap();
    let stats = stranger
        .download(hash_of(&blob), &[provider], "got", u64::MAX, |_| {})
        .await
        .expect("the pin node serves the blob");
    assert_eq!(stats.total, size);
    let mut reader = stranger.reader(hash_of(&blob)).await.unwrap();
    let mut fetched = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut fetched)
        .await
        .unwrap();
    assert!(fetched == data, "the pinned bytes are the owner's");

    stranger.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_quota_holds_and_remove_frees_it_and_gc_reclaims_the_bytes() {
    let (stack, _pin_dir) = pin_stack(500_000).await;
    let bob = Owner::register(&stack, "bob").await;
    let pin_node = stack.server.pin_node().unwrap().clone();

    let (first, first_size, _) = bob.blob(300_000, 1).await;
    let (second, second_size, _) = bob.blob(250_000, 2).await;
    bob.conn
        .pin_add(&first, first_size, &bob.providers())
        .await
        .unwrap();
    let refused = service_error(
        bob.conn
            .pin_add(&second, second_size, &bob.providers())
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (refused.code, refused.name.as_ref()),
        (413, "quota_exceeded")
    );
    assert!(
        refused.message.contains("300000 of 500000") && refused.message.contains("remove"),
        "the message says what is used and what to do: {}",
        refused.message
    );
    assert_eq!(
        pin_node.has(hash_of(&second)).await.unwrap(),
        BlobState::Missing,
        "nothing was fetched for a refused pin"
    );
    assert_eq!(bob.conn.pin_list().await.unwrap().used, first_size);

    let removed = bob.conn.pin_remove(&first).await.unwrap();
    assert_eq!((removed.size, removed.used), (first_size, 0));
    let gone = service_error(bob.conn.pin_remove(&first).await.unwrap_err());
    assert_eq!((gone.code, gone.name.as_ref()), (404, "not_found"));
    assert!(!bob.conn.pin_status(&first).await.unwrap().pinned);

    // GC (every second here) deletes the unpinned data.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let usage = pin_node.usage().await.unwrap();
        if usage.complete_bytes == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "GC did not reclaim the bytes: {usage:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        pin_node.has(hash_of(&first)).await.unwrap(),
        BlobState::Missing
    );

    // The previously refused pin fits now.
    let record = bob
        .conn
        .pin_add(&second, second_size, &bob.providers())
        .await
        .unwrap();
    assert_eq!(record.state, PinState::Pinned);
    let stored = stored_pins(&stack, &bob.key).await;
    assert_eq!(stored["used"], json!(second_size));
}

#[tokio::test]
async fn concurrent_adds_on_two_instances_never_exceed_the_quota() {
    const SIZE: usize = 100_000;
    const QUOTA: u64 = 750_000; // 7 of 20 fit.
    let (stack, pin_dir) = pin_stack(QUOTA).await;
    let mut second_config: ServerConfig =
        CalloutStack::config(&stack.nats, &stack.keys_dir, &stack.keys);
    second_config.pin = Some(pin_config(pin_dir.path().join("second"), QUOTA));
    let second = KezServer::start_with(&second_config).await;

    let carol = Owner::register(&stack, "carol").await;
    let mut blobs = Vec::new();
    for seed in 0..20 {
        let (blob, size, _) = carol.blob(SIZE, seed).await;
        blobs.push((blob, size));
    }
    let providers = carol.providers();
    let adds = blobs.iter().map(|(blob, size)| {
        let conn = carol.conn.clone();
        let providers = providers.clone();
        async move { conn.pin_add(blob, *size, &providers).await }
    });
    let results = futures::future::join_all(adds).await;
    let mut pinned = 0u64;
    for result in results {
        match result {
            Ok(record) => {
                assert_eq!(record.state, PinState::Pinned);
                pinned += record.size;
            }
            Err(err) => {
                let err = service_error(err);
                assert_eq!(err.name, "quota_exceeded", "{err}");
            }
        }
    }
    assert_eq!(pinned, 7 * SIZE as u64, "exactly what fits was pinned");

    let list = carol.conn.pin_list().await.unwrap();
    assert!(list.used <= QUOTA);
    assert_eq!(list.used, pinned);
    assert_eq!(list.pins.iter().map(|pin| pin.size).sum::<u64>(), pinned);
    assert!(list.pins.iter().all(|pin| pin.state == PinState::Pinned));
    let stored = stored_pins(&stack, &carol.key).await;
    let stored_sum: u64 = stored["pins"]
        .as_object()
        .unwrap()
        .values()
        .map(|pin| pin["size"].as_u64().unwrap())
        .sum();
    assert_eq!(stored["used"], json!(pinned));
    assert_eq!(stored_sum, pinned);
    second.stop().await;
}

#[tokio::test]
async fn a_wrong_size_or_an_offline_owner_pins_nothing() {
    let (stack, _pin_dir) = pin_stack(1 << 30).await;
    let dave = Owner::register(&stack, "dave").await;
    let pin_node = stack.server.pin_node().unwrap().clone();
    let (blob, size, _) = dave.blob(200_000, 3).await;

    for claimed in [100, size + 1] {
        let err = service_error(
            dave.conn
                .pin_add(&blob, claimed, &dave.providers())
                .await
                .unwrap_err(),
        );
        assert_eq!(
            (err.code, err.name.as_ref()),
            (400, "size_mismatch"),
            "{err}"
        );
    }
    let list = dave.conn.pin_list().await.unwrap();
    assert_eq!(
        (list.used, list.pins.len()),
        (0, 0),
        "reservations released"
    );
    assert!(pin_node.tags().await.unwrap().is_empty(), "no tag left");

    // A blob the pin node never saw (the one above may still be in its store until GC).
    let (unseen, unseen_size, _) = dave.blob(50_000, 4).await;
    let providers = dave.providers();
    let Owner {
        node,
        conn,
        _dir: _kept,
        ..
    } = dave;
    node.shutdown().await.unwrap();
    let err = service_error(
        conn.pin_add(&unseen, unseen_size, &providers)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (err.code, err.name.as_ref()),
        (502, "fetch_failed"),
        "{err}"
    );
    assert!(err.message.contains("online"), "{}", err.message);
    assert_eq!(conn.pin_list().await.unwrap().used, 0);
}

/// Sends `body` to `subject` and returns the error's code and name.
async fn refusal(client: &async_nats::Client, subject: &str, body: Vec<u8>) -> (u16, String) {
    match call(client, subject, body).await {
        Ok(answer) => panic!("{subject} accepted: {}", String::from_utf8_lossy(&answer)),
        Err(err) => {
            assert!(
                !err.message.is_empty(),
                "{subject}: an error says what went wrong"
            );
            (err.code, err.name)
        }
    }
}

#[tokio::test]
async fn hostile_pin_requests_get_stable_errors() {
    let (stack, _pin_dir) = pin_stack(1 << 30).await;
    let erin = Owner::register(&stack, "erin").await;
    let frank = Owner::register(&stack, "frank").await;
    let (client, _errors) = stack.connect_as(&erin.key).await.unwrap();
    let blob = BlobHash::from_bytes([5; 32]);
    let provider = erin.node.provider();
    let signed = |op: PinOp, key: &SecretKey, time: u64| match op {
        PinOp::Add => PinRequest::add(key, TEST_DOMAIN, time, blob, 10, vec![provider.clone()]),
        PinOp::Remove => PinRequest::remove(key, TEST_DOMAIN, time, blob),
        PinOp::List => PinRequest::list(key, TEST_DOMAIN, time),
        PinOp::Status => PinRequest::status(key, TEST_DOMAIN, time, blob),
    };
    let bytes = |request: &PinRequest| serde_json::to_vec(request).unwrap();
    let outsider = SecretKey::generate();

    for op in PinOp::ALL {
        let subject = op.subject();
        let good = signed(op, &erin.key, now());
        let good_json = serde_json::to_value(&good).unwrap();
        let mut unsigned = good.clone();
        unsigned.sig = kez_core::Signature::from_bytes([0; 64]);
        let mut other_key = good.clone();
        other_key.key = frank.key.public_key();
        let mut unknown = good_json.clone();
        unknown["extra"] = json!(1);
        let wrong_op = match op {
            PinOp::List => signed(PinOp::Status, &erin.key, now()),
            _ => signed(PinOp::List, &erin.key, now()),
        };
        let mut wrong_domain = good.clone();
        wrong_domain.domain = "elsewhere.example".into();
        let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
            ("empty", Vec::new(), 400, "malformed"),
            ("garbage", vec![0xff, 0, 1, 2, 3], 400, "malformed"),
            ("an array", b"[]".to_vec(), 400, "malformed"),
            ("a string", b"\"list\"".to_vec(), 400, "malformed"),
            (
                "unknown member",
                serde_json::to_vec(&unknown).unwrap(),
                400,
                "malformed",
            ),
            ("64 KiB", vec![b' '; 64 * 1024], 413, "too_large"),
            ("another op", bytes(&wrong_op), 400, "malformed"),
            ("another domain", bytes(&wrong_domain), 400, "wrong_domain"),
            ("unsigned", bytes(&unsigned), 401, "bad_signature"),
            (
                "replayed with another key",
                bytes(&other_key),
                401,
                "bad_signature",
            ),
            (
                "stale",
                bytes(&signed(op, &erin.key, now() - 3600)),
                401,
                "outside_window",
            ),
            (
                "unregistered key",
                bytes(&signed(op, &outsider, now())),
                403,
                "not_registered",
            ),
        ];
        for (what, body, code, name) in cases {
            let (got_code, got_name) = refusal(&client, subject, body).await;
            assert_eq!(
                (got_code, got_name.as_str()),
                (code, name),
                "{subject}: {what}"
            );
        }
    }

    // Valid but impossible.
    let (code, name) = refusal(
        &client,
        "kez.pin.remove",
        bytes(&signed(PinOp::Remove, &erin.key, now())),
    )
    .await;
    assert_eq!((code, name.as_str()), (404, "not_found"));
    let unusable = PinRequest::add(
        &erin.key,
        TEST_DOMAIN,
        now(),
        blob,
        10,
        vec!["https://x".into()],
    );
    let (code, name) = refusal(&client, "kez.pin.add", bytes(&unusable)).await;
    assert_eq!((code, name.as_str()), (400, "malformed"));

    // A disabled key is refused on every subject.
    let js = async_nats::jetstream::new(stack.server_client().await);
    let disabled = js.get_key_value("kez_disabled").await.unwrap();
    disabled
        .put(
            frank.key.public_key().to_hex(),
            Bytes::from(json!({"handle": "@frank@kez.test", "since": 0}).to_string()),
        )
        .await
        .unwrap();
    for op in PinOp::ALL {
        let (code, name) =
            refusal(&client, op.subject(), bytes(&signed(op, &frank.key, now()))).await;
        assert_eq!((code, name.as_str()), (403, "disabled"), "{op:?}");
    }

    // Still serving.
    let list = erin.conn.pin_list().await.unwrap();
    assert_eq!(list.used, 0);
    let info = erin.conn.server_info().await.unwrap();
    assert!(info.pin.is_some());
}

#[tokio::test]
async fn without_a_pin_dir_there_is_no_pin_service() {
    let stack = CalloutStack::start().await;
    let key = Arc::new(SecretKey::generate());
    let server = stack.server_client().await;
    register(&server, &key, "gina").await.unwrap();
    let conn = Connection::connect(&stack.nats.url(), key.clone())
        .await
        .unwrap();
    assert_eq!(conn.server_info().await.unwrap().pin, None);
    let info: Value =
        serde_json::from_slice(&call(&server, "kez.server.info", "{}").await.unwrap()).unwrap();
    assert!(info.get("pin").is_none(), "{info}");
    match conn.pin_list().await {
        Err(ClientError::Request { .. }) => {}
        other => panic!("no responder expected, got {other:?}"),
    }
}
