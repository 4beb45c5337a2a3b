//! The upgrade from the previous release's inbox (0.1: work-queue stream `KEZ_INBOX`, a durable
//! consumer per user) on a store 0.1 itself wrote: `tests/fixtures/v0.1-store.tar.gz`, made by
//! `tests/fixtures/make-v0.1-store.sh` (bob→alice m1, read; bob→alice m2 and m3, alice→bob m4,
//! unread; carol silent). `kez_chat_server::migrate::move_legacy_inbox` moves the waiting
//! messages into a stream of the current layout and removes the old one; the messages are
//! compared by `Nats-Msg-Id` and payload bytes with what the old stream held (decrypting them
//! is the client's business). The chain states 0.1 kept (without devices) are verified again
//! from their links at the next append, after which their owners can add devices.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use kez_chat_server::migrate::{Moved, move_legacy_inbox};
use kez_client::{Connection, Home};
use kez_core::sigchain::{DeviceKind, Endpoint};
use kez_core::{Op, PublicKey, SecretKey};
use kez_proto::answer::{ChainHead, HandleRecord, Profile};
use kez_proto::directory::{DIRECTORY_BUCKET, Slot};
use kez_tests::previous_release::{DevBroker, Fixture};
use tempfile::TempDir;

/// The previous release's stream and subjects (what the fixture holds).
const LEGACY_STREAM: &str = "KEZ_INBOX";
/// The target of the tests: the current layout's essentials.
const TARGET: &str = "KEZ_MAIL";

/// `kez.inbox.<identity hex>.<device hex>`; with one device per identity, the key twice.
fn new_subject(key: &PublicKey) -> String {
    format!("kez.inbox.{0}.{0}", key.to_hex())
}

/// A stored message as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    subject: String,
    id: Option<String>,
    payload: Bytes,
}

/// Every message of `stream_name`, in sequence order (read one by one: the tests' streams are
/// small).
async fn stored(js: &jetstream::Context, stream_name: &str) -> Vec<Stored> {
    let stream = js.get_stream_no_info(stream_name).await.unwrap();
    let mut messages = Vec::new();
    let mut next = 1;
    loop {
        match stream
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(">")
            .send()
            .await
        {
            Ok(message) => {
                next = message.sequence + 1;
                messages.push(Stored {
                    subject: message.subject.to_string(),
                    id: message
                        .headers
                        .get(async_nats::header::NATS_MESSAGE_ID)
                        .map(|id| id.as_str().to_owned()),
                    payload: message.payload,
                });
            }
            Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                return messages;
            }
            Err(err) => panic!("cannot read {stream_name} from {next}: {err}"),
        }
    }
}

/// The target stream as the current release makes it, in its essentials: limits retention, the
/// per-device subjects, the same duplicate window, no consumers.
async fn create_target(js: &jetstream::Context, change: impl FnOnce(&mut stream::Config)) {
    let mut config = stream::Config {
        name: TARGET.to_owned(),
        subjects: vec!["kez.inbox.*.*".to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    change(&mut config);
    js.create_stream(config).await.unwrap();
}

async fn exists(js: &jetstream::Context, name: &str) -> bool {
    // Not `get_stream_no_info`: it asks the broker nothing.
    match js.get_stream(name).await {
        Ok(_) => true,
        Err(err) => match err.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(source)
                if source.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                false
            }
            _ => panic!("cannot look {name} up: {err}"),
        },
    }
}

/// The fixture unpacked, a broker on it, and the server account's JetStream.
async fn upgrade_stack() -> (TempDir, Fixture, DevBroker, jetstream::Context) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::unpack(dir.path());
    let broker = DevBroker::start(&fixture.data_dir).await;
    let js = jetstream::new(broker.server_client().await);
    (dir, fixture, broker, js)
}

