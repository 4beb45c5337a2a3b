//! Forward secrecy (issue 25, PROTOCOL.md §15) on a real broker and home server with the
//! callout: users on the kez-client library publish prekeys, bind their Olm keys and chat with
//! envelope version 2. A key stolen after a conversation does not open its stored ciphertext;
//! one-time keys run out into the fallback key; replayed and reordered envelopes; a session
//! lost on one side is shown, re-established and the lost message sent again; a contact
//! without an Olm key still gets today's envelope.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use kez_client::{
    Connection, Contact, ForwardSecrecy, Sent, Store, StoredMessage, UNDECRYPTABLE_CONTENT_TYPE,
};
use kez_core::envelope::{self, Message, Opened};
use kez_core::olm::{OlmAccount, OlmSession};
use kez_core::prekey::PrekeyKind;
use kez_core::{PublicKey, SecretKey};
use kez_proto::subjects::{MAIL_STREAM, inbox_subject};
use kez_tests::callout::CalloutStack;
use kez_tests::chat::ChatUser;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

const PATIENCE: Duration = Duration::from_secs(30);

/// The store's tables as a thief reads them (kez-client's names, PROTOCOL.md §15.4).
const OLM_ACCOUNT: TableDefinition<&str, &str> = TableDefinition::new("olm_account");
const OLM_SESSIONS: TableDefinition<([u8; 32], &str), &[u8]> = TableDefinition::new("olm_sessions");

struct Chat {
    stack: CalloutStack,
    url: String,
}

impl Chat {
    async fn start() -> Chat {
        let stack = CalloutStack::start().await;
        let url = stack.nats.url();
        Chat { stack, url }
    }

    /// A registered user; with `secret`, connected with forward secrecy prepared.
    async fn user(&self, name: &str, secret: bool) -> (ChatUser, Connection) {
        let user = ChatUser::register(&self.url, name, PATIENCE).await;
        let conn = user.connect(&self.url, PATIENCE).await;
        if secret {
            assert_eq!(
                conn.prepare_forward_secrecy(&user.store).await.unwrap(),
                ForwardSecrecy::Ready
            );
        }
        (user, conn)
    }

    async fn js(&self) -> jetstream::Context {
        jetstream::new(self.stack.server_client().await)
    }
}

/// Sends `text` and records it as sent, as the CLI does.
async fn send(user: &ChatUser, conn: &Connection, to: &Contact, text: &str) -> Sent {
    let sent = conn.send(to, "text", text.as_bytes()).await.unwrap();
    assert!(sent.missed.is_empty(), "{:?}", sent.missed);
    user.store
        .record_outgoing(&sent, kez_client::now())
        .unwrap();
    sent
}

