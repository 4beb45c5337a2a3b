//! What people expect of a chat (issue 22, PROTOCOL.md §8.6), through the CLI and the services
//! of two homes on a real stack: delivery and read receipts (and turning read receipts off),
//! edits, deletes for everyone, reactions, replies, disappearing messages; an edit of someone
//! else's message refused by the CLI, and one forged with the library refused by the recipient.

use std::future::Future;
use std::time::Duration;

use kez_core::chat::{ChatContent, Edit};
use kez_core::envelope::MessageId;
use kez_tests::callout::CalloutStack;
use kez_tests::kez_server::test_handle;
use kez_tests::person::{alice_and_bob, key_of};
use serde_json::Value;

/// Waits (up to 20 s) until `check` holds for what `read` answers; panics with the last answer.
async fn until<F, Fut>(what: &str, mut read: F, check: impl Fn(&Value) -> bool) -> Value
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Value>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let value = read().await;
        if check(&value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never; last {value:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The message with `id` in `history`.
fn message<'a>(history: &'a Value, id: &str) -> &'a Value {
    history
        .as_array()
        .unwrap()
        .iter()
        .find(|message| message["id"] == id)
        .unwrap_or_else(|| panic!("no message {id} in {history:#}"))
}

#[tokio::test]
async fn receipts_edits_deletes_reactions_and_replies_between_two_people() {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let id = alice
        .ok(&["send", "@bob", "hello bob"])
        .await
        .trim()
        .to_owned();

    // Delivered once bob's service stored it; read once bob looked at it.
    let history = until(
        "delivered",
        || alice.json(&["history", "@bob"]),
        |history| message(history, &id)["delivered"] == true,
    )
    .await;
    assert_eq!(message(&history, &id)["read"], false, "not read yet");
    bob.ok(&["history", "@alice"]).await;
    let history = until(
        "read",
        || alice.json(&["history", "@bob"]),
        |history| message(history, &id)["read"] == true,
    )
    .await;
    assert!(
        alice
            .ok(&["history", "@bob"])
            .await
            .contains("hello bob ✓✓"),
        "{history:#}"
    );

    // Edits: the sender's, shown everywhere; not the peer's (refused before anything is sent).
    alice
        .ok(&["edit", "@bob", &id[..6], "hello bob, edited"])
        .await;
    let seen = until(
        "the edit",
        || bob.json(&["history", "@alice"]),
        |history| message(history, &id)["edited"] == true,
    )
    .await;
    assert_eq!(message(&seen, &id)["text"], "hello bob, edited");
    let refused = bob.fails(&["edit", "@alice", &id, "my words now"], 5).await;
    assert!(
        refused.contains("not_the_sender") || refused.contains("sender"),
        "{refused}"
    );
    assert!(refused.contains("nothing was sent"), "{refused}");

    // Reactions and replies.
    bob.ok(&["react", "@alice", &id, "👍"]).await;
    let reply = bob
        .ok(&["reply", "@alice", &id, "yes, it is me"])
        .await
        .trim()
        .to_owned();
    let history = until(
        "the reaction and the reply",
        || alice.json(&["history", "@bob"]),
        |history| {
            message(history, &id)["reactions"]["👍"]
                .as_array()
                .is_some_and(|by| by.len() == 1)
                && history.as_array().unwrap().iter().any(|m| m["id"] == reply)
        },
    )
    .await;
    assert_eq!(message(&history, &reply)["reply_to"], id.as_str());
    assert_eq!(message(&history, &reply)["text"], "yes, it is me");
    // The conversation list shows the reply as the last message, by its text.
    let conversations = alice.json(&["history"]).await;
    assert_eq!(
        conversations[0]["last"]["text"], "yes, it is me",
        "{conversations}"
    );
    let lines = alice.ok(&["history", "@bob", "--ids"]).await;
    assert!(
        lines.contains(&format!("(reply to {})", &id[..8])),
        "{lines}"
    );
    assert!(
        lines.contains("[👍 1]") && lines.contains("(edited)"),
        "{lines}"
    );

    // Delete for everyone: the text is gone on both sides.
    alice.ok(&["delete", "@bob", &id]).await;
    let seen = until(
        "the deletion",
        || bob.json(&["history", "@alice"]),
        |history| message(history, &id)["deleted"] == true,
    )
    .await;
    assert_eq!(message(&seen, &id)["text"], "");
    assert!(!bob.ok(&["search", "edited"]).await.contains("hello bob"));

    // Read receipts off: bob reads, alice never hears it; delivery still is.
    bob.ok(&["settings", "read-receipts", "off"]).await;
    let quiet = alice
        .ok(&["send", "@bob", "are you there?"])
        .await
        .trim()
        .to_owned();
    until(
        "delivered",
        || alice.json(&["history", "@bob"]),
        |history| message(history, &quiet)["delivered"] == true,
    )
    .await;
    bob.ok(&["history", "@alice"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        message(&alice.json(&["history", "@bob"]).await, &quiet)["read"],
        false
    );
}

/// An edit of alice's message that bob's key signs (bob's own client would refuse to send it):
/// alice's devices refuse it and keep the text.
#[tokio::test]
async fn a_forged_edit_of_someone_elses_message_is_refused() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let id = alice
        .ok(&["send", "@bob", "my own words"])
        .await
        .trim()
        .to_owned();
    let scratch = tempfile::tempdir().unwrap();
    let store = kez_client::Store::open(scratch.path().join("store.redb")).unwrap();
    let conn = kez_client::Connection::connect(&url, key_of(&bob))
        .await
        .unwrap();
    let alice_contact = conn
        .verify_contact(&store, &test_handle("@alice"))
        .await
        .unwrap()
        .contact;
    let forged = ChatContent::Edit(Edit {
        id: id.parse::<MessageId>().unwrap(),
        text: "words alice never wrote".into(),
    });
    conn.send(
        &alice_contact,
        forged.content_type(),
        &forged.encode().unwrap(),
    )
    .await
    .unwrap();
    let marker = alice.ok(&["send", "@bob", "after the forgery"]).await;
    assert!(!marker.is_empty());
    // bob's answer arrives after the forgery: by then alice's service received it. (It
    // stores a batch before it applies the batch's changes, so the refusal may come a moment
    // after the answer shows.)
    bob.ok(&["send", "@alice", "back"]).await;
    until(
        "bob's answer",
        || alice.json(&["history", "@bob"]),
        |history| {
            history
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["text"] == "back")
        },
    )
    .await;
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        while !alice.service_log().contains("refusing a change") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "{}", alice.service_log());
    let history = alice.json(&["history", "@bob"]).await;
    assert_eq!(message(&history, &id)["text"], "my own words");
    assert_eq!(message(&history, &id)["edited"], false);
}

