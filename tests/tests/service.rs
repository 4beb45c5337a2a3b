//! The kez-chat service (PROTOCOL.md §12): one owner per home, every CLI command its client.
//! Many commands at once against one home, `listen` while the same home sends, a second service
//! refused, a socket left by a killed service replaced, and local API requests that are
//! malformed, oversized or not a request refused with their stable codes.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader as StdBufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

use kez_tests::callout::CalloutStack;
use kez_tests::person::{Person, alice_and_bob, kez_chat, stop};
use kez_tests::process::kez_chat_binary;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The service's pid, from `service status --json`.
async fn service_pid(person: &Person) -> u32 {
    let status = person.json(&["service", "status"]).await;
    u32::try_from(status["pid"].as_u64().expect("a pid")).unwrap()
}

/// Ten sends from one home at once all succeed, each once, and the recipient gets all ten.
#[tokio::test]
async fn ten_parallel_sends_from_one_home_all_succeed() {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let sends = (0..10).map(|n| {
        let alice = &alice;
        async move { alice.run(&["send", "@bob", &format!("parallel {n}")]).await }
    });
    let outputs = futures::future::join_all(sends).await;
    for output in &outputs {
        assert!(
            output.status.success(),
            "{}\nthe service's log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            alice.service_log()
        );
    }
    let ids: BTreeSet<String> = outputs
        .iter()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .collect();
    assert_eq!(ids.len(), 10, "ten different message ids: {ids:?}");
    let received = bob.json(&["inbox", "--wait", "5"]).await;
    let texts: BTreeSet<String> = received
        .as_array()
        .unwrap()
        .iter()
        .map(|message| message["text"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = (0..10).map(|n| format!("parallel {n}")).collect();
    assert_eq!(texts, expected);
    // Other commands at once too: readers and a writer of the store side by side.
    let (contacts, history, conversations) = tokio::join!(
        alice.run(&["contacts", "--json"]),
        alice.run(&["history", "@bob", "--json"]),
        alice.run(&["history", "--json"]),
    );
    for output in [contacts, history, conversations] {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// `listen` in one terminal while the same home sends and lists in another: the listener shows
/// what arrives, the sends succeed, and Ctrl-C ends the view, not the service.
#[tokio::test]
async fn listen_while_the_same_home_sends() {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let mut listen = tokio::process::Command::from(kez_chat(&bob.home, &["listen", "--json"]));
    listen
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut listen = listen.spawn().unwrap();
    let mut status = BufReader::new(listen.stderr.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = status.next_line().await.unwrap() {
            if line.contains("listening as @bob") {
                return;
            }
        }
        panic!("listen ended before it listened");
    })
    .await
    .expect("listen starts");
    let mut lines = BufReader::new(listen.stdout.take().unwrap()).lines();
    for n in 0..3 {
        bob.ok(&["send", "@alice", &format!("from bob {n}")]).await;
        bob.ok(&["contacts"]).await;
        alice.ok(&["send", "@bob", &format!("to bob {n}")]).await;
        let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
            .await
            .expect("listen shows the message")
            .unwrap()
            .expect("listen is still running");
        let message: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(message["text"], format!("to bob {n}"), "{line}");
    }
    // Sharing and browsing from the listening home too.
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("notes.txt");
    std::fs::write(&file, "notes for alice").unwrap();
    bob.ok(&["share", "--no-wait", "@alice", file.to_str().unwrap()])
        .await;
    alice
        .ok(&["publish", file.to_str().unwrap(), "--public"])
        .await;
    let browsed = bob.ok(&["browse", "@alice"]).await;
    assert!(browsed.contains("notes.txt"), "{browsed}");
    alice.ok(&["send", "@bob", "after the share"]).await;
    let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("listen shows the message")
        .unwrap()
        .expect("listen is still running");
    let message: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(message["text"], "after the share", "{line}");
    let service = service_pid(&bob).await;
    stop(listen).await;
    assert_eq!(service_pid(&bob).await, service, "the service runs on");
    let history = bob.json(&["history", "@alice"]).await;
    assert_eq!(history.as_array().unwrap().len(), 8, "{history}");
}

/// One service per home: a second is refused clearly; a service killed with SIGKILL leaves
/// its socket behind, and the next command replaces it and loses nothing that was stored.
#[tokio::test]
async fn one_service_per_home_and_a_killed_one_is_replaced() {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let first = service_pid(&alice).await;
    let second = alice.run(&["service"]).await;
    assert_eq!(second.status.code(), Some(4), "{second:?}");
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains("already runs for this home") && said.contains(&first.to_string()),
        "{said}"
    );
    alice.ok(&["send", "@bob", "before the kill"]).await;
    bob.ok(&["send", "@alice", "while alice is gone"]).await;
    let kill = std::process::Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let socket = alice.home.join("service.sock");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(socket.exists(), "SIGKILL leaves the socket behind");
    let received = alice.json(&["inbox", "--wait", "5"]).await;
    assert_eq!(received[0]["text"], "while alice is gone", "{received}");
    assert_ne!(service_pid(&alice).await, first, "a new service");
    let history = alice.json(&["history", "@bob"]).await;
    let texts: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|message| message["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["before the kill", "while alice is gone"]);
    // `service stop` lets go of the home; `status` then says none runs (exit 3).
    alice.stop_service().await;
    let status = alice.run(&["service", "status"]).await;
    assert_eq!(status.status.code(), Some(3), "{status:?}");
    assert!(!socket.exists(), "a stopped service removes its socket");
}

/// Talks to the home's socket directly: one request line, the answer lines.
fn exchange(person: &Person, request: &[u8]) -> Vec<Value> {
    let mut stream = UnixStream::connect(person.home.join("service.sock")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // A large request may be refused before it is all written.
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    StdBufReader::new(stream)
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect()
}

/// Requests that are malformed, oversized or unknown get a stable refusal and the service
/// goes on; the socket is private; a well-formed `run` streams the command's output.
#[tokio::test]
async fn hostile_local_requests_are_refused_and_the_service_goes_on() {
    let stack = CalloutStack::start().await;
    let (alice, _bob) = alice_and_bob(&stack.nats.url()).await;
    let pid = service_pid(&alice).await;
    let socket = alice.home.join("service.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the socket is private");
    let refused = |answer: &[Value], code: &str| {
        assert_eq!(answer.len(), 1, "{answer:?}");
        assert_eq!(answer[0]["refused"]["code"], code, "{answer:?}");
    };
    refused(&exchange(&alice, b"not json\n"), "malformed");
    refused(
        &exchange(&alice, b"{\"exec\":{\"cmd\":\"sh\"}}\n"),
        "malformed",
    );
    refused(
        &exchange(
            &alice,
            b"{\"run\":{\"args\":[],\"cwd\":\"/\",\"tty\":false,\"env\":{}}}\n",
        ),
        "malformed",
    );
    refused(&exchange(&alice, b""), "malformed");
    let mut huge = b"{\"run\":{\"args\":[\"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 2 << 20));
    huge.extend(b"\"],\"cwd\":\"/\",\"tty\":false}}\n");
    refused(&exchange(&alice, &huge), "too_large");
    // A command line no shell could give, and a relative working directory: a usage error.
    let answer = exchange(
        &alice,
        b"{\"run\":{\"args\":[\"contacts\"],\"cwd\":\"relative\",\"tty\":false}}\n",
    );
    assert_eq!(answer.last().unwrap()["exit"]["code"], 2, "{answer:?}");
    // A well-formed request: the output, then the exit.
    let answer = exchange(
        &alice,
        b"{\"run\":{\"args\":[\"contacts\",\"--json\"],\"cwd\":\"/\",\"tty\":false}}\n",
    );
    let out: String = answer
        .iter()
        .filter_map(|frame| frame["out"].as_str())
        .collect();
    let contacts: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(contacts[0]["handle"], "@bob@kez.test", "{answer:?}");
    assert_eq!(answer.last().unwrap()["exit"]["code"], 0, "{answer:?}");
    assert_eq!(service_pid(&alice).await, pid, "still the same service");
}

/// Delivery under faults, extended to the service: while alice sends, bob's service is killed
/// with SIGKILL again and again (and started again by his next command). Every message whose
/// send was acknowledged ends up in bob's history exactly once.
#[tokio::test]
async fn a_service_killed_again_and_again_loses_nothing_acknowledged() {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let sending = std::sync::atomic::AtomicBool::new(true);
    let killed_count = std::sync::atomic::AtomicUsize::new(0);
    let sends = async {
        let mut sent = Vec::new();
        // At least 30 messages, and on until the service was killed three times: how many
        // sends that takes depends on how fast a send is.
        let mut n = 0;
        while n < 30 || killed_count.load(std::sync::atomic::Ordering::SeqCst) < 3 {
            let text = format!("through the kills {n}");
            alice.ok(&["send", "@bob", &text]).await;
            sent.push(text);
            n += 1;
        }
        sending.store(false, std::sync::atomic::Ordering::SeqCst);
        sent
    };
    let kills = async {
        let mut kills = 0;
        while sending.load(std::sync::atomic::Ordering::SeqCst) {
            // Any command starts the service again; it receives at once.
            bob.ok(&["contacts"]).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let pid = service_pid(&bob).await;
            let killed = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap();
            assert!(killed.success());
            kills += 1;
            killed_count.store(kills, std::sync::atomic::Ordering::SeqCst);
            // Until it is gone: a command that reaches a dying service's socket loses it (and
            // says so), which is not what this test is about. Gone is when its socket refuses:
            // a killed leader thread is a zombie while the other threads still hold the socket.
            let socket = bob.home.join("service.sock");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline
                && (std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .is_ok_and(|status| !status.contains("State:\tZ"))
                    || UnixStream::connect(&socket).is_ok())
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        kills
    };
    let (sent, kills) = tokio::join!(sends, kills);
    assert!(kills >= 3, "only {kills} kills");
    let expected: BTreeSet<String> = sent.into_iter().collect();
    let mut texts = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let history = bob.json(&["history", "@alice"]).await;
        texts = history
            .as_array()
            .unwrap()
            .iter()
            .map(|message| message["text"].as_str().unwrap().to_owned())
            .collect();
        if texts.len() >= expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let unique: BTreeSet<String> = texts.iter().cloned().collect();
    assert_eq!(texts.len(), unique.len(), "each once: {texts:?}");
    assert_eq!(unique, expected, "after {kills} kills");
}

/// Another local user who reaches the socket (here: the home and the socket opened up to
/// everyone on purpose) is refused with `not_owner`: the service answers only the home's
/// owner. Switching users needs root, which CI has; elsewhere the socket's own mode keeps
/// others out, as the hostile test checks.
#[tokio::test]
async fn another_local_user_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let stack = CalloutStack::start().await;
    let (alice, _bob) = alice_and_bob(&stack.nats.url()).await;
    let pid = service_pid(&alice).await;
    let root = std::process::Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&root.stdout).trim() != "0" {
        eprintln!("not root: the other-user case needs root to switch users");
        return;
    }
    let socket = alice.home.join("service.sock");
    let open = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    open(alice.home.parent().unwrap(), 0o711);
    open(&alice.home, 0o711);
    open(&socket, 0o666);
    let script = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  s.sendall(b'{\"status\":{}}\\n')\n\
                  print(s.makefile().readline(), end='')\n";
    let output = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(&socket)
        .output()
        .unwrap();
    open(&socket, 0o600);
    open(&alice.home, 0o700);
    open(alice.home.parent().unwrap(), 0o700);
    assert!(output.status.success(), "{output:?}");
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["refused"]["code"], "not_owner", "{answer}");
    assert_eq!(service_pid(&alice).await, pid, "the service goes on");
}

/// `command`'s output, its program a file written a moment ago: a child that another test
/// thread forked meanwhile holds the file open for writing until it execs, and executing the
/// file then fails with "Text file busy" (CI saw it); asked again then.
async fn output_of_fresh_program(command: &mut tokio::process::Command) -> std::process::Output {
    for _ in 0..100 {
        match command.output().await {
            Err(err) if err.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            output => return output.unwrap(),
        }
    }
    panic!("{command:?} was still \"Text file busy\" after 2 s");
}

/// An upgrade replaces the kez-chat program while its service runs (a new file renamed over the
/// old, as installers do): the service notices, stops cleanly and runs the new program in its
/// place — the same pid, started anew — and the home's commands go on against it.
#[tokio::test]
async fn a_replaced_program_restarts_its_service_in_place() {
    let stack = CalloutStack::start().await;
    let (alice, _bob) = alice_and_bob(&stack.nats.url()).await;
    alice.stop_service().await;
    // The service runs a copy of kez-chat in the test's own directory, which the test replaces.
    let programs = tempfile::tempdir().unwrap();
    let program = programs.path().join("kez-chat");
    std::fs::copy(kez_chat_binary(), &program).unwrap();
    let started = output_of_fresh_program(
        tokio::process::Command::new(&program)
            .arg("--home")
            .arg(&alice.home)
            .args(["service", "status", "--json"]),
    )
    .await;
    assert!(!started.status.success(), "no service runs yet");
    let output = output_of_fresh_program(
        tokio::process::Command::new(&program)
            .arg("--home")
            .arg(&alice.home)
            .args(["contacts"]),
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let before = alice.json(&["service", "status"]).await;
    // The next second, so the new start is told from the old one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let upgrade = programs.path().join("kez-chat.new");
    std::fs::copy(kez_chat_binary(), &upgrade).unwrap();
    std::fs::rename(&upgrade, &program).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let output = alice.run(&["service", "status", "--json"]).await;
        if output.status.success() {
            let status: Value = serde_json::from_slice(&output.stdout).unwrap();
            if status["since"] != before["since"] {
                break status;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the service did not restart into the new program within 20 s:\n{}",
            alice.service_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        after["pid"], before["pid"],
        "the same process runs the new program"
    );
    let log = alice.service_log();
    assert!(log.contains("was replaced (an upgrade)"), "{log}");
    assert!(
        alice.ok(&["contacts"]).await.contains("@bob@kez.test"),
        "commands go on"
    );
    alice.stop_service().await;
}

/// A service whose broker is gone for good (the server machine died, a test's broker ended)
/// still stops at once when asked: its status does not wait for a connect in progress, and
/// saying "offline" and closing the connection are bounded (3 s). It took over 10 s before.
#[tokio::test]
async fn a_service_stops_when_its_broker_is_gone() {
    let stack = CalloutStack::start().await;
    let (alice, _bob) = alice_and_bob(&stack.nats.url()).await;
    alice.ok(&["settings", "presence", "on"]).await;
    let pid = service_pid(&alice).await;
    drop(stack);
    let started = tokio::time::Instant::now();
    let stopped = alice.run(&["service", "stop"]).await;
    assert!(stopped.status.success(), "{stopped:?}");
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|status| status.contains("State:\tZ"));
        if zombie {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "the service still runs 8 s after `service stop`:\n{}",
            alice.service_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "`service stop` took {:?} to end a service whose broker is gone",
        started.elapsed()
    );
}
