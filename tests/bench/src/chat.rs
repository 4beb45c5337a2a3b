//! Measurement 1, chat messages: kez-client end to end (seal and sign, `kez.mail.send` to the
//! server, which stores the envelope in the recipient's inbox subject of `KEZ_MAIL` and answers;
//! the recipient fetches with `kez.mail.fetch`, opens and verifies, stores in redb, and
//! acknowledges by naming what it stored in its next fetch, woken by the new-mail notification)
//! against two raw JetStream paths carrying payloads of the sealed envelope's size:
//!
//! - the previous release's read path: a work-queue stream and a durable pull consumer with the
//!   old inbox's settings, fetched and double-acknowledged (the goals are set against it);
//! - what the server does for a fetch, without the hop through it: batch direct gets of one
//!   subject of `KEZ_MAIL` and a purge up to what was received, woken by the stream's
//!   notifications.
//!
//! Throughput: `n` messages, publishes pipelined with up to [`WINDOW`] acknowledgements
//! outstanding, timed from the first publish until the recipient has the last one. Latency:
//! one message at a time, from before the seal until the recipient has it (stored, for ours).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::{FutureExt, StreamExt};
use kez_chat_server::store::{
    DEFAULT_INBOX_MAX_BYTES, INBOX_DUPLICATE_WINDOW, INBOX_MAX_AGE, INBOX_MAX_MESSAGES,
    INBOX_MAX_STORED_BYTES,
};
use kez_client::{Connection, Contact, Home, InboxFloor, Store};
use kez_core::SecretKey;
use kez_core::envelope::MessageId;
use kez_proto::mail::MAX_FETCH_MESSAGES;
use kez_proto::subjects::{inbox_subject, new_mail_subject};
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
const CONSUMER_STREAM: &str = "BENCH_RAW";
const CONSUMER_SUBJECT: &str = "bench.raw.inbox";
const CONSUMER_NAME: &str = "bench_raw";

/// A registered user with a connection on the chat profile and a store.
pub struct User {
    /// The connection, on the chat profile.
    pub conn: Connection,
    /// The user's store.
    pub store: Store,
    /// The user's key.
    pub key: Arc<SecretKey>,
    _dir: TempDir,
}

impl User {
    /// Registers `name` with a new key in a new home, and writes its first link.
    pub async fn register(url: &str, name: &str) -> Result<User, String> {
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
        write_first_link(&conn, &key).await?;
        let store = home.store().map_err(|e| e.to_string())?;
        Ok(User {
            conn,
            store,
            key,
            _dir: dir,
        })
    }
}

