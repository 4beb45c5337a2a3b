//! Measurement 1, chat messages: kez-client end to end (seal and sign, publish to the
//! recipient's JetStream inbox, the stream's acknowledgement; the recipient fetches, opens and
//! verifies, stores in redb, acknowledges) against raw JetStream publish/fetch/acknowledge of
//! payloads of the sealed envelope's size, on a stream and consumer configured like the inbox.
//!
//! Throughput: `n` messages, publishes pipelined with up to [`WINDOW`] acknowledgements
//! outstanding, timed from the first publish until the recipient has the last one. Latency:
//! one message at a time, from before the seal until the recipient has stored and
//! acknowledged it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use kez_chat_server::store::INBOX_MAX_MESSAGES;
use kez_client::{Connection, Contact, Home, Store};
use kez_core::SecretKey;
use kez_core::envelope::MessageId;
use kez_proto::subjects::{INBOX_STREAM, inbox_consumer};
use kez_tests::callout::CalloutStack;
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::measure::{Budget, Latencies, cpu_of, nats_pid, per_sec};
use crate::report::{Goal, Row};

/// The chat body: a longish chat line.
pub const BODY_BYTES: usize = 256;
/// Publishes whose acknowledgement may be outstanding at once.
pub const WINDOW: usize = 256;
/// Messages one fetch asks for.
const FETCH: usize = 256;
/// Content type of the benchmark's messages.
const CONTENT_TYPE: &str = "text";

const SECTION: &str = "chat";
const RAW_STREAM: &str = "BENCH_RAW";
const RAW_SUBJECT: &str = "bench.raw.inbox";
const RAW_CONSUMER: &str = "bench_raw";

/// A registered user with a connection on the chat profile and a store.
struct User {
    conn: Connection,
    store: Store,
    key: Arc<SecretKey>,
    _dir: TempDir,
}

impl User {
    async fn register(url: &str, name: &str) -> Result<User, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let home = Home::open(dir.path().join("home")).map_err(|e| e.to_string())?;
        let (key, _) = home.key_or_create().map_err(|e| e.to_string())?;
        let key = Arc::new(key);
        let narrow = Connection::connect(url, key.clone())
            .await
            .map_err(|e| e.to_string())?;
        narrow
            .register(name)
            .await
            .map_err(|e| format!("registering {name}: {e}"))?;
        narrow.close().await.map_err(|e| e.to_string())?;
        let conn = Connection::connect(url, key.clone())
            .await
            .map_err(|e| e.to_string())?;
        // Contacts verify the sigchain, so write its first link as `kez-chat register` does.
        let first = kez_core::UnsignedLink::first(
            key.public_key(),
            kez_client::now(),
            kez_tests::requests::nats_endpoint("nats"),
        )
        .sign(&key)
        .map_err(|e| e.to_string())?;
        conn.append(first.bytes())
            .await
            .map_err(|e| e.to_string())?;
        let store = home.store().map_err(|e| e.to_string())?;
        Ok(User {
            conn,
            store,
            key,
            _dir: dir,
        })
    }
}

/// A body of `len` bytes whose first 8 are the microseconds since `epoch` now.
fn stamped(epoch: Instant, len: usize) -> Vec<u8> {
    let mut body = vec![b'k'; len.max(8)];
    let micros = epoch.elapsed().as_micros() as u64;
    body[..8].copy_from_slice(&micros.to_be_bytes());
    body
}

