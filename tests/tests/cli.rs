//! The `kez-chat` CLI binary, run as separate processes with separate homes, against a real
//! nats-server with the auth callout and a kez-chat-server: registration, contacts, offline
//! delivery, history, `--json`, and the errors people see (with their exit codes).

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use kez_core::sigchain::DeviceKind;
use kez_core::{Op, SecretKey};
use kez_proto::directory::{DIRECTORY_BUCKET, Slot};
use kez_proto::subjects::MAIL_STREAM;
use kez_tests::callout::CalloutStack;
use kez_tests::chat::inbox_held;
use kez_tests::person::{
    Person, alice_and_bob, key_of, kez_chat, serving, stop, type_back_a_paper_key,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn two_people_chat_through_the_cli() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let alice = Person::new();
    let bob = Person::new();

    let out = alice.register(&url, "alice").await;
    assert!(out.contains("registered as @alice@kez.test"), "{out}");
    let mode = std::fs::metadata(alice.home.join("key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key file is private");
    let me = alice.json(&["whoami"]).await;
    assert_eq!(me["handle"], "@alice@kez.test");
    assert_eq!(me["server"], url.as_str(), "register remembers the server");
    assert_eq!(
        me["sigchain"]["seq"], 3,
        "register wrote the nats and the iroh endpoints and bound the Olm key"
    );
    // Registering again changes nothing.
    let again = alice
        .run(&["--server", &url, "register", "alice", "--no-paper-key"])
        .await;
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        again.status.success() && said.contains("already registered as @alice@kez.test"),
        "{said}"
    );
    assert_eq!(alice.json(&["whoami"]).await, me);

    bob.register(&url, "bob").await;

    // An unknown handle is "not found", for `send` and `add`.
    let err = alice.fails(&["send", "@nobody", "anyone there?"], 3).await;
    assert!(err.contains("@nobody@kez.test is not registered"), "{err}");
    let err = alice.fails(&["add", "@nobody"], 3).await;
    assert!(err.contains("@nobody@kez.test is not registered"), "{err}");
    // A registered handle not in the contacts is verified and pinned on first use; the text
    // comes from stdin when there is no text argument.
    let output = alice
        .run_with_stdin(&["send", "@bob"], "first contact\n")
        .await;
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{err}");
    assert!(
        err.contains("@bob@kez.test was not in your contacts"),
        "{err}"
    );
    assert!(err.contains("pinned"), "{err}");
    assert!(err.contains("delivered to server"), "{err}");

    let added = alice.json(&["add", "@bob"]).await;
    assert_eq!(added["handle"], "@bob@kez.test");
    assert_eq!(added["sigchain"]["seq"], 3);
    assert_eq!(added["endpoints"], serde_json::json!(["iroh", "nats"]));
    bob.ok(&["add", "@alice"]).await;
    // `profile` renders the verified sigchain.
    let profile = alice.json(&["profile", "@bob"]).await;
    assert_eq!(profile["handle"], "@bob@kez.test");
    assert_eq!(profile["key"], added["key"]);
    assert_eq!(profile["in_contacts"], true);
    assert_eq!(profile["pinned_key"], added["key"]);
    assert_eq!(profile["sigchain"]["seq"], 3);
    assert_eq!(profile["sigchain"]["rotated"], false);
    assert_eq!(profile["sigchain"]["endpoints"][1]["kind"], "nats");
    assert_eq!(profile["sigchain"]["endpoints"][1]["address"], url.as_str());
    assert_eq!(profile["sigchain"]["endpoints"][0]["kind"], "iroh");
    let iroh = profile["sigchain"]["endpoints"][0]["address"]
        .as_str()
        .unwrap();
    assert!(
        iroh.starts_with("iroh:") && iroh.contains(";ip=127.0.0.1:"),
        "the file node, on loopback: {iroh}"
    );
    assert_eq!(profile["sigchain"]["claims"], serde_json::json!([]));
    assert_eq!(profile["sigchain"]["shared_files"], Value::Null);
    let text = alice.ok(&["profile", "@bob"]).await;
    assert!(text.contains("in contacts, key pinned"), "{text}");
    assert!(text.contains("sigchain    verified: seq 3"), "{text}");
    assert!(
        text.contains("secrecy     forward secret: every device has an Olm key"),
        "{text}"
    );
    assert!(
        text.contains(&format!("endpoint    nats (nats) {url}")),
        "{text}"
    );
    alice.fails(&["profile", "@nobody"], 3).await;
    let contacts = alice.json(&["contacts"]).await;
    assert_eq!(contacts.as_array().unwrap().len(), 1);
    assert_eq!(contacts[0]["handle"], "@bob@kez.test");

    // alice sends while bob is not running; bob reads it once.
    let id = alice.ok(&["send", "@bob", "hello", "bob"]).await;
    assert_eq!(id.trim().len(), 32, "the message id: {id}");
    let read = bob.ok(&["inbox"]).await;
    assert!(read.contains("@alice@kez.test: first contact"), "{read}");
    assert!(read.contains("@alice@kez.test: hello bob"), "{read}");
    assert_eq!(
        bob.json(&["inbox"]).await,
        serde_json::json!([]),
        "shown once"
    );

    bob.ok(&["send", "@alice", "hi alice"]).await;
    let read = alice.json(&["inbox", "--wait", "2"]).await;
    assert_eq!(read.as_array().unwrap().len(), 1, "{read}");
    assert_eq!(read[0]["text"], "hi alice");
    assert_eq!(read[0]["from_handle"], "@bob@kez.test");
    assert_eq!(read[0]["in_contacts"], true);

    // History has both directions.
    let history = alice.ok(&["history", "@bob"]).await;
    assert!(history.contains("you: first contact"), "{history}");
    assert!(history.contains("you: hello bob"), "{history}");
    assert!(history.contains("@bob@kez.test: hi alice"), "{history}");
    let history = alice.json(&["history", "@bob"]).await;
    let directions: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["direction"].as_str().unwrap())
        .collect();
    assert_eq!(directions, ["outgoing", "outgoing", "incoming"]);

    // bob listens: what alice sends shows up live, in order; Ctrl-C ends it with exit 0.
    let mut listen = tokio::process::Command::from(kez_chat(&bob.home, &["listen", "--json"]));
    listen
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut listen = listen.spawn().unwrap();
    let mut lines = BufReader::new(listen.stdout.take().unwrap()).lines();
    for n in 0..3 {
        alice.ok(&["send", "@bob", &format!("live {n}")]).await;
    }
    for n in 0..3 {
        let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
            .await
            .expect("listen shows the message")
            .unwrap()
            .expect("listen is still running");
        let message: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(message["text"], format!("live {n}"), "{line}");
    }
    let pid = listen.id().unwrap().to_string();
    let interrupted = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(interrupted.success());
    let status = tokio::time::timeout(Duration::from_secs(15), listen.wait())
        .await
        .expect("listen stops on Ctrl-C")
        .unwrap();
    assert!(status.success(), "listen after Ctrl-C: {status:?}");

    // A stranger's message is marked as such, with the handle the server names.
    let carol = Person::new();
    carol.register(&url, "carol").await;
    carol.ok(&["add", "@alice"]).await;
    carol.ok(&["send", "@alice", "remember me?"]).await;
    let read = alice.ok(&["inbox"]).await;
    assert!(
        read.contains("(not in contacts) @carol@kez.test ed25519:"),
        "{read}"
    );

    // A lying server: bob's record now names carol's key (whose chain verifies). alice's `add`
    // refuses, says why, and keeps the pinned key.
    let js = async_nats::jetstream::new(stack.server_client().await);
    let carol_key = kez_tests::kez_server::swap_key(&js, "bob", "carol")
        .await
        .unwrap()
        .to_string();
    let err = alice.fails(&["add", "@bob"], 4).await;
    assert!(err.contains("the key changed"), "{err}");
    assert!(err.contains("Nothing was changed"), "{err}");
    assert_eq!(
        alice.json(&["contacts"]).await,
        contacts,
        "bob's key stays pinned"
    );
    // `send` looks the handle up again before sending: it refuses, loudly, and publishes nothing.
    let mut inbox = js.get_stream(MAIL_STREAM).await.unwrap();
    let before = inbox.info().await.unwrap().state.last_sequence;
    let err = alice.fails(&["send", "@bob", "secret"], 4).await;
    assert!(
        err.contains("WARNING: the key of @bob@kez.test changed"),
        "{err}"
    );
    assert!(err.contains("NOTHING WAS SENT"), "{err}");
    assert!(
        err.contains(&format!(
            "kez-chat add @bob@kez.test --accept-key {carol_key}"
        )),
        "says how to accept a key checked another way: {err}"
    );
    let after = inbox.info().await.unwrap().state.last_sequence;
    assert_eq!(before, after, "nothing was published");

    // Accepting takes only the exact key the server names.
    let bob_key = key_of(&bob).public_key().to_string();
    let err = alice
        .fails(&["add", "@bob", "--accept-key", &bob_key], 4)
        .await;
    assert!(err.contains("not the key you accepted"), "{err}");
    assert_eq!(alice.json(&["contacts"]).await, contacts, "still unchanged");
    alice.ok(&["add", "@bob", "--accept-key", &carol_key]).await;
    let now = alice.json(&["contacts"]).await;
    assert_eq!(now[0]["key"].as_str(), Some(carol_key.as_str()), "{now}");
    alice.ok(&["send", "@bob", "to the accepted key"]).await;
}

