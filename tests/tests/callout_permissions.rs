//! The two permission profiles the auth callout grants (PROTOCOL.md §6), against a real
//! nats-server and the real callout: every forbidden action gets the broker's permission error
//! for its exact subject, every allowed one works, and the profile follows registration on the
//! next connect. No user reaches JetStream at all: mail goes in through `kez.mail.send` and out
//! through `kez.mail.fetch`, which serves only the caller's own inbox, whatever the request says;
//! no user can read, purge or learn of another user's messages.
//!
//! Users: A (`alice`) and B (`bobby`) registered, each over the narrow profile and then
//! reconnected; C never registered.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use kez_chat_server::store::LEGACY_INBOX_STREAM;
use kez_core::SecretKey;
use kez_proto::answer::Profile;
use kez_proto::directory::{DIRECT_GET_BODY, DIRECTORY_BUCKET, Slot};
use kez_proto::mail::{FetchAnswer, FetchRequest};
use kez_proto::subjects::{
    MAIL_STREAM, inbox_subject, live_subject, new_mail_subject, reply_prefix,
};
use kez_tests::callout::{CalloutStack, Violation, expect_violation, register};
use kez_tests::kez_server::{ServiceError, TEST_DOMAIN, call, call_ok};
use kez_tests::requests::mail;

/// How long the broker gets to report a permission violation. It answers within milliseconds;
/// this only bounds a failing run.
const VIOLATION_WITHIN: Duration = Duration::from_secs(5);

/// The mail fetch endpoint.
const FETCH: &str = "kez.mail.fetch";

/// A broker with the callout, two registered users and one unregistered.
struct World {
    stack: CalloutStack,
    a: Arc<SecretKey>,
    b: Arc<SecretKey>,
    c: Arc<SecretKey>,
}

impl World {
    async fn start() -> World {
        let stack = CalloutStack::start().await;
        let world = World {
            stack,
            a: Arc::new(SecretKey::generate()),
            b: Arc::new(SecretKey::generate()),
            c: Arc::new(SecretKey::generate()),
        };
        for (key, name) in [(&world.a, "alice"), (&world.b, "bobby")] {
            // Registration over the narrow profile, as a new client does.
            let (narrow, _errors) = world.stack.connect_as(key).await.expect("connects");
            register(&narrow, key, name)
                .await
                .unwrap_or_else(|err| panic!("registering {name}: {err:?}"));
        }
        world
    }

    fn key(&self, who: Who) -> &Arc<SecretKey> {
        match who {
            Who::A => &self.a,
            Who::C => &self.c,
        }
    }

    fn hex(key: &Arc<SecretKey>) -> String {
        key.public_key().to_hex()
    }
}

/// `key`'s inbox subject (its key is its one device).
fn inbox(key: &SecretKey) -> String {
    inbox_subject(&key.public_key(), &key.public_key())
}

/// `key`'s live-notice subject (its key is its one device).
fn live(key: &SecretKey) -> String {
    live_subject(&key.public_key(), &key.public_key())
}

/// `key`'s new-mail subject.
fn new_mail(key: &SecretKey) -> String {
    new_mail_subject(&key.public_key(), &key.public_key())
}

#[derive(Debug, Clone, Copy)]
enum Who {
    /// Registered (`alice`), reconnected with the full profile.
    A,
    /// Unregistered.
    C,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Subscribe,
    QueueSubscribe,
    Publish,
    /// A publish with a reply subject on the client's own (allowed) reply prefix.
    Request,
}

struct Row {
    who: Who,
    op: Op,
    subject: String,
    why: &'static str,
}

fn row(who: Who, op: Op, subject: impl Into<String>, why: &'static str) -> Row {
    Row {
        who,
        op,
        subject: subject.into(),
        why,
    }
}

