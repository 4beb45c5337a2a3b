//! `kez.mail.fetch` end to end (PROTOCOL.md §6.3), against a real nats-server with the auth
//! callout and an in-process kez-chat-server: batches and `pending`, the 512 KiB bound, the
//! acknowledgement (the floor a fetch names deletes exactly the caller's messages up to it),
//! `floor_ahead` and `inbox_reset` (which delete nothing: a floor past the stream, a floor
//! whose time is wrong, a stream recreated, a store restored from a backup), hostile bodies, a
//! fetch flood, and the new-mail notification. What the stream holds is checked independently of the server,
//! over the `SERVER` user's own JetStream connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::Stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt};
use kez_chat_server::config::ServerConfig;
use kez_chat_server::limits::{Limits, Rate};
use kez_core::SecretKey;
use kez_proto::mail::{FetchAnswer, FetchRequest, MAX_FETCH_BYTES, MAX_FETCH_MESSAGES};
use kez_proto::subjects::{MAIL_STREAM, inbox_subject, new_mail_subject};
use kez_tests::callout::{CalloutStack, Violation, expect_violation};
use kez_tests::kez_server::{ServiceError, call};
use kez_tests::requests::mail;
use serde_json::json;

const FETCH: &str = "kez.mail.fetch";

/// How long any fetch may take to be answered: a refusal is as prompt as an answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A callout stack without limits (unless the test sets its own), with the HTTP shim on.
async fn stack_with(limits: Limits) -> CalloutStack {
    CalloutStack::start_configured(|config: &mut ServerConfig| {
        config.limits = limits;
        config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await
}

/// A fetch request body.
fn body(after: u64, max: u32, time: u64) -> Vec<u8> {
    serde_json::to_vec(&FetchRequest {
        after,
        max,
        time,
        origins: false,
    })
    .unwrap()
}

/// One message of a fetch answer, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    seq: u64,
    /// When the stream stored it, µs since the Unix epoch.
    time: u64,
    envelope: Bytes,
}

/// A decoded fetch answer, owned.
#[derive(Debug)]
struct Answer {
    pending: u64,
    /// The messages, as the answer lists them.
    messages: Vec<Message>,
    /// The answer body's size.
    size: usize,
}

impl Answer {
    fn seqs(&self) -> Vec<u64> {
        self.messages.iter().map(|message| message.seq).collect()
    }

    /// The floor the answer leaves: its last message's sequence and time.
    fn floor(&self) -> (u64, u64) {
        let last = self.messages.last().expect("a message");
        (last.seq, last.time)
    }

    /// The time the answer gives for sequence `seq`.
    fn time_of(&self, seq: u64) -> u64 {
        self.messages
            .iter()
            .find(|message| message.seq == seq)
            .unwrap_or_else(|| panic!("no message {seq} in {:?}", self.seqs()))
            .time
    }

    fn envelopes(&self) -> Vec<&[u8]> {
        self.messages
            .iter()
            .map(|message| message.envelope.as_ref())
            .collect()
    }

    fn envelope_bytes(&self) -> usize {
        self.messages
            .iter()
            .map(|message| message.envelope.len())
            .sum()
    }
}

/// `call`, bounded by [`ANSWER_WITHIN`].
async fn call_within(
    client: &Client,
    subject: &str,
    body: impl Into<Bytes>,
) -> Result<Bytes, ServiceError> {
    tokio::time::timeout(ANSWER_WITHIN, call(client, subject, body))
        .await
        .unwrap_or_else(|_| panic!("{subject} was not answered within {ANSWER_WITHIN:?}"))
}

/// Sends `body` to `kez.mail.fetch` and decodes the answer.
async fn fetch_body(client: &Client, body: impl Into<Bytes>) -> Result<Answer, ServiceError> {
    let answer = call_within(client, FETCH, body).await?;
    let decoded = FetchAnswer::decode(&answer, false).expect("a fetch answer decodes");
    Ok(Answer {
        pending: decoded.pending,
        messages: decoded
            .messages
            .iter()
            .map(|message| Message {
                seq: message.seq,
                time: message.time,
                envelope: Bytes::copy_from_slice(message.envelope),
            })
            .collect(),
        size: answer.len(),
    })
}

/// A fetch naming the floor `after` (stored at `time`, µs).
async fn fetch(client: &Client, after: u64, max: u32, time: u64) -> Result<Answer, ServiceError> {
    fetch_body(client, body(after, max, time)).await
}

/// Sends `envelope` to `to` through `kez.mail.send`; answers its sequence.
async fn send(client: &Client, to: &SecretKey, envelope: &[u8]) -> u64 {
    let id = *kez_core::envelope::MessageId::random().as_bytes();
    let answer = call_within(
        client,
        "kez.mail.send",
        mail(&to.public_key(), id, envelope),
    )
    .await
    .expect("the send is stored");
    let delivered: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(delivered["duplicate"], false);
    delivered["seq"].as_u64().expect("a sequence")
}

/// `key`'s inbox subject (its key is its one device).
fn inbox(key: &SecretKey) -> String {
    inbox_subject(&key.public_key(), &key.public_key())
}

/// `KEZ_MAIL`, over the `SERVER` user's JetStream: what the stream holds, read without the
/// kez-chat-server.
struct MailStream {
    stream: Stream,
}

impl MailStream {
    async fn open(stack: &CalloutStack) -> MailStream {
        let js = jetstream::new(stack.server_client().await);
        MailStream {
            stream: js.get_stream(MAIL_STREAM).await.expect("KEZ_MAIL exists"),
        }
    }

    /// Messages stored on `subject` (stream info with a subjects filter).
    async fn count(&self, subject: &str) -> usize {
        let mut counts = self
            .stream
            .info_with_subjects(subject)
            .await
            .expect("stream info");
        let mut total = 0;
        while let Some((_, count)) = counts.try_next().await.expect("stream info subjects") {
            total += count;
        }
        total
    }

    /// Whether the stream holds sequence `seq` (`STREAM.MSG.GET`).
    async fn holds(&self, seq: u64) -> bool {
        self.stream.get_raw_message(seq).await.is_ok()
    }

    /// Which of `seqs` the stream holds.
    async fn held(&self, seqs: &[u64]) -> Vec<u64> {
        let mut held = Vec::new();
        for &seq in seqs {
            if self.holds(seq).await {
                held.push(seq);
            }
        }
        held
    }

    /// When the stream stored sequence `seq`, µs since the Unix epoch (`STREAM.MSG.GET`).
    async fn stored_time(&self, seq: u64) -> u64 {
        let message = self
            .stream
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|err| panic!("sequence {seq} is stored: {err}"));
        u64::try_from(message.time.unix_timestamp_nanos() / 1000).expect("after 1970")
    }

    async fn last_sequence(&self) -> u64 {
        let mut stream = self.stream.clone();
        stream.info().await.unwrap().state.last_sequence
    }
}