/// Writes `key`'s first sigchain link over `conn`, as `kez-chat register` does: contacts
/// verify the sigchain.
pub async fn write_first_link(conn: &Connection, key: &SecretKey) -> Result<(), String> {
    let first = kez_core::UnsignedLink::first(
        key.public_key(),
        kez_client::now(),
        kez_tests::requests::nats_endpoint("nats"),
    )
    .sign(key)
    .map_err(|e| e.to_string())?;
    conn.append(first.bytes())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// A body of `len` bytes whose first 8 are the microseconds since `epoch` now.
pub fn stamped(epoch: Instant, len: usize) -> Vec<u8> {
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

    let consumer = Consumer::start(&stack).await?;
    let mail = Mail::start(&stack).await?;
    // Never more than one inbox holds: past it the stream refuses new messages (by design).
    let n = budget.pick(2_000, 20_000).min(INBOX_MAX_MESSAGES as usize);
    let single = budget.pick(200, 1_000);
    let epoch = Instant::now();

    // Both sides share the machine's cores: CPU time per message says what bounds the rates.
    let pids = [nats_pid(&stack.nats)?, std::process::id()];
    let cpu = || cpu_of(&pids);
    let before = cpu()?;
    let consumer_rate = raw_throughput(&consumer, n, sealed_len, epoch).await?;
    let consumer_cpu = cpu()? - before;
    let before = cpu()?;
    let mail_rate = raw_throughput(&mail, n, sealed_len, epoch).await?;
    let mail_cpu = cpu()? - before;
    let before = cpu()?;
    let ours_rate = throughput(&alice, &bob, &contact, n, epoch).await?;
    let ours_cpu = cpu()? - before;
    let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / n as f64;
    let mut consumer_latency = raw_latency(&consumer, single, sealed_len, epoch).await?;
    let mut mail_latency = raw_latency(&mail, single, sealed_len, epoch).await?;
    let mut ours_latency = latency(&alice, &bob, &contact, single, epoch).await?;
    let mut commits = store_commits(&alice.key, &bob.key, single)?;

    // Forward secrecy in the same run (PROTOCOL.md §15): both publish prekeys and bind their
    // Olm keys, alice verifies bob again (his Olm key), bob answers once so the session is
    // established (normal Olm messages, as in a conversation), then the same measurements.
    for (who, user) in [("alice", &alice), ("bob", &bob)] {
        match user.conn.prepare_forward_secrecy(&user.store).await {
            Ok(kez_client::ForwardSecrecy::Ready) => {}
            other => return Err(format!("{who} prepares forward secrecy: {other:?}")),
        }
    }
    let secret = alice
        .conn
        .verify_contact(&alice.store, &kez_tests::kez_server::test_handle("@bob"))
        .await
        .map_err(|e| format!("alice verifies bob again: {e}"))?
        .contact;
    if !secret.forward_secret() {
        return Err("bob's Olm key is not in his verified chain".to_owned());
    }
    establish(&alice, &bob, &secret).await?;
    let before = cpu()?;
    let secret_rate = throughput(&alice, &bob, &secret, n, epoch).await?;
    let secret_cpu = cpu()? - before;
    let mut secret_latency = latency(&alice, &bob, &secret, single, epoch).await?;
    let mut claims = claim_latency(&alice, &bob, single).await?;
    let mut sessions = session_cost(single)?;

    let what = format!("{BODY_BYTES} B body, {sealed_len} B sealed");
    let ours_p50 = ours_latency.percentile_ms(50.0);
    Ok(vec![
        Row::versus(
            SECTION,
            format!("messages/s, {n} pipelined ({what})"),
            "msg/s",
            ours_rate,
            consumer_rate,
            CONSUMER,
            Goal::RatioAtLeast(0.8),
        ),
        Row::versus(
            SECTION,
            format!("messages/s, {n} pipelined"),
            "msg/s",
            ours_rate,
            mail_rate,
            MAIL,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("CPU per message, {n} pipelined (nats-server + both clients)"),
            "µs",
            per_message(ours_cpu),
            per_message(consumer_cpu),
            CONSUMER,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("CPU per message, {n} pipelined (nats-server + both clients)"),
            "µs",
            per_message(ours_cpu),
            per_message(mail_cpu),
            MAIL,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("latency p50, one at a time ({single})"),
            "ms",
            ours_p50,
            consumer_latency.percentile_ms(50.0),
            CONSUMER,
            Goal::AddedBelow(1.0),
        ),
        Row::versus(
            SECTION,
            format!("latency p50, one at a time ({single})"),
            "ms",
            ours_p50,
            mail_latency.percentile_ms(50.0),
            MAIL,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("latency p99, one at a time ({single})"),
            "ms",
            ours_latency.percentile_ms(99.0),
            consumer_latency.percentile_ms(99.0),
            CONSUMER,
            Goal::None,
        ),
        Row::info(
            SECTION,
            format!("recipient's store commit p50, one message ({single})"),
            "ms",
            commits.percentile_ms(50.0),
        ),
        Row::versus(
            SECTION,
            format!("forward secret messages/s, {n} pipelined (Olm, envelope v2)"),
            "msg/s",
            secret_rate,
            consumer_rate,
            CONSUMER,
            Goal::RatioAtLeast(0.8),
        ),
        Row::versus(
            SECTION,
            format!("forward secret messages/s, {n} pipelined"),
            "msg/s",
            secret_rate,
            ours_rate,
            ENVELOPE_V1,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("forward secret CPU per message, {n} pipelined (nats-server + both clients)"),
            "µs",
            per_message(secret_cpu),
            per_message(ours_cpu),
            ENVELOPE_V1,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("forward secret latency p50, one at a time ({single})"),
            "ms",
            secret_latency.percentile_ms(50.0),
            ours_p50,
            ENVELOPE_V1,
            Goal::AddedBelow(1.0),
        ),
        Row::versus(
            SECTION,
            format!("forward secret latency p50, one at a time ({single})"),
            "ms",
            secret_latency.percentile_ms(50.0),
            consumer_latency.percentile_ms(50.0),
            CONSUMER,
            Goal::AddedBelow(1.5),
        ),
        Row::info(
            SECTION,
            format!("new session: prekey claim round trip p50 ({single})"),
            "ms",
            claims.percentile_ms(50.0),
        ),
        Row::info(
            SECTION,
            format!(
                "new session: Olm outbound + first pre-key message + inbound + decrypt p50 ({single})"
            ),
            "ms",
            sessions.percentile_ms(50.0),
        ),
    ])
}

/// The same run's kez-client rows with envelope version 1, as a baseline's name.
const ENVELOPE_V1: &str = "envelope v1 (same run)";

/// alice and bob exchange one message each way over `secret` (bob's contact of alice verified
/// with her Olm key), so that alice's later messages are normal Olm messages of an established
/// session, not pre-key messages.
async fn establish(alice: &User, bob: &User, secret: &Contact) -> Result<(), String> {
    alice
        .conn
        .send(secret, CONTENT_TYPE, b"hello")
        .await
        .map_err(|e| format!("alice's first forward-secret message: {e}"))?;
    receive_all(bob, 1).await?;
    let to_alice = bob
        .conn
        .verify_contact(&bob.store, &kez_tests::kez_server::test_handle("@alice"))
        .await
        .map_err(|e| format!("bob adds alice: {e}"))?
        .contact;
    bob.conn
        .send(&to_alice, CONTENT_TYPE, b"hi")
        .await
        .map_err(|e| format!("bob answers: {e}"))?;
    let mut got = 0;
    while got < 1 {
        got += alice
            .conn
            .receive(&alice.store, 1, Duration::from_millis(500))
            .await
            .map_err(|e| format!("alice receives: {e}"))?
            .len();
    }
    Ok(())
}

/// What a new session costs on the network: one `kez.keys.claim` round trip (one-time keys
/// until the target's budget is spent, then its fallback key: the same work).
async fn claim_latency(alice: &User, bob: &User, count: usize) -> Result<Latencies, String> {
    let mut latencies = Latencies::default();
    let device = bob.key.public_key();
    for _ in 0..count {
        let started = Instant::now();
        alice
            .conn
            .keys_claim(&device, None)
            .await
            .map_err(|e| format!("claiming a prekey: {e}"))?;
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

/// What a new session costs in Olm: the outbound session from a prekey, its first (pre-key)
/// message of a 256-byte body, the inbound session from it and the decryption, in process.
fn session_cost(count: usize) -> Result<Latencies, String> {
    use kez_core::olm::OlmAccount;
    let bob_key = SecretKey::generate();
    let alice = OlmAccount::new();
    let mut bob = OlmAccount::new();
    let mut latencies = Latencies::default();
    let body = [b'k'; BODY_BYTES];
    for _ in 0..count {
        let prekey = bob.generate_one_time_keys(1, &bob_key)[0].key;
        let started = Instant::now();
        let mut outbound = alice
            .create_outbound(&bob.identity_key(), &prekey)
            .map_err(|e| e.to_string())?;
        let message = outbound.encrypt(&body);
        let (_inbound, plaintext) = bob
            .create_inbound(&alice.identity_key(), &message)
            .map_err(|e| e.to_string())?;
        latencies.push(started.elapsed());
        if plaintext.as_slice() != body {
            return Err("the first pre-key message decrypted to another body".to_owned());
        }
    }
    Ok(latencies)
}

/// What storing one received message costs bob before he may acknowledge it: one redb
/// transaction (history, seen id and inbox floor) with its disk sync, in a store of its own.
fn store_commits(alice: &SecretKey, bob: &SecretKey, count: usize) -> Result<Latencies, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let store = Store::open(dir.path().join("store.redb")).map_err(|e| e.to_string())?;
    let mut commits = Latencies::default();
    for seq in 1..=count as u64 {
        let (_, sealed) = kez_core::envelope::seal(
            alice,
            &bob.public_key(),
            CONTENT_TYPE,
            &[b'k'; BODY_BYTES],
            kez_client::now(),
        )
        .map_err(|e| e.to_string())?;
        let message = kez_core::envelope::open(bob, &sealed).map_err(|e| e.to_string())?;
        let floor = InboxFloor { seq, time: 1 };
        let started = Instant::now();
        store
            .record_incoming_all(&[(message, seq)], floor, kez_client::now())
            .map_err(|e| e.to_string())?;
        commits.push(started.elapsed());
    }
    Ok(commits)
}

/// kez-client throughput: alice publishes `n` messages pipelined while bob receives.
pub async fn throughput(
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
pub async fn latency(
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

/// The first baseline's name in the table.
const CONSUMER: &str = "raw JetStream consumer";
/// The second baseline's name in the table.
const MAIL: &str = "raw direct get + purge";

/// A raw JetStream path a baseline measures: publish with a message id, fetch what arrived.
trait RawPath {
    /// Publishes a stamped payload of `len` bytes; answers the acknowledgement to come and the
    /// payload.
    async fn publish(
        &self,
        len: usize,
        epoch: Instant,
    ) -> Result<(jetstream::context::PublishAckFuture, Vec<u8>), String>;

    /// Up to `max` payloads, waiting up to `wait` for the first; each with when it arrived.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<(Instant, Vec<u8>)>, String>;
}

/// Publishes `payload` to `subject` with a fresh `Nats-Msg-Id`, as the server stores envelopes.
async fn publish_with_id(
    js: &jetstream::Context,
    subject: &str,
    payload: Vec<u8>,
) -> Result<(jetstream::context::PublishAckFuture, Vec<u8>), String> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", MessageId::random().to_string().as_str());
    let ack = js
        .publish_with_headers(subject.to_owned(), headers, payload.clone().into())
        .await
        .map_err(|e| format!("raw publish: {e}"))?;
    Ok((ack, payload))
}

/// The first baseline, the previous release's read path: a stream configured like its inbox
/// stream `KEZ_INBOX` (work queue) and a durable pull consumer with a user's inbox consumer's
/// settings, used by two plain connections in the server's account.
struct Consumer {
    publisher: jetstream::Context,
    consumer: PullConsumer,
}

impl Consumer {
    async fn start(stack: &CalloutStack) -> Result<Consumer, String> {
        let admin = jetstream::new(stack.server_client().await);
        let stream = admin
            .create_stream(jetstream::stream::Config {
                name: CONSUMER_STREAM.to_owned(),
                description: Some("kez-bench: the previous release's inbox".to_owned()),
                subjects: vec![CONSUMER_SUBJECT.to_owned()],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                storage: jetstream::stream::StorageType::File,
                max_messages_per_subject: INBOX_MAX_MESSAGES,
                max_consumers: 10_000_000,
                discard: jetstream::stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                max_message_size: INBOX_MAX_STORED_BYTES,
                max_bytes: DEFAULT_INBOX_MAX_BYTES as i64,
                max_age: INBOX_MAX_AGE,
                duplicate_window: INBOX_DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating the raw stream: {e}"))?;
        stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(CONSUMER_NAME.to_owned()),
                filter_subject: CONSUMER_SUBJECT.to_owned(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 1000,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating the raw consumer: {e}"))?;
        let consumer: PullConsumer = jetstream::new(stack.server_client().await)
            .get_consumer_from_stream(CONSUMER_NAME, CONSUMER_STREAM)
            .await
            .map_err(|e| format!("the raw consumer: {e}"))?;
        Ok(Consumer {
            publisher: jetstream::new(stack.server_client().await),
            consumer,
        })
    }
}

impl RawPath for Consumer {
    async fn publish(
        &self,
        len: usize,
        epoch: Instant,
    ) -> Result<(jetstream::context::PublishAckFuture, Vec<u8>), String> {
        publish_with_id(&self.publisher, CONSUMER_SUBJECT, stamped(epoch, len)).await
    }

    /// One pull of up to `max`, each message acknowledged as the previous client did (double
    /// ack).
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
}

/// The second baseline: what kez-chat-server does for `kez.mail.fetch`, made directly (the
/// server's own `Store` on plain connections in its account): an inbox subject of `KEZ_MAIL`
/// read with batch direct gets from the floor on; before the next read, the floor checked
/// (a direct get by time) and the inbox purged up to it; woken by the stream's new-mail
/// notifications.
struct Mail {
    publisher: jetstream::Context,
    store: kez_chat_server::store::Store,
    subject: String,
    notifications: tokio::sync::Mutex<async_nats::Subscriber>,
    /// (the last received message's sequence and time, what was purged).
    floor: std::sync::Mutex<((u64, u64), u64)>,
}

impl Mail {
    async fn start(stack: &CalloutStack) -> Result<Mail, String> {
        // An inbox nobody else uses.
        let carol = SecretKey::generate().public_key();
        let reader = stack.server_client().await;
        let notifications = reader
            .subscribe(new_mail_subject(&carol, &carol))
            .await
            .map_err(|e| format!("subscribing to the notifications: {e}"))?;
        let store =
            kez_chat_server::store::Store::open(&jetstream::new(reader), Default::default())
                .await
                .map_err(|e| format!("opening the store: {e}"))?;
        Ok(Mail {
            publisher: jetstream::new(stack.server_client().await),
            store,
            subject: inbox_subject(&carol, &carol),
            notifications: tokio::sync::Mutex::new(notifications),
            floor: std::sync::Mutex::new(((0, 0), 0)),
        })
    }

    /// Acknowledges what was received as the server does (checks that nothing newer is
    /// numbered below it, purges up to it), then reads up to `max` after it.
    async fn read(&self, max: usize) -> Result<Vec<(Instant, Vec<u8>)>, String> {
        let ((floor, time), purged) = *self.floor.lock().expect("not poisoned");
        if floor > purged {
            let newer = self
                .store
                .first_stored_since(&self.subject, time + 1)
                .await
                .map_err(|e| format!("raw direct get by time: {}", e.message))?;
            if newer.is_some_and(|seq| seq <= floor) {
                return Err("the raw inbox looks reset".to_owned());
            }
            self.store
                .purge_inbox(&self.subject, floor)
                .await
                .map_err(|e| format!("raw purge: {}", e.message))?;
        }
        let max = u32::try_from(max)
            .unwrap_or(u32::MAX)
            .min(MAX_FETCH_MESSAGES);
        let read = self
            .store
            .read_inbox(&self.subject, floor, max)
            .await
            .map_err(|e| format!("raw direct get: {}", e.message))?;
        let at = Instant::now();
        let last = read
            .messages
            .last()
            .map_or((floor, time), |last| (last.seq, last.time));
        *self.floor.lock().expect("not poisoned") = (last, floor);
        Ok(read
            .messages
            .into_iter()
            .map(|message| (at, message.envelope.to_vec()))
            .collect())
    }
}

impl RawPath for Mail {
    async fn publish(
        &self,
        len: usize,
        epoch: Instant,
    ) -> Result<(jetstream::context::PublishAckFuture, Vec<u8>), String> {
        publish_with_id(&self.publisher, &self.subject, stamped(epoch, len)).await
    }

    /// Reads what is there; with nothing, waits for a notification and reads again.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<(Instant, Vec<u8>)>, String> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut notifications = self.notifications.lock().await;
        loop {
            // What is queued is covered by the read that follows.
            while let Some(Some(_)) = notifications.next().now_or_never() {}
            let got = self.read(max).await?;
            if !got.is_empty() {
                return Ok(got);
            }
            match tokio::time::timeout_at(deadline, notifications.next()).await {
                Ok(Some(_)) => {}
                _ => return Ok(got),
            }
        }
    }
}

/// A raw path's throughput: `n` payloads published pipelined while they are fetched.
async fn raw_throughput(
    path: &impl RawPath,
    n: usize,
    len: usize,
    epoch: Instant,
) -> Result<f64, String> {
    let started = Instant::now();
    let receiving = async {
        let mut got = 0;
        while got < n {
            got += path.fetch(FETCH, Duration::from_millis(500)).await?.len();
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
            window.push_back(path.publish(len, epoch).await?.0);
        }
        for ack in window {
            ack.await.map_err(|e| format!("raw ack: {e}"))?;
        }
        Ok::<(), String>(())
    };
    tokio::try_join!(sending, receiving)?;
    Ok(per_sec(n, started.elapsed()))
}

/// A raw path's latency: one payload at a time, from before the publish until it is fetched.
async fn raw_latency(
    path: &impl RawPath,
    count: usize,
    len: usize,
    epoch: Instant,
) -> Result<Latencies, String> {
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let receiving = async move {
        let mut got = 0;
        while got < count {
            for message in path.fetch(1, Duration::from_secs(5)).await? {
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
            let (ack, payload) = path.publish(len, epoch).await?;
            let (at, received) = arrived
                .recv()
                .await
                .ok_or("the raw path stopped".to_owned())?;
            ack.await.map_err(|e| format!("raw ack: {e}"))?;
            if received != payload {
                return Err("the raw path received another payload".to_owned());
            }
            latencies.push(at - started);
        }
        Ok(latencies)
    };
    Ok(tokio::try_join!(sending, receiving)?.0)
}
