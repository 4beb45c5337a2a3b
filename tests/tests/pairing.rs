//! Pairing a new device through the CLI (`device join` on a fresh home, `device add` on a
//! registered one), against a real nats-server with the auth callout and a kez-chat-server:
//! the happy path (the new device is a device of the identity, has its contacts, and sends as
//! it), a hostile relay (a substituted key, an altered link, a replayed answer: nothing is
//! appended), and bad requests (changed, expired, replayed, for another identity).

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use kez_chat_server::relay::{Tamper, tamper_key};
use kez_core::pair::{Nonce, PairRequest};
use kez_core::sigchain::DeviceKind;
use kez_tests::callout::CalloutStack;
use kez_tests::person::{Person, alice_and_bob, key_of, kez_chat};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// A `device join` running in the background, and the request line it printed.
struct Joining {
    child: tokio::process::Child,
    stdout: BufReader<tokio::process::ChildStdout>,
    line: String,
}

/// Starts `device join @alice` in `person`'s fresh home and reads the request line.
async fn join(person: &Person, url: &str, extra: &[&str]) -> Joining {
    let mut args = vec!["--server", url, "device", "join", "@alice", "--wait", "90"];
    args.extend_from_slice(extra);
    let mut command = tokio::process::Command::from(kez_chat(&person.home, &args));
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
        .await
        .expect("the request within 30 s")
        .unwrap();
    if read == 0 {
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err).await;
        panic!("device join printed no request: {err}");
    }
    let line = line.trim().to_owned();
    assert!(line.starts_with("kez-pair:"), "{line}");
    Joining {
        child,
        stdout,
        line,
    }
}

impl Joining {
    /// Waits for it to end; its status, the rest of stdout, and stderr.
    async fn finish(mut self) -> (ExitStatus, String, String) {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("device join ends within 60 s")
            .unwrap();
        let mut out = String::new();
        self.stdout.read_to_string(&mut out).await.unwrap();
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            stderr.read_to_string(&mut err).await.unwrap();
        }
        (status, out, err)
    }
}

async fn seq_of(person: &Person) -> u64 {
    person.json(&["whoami"]).await["sigchain"]["seq"]
        .as_u64()
        .unwrap()
}