/// What 0.1 left in `KEZ_INBOX`, checked against what the fixture says it sent: m2 and m3 on
/// alice's subject, m4 on bob's, each under the id `send` printed, m1 (read) gone.
async fn legacy_messages(fixture: &Fixture, js: &jetstream::Context) -> Vec<Stored> {
    let legacy = stored(js, LEGACY_STREAM).await;
    let expected: Vec<(String, Option<String>)> = fixture
        .messages
        .iter()
        .filter(|message| message.unread)
        .map(|message| {
            (
                format!("kez.inbox.{}", fixture.key(&message.to).to_hex()),
                Some(message.id.clone()),
            )
        })
        .collect();
    let found: Vec<_> = legacy
        .iter()
        .map(|message| (message.subject.clone(), message.id.clone()))
        .collect();
    assert_eq!(found, expected, "the fixture's KEZ_INBOX");
    assert_eq!(
        fixture
            .messages
            .iter()
            .map(|message| message.text.as_str())
            .collect::<Vec<_>>(),
        ["m1", "m2", "m3", "m4"]
    );
    legacy
}

/// `legacy` as the target should hold it: each message on its recipient's new subject.
fn as_moved(legacy: &[Stored]) -> Vec<Stored> {
    legacy
        .iter()
        .map(|message| {
            let hex = message.subject.strip_prefix("kez.inbox.").unwrap();
            Stored {
                subject: format!("kez.inbox.{hex}.{hex}"),
                ..message.clone()
            }
        })
        .collect()
}

async fn consumers_of(js: &jetstream::Context, name: &str) -> Vec<String> {
    let stream = js.get_stream_no_info(name).await.unwrap();
    let mut names = Vec::new();
    let mut listing = stream.consumer_names();
    while let Some(consumer) = listing.next().await {
        names.push(consumer.unwrap());
    }
    names
}

#[tokio::test]
async fn the_previous_releases_waiting_messages_move_and_its_stream_and_consumers_go() {
    let (_dir, fixture, broker, js) = upgrade_stack().await;
    let legacy = legacy_messages(&fixture, &js).await;
    let mut legacy_consumers = consumers_of(&js, LEGACY_STREAM).await;
    legacy_consumers.sort();
    let mut expected_consumers: Vec<_> = ["alice", "bob", "carol"]
        .iter()
        .map(|name| format!("inbox_{}", fixture.key(name).to_hex()))
        .collect();
    expected_consumers.sort();
    assert_eq!(legacy_consumers, expected_consumers);
    create_target(&js, |_| {}).await;

    let moved = move_legacy_inbox(&js, TARGET, new_subject).await.unwrap();
    assert_eq!(
        moved,
        Moved {
            moved: 3,
            duplicates: 0,
            dropped: 0,
            consumers_removed: 3,
            legacy_removed: true,
        }
    );
    assert!(!exists(&js, LEGACY_STREAM).await, "KEZ_INBOX is deleted");
    let account = js.query_account().await.unwrap();
    assert_eq!(account.consumers, 0, "no consumer is left: {account:?}");
    let target = stored(&js, TARGET).await;
    assert_eq!(target, as_moved(&legacy));
    let alice = new_subject(&fixture.key("alice"));
    let bob = new_subject(&fixture.key("bob"));
    assert_eq!(
        target
            .iter()
            .map(|message| message.subject.as_str())
            .collect::<Vec<_>>(),
        [alice.as_str(), alice.as_str(), bob.as_str()],
        "m2 and m3 for alice, m4 for bob"
    );

    // Again: nothing to do, nothing changes.
    let again = move_legacy_inbox(&js, TARGET, new_subject).await.unwrap();
    assert_eq!(again, Moved::default());
    assert_eq!(stored(&js, TARGET).await, target);
    broker.stop().await;
}

/// A run that crashed after the target stored a message and before the message left the old
/// stream: the next run stores it once.
#[tokio::test]
async fn a_message_the_target_already_holds_is_stored_once() {
    let (_dir, fixture, broker, js) = upgrade_stack().await;
    let legacy = legacy_messages(&fixture, &js).await;
    create_target(&js, |_| {}).await;
    let copy = &as_moved(&legacy)[1];
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        copy.id.as_deref().unwrap(),
    );
    js.publish_with_headers(copy.subject.clone(), headers, copy.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();

    let moved = move_legacy_inbox(&js, TARGET, new_subject).await.unwrap();
    assert_eq!((moved.moved, moved.duplicates), (2, 1), "{moved:?}");
    assert!(moved.legacy_removed);
    let mut target = stored(&js, TARGET).await;
    let mut expected = as_moved(&legacy);
    target.sort_by(|a, b| a.id.cmp(&b.id));
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(target, expected, "each message once");
    broker.stop().await;
}