/// Runs measurement 1.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    // One sender at full speed: the per-sender mail budget would measure itself.
    let stack = CalloutStack::start_configured(|config| {
        config.limits = kez_chat_server::limits::Limits::OFF;
    })
    .await;
    let url = stack.nats.url();
    let alice = User::register(&url, "alice").await?;
    let bob = User::register(&url, "bob").await?;
    let contact = alice
        .conn
        .verify_contact(&alice.store, &kez_tests::kez_server::test_handle("@bob"))
        .await
        .map_err(|e| format!("alice adds bob: {e}"))?
        .contact;
    let sealed_len = kez_core::envelope::seal(
        &alice.key,
        &bob.key.public_key(),
        CONTENT_TYPE,
        &[0; BODY_BYTES],
        0,
    )
    .map_err(|e| e.to_string())?
    .1
    .len();

    let raw = Raw::start(&stack, &bob.key.public_key()).await?;
    // Never more than one inbox holds: past it the stream refuses new messages (by design).
    let n = budget.pick(2_000, 20_000).min(INBOX_MAX_MESSAGES as usize);
    let single = budget.pick(200, 1_000);
    let epoch = Instant::now();

    // Both sides share the machine's cores: CPU time per message says what bounds the rates.
    let pids = [nats_pid(&stack.nats)?, std::process::id()];
    let cpu = || cpu_of(&pids);
    let before = cpu()?;
    let raw_rate = raw.throughput(n, sealed_len, epoch).await?;
    let raw_cpu = cpu()? - before;
    let before = cpu()?;
    let ours_rate = throughput(&alice, &bob, &contact, n, epoch).await?;
    let ours_cpu = cpu()? - before;
    let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / n as f64;
    let mut raw_latency = raw.latency(single, sealed_len, epoch).await?;
    let mut ours_latency = latency(&alice, &bob, &contact, single, epoch).await?;
    let mut commits = store_commits(&alice.key, &bob.key, single)?;

    let what = format!("{BODY_BYTES} B body, {sealed_len} B sealed");
    Ok(vec![
        Row::versus(
            SECTION,
            format!("messages/s, {n} pipelined ({what})"),
            "msg/s",
            ours_rate,
            raw_rate,
            "raw JetStream",
            Goal::RatioAtLeast(0.8),
        ),
        Row::versus(
            SECTION,
            format!("CPU per message, {n} pipelined (nats-server + both clients)"),
            "µs",
            per_message(ours_cpu),
            per_message(raw_cpu),
            "raw JetStream",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("latency p50, one at a time ({single})"),
            "ms",
            ours_latency.percentile_ms(50.0),
            raw_latency.percentile_ms(50.0),
            "raw JetStream",
            Goal::AddedBelow(1.0),
        ),
        Row::versus(
            SECTION,
            format!("latency p99, one at a time ({single})"),
            "ms",
            ours_latency.percentile_ms(99.0),
            raw_latency.percentile_ms(99.0),
            "raw JetStream",
            Goal::None,
        ),
        Row::info(
            SECTION,
            format!("recipient's store commit p50, one message ({single})"),
            "ms",
            commits.percentile_ms(50.0),
        ),
    ])
}

/// What storing one received message costs bob before he may acknowledge it: one redb
/// transaction (history and seen id) with its disk sync, in a store of its own.
fn store_commits(alice: &SecretKey, bob: &SecretKey, count: usize) -> Result<Latencies, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let store = Store::open(dir.path().join("store.redb")).map_err(|e| e.to_string())?;
    let mut commits = Latencies::default();
    for _ in 0..count {
        let (_, sealed) = kez_core::envelope::seal(
            alice,
            &bob.public_key(),
            CONTENT_TYPE,
            &[b'k'; BODY_BYTES],
            kez_client::now(),
        )
        .map_err(|e| e.to_string())?;
        let message = kez_core::envelope::open(bob, &sealed).map_err(|e| e.to_string())?;
        let started = Instant::now();
        store
            .record_incoming_all(&[(message.clone(), 0)], kez_client::now())
            .map_err(|e| e.to_string())?;
        commits.push(started.elapsed());
    }
    Ok(commits)
}

