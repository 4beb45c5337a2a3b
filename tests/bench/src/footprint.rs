//! Measurement 6, server footprint: the real `kez-chat-server` binary's resident memory idle
//! and after `n` registrations (each one a handle record, a reverse entry and a durable inbox
//! consumer in JetStream), nats-server's beside it, and the JetStream store's disk use (`du`:
//! allocated blocks) per registered user and per stored message of a chat envelope's size; also
//! how long a start's inbox-consumer check and one inbox sweep take at that size.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use kez_core::SecretKey;
use kez_proto::subjects::inbox_subject;
use kez_tests::NatsServer;
use kez_tests::process::{KezServerProcess, LIMITS_OFF};

use crate::chat::{BODY_BYTES, WINDOW};
use crate::measure::{Budget, disk_usage, mib, nats_pid, per_sec, proc_status_kib};
use crate::report::Row;

const SECTION: &str = "footprint";
/// Registrations in flight at once.
const CONCURRENCY: usize = 64;
/// How long nats-server gets to write what it buffered before the store is measured.
const SETTLE: Duration = Duration::from_secs(2);

/// Runs measurement 6.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    let users = budget.users.unwrap_or(budget.pick(2_000, 100_000));
    let messages = budget.pick(5_000, 50_000);
    let nats = NatsServer::start();
    let url = nats.url();
    // Thousands of registrations from one address: the limits would measure themselves.
    let server = KezServerProcess::spawn_with_args(&url, &LIMITS_OFF).await;
    let nats_pid = nats_pid(&nats)?;
    let store = nats.store_dir();
    tokio::time::sleep(SETTLE).await;
    let rss = |pid: u32, what: &str| {
        proc_status_kib(pid, "VmRSS").ok_or(format!("{what} is gone: cannot read its memory"))
    };
    let server_idle = rss(server.id(), "kez-chat-server")?;
    let nats_idle = rss(nats_pid, "nats-server")?;
    let disk_empty = disk_usage(&store);

    let client = async_nats::connect(&url)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    let started = Instant::now();
    let keys = register_all(&client, users).await?;
    let registering = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    let server_full = rss(server.id(), "kez-chat-server")?;
    let nats_full = rss(nats_pid, "nats-server")?;
    let disk_users = disk_usage(&store);
    // What every kez-chat-server start does before it serves: make sure each registered user
    // has an inbox consumer.
    let opened =
        kez_chat_server::store::Store::open(&jetstream::new(client.clone()), Default::default())
            .await
            .map_err(|e| format!("opening the store: {e}"))?;
    let started = Instant::now();
    let created = opened
        .ensure_all_inbox_consumers()
        .await
        .map_err(|e| format!("checking the inbox consumers: {}", e.message))?;
    let start_check = started.elapsed();

    // Messages of a sealed chat body's size (see the chat section).
    let sender = SecretKey::generate();
    let message_bytes = kez_core::envelope::seal(
        &sender,
        &sender.public_key(),
        "text",
        &[0; BODY_BYTES],
        kez_client::now(),
    )
    .map_err(|e| format!("seal: {e}"))?
    .1
    .len();
    publish_all(&client, &keys, messages, message_bytes).await?;
    tokio::time::sleep(SETTLE).await;
    let disk_messages = disk_usage(&store);
    // What every instance does every --inbox-sweep-secs: with every inbox holding messages, each
    // consumer is listed and compared (none is acknowledged, so nothing is deleted).
    let started = Instant::now();
    let swept = opened
        .sweep_acknowledged_inbox_messages()
        .await
        .map_err(|e| format!("sweeping the inbox stream: {}", e.message))?;
    let sweep = started.elapsed();

    let per_user = disk_users.saturating_sub(disk_empty) as f64 / users as f64;
    let per_message = disk_messages.saturating_sub(disk_users) as f64 / messages as f64;
    Ok(vec![
        Row::info(SECTION, "kez-chat-server RSS idle", "MiB", mib(server_idle)),
        Row::info(
            SECTION,
            format!("kez-chat-server RSS after {users} registrations"),
            "MiB",
            mib(server_full),
        ),
        Row::info(SECTION, "nats-server RSS idle", "MiB", mib(nats_idle)),
        Row::info(
            SECTION,
            format!("nats-server RSS with {users} users"),
            "MiB",
            mib(nats_full),
        ),
        Row::info(
            SECTION,
            format!("registrations/s, {CONCURRENCY} concurrent"),
            "req/s",
            per_sec(users, registering),
        ),
        Row::info(
            SECTION,
            format!("server start: inbox consumers checked, {users} users ({created} created)"),
            "s",
            start_check.as_secs_f64(),
        ),
        Row::info(
            SECTION,
            format!("inbox sweep: {users} users, {messages} messages waiting ({swept} deleted)"),
            "s",
            sweep.as_secs_f64(),
        ),
        Row::info(SECTION, "JetStream disk per user", "B", per_user),
        Row::versus(
            SECTION,
            format!("JetStream disk per stored message ({messages})"),
            "B",
            per_message,
            message_bytes as f64,
            "payload",
            crate::report::Goal::None,
        ),
    ])
}

/// Registers `count` fresh keys as `fp<index>`, [`CONCURRENCY`] at a time; answers the keys.
async fn register_all(
    client: &async_nats::Client,
    count: usize,
) -> Result<Vec<kez_core::PublicKey>, String> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(CONCURRENCY);
    for _ in 0..CONCURRENCY {
        let client = client.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut keys = Vec::new();
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= count {
                    return Ok::<_, String>(keys);
                }
                let key = SecretKey::generate();
                kez_tests::callout::register(&client, &key, &format!("fp{index}"))
                    .await
                    .map_err(|e| format!("registering user {index}: {e:?}"))?;
                keys.push(key.public_key());
            }
        }));
    }
    let mut keys = Vec::with_capacity(count);
    for task in tasks {
        keys.extend(
            task.await
                .map_err(|e| format!("a registering task panicked: {e}"))??,
        );
    }
    Ok(keys)
}

/// Publishes `count` messages of `size` bytes round-robin into the users' inboxes,
/// pipelined, each acknowledged by the stream.
async fn publish_all(
    client: &async_nats::Client,
    keys: &[kez_core::PublicKey],
    count: usize,
    size: usize,
) -> Result<(), String> {
    let js = jetstream::new(client.clone());
    let payload = Bytes::from(vec![0xa5u8; size]);
    let mut window = VecDeque::with_capacity(WINDOW);
    for index in 0..count {
        if window.len() == WINDOW {
            let ack: jetstream::context::PublishAckFuture =
                window.pop_front().expect("a full window");
            ack.await.map_err(|e| format!("storing a message: {e}"))?;
        }
        let subject = inbox_subject(&keys[index % keys.len()]);
        window.push_back(
            js.publish(subject, payload.clone())
                .await
                .map_err(|e| format!("publishing a message: {e}"))?,
        );
    }
    for ack in window {
        ack.await.map_err(|e| format!("storing a message: {e}"))?;
    }
    Ok(())
}