/// bob rotates his key in his own sigchain (the old key signs the new one, which
/// counter-signs). alice follows the rotation without a warning: her next message is sealed to
/// the new key and still goes to bob's inbox; her contact list shows the rotation.
#[tokio::test]
async fn a_rotation_in_the_sigchain_is_followed_without_a_warning() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let old_key = key_of(&bob);
    let new_key = std::sync::Arc::new(SecretKey::generate());

    let conn = kez_client::Connection::connect(&url, old_key.clone())
        .await
        .unwrap();
    let chain = conn.chain(&old_key.public_key()).await.unwrap();
    let rotation = chain
        .next_link(
            kez_client::now(),
            Op::Rotate {
                new_key: new_key.public_key(),
                counter_sig: kez_core::Signature::from_bytes([0; 64]),
            },
        )
        .sign_rotation(&old_key, &new_key)
        .unwrap();
    conn.append(rotation.bytes()).await.unwrap();
    conn.close().await.unwrap();

    let output = alice.run(&["send", "@bob", "after the rotation"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("WARNING"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "@bob@kez.test rotated their key from {} to {}",
            old_key.public_key(),
            new_key.public_key()
        )),
        "{stderr}"
    );

    // What the stream holds: in the inbox of bob's new key, a device of his identity (the
    // rotation revoked the key he registered), sealed to his new key only.
    let js = async_nats::jetstream::new(stack.server_client().await);
    let mut inbox = js.get_stream(MAIL_STREAM).await.unwrap();
    let last = inbox.info().await.unwrap().state.last_sequence;
    let stored = inbox.get_raw_message(last).await.unwrap();
    assert_eq!(
        stored.subject.as_str(),
        kez_proto::subjects::inbox_subject(&old_key.public_key(), &new_key.public_key())
    );
    let opened = kez_core::envelope::open(&new_key, &stored.payload).expect("opens");
    assert_eq!(opened.body, b"after the rotation");
    assert_eq!(opened.from, key_of(&alice).public_key());
    assert!(kez_core::envelope::open(&old_key, &stored.payload).is_err());
    // bob connects with the new key, as his identity, and reads it; the old key is refused.
    let rotated = kez_client::Connection::connect(&url, new_key.clone())
        .await
        .unwrap()
        .as_device_of(old_key.public_key());
    let store_dir = tempfile::tempdir().unwrap();
    let store = kez_client::Store::open(store_dir.path().join("store.redb")).unwrap();
    let read = rotated
        .receive(&store, 10, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].body, b"after the rotation");
    rotated.close().await.unwrap();
    assert!(
        kez_client::Connection::connect(&url, old_key.clone())
            .await
            .is_err(),
        "the key rotated away from is a revoked device"
    );

    let contacts = alice.ok(&["contacts"]).await;
    assert!(
        contacts.contains(&format!("(rotated to {})", new_key.public_key())),
        "{contacts}"
    );
    // Later checks are quiet: nothing changed since.
    let output = alice.run(&["send", "@bob", "again"]).await;
    assert!(output.status.success());
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("rotated"),
        "{output:?}"
    );
}