/// kez-client throughput: alice publishes `n` messages pipelined while bob receives.
async fn throughput(
    alice: &User,
    bob: &User,
    contact: &Contact,
    n: usize,
    epoch: Instant,
) -> Result<f64, String> {
    let started = Instant::now();
    let receiving = receive_all(bob, n);
    let sending = async {
        let mut window = VecDeque::with_capacity(WINDOW);
        for _ in 0..n {
            if window.len() == WINDOW {
                let pending: kez_client::Pending = window.pop_front().expect("a full window");
                pending.acked().await.map_err(|e| e.to_string())?;
            }
            let body = stamped(epoch, BODY_BYTES);
            let pending = alice
                .conn
                .publish(contact, CONTENT_TYPE, &body)
                .await
                .map_err(|e| e.to_string())?;
            window.push_back(pending);
        }
        for pending in window {
            pending.acked().await.map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    };
    // A failure on either side ends both: the other would wait forever.
    tokio::try_join!(sending, receiving)?;
    Ok(per_sec(n, started.elapsed()))
}

/// bob receives until he has `n` messages.
async fn receive_all(bob: &User, n: usize) -> Result<(), String> {
    let mut got = 0;
    while got < n {
        let messages = bob
            .conn
            .receive(&bob.store, FETCH, Duration::from_millis(500))
            .await
            .map_err(|e| format!("bob receives: {e}"))?;
        got += messages.len();
    }
    Ok(())
}

/// kez-client latency: one message at a time, sealed, sent, received, stored, acknowledged.
async fn latency(
    alice: &User,
    bob: &User,
    contact: &Contact,
    count: usize,
    epoch: Instant,
) -> Result<Latencies, String> {
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let receiving = async move {
        let mut got = 0;
        while got < count {
            let messages = bob
                .conn
                .receive(&bob.store, 1, Duration::from_secs(5))
                .await
                .map_err(|e| format!("bob receives: {e}"))?;
            for message in messages {
                let _ = arrived_tx.send((Instant::now(), message.body));
                got += 1;
            }
        }
        Ok::<(), String>(())
    };
    let sending = async {
        let mut latencies = Latencies::default();
        for _ in 0..count {
            let started = Instant::now();
            let body = stamped(epoch, BODY_BYTES);
            let pending = alice
                .conn
                .publish(contact, CONTENT_TYPE, &body)
                .await
                .map_err(|e| e.to_string())?;
            let (at, received) = arrived
                .recv()
                .await
                .ok_or("bob stopped receiving".to_owned())?;
            pending.acked().await.map_err(|e| e.to_string())?;
            if received != body {
                return Err("bob received another body than alice sent".to_owned());
            }
            latencies.push(at - started);
        }
        Ok(latencies)
    };
    Ok(tokio::try_join!(sending, receiving)?.0)
}

/// The baseline: a stream and a durable pull consumer configured like `KEZ_INBOX` and a
/// user's inbox consumer, used by two plain connections in the server's account.
struct Raw {
    publisher: jetstream::Context,
    consumer: PullConsumer,
}

impl Raw {
    async fn start(stack: &CalloutStack, like: &kez_core::PublicKey) -> Result<Raw, String> {
        let admin = jetstream::new(stack.server_client().await);
        let mut inbox = admin
            .get_stream(INBOX_STREAM)
            .await
            .map_err(|e| format!("the inbox stream: {e}"))?;
        let mut stream = inbox
            .info()
            .await
            .map_err(|e| format!("the inbox stream's config: {e}"))?
            .config
            .clone();
        stream.name = RAW_STREAM.to_owned();
        stream.subjects = vec![RAW_SUBJECT.to_owned()];
        stream.description = Some("kez-bench: raw baseline".to_owned());
        let raw_stream = admin
            .create_stream(stream)
            .await
            .map_err(|e| format!("creating the raw stream: {e}"))?;
        let mut user_consumer: PullConsumer = inbox
            .get_consumer(&inbox_consumer(like))
            .await
            .map_err(|e| format!("the inbox consumer: {e}"))?;
        let like_config = user_consumer
            .info()
            .await
            .map_err(|e| format!("the inbox consumer's config: {e}"))?
            .config
            .clone();
        raw_stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(RAW_CONSUMER.to_owned()),
                filter_subject: RAW_SUBJECT.to_owned(),
                ack_policy: like_config.ack_policy,
                ack_wait: like_config.ack_wait,
                max_ack_pending: like_config.max_ack_pending,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating the raw consumer: {e}"))?;
        let consumer_client = stack.server_client().await;
        let consumer: PullConsumer = jetstream::new(consumer_client)
            .get_consumer_from_stream(RAW_CONSUMER, RAW_STREAM)
            .await
            .map_err(|e| format!("the raw consumer: {e}"))?;
        Ok(Raw {
            publisher: jetstream::new(stack.server_client().await),
            consumer,
        })
    }

    async fn publish(
        &self,
        len: usize,
        epoch: Instant,
    ) -> Result<(jetstream::context::PublishAckFuture, Vec<u8>), String> {
        let payload = stamped(epoch, len);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", MessageId::random().to_string().as_str());
        let ack = self
            .publisher
            .publish_with_headers(RAW_SUBJECT, headers, payload.clone().into())
            .await
            .map_err(|e| format!("raw publish: {e}"))?;
        Ok((ack, payload))
    }

    /// Fetches up to `max` messages (waiting up to `wait`), acknowledging each as the client
    /// does (double ack); answers each payload and when it was acknowledged.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<(Instant, Vec<u8>)>, String> {
        let mut batch = self
            .consumer
            .batch()
            .max_messages(max)
            .expires(wait)
            .messages()
            .await
            .map_err(|e| format!("raw fetch: {e}"))?;
        let mut got = Vec::new();
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| format!("raw fetch: {e}"))?;
            message
                .double_ack()
                .await
                .map_err(|e| format!("raw ack: {e}"))?;
            got.push((Instant::now(), message.payload.to_vec()));
        }
        Ok(got)
    }

    async fn throughput(&self, n: usize, len: usize, epoch: Instant) -> Result<f64, String> {
        let started = Instant::now();
        let receiving = async {
            let mut got = 0;
            while got < n {
                got += self.fetch(FETCH, Duration::from_millis(500)).await?.len();
            }
            Ok::<(), String>(())
        };
        let sending = async {
            let mut window = VecDeque::with_capacity(WINDOW);
            for _ in 0..n {
                if window.len() == WINDOW {
                    let ack: jetstream::context::PublishAckFuture =
                        window.pop_front().expect("a full window");
                    ack.await.map_err(|e| format!("raw ack: {e}"))?;
                }
                window.push_back(self.publish(len, epoch).await?.0);
            }
            for ack in window {
                ack.await.map_err(|e| format!("raw ack: {e}"))?;
            }
            Ok::<(), String>(())
        };
        tokio::try_join!(sending, receiving)?;
        Ok(per_sec(n, started.elapsed()))
    }

    async fn latency(&self, count: usize, len: usize, epoch: Instant) -> Result<Latencies, String> {
        let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
        let receiving = async move {
            let mut got = 0;
            while got < count {
                for message in self.fetch(1, Duration::from_secs(5)).await? {
                    let _ = arrived_tx.send(message);
                    got += 1;
                }
            }
            Ok::<(), String>(())
        };
        let sending = async {
            let mut latencies = Latencies::default();
            for _ in 0..count {
                let started = Instant::now();
                let (ack, payload) = self.publish(len, epoch).await?;
                let (at, received) = arrived
                    .recv()
                    .await
                    .ok_or("the raw consumer stopped".to_owned())?;
                ack.await.map_err(|e| format!("raw ack: {e}"))?;
                if received != payload {
                    return Err("the raw consumer received another payload".to_owned());
                }
                latencies.push(at - started);
            }
            Ok(latencies)
        };
        Ok(tokio::try_join!(sending, receiving)?.0)
    }
}