/// Every action a user must not be able to take, one row each.
fn forbidden_rows(world: &World) -> Vec<Row> {
    use Op::*;
    use Who::*;
    let a_hex = World::hex(&world.a);
    let b_hex = World::hex(&world.b);
    let c_hex = World::hex(&world.c);
    let b_inbox = inbox(&world.b);
    let b_new = new_mail(&world.b);
    // The previous release's per-user consumers and the import prefix they were reached by.
    let legacy = LEGACY_INBOX_STREAM;
    let a_consumer = format!("inbox_{a_hex}");
    let b_consumer = format!("inbox_{b_hex}");
    let js = "$JS.API";
    vec![
        // Other users' mail, and the own, straight from the stream.
        row(A, Subscribe, b_inbox.clone(), "read B's inbox subject"),
        row(A, Subscribe, "kez.inbox.>", "read every inbox"),
        row(A, Subscribe, "kez.inbox.*.*", "read every device's inbox"),
        row(
            A,
            Subscribe,
            inbox(&world.a),
            "read even the own inbox around the server",
        ),
        row(
            A,
            Publish,
            b_inbox.clone(),
            "write into B's inbox around the server's checks",
        ),
        row(
            A,
            Publish,
            inbox(&world.a),
            "write into the own inbox around the server's checks",
        ),
        row(
            A,
            Publish,
            format!("kez.inbox.{b_hex}"),
            "write into B's inbox under the old single-token subject",
        ),
        row(
            A,
            Publish,
            "kez.inbox.0123.0123",
            "write into an inbox nobody owns",
        ),
        // Other users' new-mail notifications: learning that B has mail, and when.
        row(A, Subscribe, b_new.clone(), "hear of B's new mail"),
        row(A, Subscribe, "kez.new.>", "hear of everyone's new mail"),
        row(
            A,
            Subscribe,
            "kez.new.*.*",
            "hear of every device's new mail",
        ),
        row(
            A,
            Subscribe,
            format!("kez.new.{a_hex}.*"),
            "a wildcard over the own identity's devices",
        ),
        row(
            A,
            Subscribe,
            format!("kez.new.{a_hex}.{b_hex}"),
            "a device of the own identity that is not the own key",
        ),
        row(
            A,
            QueueSubscribe,
            b_new.clone(),
            "B's new mail, in a queue group",
        ),
        row(A, Publish, b_new.clone(), "forge a notification for B"),
        // Other users' live notices (typing, presence): sending is open, listening is not.
        row(A, Subscribe, live(&world.b), "hear B's live notices"),
        row(A, Subscribe, "kez.live.>", "hear everyone's live notices"),
        row(
            A,
            Subscribe,
            "kez.live.*.*",
            "hear every device's live notices",
        ),
        row(
            A,
            Subscribe,
            format!("kez.live.{a_hex}.*"),
            "a wildcard over the own identity's devices' notices",
        ),
        row(
            A,
            Subscribe,
            format!("kez.live.{a_hex}.{b_hex}"),
            "live notices of a device of the own identity that is not the own key",
        ),
        row(
            A,
            QueueSubscribe,
            live(&world.b),
            "B's live notices, in a queue group",
        ),
        row(
            A,
            Publish,
            format!("kez.live.{b_hex}"),
            "a live subject of the wrong shape",
        ),
        // The directory (PROTOCOL.md §5.7): only the direct get of one subject, no body form,
        // no other bucket, no writes.
        row(
            A,
            Request,
            format!("{js}.DIRECT.GET.KV_{DIRECTORY_BUCKET}"),
            "walk the directory by sequence (the body form of direct get)",
        ),
        row(
            C,
            Request,
            format!("{js}.DIRECT.GET.KV_{DIRECTORY_BUCKET}"),
            "walk the directory by sequence, unregistered",
        ),
        row(
            A,
            Request,
            format!("{js}.DIRECT.GET.KV_{DIRECTORY_BUCKET}.$KV.{DIRECTORY_BUCKET}.ab.cd"),
            "a directory subject of two tokens",
        ),
        row(
            A,
            Request,
            format!("{js}.STREAM.MSG.GET.KV_{DIRECTORY_BUCKET}"),
            "read directory entries by sequence",
        ),
        row(
            A,
            Request,
            format!("{js}.STREAM.INFO.KV_{DIRECTORY_BUCKET}"),
            "count the directory's entries",
        ),
        row(
            A,
            Request,
            format!("{js}.DIRECT.GET.KV_kez_handles.$KV.kez_handles.bobby"),
            "read the handles bucket itself",
        ),
        row(
            A,
            Publish,
            format!("$KV.{DIRECTORY_BUCKET}.{}", Slot::handle("alice").id()),
            "write a directory entry",
        ),
        // Reading the stream through the JetStream API: by sequence, by subject, its counts.
        row(
            A,
            Request,
            format!("{js}.DIRECT.GET.{MAIL_STREAM}"),
            "direct get of stored messages (batch, next_by_subj)",
        ),
        row(
            A,
            Request,
            format!("{js}.DIRECT.GET.{MAIL_STREAM}.{b_inbox}"),
            "direct get of B's last message",
        ),
        row(
            A,
            Request,
            format!("{js}.STREAM.MSG.GET.{MAIL_STREAM}"),
            "read stored messages by sequence",
        ),
        row(
            A,
            Request,
            format!("{js}.STREAM.INFO.{MAIL_STREAM}"),
            "stream info (with subjects_filter: who has how much mail)",
        ),
        row(A, Request, format!("{js}.STREAM.NAMES"), "list streams"),
        row(A, Request, format!("{js}.STREAM.LIST"), "list streams"),
        row(A, Request, format!("{js}.INFO"), "account info"),
        // Deleting from it.
        row(
            A,
            Request,
            format!("{js}.STREAM.PURGE.{MAIL_STREAM}"),
            "purge B's inbox (filter) or every inbox",
        ),
        row(
            A,
            Request,
            format!("{js}.STREAM.MSG.DELETE.{MAIL_STREAM}"),
            "delete one of B's messages by sequence",
        ),
        row(
            A,
            Request,
            format!("{js}.STREAM.DELETE.{MAIL_STREAM}"),
            "delete the mail stream",
        ),
        row(
            A,
            Request,
            format!("{js}.STREAM.UPDATE.{MAIL_STREAM}"),
            "republish everyone's mail somewhere readable",
        ),
        // Consumers: none exist, and none may be made.
        row(
            A,
            Request,
            format!("{js}.CONSUMER.CREATE.{MAIL_STREAM}"),
            "create a consumer",
        ),
        row(
            A,
            Request,
            format!("{js}.CONSUMER.CREATE.{MAIL_STREAM}.spy.{b_inbox}"),
            "create a consumer on B's subject",
        ),
        row(
            A,
            Request,
            format!("{js}.CONSUMER.DURABLE.CREATE.{MAIL_STREAM}.spy"),
            "create a durable consumer",
        ),
        row(
            A,
            Request,
            format!("{js}.CONSUMER.INFO.{MAIL_STREAM}.spy"),
            "consumer info",
        ),
        row(
            A,
            Request,
            format!("{js}.CONSUMER.MSG.NEXT.{MAIL_STREAM}.spy"),
            "pull from a consumer",
        ),
        row(
            A,
            Request,
            format!("{js}.CONSUMER.NAMES.{MAIL_STREAM}"),
            "list consumers",
        ),
        row(
            A,
            Request,
            format!("{js}.CONSUMER.LIST.{MAIL_STREAM}"),
            "list consumers",
        ),
        row(
            A,
            Request,
            format!("{js}.CONSUMER.DELETE.{MAIL_STREAM}.spy"),
            "delete a consumer",
        ),
        row(
            A,
            Publish,
            format!("$JS.ACK.{MAIL_STREAM}.spy.1.1.1.1700000000000000000.0"),
            "acknowledge on the mail stream",
        ),
        // The previous release's consumers, the own included, and their import prefix.
        row(
            A,
            Request,
            format!("{js}.CONSUMER.MSG.NEXT.{legacy}.{b_consumer}"),
            "fetch from B's old consumer",
        ),
        row(
            A,
            Request,
            format!("{js}.CONSUMER.INFO.{legacy}.{a_consumer}"),
            "the own old consumer's info",
        ),
        row(
            A,
            Request,
            format!("{js}.CONSUMER.DELETE.{legacy}.{a_consumer}"),
            "delete even its own old consumer",
        ),
        row(
            A,
            Request,
            format!("{js}.STREAM.PURGE.{legacy}"),
            "purge the old inbox stream",
        ),
        row(
            A,
            Publish,
            format!("$JS.ACK.{legacy}.{b_consumer}.1.1.1.1700000000000000000.0"),
            "acknowledge (delete) B's old messages",
        ),
        row(
            A,
            Request,
            format!("kez.js.CONSUMER.MSG.NEXT.{legacy}.{a_consumer}"),
            "the old import: pull from the own consumer",
        ),
        row(
            A,
            Request,
            format!("kez.js.CONSUMER.MSG.NEXT.{legacy}.{b_consumer}"),
            "the old import: pull from B's consumer",
        ),
        row(
            A,
            Request,
            format!("kez.js.CONSUMER.INFO.{legacy}.{a_consumer}"),
            "the old import: the own consumer's info",
        ),
        row(
            A,
            Request,
            format!("kez.js.DIRECT.GET.{MAIL_STREAM}"),
            "a JetStream API under the old import prefix",
        ),
        row(
            A,
            Request,
            format!("kez.js.STREAM.PURGE.{MAIL_STREAM}"),
            "a purge under the old import prefix",
        ),
        // Other users' replies.
        row(A, Subscribe, "_INBOX.>", "every reply subject"),
        row(
            A,
            Subscribe,
            format!("_INBOX.{b_hex}.>"),
            "B's reply prefix (B's fetch answers)",
        ),
        row(
            C,
            Subscribe,
            format!("_INBOX.{b_hex}.>"),
            "B's reply prefix",
        ),
        // Service impersonation.
        row(A, Subscribe, "kez.registry.lookup", "answer lookups"),
        row(
            A,
            QueueSubscribe,
            "kez.registry.lookup",
            "join the service's queue group",
        ),
        row(A, Subscribe, FETCH, "answer B's fetches"),
        row(
            A,
            QueueSubscribe,
            FETCH,
            "join the fetch service's queue group",
        ),
        row(A, Subscribe, "kez.mail.>", "read every send and fetch"),
        row(A, Subscribe, "kez.>", "every kez subject"),
        row(
            C,
            Subscribe,
            "kez.registry.register",
            "answer registrations",
        ),
        row(A, Subscribe, ">", "everything"),
        row(A, Request, "$SRV.INFO.kez-mail", "service discovery"),
        // The registry's buckets.
        row(
            A,
            Request,
            format!("{js}.STREAM.DELETE.KV_kez_handles"),
            "delete the registry",
        ),
        row(
            A,
            Publish,
            "$KV.kez_handles.bobby",
            "write the registry directly",
        ),
        row(
            C,
            Publish,
            format!("$KV.kez_disabled.{b_hex}"),
            "disable B directly",
        ),
        // The system account and the callout itself.
        row(A, Request, "$SYS.REQ.SERVER.PING", "server ping"),
        row(A, Request, "$SYS.REQ.USER.AUTH", "call the callout"),
        row(A, Subscribe, "$SYS.>", "system traffic"),
        row(C, Subscribe, "$SYS.>", "system traffic"),
        // The narrow profile.
        row(
            C,
            Publish,
            b_inbox.clone(),
            "unregistered writes to an inbox",
        ),
        row(C, Request, "kez.mail.send", "unregistered sends mail"),
        row(C, Request, FETCH, "unregistered fetches mail"),
        row(
            C,
            Subscribe,
            format!("kez.new.{c_hex}.{c_hex}"),
            "the own new-mail subject before registering",
        ),
        row(C, Subscribe, b_new, "hear of B's new mail"),
        row(
            C,
            Publish,
            live(&world.b),
            "unregistered sends a live notice",
        ),
        row(
            C,
            Subscribe,
            format!("kez.live.{c_hex}.{c_hex}"),
            "the own live subject before registering",
        ),
        row(C, Request, "kez.sigchain.head", "sigchain service"),
        row(C, Request, "kez.sigchain.append", "sigchain service"),
        row(
            C,
            Request,
            "kez.registry.whois",
            "whois is for registered keys",
        ),
        row(
            C,
            Request,
            format!("{js}.DIRECT.GET.{MAIL_STREAM}"),
            "direct get of stored messages",
        ),
        row(
            C,
            Request,
            format!("kez.js.CONSUMER.MSG.NEXT.{legacy}.{b_consumer}"),
            "fetch from B's old consumer",
        ),
    ]
}