/// One reply of a batch direct get: its status (`None` for a message) and headers.
#[derive(Debug)]
struct DirectReply {
    status: Option<u16>,
    headers: Vec<(String, String)>,
}

impl DirectReply {
    fn header(&self, name: &str) -> Option<u64> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.parse().ok())
    }
}

/// A batch direct get of `subject` from `seq` on, exactly as the server makes it, as the
/// `SERVER` user: every reply's status and headers.
async fn raw_batch_get(
    server: &Client,
    subject: &str,
    seq: u64,
    batch: usize,
    max_bytes: usize,
) -> Vec<DirectReply> {
    let reply = server.new_inbox();
    let mut replies = server.subscribe(reply.clone()).await.unwrap();
    let request = json!({
        "seq": seq,
        "next_by_subj": subject,
        "batch": batch,
        "max_bytes": max_bytes,
    });
    server
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{MAIL_STREAM}"),
            reply,
            request.to_string().into(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        let message = tokio::time::timeout(ANSWER_WITHIN, replies.next())
            .await
            .expect("the direct get answers")
            .expect("the subscription is open");
        let status = message.status.map(|status| status.as_u16());
        let headers = message
            .headers
            .iter()
            .flat_map(|headers| headers.iter())
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |value| (name.to_string(), value.as_str().to_owned()))
            })
            .collect();
        let done = matches!(status, Some(204) | Some(404));
        out.push(DirectReply { status, headers });
        if done {
            return out;
        }
    }
}

/// The `kez_inbox_acknowledged_messages_total` counter from `/metrics`.
async fn acknowledged_metric(stack: &CalloutStack) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = stack.server.http_addr().expect("the HTTP shim is on");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: kez.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("kez_inbox_acknowledged_messages_total "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("no acknowledged counter in {text}"))
}

/// What nats-server answers to the batch direct get the server makes, the ground truth of
/// `pending`: each message carries `Nats-Num-Pending`, the messages of the subject after it;
/// the closing `204 EOB` carries the count after the last message sent and that message's
/// sequence as `Nats-Last-Sequence`. Messages of other subjects in between count for
/// nothing, also while they are being stored during the read (when nats-server counts again
/// for the EOB). And `kez.mail.fetch` answers exactly that count as `pending`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_counts_the_callers_messages_after_the_answer() {
    let stack = stack_with(Limits::OFF).await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    let (_carol_key, carol) = stack.registered("carol").await;
    let server = stack.server_client().await;

    // 30 for alice, each followed by one for bob.
    let mut alice_seqs = Vec::new();
    for i in 0..30 {
        alice_seqs.push(send(&carol, &alice_key, format!("a{i}").as_bytes()).await);
        send(&carol, &bob_key, format!("b{i}").as_bytes()).await;
    }

    // The raw read: 10 of alice's 30.
    let replies = raw_batch_get(&server, &inbox(&alice_key), 1, 10, MAX_FETCH_BYTES).await;
    for reply in &replies {
        println!("direct get reply: {reply:?}");
    }
    assert_eq!(replies.len(), 11, "10 messages and the EOB");
    for (i, reply) in replies[..10].iter().enumerate() {
        assert_eq!(reply.status, None);
        assert_eq!(reply.header("Nats-Sequence"), Some(alice_seqs[i]));
        assert_eq!(
            reply.header("Nats-Num-Pending"),
            Some(29 - i as u64),
            "alice's messages after this one"
        );
    }
    let eob = &replies[10];
    assert_eq!(eob.status, Some(204));
    assert_eq!(eob.header("Nats-Num-Pending"), Some(20));
    assert_eq!(eob.header("Nats-Last-Sequence"), Some(alice_seqs[9]));
    // Nothing after the last: 404 for the very first, else an EOB with 0.
    let past = raw_batch_get(&server, &inbox(&alice_key), alice_seqs[29] + 1, 10, 1024).await;
    assert_eq!(past.len(), 1);
    assert_eq!(past[0].status, Some(404), "{past:?}");
    let tail = raw_batch_get(&server, &inbox(&alice_key), alice_seqs[28], 10, 1024).await;
    assert_eq!(tail.len(), 3, "{tail:?}");
    assert_eq!(tail[2].header("Nats-Num-Pending"), Some(0));

    // The same through the service.
    let first = fetch(&alice, 0, 10, 0).await.unwrap();
    assert_eq!(first.seqs(), alice_seqs[..10]);
    assert_eq!(first.pending, 20);
    let (after, time) = first.floor();
    let second = fetch(&alice, after, 7, time).await.unwrap();
    assert_eq!(second.seqs(), alice_seqs[10..17]);
    assert_eq!(second.pending, 13);
    let bobs = fetch(&bob, 0, 256, 0).await.unwrap();
    assert_eq!((bobs.messages.len(), bobs.pending), (30, 0));
    assert!(
        bobs.messages
            .iter()
            .all(|message| message.envelope[0] == b'b')
    );

    // Now while messages for bob are stored as fast as the broker takes them: alice reads one
    // at a time, and every answer's pending is the count of alice's after it.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let server = server.clone();
        let stop = stop.clone();
        let subject = inbox(&bob_key);
        tokio::spawn(async move {
            let js = jetstream::new(server);
            let mut stored = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let acks: Vec<_> = futures::future::join_all(
                    (0..32).map(|_| js.publish(subject.clone(), Bytes::from_static(b"flood"))),
                )
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
                for ack in acks {
                    ack.await.unwrap();
                    stored += 1;
                }
            }
            stored
        })
    };
    // The raw read, 50 times: the EOB counts alice's after the batch, however far the stream
    // moved on meanwhile (nats-server counts again then, with the subject filter).
    for _ in 0..50 {
        let replies = raw_batch_get(&server, &inbox(&alice_key), alice_seqs[17], 5, 1 << 20).await;
        assert_eq!(replies.len(), 6, "{replies:?}");
        assert_eq!(replies[5].status, Some(204));
        assert_eq!(
            replies[5].header("Nats-Num-Pending"),
            Some(8),
            "{replies:?}"
        );
        assert_eq!(
            replies[5].header("Nats-Last-Sequence"),
            Some(alice_seqs[21])
        );
    }
    let (mut after, mut time) = second.floor();
    let mut got = 17;
    let mut recounted = Vec::new();
    while got < 30 {
        let answer = fetch(&alice, after, 1, time).await.unwrap();
        assert_eq!(answer.seqs(), [alice_seqs[got]]);
        got += 1;
        assert_eq!(
            answer.pending,
            30 - got as u64,
            "alice's pending after {got} of 30, while bob's inbox grows"
        );
        recounted.push(answer.pending);
        (after, time) = answer.floor();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flooded = flood.await.unwrap();
    println!("pending while bob's inbox grew by {flooded}: {recounted:?}");
    assert!(flooded > 0);
    let done = fetch(&alice, after, 256, time).await.unwrap();
    assert_eq!((done.messages.len(), done.pending), (0, 0));
}

