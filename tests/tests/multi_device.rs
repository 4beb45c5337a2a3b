//! One identity on several devices, through the CLI against a real nats-server and
//! kez-chat-server: a paper key recovers the identity on a fresh home as a new device; every
//! running device receives what is sent to the identity and shows what the others sent as
//! "you"; contacts attribute a new device's messages by the identity's verified chain; a lost
//! device is revoked and gets nothing more.

use kez_tests::callout::CalloutStack;
use kez_tests::person::{Person, alice_and_bob, serving, stop, type_back_a_paper_key};

/// The words of a new paper key `person` makes (`kez-chat paperkey`), typed back as asked.
async fn paper_words(person: &Person) -> String {
    let (words, _) = type_back_a_paper_key(person, &["paperkey"]).await;
    words.join(" ")
}

/// `kez-chat recover @alice` on `home` with `words` typed on stdin, and `args` after it.
async fn recover(home: &Person, url: &str, words: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--server", url, "recover", "@alice"];
    all.extend_from_slice(args);
    home.run_with_stdin(&all, &format!("{words}\n")).await
}

/// alice on her laptop, her paper key, and a second running device recovered from it: what
/// bob sends reaches both running devices; what the second one sends, bob sees from @alice and
/// the laptop shows as hers; the devices list and bob's note say what the chain says.
#[tokio::test]
async fn two_running_devices_and_a_paper_key_share_one_conversation() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (laptop, bob) = alice_and_bob(&url).await;
    let words = paper_words(&laptop).await;

    let desk = Person::new();
    let recovered = recover(&desk, &url, &words, &["--name", "desk"]).await;
    let said = String::from_utf8_lossy(&recovered.stderr);
    assert!(recovered.status.success(), "{said}");
    let out = String::from_utf8_lossy(&recovered.stdout);
    assert!(
        out.contains("This home is now @alice@kez.test, device desk"),
        "{out}"
    );
    let devices = desk.json(&["devices"]).await;
    let names: Vec<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|device| device["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["primary", "paper1", "desk"]);
    assert_eq!(devices["this_device"], devices["devices"][2]["key"]);
    assert_eq!(
        laptop.json(&["devices"]).await["devices"],
        devices["devices"]
    );
    let me = desk.json(&["whoami"]).await;
    assert_eq!(me["handle"], "@alice@kez.test");
    assert_eq!(
        me["key"], devices["devices"][0]["key"],
        "the identity stays the first key"
    );
    assert_eq!(me["device"], devices["devices"][2]["key"]);
    // Only the device that holds the identity's key can move it (PROTOCOL.md §14.6).
    let refused = desk
        .fails(&["move", "--server", "nats://127.0.0.1:1"], 2)
        .await;
    assert!(
        refused.contains("Run `kez-chat move` on the device that holds that first key"),
        "{refused}"
    );

    // The new device writes first: bob pinned alice before it existed, and learns it from
    // alice's chain when its message arrives.
    desk.ok(&["send", "@bob", "hello from my desk"]).await;
    let read = bob.json(&["inbox", "--wait", "2"]).await;
    assert_eq!(read.as_array().unwrap().len(), 1, "{read}");
    assert_eq!(read[0]["text"], "hello from my desk");
    assert_eq!(read[0]["from_handle"], "@alice@kez.test");
    assert_eq!(read[0]["in_contacts"], true);
    assert_eq!(read[0]["from"], devices["devices"][2]["key"]);
    // The laptop shows it as its own, sent to bob.
    let mine = laptop.ok(&["inbox", "--wait", "2"]).await;
    assert!(
        mine.contains("you → @bob@kez.test: hello from my desk"),
        "{mine}"
    );
    let history = laptop.ok(&["history", "@bob"]).await;
    assert!(history.contains("you: hello from my desk"), "{history}");
    let seen = laptop.json(&["devices"]).await;
    assert!(
        seen["devices"][2]["last_seen"].is_u64(),
        "the desk wrote: {seen}"
    );
    assert!(
        seen["devices"][1]["last_seen"].is_null(),
        "the paper never writes: {seen}"
    );
    let listed = laptop.ok(&["devices"]).await;
    assert!(listed.contains("added at link 5, last seen 20"), "{listed}");

    // bob's reply reaches both running devices (the paper key gets nothing: it is paper).
    let sent = bob.run(&["send", "@alice", "hi, both of you"]).await;
    assert!(sent.status.success());
    let said = String::from_utf8_lossy(&sent.stderr);
    assert!(
        !said.contains("did not get it"),
        "every device took it: {said}"
    );
    for device in [&laptop, &desk] {
        let read = device.json(&["inbox", "--wait", "2"]).await;
        assert_eq!(read.as_array().unwrap().len(), 1, "{read}");
        assert_eq!(read[0]["text"], "hi, both of you");
        assert_eq!(read[0]["from_handle"], "@bob@kez.test");
    }
    // Each shows the same conversation, in the same words.
    let on_desk = desk.json(&["history", "@bob"]).await;
    let on_laptop = laptop.json(&["history", "@bob"]).await;
    let texts = |history: &serde_json::Value| -> Vec<(String, String)> {
        history
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["direction"].to_string(), m["text"].to_string()))
            .collect()
    };
    assert_eq!(texts(&on_desk), texts(&on_laptop));
    assert_eq!(on_desk[0]["id"], on_laptop[0]["id"], "one message, one id");

    // Each device names its own file node in the chain; listening again appends nothing.
    stop(serving(&desk).await).await;
    let endpoints = |profile: serde_json::Value| -> Vec<String> {
        profile["sigchain"]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|endpoint| endpoint["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let profile = desk.json(&["profile", "@alice"]).await;
    let seq = profile["sigchain"]["seq"].clone();
    assert_eq!(endpoints(profile), ["iroh", "iroh.desk", "nats"]);
    stop(serving(&laptop).await).await;
    stop(serving(&desk).await).await;
    assert_eq!(
        desk.json(&["profile", "@alice"]).await["sigchain"]["seq"],
        seq
    );

    // A contact that pins alice again hears of the devices as a note, not a key change.
    let carol = Person::new();
    carol.register(&url, "carol").await;
    carol.ok(&["add", "@alice"]).await;
    desk.ok(&["device", "revoke", "paper1"]).await;
    let sent = carol.run(&["send", "@alice", "still you?"]).await;
    let said = String::from_utf8_lossy(&sent.stderr);
    assert!(sent.status.success(), "{said}");
    assert!(
        said.contains("note: @alice@kez.test revoked the device paper1 (paper,"),
        "{said}"
    );
}

/// The laptop is lost: the paper key makes a fresh home a device and revokes the laptop there
/// and then. Wrong words change nothing; the laptop's key is refused from then on and receives
/// nothing more; the new device reads what comes next.
#[tokio::test]
async fn recovery_from_the_paper_key_revokes_the_lost_device() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let laptop = Person::new();
    let bob = Person::new();
    laptop.register(&url, "alice").await;
    bob.register(&url, "bob").await;
    let words = paper_words(&laptop).await;
    let before = laptop.json(&["devices"]).await;

    let phone = Person::new();
    // One word wrong: the checksum fails, nothing is written, the home stays unregistered.
    let mut wrong: Vec<&str> = words.split(' ').collect();
    wrong[3] = if wrong[3] == "abandon" {
        "ability"
    } else {
        "abandon"
    };
    let refused = recover(&phone, &url, &wrong.join(" "), &["--revoke", "primary"]).await;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("that is not your paper key"), "{said}");
    assert!(said.contains("nothing changed"), "{said}");
    assert_eq!(laptop.json(&["devices"]).await, before);
    phone.fails(&["whoami"], 2).await;
    // A device name the chain does not have: refused before anything is appended.
    let refused = recover(&phone, &url, &words, &["--revoke", "tablet"]).await;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{said}");
    assert!(said.contains("no active device named tablet"), "{said}");
    assert_eq!(laptop.json(&["devices"]).await, before);

    let recovered = recover(
        &phone,
        &url,
        &words,
        &["--name", "phone", "--revoke", "primary"],
    )
    .await;
    let said = String::from_utf8_lossy(&recovered.stderr);
    assert!(recovered.status.success(), "{said}");
    assert!(said.contains("revoked primary"), "{said}");
    let devices = phone.json(&["devices"]).await;
    let listed = devices["devices"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0]["name"], "primary");
    assert_eq!(listed[0]["active"], false, "the lost laptop is revoked");
    assert_eq!(listed[2]["name"], "phone");
    assert_eq!(listed[2]["active"], true);

    // The lost laptop's key is refused; the new device gets what bob sends now.
    let err = laptop.fails(&["inbox"], 5).await;
    assert!(err.contains("revoked from your sigchain"), "{err}");
    let sent = bob.run(&["send", "@alice", "welcome back"]).await;
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let read = phone.json(&["inbox", "--wait", "2"]).await;
    assert_eq!(read.as_array().unwrap().len(), 1, "{read}");
    assert_eq!(read[0]["text"], "welcome back");
    assert_eq!(
        read[0]["in_contacts"], false,
        "bob is no contact of this home yet"
    );
    // The phone is alice now: it sends as her, and bob sees @alice.
    phone.ok(&["send", "@bob", "it is me, on my phone"]).await;
    let read = bob.json(&["inbox", "--wait", "2"]).await;
    assert_eq!(read[0]["from_handle"], "@alice@kez.test");
    // Someone who never added alice sees the handle her chain proves for the device.
    let carol = Person::new();
    carol.register(&url, "carol").await;
    phone.ok(&["send", "@carol", "hello stranger"]).await;
    let read = carol.json(&["inbox", "--wait", "2"]).await;
    assert_eq!(read[0]["from_handle"], "@alice@kez.test", "{read}");
    assert_eq!(read[0]["in_contacts"], false);
    // The home was never registered under its own key, and register says so.
    let err = phone
        .fails(
            &["--server", &url, "register", "phone", "--no-paper-key"],
            4,
        )
        .await;
    assert!(err.contains("is a device of @alice@kez.test"), "{err}");
}