/// `devices` lists the own chain's devices as verified by the client, and `profile` shows a
/// contact's: the first key as `primary`, then a device added by a link, then one revoked.
#[tokio::test]
async fn devices_and_profiles_show_the_devices_the_chain_says() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let bob_key = key_of(&bob);
    let me = bob_key.public_key();

    let listed: Value = serde_json::from_str(&bob.ok(&["devices", "--json"]).await).unwrap();
    assert_eq!(listed["this_device"], me.to_string());
    assert_eq!(
        listed["devices"],
        serde_json::json!([{ "key": me.to_string(), "name": "primary", "kind": "cli",
            "added": 1, "revoked": null, "active": true, "last_seen": null }])
    );

    let laptop = SecretKey::generate();
    let paper = SecretKey::generate();
    let conn = kez_client::Connection::connect(&url, bob_key.clone())
        .await
        .unwrap();
    for (device, name, kind) in [
        (&laptop, "laptop", DeviceKind::Desktop),
        (&paper, "paper1", DeviceKind::Paper),
    ] {
        let chain = conn.chain(&me).await.unwrap();
        let link = chain
            .add_device_link(kez_client::now(), &bob_key, device, name, kind)
            .unwrap();
        conn.append(link.bytes()).await.unwrap();
    }
    let seq = conn.chain(&me).await.unwrap().seq() + 1;
    conn.close().await.unwrap();

    let err = bob.fails(&["device", "revoke", "primary"], 2).await;
    assert!(err.contains("is this device"), "{err}");
    let err = bob.fails(&["device", "revoke", "phone"], 3).await;
    assert!(err.contains("yours are: primary, laptop, paper1"), "{err}");
    let err = bob
        .fails(
            &["device", "revoke", "paper1", "--reason", "line\nbreak"],
            2,
        )
        .await;
    assert!(
        err.contains("revocation reason must be 1 to 1024 bytes"),
        "{err}"
    );
    let revoked = bob
        .ok(&["device", "revoke", "paper1", "--reason", "seen by others"])
        .await;
    assert!(
        revoked.starts_with(&format!(
            "Revoked paper1 ({}) at link {seq}",
            paper.public_key()
        )),
        "{revoked}"
    );

    let text = bob.ok(&["devices"]).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(
        lines[0],
        format!("primary  cli  {me}  added at link 1  (this device)")
    );
    assert!(
        lines[1].starts_with(&format!(
            "laptop  desktop  {}  added at link",
            laptop.public_key()
        )),
        "{text}"
    );
    assert!(
        lines[2].ends_with(&format!("REVOKED at link {seq}"))
            && lines[2].starts_with("paper1  paper"),
        "{text}"
    );

    let profile: Value =
        serde_json::from_str(&alice.ok(&["profile", "@bob", "--json"]).await).unwrap();
    let devices = profile["sigchain"]["devices"].as_array().unwrap();
    let active: Vec<&str> = devices
        .iter()
        .filter(|device| device["active"] == true)
        .map(|device| device["name"].as_str().unwrap())
        .collect();
    assert_eq!(active, ["primary", "laptop"]);
    let text = alice.ok(&["profile", "@bob"]).await;
    assert!(
        text.contains(&format!(
            "device      laptop  desktop  {}",
            laptop.public_key()
        )),
        "{text}"
    );
}

/// `paperkey` shows 24 words once, adds the key they encode as a `paper` device only when the
/// word asked back is right, and leaves no trace of them in the home.
#[tokio::test]
async fn a_paper_key_is_shown_once_confirmed_and_becomes_a_device() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let alice = Person::new();
    alice.register(&url, "alice").await;

    let refused = alice
        .run_with_stdin(&["paperkey"], "wrong\nwrong\nwrong\n")
        .await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("nothing changed"), "{stderr}");
    let devices = alice.json(&["devices"]).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1);

    let (words, stdout) = type_back_a_paper_key(&alice, &["paperkey"]).await;
    assert!(stdout.contains("Added paper key paper1"), "{stdout}");

    let paper = kez_core::paper::PaperKey::parse(&words.join(" ")).unwrap();
    let devices = alice.json(&["devices"]).await;
    let added = &devices["devices"][1];
    assert_eq!(added["name"], "paper1");
    assert_eq!(added["kind"], "paper");
    assert_eq!(added["active"], true);
    assert_eq!(added["key"], paper.secret_key().public_key().to_string());

    // Neither the words nor the seed they encode were written anywhere in the home.
    let key_file = paper.secret_key().to_key_file();
    let seed_hex = key_file.trim().trim_start_matches("ed25519-secret:");
    let seed: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&seed_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut dirs = vec![alice.home.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if std::os::unix::fs::FileTypeExt::is_socket(
                &std::fs::metadata(&path).unwrap().file_type(),
            ) {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(&words[..3].join(" ")), "{path:?}");
            assert!(!text.contains(seed_hex), "{path:?}");
            assert!(!bytes.windows(32).any(|window| window == seed), "{path:?}");
        }
    }
}