/// 300 messages: a fetch of 256 answers the first 256 in ascending order with 44 pending; the
/// next, naming the last, answers the other 44 with none pending; the one after that answers
/// nothing (the 8-byte `pending` alone). Each envelope comes back as it was sent, with the time
/// the stream stored it, in microseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_at_most_256_and_pending_until_the_inbox_is_read() {
    let stack = stack_with(Limits::OFF).await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    let stream = MailStream::open(&stack).await;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let mut seqs = Vec::new();
    for i in 0..300 {
        seqs.push(send(&alice, &bob_key, format!("message {i}").as_bytes()).await);
    }
    // Some for alice, after bob's: they change nothing for bob.
    for i in 0..5 {
        send(&bob, &alice_key, format!("to alice {i}").as_bytes()).await;
    }

    let first = fetch(&bob, 0, MAX_FETCH_MESSAGES, 0).await.unwrap();
    assert_eq!(first.messages.len(), 256);
    assert_eq!(first.pending, 44);
    assert_eq!(first.seqs(), seqs[..256]);
    assert!(first.seqs().windows(2).all(|pair| pair[0] < pair[1]));
    for (i, message) in first.messages.iter().enumerate() {
        assert_eq!(message.envelope.as_ref(), format!("message {i}").as_bytes());
    }
    // Each time is the one the stream stored the message at, in µs (checked while it still
    // holds them: the next fetch acknowledges them).
    for message in first.messages.iter().step_by(17) {
        assert_eq!(
            message.time,
            stream.stored_time(message.seq).await,
            "the time of sequence {}",
            message.seq
        );
    }
    let (after, time) = first.floor();
    let second = fetch(&bob, after, MAX_FETCH_MESSAGES, time).await.unwrap();
    assert_eq!(second.seqs(), seqs[256..]);
    assert_eq!(second.pending, 0);
    for (i, message) in second.messages.iter().enumerate() {
        assert_eq!(
            message.envelope.as_ref(),
            format!("message {}", 256 + i).as_bytes()
        );
        assert_eq!(message.time, stream.stored_time(message.seq).await);
    }
    // The times: after the test started, in sequence order (one stream, one clock), well
    // within 2^53 − 1.
    let messages: Vec<&Message> = first.messages.iter().chain(&second.messages).collect();
    for pair in messages.windows(2) {
        assert!(pair[0].time <= pair[1].time, "{pair:?}");
    }
    assert!(
        messages[0].time >= started,
        "{} < {started}",
        messages[0].time
    );
    assert!(messages[299].time < started + 600_000_000);
    let (after, time) = second.floor();
    let third = fetch(&bob, after, MAX_FETCH_MESSAGES, time).await.unwrap();
    assert_eq!((third.messages.len(), third.pending), (0, 0));
    assert_eq!(third.size, 8, "pending only");

    // max 1: one message, the rest pending.
    let one = fetch(&alice, 0, 1, 0).await.unwrap();
    assert_eq!((one.messages.len(), one.pending), (1, 4));
    assert_eq!(one.envelopes(), [&b"to alice 0"[..]]);
}

/// An answer ends once it holds 512 KiB of envelopes (nats-server counts subject and headers
/// too, and sends the message that crosses the bound): 20 envelopes of 60 KiB come in more
/// than one answer, each under the broker's 1 MiB payload limit, all of them in order, with
/// `pending` counting down to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_envelopes_come_in_answers_of_about_512_kib() {
    let stack = stack_with(Limits::OFF).await;
    let (_alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    const SIZE: usize = 60 * 1024;
    let mut seqs = Vec::new();
    for i in 0..20u8 {
        seqs.push(send(&alice, &bob_key, &vec![i; SIZE]).await);
    }
    let (mut after, mut time) = (0, 0);
    let mut received: Vec<Message> = Vec::new();
    let mut answers = Vec::new();
    loop {
        let answer = fetch(&bob, after, MAX_FETCH_MESSAGES, time).await.unwrap();
        if answer.messages.is_empty() {
            assert_eq!(answer.pending, 0);
            break;
        }
        let all_but_last: usize = answer.messages[..answer.messages.len() - 1]
            .iter()
            .map(|message| message.envelope.len())
            .sum();
        assert!(
            all_but_last < MAX_FETCH_BYTES,
            "the answer went on after {all_but_last} envelope bytes"
        );
        assert!(answer.envelope_bytes() <= MAX_FETCH_BYTES + 64 * 1024);
        assert!(answer.size < 1024 * 1024, "{} bytes", answer.size);
        received.extend(answer.messages.iter().cloned());
        assert_eq!(answer.pending, 20 - received.len() as u64);
        answers.push((answer.messages.len(), answer.size, answer.pending));
        (after, time) = answer.floor();
    }
    println!("answers (messages, bytes, pending): {answers:?}");
    assert!(answers.len() > 1, "20 × 60 KiB came in one answer");
    assert_eq!(
        received
            .iter()
            .map(|message| message.seq)
            .collect::<Vec<_>>(),
        seqs
    );
    for (i, message) in received.iter().enumerate() {
        assert_eq!(message.envelope.as_ref(), vec![i as u8; SIZE]);
    }
}