async fn device_keys(person: &Person) -> Vec<String> {
    person.json(&["devices"]).await["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|device| device["active"] == true)
        .map(|device| device["key"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_new_device_joins_gets_the_contacts_and_sends_as_the_identity() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let phone = Person::new();
    let joining = join(&phone, &url, &["--name", "phone", "--kind", "mobile"]).await;
    let line = joining.line.clone();
    let added = alice.run(&["device", "add", &line, "--yes"]).await;
    let said = String::from_utf8_lossy(&added.stderr);
    assert!(added.status.success(), "{said}");
    let out = String::from_utf8_lossy(&added.stdout);
    assert!(out.contains("Added device phone (mobile)"), "{out}");
    assert!(out.contains("sent it 1 contact"), "{out}");
    assert!(said.contains("fingerprint"), "{said}");
    let (status, out, err) = joining.finish().await;
    assert!(status.success(), "{err}");
    assert!(
        out.contains("This home is now device phone (mobile) of @alice@kez.test"),
        "{out}"
    );
    assert!(out.contains("1 contact copied"), "{out}");
    assert!(err.contains("Fingerprint: "), "{err}");
    let mode = std::fs::metadata(phone.home.join("key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    // Both list it, from the chain each verified.
    let phone_key = key_of(&phone).public_key().to_string();
    assert!(device_keys(&alice).await.contains(&phone_key));
    let listed = phone.json(&["devices"]).await;
    assert_eq!(listed["this_device"], phone_key.as_str());
    assert_eq!(listed["devices"].as_array().unwrap().len(), 2, "{listed}");
    // It has alice's contacts, and sends as @alice.
    let contacts = phone.json(&["contacts"]).await;
    assert_eq!(contacts[0]["handle"], "@bob@kez.test", "{contacts}");
    phone.ok(&["send", "@bob", "from", "the", "phone"]).await;
    let read = bob.ok(&["inbox", "--wait", "5"]).await;
    assert!(read.contains("@alice@kez.test: from the phone"), "{read}");
    // alice's first device shows the phone's message as her own; bob's answer reaches both.
    let mine = alice.ok(&["inbox", "--wait", "5"]).await;
    assert!(
        mine.contains("you → @bob@kez.test: from the phone"),
        "{mine}"
    );
    bob.ok(&["send", "@alice", "hi"]).await;
    for device in [&alice, &phone] {
        let read = device.json(&["inbox", "--wait", "5"]).await;
        assert_eq!(read.as_array().unwrap().len(), 1, "{read}");
        assert_eq!(read[0]["text"], "hi");
        assert_eq!(read[0]["from_handle"], "@bob@kez.test");
    }

    // The same request again, after its success: used already, nothing changes.
    let seq = seq_of(&alice).await;
    let err = alice.fails(&["device", "add", &line, "--yes"], 4).await;
    assert!(err.contains("already_used"), "{err}");
    assert_eq!(seq_of(&alice).await, seq);
}

#[tokio::test]
async fn a_hostile_relay_gets_nothing_appended() {
    for tamper in [
        Tamper::SubstituteKey,
        Tamper::AlterLink,
        Tamper::ReplayAnswer,
    ] {
        let stack =
            CalloutStack::start_configured(|config| config.pair_relay_tamper = Some(tamper)).await;
        let url = stack.nats.url();
        let alice = Person::new();
        alice.register(&url, "alice").await;
        if tamper == Tamper::ReplayAnswer {
            // The relay keeps this genuine answer and replays it to the next request.
            let first = Person::new();
            let joining = join(&first, &url, &["--name", "first"]).await;
            alice.ok(&["device", "add", &joining.line, "--yes"]).await;
            let (status, _, err) = joining.finish().await;
            assert!(status.success(), "{err}");
        }
        let seq = seq_of(&alice).await;
        let devices = device_keys(&alice).await;
        let phone = Person::new();
        let joining = join(&phone, &url, &["--name", "phone"]).await;
        let err = alice
            .fails(&["device", "add", &joining.line, "--yes"], 5)
            .await;
        let expected = match tamper {
            Tamper::SubstituteKey | Tamper::ReplayAnswer => "bad_answer_signature",
            Tamper::AlterLink => "refused",
        };
        assert!(err.contains(expected), "{tamper:?}: {err}");
        assert!(err.contains("nothing was added"), "{tamper:?}: {err}");
        assert_eq!(seq_of(&alice).await, seq, "{tamper:?}: nothing appended");
        let after = device_keys(&alice).await;
        assert_eq!(after, devices, "{tamper:?}");
        assert!(!after.contains(&tamper_key().public_key().to_string()));
        assert!(!after.contains(&key_of(&phone).public_key().to_string()));
        if tamper == Tamper::AlterLink {
            // The new device refused to counter-sign, and says so.
            let (status, _, err) = joining.finish().await;
            assert_eq!(status.code(), Some(5), "{err}");
            assert!(err.contains("refused the offer"), "{err}");
        }
    }
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let seq = seq_of(&alice).await;
    let now = kez_client::now();
    let request = PairRequest {
        identity: key_of(&alice).public_key(),
        handle: "@alice@kez.test".into(),
        device: kez_core::SecretKey::generate().public_key(),
        name: "phone".into(),
        kind: DeviceKind::Mobile,
        nonce: Nonce::random(),
        expires: now + 300,
    };
    let line = request.to_line();

    // One character changed on the way.
    let mut chars: Vec<char> = line.chars().collect();
    chars[30] = if chars[30] == 'A' { 'B' } else { 'A' };
    let changed: String = chars.into_iter().collect();
    let err = alice.fails(&["device", "add", &changed, "--yes"], 2).await;
    assert!(err.contains("checksum"), "{err}");
    let err = alice.fails(&["device", "add", "hello", "--yes"], 2).await;
    assert!(err.contains("not a pairing request"), "{err}");

    // Expired.
    let expired = PairRequest {
        expires: now - 1,
        ..request.clone()
    };
    let err = alice
        .fails(&["device", "add", &expired.to_line(), "--yes"], 2)
        .await;
    assert!(err.contains("expired"), "{err}");

    // For another identity (bob's), pasted on alice's device.
    let bobs = PairRequest {
        identity: key_of(&bob).public_key(),
        handle: "@bob@kez.test".into(),
        ..request.clone()
    };
    let err = alice
        .fails(&["device", "add", &bobs.to_line(), "--yes"], 4)
        .await;
    assert!(err.contains("wrong_identity"), "{err}");

    // Not confirmed.
    let output = alice.run_with_stdin(&["device", "add", &line], "n\n").await;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not confirmed"));

    assert_eq!(seq_of(&alice).await, seq, "nothing appended");
    assert_eq!(device_keys(&alice).await.len(), 1);
}

/// One `kez.pair.*` request; the answer's JSON, or the error's code and name.
async fn relay(
    client: &async_nats::Client,
    subject: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, (u16, String)> {
    kez_tests::kez_server::call(client, subject, serde_json::to_vec(&body).unwrap())
        .await
        .map(|answer| serde_json::from_slice(&answer).unwrap())
        .map_err(|err| (err.code, err.name))
}

#[tokio::test]
async fn the_relay_lets_each_key_touch_only_its_own_part_of_a_pairing() {
    use std::sync::Arc;

    use kez_core::SecretKey;
    use serde_json::json;

    let stack = CalloutStack::start().await;
    let (_alice, alice) = stack.registered("alice").await;
    let (_bob, bob) = stack.registered("bob").await;
    let device_key = Arc::new(SecretKey::generate());
    let (device, _) = stack.connect_as(&device_key).await.unwrap();
    let stranger_key = Arc::new(SecretKey::generate());
    let (stranger, _) = stack.connect_as(&stranger_key).await.unwrap();
    let key = device_key.public_key().to_string();
    let nonce = Nonce::random().to_hex();
    let expires = kez_client::now() + 120;
    let put = |slot: &str, data: &str| json!({"device": key, "nonce": nonce, "slot": slot, "expires": expires, "data": data});
    let get = |slot: &str| json!({"device": key, "nonce": nonce, "slot": slot});
    let refused = |code: u16, name: &str| Err((code, name.to_owned()));

    // Nothing yet; nobody but the device reads what is for it.
    assert_eq!(
        relay(&device, "kez.pair.get", get("offer")).await,
        refused(404, "not_found")
    );
    assert_eq!(
        relay(&stranger, "kez.pair.get", get("offer")).await,
        refused(403, "not_your_request")
    );
    // A key without a handle makes no offer, not even to itself.
    assert_eq!(
        relay(&device, "kez.pair.put", put("offer", "o")).await,
        refused(403, "not_your_request")
    );
    assert_eq!(
        relay(&stranger, "kez.pair.put", put("offer", "o")).await,
        refused(403, "not_registered")
    );
    // alice offers; the slot is written once (the same put again is answered as the first).
    let stored = Ok(json!({"stored": true}));
    assert_eq!(
        relay(&alice, "kez.pair.put", put("offer", "o")).await,
        stored
    );
    assert_eq!(
        relay(&alice, "kez.pair.put", put("offer", "o")).await,
        stored
    );
    assert_eq!(
        relay(&bob, "kez.pair.put", put("offer", "other")).await,
        refused(409, "slot_taken")
    );
    assert_eq!(
        relay(&device, "kez.pair.get", get("offer")).await,
        Ok(json!({"data": "o"}))
    );
    // Only the device answers, and only alice (who offered) reads the answer.
    assert_eq!(
        relay(&stranger, "kez.pair.put", put("answer", "a")).await,
        refused(403, "not_your_request")
    );
    assert_eq!(
        relay(&device, "kez.pair.put", put("answer", "a")).await,
        stored
    );
    for other in [&bob, &stranger, &device] {
        assert_eq!(
            relay(other, "kez.pair.get", get("answer")).await,
            refused(403, "not_your_request")
        );
    }
    assert_eq!(
        relay(&alice, "kez.pair.get", get("answer")).await,
        Ok(json!({"data": "a"}))
    );
    // Only alice sends the sync.
    assert_eq!(
        relay(&bob, "kez.pair.put", put("sync", "s")).await,
        refused(403, "not_your_request")
    );
    assert_eq!(
        relay(&alice, "kez.pair.put", put("sync", "s")).await,
        stored
    );

    // Hostile input: a stable error each, never a hang.
    let mut expired = put("sync", "s");
    expired["expires"] = json!(kez_client::now() - 1);
    assert_eq!(
        relay(&alice, "kez.pair.put", expired).await,
        refused(410, "expired")
    );
    let mut far = put("answer", "x");
    far["expires"] = json!(kez_client::now() + 100_000);
    assert_eq!(
        relay(&device, "kez.pair.put", far).await,
        refused(400, "malformed")
    );
    let huge = "x".repeat(kez_proto::pair::MAX_PAIR_DATA_BYTES + 1);
    assert_eq!(
        relay(&device, "kez.pair.put", put("answer", &huge)).await,
        refused(413, "too_large")
    );
    for body in [json!([]), json!({"device": key}), json!({"nonce": 1})] {
        assert_eq!(
            relay(&device, "kez.pair.get", body).await,
            refused(400, "malformed")
        );
    }
    let answer = kez_tests::kez_server::call(&device, "kez.pair.put", &b"\xff\xfe"[..]).await;
    assert_eq!(answer.unwrap_err().name, "malformed");
}