/// Tries one forbidden action on a fresh connection; `Ok` with the broker's error text.
async fn try_forbidden(world: &World, row: &Row) -> Result<String, String> {
    let key = world.key(row.who);
    let (client, mut errors) = world
        .stack
        .connect_as(key)
        .await
        .map_err(|err| format!("cannot connect: {err}"))?;
    let subject = row.subject.clone();
    let kind = match row.op {
        Op::Subscribe => {
            // The subscription stays alive until the error arrives.
            let _sub = client
                .subscribe(subject.clone())
                .await
                .map_err(|err| format!("subscribe: {err}"))?;
            client.flush().await.map_err(|err| err.to_string())?;
            return expect_violation(
                &mut errors,
                Violation::Subscription,
                &subject,
                VIOLATION_WITHIN,
            )
            .await;
        }
        Op::QueueSubscribe => {
            let _sub = client
                .queue_subscribe(subject.clone(), "q".to_owned())
                .await
                .map_err(|err| format!("subscribe: {err}"))?;
            client.flush().await.map_err(|err| err.to_string())?;
            return expect_violation(
                &mut errors,
                Violation::Subscription,
                &subject,
                VIOLATION_WITHIN,
            )
            .await;
        }
        Op::Publish => {
            client
                .publish(subject.clone(), Bytes::from_static(b"{}"))
                .await
                .map_err(|err| err.to_string())?;
            Violation::Publish
        }
        Op::Request => {
            let reply = client.new_inbox();
            assert!(reply.starts_with(&reply_prefix(&key.public_key())));
            client
                .publish_with_reply(subject.clone(), reply, Bytes::from_static(b"{}"))
                .await
                .map_err(|err| err.to_string())?;
            Violation::Publish
        }
    };
    client.flush().await.map_err(|err| err.to_string())?;
    expect_violation(&mut errors, kind, &subject, VIOLATION_WITHIN).await
}