/// `register` makes a paper key unless told not to: a confirmed one is a device from the start;
/// an unconfirmed one leaves the user registered without one, and says so.
#[tokio::test]
async fn registering_makes_a_paper_key_unless_told_not_to() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let carol = Person::new();
    let refused = carol
        .run_with_stdin(
            &["--server", &url, "register", "carol"],
            "wrong\nwrong\nwrong\n",
        )
        .await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("you are registered, without a paper key"),
        "{stderr}"
    );
    let devices = carol.json(&["devices"]).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1);

    // Registering again offers one again, and this time it is typed back.
    let (words, stdout) = type_back_a_paper_key(&carol, &["register", "carol"]).await;
    assert!(stdout.contains("registered as @carol@kez.test"), "{stdout}");
    let paper = kez_core::paper::PaperKey::parse(&words.join(" ")).unwrap();
    let devices = carol.json(&["devices"]).await;
    assert_eq!(devices["devices"][1]["kind"], "paper");
    assert_eq!(
        devices["devices"][1]["key"],
        paper.secret_key().public_key().to_string()
    );
    // With one, registering again asks for nothing.
    carol.ok(&["register", "carol"]).await;
}

#[tokio::test]
async fn errors_say_what_to_do() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let fresh = Person::new();

    let err = fresh
        .fails(&["register", "dave", "--no-paper-key"], 2)
        .await;
    assert!(err.contains("--server nats://"), "{err}");
    let err = fresh.fails(&["whoami"], 2).await;
    assert!(
        err.contains("kez-chat --server nats://HOST:4222 register"),
        "{err}"
    );
    let nobody = Person::new();
    let err = nobody.fails(&["whoami"], 2).await;
    assert!(err.contains("there is no kez-chat home at"), "{err}");
    assert!(err.contains("register NAME"), "{err}");
    assert!(!nobody.home.exists(), "whoami made no home");
    let err = fresh
        .fails(
            &[
                "--server",
                "nats://127.0.0.1:1",
                "register",
                "dave",
                "--no-paper-key",
            ],
            1,
        )
        .await;
    assert!(
        err.contains("cannot connect to nats://127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("server may be down"), "{err}");
    // A usage error is exit 2 (clap).
    fresh.fails(&["send"], 2).await;

    Person::new().register(&url, "erin").await;
    let err = fresh
        .fails(&["--server", &url, "register", "erin", "--no-paper-key"], 4)
        .await;
    assert!(
        err.contains("@erin@kez.test is already registered"),
        "{err}"
    );
    // The same home can still register a free name, keeping its key.
    fresh.register(&url, "dave").await;
    let err = fresh
        .fails(&["register", "frank", "--no-paper-key"], 4)
        .await;
    assert!(
        err.contains("already registered as @dave@kez.test"),
        "{err}"
    );
}

#[tokio::test]
async fn listen_shows_two_hundred_messages_in_order_once() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;

    let mut listen = tokio::process::Command::from(kez_chat(&bob.home, &["listen", "--json"]));
    listen
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut listen = listen.spawn().unwrap();
    let mut lines = BufReader::new(listen.stdout.take().unwrap()).lines();

    // alice sends through the library (one connection, each send waits for the stream's ack).
    let conn = kez_client::Connection::connect(&url, key_of(&alice))
        .await
        .unwrap();
    let contacts = tempfile::tempdir().unwrap();
    let store = kez_client::Store::open(contacts.path().join("store.redb")).unwrap();
    let bob_contact = conn
        .verify_contact(&store, &kez_tests::kez_server::test_handle("@bob"))
        .await
        .unwrap()
        .contact;
    for n in 0..200 {
        conn.send(&bob_contact, "text", format!("message {n}").as_bytes())
            .await
            .unwrap();
    }
    conn.close().await.unwrap();

    for n in 0..200 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("listen shows message {n}"))
            .unwrap()
            .expect("listen is still running");
        let message: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(message["text"], format!("message {n}"), "{line}");
        assert_eq!(message["from_handle"], "@alice@kez.test");
    }
    // Nothing more: no duplicates.
    let extra = tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await;
    assert!(extra.is_err(), "no more lines after 200: {extra:?}");
    listen.start_kill().unwrap();
    let _ = listen.wait().await;
    let history = bob.json(&["history", "@alice"]).await;
    assert_eq!(history.as_array().unwrap().len(), 200, "each stored once");
}

