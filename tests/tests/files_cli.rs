//! Files over iroh through the `kez-chat` binary (separate processes and homes, a real
//! nats-server with the callout, a real kez-chat-server, iroh on loopback): share, offer,
//! download, resume, and the refusals.

use std::path::Path;
use std::process::Stdio;

use kez_tests::callout::CalloutStack;
use kez_tests::person::{
    MARKER, Person, alice_and_bob, kez_chat, plaintext_file, serving, stop, tree_contains,
};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn a_shared_file_arrives_identical_and_no_store_holds_plaintext() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("holiday.bin");
    plaintext_file(&original, 50 * 1024 * 1024);

    let offer = alice
        .ok(&["share", "--no-wait", "@bob", original.to_str().unwrap()])
        .await
        .trim()
        .to_owned();
    assert_eq!(offer.len(), 12, "the short offer id: {offer}");

    // bob sees the offer (never its key) and lists it.
    let inbox = bob.ok(&["inbox"]).await;
    assert!(
        inbox.contains(&format!(
            "offers the file holiday.bin (50.0 MiB): `kez-chat download {offer}`"
        )),
        "{inbox}"
    );
    let files = bob.json(&["files"]).await;
    assert_eq!(files[0]["name"], "holiday.bin");
    assert_eq!(files[0]["size"], 50 * 1024 * 1024);
    assert_eq!(files[0]["from_handle"], "@alice@kez.test");
    assert_eq!(files[0]["downloaded"], serde_json::Value::Null);

    // alice is offline (her service stopped): the download fails, says why, and writes nothing.
    alice.stop_service().await;
    let target = work.path().join("received.bin");
    let err = bob
        .fails(&["download", &offer, "-o", target.to_str().unwrap()], 1)
        .await;
    assert!(err.contains("must be online"), "{err}");
    assert!(!target.exists());

    let listening = serving(&alice).await;
    let done = bob
        .json(&["download", &offer, "-o", target.to_str().unwrap()])
        .await;
    assert_eq!(done["transferred"], done["total"], "{done}");
    assert_eq!(done["size"], 50 * 1024 * 1024);
    assert!(
        std::fs::read(&target).unwrap() == std::fs::read(&original).unwrap(),
        "the bytes arrive identical"
    );
    assert_eq!(
        bob.json(&["files"]).await[0]["downloaded"],
        target.canonicalize().unwrap().to_str().unwrap()
    );
    stop(listening).await;

    // What the file nodes hold is ciphertext only (the marker appears ~12,800 times in the
    // plaintext).
    assert!(tree_contains(work.path(), MARKER), "the check can find it");
    assert!(!tree_contains(&alice.home.join("iroh"), MARKER));
    assert!(!tree_contains(&bob.home.join("iroh"), MARKER));
    // Nor does the broker: the offer went end-to-end encrypted.
    let server = async_nats::jetstream::new(stack.server_client().await);
    let info = server
        .get_stream(kez_proto::subjects::MAIL_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 0, "delivered and acknowledged");
}

#[tokio::test]
async fn an_interrupted_download_resumes_with_the_rest() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("big.bin");
    let size = 50 * 1024 * 1024;
    plaintext_file(&original, size);
    let offer = alice
        .ok(&["share", "--no-wait", "@bob", original.to_str().unwrap()])
        .await
        .trim()
        .to_owned();
    bob.ok(&["inbox"]).await;
    let listening = serving(&alice).await;

    // The first download is stopped (SIGTERM) once a tenth has arrived.
    let target = work.path().join("big.out");
    let mut first = tokio::process::Command::from(kez_chat(
        &bob.home,
        &["download", &offer, "-o", target.to_str().unwrap()],
    ));
    first
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut first = first.spawn().unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        seen.push(line.clone());
        let Some(progress) = line.strip_prefix("downloading: ") else {
            continue;
        };
        let mib: f64 = progress
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap_or(0.0);
        if progress.contains("MiB of") && mib >= 5.0 {
            let pid = first.id().unwrap().to_string();
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap();
            break;
        }
    }
    while let Some(line) = lines.next_line().await.unwrap() {
        seen.push(line);
    }
    let status = first.wait().await.unwrap();
    assert_eq!(status.code(), Some(1), "interrupted: {seen:?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("download interrupted (SIGTERM)")),
        "{seen:?}"
    );
    assert!(
        !target.exists(),
        "nothing written before the whole file checks"
    );

    let done = bob
        .json(&["download", &offer, "-o", target.to_str().unwrap()])
        .await;
    let (transferred, total) = (
        done["transferred"].as_u64().unwrap(),
        done["total"].as_u64().unwrap(),
    );
    assert!(
        transferred < total - 4 * 1024 * 1024,
        "only the rest is fetched: {transferred} of {total}"
    );
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&original).unwrap());
    stop(listening).await;
}

