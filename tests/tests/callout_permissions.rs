//! The two permission profiles the auth callout grants (PROTOCOL.md §6), against a real
//! nats-server and the real callout: every forbidden action gets the broker's permission error
//! for its exact subject, every allowed one works, and the profile follows registration on the
//! next connect.
//!
//! Users: A (`alice`) and B (`bobby`) registered, each over the narrow profile and then
//! reconnected; C never registered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::jetstream::{self, consumer::PullConsumer};
use bytes::Bytes;
use futures::StreamExt;
use kez_core::SecretKey;
use kez_proto::subjects::{
    INBOX_STREAM, JS_API_PREFIX, inbox_consumer, inbox_subject, reply_prefix,
};
use kez_tests::callout::{CalloutStack, Violation, expect_violation, register};
use kez_tests::kez_server::{call, call_ok};
use kez_tests::requests::mail;

/// How long the broker gets to report a permission violation. It answers within milliseconds;
/// this only bounds a failing run.
const VIOLATION_WITHIN: Duration = Duration::from_secs(5);

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
    let b_consumer = inbox_consumer(&world.b.public_key());
    vec![
        // Other users' mail.
        row(
            A,
            Subscribe,
            format!("kez.inbox.{b_hex}"),
            "read B's inbox subject",
        ),
        row(A, Subscribe, "kez.inbox.*", "read every inbox"),
        row(
            A,
            Publish,
            format!("kez.inbox.{b_hex}"),
            "write into B's inbox around the server's checks",
        ),
        row(
            A,
            Publish,
            "kez.inbox.0123",
            "write into an inbox nobody owns",
        ),
        row(
            A,
            Request,
            format!("{JS_API_PREFIX}.CONSUMER.MSG.NEXT.{INBOX_STREAM}.{b_consumer}"),
            "fetch from B's consumer",
        ),
        row(
            A,
            Request,
            format!("{JS_API_PREFIX}.CONSUMER.INFO.{INBOX_STREAM}.{b_consumer}"),
            "B's consumer info",
        ),
        row(
            A,
            Publish,
            format!("$JS.ACK.{INBOX_STREAM}.{b_consumer}.1.1.1.1700000000000000000.0"),
            "acknowledge (delete) B's messages",
        ),
        row(
            A,
            Request,
            format!("$JS.API.STREAM.MSG.GET.{INBOX_STREAM}"),
            "read stored messages by sequence",
        ),
        row(
            A,
            Request,
            format!("$JS.API.DIRECT.GET.{INBOX_STREAM}"),
            "direct get of stored messages",
        ),
        // Other users' replies.
        row(A, Subscribe, "_INBOX.>", "every reply subject"),
        row(
            A,
            Subscribe,
            format!("_INBOX.{b_hex}.>"),
            "B's reply prefix",
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
        row(A, Subscribe, "kez.>", "every kez subject"),
        row(
            C,
            Subscribe,
            "kez.registry.register",
            "answer registrations",
        ),
        row(A, Subscribe, ">", "everything"),
        // JetStream administration, the registry's buckets included.
        row(A, Request, "$JS.API.INFO", "account info"),
        row(A, Request, "$JS.API.STREAM.LIST", "list streams"),
        row(
            A,
            Request,
            format!("$JS.API.STREAM.DELETE.{INBOX_STREAM}"),
            "delete the inbox stream",
        ),
        row(
            A,
            Request,
            format!("$JS.API.STREAM.PURGE.{INBOX_STREAM}"),
            "purge every inbox",
        ),
        row(
            A,
            Request,
            format!("$JS.API.CONSUMER.CREATE.{INBOX_STREAM}"),
            "create a consumer",
        ),
        row(
            A,
            Request,
            format!("$JS.API.CONSUMER.CREATE.{INBOX_STREAM}.spy.kez.inbox.{b_hex}"),
            "create a consumer on B's subject",
        ),
        row(
            A,
            Request,
            format!("$JS.API.CONSUMER.DURABLE.CREATE.{INBOX_STREAM}.spy"),
            "create a durable consumer",
        ),
        row(
            A,
            Request,
            format!("$JS.API.CONSUMER.DELETE.{INBOX_STREAM}.inbox_{a_hex}"),
            "delete even its own consumer",
        ),
        row(
            A,
            Request,
            "$JS.API.STREAM.DELETE.KV_kez_handles",
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
            format!("kez.inbox.{b_hex}"),
            "unregistered writes to an inbox",
        ),
        row(C, Request, "kez.mail.send", "unregistered sends mail"),
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
            format!("{JS_API_PREFIX}.CONSUMER.MSG.NEXT.{INBOX_STREAM}.{b_consumer}"),
            "fetch from B's consumer",
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

/// Fetches whatever `consumer` has now (no waiting), up to 10 messages.
async fn fetch_now(consumer: &PullConsumer) -> Vec<jetstream::Message> {
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .messages()
        .await
        .expect("fetch from the own consumer");
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        messages.push(message.expect("a message"));
    }
    messages
}

async fn inbox_messages(app: &Client) -> u64 {
    jetstream::new(app.clone())
        .get_stream(INBOX_STREAM)
        .await
        .expect("the inbox stream")
        .info()
        .await
        .expect("stream info")
        .state
        .messages
}

/// A sends to B through `kez.mail.send`; B fetches from its own consumer and acknowledges,
/// after which the message is gone; a retried send with the same message id is stored once; a
/// send to a key without a handle is refused and stores nothing; C may register, look up and
/// read the server info.
#[tokio::test]
async fn allowed_actions_work() {
    let world = World::start().await;
    let app = world.stack.server_client().await;
    let (a, mut a_errors) = world.stack.connect_as(&world.a).await.unwrap();
    let (b, mut b_errors) = world.stack.connect_as(&world.b).await.unwrap();
    let b_inbox = inbox_subject(&world.b.public_key());
    let send = |id: [u8; 16], envelope: &'static [u8]| {
        let a = a.clone();
        let to = world.b.public_key();
        async move { call(&a, "kez.mail.send", mail(&to, id, envelope)).await }
    };

    // A -> B, stored by the server.
    let first: serde_json::Value =
        serde_json::from_slice(&send([1; 16], b"sealed for bobby").await.unwrap()).unwrap();
    assert_eq!(first["duplicate"], false);

    // A retried send with the same message id is stored once.
    let mut answers = Vec::new();
    for _ in 0..2 {
        let answer = send([2; 16], b"retried").await.expect("answered");
        answers.push(serde_json::from_slice::<serde_json::Value>(&answer).unwrap());
    }
    assert_eq!(answers[0]["duplicate"], false, "the first copy is stored");
    assert_eq!(answers[1]["duplicate"], true, "the retry is recognised");
    assert_eq!(answers[0]["seq"], answers[1]["seq"], "and not stored again");
    assert_eq!(inbox_messages(&app).await, 2);

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
    assert_eq!(inbox_messages(&app).await, 2, "nothing else was stored");

    // B reads its own consumer (CONSUMER.INFO, then MSG.NEXT) and acknowledges.
    let b_js = jetstream::with_prefix(b.clone(), JS_API_PREFIX);
    let consumer: PullConsumer = b_js
        .get_consumer_from_stream(inbox_consumer(&world.b.public_key()), INBOX_STREAM)
        .await
        .expect("B may look up its own consumer");
    let messages = fetch_now(&consumer).await;
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(payloads, [&b"sealed for bobby"[..], &b"retried"[..]]);
    for message in &messages {
        assert_eq!(message.subject.as_str(), b_inbox);
        message.double_ack().await.expect("B acknowledges its own");
    }

    // Work-queue retention: acknowledged means deleted.
    let deadline = Instant::now() + Duration::from_secs(5);
    while inbox_messages(&app).await != 0 {
        assert!(
            Instant::now() < deadline,
            "acknowledged messages are still stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fetch_now(&consumer).await.is_empty(),
        "nothing to redeliver"
    );

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

/// The profile is fixed when a connection is authorized: registering over the narrow profile
/// does not widen that connection, the next connection has the full profile, and nothing was
/// restarted in between.
#[tokio::test]
async fn registering_then_reconnecting_gives_the_full_profile() {
    let stack = CalloutStack::start().await;
    let dora = Arc::new(SecretKey::generate());
    let own_inbox = inbox_subject(&dora.public_key());

    let (narrow, mut narrow_errors) = stack.connect_as(&dora).await.unwrap();
    narrow
        .publish(own_inbox.clone(), Bytes::new())
        .await
        .unwrap();
    narrow.flush().await.unwrap();
    expect_violation(
        &mut narrow_errors,
        Violation::Publish,
        &own_inbox,
        VIOLATION_WITHIN,
    )
    .await
    .expect("unregistered: no inbox");

    register(&narrow, &dora, "dora")
        .await
        .expect("registers over the narrow profile");
    narrow
        .publish(own_inbox.clone(), Bytes::new())
        .await
        .unwrap();
    narrow.flush().await.unwrap();
    expect_violation(
        &mut narrow_errors,
        Violation::Publish,
        &own_inbox,
        VIOLATION_WITHIN,
    )
    .await
    .expect("the narrow connection keeps its narrow profile");

    let (full, mut full_errors) = stack.connect_as(&dora).await.unwrap();
    let head = call(
        &full,
        "kez.sigchain.head",
        serde_json::to_vec(&serde_json::json!({"key": dora.public_key()})).unwrap(),
    )
    .await;
    assert_eq!(head.unwrap_err().code, 404, "the sigchain service answers");
    let js = jetstream::with_prefix(full.clone(), JS_API_PREFIX);
    call(
        &full,
        "kez.mail.send",
        mail(&dora.public_key(), [9; 16], b"note to self"),
    )
    .await
    .expect("registered: the inbox takes messages");
    let consumer: PullConsumer = js
        .get_consumer_from_stream(inbox_consumer(&dora.public_key()), INBOX_STREAM)
        .await
        .expect("the consumer was created at registration");
    let messages = fetch_now(&consumer).await;
    assert_eq!(messages.len(), 1);
    messages[0].double_ack().await.unwrap();
    full.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_no_errors("the full connection", &mut full_errors);
}

/// Waits for the effects of requests already sent to settle: one round trip through the
/// services, then a pause for anything they publish on.
async fn settle(client: &Client) {
    let _ = call(client, "kez.server.info", Bytes::from_static(b"{}")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// The kez-chat-server answers a request on its reply subject with its own, unrestricted `APP`
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
        inbox_subject(&world.b.public_key()),
        Bytes::from_static(b"{}"),
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
    let inbox = inbox_messages(&app).await;
    if inbox != 0 {
        failures.push(format!("4. B's inbox holds {inbox} message(s) from C"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// JetStream itself answers on the reply subject a client gives: the publish acknowledgement
/// of `kez.inbox.*` and the messages of a pull request. A registered user that aims those at
/// `$KV` subjects writes into the registry's buckets (they share the `APP` account).
#[tokio::test]
async fn jetstream_replies_cannot_be_aimed_at_the_registry() {
    let world = World::start().await;
    let app = world.stack.server_client().await;
    let app_js = jetstream::new(app.clone());
    let (a, _a_errors) = world.stack.connect_as(&world.a).await.unwrap();
    let a_hex = World::hex(&world.a);
    let b_hex = World::hex(&world.b);

    // 1. The publish acknowledgement ({"stream":"KEZ_INBOX","seq":N}) as B's disabled record.
    a.publish_with_reply(
        inbox_subject(&world.b.public_key()),
        format!("$KV.kez_disabled.{b_hex}"),
        Bytes::from_static(b"hello"),
    )
    .await
    .unwrap();
    // 2. A's own message, pulled with a reply subject in the handles bucket.
    call(
        &a,
        "kez.mail.send",
        mail(&world.a.public_key(), [8; 16], b"forged"),
    )
    .await
    .unwrap();
    a.publish_with_reply(
        format!("{JS_API_PREFIX}.CONSUMER.MSG.NEXT.{INBOX_STREAM}.inbox_{a_hex}"),
        "$KV.kez_handles.bobby",
        Bytes::from_static(br#"{"batch":1,"no_wait":true}"#),
    )
    .await
    .unwrap();
    a.flush().await.unwrap();
    settle(&a).await;

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
    let mut handles = app_js.get_stream("KV_kez_handles").await.unwrap();
    let stored = handles.info().await.unwrap().state.messages;
    if stored != 2 {
        failures.push(format!(
            "2. the handles bucket holds {stored} messages, not alice's and bobby's records"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A reply subject is the one thing a client controls in every request. Aimed at JetStream's API,
/// an answer there would be a command: the pull request's timeout status, the publish ack and the
/// service's answer must all land in `APP`, where there is no JetStream to obey them.
#[tokio::test]
async fn reply_subjects_cannot_command_jetstream() {
    let world = World::start().await;
    let (a, _errors) = world.stack.connect_as(&world.a).await.expect("A connects");
    let server_js = jetstream::new(world.stack.server_client().await);
    let delete = format!("$JS.API.STREAM.DELETE.{INBOX_STREAM}");
    let consumer = inbox_consumer(&world.a.public_key());
    let tricks = [
        (
            inbox_subject(&world.b.public_key()),
            Bytes::from_static(b"hi"),
        ),
        (
            "kez.mail.send".to_owned(),
            Bytes::from(mail(&world.b.public_key(), [7; 16], b"hi")),
        ),
        (
            format!("{JS_API_PREFIX}.CONSUMER.MSG.NEXT.{INBOX_STREAM}.{consumer}"),
            Bytes::from_static(br#"{"batch":1,"expires":200000000}"#),
        ),
        ("kez.server.info".to_owned(), Bytes::from_static(b"{}")),
    ];
    for (subject, body) in tricks {
        a.publish_with_reply(subject.clone(), delete.clone(), body)
            .await
            .unwrap();
        a.flush().await.unwrap();
        // The pull request's timeout status arrives after its 200 ms expiry.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            server_js.get_stream(INBOX_STREAM).await.is_ok(),
            "a request to {subject} with reply {delete} deleted the inbox stream"
        );
    }
}
