//! `share` waits, like sendme, until the recipient has the file (issue 22): through the
//! `kez-chat` binary on the real stack (nats-server with the callout, kez-chat-server, iroh on
//! loopback). It ends when bob's download completes, at once with `--no-wait`, and on Ctrl-C
//! with exit 0; the service serves the file before, during and after.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use kez_tests::callout::CalloutStack;
use kez_tests::person::{Person, alice_and_bob, kez_chat, plaintext_file};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr};

const SIZE: usize = 8 * 1024 * 1024;

/// Starts `kez-chat share args…` for `person`; answers it once it says it waits for bob, with
/// the rest of its stderr and what it printed before.
async fn share_waiting(
    person: &Person,
    args: &[&str],
) -> (Child, Lines<BufReader<ChildStderr>>, String) {
    let mut command = tokio::process::Command::from(kez_chat(&person.home, args));
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut before = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            before.push_str(&line);
            before.push('\n');
            if line.contains("waiting for @bob@kez.test to download it") {
                return;
            }
        }
        panic!(
            "share ended before waiting:\n{before}\n{}",
            person.service_log()
        );
    })
    .await
    .expect("share waits within 60 s");
    (child, lines, before)
}

/// The rest of `lines` and `child`'s stdout once it exits (within 60 s); it must succeed.
async fn finished(mut child: Child, mut lines: Lines<BufReader<ChildStderr>>) -> (String, String) {
    let mut stdout = child.stdout.take().unwrap();
    let (rest, out, status) = tokio::time::timeout(Duration::from_secs(60), async {
        let mut rest = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            rest.push_str(&line);
            rest.push('\n');
        }
        let mut out = String::new();
        stdout.read_to_string(&mut out).await.unwrap();
        (rest, out, child.wait().await.unwrap())
    })
    .await
    .expect("share ends within 60 s");
    assert!(status.success(), "{status:?}\n{rest}");
    (rest, out)
}

/// Bob fetches the offer he received last into `target`; the bytes are `original`'s.
async fn bob_downloads(bob: &Person, target: &Path, original: &Path) {
    bob.ok(&["inbox"]).await;
    let files = bob.json(&["files"]).await;
    let offer = files.as_array().unwrap().last().unwrap()["offer"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = bob
        .json(&["download", &offer, "-o", target.to_str().unwrap()])
        .await;
    assert_eq!(done["size"], SIZE, "{done}");
    assert!(
        std::fs::read(target).unwrap() == std::fs::read(original).unwrap(),
        "the bytes arrive identical"
    );
}

#[tokio::test]
async fn share_waits_until_bob_has_the_file() {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("photos.tar");
    plaintext_file(&original, SIZE);

    let (mut share, lines, before) =
        share_waiting(&alice, &["share", "@bob", original.to_str().unwrap()]).await;
    assert!(before.contains("shared photos.tar"), "{before}");
    assert!(before.contains("Ctrl-C to stop waiting"), "{before}");
    // Nobody downloads yet: it keeps waiting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(share.try_wait().unwrap().is_none(), "share waits");

    bob_downloads(&bob, &work.path().join("received.tar"), &original).await;
    let (rest, out) = finished(share, lines).await;
    assert!(rest.contains("@bob@kez.test has the file"), "{rest}");
    // Progress lines (stderr is not a terminal) in bytes sent, up to the whole.
    assert!(rest.contains("sending to @bob@kez.test: "), "{rest}");
    assert_eq!(out.trim().len(), 12, "the short offer id: {out}");
}

#[tokio::test]
async fn no_wait_returns_at_once_and_ctrl_c_stops_only_the_waiting() {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("notes.bin");
    plaintext_file(&original, SIZE);
    let path = original.to_str().unwrap();

    // --no-wait: the offer goes out and share returns, though nobody downloads.
    let shared = tokio::time::timeout(
        Duration::from_secs(60),
        alice.run(&["share", "--no-wait", "--json", "@bob", path]),
    )
    .await
    .expect("share --no-wait returns");
    let stderr = String::from_utf8_lossy(&shared.stderr);
    assert!(shared.status.success(), "{stderr}");
    assert!(!stderr.contains("waiting for"), "{stderr}");
    let offer: serde_json::Value = serde_json::from_slice(&shared.stdout).unwrap();
    assert_eq!(offer["downloaded"], false, "{offer}");
    // The service serves it after share returned.
    bob_downloads(&bob, &work.path().join("first.bin"), &original).await;

    // Ctrl-C while waiting: exit 0, the note, and the file is still served.
    let (share, lines, _) = share_waiting(&alice, &["share", "--json", "@bob", path]).await;
    let pid = share.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let (rest, out) = finished(share, lines).await;
    assert!(
        rest.contains("stopped waiting (Ctrl-C)") && rest.contains("keeps serving the file"),
        "{rest}"
    );
    let offer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(offer["downloaded"], false, "{offer}");
    bob_downloads(&bob, &work.path().join("second.bin"), &original).await;
}