#[tokio::test]
async fn offers_from_strangers_and_tampered_blobs_are_refused_and_nothing_is_written() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let carol = Person::new();
    carol.register(&url, "carol").await;
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("note.txt");
    plaintext_file(&original, 300 * 1024);

    // carol is not in bob's contacts: her offer is listed, but not downloaded.
    let from_carol = carol
        .ok(&["share", "--no-wait", "@bob", original.to_str().unwrap()])
        .await
        .trim()
        .to_owned();
    bob.ok(&["inbox"]).await;
    let target = work.path().join("from-carol.txt");
    let err = bob
        .fails(
            &["download", &from_carol, "-o", target.to_str().unwrap()],
            5,
        )
        .await;
    assert!(err.contains("not in your contacts"), "{err}");
    assert!(!target.exists());

    // alice's client sends an offer with the wrong content key for a real blob, and one that
    // claims a smaller file: the first download fetches and verifies the blob, the decryption
    // fails, nothing is written.
    let real = alice
        .ok(&["share", "--no-wait", "@bob", original.to_str().unwrap()])
        .await
        .trim()
        .to_owned();
    let forged = forge_offer(&url, &alice, |offer| {
        offer.key = kez_core::file::ContentKey::generate();
    })
    .await;
    let shrunk = forge_offer(&url, &alice, |offer| {
        offer.size = 1000;
        offer.cipher_size = kez_core::file::ciphertext_len(1000).unwrap();
    })
    .await;
    let inbox = bob.ok(&["inbox"]).await;
    assert!(inbox.contains(&real) && inbox.contains(&forged), "{inbox}");
    let listening = serving(&alice).await;
    let target = work.path().join("forged.txt");
    let err = bob
        .fails(&["download", &forged, "-o", target.to_str().unwrap()], 5)
        .await;
    assert!(err.contains("does not decrypt (auth_failed"), "{err}");
    assert!(err.contains("nothing was written"), "{err}");
    assert!(!target.exists());
    assert!(kez_client::files::partial_files(&target).is_empty());

    // The offer that names the real blob but claims a smaller file: the download stops as soon
    // as the blob shows it is larger, and says so.
    let target = work.path().join("shrunk.txt");
    let err = bob
        .fails(&["download", &shrunk, "-o", target.to_str().unwrap()], 5)
        .await;
    assert!(err.contains("does not match the file it names"), "{err}");
    assert!(!target.exists());
    assert!(kez_client::files::partial_files(&target).is_empty());
    stop(listening).await;

    // alice's stored ciphertext of another file is damaged: bob's download checks it against
    // the hash (iroh, BLAKE3) and fails; nothing is written.
    let other = work.path().join("other.txt");
    plaintext_file(&other, 200 * 1024);
    let damaged = alice
        .ok(&["share", "--no-wait", "@bob", other.to_str().unwrap()])
        .await
        .trim()
        .to_owned();
    bob.ok(&["inbox"]).await;
    let cipher_size = kez_core::file::ciphertext_len(200 * 1024).unwrap();
    flip_a_byte_in_the_file_of_size(&alice.home.join("iroh"), cipher_size);
    let listening = serving(&alice).await;
    let target = work.path().join("damaged.txt");
    let output = bob
        .run(&["download", &damaged, "-o", target.to_str().unwrap()])
        .await;
    assert!(!output.status.success(), "{output:?}");
    assert!(!target.exists(), "a damaged file is never written");
    assert!(kez_client::files::partial_files(&target).is_empty());
    stop(listening).await;

    // An unknown offer id: a clear not-found.
    let err = bob.fails(&["download", "ffffffffffff"], 3).await;
    assert!(err.contains("kez-chat files"), "{err}");
}