/// A conversation's timer: messages sent after it disappear from both homes once it runs out.
#[tokio::test]
async fn disappearing_messages_are_purged_on_both_sides() {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let kept = alice
        .ok(&["send", "@bob", "before the timer"])
        .await
        .trim()
        .to_owned();
    // Times are whole seconds: the timer applies from its own second on.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    alice.ok(&["timer", "@bob", "2s"]).await;
    let gone = alice
        .ok(&["send", "@bob", "this one disappears"])
        .await
        .trim()
        .to_owned();
    let has = |history: &Value, id: &str| history.as_array().unwrap().iter().any(|m| m["id"] == id);
    until(
        "bob receives it",
        || bob.json(&["history", "@alice"]),
        |history| has(history, &gone),
    )
    .await;
    for (person, peer) in [(&alice, "@bob"), (&bob, "@alice")] {
        let history = until(
            "the purge",
            || async move { person.json(&["history", peer]).await },
            |history| {
                let ids: Vec<&str> = history
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["id"].as_str().unwrap())
                    .collect();
                ids.contains(&kept.as_str()) && !ids.contains(&gone.as_str())
            },
        )
        .await;
        assert!(!history.to_string().contains("this one disappears"));
    }
}

/// Typing and presence are opt-in live notices: `listen` shows them; nothing is stored.
#[tokio::test]
async fn typing_and_presence_show_in_listen_when_turned_on() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let refused = alice.fails(&["typing", "@bob"], 2).await;
    assert!(refused.contains("settings typing on"), "{refused}");
    alice.ok(&["settings", "typing", "on"]).await;
    alice.ok(&["settings", "presence", "on"]).await;

    let mut listen =
        tokio::process::Command::from(kez_tests::person::kez_chat(&bob.home, &["listen"]));
    listen
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut listen = listen.spawn().unwrap();
    let mut lines = BufReader::new(listen.stderr.take().unwrap()).lines();
    let mut expect = async |wanted: &str| {
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains(wanted) {
                    return;
                }
            }
            panic!("listen ended before {wanted:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no {wanted:?} within 20 s"));
    };
    expect("listening as @bob").await;
    // Live notices reach a subscription made now, so say it until it is heard.
    let typing = async {
        loop {
            alice.ok(&["typing", "@bob"]).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        () = expect("@alice@kez.test is typing") => {}
        () = typing => unreachable!(),
    }
    // alice's service starting again says she is online (presence on).
    alice.stop_service().await;
    alice.ok(&["contacts"]).await;
    expect("@alice@kez.test is online").await;
    let stored = bob.json(&["history", "@alice"]).await;
    assert!(
        !stored.to_string().contains("kez.typing") && !stored.to_string().contains("kez.presence"),
        "{stored:#}"
    );
}