/// One row per forbidden action; each must get the broker's permission error naming its exact
/// subject. Every row is tried and reported before the test fails.
#[tokio::test]
async fn every_forbidden_action_gets_the_brokers_permission_error() {
    let world = World::start().await;
    let rows = forbidden_rows(&world);
    let results =
        futures::future::join_all(rows.iter().map(|row| try_forbidden(&world, row))).await;
    let mut failures = Vec::new();
    for (row, result) in rows.iter().zip(results) {
        let line = format!("{:?} {:?} {} ({})", row.who, row.op, row.subject, row.why);
        match result {
            Ok(error) => println!("refused  {line}: {error}"),
            Err(problem) => {
                println!("ALLOWED? {line}: {problem}");
                failures.push(format!("{line}: {problem}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} forbidden actions were not refused:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// Asserts that the broker reported nothing on a connection.
fn assert_no_errors(
    who: &str,
    errors: &mut tokio::sync::mpsc::UnboundedReceiver<async_nats::ServerError>,
) {
    let mut seen = Vec::new();
    while let Ok(err) = errors.try_recv() {
        seen.push(err.to_string());
    }
    assert!(seen.is_empty(), "{who}'s connection got errors: {seen:?}");
}

/// A `kez.mail.fetch` body: the floor `after`, stored at `time` (µs).
fn fetch_body(after: u64, max: u32, time: u64) -> Bytes {
    serde_json::to_vec(&FetchRequest {
        after,
        max,
        time,
        origins: false,
    })
    .unwrap()
    .into()
}

/// A decoded fetch answer: the time of its last message (the floor's `time` for the next
/// fetch; 0 without messages), pending, `(seq, envelope)`s.
type Fetched = (u64, u64, Vec<(u64, Vec<u8>)>);

fn decode_fetch(body: &[u8]) -> Fetched {
    let answer = FetchAnswer::decode(body, false).expect("a fetch answer decodes");
    (
        answer.messages.last().map_or(0, |message| message.time),
        answer.pending,
        answer
            .messages
            .iter()
            .map(|message| (message.seq, message.envelope.to_vec()))
            .collect(),
    )
}

/// `kez.mail.fetch` as `client`.
async fn fetch(client: &Client, after: u64, max: u32, time: u64) -> Result<Fetched, ServiceError> {
    let answer = call(client, FETCH, fetch_body(after, max, time)).await?;
    Ok(decode_fetch(&answer))
}

/// Messages `KEZ_MAIL` holds, in all or on one subject, read as the server's own user.
async fn mail_messages(app: &Client, subject: Option<&str>) -> u64 {
    let js = jetstream::new(app.clone());
    let mut stream = js.get_stream(MAIL_STREAM).await.expect("the mail stream");
    match subject {
        None => stream.info().await.expect("stream info").state.messages,
        Some(subject) => {
            let mut counts = stream.info_with_subjects(subject).await.expect("info");
            let mut total = 0;
            while let Some((_, count)) = counts.try_next().await.expect("subjects") {
                total += count as u64;
            }
            total
        }
    }
}

/// When `KEZ_MAIL` stored sequence `seq`, µs since the Unix epoch, read as the server's own
/// user.
async fn stored_time(app: &Client, seq: u64) -> u64 {
    let js = jetstream::new(app.clone());
    let stream = js.get_stream(MAIL_STREAM).await.expect("the mail stream");
    let message = stream.get_raw_message(seq).await.expect("the message");
    u64::try_from(message.time.unix_timestamp_nanos() / 1000).expect("after 1970")
}

/// Sends `envelope` to `to` as `from`; answers its sequence.
async fn send(from: &Client, to: &SecretKey, id: [u8; 16], envelope: &[u8]) -> u64 {
    let answer = call(from, "kez.mail.send", mail(&to.public_key(), id, envelope))
        .await
        .expect("sent");
    let delivered: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    delivered["seq"].as_u64().unwrap()
}

/// A sends to B through `kez.mail.send`; B hears of it on its own new-mail subject, fetches it
/// with `kez.mail.fetch` and acknowledges by naming its floor, after which the message is gone;
/// a retried send with the same message id is stored once; a send to a key without a handle is
/// refused and stores nothing; C may register, look up and read the server info.
#[tokio::test]
async fn allowed_actions_work() {
    let world = World::start().await;
    let app = world.stack.server_client().await;
    let (a, mut a_errors) = world.stack.connect_as(&world.a).await.unwrap();
    let (b, mut b_errors) = world.stack.connect_as(&world.b).await.unwrap();
    let mut b_hears = b.subscribe(new_mail(&world.b)).await.unwrap();
    b.flush().await.unwrap();
    let send_raw = |id: [u8; 16], envelope: &'static [u8]| {
        let a = a.clone();
        let to = world.b.public_key();
        async move { call(&a, "kez.mail.send", mail(&to, id, envelope)).await }
    };

    // A -> B, stored by the server; B hears of it.
    let first: serde_json::Value =
        serde_json::from_slice(&send_raw([1; 16], b"sealed for bobby").await.unwrap()).unwrap();
    assert_eq!(first["duplicate"], false);
    let note = tokio::time::timeout(VIOLATION_WITHIN, b_hears.next())
        .await
        .expect("B hears of its new mail")
        .unwrap();
    assert_eq!(
        note.headers.unwrap().get("Nats-Sequence").unwrap().as_str(),
        first["seq"].to_string()
    );
    assert!(note.payload.is_empty());

    // A retried send with the same message id is stored once.
    let mut answers = Vec::new();
    for _ in 0..2 {
        let answer = send_raw([2; 16], b"retried").await.expect("answered");
        answers.push(serde_json::from_slice::<serde_json::Value>(&answer).unwrap());
    }
    assert_eq!(answers[0]["duplicate"], false, "the first copy is stored");
    assert_eq!(answers[1]["duplicate"], true, "the retry is recognised");
    assert_eq!(answers[0]["seq"], answers[1]["seq"], "and not stored again");
    assert_eq!(mail_messages(&app, None).await, 2);

    // A key without a handle has no inbox: refused, nothing stored.
    let nobody = SecretKey::generate().public_key();
    let refused = call(
        &a,
        "kez.mail.send",
        mail(&nobody, [3; 16], b"into the void"),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (refused.code, refused.name.as_str()),
        (404, "unknown_recipient")
    );
    assert_eq!(
        mail_messages(&app, None).await,
        2,
        "nothing else was stored"
    );

    // B fetches its own, then acknowledges them by naming the last one.
    let (time, pending, messages) = fetch(&b, 0, 10, 0).await.expect("B fetches");
    let payloads: Vec<&[u8]> = messages.iter().map(|(_, m)| m.as_slice()).collect();
    assert_eq!(payloads, [&b"sealed for bobby"[..], &b"retried"[..]]);
    assert_eq!(pending, 0);
    assert_eq!(
        mail_messages(&app, None).await,
        2,
        "a fetch alone deletes nothing"
    );
    let last = messages.last().unwrap().0;
    let (_, _, rest) = fetch(&b, last, 10, time).await.expect("B acknowledges");
    assert!(rest.is_empty(), "nothing to redeliver");
    assert_eq!(
        mail_messages(&app, None).await,
        0,
        "acknowledged means deleted"
    );
    // A has nothing, and reading that is allowed too.
    let (_, _, none) = fetch(&a, 0, 10, 0).await.expect("A fetches");
    assert!(none.is_empty());

    // C: the narrow profile's three services.
    let (c, mut c_errors) = world.stack.connect_as(&world.c).await.unwrap();
    let info = call_ok(&c, "kez.server.info", serde_json::json!({})).await;
    assert_eq!(info["domain"], "kez.test");
    let bobby = call_ok(
        &c,
        "kez.registry.lookup",
        serde_json::json!({"handle": "@bobby"}),
    )
    .await;
    assert_eq!(bobby["key"], serde_json::json!(world.b.public_key()));
    register(&c, &world.c, "carol")
        .await
        .expect("C may register");

    a.flush().await.unwrap();
    b.flush().await.unwrap();
    c.flush().await.unwrap();
    // Errors reach the channel through the client's event task, just after the flush.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_no_errors("A", &mut a_errors);
    assert_no_errors("B", &mut b_errors);
    assert_no_errors("C", &mut c_errors);
}

/// Live notices (PROTOCOL.md §6.2, §8.6): A publishes on B's live subject over core NATS and B,
/// subscribed to its own, gets it; no stream holds it; and neither side's connection reports a
/// permission error.
#[tokio::test]
async fn a_live_notice_reaches_its_recipient_and_no_stream() {
    let world = World::start().await;
    let app = world.stack.server_client().await;
    let (a, mut a_errors) = world.stack.connect_as(&world.a).await.unwrap();
    let (b, mut b_errors) = world.stack.connect_as(&world.b).await.unwrap();
    let mut b_hears = b.subscribe(live(&world.b)).await.unwrap();
    // B's own empty message, heard back, proves the broker has the subscription (a flush only
    // writes it to the socket).
    b.publish(live(&world.b), Bytes::new()).await.unwrap();
    let echo = tokio::time::timeout(VIOLATION_WITHIN, b_hears.next())
        .await
        .expect("B hears its own live subject")
        .unwrap();
    assert!(echo.payload.is_empty());

    a.publish(live(&world.b), Bytes::from_static(b"sealed typing notice"))
        .await
        .unwrap();
    a.flush().await.unwrap();
    let notice = tokio::time::timeout(VIOLATION_WITHIN, b_hears.next())
        .await
        .expect("B gets the notice")
        .unwrap();
    assert_eq!(notice.payload.as_ref(), b"sealed typing notice");
    assert_eq!(notice.subject.as_str(), live(&world.b));

    // The server's account holds every stream there is; none took the notice.
    let js = jetstream::new(app.clone());
    let names: Vec<String> = js.stream_names().try_collect().await.unwrap();
    assert!(names.contains(&MAIL_STREAM.to_owned()), "{names:?}");
    for name in names {
        let stream = js.get_stream(&name).await.unwrap();
        let mut counts = stream.info_with_subjects("kez.live.>").await.unwrap();
        assert!(
            counts.try_next().await.unwrap().is_none(),
            "{name} holds a live notice"
        );
    }
    assert_eq!(mail_messages(&app, None).await, 0, "nothing in any inbox");

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_no_errors("A", &mut a_errors);
    assert_no_errors("B", &mut b_errors);
}

/// The profile is fixed when a connection is authorized: registering over the narrow profile
/// does not widen that connection (no fetch, no new-mail subscription), the next connection
/// has the full profile, and nothing was restarted in between.
#[tokio::test]
async fn registering_then_reconnecting_gives_the_full_profile() {
    let stack = CalloutStack::start().await;
    let dora = Arc::new(SecretKey::generate());
    let own_new = new_mail(&dora);

    let (narrow, mut narrow_errors) = stack.connect_as(&dora).await.unwrap();
    let refused_on_narrow = |stage: &'static str| {
        let narrow = narrow.clone();
        let own_new = own_new.clone();
        async move {
            narrow
                .publish_with_reply(FETCH, narrow.new_inbox(), fetch_body(0, 10, 0))
                .await
                .unwrap();
            let sub = narrow.subscribe(own_new).await.unwrap();
            narrow.flush().await.unwrap();
            (stage, sub)
        }
    };
    let (stage, _sub) = refused_on_narrow("unregistered").await;
    expect_violation(
        &mut narrow_errors,
        Violation::Publish,
        FETCH,
        VIOLATION_WITHIN,
    )
    .await
    .unwrap_or_else(|problem| panic!("{stage}: no inbox to fetch: {problem}"));
    expect_violation(
        &mut narrow_errors,
        Violation::Subscription,
        &own_new,
        VIOLATION_WITHIN,
    )
    .await
    .unwrap_or_else(|problem| panic!("{stage}: no new-mail subject: {problem}"));

    register(&narrow, &dora, "dora")
        .await
        .expect("registers over the narrow profile");
    let (stage, _sub) = refused_on_narrow("registered, same connection").await;
    expect_violation(
        &mut narrow_errors,
        Violation::Publish,
        FETCH,
        VIOLATION_WITHIN,
    )
    .await
    .unwrap_or_else(|problem| panic!("{stage}: keeps its narrow profile: {problem}"));
    expect_violation(
        &mut narrow_errors,
        Violation::Subscription,
        &own_new,
        VIOLATION_WITHIN,
    )
    .await
    .unwrap_or_else(|problem| panic!("{stage}: keeps its narrow profile: {problem}"));

    let (full, mut full_errors) = stack.connect_as(&dora).await.unwrap();
    let head = call(
        &full,
        "kez.sigchain.head",
        serde_json::to_vec(&serde_json::json!({"key": dora.public_key()})).unwrap(),
    )
    .await;
    assert_eq!(head.unwrap_err().code, 404, "the sigchain service answers");
    let mut hears = full.subscribe(own_new.clone()).await.unwrap();
    full.flush().await.unwrap();
    let seq = send(&full, &dora, [9; 16], b"note to self").await;
    let note = tokio::time::timeout(VIOLATION_WITHIN, hears.next())
        .await
        .expect("registered: hears of its new mail")
        .unwrap();
    assert_eq!(
        note.headers.unwrap().get("Nats-Sequence").unwrap().as_str(),
        seq.to_string()
    );
    let (time, _, messages) = fetch(&full, 0, 10, 0).await.expect("registered: fetches");
    assert_eq!(messages, [(seq, b"note to self".to_vec())]);
    let (_, _, rest) = fetch(&full, seq, 10, time).await.unwrap();
    assert!(rest.is_empty());
    full.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_no_errors("the full connection", &mut full_errors);
}

/// `kez.mail.fetch` serves the inbox of the key nats-server names the connection by, and
/// nothing a caller sends changes that: a body naming another key is `malformed` (unknown
/// field), a forged `Nats-Request-Info` header naming B is replaced by the broker, an
/// acknowledgement naming a sequence of B's deletes only the caller's own messages, and
/// `pending` counts only the caller's. B's messages stay, all of them, and B still reads them.
#[tokio::test]
async fn a_fetch_serves_only_the_callers_own_inbox() {
    let world = World::start().await;
    let app = world.stack.server_client().await;
    let (a, mut a_errors) = world.stack.connect_as(&world.a).await.unwrap();
    let (b, _b_errors) = world.stack.connect_as(&world.b).await.unwrap();
    let (mut a_seqs, mut b_seqs) = (Vec::new(), Vec::new());
    for i in 0..3u8 {
        b_seqs.push(send(&a, &world.b, [10 + i; 16], b"for bobby").await);
        a_seqs.push(send(&b, &world.a, [20 + i; 16], b"for alice").await);
        b_seqs.push(send(&a, &world.b, [30 + i; 16], b"for bobby").await);
    }
    let b_hex = World::hex(&world.b);
    let b_nkey = world.b.public_key().to_nkey();

    // Bodies naming B.
    for body in [
        serde_json::json!({"after": 0, "max": 10, "time": 0, "key": b_hex}),
        serde_json::json!({"after": 0, "max": 10, "time": 0, "user": b_nkey}),
        serde_json::json!({"after": 0, "max": 10, "time": 0, "inbox": inbox(&world.b)}),
        serde_json::json!({"after": 0, "max": 10, "time": 0, "device": b_hex}),
    ] {
        let err = call(&a, FETCH, serde_json::to_vec(&body).unwrap())
            .await
            .expect_err("a body naming another user");
        assert_eq!((err.code, err.name.as_str()), (400, "malformed"), "{body}");
        assert!(err.message.contains("unknown field"), "{}", err.message);
    }

    // Forged headers naming B: the broker stamps its own.
    let forgeries = [
        serde_json::json!({"acc": "APP", "user": b_nkey, "host": "10.9.9.9"}).to_string(),
        serde_json::json!({"acc": "SERVER", "user": b_nkey}).to_string(),
        serde_json::json!({"user": b_nkey}).to_string(),
        "not json".to_owned(),
    ];
    for forged in &forgeries {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Request-Info", forged.as_str());
        let answer = a
            .request_with_headers(FETCH, headers, fetch_body(0, 10, 0))
            .await
            .expect("answered");
        assert!(
            answer
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Service-Error-Code"))
                .is_none(),
            "{forged}: {:?}",
            answer.headers
        );
        let (_, pending, messages) = decode_fetch(&answer.payload);
        let seqs: Vec<u64> = messages.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, a_seqs, "with {forged}: A's own messages only");
        assert_eq!(pending, 0);
        assert!(messages.iter().all(|(_, m)| m == b"for alice"));
    }

    // pending counts A's messages only, though B's lie between them.
    let (_, pending, one) = fetch(&a, 0, 1, 0).await.unwrap();
    assert_eq!((one.len(), pending), (1, 2));

    // A acknowledges past all of B's (naming the time the stream stored that message of B's):
    // A's inbox empties, B's is whole.
    let beyond = *b_seqs.last().unwrap();
    assert!(beyond > *a_seqs.last().unwrap());
    let (_, _, rest) = fetch(&a, beyond, 10, stored_time(&app, beyond).await)
        .await
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(mail_messages(&app, Some(&inbox(&world.a))).await, 0);
    assert_eq!(mail_messages(&app, Some(&inbox(&world.b))).await, 6);
    let (_, pending, bs) = fetch(&b, 0, 256, 0).await.unwrap();
    assert_eq!(bs.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), b_seqs);
    assert_eq!(pending, 0);

    a.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_no_errors("A", &mut a_errors);
}

/// Waits for the effects of requests already sent to settle: one round trip through the
/// services, then a pause for anything they publish on.
async fn settle(client: &Client) {
    let _ = call(client, "kez.server.info", Bytes::from_static(b"{}")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// The kez-chat-server answers a request on its reply subject with its own, unrestricted `SERVER`
/// connection. A client that names a JetStream API or `$KV` subject as the reply subject makes
/// the server write there for it: a confused deputy. Each row is something even an
/// unregistered key must not achieve this way.
#[tokio::test]
async fn the_server_cannot_be_made_to_answer_into_jetstream() {
    let world = World::start().await;
    let app = world.stack.server_client().await;
    let app_js = jetstream::new(app.clone());
    let (c, _c_errors) = world.stack.connect_as(&world.c).await.unwrap();
    let b_hex = World::hex(&world.b);

    // 1. The server-info answer as B's "disabled" record: B is locked out.
    c.publish_with_reply(
        "kez.server.info",
        format!("$KV.kez_disabled.{b_hex}"),
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    // 2. An error answer has an empty body, which is what STREAM.DELETE takes.
    c.publish_with_reply(
        "kez.registry.lookup",
        "$JS.API.STREAM.DELETE.KV_kez_chain_links",
        Bytes::new(),
    )
    .await
    .unwrap();
    // 3. Alice's profile (a valid handle record) written over bobby's.
    c.publish_with_reply(
        "kez.registry.lookup",
        "$KV.kez_handles.bobby",
        Bytes::from_static(br#"{"handle":"@alice"}"#),
    )
    .await
    .unwrap();
    // 4. An unregistered key writing into B's inbox.
    c.publish_with_reply(
        "kez.server.info",
        inbox(&world.b),
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    // 5. The mail stream deleted by an error answer's empty body.
    c.publish_with_reply(
        "kez.registry.lookup",
        format!("$JS.API.STREAM.DELETE.{MAIL_STREAM}"),
        Bytes::new(),
    )
    .await
    .unwrap();
    c.flush().await.unwrap();
    settle(&c).await;

    let mut failures = Vec::new();
    let disabled = app_js.get_key_value("kez_disabled").await.unwrap();
    if let Some(value) = disabled.get(&b_hex).await.unwrap() {
        failures.push(format!(
            "1. B's disabled record was written: {:?}",
            String::from_utf8_lossy(&value)
        ));
    }
    if let Err(err) = world.stack.connect_as(&world.b).await {
        failures.push(format!("1. B can no longer connect: {err}"));
    }
    if app_js.get_stream("KV_kez_chain_links").await.is_err() {
        failures.push("2. the sigchain links bucket was deleted".to_owned());
    }
    let bobby = call_ok(
        &c,
        "kez.registry.lookup",
        serde_json::json!({"handle": "@bobby"}),
    )
    .await;
    if bobby["key"] != serde_json::json!(world.b.public_key()) {
        failures.push(format!("3. @bobby now resolves to {}", bobby["key"]));
    }
    if app_js.get_stream(MAIL_STREAM).await.is_err() {
        failures.push("5. the mail stream was deleted".to_owned());
    } else {
        let stored = mail_messages(&app, None).await;
        if stored != 0 {
            failures.push(format!("4. B's inbox holds {stored} message(s) from C"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// JetStream itself answers on the reply subject a client gives: a publish acknowledgement.
/// A user that could aim one at `$KV` subjects would write into the registry's buckets (they
/// share the `SERVER` account with the mail stream). Users cannot publish into the stream, and
/// the mail service's answers (a fetch's, a send's) aimed there land in `APP`, where there
/// are no buckets.
#[tokio::test]
async fn jetstream_replies_cannot_be_aimed_at_the_registry() {
    let world = World::start().await;
    let app = world.stack.server_client().await;
    let app_js = jetstream::new(app.clone());
    let (a, _a_errors) = world.stack.connect_as(&world.a).await.unwrap();
    let b_hex = World::hex(&world.b);

    // 1. A publish acknowledgement ({"stream":"KEZ_MAIL","seq":N}) as B's disabled record.
    a.publish_with_reply(
        inbox(&world.b),
        format!("$KV.kez_disabled.{b_hex}"),
        Bytes::from_static(b"hello"),
    )
    .await
    .unwrap();
    // 2. A's own message, fetched with a reply subject in the handles bucket.
    send(&a, &world.a, [8; 16], b"forged").await;
    a.publish_with_reply(FETCH, "$KV.kez_handles.bobby", fetch_body(0, 1, 0))
        .await
        .unwrap();
    // 3. A send's answer ({"seq":N,"duplicate":false}) as B's disabled record.
    a.publish_with_reply(
        "kez.mail.send",
        format!("$KV.kez_disabled.{b_hex}"),
        Bytes::from(mail(&world.a.public_key(), [9; 16], b"again")),
    )
    .await
    .unwrap();
    a.flush().await.unwrap();
    settle(&a).await;

    let mut failures = Vec::new();
    let disabled = app_js.get_key_value("kez_disabled").await.unwrap();
    if let Some(value) = disabled.get(&b_hex).await.unwrap() {
        failures.push(format!(
            "1./3. B's disabled record was written: {:?}",
            String::from_utf8_lossy(&value)
        ));
    }
    if let Err(err) = world.stack.connect_as(&world.b).await {
        failures.push(format!("1./3. B can no longer connect: {err}"));
    }
    let mut handles = app_js.get_stream("KV_kez_handles").await.unwrap();
    let stored = handles.info().await.unwrap().state.messages;
    if stored != 2 {
        failures.push(format!(
            "2. the handles bucket holds {stored} messages, not alice's and bobby's records"
        ));
    }
    if mail_messages(&app, Some(&inbox(&world.b))).await != 0 {
        failures.push("1. A's publish reached B's inbox".to_owned());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A reply subject is the one thing a client controls in every request. Aimed at JetStream's API,
/// an answer there would be a command: the mail service's answers (a fetch's, with or without
/// an acknowledgement; a send's) and the info service's must all land in `APP`, where there
/// is no JetStream to obey them: the mail stream and B's message in it survive.
#[tokio::test]
async fn reply_subjects_cannot_command_jetstream() {
    let world = World::start().await;
    let (a, _errors) = world.stack.connect_as(&world.a).await.expect("A connects");
    let app = world.stack.server_client().await;
    let server_js = jetstream::new(app.clone());
    let b_seq = send(&a, &world.b, [6; 16], b"keep me").await;
    let a_seq = send(&a, &world.a, [5; 16], b"mine").await;
    let (time, _, _) = fetch(&a, 0, 1, 0).await.unwrap();
    let tricks = [
        (inbox(&world.b), Bytes::from_static(b"hi")),
        (
            "kez.mail.send".to_owned(),
            Bytes::from(mail(&world.b.public_key(), [7; 16], b"hi")),
        ),
        (FETCH.to_owned(), fetch_body(0, 10, 0)),
        (FETCH.to_owned(), fetch_body(a_seq, 10, time)),
        (FETCH.to_owned(), Bytes::new()),
        ("kez.server.info".to_owned(), Bytes::from_static(b"{}")),
    ];
    for command in [
        format!("$JS.API.STREAM.PURGE.{MAIL_STREAM}"),
        format!("$JS.API.STREAM.DELETE.{MAIL_STREAM}"),
    ] {
        for (subject, body) in tricks.clone() {
            a.publish_with_reply(subject.clone(), command.clone(), body)
                .await
                .unwrap();
            a.flush().await.unwrap();
            settle(&a).await;
            assert!(
                server_js.get_stream(MAIL_STREAM).await.is_ok(),
                "a request to {subject} with reply {command} deleted the mail stream"
            );
            assert!(
                mail_messages(&app, Some(&inbox(&world.b))).await >= 1,
                "a request to {subject} with reply {command} purged B's inbox"
            );
        }
    }
    let (_, _, bs) = fetch(&world.stack.connect_as(&world.b).await.unwrap().0, 0, 10, 0)
        .await
        .unwrap();
    assert_eq!(bs.first().map(|(seq, _)| *seq), Some(b_seq));
}

/// A direct get of one directory subject, with `body`: the broker's answer.
async fn direct_get(client: &Client, subject: &str, body: &'static [u8]) -> async_nats::Message {
    tokio::time::timeout(
        VIOLATION_WITHIN,
        client.request(subject.to_owned(), Bytes::from_static(body)),
    )
    .await
    .expect("the broker answers a direct get")
    .expect("a direct get is allowed")
}

/// The directory (PROTOCOL.md §5.7) answers a direct get of one subject with exactly
/// what the service answers, to registered and unregistered keys alike; the broker refuses
/// every body that would walk it by sequence or batch. A wildcard token (which nats-server
/// answers with the last entry any matching subject holds) yields one sealed entry that opens
/// only under the name it is about.
#[tokio::test]
async fn the_directory_answers_exact_subjects_only_and_says_nothing_to_a_wildcard() {
    let world = World::start().await;
    let (a, mut a_errors) = world.stack.connect_as(&world.a).await.unwrap();
    let (c, mut c_errors) = world.stack.connect_as(&world.c).await.unwrap();
    for (name, key) in [("alice", &world.a), ("bobby", &world.b)] {
        let by_service: Profile = serde_json::from_value(
            call_ok(
                &a,
                "kez.registry.lookup",
                serde_json::json!({ "handle": format!("@{name}@{TEST_DOMAIN}") }),
            )
            .await,
        )
        .unwrap();
        for (slot, reader) in [
            (Slot::handle(name), &a),
            (Slot::key(&key.public_key()), &a),
            (Slot::handle(name), &c),
        ] {
            // The bodiless form, and the one clients send (without nats-server's headers).
            let with_headers = direct_get(reader, &slot.direct_get_subject(), b"").await;
            let bare = direct_get(reader, &slot.direct_get_subject(), DIRECT_GET_BODY).await;
            assert!(with_headers.headers.is_some(), "{name}: {with_headers:?}");
            assert!(bare.headers.is_none(), "{name}: {bare:?}");
            for answer in [with_headers, bare] {
                assert_eq!(answer.status, None, "{name}: {answer:?}");
                assert_eq!(slot.open(&answer.payload).unwrap(), by_service, "{name}");
            }
        }
    }
    // Not registered: the broker's 404, the same as the service's not_found.
    for body in [&b""[..], DIRECT_GET_BODY] {
        let nobody = direct_get(&a, &Slot::handle("nobody").direct_get_subject(), body).await;
        assert_eq!(nobody.status, Some(async_nats::StatusCode::NOT_FOUND));
    }

    let alice = Slot::handle("alice").direct_get_subject();
    for body in [
        &br#"{"seq":1}"#[..],
        br#"{"batch":2}"#,
        br#"{"seq":1,"batch":100}"#,
        br#"{"next_by_subj":"$KV.kez_directory.>"}"#,
        br#"{"last_by_subj":"$KV.kez_directory.>"}"#,
        br#"{"multi_last":["$KV.kez_directory.>"]}"#,
        br#"{"start_time":"2020-01-01T00:00:00Z"}"#,
        br#"{"up_to_seq":100}"#,
        br#"{"no_hdr":true,"seq":1}"#,
        br#"{"no_hdr":true,"batch":2}"#,
        b"not json",
    ] {
        let answer = direct_get(&a, &alice, body).await;
        assert_eq!(
            answer.status,
            Some(async_nats::StatusCode::from_u16(408).unwrap()),
            "body {}",
            String::from_utf8_lossy(body)
        );
        assert!(answer.payload.is_empty());
    }

    // nats-server answers a wildcard with the last entry written (bobby's, registered last):
    // opaque to whoever does not know the name it is about.
    for wildcard in ["*", ">"] {
        let subject =
            format!("$JS.API.DIRECT.GET.KV_{DIRECTORY_BUCKET}.$KV.{DIRECTORY_BUCKET}.{wildcard}");
        let answer = direct_get(&c, &subject, b"").await;
        let text = String::from_utf8_lossy(&answer.payload).into_owned();
        // Strings long enough that random ciphertext never holds them by chance.
        for plain in [
            "alice",
            "bobby",
            TEST_DOMAIN,
            &world.a.public_key().to_hex(),
            &world.b.public_key().to_hex(),
        ] {
            assert!(!text.contains(plain), "{wildcard} reveals {plain}");
        }
        let alices = [Slot::handle("alice"), Slot::key(&world.a.public_key())];
        assert!(
            alices
                .iter()
                .all(|slot| slot.open(&answer.payload).is_err())
        );
        let bobbys = [Slot::handle("bobby"), Slot::key(&world.b.public_key())];
        assert!(bobbys.iter().any(|slot| slot.open(&answer.payload).is_ok()));
    }
    assert_no_errors("A", &mut a_errors);
    assert_no_errors("C", &mut c_errors);
}