/// Two instances moving at once both succeed, and every message is stored once; messages on a
/// subject that names no key are dropped. Enough messages to page and to log progress.
#[tokio::test]
async fn two_instances_move_at_once_and_invalid_subjects_are_dropped() {
    let (_dir, fixture, broker, js) = upgrade_stack().await;
    let mut legacy = legacy_messages(&fixture, &js).await;
    let carol = format!("kez.inbox.{}", fixture.key("carol").to_hex());
    // 0.1's layout, as its server stored messages: more of them, for carol.
    for i in 0..1500u32 {
        let id = format!("{i:032x}");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        let payload = Bytes::from(format!("sealed {i}"));
        js.publish_with_headers(carol.clone(), headers, payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
        legacy.push(Stored {
            subject: carol.clone(),
            id: Some(id),
            payload,
        });
    }
    for invalid in ["kez.inbox.nothex", "kez.inbox.ABCDEF"] {
        js.publish(invalid, Bytes::from_static(b"for nobody"))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    create_target(&js, |_| {}).await;

    let other = jetstream::new(broker.server_client().await);
    let (one, two) = tokio::join!(
        move_legacy_inbox(&js, TARGET, new_subject),
        move_legacy_inbox(&other, TARGET, new_subject)
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    assert!(one.legacy_removed || two.legacy_removed, "{one:?} {two:?}");
    assert_eq!(one.moved + two.moved, 1503, "{one:?} {two:?}");
    assert!(one.dropped + two.dropped >= 2, "{one:?} {two:?}");
    assert!(!exists(&js, LEGACY_STREAM).await);
    let mut target = stored(&js, TARGET).await;
    let mut expected = as_moved(&legacy);
    target.sort_by(|a, b| a.id.cmp(&b.id));
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(target.len(), expected.len());
    assert!(target == expected, "each message once, nothing else");
    broker.stop().await;
}

/// A target that refuses a message stops the move with an error that says nothing is lost; the
/// refused message stays in the old stream, and the next run, once there is room, finishes.
/// Without a target nothing is touched.
#[tokio::test]
async fn a_refused_message_stops_the_move_and_stays_until_there_is_room() {
    let (_dir, fixture, broker, js) = upgrade_stack().await;
    let legacy = legacy_messages(&fixture, &js).await;

    let err = move_legacy_inbox(&js, TARGET, new_subject)
        .await
        .unwrap_err();
    assert!(
        err.contains(TARGET) && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(consumers_of(&js, LEGACY_STREAM).await.len(), 3);
    assert_eq!(stored(&js, LEGACY_STREAM).await, legacy);

    // Room for one message per inbox: alice's second (m3) is refused.
    create_target(&js, |config| {
        config.max_messages_per_subject = 1;
        config.discard = stream::DiscardPolicy::New;
        config.discard_new_per_subject = true;
    })
    .await;
    let err = move_legacy_inbox(&js, TARGET, new_subject)
        .await
        .unwrap_err();
    assert!(
        err.contains("Nothing is lost") && err.contains(&legacy[1].subject),
        "{err}"
    );
    assert_eq!(stored(&js, LEGACY_STREAM).await, [legacy[1].clone()]);
    assert_eq!(consumers_of(&js, LEGACY_STREAM).await.len(), 0);
    // Closed: a server of the previous release still running cannot store more there (its
    // sender is told), so nothing new is lost when the stream goes.
    let late = js
        .publish(legacy[0].subject.clone(), Bytes::from_static(b"late"))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(
        late.kind(),
        jetstream::context::PublishErrorKind::StreamNotFound
    );

    let mut config = js
        .get_stream(TARGET)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    config.max_messages_per_subject = 10;
    js.update_stream(&config).await.unwrap();
    let moved = move_legacy_inbox(&js, TARGET, new_subject).await.unwrap();
    assert_eq!(
        moved,
        Moved {
            moved: 1,
            legacy_removed: true,
            ..Moved::default()
        }
    );
    let mut target = stored(&js, TARGET).await;
    let mut expected = as_moved(&legacy);
    target.sort_by(|a, b| a.id.cmp(&b.id));
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(target, expected);
    broker.stop().await;
}

/// The whole upgrade as a person meets it: the current `kez-chat-server dev` started on the
/// store 0.1 wrote moves the waiting mail at its first start, and the current `kez-chat` on the
/// homes 0.1 wrote shows each waiting message once (never m1, which alice had read), keeps the
/// history, and chats on; a second start finds nothing left to move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_current_binaries_take_over_the_store_and_homes_the_previous_release_wrote() {
    let dir = TempDir::new().unwrap();
    let fixture = Fixture::unpack(dir.path());
    let first = DevProcess::start(&fixture, dir.path(), "first").await;
    assert!(
        first
            .log()
            .contains("the previous release's inbox is now in KEZ_MAIL"),
        "{}",
        first.log()
    );
    let inbox = |name: &'static str, url: String| {
        let home = fixture.home(name);
        async move {
            let output = kez_chat(&home, &["--server", &url, "inbox", "--json"])
                .output()
                .unwrap();
            assert!(output.status.success(), "{name}: {output:?}");
            let shown: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            shown
                .as_array()
                .unwrap()
                .iter()
                .map(|message| message["text"].as_str().unwrap().to_owned())
                .collect::<Vec<String>>()
        }
    };
    assert_eq!(inbox("alice", first.url.clone()).await, ["m2", "m3"]);
    assert_eq!(inbox("bob", first.url.clone()).await, ["m4"]);
    assert!(inbox("carol", first.url.clone()).await.is_empty());
    assert!(
        inbox("alice", first.url.clone()).await.is_empty(),
        "shown once"
    );
    let history = kez_chat(
        &fixture.home("alice"),
        &["--server", &first.url, "history", "@bob", "--json"],
    )
    .output()
    .unwrap();
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    let mut texts: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|message| message["text"].as_str().unwrap())
        .collect();
    // m1 was stored by 0.1, m2 and m3 now, m4 is alice's own: all there, once.
    texts.sort_unstable();
    assert_eq!(texts, ["m1", "m2", "m3", "m4"]);
    let sent = kez_chat(
        &fixture.home("alice"),
        &["--server", &first.url, "send", "@bob", "after the upgrade"],
    )
    .output()
    .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(inbox("bob", first.url.clone()).await, ["after the upgrade"]);
    owner_of_a_chain_kept_by_0_1_appends_and_adds_a_device(&fixture, &first.url).await;

    let server = async_nats::ConnectOptions::with_nkey(
        kez_chat_server::nats_conf::read_nkey_seed(
            &fixture
                .data_dir
                .join(kez_chat_server::dev::KEYS_DIR)
                .join(kez_chat_server::nats_conf::SERVER_USER_SEED_FILE),
        )
        .unwrap()
        .to_string(),
    )
    .connect(&first.url)
    .await
    .unwrap();
    let js = jetstream::new(server);
    assert!(
        js.get_stream(LEGACY_STREAM).await.is_err(),
        "KEZ_INBOX is gone"
    );
    handles_of_0_1_are_in_the_directory(&js).await;
    let mut mail = js.get_stream(TARGET).await.unwrap();
    assert_eq!(mail.info().await.unwrap().state.consumer_count, 0);
    drop(first);

    let second = DevProcess::start(&fixture, dir.path(), "second").await;
    assert!(
        !second
            .log()
            .contains("the previous release's inbox is now in KEZ_MAIL"),
        "nothing left to move: {}",
        second.log()
    );
    assert!(inbox("alice", second.url.clone()).await.is_empty());
    assert!(inbox("bob", second.url.clone()).await.is_empty());
}

/// The handles 0.1 registered get their directory entries (PROTOCOL.md §5.7) at the first
/// start, in the background: under handle and key, what the registry and the head index hold.
async fn handles_of_0_1_are_in_the_directory(js: &jetstream::Context) {
    let directory = js.get_key_value(DIRECTORY_BUCKET).await.unwrap();
    let handles = js.get_key_value("kez_handles").await.unwrap();
    let heads = js.get_key_value("kez_chain_heads").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while directory.get("kez-backfilled-v1").await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the directory was not backfilled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for name in ["alice", "bob", "carol"] {
        let record: HandleRecord =
            serde_json::from_slice(&handles.get(name).await.unwrap().unwrap()).unwrap();
        let head: Option<ChainHead> = heads
            .get(record.key.to_hex())
            .await
            .unwrap()
            .map(|value| serde_json::from_slice(&value).unwrap());
        for slot in [Slot::handle(name), Slot::key(&record.key)] {
            let entry = directory.get(slot.id()).await.unwrap();
            let profile = slot
                .open(&entry.unwrap_or_else(|| panic!("no directory entry for {name}")))
                .unwrap();
            assert_eq!(profile, Profile::new(record.clone(), head), "{name}");
        }
    }
}

/// The server kept 0.1's chain states without devices; the owner of such a chain appends to it
/// (the server verifies it again from its links, once) and adds a device with a version 2 link,
/// and a lookup's chain shows both devices; the device connects with its own key (the device
/// index, a bucket 0.1 did not have, holds it).
async fn owner_of_a_chain_kept_by_0_1_appends_and_adds_a_device(fixture: &Fixture, url: &str) {
    let alice = Arc::new(Home::open(fixture.home("alice")).unwrap().key().unwrap());
    let me = alice.public_key();
    let connection = Connection::connect(url, alice.clone()).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let before = connection.chain(&me).await.unwrap();
    let link = before
        .next_link(
            now,
            Op::AddEndpoint(Endpoint {
                name: "note".into(),
                kind: "note".into(),
                address: "after the upgrade".into(),
            }),
        )
        .sign(&alice)
        .unwrap();
    assert_eq!(
        link.link().version,
        1,
        "a chain without devices is still written in v1"
    );
    let head = connection.append(link.bytes()).await.unwrap();
    assert_eq!(head.seq, before.seq() + 1);

    let laptop = Arc::new(SecretKey::generate());
    let chain = connection.chain(&me).await.unwrap();
    let added = chain
        .add_device_link(now, &alice, &laptop, "laptop", DeviceKind::Desktop)
        .unwrap();
    let head = connection.append(added.bytes()).await.unwrap();
    assert_eq!(head.head, added.hash());

    let after = connection.chain(&me).await.unwrap();
    let devices: Vec<(PublicKey, &str, bool)> = after
        .devices()
        .iter()
        .map(|device| (device.key, device.name.as_str(), device.is_active()))
        .collect();
    assert_eq!(
        devices,
        [(me, "primary", true), (laptop.public_key(), "laptop", true)]
    );
    assert!(after.endpoints().contains_key("note"));
    connection.close().await.unwrap();

    let device = Connection::connect(url, laptop.clone())
        .await
        .expect("the added device connects with its own key");
    assert_eq!(device.chain(&me).await.unwrap().head(), after.head());
    device.close().await.unwrap();
}

/// `kez-chat --home <home> args…`, isolated from the developer's environment.
fn kez_chat(home: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut command = kez_tests::person::kez_chat(home, args);
    command.stderr(std::process::Stdio::piped());
    command
}

/// The current `kez-chat-server dev` on the fixture's data directory, any free port; its log in
/// a file. Dropping it stops it (and its nats-server).
struct DevProcess {
    child: std::process::Child,
    log: std::path::PathBuf,
    url: String,
}

impl DevProcess {
    async fn start(fixture: &Fixture, out: &std::path::Path, run: &str) -> DevProcess {
        let stdout = out.join(format!("dev-{run}.out"));
        let log = out.join(format!("dev-{run}.log"));
        let child = kez_tests::process::kez_chat_server_command()
            .env(kez_tests::NATS_SERVER_ENV, kez_tests::nats_server_binary())
            .env_remove("KEZ_DEV_DATA_DIR")
            .args(["dev", "--port", "0", "--http-port", "0", "--data-dir"])
            .arg(&fixture.data_dir)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut dev = DevProcess {
            child,
            log,
            url: String::new(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let banner = std::fs::read_to_string(&stdout).unwrap_or_default();
            if let Some(url) = banner.lines().find_map(|line| {
                line.trim()
                    .strip_prefix("NATS URL")
                    .map(|rest| rest.trim().to_owned())
            }) {
                dev.url = url;
                return dev;
            }
            if let Ok(Some(status)) = dev.child.try_wait() {
                panic!("dev exited ({status}):\n{}", dev.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "dev did not serve:\n{}",
                dev.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