#[tokio::test]
async fn the_broker_stores_neither_plaintext_nor_the_sender() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    // bob is offline: his service (which the setup started) is stopped.
    bob.stop_service().await;
    let plaintext = "the plaintext that only bob may read";
    for _ in 0..3 {
        alice.ok(&["send", "@bob", plaintext]).await;
    }

    // bob is offline: read what the stream holds, as the server.
    let js = async_nats::jetstream::new(stack.server_client().await);
    let mut inbox = js.get_stream(MAIL_STREAM).await.unwrap();
    let state = inbox.info().await.unwrap().state.clone();
    assert_eq!(state.messages, 3, "{state:?}");
    let alice_key = key_of(&alice).public_key();
    let forbidden: Vec<(&str, Vec<u8>)> = vec![
        ("plaintext", plaintext.as_bytes().to_vec()),
        ("alice's key (hex)", alice_key.to_hex().into_bytes()),
        ("alice's key (nkey)", alice_key.to_nkey().into_bytes()),
        ("alice's key (raw)", alice_key.as_bytes().to_vec()),
        ("alice's handle", b"alice".to_vec()),
    ];
    for seq in state.first_sequence..=state.last_sequence {
        let message = inbox.get_raw_message(seq).await.unwrap();
        let mut stored = message.payload.to_vec();
        stored.extend_from_slice(message.subject.as_bytes());
        // The headers too (their text form is enough: the key is not binary there).
        stored.extend_from_slice(format!("{:?}", message.headers).as_bytes());
        for (what, bytes) in &forbidden {
            assert!(
                !stored.windows(bytes.len()).any(|w| w == bytes.as_slice()),
                "message {seq} contains {what}"
            );
        }
    }

    // And bob reads them all; once he acknowledged them, the broker keeps nothing.
    let read = bob.json(&["inbox"]).await;
    assert_eq!(read.as_array().unwrap().len(), 3, "{read}");
    assert_eq!(read[0]["text"], plaintext);
    assert_eq!(inbox_held(&js, &key_of(&bob).public_key()).await, Some(0));
    // bob's delivery receipts went to alice, whose service fetches (and so acknowledges) them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while inbox.info().await.unwrap().state.messages != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            inbox.info().await.unwrap().state
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// bob's client dies after the server answered its fetch but before it stored anything (here:
/// a `kez.mail.fetch` on bob's connection whose answer is thrown away). Nothing was
/// acknowledged, so the next `inbox` gets every message again at once, shows each exactly
/// once and acknowledges them: the broker keeps nothing.
#[tokio::test]
async fn a_crash_before_storing_loses_nothing_and_shows_once() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    // bob is offline: his service (which the setup started) is stopped.
    bob.stop_service().await;
    for n in 0..3 {
        alice.ok(&["send", "@bob", &format!("crash {n}")]).await;
    }

    // The "crashing client": bob's own connection fetches, and never stores or fetches again.
    let bob_key = key_of(&bob);
    let (conn, _errors) = stack.connect_as(&bob_key).await.unwrap();
    let request = kez_proto::mail::FetchRequest {
        after: 0,
        max: 10,
        time: 0,
        origins: false,
    };
    let answer = kez_tests::kez_server::call(
        &conn,
        kez_proto::Endpoint::MailFetch.subject(),
        serde_json::to_vec(&request).unwrap(),
    )
    .await
    .unwrap();
    let fetched = kez_proto::mail::FetchAnswer::decode(&answer, false).unwrap();
    assert_eq!(
        fetched.messages.len(),
        3,
        "the crashing client got all three"
    );
    assert_eq!(fetched.pending, 0);
    drop(conn);
    let js = async_nats::jetstream::new(stack.server_client().await);
    assert_eq!(
        inbox_held(&js, &bob_key.public_key()).await,
        Some(3),
        "a fetch alone deletes nothing"
    );

    let read = bob.json(&["inbox"]).await;
    let texts: Vec<&str> = read
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["crash 0", "crash 1", "crash 2"],
        "each once, in order"
    );
    assert_eq!(
        bob.json(&["inbox"]).await,
        serde_json::json!([]),
        "and never again"
    );
    assert_eq!(inbox_held(&js, &bob_key.public_key()).await, Some(0));
}

/// A client killed after storing and acknowledging messages but before showing them: the next
/// `inbox` shows them, once (from the store: the broker no longer has them).
#[tokio::test]
async fn messages_stored_but_not_shown_appear_on_the_next_run_once() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    // bob is offline: his service (which the setup started) is stopped.
    bob.stop_service().await;
    for n in 0..3 {
        alice.ok(&["send", "@bob", &format!("stored {n}")]).await;
    }
    // bob's client receives (stores, acks) and dies before printing: the library alone (bob's
    // service, which would own the store, is stopped).
    let home = kez_client::Home::open(&bob.home).unwrap();
    let store = home.store().unwrap();
    let conn = kez_client::Connection::connect(&url, key_of(&bob))
        .await
        .unwrap();
    let received = conn
        .receive(&store, 10, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(received.len(), 3, "stored");
    drop(conn);
    drop(store);
    // The receive's last fetch acknowledged them: the broker keeps nothing to deliver again.
    let js = async_nats::jetstream::new(stack.server_client().await);
    let bob_key = key_of(&bob).public_key();
    assert_eq!(inbox_held(&js, &bob_key).await, Some(0));

    let shown = bob.json(&["inbox"]).await;
    let texts: Vec<&str> = shown
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["stored 0", "stored 1", "stored 2"]);
    assert_eq!(
        bob.json(&["inbox"]).await,
        Value::Array(Vec::new()),
        "shown once"
    );
    assert_eq!(inbox_held(&js, &bob_key).await, Some(0));
}

/// The CLI never lets a broker choose what the key signs: a "nonce" that is a KEZ statement in
/// disguise makes `register` fail with an explanation and no signature sent. And it refuses an
/// unencrypted URL to another machine unless told otherwise, before making any connection.
#[tokio::test]
async fn the_cli_refuses_a_disguised_nonce_and_plaintext_to_other_machines() {
    use kez_tests::fake_broker::{AfterPong, FakeBroker};

    let broker = FakeBroker::start(
        "KEZ-SIGCHAIN-LINK-V1\u{0}{\"chain\":\"forged\"}",
        &[],
        AfterPong::Stay,
    )
    .await;
    let alice = Person::new();
    let err = alice
        .fails(
            &[
                "--server",
                &broker.url(),
                "register",
                "alice",
                "--no-paper-key",
            ],
            1,
        )
        .await;
    assert!(err.contains("did not prove this key"), "{err}");
    assert!(err.contains("nonce"), "{err}");
    assert!(
        broker
            .connects()
            .iter()
            .all(|connect| connect.get("sig").is_none()),
        "{:?}",
        broker.connects()
    );

    let err = alice
        .fails(
            &[
                "--server",
                "nats://192.0.2.1:4222",
                "register",
                "alice",
                "--no-paper-key",
            ],
            2,
        )
        .await;
    assert!(err.contains("is not encrypted"), "{err}");
    assert!(err.contains("tls://"), "{err}");
    assert!(err.contains("--allow-plaintext"), "{err}");
}

/// Text a peer sends reaches the terminal as text: a forged second line shows as a
/// continuation of the message it is in, escape sequences, carriage returns, BEL and bidi
/// overrides show as visible escapes, and `--json` keeps the exact text.
#[tokio::test]
async fn peer_text_cannot_pass_for_another_line_or_reach_the_terminal() {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let forged = "hi\n[18:31:00] @carol@kez.test: send me your key\r\u{1b}]0;pwned\u{7}\u{1b}[2J \u{202e}gpj.exe";
    alice.ok(&["send", "@bob", forged]).await;

    let output = bob.run(&["inbox"]).await;
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    for forbidden in ['\u{1b}', '\r', '\u{7}', '\u{202e}'] {
        assert!(
            !stdout.contains(forbidden),
            "{forbidden:?} reached the terminal: {stdout:?}"
        );
    }
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with('[') && lines[0].contains("@alice@kez.test: hi"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("  | [18:31:00] @carol@kez.test: send me your key\\u{d}\\u{1b}]0;pwned\\u{7}\\u{1b}[2J \\u{202e}gpj.exe"),
        "{stdout}"
    );
    // The same in the history, and the exact text for programs.
    let history = bob.ok(&["history", "@alice"]).await;
    assert!(
        !history.contains('\u{1b}') && history.contains("\n  | [18:31:00]"),
        "{history}"
    );
    let exact = bob.json(&["history", "@alice"]).await;
    assert_eq!(exact[0]["text"], forged);
}

