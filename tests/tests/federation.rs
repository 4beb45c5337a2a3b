//! Federation end to end (PROTOCOL.md §14): two home servers on loopback, `a.localhost` and
//! `b.localhost`, each a real nats-server with the callout and a real kez-chat-server, found
//! through each other's WebFinger; people use the `kez-chat` binary in their own homes; files
//! go over iroh on loopback.

use std::sync::Arc;
use std::time::Duration;

use kez_chat_server::limits::Rate;
use kez_core::envelope::{self, MessageId};
use kez_core::sigchain::Endpoint;
use kez_core::{Op, PublicKey, SecretKey, UnsignedLink};
use kez_proto::federation::RelayRequest;
use kez_proto::mail::SendRequest;
use kez_tests::federation::{Federation, eventually, federation_of, fetch_one};
use kez_tests::kez_server::call;
use kez_tests::person::{Person, plaintext_file, serving, stop};
use serde_json::Value;

const A: &str = "a.localhost";
const B: &str = "b.localhost";

async fn registered(url: &str, name: &str) -> Person {
    let person = Person::new();
    person.register(url, name).await;
    person
}

/// The texts of `person`'s conversation with `handle`, as `history --json` lists them.
async fn texts(person: &Person, handle: &str) -> Vec<String> {
    let history = person.json(&["history", handle]).await;
    history
        .as_array()
        .unwrap_or_else(|| panic!("{history}"))
        .iter()
        .filter_map(|message| message["text"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until `person`'s inbox brings a message whose text is `text` from another server
/// (a broker that was just restarted refuses logins until its home server is back: asked again).
async fn arrives(person: &Person, handle: &str, text: &str) {
    eventually(Duration::from_secs(30), text, || async {
        person.run(&["inbox"]).await;
        texts(person, handle)
            .await
            .iter()
            .any(|got| got == text)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn people_on_two_servers_chat_share_files_and_browse_each_other() {
    let federation = Federation::start().await;
    let (a, b) = (federation.home(A), federation.home(B));
    let alice = registered(&a.url(), "alice").await;
    let bob = registered(&b.url(), "bob").await;

    // alice finds bob on his server through hers: profile, key and chain verified by her client.
    let profile = alice.json(&["profile", "@bob@b.localhost"]).await;
    assert_eq!(profile["handle"], "@bob@b.localhost", "{profile}");
    alice.ok(&["add", "@bob@b.localhost"]).await;
    alice
        .ok(&["send", "@bob@b.localhost", "hello from a"])
        .await;

    // bob has not added alice: the message arrives from a stranger his client names by asking
    // her server (through his), and whose chain it verified.
    let inbox = bob.json(&["inbox", "--wait", "30"]).await;
    assert_eq!(inbox[0]["text"], "hello from a", "{inbox}");
    assert_eq!(inbox[0]["from_handle"], "@alice@a.localhost", "{inbox}");
    assert_eq!(inbox[0]["in_contacts"], false, "{inbox}");
    bob.ok(&["add", "@alice@a.localhost"]).await;
    assert_eq!(texts(&bob, "@alice@a.localhost").await, ["hello from a"]);

    // And back.
    bob.ok(&["send", "@alice@a.localhost", "hi from b"]).await;
    arrives(&alice, "@bob@b.localhost", "hi from b").await;

    // Offline delivery across servers: bob's client is not running while alice writes.
    bob.stop_service().await;
    alice
        .ok(&["send", "@bob@b.localhost", "while you were away"])
        .await;
    arrives(&bob, "@alice@a.localhost", "while you were away").await;

    // A file across: the offer goes through both servers, the bytes peer to peer over iroh.
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("across.bin");
    plaintext_file(&original, 2 * 1024 * 1024);
    let offer = alice
        .ok(&[
            "share",
            "--no-wait",
            "@bob@b.localhost",
            original.to_str().unwrap(),
        ])
        .await
        .trim()
        .to_owned();
    let listening = serving(&alice).await;
    let got = work.path().join("got.bin");
    eventually(Duration::from_secs(30), "the offer", || async {
        bob.ok(&["inbox"]).await;
        bob.ok(&["files"])
            .await
            .contains("across.bin")
            .then_some(())
    })
    .await;
    bob.ok(&["download", &offer, "-o", got.to_str().unwrap()])
        .await;
    assert!(std::fs::read(&got).unwrap() == std::fs::read(&original).unwrap());

    // A manifest browsed across: alice publishes; bob browses her files and downloads one.
    let public = work.path().join("notes.txt");
    std::fs::write(&public, "public notes from a").unwrap();
    alice
        .ok(&["publish", "--public", public.to_str().unwrap()])
        .await;
    let browsed = bob.json(&["browse", "@alice@a.localhost"]).await;
    assert_eq!(browsed["files"][0]["name"], "notes.txt", "{browsed}");
    let got_notes = work.path().join("got-notes.txt");
    bob.ok(&[
        "download",
        "@alice@a.localhost/notes.txt",
        "-o",
        got_notes.to_str().unwrap(),
    ])
    .await;
    assert_eq!(
        std::fs::read_to_string(&got_notes).unwrap(),
        "public notes from a"
    );
    stop(listening).await;
}

#[tokio::test]
async fn mail_for_a_server_that_is_down_waits_and_bounces_after_the_bound() {
    let mut federation = Federation::start_with(&[A, B], |_, config| {
        let federation = federation_of(config);
        federation.bounce_after = Duration::from_secs(8);
        federation.retry_max = Duration::from_secs(1);
    })
    .await;
    let alice = registered(&federation.home(A).url(), "alice").await;
    let bob = registered(&federation.home(B).url(), "bob").await;
    alice.ok(&["add", "@bob@b.localhost"]).await;
    bob.ok(&["add", "@alice@a.localhost"]).await;
    // A first message needs a prekey from b's key service (a forward-secret session): never
    // sealed without one while b is down. They have talked, so the session is there.
    alice.ok(&["send", "@bob@b.localhost", "hello b"]).await;
    arrives(&bob, "@alice@a.localhost", "hello b").await;
    let carol = registered(&federation.home(B).url(), "carol").await;
    alice.ok(&["add", "@carol@b.localhost"]).await;

    // b's broker is down: alice's server keeps the message and delivers it when b is back.
    federation.home_mut(B).nats.stop();
    // To carol, with whom alice has no session yet, nothing is sent: it would not be forward
    // secret. The error says why and what to do.
    let refused = alice
        .run(&["send", "@carol@b.localhost", "first words"])
        .await;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("cannot start a forward-secret session") && said.contains("try again later"),
        "{said}"
    );
    drop(carol);
    alice
        .ok(&["send", "@bob@b.localhost", "sent while b was down"])
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    federation.home_mut(B).nats.resume();
    arrives(&bob, "@alice@a.localhost", "sent while b was down").await;

    // Down for longer than the bound: the message comes back to alice as a bounce, shown in
    // the conversation, and bob never gets it.
    federation.home_mut(B).nats.stop();
    alice
        .ok(&["send", "@bob@b.localhost", "lost to the outage"])
        .await;
    let shown = eventually(Duration::from_secs(40), "the bounce", || async {
        alice.ok(&["inbox"]).await;
        let history = alice.ok(&["history", "@bob@b.localhost"]).await;
        history.contains("not delivered").then_some(history)
    })
    .await;
    assert!(
        shown.contains("⚠ not delivered to @bob@b.localhost"),
        "{shown}"
    );
    assert!(shown.contains("expired"), "{shown}");
    federation.home_mut(B).nats.resume();
    eventually(Duration::from_secs(30), "b back", || async {
        bob.run(&["inbox"]).await.status.success().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    bob.ok(&["inbox"]).await;
    assert!(
        !texts(&bob, "@alice@a.localhost")
            .await
            .contains(&"lost to the outage".to_owned()),
        "a bounced message is not delivered late"
    );
}

#[tokio::test]
async fn a_peer_that_lies_about_its_domain_is_refused() {
    let federation = Federation::start().await;
    let b = federation.home(B);
    let a_key = Arc::new(federation.home(A).server_key());
    // A stranger's key claiming to be a.localhost: a's WebFinger names another key.
    let impostor = Arc::new(SecretKey::generate());
    assert!(b.connect_as_peer(&impostor, A).await.is_err());
    // a's own key claiming another domain: that domain's WebFinger does not vouch for it.
    assert!(b.connect_as_peer(&a_key, "c.localhost").await.is_err());
    // a's key as a.localhost: admitted, and may only use the federation subjects.
    let (peer, _) = b.connect_as_peer(&a_key, A).await.expect("a is a peer");
    let info = call(&peer, "kez.server.info", b"{}".to_vec())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&info).contains(B));
    // A changed key for a.localhost afterwards is refused: the pin holds.
    assert!(b.connect_as_peer(&impostor, A).await.is_err());
}

#[tokio::test]
async fn a_flooding_peer_is_limited_and_other_peers_are_not() {
    let federation = Federation::start_with(&[A, B, "c.localhost"], |domain, config| {
        if domain == B {
            federation_of(config).peer_limits.messages = Rate::new(1.0, 10);
        }
    })
    .await;
    let b = federation.home(B);
    let bob = registered(&b.url(), "bob").await;
    let bob_key = kez_tests::person::key_of(&bob).public_key();
    let peer_of = |domain: &str| Arc::new(federation.home(domain).server_key());
    let (flooder, _) = b.connect_as_peer(&peer_of(A), A).await.unwrap();
    let mut limited = 0;
    for _ in 0..30 {
        let frame = SendRequest::encode(&bob_key, &MessageId::random(), b"flood");
        match call(&flooder, "kez.mail.deliver", frame).await {
            Ok(_) => {}
            Err(err) if err.name == "rate_limited" => limited += 1,
            Err(err) => panic!("{err:?}"),
        }
    }
    assert!(limited >= 15, "the flood was limited: {limited} of 30");
    let (other, _) = b
        .connect_as_peer(&peer_of("c.localhost"), "c.localhost")
        .await
        .unwrap();
    let frame = SendRequest::encode(&bob_key, &MessageId::random(), b"from c");
    call(&other, "kez.mail.deliver", frame)
        .await
        .expect("another peer is not limited by the flood");
}

#[tokio::test]
async fn an_unknown_recipient_bounces_and_a_blocked_domain_is_refused() {
    let federation = Federation::start_with(&[A, B], |domain, config| {
        if domain == A {
            federation_of(config).deny = vec!["blocked.localhost".to_owned()];
        }
    })
    .await;
    let a = federation.home(A);
    let (alice_key, alice) = a.registered("alice").await;
    // To a key b does not know: relayed, then bounced by a's server into alice's inbox.
    let nobody = SecretKey::generate().public_key();
    let id = MessageId::random();
    let frame = SendRequest::encode(&nobody, &id, b"sealed");
    call(&alice, "kez.mail.relay", RelayRequest::encode(B, &frame))
        .await
        .expect("queued");
    let bounce = eventually(Duration::from_secs(30), "the bounce", || async {
        fetch_one(&alice, &alice_key).await
    })
    .await;
    assert_eq!(
        bounce.from,
        a.server_key().public_key(),
        "sealed by alice's own server"
    );
    assert_eq!(bounce.content_type, "kez.bounce");
    let body: Value = serde_json::from_slice(&bounce.body).unwrap();
    assert_eq!(body["reason"], "unknown_recipient", "{body}");
    assert_eq!(body["domain"], B);

    // A domain its operator denies: refused at once, for lookups and mail.
    let err = call(
        &alice,
        "kez.registry.lookup",
        br#"{"handle":"@carol@blocked.localhost"}"#.to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.name, "domain_blocked", "{err:?}");
    let err = call(
        &alice,
        "kez.mail.relay",
        RelayRequest::encode("blocked.localhost", &frame),
    )
    .await
    .unwrap_err();
    assert_eq!(err.name, "domain_blocked", "{err:?}");
}

/// Moving house (PROTOCOL.md §14.6): alice moves from a.localhost to b.localhost with
/// `kez-chat move`; bob, who pinned her on a, follows the move when he next writes to her old
/// handle (same identity, no key-change warning, his history kept under the new handle), and
/// still reaches her once a's broker is gone.
#[tokio::test]
async fn a_person_moves_house_and_a_contact_follows() {
    let mut federation = Federation::start().await;
    let (a_url, b_url) = (federation.home(A).url(), federation.home(B).url());
    let alice = registered(&a_url, "alice").await;
    let bob = registered(&b_url, "bob").await;
    let dave = registered(&b_url, "dave").await;
    let erin = registered(&a_url, "erin").await;
    bob.ok(&["add", "@alice@a.localhost"]).await;
    dave.ok(&["add", "@alice@a.localhost"]).await;
    alice.ok(&["add", "@bob@b.localhost"]).await;
    bob.ok(&["send", "@alice@a.localhost", "before the move"])
        .await;
    arrives(&alice, "@bob@b.localhost", "before the move").await;
    let identity = alice.json(&["whoami"]).await["key"].clone();

    let moved = alice.json(&["move", "--server", &b_url]).await;
    assert_eq!(moved["from"], "@alice@a.localhost", "{moved}");
    assert_eq!(moved["handle"], "@alice@b.localhost", "{moved}");
    assert_eq!(moved["key"], identity, "{moved}");
    assert_eq!(moved["old_server_told"], true, "{moved}");
    let me = alice.json(&["whoami"]).await;
    assert_eq!(me["handle"], "@alice@b.localhost", "{me}");
    assert_eq!(me["key"], identity, "{me}");
    assert_eq!(me["server"], b_url.as_str(), "{me}");
    // Moving again to where she lives is refused as a usage error, changing nothing.
    let again = alice.fails(&["move", "--server", &b_url], 2).await;
    assert!(again.contains("nothing to move"), "{again}");

    // The old handle's chain (on a) says where she lives now.
    let profile = bob.json(&["profile", "@alice@a.localhost"]).await;
    assert_eq!(profile["moved_to"], "@alice@b.localhost", "{profile}");

    // bob writes to her old handle: his client follows the move, the same identity.
    let sent = bob
        .run(&["send", "@alice@a.localhost", "after the move"])
        .await;
    let said = String::from_utf8_lossy(&sent.stderr);
    assert!(sent.status.success(), "{said}\n{}", bob.service_log());
    assert!(
        said.contains(
            "@alice@a.localhost moved to @alice@b.localhost (same identity, sigchain verified)"
        ),
        "{said}"
    );
    assert!(!said.contains("WARNING"), "{said}");
    arrives(&alice, "@bob@b.localhost", "after the move").await;
    let contacts = bob.json(&["contacts"]).await;
    let contacts = contacts.as_array().unwrap();
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(contacts[0]["handle"], "@alice@b.localhost", "{contacts:?}");
    assert_eq!(contacts[0]["key"], identity, "{contacts:?}");
    assert_eq!(
        texts(&bob, "@alice@b.localhost").await,
        ["before the move", "after the move"],
        "the history is kept under the new handle"
    );
    let profile = bob.json(&["profile", "@alice@b.localhost"]).await;
    assert_eq!(profile["moved_to"], Value::Null, "{profile}");
    assert_eq!(profile["pinned_key"], identity, "{profile}");

    // A client that does not follow moves (one that ignores the `home` endpoint) still sends
    // to her key on a: a's server forwards it to b through its outbox.
    let (carol, carol_client) = federation.home(A).registered("carol").await;
    let first = UnsignedLink::first(
        carol.public_key(),
        kez_client::now(),
        Op::AddEndpoint(Endpoint {
            name: "nats".into(),
            kind: "nats".into(),
            address: a_url.clone(),
        }),
    )
    .sign(&carol)
    .unwrap();
    call(&carol_client, "kez.sigchain.append", first.bytes().to_vec())
        .await
        .expect("carol's first link");
    let alice_key: PublicKey = identity.as_str().unwrap().parse().unwrap();
    let (id, sealed) = envelope::seal(
        &carol,
        &alice_key,
        "text",
        b"forwarded by a",
        kez_client::now(),
    )
    .unwrap();
    let answer = call(
        &carol_client,
        "kez.mail.send",
        SendRequest::encode(&alice_key, &id, &sealed),
    )
    .await
    .expect("a takes mail for alice");
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["duplicate"], false, "{answer}");
    eventually(Duration::from_secs(30), "the forwarded message", || async {
        let inbox = alice.json(&["inbox"]).await;
        inbox
            .as_array()
            .unwrap()
            .iter()
            .any(|message| message["text"] == "forwarded by a")
            .then_some(())
    })
    .await;

    // a's broker is gone: bob reaches alice, by either handle, and she him.
    federation.home_mut(A).nats.stop();
    bob.ok(&["send", "@alice@a.localhost", "a is gone"]).await;
    arrives(&alice, "@bob@b.localhost", "a is gone").await;
    alice
        .ok(&["send", "@bob@b.localhost", "from my new home"])
        .await;
    arrives(&bob, "@alice@b.localhost", "from my new home").await;

    // dave pinned her on a and has not written since: her message from b (a is gone) makes
    // his client ask b who she is; b's copy of her chain names b as her home, so he follows.
    alice.ok(&["send", "@dave@b.localhost", "I moved"]).await;
    eventually(Duration::from_secs(30), "dave follows", || async {
        dave.ok(&["inbox"]).await;
        let contacts = dave.json(&["contacts"]).await;
        (contacts[0]["handle"] == "@alice@b.localhost").then_some(())
    })
    .await;
    assert_eq!(texts(&dave, "@alice@a.localhost").await, ["I moved"]);

    // A move needs the chain from the old server, unless the new one holds the whole move.
    let refused = erin.fails(&["move", "--server", &b_url], 1).await;
    assert!(
        refused.contains("cannot read your sigchain from your old server"),
        "{refused}"
    );
    let config: Value =
        serde_json::from_slice(&std::fs::read(erin.home.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (&config["handle"], &config["server"]),
        (&Value::from("@erin@a.localhost"), &Value::from(a_url)),
        "nothing changed in her home"
    );
}