/// A display name (and picture) comes only from the identity's own signed message, and is
/// shown beside the handle, never instead of it; a later one replaces it.
#[tokio::test]
async fn a_display_name_is_what_the_identity_said_itself() {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let work = tempfile::tempdir().unwrap();
    let png = work.path().join("me.png");
    let mut picture = b"\x89PNG\r\n\x1a\n".to_vec();
    picture.extend([7u8; 200]);
    std::fs::write(&png, &picture).unwrap();
    let not_a_picture = work.path().join("me.txt");
    std::fs::write(&not_a_picture, "hello").unwrap();
    let refused = alice
        .fails(
            &["name", "Alice", "--avatar", not_a_picture.to_str().unwrap()],
            2,
        )
        .await;
    assert!(refused.contains("not a PNG, JPEG or WebP"), "{refused}");
    let refused = alice.fails(&["name", "@bob@kez.test\nfake"], 2).await;
    assert!(refused.contains("cannot use that"), "{refused}");
    alice
        .ok(&["name", "Alice Liddell", "--avatar", png.to_str().unwrap()])
        .await;
    let own = alice.json(&["whoami"]).await;
    assert_eq!(own["display_name"], "Alice Liddell", "{own}");
    let contacts = until(
        "the name",
        || bob.json(&["contacts"]),
        |contacts| contacts[0]["display_name"] == "Alice Liddell",
    )
    .await;
    assert_eq!(contacts[0]["handle"], "@alice@kez.test");
    assert_eq!(contacts[0]["avatar"]["type"], "image/png");
    assert_eq!(contacts[0]["avatar"]["bytes"], picture.len());
    let lines = bob.ok(&["contacts"]).await;
    assert!(lines.starts_with("@alice@kez.test  ed25519:"), "{lines}");
    assert!(lines.contains("\"Alice Liddell\""), "{lines}");
    let profile = bob.ok(&["profile", "@alice"]).await;
    assert!(
        profile.contains("name        \"Alice Liddell\", with a picture"),
        "{profile}"
    );
    alice.ok(&["name", "Alice L."]).await;
    until(
        "the new name",
        || bob.json(&["contacts"]),
        |contacts| contacts[0]["display_name"] == "Alice L.",
    )
    .await;
}