/// Every kind of failure ends with the code `kez-chat --help` lists for it, and says what to do.
#[tokio::test]
async fn the_exit_code_table_holds() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, _bob) = alice_and_bob(&url).await;

    // 2: usage and setup.
    let fresh = Person::new();
    for bad in ["http://kez.lat", "nats://", "nats://192.0.2.1:4222"] {
        fresh
            .fails(&["--server", bad, "register", "dave", "--no-paper-key"], 2)
            .await;
    }
    let err = fresh
        .fails(
            &["--server", &url, "register", "admin", "--no-paper-key"],
            2,
        )
        .await;
    assert!(err.contains("reserved"), "{err}");
    assert!(
        !fresh.home.join("key").exists(),
        "no key made for a name no server takes"
    );
    let err = fresh
        .fails(
            &[
                "--server",
                &url,
                "register",
                "@zed@kez.lat",
                "--no-paper-key",
            ],
            2,
        )
        .await;
    assert!(err.contains("serves kez.test"), "{err}");
    let max = kez_core::envelope::max_body_len("text", kez_client::now()).unwrap();
    let output = alice
        .run_with_stdin(&["send", "@bob"], &"x".repeat(max + 1))
        .await;
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("kez-chat share"), "{err}");
    let output = alice
        .run_with_stdin(&["send", "@bob"], &"x".repeat(max))
        .await;
    assert!(output.status.success(), "the largest message is sent");

    // 2: a home or key file others can read.
    let key = alice.home.join("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = alice.fails(&["whoami"], 2).await;
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&alice.home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = alice.fails(&["contacts"], 2).await;
    assert!(err.contains("chmod 700"), "{err}");
    std::fs::set_permissions(&alice.home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let store = alice.home.join("store.redb");
    let mode = std::fs::metadata(&store).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the store is created private");

    // 6: a damaged, an emptied store, a lost key; each left as it was.
    alice.stop_service().await;
    let good = std::fs::read(&store).unwrap();
    for (bytes, says) in [
        (b"not a database".to_vec(), "is damaged"),
        (Vec::new(), "empty"),
    ] {
        std::fs::write(&store, &bytes).unwrap();
        let err = alice.fails(&["contacts"], 6).await;
        assert!(err.contains(says) && err.contains("move it aside"), "{err}");
        assert!(!err.contains("another kez-chat"), "{err}");
        assert_eq!(std::fs::read(&store).unwrap(), bytes, "left untouched");
    }
    std::fs::write(&store, &good).unwrap();
    alice.ok(&["contacts"]).await;
    let lost = Person::new();
    lost.register(&url, "carol").await;
    std::fs::remove_file(lost.home.join("key")).unwrap();
    let err = lost
        .fails(
            &["--server", &url, "register", "carol", "--no-paper-key"],
            6,
        )
        .await;
    assert!(err.contains("key file") && err.contains("missing"), "{err}");
    assert!(!lost.home.join("key").exists(), "no new key made");
    lost.fails(&["whoami"], 6).await;

    // 3 and 4 are covered by `errors_say_what_to_do` and the key-change tests.
}

/// A burst of sends goes through a server that asks to slow down: the client waits the time
/// it names and goes on; only a wait longer than it takes is an error (exit 5).
#[tokio::test]
async fn a_burst_of_sends_waits_for_the_server_and_succeeds() {
    use kez_chat_server::limits::{Limits, Rate};
    let stack = CalloutStack::start_configured(|config| {
        config.limits = Limits {
            per_key: Rate::new(4.0, 4),
            ..Limits::default()
        };
    })
    .await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    for i in 0..12 {
        alice.ok(&["send", "@bob", &format!("burst {i}")]).await;
    }
    let shown = bob.json(&["inbox"]).await;
    assert_eq!(shown.as_array().unwrap().len(), 12);

    let slow = CalloutStack::start_configured(|config| {
        config.limits = Limits {
            send_per_key: Rate::new(0.01, 1),
            ..Limits::default()
        };
    })
    .await;
    let (carol, _dave) = alice_and_bob(&slow.nats.url()).await;
    let mut refused = None;
    for _ in 0..4 {
        let output = carol.run(&["send", "@bob", "hi"]).await;
        if output.status.code() == Some(5) {
            refused = Some(String::from_utf8_lossy(&output.stderr).into_owned());
            break;
        }
    }
    let err = refused.expect("a wait of minutes is not waited out");
    assert!(err.contains("retry in"), "{err}");
}

/// What new users tripped on: `history` lists conversations and shows a stranger's messages
/// marked; every command that changes something speaks `--json` with data, not display text;
/// times carry a date; tables line up; a suggested command can be pasted as it is; a download
/// counts the file's own bytes and says when it verifies and decrypts.
#[tokio::test]
async fn conversations_json_dates_and_columns_are_what_people_expect() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let carol = Person::new();
    let registered: Value = serde_json::from_str(
        &carol
            .ok(&[
                "--server",
                &url,
                "register",
                "carol",
                "--no-paper-key",
                "--json",
            ])
            .await,
    )
    .unwrap();
    assert_eq!(registered["handle"], "@carol@kez.test");
    assert_eq!(registered["new_key"], true);
    assert_eq!(registered["already_registered"], false);
    assert_eq!(registered["sigchain"]["seq"], 3);

    let sent = alice.json(&["send", "@bob", "hello bob"]).await;
    assert_eq!(sent["to"], "@bob@kez.test");
    assert_eq!(sent["id"].as_str().unwrap().len(), 32, "{sent}");
    carol.ok(&["send", "@bob", "hi, I am carol"]).await;
    bob.ok(&["inbox", "--wait", "2"]).await;
    bob.ok(&["send", "@alice", "hi alice\nsecond line"]).await;

    // The conversations, alice's (latest) first; carol, a stranger, marked by key only.
    let listed = bob.json(&["history"]).await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["handle"], "@alice@kez.test");
    assert_eq!(listed[0]["messages"], 2);
    assert_eq!(listed[0]["last"]["direction"], "outgoing");
    assert_eq!(listed[1]["handle"], Value::Null);
    assert_eq!(listed[1]["in_contacts"], false);
    assert_eq!(listed[1]["peer"], registered["key"]);
    assert_eq!(listed[1]["unread"], 0);
    let lines = bob.ok(&["history"]).await;
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("@alice@kez.test  "), "{lines:?}");
    assert!(
        lines[0].contains("you: hi alice\\u{a}second line"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("(not in contacts) ed25519:"),
        "{lines:?}"
    );
    let column = |line: &str| line.find("2 messages").or_else(|| line.find("1 message"));
    assert_eq!(
        column(lines[0]),
        column(lines[1]),
        "columns line up: {lines:?}"
    );

    // A stranger's conversation by handle: looked up, shown, marked.
    let output = bob.run(&["history", "@carol"]).await;
    let (shown, said) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{said}");
    assert!(
        said.contains("@carol@kez.test is not in your contacts"),
        "{said}"
    );
    let line = shown.lines().next().unwrap_or_default();
    let (time, rest) = line.split_once("] ").expect("[time] who: text");
    let date = is_date_and_time(time.trim_start_matches('['));
    assert!(date, "a date and a time: {line}");
    assert_eq!(rest, "(not in contacts) @carol@kez.test: hi, I am carol");
    assert_eq!(
        bob.json(&["history", "@carol"]).await[0]["in_contacts"],
        false
    );

    // publish needs an audience, and says which options give one.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big file.bin");
    std::fs::write(&file, vec![42u8; 1000]).unwrap();
    let path = file.to_str().unwrap();
    let err = alice.fails(&["publish", path], 2).await;
    assert!(err.contains("--to") && err.contains("--public"), "{err}");
    let published = alice.json(&["publish", path, "--public"]).await;
    assert_eq!(published["name"], "big file.bin");
    assert_eq!(published["public"], true);
    assert_eq!(published["size"], 1000);
    assert_eq!(published["manifest"]["version"], 1);
    let offered = alice.json(&["share", "--no-wait", "@bob", path]).await;
    assert_eq!(
        (offered["to"].clone(), offered["size"].clone()),
        ("@bob@kez.test".into(), 1000.into())
    );

    // profile of someone who shares nothing: data, not null.
    assert_eq!(
        alice.json(&["profile", "@carol"]).await["files"],
        serde_json::json!({ "visible": 0 })
    );
    // files: the sender as data.
    bob.ok(&["inbox", "--wait", "2"]).await;
    let files = bob.json(&["files"]).await;
    assert_eq!(files[0]["from_handle"], "@alice@kez.test");
    assert_eq!(files[0]["from"], alice.json(&["whoami"]).await["key"]);
    assert_eq!(files[0]["in_contacts"], true);

    // browse suggests a command that pastes as one argument; the download counts plaintext.
    let serving_alice = serving(&alice).await;
    let output = bob.run(&["browse", "@alice"]).await;
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("`kez-chat download '@alice@kez.test/big file.bin'`"),
        "{said}"
    );
    let target = dir.path().join("fetched.bin");
    let output = bob
        .run(&[
            "download",
            "@alice/big file.bin",
            "-o",
            target.to_str().unwrap(),
        ])
        .await;
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said}");
    assert!(
        said.contains("downloading: ") && said.contains(" of 1000 B"),
        "{said}"
    );
    assert!(
        said.contains("verifying and decrypting: 1000 B of 1000 B"),
        "{said}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), vec![42u8; 1000]);
    stop(serving_alice).await;

    let unpublished = alice.json(&["unpublish", "big file.bin"]).await;
    assert_eq!(unpublished["name"], "big file.bin");
    assert_eq!(unpublished["manifest"]["version"], 2);

    // A registration refused by the server keeps the server for the next try; a cluster's
    // several URLs become one normal form in the sigchain's nats endpoint.
    let dave = Person::new();
    let several = format!("{url}, {url}");
    dave.fails(
        &["--server", &several, "register", "alice", "--no-paper-key"],
        4,
    )
    .await;
    dave.ok(&["register", "dave", "--no-paper-key"]).await;
    let me = dave.json(&["whoami"]).await;
    let endpoints = &alice.json(&["profile", "@dave"]).await["sigchain"]["endpoints"];
    let nats = endpoints
        .as_array()
        .unwrap()
        .iter()
        .find(|endpoint| endpoint["kind"] == "nats")
        .unwrap();
    assert_eq!(nats["address"], format!("{url},{url}"));
    assert_eq!(me["server"], format!("{url},{url}"));

    // The server restored from a backup older than dave's registration: his handle, key entry
    // and chain are gone. `register dave` in his home registers him again, with his own key.
    let js = async_nats::jetstream::new(stack.server_client().await);
    let key_hex = me["key"]
        .as_str()
        .unwrap()
        .trim_start_matches("ed25519:")
        .to_owned();
    let forget = |bucket: &'static str, key: String| {
        let js = js.clone();
        async move {
            let bucket = js.get_key_value(bucket).await.unwrap();
            bucket.purge(key).await.unwrap();
        }
    };
    forget("kez_handles", "dave".into()).await;
    forget(DIRECTORY_BUCKET, Slot::handle("dave").id().to_owned()).await;
    forget(
        DIRECTORY_BUCKET,
        Slot::key(&me["key"].as_str().unwrap().parse().unwrap())
            .id()
            .to_owned(),
    )
    .await;
    forget("kez_keys", key_hex.clone()).await;
    forget("kez_chain_heads", key_hex.clone()).await;
    forget("kez_chain_states", key_hex.clone()).await;
    for seq in 1..=me["sigchain"]["seq"].as_u64().unwrap() {
        forget("kez_chain_links", format!("{key_hex}.{seq}")).await;
    }
    let gone = alice.fails(&["profile", "@dave"], 3).await;
    assert!(gone.contains("@dave@kez.test"), "{gone}");
    let again = dave.json(&["register", "dave", "--no-paper-key"]).await;
    assert_eq!(again["key"], me["key"]);
    assert_eq!(again["already_registered"], true);
    assert_eq!(again["new_key"], false);
    assert_eq!(dave.json(&["whoami"]).await["sigchain"]["seq"], 3);
}