/// The floor a fetch names is the acknowledgement: the stream then no longer holds the
/// caller's messages up to it, and still holds those after it and everybody else's. Messages
/// stay until acknowledged (a fetch alone deletes nothing); naming an older floor later
/// brings nothing back; the server counts what it deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naming_the_floor_deletes_exactly_the_acknowledged_messages() {
    let stack = stack_with(Limits::OFF).await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    let stream = MailStream::open(&stack).await;
    let mut bobs = Vec::new();
    let mut alices = Vec::new();
    for i in 0..10 {
        bobs.push(send(&alice, &bob_key, format!("b{i}").as_bytes()).await);
        alices.push(send(&bob, &alice_key, format!("a{i}").as_bytes()).await);
    }
    assert_eq!(stream.count(&inbox(&bob_key)).await, 10);
    let acknowledged_before = acknowledged_metric(&stack).await;

    // Reading deletes nothing.
    let first = fetch(&bob, 0, 4, 0).await.unwrap();
    assert_eq!((first.seqs(), first.pending), (bobs[..4].to_vec(), 6));
    let again = fetch(&bob, 0, 4, 0).await.unwrap();
    assert_eq!(again.seqs(), first.seqs(), "unacknowledged: served again");
    assert_eq!(stream.count(&inbox(&bob_key)).await, 10);

    // Naming bobs[3] acknowledges bobs[..4].
    let (floor, floor_time) = first.floor();
    let second = fetch(&bob, floor, 4, floor_time).await.unwrap();
    assert_eq!((second.seqs(), second.pending), (bobs[4..8].to_vec(), 2));
    assert_eq!(stream.count(&inbox(&bob_key)).await, 6);
    assert_eq!(stream.held(&bobs).await, bobs[4..]);
    assert_eq!(stream.held(&alices).await, alices, "alice's are untouched");

    // An acknowledgement of a sequence between bob's (alice's, here, with the time the stream
    // stored it) takes bob's up to it.
    let alices_time = stream.stored_time(alices[7]).await;
    let third = fetch(&bob, alices[7], 4, alices_time).await.unwrap();
    assert_eq!((third.seqs(), third.pending), (bobs[8..].to_vec(), 0));
    assert_eq!(stream.held(&bobs).await, bobs[8..]);
    assert_eq!(stream.held(&alices).await, alices);

    // An older floor brings nothing back: what was acknowledged is gone.
    let stale = fetch(&bob, floor, 256, floor_time).await.unwrap();
    assert_eq!(stale.seqs(), bobs[8..]);
    assert_eq!(stream.held(&bobs).await, bobs[8..]);

    // The last acknowledgement empties bob's inbox.
    let bobs_last_time = third.time_of(bobs[9]);
    let last = fetch(&bob, bobs[9], 256, bobs_last_time).await.unwrap();
    assert_eq!((last.messages.len(), last.pending), (0, 0));
    assert_eq!(stream.count(&inbox(&bob_key)).await, 0);
    assert_eq!(stream.held(&alices).await, alices);
    assert_eq!(stream.count(&inbox(&alice_key)).await, 10);
    // Repeating it is harmless.
    let repeat = fetch(&bob, bobs[9], 256, bobs_last_time).await.unwrap();
    assert_eq!((repeat.messages.len(), repeat.pending), (0, 0));
    assert_eq!(acknowledged_metric(&stack).await - acknowledged_before, 10);
}

/// A floor past the stream's last sequence is refused 409 `floor_ahead` and deletes nothing:
/// one past the last, and 2^53 − 1 (the largest `after` there is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_past_the_stream_is_floor_ahead_and_deletes_nothing() {
    let stack = stack_with(Limits::OFF).await;
    let (_alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    let stream = MailStream::open(&stack).await;
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(send(&alice, &bob_key, format!("m{i}").as_bytes()).await);
    }
    let read = fetch(&bob, 0, 256, 0).await.unwrap();
    let last = stream.last_sequence().await;
    assert_eq!(last, seqs[2]);
    for after in [last + 1, last + 1000, (1 << 53) - 1] {
        let err = fetch(&bob, after, 10, read.floor().1).await.unwrap_err();
        assert_eq!(
            (err.code, err.name.as_str()),
            (409, "floor_ahead"),
            "{after}"
        );
        assert!(
            err.message.contains("nothing was deleted"),
            "{}",
            err.message
        );
        assert_eq!(
            err.headers.get("Nats-Service-Error-Code").unwrap().as_str(),
            "409"
        );
        assert_eq!(stream.held(&seqs).await, seqs, "after {after}");
    }
    // The real floor still works.
    let done = fetch(&bob, last, 10, read.floor().1).await.unwrap();
    assert_eq!((done.messages.len(), done.pending), (0, 0));
    assert_eq!(stream.count(&inbox(&bob_key)).await, 0);
}

/// The floor's `time` must be when the stream stored the message at `after`. A time older
/// than that, so that a message of the caller's at or below `after` was stored after it (which
/// only a stream restored or recreated since shows), is refused 409 `inbox_reset` and deletes
/// nothing, also when the message it is the time of is another user's; the true time is
/// served and acknowledges. `after` 0 takes any time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_with_a_wrong_time_is_inbox_reset_and_deletes_nothing() {
    let stack = stack_with(Limits::OFF).await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    let stream = MailStream::open(&stack).await;
    let (mut seqs, mut alices) = (Vec::new(), Vec::new());
    for i in 0..5 {
        seqs.push(send(&alice, &bob_key, format!("m{i}").as_bytes()).await);
        alices.push(send(&bob, &alice_key, format!("a{i}").as_bytes()).await);
    }
    let read = fetch(&bob, 0, 256, 0).await.unwrap();
    assert_eq!(read.seqs(), seqs);
    let times: Vec<u64> = read.messages.iter().map(|message| message.time).collect();
    assert!(
        times.windows(2).all(|pair| pair[0] < pair[1]),
        "one clock, stored one after the other: {times:?}"
    );
    let alices_second = stream.stored_time(alices[1]).await;
    assert!(times[1] < alices_second && alices_second < times[2]);

    // (index of the floor in seqs, its time, what the time is)
    let wrong = [
        (2, times[1], "the time of the message before the floor"),
        (2, times[0], "the time of the first message"),
        (2, times[2] - 1, "a microsecond before the floor's"),
        (
            2,
            alices_second,
            "the time of alice's message before the floor",
        ),
        (2, 1, "1 µs past 1970"),
        (4, times[3], "the time of the message before the last"),
    ];
    for (floor, time, what) in wrong {
        let err = fetch(&bob, seqs[floor], 256, time).await.expect_err(what);
        assert_eq!(
            (err.code, err.name.as_str()),
            (409, "inbox_reset"),
            "{what}"
        );
        assert!(
            err.message.contains("nothing was deleted"),
            "{what}: {}",
            err.message
        );
        assert_eq!(
            err.headers.get("Nats-Service-Error-Code").unwrap().as_str(),
            "409"
        );
        assert_eq!(
            err.headers.get("Kez-Error").unwrap().as_str(),
            "inbox_reset"
        );
        assert_eq!(stream.held(&seqs).await, seqs, "{what}: nothing deleted");
        assert_eq!(stream.held(&alices).await, alices, "{what}");
    }
    assert_eq!(stream.count(&inbox(&bob_key)).await, 5);

    // The true time: served, and the floor acknowledged.
    let served = fetch(&bob, seqs[2], 256, times[2]).await.unwrap();
    assert_eq!((served.seqs(), served.pending), (seqs[3..].to_vec(), 0));
    assert_eq!(served.envelopes(), [&b"m3"[..], b"m4"]);
    assert_eq!(stream.held(&seqs).await, seqs[3..]);
    assert_eq!(stream.held(&alices).await, alices, "alice's are untouched");
    // After 0, any time: nothing to check it against.
    for time in [0, 1, 12345, times[4], (1 << 53) - 1] {
        let fresh = fetch(&bob, 0, 256, time).await.unwrap();
        assert_eq!(fresh.seqs(), seqs[3..], "after 0, time {time}");
    }
    // The last floor with its time empties bob's inbox.
    let done = fetch(&bob, seqs[4], 256, times[4]).await.unwrap();
    assert_eq!((done.messages.len(), done.pending), (0, 0));
    assert_eq!(stream.count(&inbox(&bob_key)).await, 0);
    assert_eq!(stream.count(&inbox(&alice_key)).await, 5);
}