/// Receives until `n` messages came (failing after [`PATIENCE`]).
async fn receive(user: &ChatUser, conn: &Connection, n: usize) -> Vec<Message> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} got {} of {n} messages",
            user.name,
            got.len()
        );
        got.extend(
            conn.receive(&user.store, 100, Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    assert_eq!(got.len(), n, "no more than expected");
    got
}

/// Receives for a moment and answers what came (resend requests are handled inside).
async fn receive_briefly(user: &ChatUser, conn: &Connection) -> Vec<Message> {
    conn.receive(&user.store, 100, Duration::from_secs(1))
        .await
        .unwrap()
}

/// The envelope the broker stored for a sent message.
async fn stored_envelope(js: &jetstream::Context, sent: &Sent) -> Vec<u8> {
    let stream = js.get_stream(MAIL_STREAM).await.unwrap();
    stream
        .get_raw_message(sent.stream_sequence)
        .await
        .unwrap()
        .payload
        .to_vec()
}

/// The texts of the shown messages of the conversation with `peer`.
fn texts(store: &Store, peer: &PublicKey) -> Vec<String> {
    store
        .messages(peer)
        .unwrap()
        .into_iter()
        .map(|view| {
            if view.message.content_type == UNDECRYPTABLE_CONTENT_TYPE {
                "<undecryptable>".to_owned()
            } else {
                view.text.unwrap_or_default()
            }
        })
        .collect()
}

/// A copy of a store file as it is now (a backup, or what a thief takes).
fn copy_store(from: &Path, to: &Path) -> PathBuf {
    std::fs::copy(from, to).unwrap();
    to.to_path_buf()
}

/// How many Olm sessions a store file keeps.
fn sessions_in(store: &Path) -> usize {
    let db = redb::Database::open(store).unwrap();
    let tx = db.begin_read().unwrap();
    tx.open_table(OLM_SESSIONS).unwrap().len().unwrap() as usize
}

/// What a thief with the device key and a copy of the store can do with a stored envelope:
/// open its outer layer (the device key), then try every Olm session the store keeps and
/// the account's one-time keys on the Olm message. Whether any of them decrypts it.
fn thief_opens(store: &Path, key: &SecretKey, stolen: &[u8]) -> bool {
    let Opened::Olm(outer) = envelope::open_outer(key, stolen).expect("the outer layer opens")
    else {
        panic!("a forward-secret envelope");
    };
    let db = redb::Database::open(store).unwrap();
    let tx = db.begin_read().unwrap();
    let sessions = tx.open_table(OLM_SESSIONS).unwrap();
    for entry in sessions.iter().unwrap() {
        let (_, value) = entry.unwrap();
        let record: serde_json::Value = serde_json::from_slice(value.value()).unwrap();
        let mut session = OlmSession::from_pickle(record["pickle"].as_str().unwrap(), key).unwrap();
        if session.decrypt(&outer.message).is_ok() {
            return true;
        }
    }
    let accounts = tx.open_table(OLM_ACCOUNT).unwrap();
    let pickle = accounts.get("account").unwrap().unwrap();
    let mut account = OlmAccount::from_pickle(pickle.value(), key).unwrap();
    match outer.message.sender_identity() {
        Some(sender) => account.create_inbound(&sender, &outer.message).is_ok(),
        None => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stolen_after_a_conversation_does_not_open_its_stored_ciphertext() {
    let chat = Chat::start().await;
    let js = chat.js().await;
    let (alice, a) = chat.user("alice", true).await;
    let (bob, b) = chat.user("bob", true).await;
    let to_bob = alice.add(&a, "bob", PATIENCE).await;
    let to_alice = bob.add(&b, "alice", PATIENCE).await;
    assert!(to_bob.forward_secret() && to_alice.forward_secret());

    let first = send(&alice, &a, &to_bob, "the plan is in the blue folder").await;
    let second = send(&alice, &a, &to_bob, "burn after reading").await;
    let stolen = [
        stored_envelope(&js, &first).await,
        stored_envelope(&js, &second).await,
    ];
    assert!(
        stolen.iter().all(|sealed| sealed[0] == 2),
        "envelope version 2"
    );
    let scratch = tempfile::tempdir().unwrap();
    // A backup of bob's store from before he read them: with it, they do open (so the
    // thief's method works, and what stops it below is the ratchet).
    let backup = copy_store(&bob.store_path(), &scratch.path().join("backup.redb"));
    assert_eq!(receive(&bob, &b, 2).await.len(), 2);
    send(&bob, &b, &to_alice, "done").await;
    receive(&alice, &a, 1).await;
    send(&alice, &a, &to_bob, "thanks").await;
    receive(&bob, &b, 1).await;
    assert_eq!(
        texts(&bob.store, &to_alice.key),
        [
            "the plan is in the blue folder",
            "burn after reading",
            "done",
            "thanks"
        ]
    );

    // Tomorrow: bob's key file and store are stolen.
    let taken = copy_store(&bob.store_path(), &scratch.path().join("taken.redb"));
    assert!(sessions_in(&taken) > 0, "the thief has sessions to try");
    for sealed in &stolen {
        assert!(
            !thief_opens(&taken, &bob.key, sealed),
            "a stolen key and store open yesterday's message"
        );
        assert!(
            thief_opens(&backup, &bob.key, sealed),
            "the state from before it was read opens it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_keys_run_out_into_the_fallback_key() {
    let chat = Chat::start().await;
    let (alice, a) = chat.user("alice", true).await;
    let (bob, b) = chat.user("bob", true).await;
    let (_carol, c) = chat.user("carol", true).await;
    // carol drains bob's one-time keys: the key service gives out one-time keys until the
    // budget for bob is spent or none is left, then only the fallback key.
    let mut kinds = Vec::new();
    for _ in 0..30 {
        let claimed = c.keys_claim(&bob.key.public_key(), None).await.unwrap();
        kinds.push(claimed.prekey.kind);
    }
    let one_time = kinds
        .iter()
        .filter(|kind| **kind == PrekeyKind::OneTime)
        .count();
    assert!(one_time > 0, "{kinds:?}");
    assert!(
        kinds[one_time..]
            .iter()
            .all(|kind| *kind == PrekeyKind::Fallback),
        "once out, only the fallback: {kinds:?}"
    );
    assert_eq!(
        c.keys_claim(&bob.key.public_key(), None)
            .await
            .unwrap()
            .prekey
            .kind,
        PrekeyKind::Fallback
    );
    // alice starts a session from the fallback key: it works.
    let to_bob = alice.add(&a, "bob", PATIENCE).await;
    let to_alice = bob.add(&b, "alice", PATIENCE).await;
    send(&alice, &a, &to_bob, "hello over the fallback key").await;
    let got = receive(&bob, &b, 1).await;
    assert_eq!(got[0].body, b"hello over the fallback key");
    send(&bob, &b, &to_alice, "and back").await;
    assert_eq!(receive(&alice, &a, 1).await[0].body, b"and back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_envelopes_are_dropped_and_reordered_ones_open() {
    let chat = Chat::start().await;
    let js = chat.js().await;
    let (alice, a) = chat.user("alice", true).await;
    let (bob, b) = chat.user("bob", true).await;
    let to_bob = alice.add(&a, "bob", PATIENCE).await;
    let to_alice = bob.add(&b, "alice", PATIENCE).await;
    let inbox = inbox_subject(&bob.key.public_key(), &bob.key.public_key());

    let mut first = Vec::new();
    for n in 1..=3 {
        let sent = send(&alice, &a, &to_bob, &format!("message {n}")).await;
        first.push(stored_envelope(&js, &sent).await);
    }
    receive(&bob, &b, 3).await;
    // The broker (or anyone who can write to the inbox) hands them over again.
    for sealed in &first {
        js.publish(inbox.clone(), sealed.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert!(
        receive_briefly(&bob, &b).await.is_empty(),
        "a replay shows nothing"
    );

    // Three more, handed over in another order than sent.
    let mut later = Vec::new();
    for n in 4..=6 {
        let sent = send(&alice, &a, &to_bob, &format!("message {n}")).await;
        let stream = js.get_stream(MAIL_STREAM).await.unwrap();
        later.push((
            stream
                .get_raw_message(sent.stream_sequence)
                .await
                .unwrap()
                .payload,
            sent.stream_sequence,
        ));
    }
    let stream = js.get_stream(MAIL_STREAM).await.unwrap();
    for (_, seq) in &later {
        assert!(stream.delete_message(*seq).await.unwrap());
    }
    for index in [2, 0, 1] {
        js.publish(inbox.clone(), later[index].0.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let got = receive(&bob, &b, 3).await;
    let bodies: Vec<&[u8]> = got.iter().map(|message| message.body.as_slice()).collect();
    assert_eq!(bodies, [&b"message 6"[..], b"message 4", b"message 5"]);
    assert_eq!(texts(&bob.store, &to_alice.key).len(), 6);
    assert!(
        !texts(&bob.store, &to_alice.key).contains(&"<undecryptable>".to_owned()),
        "nothing undecryptable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_is_shown_re_established_and_the_message_sent_again() {
    let chat = Chat::start().await;
    let (mut alice, a) = chat.user("alice", true).await;
    let (bob, b) = chat.user("bob", true).await;
    let to_bob = alice.add(&a, "bob", PATIENCE).await;
    let to_alice = bob.add(&b, "alice", PATIENCE).await;
    send(&alice, &a, &to_bob, "one").await;
    receive(&bob, &b, 1).await;
    // alice's device goes back to a backup taken now...
    let scratch = tempfile::tempdir().unwrap();
    let backup = copy_store(&alice.store_path(), &scratch.path().join("backup.redb"));
    send(&alice, &a, &to_bob, "two").await;
    receive(&bob, &b, 1).await;
    a.close().await.unwrap();
    alice.store = Store::open(&backup).unwrap();
    let a = alice.connect(&chat.url, PATIENCE).await;
    assert_eq!(
        a.prepare_forward_secrecy(&alice.store).await.unwrap(),
        ForwardSecrecy::Ready
    );
    // ...so its session seals "three" with a message key bob used for "two" already.
    let three = send(&alice, &a, &to_bob, "three").await;
    let shown = receive_briefly(&bob, &b).await;
    assert!(shown.is_empty(), "{shown:?}");
    assert!(bob.store.is_undecryptable(&three.id).unwrap());
    assert_eq!(
        texts(&bob.store, &to_alice.key),
        ["one", "two", "<undecryptable>"],
        "the user sees that a message did not decrypt"
    );
    let placeholder: Vec<StoredMessage> = bob
        .store
        .messages(&to_alice.key)
        .unwrap()
        .into_iter()
        .map(|view| view.message)
        .filter(|message| message.content_type == UNDECRYPTABLE_CONTENT_TYPE)
        .collect();
    assert_eq!(placeholder[0].id, three.id);

    // bob's device asked alice's, over a new session, to send it again; alice's answers.
    assert!(
        receive_briefly(&alice, &a).await.is_empty(),
        "a resend request is not shown"
    );
    let got = receive(&bob, &b, 1).await;
    assert_eq!(
        (got[0].id, got[0].body.as_slice()),
        (three.id, &b"three"[..])
    );
    assert!(!bob.store.is_undecryptable(&three.id).unwrap());
    assert_eq!(texts(&bob.store, &to_alice.key), ["one", "two", "three"]);

    // The new session carries on, both ways.
    send(&alice, &a, &to_bob, "four").await;
    assert_eq!(receive(&bob, &b, 1).await[0].body, b"four");
    send(&bob, &b, &to_alice, "got them all").await;
    assert_eq!(receive(&alice, &a, 1).await[0].body, b"got them all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_without_an_olm_key_gets_todays_envelope() {
    let chat = Chat::start().await;
    let js = chat.js().await;
    let (alice, a) = chat.user("alice", true).await;
    let (carol, c) = chat.user("carol", false).await;
    let to_carol = alice.add(&a, "carol", PATIENCE).await;
    assert!(!to_carol.forward_secret());
    assert_eq!(to_carol.without_olm_key(), [carol.key.public_key()]);
    let sent = send(&alice, &a, &to_carol, "hi carol").await;
    assert_eq!(
        stored_envelope(&js, &sent).await[0],
        1,
        "envelope version 1"
    );
    assert_eq!(receive(&carol, &c, 1).await[0].body, b"hi carol");
    // Once carol's client prepares forward secrecy, alice's next verification sees her key.
    assert_eq!(
        c.prepare_forward_secrecy(&carol.store).await.unwrap(),
        ForwardSecrecy::Ready
    );
    let to_carol = alice.add(&a, "carol", PATIENCE).await;
    assert!(to_carol.forward_secret());
    let sent = send(&alice, &a, &to_carol, "now forward secret").await;
    assert_eq!(
        stored_envelope(&js, &sent).await[0],
        2,
        "envelope version 2"
    );
    assert_eq!(receive(&carol, &c, 1).await[0].body, b"now forward secret");
}