/// Shared files follow the devices: what bob publishes for alice opens on each of her devices,
/// and a manifest her second device publishes is hers to bob (any active device may sign it).
#[tokio::test]
async fn published_files_open_on_every_device_and_any_device_publishes() {
    let pin_dir = tempfile::tempdir().unwrap();
    let stack = CalloutStack::start_pinning(&pin_dir.path().join("pin")).await;
    let url = stack.nats.url();
    let (laptop, bob) = alice_and_bob(&url).await;
    let words = paper_words(&laptop).await;
    let desk = Person::new();
    let recovered = recover(&desk, &url, &words, &["--name", "desk"]).await;
    assert!(recovered.status.success(), "{recovered:?}");

    let work = tempfile::tempdir().unwrap();
    let for_alice = work.path().join("for-alice.txt");
    std::fs::write(&for_alice, b"only alice's devices read this").unwrap();
    bob.ok(&[
        "publish",
        "--to",
        "@alice",
        "--pin",
        for_alice.to_str().unwrap(),
    ])
    .await;
    for device in [&laptop, &desk] {
        let browsed = device.json(&["browse", "@bob"]).await;
        let names: Vec<&str> = browsed["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|file| file["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["for-alice.txt"], "{browsed}");
    }

    let from_desk = work.path().join("from-the-desk.txt");
    std::fs::write(&from_desk, b"published on the second device").unwrap();
    desk.ok(&["publish", "--public", "--pin", from_desk.to_str().unwrap()])
        .await;
    let browsed = bob.json(&["browse", "@alice"]).await;
    assert_eq!(
        browsed["files"][0]["name"], "from-the-desk.txt",
        "{browsed}"
    );
    let saved = work.path().join("downloaded.txt");
    bob.ok(&[
        "download",
        "@alice/from-the-desk.txt",
        "-o",
        saved.to_str().unwrap(),
    ])
    .await;
    assert_eq!(
        std::fs::read(&saved).unwrap(),
        b"published on the second device"
    );
}