/// Whether `text` is `YYYY-MM-DD HH:MM:SS`.
fn is_date_and_time(text: &str) -> bool {
    text.len() == 19
        && text.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == ' ',
            13 | 16 => c == ':',
            _ => c.is_ascii_digit(),
        })
}

/// `listen` through a broker restart says once that receiving stopped and once that it works
/// again, however many pulls failed in between, and shows what was sent meanwhile.
#[tokio::test]
async fn listen_reports_a_broker_restart_in_two_lines() {
    let mut stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let mut listen = tokio::process::Command::from(kez_chat(&bob.home, &["listen", "--json"]));
    listen
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut listen = listen.spawn().unwrap();
    let mut lines = BufReader::new(listen.stdout.take().unwrap()).lines();
    let mut said = BufReader::new(listen.stderr.take().unwrap()).lines();
    async fn next_said(
        said: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    ) -> String {
        tokio::time::timeout(Duration::from_secs(30), said.next_line())
            .await
            .expect("listen says something")
            .unwrap()
            .expect("listen runs")
    }
    assert!(next_said(&mut said).await.contains("listening as @bob"));

    stack.nats.restart();
    // Several seconds without a broker and then with one: many failed pulls, two lines.
    let stopped = next_said(&mut said).await;
    assert!(stopped.contains("receiving stopped"), "{stopped}");
    let back = next_said(&mut said).await;
    assert!(back.contains("reconnected; receiving again"), "{back}");
    alice.ok(&["send", "@bob", "after the restart"]).await;
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("listen shows the message")
        .unwrap()
        .unwrap();
    assert!(line.contains("after the restart"), "{line}");
    let pid = listen.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let rest = tokio::time::timeout(Duration::from_secs(15), async {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = said.next_line().await {
            rest.push(line);
        }
        rest
    })
    .await
    .expect("listen ends on Ctrl-C");
    assert!(
        rest.iter().all(|line| !line.contains("receiving")),
        "more lines about receiving: {rest:?}"
    );
}