/// Deletes `KEZ_MAIL` and creates it again with the same config, as the `SERVER` user.
async fn recreate_mail_stream(stack: &CalloutStack) {
    let js = jetstream::new(stack.server_client().await);
    let config = js
        .get_stream(MAIL_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    js.delete_stream(MAIL_STREAM).await.unwrap();
    js.create_stream(config).await.unwrap();
}

/// `KEZ_MAIL` recreated while the server runs, and bob's floor, acknowledged in the old stream,
/// past the new stream's last sequence: 409 `floor_ahead` (the stream's last sequence now,
/// whatever the running server saw of the old one), and nothing is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_short_of_the_floor_is_floor_ahead() {
    let stack = stack_with(Limits::OFF).await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    for i in 0..3 {
        send(&alice, &bob_key, format!("old {i}").as_bytes()).await;
    }
    let old = fetch(&bob, 0, 256, 0).await.unwrap();
    let (floor, floor_time) = old.floor();
    fetch(&bob, floor, 256, floor_time).await.unwrap();

    recreate_mail_stream(&stack).await;
    let stream = MailStream::open(&stack).await;
    let alices = vec![send(&bob, &alice_key, b"for alice").await];
    assert_eq!(alices, [1], "a new stream counts from 1");
    assert!(floor > stream.last_sequence().await);
    let ahead = fetch(&bob, floor, 256, floor_time).await;
    assert_eq!(stream.held(&alices).await, alices);
    let err = ahead.expect_err("a floor past the new stream's last sequence");
    assert_eq!((err.code, err.name.as_str()), (409, "floor_ahead"));
    assert!(
        err.message.contains("nothing was deleted"),
        "{}",
        err.message
    );
    // Starting over: nothing for bob yet.
    let fresh = fetch(&bob, 0, 256, 0).await.unwrap();
    assert_eq!((fresh.messages.len(), fresh.pending), (0, 0));
}

/// `KEZ_MAIL` deleted and created again under the same name while the server runs (a reset
/// store; an operator's `nats stream rm`, then another instance's start) counts its sequences
/// from 1 again, for other messages. bob's floor in the old stream, acknowledged there, names
/// a sequence that new mail for him gets again: 409 `inbox_reset`, and nothing of the new
/// stream is deleted (though the running server purged that far in the old one). Starting over
/// (after 0, time 0) answers the new mail, and naming its floor then acknowledges it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_is_inbox_reset_and_deletes_nothing() {
    let stack = stack_with(Limits::OFF).await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    for i in 0..3 {
        send(&alice, &bob_key, format!("old {i}").as_bytes()).await;
    }
    let old = fetch(&bob, 0, 256, 0).await.unwrap();
    let (floor, floor_time) = old.floor();
    let acknowledged = fetch(&bob, floor, 256, floor_time).await.unwrap();
    assert_eq!(acknowledged.messages.len(), 0);
    assert_eq!(
        MailStream::open(&stack).await.count(&inbox(&bob_key)).await,
        0
    );

    recreate_mail_stream(&stack).await;
    let stream = MailStream::open(&stack).await;
    // New mail for bob, numbered at or below his floor; alice's takes the stream up to it.
    let new = vec![
        send(&alice, &bob_key, b"new 0").await,
        send(&alice, &bob_key, b"new 1").await,
    ];
    assert_eq!(new, [1, 2], "a new stream counts from 1");
    let mut alices = Vec::new();
    while stream.last_sequence().await < floor {
        alices.push(send(&bob, &alice_key, b"for alice").await);
    }
    assert!(
        new.iter().all(|&seq| seq <= floor),
        "{new:?}, floor {floor}"
    );

    // bob names his floor in the old stream: twice, nothing changes.
    for _ in 0..2 {
        let stale = fetch(&bob, floor, 256, floor_time).await;
        let held = stream.held(&new).await;
        assert_eq!(
            held, new,
            "a floor of the old stream deleted the new stream's unread mail; the answer: {stale:?}"
        );
        let err = stale.expect_err("a floor of the old stream");
        assert_eq!((err.code, err.name.as_str()), (409, "inbox_reset"));
        assert!(
            err.message.contains("nothing was deleted"),
            "{}",
            err.message
        );
    }
    assert_eq!(stream.held(&alices).await, alices);

    // Starting over answers the new mail, stored after the old floor.
    let fresh = fetch(&bob, 0, 256, 0).await.unwrap();
    assert_eq!((fresh.seqs(), fresh.pending), (new.clone(), 0));
    assert_eq!(fresh.envelopes(), [&b"new 0"[..], b"new 1"]);
    assert!(
        fresh
            .messages
            .iter()
            .all(|message| message.time > floor_time)
    );
    // Its floor acknowledges: bob's inbox is empty, alice's whole.
    let (after, time) = fresh.floor();
    let done = fetch(&bob, after, 256, time).await.unwrap();
    assert_eq!((done.messages.len(), done.pending), (0, 0));
    assert_eq!(
        stream.held(&new).await,
        Vec::<u64>::new(),
        "acknowledged in the new stream, still stored"
    );
    assert_eq!(stream.count(&inbox(&bob_key)).await, 0);
    assert_eq!(stream.held(&alices).await, alices);
}