/// Two devices of alice change her chain at the same moment: each revokes another paper key.
/// Whichever appends second finds the head moved (a 409) and makes its link again on
/// the new head, so both revocations land and neither command fails.
#[tokio::test]
async fn two_devices_appending_at_once_both_succeed() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (laptop, _bob) = alice_and_bob(&url).await;
    let words = paper_words(&laptop).await;
    let desk = Person::new();
    let recovered = recover(&desk, &url, &words, &["--name", "desk"]).await;
    assert!(
        recovered.status.success(),
        "{}",
        String::from_utf8_lossy(&recovered.stderr)
    );
    for round in 0..2 {
        let (first, second) = (format!("spare{round}a"), format!("spare{round}b"));
        for name in [&first, &second] {
            type_back_a_paper_key(&laptop, &["paperkey", "--name", name]).await;
        }
        let (revoke_first, revoke_second) = (
            ["device", "revoke", first.as_str()],
            ["device", "revoke", second.as_str()],
        );
        let (from_laptop, from_desk) =
            tokio::join!(laptop.run(&revoke_first), desk.run(&revoke_second));
        for (who, output) in [("laptop", from_laptop), ("desk", from_desk)] {
            assert!(
                output.status.success(),
                "round {round}: the {who}'s revocation failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let devices = laptop.json(&["devices"]).await;
        for name in [&first, &second] {
            let device = devices["devices"]
                .as_array()
                .unwrap()
                .iter()
                .find(|device| device["name"] == name.as_str())
                .unwrap_or_else(|| panic!("{name} is not listed: {devices}"));
            assert_eq!(device["active"], false, "{name}: {device}");
        }
    }
}
