//! The `kez-chat` CLI binary, run as separate processes with separate homes, against a real
//! nats-server with the auth callout and a kez-chat-server: registration, contacts, offline
//! delivery, history, `--json`, and the errors people see (with their exit codes).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kez_tests::callout::{CalloutStack, run_to_completion};
use kez_tests::process::kez_chat_binary;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A client home in a temporary directory.
struct Person {
    home: PathBuf,
    _dir: TempDir,
}

impl Person {
    fn new() -> Person {
        let dir = tempfile::tempdir().unwrap();
        Person {
            home: dir.path().join("home"),
            _dir: dir,
        }
    }

    /// Runs `kez-chat --home <home> args…` (no `--server`: the config's is used).
    async fn run(&self, args: &[&str]) -> Output {
        run_to_completion(kez_chat(&self.home, args)).await
    }

    /// [`Person::run`], which must succeed; answers stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert!(
            output.status.success(),
            "kez-chat {args:?} failed ({:?}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// [`Person::ok`] with `--json`, parsed.
    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let stdout = self.ok(&args).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    }

    /// Runs a command that must fail with `code`; answers stderr.
    async fn fails(&self, args: &[&str], code: i32) -> String {
        let output = self.run(args).await;
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(
            output.status.code(),
            Some(code),
            "kez-chat {args:?}: stdout {:?}, stderr {stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
        stderr
    }

    /// `register <name>` against `server`.
    async fn register(&self, server: &str, name: &str) -> String {
        self.ok(&["--server", server, "register", name]).await
    }
}

/// A `kez-chat --home <home> args…` command, isolated from the developer's environment.
fn kez_chat(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(kez_chat_binary());
    command
        .env_remove("KEZ_CHAT_HOME")
        .env_remove("KEZ_CHAT_SERVER")
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(Stdio::null());
    command
}

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
    assert_eq!(me["sigchain"]["seq"], 1, "register wrote the first link");
    // Registering again changes nothing.
    let again = alice.register(&url, "alice").await;
    assert!(
        again.contains("already registered as @alice@kez.test"),
        "{again}"
    );
    assert_eq!(alice.json(&["whoami"]).await, me);

    bob.register(&url, "bob").await;

    // Sending to someone not added yet says what to do.
    let err = alice.fails(&["send", "@bob", "too early"], 3).await;
    assert!(err.contains("kez-chat add @bob"), "{err}");
    // An unknown handle is "not found".
    let err = alice.fails(&["add", "@nobody"], 3).await;
    assert!(err.contains("@nobody@kez.test is not registered"), "{err}");

    let added = alice.json(&["add", "@bob"]).await;
    assert_eq!(added["handle"], "@bob@kez.test");
    assert_eq!(added["sigchain"]["seq"], 1);
    assert_eq!(added["endpoints"][0], "nats");
    bob.ok(&["add", "@alice"]).await;
    let contacts = alice.json(&["contacts"]).await;
    assert_eq!(contacts.as_array().unwrap().len(), 1);
    assert_eq!(contacts[0]["handle"], "@bob@kez.test");

    // alice sends while bob is not running; bob reads it once.
    let id = alice.ok(&["send", "@bob", "hello", "bob"]).await;
    assert_eq!(id.trim().len(), 32, "the message id: {id}");
    let read = bob.ok(&["inbox"]).await;
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
    assert!(history.contains("you: hello bob"), "{history}");
    assert!(history.contains("@bob@kez.test: hi alice"), "{history}");
    let history = alice.json(&["history", "@bob"]).await;
    let directions: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["direction"].as_str().unwrap())
        .collect();
    assert_eq!(directions, ["outgoing", "incoming"]);

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
    let handles = js.get_key_value("kez_handles").await.unwrap();
    let record = |name: &'static str| {
        let handles = handles.clone();
        async move {
            let bytes = handles.get(name).await.unwrap().expect("a handle record");
            serde_json::from_slice::<Value>(&bytes).unwrap()
        }
    };
    let mut lie = record("bob").await;
    lie["key"] = record("carol").await["key"].clone();
    handles
        .put("bob", serde_json::to_vec(&lie).unwrap().into())
        .await
        .unwrap();
    let err = alice.fails(&["add", "@bob"], 4).await;
    assert!(err.contains("the key changed"), "{err}");
    assert!(err.contains("Nothing was changed"), "{err}");
    assert_eq!(
        alice.json(&["contacts"]).await,
        contacts,
        "bob's key stays pinned"
    );
}

#[tokio::test]
async fn errors_say_what_to_do() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let fresh = Person::new();

    let err = fresh.fails(&["register", "dave"], 2).await;
    assert!(err.contains("--server nats://"), "{err}");
    let err = fresh.fails(&["whoami"], 2).await;
    assert!(
        err.contains("kez-chat --server nats://HOST:4222 register"),
        "{err}"
    );
    let err = fresh
        .fails(&["--server", "nats://127.0.0.1:1", "register", "dave"], 1)
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
        .fails(&["--server", &url, "register", "erin"], 4)
        .await;
    assert!(
        err.contains("@erin@kez.test is already registered"),
        "{err}"
    );
    // The same home can still register a free name, keeping its key.
    fresh.register(&url, "dave").await;
    let err = fresh.fails(&["register", "frank"], 4).await;
    assert!(
        err.contains("already registered as @dave@kez.test"),
        "{err}"
    );
}