/// Waits until each of `clients` is served again after the broker came back: the connection
/// is re-established and the kez-chat-server answers over it, and JetStream has `KEZ_MAIL`.
async fn wait_until_served(stack: &CalloutStack, clients: &[&Client]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for client in clients {
        loop {
            let connected = client.connection_state() == async_nats::connection::State::Connected;
            if connected
                && let Ok(Ok(_)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    call(client, "kez.server.info", Bytes::new()),
                )
                .await
            {
                break;
            }
            assert!(Instant::now() < deadline, "not served again within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let server = stack.server_client().await;
    loop {
        let js = jetstream::new(server.clone());
        if let Ok(mut stream) = js.get_stream(MAIL_STREAM).await
            && stream.info().await.is_ok()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "KEZ_MAIL is not back within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `cp -a from to`: a directory tree with its modes and times.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs");
    assert!(
        status.success(),
        "cp -a {} {}: {status}",
        from.display(),
        to.display()
    );
}

/// A broker store restored from a backup (taken with nats-server stopped, put back with it
/// stopped): the stream's sequences go back to the backup's and count on from there, for
/// other messages. bob read and acknowledged mail after the backup was taken, so new mail for
/// him after the restore gets sequences at or below his floor. His fetch naming that floor is
/// 409 `inbox_reset` and deletes nothing; starting over (after 0, time 0) answers the new mail
/// (and what the backup held of his, which he has already: a client drops it by id), and
/// naming the new floor acknowledges all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_from_a_backup_is_inbox_reset_and_deletes_nothing() {
    let mut stack = stack_with(Limits::OFF).await;
    let (_alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(send(&alice, &bob_key, format!("before backup {i}").as_bytes()).await);
    }
    // bob reads them, not yet acknowledged when the backup is taken.
    assert_eq!(fetch(&bob, 0, 256, 0).await.unwrap().seqs(), before);

    let backup = tempfile::tempdir().unwrap();
    stack.nats.stop();
    copy_tree(&stack.nats.store_dir(), &backup.path().join("js"));
    stack.nats.resume();
    wait_until_served(&stack, &[&alice, &bob]).await;

    let mut after_backup = Vec::new();
    for i in 0..3 {
        after_backup.push(send(&alice, &bob_key, format!("after backup {i}").as_bytes()).await);
    }
    let read = fetch(&bob, 0, 256, 0).await.unwrap();
    assert_eq!(read.seqs(), [before.clone(), after_backup.clone()].concat());
    let (floor, floor_time) = read.floor();
    let acknowledged = fetch(&bob, floor, 256, floor_time).await.unwrap();
    assert_eq!(acknowledged.messages.len(), 0);
    assert_eq!(
        MailStream::open(&stack).await.count(&inbox(&bob_key)).await,
        0
    );

    // The restore: the store as it was at the backup.
    stack.nats.stop();
    std::fs::remove_dir_all(stack.nats.store_dir()).unwrap();
    copy_tree(&backup.path().join("js"), &stack.nats.store_dir());
    stack.nats.resume();
    wait_until_served(&stack, &[&alice, &bob]).await;
    let stream = MailStream::open(&stack).await;
    assert_eq!(
        stream.last_sequence().await,
        before[2],
        "the backup's stream"
    );
    assert_eq!(stream.held(&before).await, before);

    let mut new = Vec::new();
    for i in 0..3 {
        new.push(send(&alice, &bob_key, format!("after restore {i}").as_bytes()).await);
    }
    assert_eq!(
        new, after_backup,
        "the restored stream counts the same sequences again"
    );
    assert!(new.iter().all(|&seq| seq <= floor));

    // bob's floor from before the restore: refused, nothing deleted.
    let all = [before.clone(), new.clone()].concat();
    for _ in 0..2 {
        let stale = fetch(&bob, floor, 256, floor_time).await;
        let held = stream.held(&all).await;
        assert_eq!(
            held, all,
            "a floor from before the restore deleted unread mail; the answer: {stale:?}"
        );
        let err = stale.expect_err("a floor from before the restore");
        assert_eq!((err.code, err.name.as_str()), (409, "inbox_reset"));
        assert!(
            err.message.contains("nothing was deleted"),
            "{}",
            err.message
        );
    }
    assert_eq!(stream.count(&inbox(&bob_key)).await, 6);

    // Starting over: what the backup held of bob's, then the new mail.
    let fresh = fetch(&bob, 0, 256, 0).await.unwrap();
    assert_eq!((fresh.seqs(), fresh.pending), (all.clone(), 0));
    assert_eq!(
        fresh.envelopes(),
        [
            &b"before backup 0"[..],
            b"before backup 1",
            b"before backup 2",
            b"after restore 0",
            b"after restore 1",
            b"after restore 2",
        ]
    );
    for message in &fresh.messages[3..] {
        assert!(message.time > floor_time, "{message:?}");
    }
    // Its floor acknowledges all of it.
    let (after, time) = fresh.floor();
    let done = fetch(&bob, after, 256, time).await.unwrap();
    assert_eq!((done.messages.len(), done.pending), (0, 0));
    assert_eq!(
        stream.held(&all).await,
        Vec::<u64>::new(),
        "acknowledged after the restore, still stored"
    );
    assert_eq!(stream.count(&inbox(&bob_key)).await, 0);
}

/// Hostile bodies: each is refused at once with the stable error headers (400 `malformed`, or
/// 413 `too_large` past 16 KiB), and none deletes or reads anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_fetch_bodies_are_refused_with_stable_errors() {
    let stack = stack_with(Limits::OFF).await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    let stream = MailStream::open(&stack).await;
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(send(&alice, &bob_key, format!("m{i}").as_bytes()).await);
    }
    let last = seqs[2];
    // The true time of the floor: every body below would be served but for what is wrong.
    let time = fetch(&bob, 0, 256, 0).await.unwrap().time_of(last);
    let alice_hex = alice_key.public_key().to_hex();
    let bob_hex = bob_key.public_key().to_hex();
    let text = |value: serde_json::Value| value.to_string().into_bytes();
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("not JSON", b"after=5&max=10".to_vec()),
        ("not UTF-8", vec![0xff, 0xfe, 0x00, 0x7b]),
        ("a JSON array", text(json!([last, 10, time]))),
        ("a JSON string", text(json!("{\"after\":0}"))),
        ("null", b"null".to_vec()),
        ("a number", b"5".to_vec()),
        (
            "negative after",
            text(json!({"after": -1, "max": 10, "time": time})),
        ),
        (
            "after as a string",
            text(json!({"after": last.to_string(), "max": 10, "time": time})),
        ),
        (
            "after 2^64",
            format!("{{\"after\":18446744073709551616,\"max\":10,\"time\":{time}}}").into(),
        ),
        (
            "after 2^53",
            text(json!({"after": 1u64 << 53, "max": 10, "time": time})),
        ),
        (
            "after u64::MAX",
            text(json!({"after": u64::MAX, "max": 10, "time": time})),
        ),
        (
            "after a fraction",
            format!("{{\"after\":1.5,\"max\":10,\"time\":{time}}}").into(),
        ),
        (
            "after in exponent form",
            format!("{{\"after\":1e0,\"max\":10,\"time\":{time}}}").into(),
        ),
        ("max 0", text(json!({"after": 0, "max": 0, "time": 0}))),
        ("max 257", text(json!({"after": 0, "max": 257, "time": 0}))),
        ("max -1", text(json!({"after": 0, "max": -1, "time": 0}))),
        (
            "max 2^32",
            text(json!({"after": 0, "max": 1u64 << 32, "time": 0})),
        ),
        ("time -1", text(json!({"after": 0, "max": 10, "time": -1}))),
        (
            "time as a string",
            text(json!({"after": last, "max": 10, "time": time.to_string()})),
        ),
        (
            "time a fraction",
            format!("{{\"after\":{last},\"max\":10,\"time\":{time}.5}}").into(),
        ),
        (
            "time 2^53",
            text(json!({"after": last, "max": 10, "time": 1u64 << 53})),
        ),
        (
            "time 2^53 with after 0",
            text(json!({"after": 0, "max": 10, "time": 1u64 << 53})),
        ),
        (
            "time u64::MAX",
            text(json!({"after": last, "max": 10, "time": u64::MAX})),
        ),
        (
            "time 2^64",
            format!("{{\"after\":{last},\"max\":10,\"time\":18446744073709551616}}").into(),
        ),
        (
            "after with time 0",
            text(json!({"after": last, "max": 10, "time": 0})),
        ),
        ("missing after", text(json!({"max": 10, "time": time}))),
        ("missing max", text(json!({"after": 0, "time": time}))),
        ("missing time", text(json!({"after": 0, "max": 10}))),
        (
            "missing time, after > 0",
            text(json!({"after": last, "max": 10})),
        ),
        ("an empty object", text(json!({}))),
        (
            "null after",
            text(json!({"after": null, "max": 10, "time": time})),
        ),
        (
            "null time",
            text(json!({"after": last, "max": 10, "time": null})),
        ),
        (
            "an epoch besides the time",
            text(json!({"after": last, "max": 10, "time": time, "epoch": 1})),
        ),
        (
            "an epoch of 0 besides the time",
            text(json!({"after": 0, "max": 10, "time": 0, "epoch": 0})),
        ),
        (
            "the old body: an epoch instead of the time",
            text(json!({"after": last, "max": 10, "epoch": time})),
        ),
        (
            "the old body from the start",
            text(json!({"after": 0, "max": 10, "epoch": 0})),
        ),
        (
            "another user's key",
            text(json!({"after": 0, "max": 10, "time": 0, "key": alice_hex})),
        ),
        (
            "another user's inbox",
            text(json!({"after": 0, "max": 10, "time": 0,
                "inbox": format!("kez.inbox.{alice_hex}.{alice_hex}")})),
        ),
        (
            "the own key, named",
            text(json!({"after": 0, "max": 10, "time": 0, "key": bob_hex})),
        ),
        (
            "the old consumer's name",
            text(
                json!({"after": 0, "max": 10, "time": 0, "consumer": format!("inbox_{alice_hex}")}),
            ),
        ),
    ];
    let mut failures = Vec::new();
    let expect =
        |what: &str, result: Result<Answer, ServiceError>, code: u16, name: &str| match result {
            Ok(answer) => Err(format!("{what}: answered {answer:?}")),
            Err(err) => {
                let stable = err
                    .headers
                    .get("Nats-Service-Error-Code")
                    .map(|v| v.as_str().to_owned())
                    == Some(code.to_string())
                    && err.headers.get("Kez-Error").map(|v| v.as_str()) == Some(name)
                    && err
                        .headers
                        .get("Nats-Service-Error")
                        .is_some_and(|v| !v.as_str().is_empty());
                if (err.code, err.name.as_str()) == (code, name) && stable {
                    println!("refused {what}: {code} {name}: {}", err.message);
                    Ok(())
                } else {
                    Err(format!("{what}: {err:?}"))
                }
            }
        };
    for (what, body) in malformed {
        let started = Instant::now();
        let result = fetch_body(&bob, body).await;
        if let Err(problem) = expect(what, result, 400, "malformed") {
            failures.push(problem);
        }
        assert!(started.elapsed() < ANSWER_WITHIN);
    }
    // Past 16 KiB, whatever it is; up to the broker's own payload limit.
    for (what, size) in [("16 KiB + 1", 16 * 1024 + 1), ("900 KiB", 900 * 1024)] {
        let mut padded = br#"{"after":0,"max":10,"time":0,"pad":""#.to_vec();
        padded.resize(size - 2, b'x');
        padded.extend_from_slice(b"\"}");
        assert_eq!(padded.len(), size);
        if let Err(problem) = expect(what, fetch_body(&bob, padded).await, 413, "too_large") {
            failures.push(problem);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing was read for anyone else, nothing deleted.
    assert_eq!(stream.held(&seqs).await, seqs);
    let own = fetch(&bob, 0, 256, 0).await.unwrap();
    assert_eq!(own.seqs(), seqs, "the service still answers bob");
    assert_eq!(fetch(&alice, 0, 256, 0).await.unwrap().messages.len(), 0);
}

/// Fetches count against the per-key request limit: a flood from one key gets 429
/// `rate_limited` with a retry time, and a forged `Nats-Request-Info` header naming another
/// user changes nothing (nats-server writes that header itself); meanwhile the other user's
/// fetches all succeed and answer its own messages. After the retry time the flooder is
/// served again, its own inbox only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_flood_gets_429_while_other_users_fetch_on() {
    let burst = 20;
    let per_sec = 2.0;
    let stack = stack_with(Limits {
        per_key: Rate::new(per_sec, burst),
        ..Limits::OFF
    })
    .await;
    let (mallory_key, mallory) = stack.registered("mallory").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    let (_alice_key, alice) = stack.registered("alice").await;
    let stream = MailStream::open(&stack).await;
    let bob_seq = send(&alice, &bob_key, b"for bob").await;
    let mallory_seq = send(&alice, &mallory_key, b"for mallory").await;

    let mut forged = HeaderMap::new();
    forged.insert(
        "Nats-Request-Info",
        json!({"acc": "APP", "user": bob_key.public_key().to_nkey(), "host": "10.9.9.9"})
            .to_string()
            .as_str(),
    );
    let started = Instant::now();
    let flood = (0..200).map(|_| {
        let mallory = mallory.clone();
        let forged = forged.clone();
        async move {
            tokio::time::timeout(
                ANSWER_WITHIN,
                mallory.request_with_headers(FETCH, forged, body(0, 256, 0).into()),
            )
            .await
            .expect("answered in time")
            .expect("every request is answered")
        }
    });
    let bob_fetches = async {
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(fetch(&bob, 0, 256, 0).await);
        }
        answers
    };
    let (answers, bob_answers) = tokio::join!(futures::future::join_all(flood), bob_fetches);
    let elapsed = started.elapsed().as_secs_f64();
    let mut ok = 0;
    let mut limited = 0;
    for answer in &answers {
        let headers = answer.headers.as_ref();
        match headers.and_then(|headers| headers.get("Nats-Service-Error-Code")) {
            None => {
                let fetched = FetchAnswer::decode(&answer.payload, false).unwrap();
                let seqs: Vec<u64> = fetched.messages.iter().map(|m| m.seq).collect();
                assert_eq!(seqs, [mallory_seq], "mallory reads only her own inbox");
                ok += 1;
            }
            Some(code) => {
                let headers = headers.unwrap();
                assert_eq!(code.as_str(), "429");
                assert_eq!(headers.get("Kez-Error").unwrap().as_str(), "rate_limited");
                assert!(
                    headers
                        .get("Nats-Service-Error")
                        .unwrap()
                        .as_str()
                        .contains("too many requests")
                );
                let retry: u64 = headers
                    .get("Kez-Retry-After-Ms")
                    .expect("a 429 says when to retry")
                    .as_str()
                    .parse()
                    .unwrap();
                assert!((1..=1000).contains(&retry), "retry after {retry} ms");
                limited += 1;
            }
        }
    }
    let allowed = f64::from(burst) + elapsed * per_sec + 1.0;
    println!("fetch flood: {ok} answered, {limited} limited in {elapsed:.2} s");
    // mallory's registration took one request of her burst.
    assert!(
        ok >= burst as usize - 1 && ok as f64 <= allowed,
        "{ok} of 200 answered in {elapsed:.2} s; the limit allows {allowed:.0}"
    );
    assert_eq!(ok + limited, 200);
    for answer in bob_answers {
        let answer = answer.expect("bob is unaffected by mallory's flood");
        assert_eq!(answer.seqs(), [bob_seq]);
    }
    // Nothing of bob's was touched by anything mallory sent.
    assert!(stream.holds(bob_seq).await);

    // After the retry time mallory is served again: her own inbox, acknowledged.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        match fetch(&mallory, 0, 256, 0).await {
            Ok(answer) => break answer,
            Err(err) if err.code == 429 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("mallory is still refused: {err:?}"),
        }
    };
    assert_eq!(answer.seqs(), [mallory_seq]);
}

