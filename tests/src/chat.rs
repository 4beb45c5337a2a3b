//! Chat users on the kez-client library, and a ledger of what was sent and shown that checks the
//! delivery promise: every message whose send was acknowledged is shown exactly once to its
//! recipient, decrypted and verified, and nothing else is shown.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kez_client::{Connection, Contact, Home, Store};
use kez_core::envelope::{Message, MessageId};
use kez_core::{PublicKey, SecretKey, UnsignedLink};
use kez_proto::subjects::{MAIL_STREAM, inbox_subject};
use tempfile::TempDir;

use crate::requests::nats_endpoint;

/// A person on the client library: a home (key, `store.redb`) in a temporary directory,
/// registered on the home server and with a first sigchain link, so others can add them.
pub struct ChatUser {
    /// The handle's name.
    pub name: String,
    /// The key.
    pub key: Arc<SecretKey>,
    /// The local store (contacts, history, seen ids): the client's disk, which outlives any
    /// one connection or "process".
    pub store: Store,
    _home: Home,
    _dir: TempDir,
}

impl ChatUser {
    /// Makes a home, registers `name` over the narrow profile, reconnects with the chat profile
    /// and writes the first sigchain link, as `kez-chat register` does. Each step is retried
    /// (the same request) until it succeeds, for at most `patience`.
    ///
    /// # Panics
    ///
    /// If a step does not succeed in time.
    pub async fn register(url: &str, name: &str, patience: Duration) -> ChatUser {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path().join("home")).unwrap();
        let (key, _) = home.key_or_create().unwrap();
        let key = Arc::new(key);
        let deadline = Instant::now() + patience;
        loop {
            let outcome = async {
                let narrow = Connection::connect(url, key.clone()).await?;
                let record = narrow.register(name).await;
                let _ = narrow.close().await;
                record
            }
            .await;
            match outcome {
                Ok(record) => {
                    assert_eq!(record.key, key.public_key());
                    break;
                }
                Err(err) => assert!(Instant::now() < deadline, "registering {name}: {err}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let first = UnsignedLink::first(key.public_key(), kez_client::now(), nats_endpoint("nats"))
            .sign(&key)
            .unwrap();
        loop {
            let outcome = async {
                let conn = Connection::connect(url, key.clone()).await?;
                let head = conn.append(first.bytes()).await;
                let _ = conn.close().await;
                head
            }
            .await;
            match outcome {
                Ok(head) => {
                    assert_eq!(head.seq, 1);
                    break;
                }
                Err(err) => assert!(Instant::now() < deadline, "{name}'s first link: {err}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let store = home.store().unwrap();
        ChatUser {
            name: name.to_owned(),
            key,
            store,
            _home: home,
            _dir: dir,
        }
    }

    /// Where the store file is.
    pub fn store_path(&self) -> std::path::PathBuf {
        self._home.store_path()
    }

    /// Connects with the chat profile (retrying for at most `patience`).
    ///
    /// # Panics
    ///
    /// If no connection is made in time.
    pub async fn connect(&self, url: &str, patience: Duration) -> Connection {
        let deadline = Instant::now() + patience;
        loop {
            match Connection::connect(url, self.key.clone()).await {
                Ok(conn) => return conn,
                Err(err) => assert!(
                    Instant::now() < deadline,
                    "{} cannot connect: {err}",
                    self.name
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Looks `other` up, verifies their chain and pins them (retrying for at most `patience`).
    ///
    /// # Panics
    ///
    /// If that does not succeed in time.
    pub async fn add(&self, conn: &Connection, other: &str, patience: Duration) -> Contact {
        let deadline = Instant::now() + patience;
        loop {
            match conn
                .verify_contact(&self.store, &crate::kez_server::test_handle(other))
                .await
            {
                Ok(verified) => return verified.contact,
                Err(err) => assert!(
                    Instant::now() < deadline,
                    "{} cannot add {other}: {err}",
                    self.name
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How many messages `KEZ_MAIL` holds in `key`'s inbox (its one device is the key itself),
/// read through `js`, a JetStream context of the server's own account (users cannot read the
/// stream); `None` when JetStream does not answer. A fetched batch stays stored until the
/// recipient's next fetch acknowledges it, so "nothing left behind" is this count after one
/// more fetch.
pub async fn inbox_held(js: &async_nats::jetstream::Context, key: &PublicKey) -> Option<u64> {
    let subject = inbox_subject(key, key);
    let info: serde_json::Value = js
        .request(
            format!("STREAM.INFO.{MAIL_STREAM}"),
            &serde_json::json!({ "subjects_filter": subject }),
        )
        .await
        .ok()?;
    if info.get("error").is_some() {
        return None;
    }
    // Subjects without messages are not listed at all.
    Some(info["state"]["subjects"][&subject].as_u64().unwrap_or(0))
}

/// One message shown to its recipient.
#[derive(Debug, Clone)]
struct Shown {
    id: MessageId,
    from: PublicKey,
    body: Vec<u8>,
}

#[derive(Default)]
struct Entries {
    /// Every body a sender tried to send (unique per attempt) → (sender, recipient).
    attempted: BTreeMap<Vec<u8>, (PublicKey, PublicKey)>,
    /// Sends the stream acknowledged: id → (sender, recipient, body).
    acked: BTreeMap<MessageId, (PublicKey, PublicKey, Vec<u8>)>,
    /// Recipient → what was shown to them, in order.
    shown: BTreeMap<PublicKey, Vec<Shown>>,
    operations: usize,
    faults: usize,
    failed_sends: usize,
}

/// What a delivery run did and what the check found ([`Ledger::check`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Sends, receives and service calls tried.
    pub operations: usize,
    /// Faults injected (processes killed or restarted, clients dropped before acking).
    pub faults: usize,
    /// Sends the stream acknowledged.
    pub acked: usize,
    /// Sends that failed (no acknowledgement); each was retried as a new message.
    pub failed_sends: usize,
    /// Acknowledged messages never shown to their recipient. Must be 0.
    pub lost: usize,
    /// Messages shown more than once (by id or by content). Must be 0.
    pub duplicates: usize,
    /// Messages shown that no sender tried to send to that recipient. Must be 0.
    pub unexpected: usize,
    /// Messages shown whose send failed (stored, but the acknowledgement was lost): allowed.
    pub shown_without_ack: usize,
}

impl Summary {
    /// The one summary line a suite prints.
    pub fn line(&self, suite: &str) -> String {
        format!(
            "{suite}: operations tried {}, faults injected {}, sends acknowledged {}, sends \
             failed {}, messages lost {}, duplicates shown {}, unexpected shown {}, shown \
             without an acknowledgement {}",
            self.operations,
            self.faults,
            self.acked,
            self.failed_sends,
            self.lost,
            self.duplicates,
            self.unexpected,
            self.shown_without_ack
        )
    }
}

impl Summary {
    /// Writes [`Summary::line`] to the process's stderr directly, past the test harness's output
    /// capture, so `make test` shows it for a passing test too.
    pub fn report(&self, suite: &str) {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "{}", self.line(suite));
    }
}

/// The record of a delivery run, shared by the test's tasks.
#[derive(Clone, Default)]
pub struct Ledger {
    entries: Arc<Mutex<Entries>>,
}

impl Ledger {
    /// A send is about to be tried with this (unique) body.
    pub fn attempt(&self, from: PublicKey, to: PublicKey, body: &[u8]) {
        let mut entries = self.entries.lock().unwrap();
        entries.operations += 1;
        let previous = entries.attempted.insert(body.to_vec(), (from, to));
        assert!(previous.is_none(), "bodies must be unique per attempt");
    }

    /// The stream acknowledged a send.
    pub fn acked(&self, sent: &kez_client::Sent) {
        let mut entries = self.entries.lock().unwrap();
        entries
            .acked
            .insert(sent.id, (sent.from, sent.to, sent.body.clone()));
    }

    /// A send failed.
    pub fn send_failed(&self) {
        self.entries.lock().unwrap().failed_sends += 1;
    }

    /// Some other operation (a receive, a service call) was tried.
    pub fn operation(&self) {
        self.entries.lock().unwrap().operations += 1;
    }

    /// A fault was injected.
    pub fn fault(&self) {
        self.entries.lock().unwrap().faults += 1;
    }

    /// Messages were shown to `recipient`: what [`Connection::receive`] returned, or what a
    /// client stored before it died (the CLI shows stored, unshown messages on its next run).
    pub fn shown(&self, recipient: PublicKey, messages: &[Message]) {
        let mut entries = self.entries.lock().unwrap();
        let list = entries.shown.entry(recipient).or_default();
        for message in messages {
            assert_eq!(message.to, recipient, "a message shown to the wrong key");
            list.push(Shown {
                id: message.id,
                from: message.from,
                body: message.body.clone(),
            });
        }
    }

    /// How many sends the stream acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.entries.lock().unwrap().acked.len()
    }

    /// How many acknowledged messages have not been shown yet.
    pub fn outstanding(&self) -> usize {
        let entries = self.entries.lock().unwrap();
        let shown: BTreeSet<MessageId> = entries
            .shown
            .values()
            .flat_map(|list| list.iter().map(|s| s.id))
            .collect();
        entries
            .acked
            .keys()
            .filter(|id| !shown.contains(id))
            .count()
    }

    /// Checks the promise and counts; `stores` are the recipients' stores, whose histories
    /// (with every key in `senders`) must hold exactly what was shown to them. Describes every
    /// violation in the answer's second part (empty when there is none).
    pub fn check(
        &self,
        stores: &[(PublicKey, &Store)],
        senders: &[PublicKey],
    ) -> (Summary, Vec<String>) {
        let entries = self.entries.lock().unwrap();
        let mut problems = Vec::new();
        let mut summary = Summary {
            operations: entries.operations,
            faults: entries.faults,
            acked: entries.acked.len(),
            failed_sends: entries.failed_sends,
            ..Summary::default()
        };
        let mut shown_ids: BTreeMap<MessageId, usize> = BTreeMap::new();
        let mut shown_bodies: BTreeMap<&[u8], BTreeSet<MessageId>> = BTreeMap::new();
        for (recipient, list) in &entries.shown {
            for shown in list {
                *shown_ids.entry(shown.id).or_default() += 1;
                shown_bodies
                    .entry(&shown.body)
                    .or_default()
                    .insert(shown.id);
                match entries.attempted.get(&shown.body) {
                    Some((from, to)) if *from == shown.from && to == recipient => {}
                    other => {
                        summary.unexpected += 1;
                        problems.push(format!(
                            "shown to {recipient} but not sent to them by {}: {:?} (attempt: \
                             {other:?})",
                            shown.from,
                            String::from_utf8_lossy(&shown.body)
                        ));
                    }
                }
                match entries.acked.get(&shown.id) {
                    Some((_, _, body)) if *body == shown.body => {}
                    Some(_) => {
                        summary.unexpected += 1;
                        problems.push(format!("message {} shown with another body", shown.id));
                    }
                    None => summary.shown_without_ack += 1,
                }
            }
        }
        for (id, times) in &shown_ids {
            if *times > 1 {
                summary.duplicates += times - 1;
                problems.push(format!("message {id} shown {times} times"));
            }
        }
        for (body, ids) in &shown_bodies {
            if ids.len() > 1 {
                summary.duplicates += ids.len() - 1;
                problems.push(format!(
                    "{:?} shown under {} different ids",
                    String::from_utf8_lossy(body),
                    ids.len()
                ));
            }
        }
        for (id, (from, to, body)) in &entries.acked {
            if !shown_ids.contains_key(id) {
                summary.lost += 1;
                problems.push(format!(
                    "acknowledged {from} → {to} {:?} ({id}) was never shown",
                    String::from_utf8_lossy(body)
                ));
            }
        }
        // The stores agree: each recipient's history holds exactly the ids shown to them.
        for (recipient, store) in stores {
            let shown: BTreeSet<MessageId> = entries
                .shown
                .get(recipient)
                .map(|list| list.iter().map(|s| s.id).collect())
                .unwrap_or_default();
            let mut stored = BTreeSet::new();
            for sender in senders {
                for message in store.history(sender).unwrap() {
                    if message.direction == kez_client::Direction::Incoming
                        && !stored.insert(message.id)
                    {
                        problems.push(format!("{recipient}'s history holds {} twice", message.id));
                    }
                }
            }
            if stored != shown {
                problems.push(format!(
                    "{recipient}'s history and what was shown differ: stored only {:?}, shown \
                     only {:?}",
                    stored.difference(&shown).collect::<Vec<_>>(),
                    shown.difference(&stored).collect::<Vec<_>>()
                ));
            }
        }
        (summary, problems)
    }
}