/// A send while the server is (re)starting: the broker refuses the connection until the
/// server's auth callout answers again. The client asks again for a few seconds and sends,
/// instead of reporting a refusal as if the account were disabled (exit 5).
#[tokio::test]
async fn a_send_while_the_server_starts_waits_for_it() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let CalloutStack {
        server,
        nats,
        keys_dir,
        keys,
    } = stack;
    server.stop().await;
    let config = CalloutStack::config(&nats, &keys_dir, &keys);
    let restart = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        kez_tests::kez_server::KezServer::start_with(&config).await
    });
    let output = alice.run(&["send", "@bob", "while it starts"]).await;
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let _server = restart.await.unwrap();
    let read = bob.json(&["inbox", "--wait", "2"]).await;
    assert_eq!(read[0]["text"], "while it starts", "{read}");
}

/// `search` finds words in every conversation's messages, ignoring case, both directions, and
/// says so when nothing matches.
#[tokio::test]
async fn search_finds_words_in_every_conversation() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    alice.ok(&["send", "@bob", "Lunch at noon?"]).await;
    bob.ok(&["send", "@alice", "lunch sounds good"]).await;
    bob.ok(&["send", "@alice", "see you"]).await;
    alice.ok(&["inbox", "--wait", "2"]).await;

    let found = alice.ok(&["search", "LUNCH"]).await;
    let lines: Vec<&str> = found.lines().collect();
    assert_eq!(lines.len(), 2, "{found}");
    assert!(
        lines[0].ends_with("you → @bob@kez.test: Lunch at noon?"),
        "{found}"
    );
    assert!(
        lines[1].ends_with("@bob@kez.test: lunch sounds good"),
        "{found}"
    );
    let found = alice.json(&["search", "sounds", "good"]).await;
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found[0]["text"], "lunch sounds good");
    assert_eq!(found[0]["direction"], "incoming");
    assert_eq!(found[0]["peer_handle"], "@bob@kez.test");
    let output = alice.run(&["search", "dinner"]).await;
    assert!(output.status.success());
    assert!(output.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no message contains dinner"),
        "{output:?}"
    );
    alice.fails(&["search"], 2).await;
}

/// A message of a content type this version does not know is shown as such, never dropped.
#[tokio::test]
async fn a_content_type_this_version_does_not_know_is_shown_not_dropped() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let store_dir = tempfile::tempdir().unwrap();
    let store = kez_client::Store::open(store_dir.path().join("store.redb")).unwrap();
    let conn = kez_client::Connection::connect(&url, key_of(&bob))
        .await
        .unwrap();
    let alice_handle = kez_core::Handle::parse("@alice@kez.test", "kez.test").unwrap();
    let to_alice = conn.verify_contact(&store, &alice_handle).await.unwrap();
    conn.send(&to_alice.contact, "x-future/poll", b"{\"q\":\"lunch?\"}")
        .await
        .unwrap();
    conn.close().await.unwrap();
    let read = alice.ok(&["inbox", "--wait", "2"]).await;
    assert!(
        read.contains(
            "@bob@kez.test: (a message this version cannot show: x-future/poll, 14 bytes)"
        ),
        "{read}"
    );
}