/// Every stored message republishes its headers on the recipient's `kez.new.<hex>.<hex>`:
/// an empty payload, its `Nats-Sequence`, and as `Nats-Last-Sequence` the sequence of the
/// previous message on the same inbox (0 for none), however many others' came in between.
/// Only the recipient may subscribe there: another registered user, or one without a handle,
/// gets the broker's permission error, and its own subscription hears nothing of others' mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_mail_notifications_reach_only_the_recipient() {
    let stack = stack_with(Limits::OFF).await;
    let (alice_key, alice) = stack.registered("alice").await;
    let (bob_key, bob) = stack.registered("bobby").await;
    let bob_new = new_mail_subject(&bob_key.public_key(), &bob_key.public_key());
    let alice_new = new_mail_subject(&alice_key.public_key(), &alice_key.public_key());
    let mut bob_hears = bob.subscribe(bob_new.clone()).await.unwrap();
    let mut alice_hears = alice.subscribe(alice_new.clone()).await.unwrap();
    bob.flush().await.unwrap();
    alice.flush().await.unwrap();

    // alice tries to listen to bob's, and to all of them; carol (no handle) to bob's.
    let (spy, mut spy_errors) = stack.connect_as(&alice_key).await.unwrap();
    let carol_key = Arc::new(SecretKey::generate());
    let (carol, mut carol_errors) = stack.connect_as(&carol_key).await.unwrap();
    let mut spies = Vec::new();
    for subject in [
        bob_new.clone(),
        "kez.new.>".to_owned(),
        "kez.new.*.*".to_owned(),
    ] {
        spies.push(spy.subscribe(subject.clone()).await.unwrap());
        spy.flush().await.unwrap();
        expect_violation(
            &mut spy_errors,
            Violation::Subscription,
            &subject,
            ANSWER_WITHIN,
        )
        .await
        .unwrap_or_else(|problem| panic!("alice subscribed to {subject}: {problem}"));
    }
    let carol_new = new_mail_subject(&carol_key.public_key(), &carol_key.public_key());
    for subject in [bob_new.clone(), carol_new] {
        spies.push(carol.subscribe(subject.clone()).await.unwrap());
        carol.flush().await.unwrap();
        expect_violation(
            &mut carol_errors,
            Violation::Subscription,
            &subject,
            ANSWER_WITHIN,
        )
        .await
        .unwrap_or_else(|problem| panic!("carol subscribed to {subject}: {problem}"));
    }

    let first = send(&alice, &bob_key, b"first").await;
    let between = send(&bob, &alice_key, b"for alice").await;
    let second = send(&alice, &bob_key, b"second!").await;
    let mut heard = Vec::new();
    for _ in 0..2 {
        let note = tokio::time::timeout(ANSWER_WITHIN, bob_hears.next())
            .await
            .expect("bob hears of new mail")
            .unwrap();
        let headers = note.headers.clone().expect("headers");
        let header = |name: &str| headers.get(name).map(|value| value.as_str().to_owned());
        println!("bob's notification on {}: {headers:?}", note.subject);
        assert_eq!(note.subject.as_str(), bob_new);
        assert!(note.payload.is_empty(), "headers only");
        assert_eq!(header("Nats-Subject"), Some(inbox(&bob_key)));
        heard.push((
            header("Nats-Sequence").unwrap().parse::<u64>().unwrap(),
            header("Nats-Last-Sequence")
                .unwrap()
                .parse::<u64>()
                .unwrap(),
            header("Nats-Msg-Size").map(|size| size.parse::<usize>().unwrap()),
        ));
    }
    assert_eq!(
        heard,
        [(first, 0, Some(5)), (second, first, Some(7))],
        "sequence, the previous on bob's inbox, size"
    );
    let note = tokio::time::timeout(ANSWER_WITHIN, alice_hears.next())
        .await
        .expect("alice hears of hers")
        .unwrap();
    assert_eq!(
        note.headers.unwrap().get("Nats-Sequence").unwrap().as_str(),
        between.to_string()
    );
    // Nothing more for either: alice's subscription heard nothing of bob's mail.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(alice_hears.next().now_or_never().is_none());
    assert!(bob_hears.next().now_or_never().is_none());
    // A message read and acknowledged: the next notification says the inbox was empty.
    let read = fetch(&bob, 0, 256, 0).await.unwrap();
    let (after, time) = read.floor();
    fetch(&bob, after, 256, time).await.unwrap();
    let third = send(&alice, &bob_key, b"third").await;
    let note = tokio::time::timeout(ANSWER_WITHIN, bob_hears.next())
        .await
        .unwrap()
        .unwrap();
    let headers = note.headers.unwrap();
    assert_eq!(
        headers.get("Nats-Sequence").unwrap().as_str(),
        third.to_string()
    );
    assert_eq!(headers.get("Nats-Last-Sequence").unwrap().as_str(), "0");
}

/// A connection nats-server does not name through the callout (here the server's own `SERVER`
/// user, whose requests cross no import, so carry no `Nats-Request-Info`) has no inbox: 403
/// `forbidden`, nothing read or deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_without_a_caller_is_forbidden() {
    let stack = stack_with(Limits::OFF).await;
    let (_alice_key, alice) = stack.registered("alice").await;
    let (bob_key, _bob) = stack.registered("bobby").await;
    let seq = send(&alice, &bob_key, b"for bob").await;
    let server = stack.server_client().await;
    for (after, time) in [(0, 0), (seq, 1)] {
        let err = fetch(&server, after, 256, time).await.unwrap_err();
        assert_eq!((err.code, err.name.as_str()), (403, "forbidden"));
    }
    assert!(MailStream::open(&stack).await.holds(seq).await);
}
