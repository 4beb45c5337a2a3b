//! Forward secrecy for shared files (issue 25 item 4, PROTOCOL.md §11.5 and §15.6) on a real
//! broker and home server with the callout and iroh on loopback: alice publishes a private file
//! to bob through the kez-client shared API the CLI uses. Its wrap travels in a forward-secret
//! `kez.file-key` message before the manifest is committed; bob unwraps, downloads and gets the
//! exact bytes. A thief with only bob's device key opens bob's box, but the key in it does not
//! decrypt the file.

use std::time::Duration;

use kez_blobs::{BlobNode, NodeConfig};
use kez_client::shared::{self, SharedError};
use kez_client::{Connection, ForwardSecrecy, Published, files};
use kez_core::file::{self, FileCryptError};
use kez_core::manifest::{Audience, FILE_KEY_CONTENT_TYPE, ManifestEntry};
use kez_tests::callout::CalloutStack;
use kez_tests::chat::ChatUser;
use tokio::io::AsyncReadExt;

const PATIENCE: Duration = Duration::from_secs(30);

/// A registered user connected with forward secrecy prepared.
async fn user(url: &str, name: &str) -> (ChatUser, Connection) {
    let user = ChatUser::register(url, name, PATIENCE).await;
    let conn = user.connect(url, PATIENCE).await;
    assert_eq!(
        conn.prepare_forward_secrecy(&user.store).await.unwrap(),
        ForwardSecrecy::Ready
    );
    (user, conn)
}

async fn node(dir: &std::path::Path) -> BlobNode {
    BlobNode::open(dir, NodeConfig::default()).await.unwrap()
}