/// Flips one byte in the middle of the one file of `size` bytes under `dir` (a blob's data).
fn flip_a_byte_in_the_file_of_size(dir: &Path, size: u64) {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::metadata(&path).unwrap().len() == size {
                found.push(path);
            }
        }
    }
    assert_eq!(found.len(), 1, "one data file of {size} bytes: {found:?}");
    let mut bytes = std::fs::read(&found[0]).unwrap();
    bytes[(size / 2) as usize] ^= 0x40;
    std::fs::write(&found[0], bytes).unwrap();
}

/// As alice (her key, through the library), sends bob a copy of her last offer changed by
/// `forge`; answers its short id.
async fn forge_offer(
    url: &str,
    alice: &Person,
    forge: impl FnOnce(&mut kez_core::file::FileOffer),
) -> String {
    alice.stop_service().await;
    let home = kez_client::Home::open(&alice.home).unwrap();
    let store = home.store().unwrap();
    let last = store.offers().unwrap().pop().expect("alice's offer");
    let mut offer = kez_core::file::FileOffer::from_json(&last.message.body).unwrap();
    forge(&mut offer);
    let conn = kez_client::Connection::connect(url, std::sync::Arc::new(home.key().unwrap()))
        .await
        .unwrap();
    let bob = conn
        .verify_contact(&store, &kez_tests::kez_server::test_handle("@bob"))
        .await
        .unwrap()
        .contact;
    let sent = conn
        .send(
            &bob,
            kez_core::file::FILE_OFFER_CONTENT_TYPE,
            &offer.to_json().unwrap(),
        )
        .await
        .unwrap();
    conn.close().await.unwrap();
    sent.id.to_string()[..12].to_owned()
}

/// alice shares with `--pin`: her server fetches the ciphertext from her node while `share`
/// runs. alice's client is not running afterwards, yet bob downloads the file (from the pin
/// node), and the pin node holds no plaintext. A server without pinning says so.
#[tokio::test]
async fn a_pinned_file_downloads_while_the_sender_is_offline() {
    let pin_dir = tempfile::tempdir().unwrap();
    let stack = CalloutStack::start_pinning(&pin_dir.path().join("pin")).await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("report.pdf");
    plaintext_file(&original, 5 * 1024 * 1024);

    let output = alice
        .run(&["share", "--pin", "@bob", original.to_str().unwrap()])
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("pinned: @bob@kez.test can download it"),
        "{stderr}"
    );
    // The server has it: share does not wait for bob's download.
    assert!(
        stderr.contains("not waiting for the download: your server has the file"),
        "{stderr}"
    );
    let offer = String::from_utf8(output.stdout).unwrap().trim().to_owned();

    bob.ok(&["inbox"]).await;
    let target = work.path().join("report-from-the-server.pdf");
    let done = bob
        .json(&["download", &offer, "-o", target.to_str().unwrap()])
        .await;
    assert_eq!(done["transferred"], done["total"], "{done}");
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&original).unwrap());
    assert!(!tree_contains(&pin_dir.path().join("pin"), MARKER));
}

#[tokio::test]
async fn share_pin_on_a_server_without_pinning_says_so() {
    let stack = CalloutStack::start().await;
    let (alice, _bob) = alice_and_bob(&stack.nats.url()).await;
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("a.txt");
    plaintext_file(&original, 1000);
    let err = alice
        .fails(&["share", "--pin", "@bob", original.to_str().unwrap()], 5)
        .await;
    assert!(err.contains("does not pin files"), "{err}");
}