/// With `settings notifications on`, the service shows each arriving message through the
/// platform's notifier (`notify-send`; here a stand-in that records what it was asked to
/// show), with the peer's text made safe to display.
#[tokio::test]
async fn a_message_arriving_is_a_desktop_notification_when_turned_on() {
    use std::os::unix::fs::PermissionsExt;
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let bin = tempfile::tempdir().unwrap();
    let shown = bin.path().join("shown");
    let notifier = bin.path().join("notify-send");
    std::fs::write(
        &notifier,
        format!(
            "#!/bin/sh\nprintf '%s|' \"$@\" >> '{}'\necho >> '{}'\n",
            shown.display(),
            shown.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&notifier, std::fs::Permissions::from_mode(0o755)).unwrap();
    bob.ok(&["settings", "notifications", "on"]).await;
    // bob's service again, started by a command that finds the notifier on its PATH.
    bob.stop_service().await;
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut contacts = kez_tests::person::kez_chat(&bob.home, &["contacts"]);
    contacts.env("PATH", path);
    let started = kez_tests::callout::run_to_completion(contacts).await;
    assert!(started.status.success(), "{started:?}");
    alice.ok(&["send", "@bob", "ring ring\u{202e}gnir"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let recorded = loop {
        let recorded = std::fs::read_to_string(&shown).unwrap_or_default();
        if !recorded.is_empty() || tokio::time::Instant::now() >= deadline {
            break recorded;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(recorded.contains("--app-name=kez-chat"), "{recorded:?}");
    assert!(recorded.contains("@alice@kez.test|"), "{recorded:?}");
    assert!(recorded.contains("ring ring"), "{recorded:?}");
    assert!(
        !recorded.contains('\u{202e}'),
        "bidi controls escaped: {recorded:?}"
    );
}

/// The same across devices: alice on her laptop and on a desk recovered from her paper key.
/// bob's edit reaches both; the laptop's reaction reaches bob and, as a sent copy, the desk;
/// the desk reading tells bob it was read.
#[tokio::test]
async fn edits_reactions_and_receipts_reach_every_device() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (laptop, bob) = alice_and_bob(&url).await;
    let (words, _) = kez_tests::person::type_back_a_paper_key(&laptop, &["paperkey"]).await;
    let desk = kez_tests::person::Person::new();
    let recovered = desk
        .run_with_stdin(
            &["--server", &url, "recover", "@alice", "--name", "desk"],
            &format!("{}\n", words.join(" ")),
        )
        .await;
    assert!(recovered.status.success(), "{recovered:?}");
    desk.ok(&["add", "@bob"]).await;

    let id = bob
        .ok(&["send", "@alice", "to both of you"])
        .await
        .trim()
        .to_owned();
    bob.ok(&["edit", "@alice", &id, "to both of you, edited"])
        .await;
    for device in [&laptop, &desk] {
        let seen = until(
            "the edit on every device",
            || device.json(&["history", "@bob"]),
            |history| {
                history.as_array().unwrap().iter().any(|m| m["id"] == id)
                    && message(history, &id)["edited"] == true
            },
        )
        .await;
        assert_eq!(message(&seen, &id)["text"], "to both of you, edited");
    }
    laptop.ok(&["react", "@bob", &id, "🎉"]).await;
    for (who, person, peer) in [("bob", &bob, "@alice"), ("the desk", &desk, "@bob")] {
        until(
            &format!("the reaction at {who}"),
            || async move { person.json(&["history", peer]).await },
            |history| {
                message(history, &id)["reactions"]["🎉"]
                    .as_array()
                    .is_some_and(|by| by.len() == 1)
            },
        )
        .await;
    }
    // Read on the desk: bob hears it (his message shows ✓✓).
    until(
        "read",
        || async {
            desk.ok(&["history", "@bob"]).await;
            bob.json(&["history", "@alice"]).await
        },
        |history| message(history, &id)["read"] == true,
    )
    .await;
}