/// The blob's ciphertext as `node` holds it.
async fn ciphertext(node: &BlobNode, blob: &kez_core::file::BlobHash) -> Vec<u8> {
    let mut bytes = Vec::new();
    node.reader(kez_blobs::Hash::from_bytes(*blob.as_bytes()))
        .await
        .unwrap()
        .read_to_end(&mut bytes)
        .await
        .unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_files_key_travels_forward_secret_and_a_stolen_device_key_does_not_open_it() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, a) = user(&url, "alice").await;
    let (bob, b) = user(&url, "bob").await;
    let to_bob = alice.add(&a, "bob", PATIENCE).await;
    let to_alice = bob.add(&b, "alice", PATIENCE).await;
    assert!(to_bob.forward_secret() && to_alice.forward_secret());

    let work = tempfile::tempdir().unwrap();
    let alice_node = node(&work.path().join("alice-node")).await;
    let bob_node = node(&work.path().join("bob-node")).await;
    // Several segments, so the first one failing is the key's fault, not the length's.
    let plaintext: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let source = work.path().join("plans.pdf");
    std::fs::write(&source, &plaintext).unwrap();

    // alice publishes it for bob, as `kez-chat publish plans.pdf --to @bob` does.
    let tag = files::new_tag("publish");
    let offer = files::share_file(
        &alice_node,
        &source,
        &tag,
        vec![alice_node.provider()],
        |_| {},
    )
    .await
    .unwrap();
    let published = Published {
        entry: ManifestEntry {
            name: "plans.pdf".into(),
            size: offer.size,
            time: kez_client::now(),
            blob: offer.blob,
            cipher_size: offer.cipher_size,
            key: offer.key.clone(),
            wrapped: false,
        },
        recipients: vec![to_bob.handle.clone()],
        pinned: false,
        tag,
        wraps: Default::default(),
    };
    assert!(alice.store.add_published(&published).unwrap());
    shared::publish_manifest(&a, &alice.store, &alice.key, &alice_node, None)
        .await
        .unwrap();
    let kept = alice.store.published().unwrap().remove(0);
    let sent = &kept.wraps[&to_bob.key];
    assert_eq!(sent.devices, [bob.key.public_key()], "sent to bob's device");
    let wrap = sent.wrap.clone();

    // Before bob reads his inbox, the entry is there but its key is wrapped: no download.
    let chain = b.chain(&to_alice.key).await.unwrap();
    let early = shared::browse(&bob_node, &chain, &bob.key, None, Some(&bob.store))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(early.visible.len(), 1);
    assert!(early.visible[0].entry.wrapped);
    let err = early
        .offer(&early.visible[0], &to_alice.handle)
        .unwrap_err();
    assert!(matches!(err, SharedError::KeyNotArrived { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "the key for plans.pdf from {} has not arrived yet: run `kez-chat inbox` and try again",
            to_alice.handle
        )
    );

    // bob reads his inbox: the file key, sealed with Olm, is kept in his store.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut got = Vec::new();
    while got.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no file key came");
        got = b
            .receive(&bob.store, 100, Duration::from_millis(500))
            .await
            .unwrap();
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].content_type, FILE_KEY_CONTENT_TYPE);
    assert_eq!(
        bob.store.file_wrap(&to_alice.key, &offer.blob).unwrap(),
        Some(wrap.clone())
    );
    assert!(
        bob.store.messages(&to_alice.key).unwrap().is_empty(),
        "a file key is no message a person sees"
    );

    // Now he browses, downloads and gets the exact bytes.
    let browsed = shared::browse(&bob_node, &chain, &bob.key, None, Some(&bob.store))
        .await
        .unwrap()
        .unwrap();
    let visible = &browsed.visible[0];
    assert_eq!(visible.audience, Audience::Private);
    assert!(!visible.entry.wrapped);
    assert_eq!(visible.entry.key, offer.key);
    let download = browsed.offer(visible, &to_alice.handle).unwrap();
    files::fetch(&bob_node, &download, |_| {}).await.unwrap();
    let saved = work.path().join("bob-plans.pdf");
    files::decrypt_to(&bob_node, &download, &saved, |_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&saved).unwrap(), plaintext);

    // A thief with bob's device key alone (no store) fetches the manifest and opens bob's box:
    // the key in it does not decrypt the file; with the wrap from bob's store, it does.
    let thief_node = node(&work.path().join("thief-node")).await;
    let stolen = shared::browse(&thief_node, &chain, &bob.key, None, None)
        .await
        .unwrap()
        .unwrap();
    let boxed = &stolen.visible[0].entry;
    assert!(boxed.wrapped && boxed.name == "plans.pdf");
    assert_ne!(boxed.key, offer.key);
    files::fetch(&thief_node, &boxed.offer(stolen.providers.clone()), |_| {})
        .await
        .unwrap();
    let cipher = ciphertext(&thief_node, &offer.blob).await;
    let mut out = Vec::new();
    let err = file::decrypt(&boxed.key, cipher.as_slice(), &mut out).unwrap_err();
    assert!(
        matches!(err, FileCryptError::AuthFailed { segment: 0 }),
        "{err:?}"
    );
    assert!(out.is_empty(), "nothing decrypted");
    assert!(stolen.offer(&stolen.visible[0], "@alice").is_err());
    let unwrapped = boxed.unwrap_with(&wrap);
    let mut out = Vec::new();
    file::decrypt(&unwrapped.key, cipher.as_slice(), &mut out).unwrap();
    assert_eq!(out, plaintext);

    // Republishing reuses the wrap and sends no second file key.
    shared::publish_manifest(&a, &alice.store, &alice.key, &alice_node, None)
        .await
        .unwrap();
    assert_eq!(alice.store.published().unwrap()[0].wraps, kept.wraps);
    assert!(
        b.receive(&bob.store, 100, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty()
    );
    let again = shared::browse(
        &bob_node,
        &b.chain(&to_alice.key).await.unwrap(),
        &bob.key,
        None,
        Some(&bob.store),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(again.visible[0].entry.key, offer.key);

    for node in [alice_node, bob_node, thief_node] {
        node.shutdown().await.unwrap();
    }
}
