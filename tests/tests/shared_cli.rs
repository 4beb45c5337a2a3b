//! The shared-files manifest through the `kez-chat` binary (PROTOCOL.md §11): alice publishes,
//! bob, carol and dave browse and download what each may see, with real nats-server, callout,
//! kez-chat-server (pinning on) and iroh on loopback; forged manifests are refused.

use std::collections::BTreeSet;
use std::sync::Arc;

use kez_blobs::{BlobNode, NodeConfig};
use kez_client::{Connection, now};
use kez_core::SecretKey;
use kez_core::manifest::{self, ManifestEntry};
use kez_core::sigchain::{Op, SharedFiles};
use kez_tests::callout::CalloutStack;
use kez_tests::person::{Person, key_of, plaintext_file, serving, stop};
use serde_json::Value;

/// The names `person`'s `browse @alice --json` lists.
async fn browse_names(person: &Person) -> BTreeSet<String> {
    let browsed = person.json(&["browse", "@alice"]).await;
    browsed["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| (*n).to_owned()).collect()
}

async fn person(url: &str, name: &str) -> Person {
    let person = Person::new();
    person.register(url, name).await;
    person
}

/// The manifest bytes alice's chain commits to, read from her (stopped) node's store.
async fn committed_manifest(alice: &Person, reader: &Person) -> Vec<u8> {
    let profile = reader.json(&["profile", "@alice"]).await;
    let hash: kez_core::file::BlobHash = profile["sigchain"]["shared_files"]["manifest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    alice.stop_service().await;
    let node = BlobNode::open(&alice.home.join("iroh"), NodeConfig::default())
        .await
        .unwrap();
    let mut bytes = Vec::new();
    let mut reader = node
        .reader(kez_blobs::Hash::from_bytes(*hash.as_bytes()))
        .await
        .unwrap();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut bytes)
        .await
        .unwrap();
    node.shutdown().await.unwrap();
    assert_eq!(manifest::manifest_hash(&bytes), hash);
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn each_reader_sees_only_what_is_theirs_and_the_manifest_names_nobody() {
    let pin_dir = tempfile::tempdir().unwrap();
    let stack = CalloutStack::start_pinning(&pin_dir.path().join("pin")).await;
    let url = stack.nats.url();
    let alice = person(&url, "alice").await;
    let bob = person(&url, "bob").await;
    let carol = person(&url, "carol").await;
    let dave = person(&url, "dave").await;
    let work = tempfile::tempdir().unwrap();
    let file = |name: &str, size: usize| {
        let path = work.path().join(name);
        plaintext_file(&path, size);
        path
    };
    let public = file("public-notes.txt", 2000);
    let for_bob = file("bob-secret-plan.pdf", 300_000);
    let for_carol = file("carol-surprise.txt", 100);

    // The first publish pins the file and, from then on, every manifest: the manifest can be
    // browsed while alice is offline.
    let stdout = alice
        .ok(&["publish", "--public", "--pin", public.to_str().unwrap()])
        .await;
    assert_eq!(stdout.trim(), "public-notes.txt");
    alice
        .ok(&["publish", "--to", "@bob", for_bob.to_str().unwrap()])
        .await;
    alice
        .ok(&["publish", "--to", "@carol", for_carol.to_str().unwrap()])
        .await;
    let shared = alice.json(&["shared"]).await;
    assert_eq!(shared["manifest"]["version"], 3, "{shared}");
    assert_eq!(shared["manifest"]["pinned"], true, "{shared}");
    let err = alice
        .fails(&["publish", "--public", public.to_str().unwrap()], 4)
        .await;
    assert!(err.contains("already publish a file named"), "{err}");

    // Nobody runs a client of alice's now: the manifest comes from the pin node.
    assert_eq!(
        browse_names(&bob).await,
        names(&["public-notes.txt", "bob-secret-plan.pdf"])
    );
    assert_eq!(
        browse_names(&carol).await,
        names(&["public-notes.txt", "carol-surprise.txt"])
    );
    assert_eq!(browse_names(&dave).await, names(&["public-notes.txt"]));
    let profile = bob.ok(&["profile", "@alice"]).await;
    assert!(
        profile.contains("files       2 visible to you (manifest 3 of"),
        "{profile}"
    );

    // The raw bytes name neither bob nor carol, nor any private file.
    let bytes = committed_manifest(&alice, &dave).await;
    for reader in [&bob, &carol] {
        let whoami = reader.json(&["whoami"]).await;
        let key: kez_core::PublicKey = whoami["key"].as_str().unwrap().parse().unwrap();
        for form in [
            key.to_string(),
            key.to_hex(),
            key.to_nkey(),
            data_encoding::BASE64.encode(key.as_bytes()),
        ] {
            assert!(!contains(&bytes, &form), "the manifest holds {form}");
        }
    }
    for private in [
        "bob-secret-plan.pdf",
        "carol-surprise.txt",
        "@bob@kez.test",
        "@carol@kez.test",
    ] {
        assert!(!contains(&bytes, private), "the manifest holds {private:?}");
    }
    assert!(contains(&bytes, "public-notes.txt"));

    // Downloads: the pinned public file while alice is offline; bob's file from her node.
    let got_public = work.path().join("got-public.txt");
    dave.ok(&[
        "download",
        "@alice/public-notes.txt",
        "-o",
        got_public.to_str().unwrap(),
    ])
    .await;
    assert!(std::fs::read(&got_public).unwrap() == std::fs::read(&public).unwrap());
    let err = dave
        .fails(&["download", "@alice/bob-secret-plan.pdf"], 3)
        .await;
    assert!(err.contains("you can see: public-notes.txt"), "{err}");
    let listening = serving(&alice).await;
    let got_bob = work.path().join("got-bob.pdf");
    let done = bob
        .json(&[
            "download",
            "@alice/bob-secret-plan.pdf",
            "-o",
            got_bob.to_str().unwrap(),
        ])
        .await;
    assert_eq!(done["size"], 300_000, "{done}");
    assert!(std::fs::read(&got_bob).unwrap() == std::fs::read(&for_bob).unwrap());
    stop(listening).await;

    // After unpublish, a fresh browse no longer lists it.
    alice.ok(&["unpublish", "bob-secret-plan.pdf"]).await;
    assert_eq!(browse_names(&bob).await, names(&["public-notes.txt"]));
    let err = alice.fails(&["unpublish", "bob-secret-plan.pdf"], 3).await;
    assert!(
        err.contains("you publish: carol-surprise.txt, public-notes.txt"),
        "{err}"
    );
    let shared = alice.json(&["shared"]).await;
    assert_eq!(shared["manifest"]["version"], 4, "{shared}");
    assert_eq!(shared["files"].as_array().unwrap().len(), 2, "{shared}");
}

/// alice's chain commits to a manifest signed by another key, or owned by another key, served
/// by her node: readers refuse it (exit 5) and show nothing from it.
#[tokio::test]
async fn a_manifest_not_signed_by_the_chain_key_is_refused() {
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let alice = person(&url, "alice").await;
    let bob = person(&url, "bob").await;
    bob.ok(&["add", "@alice"]).await;
    let alice_key = key_of(&alice);
    let mallory = SecretKey::generate();
    let entry = ManifestEntry {
        name: "innocent.txt".into(),
        size: 1,
        time: now(),
        blob: manifest::manifest_hash(b"anything"),
        cipher_size: kez_core::file::ciphertext_len(1).unwrap(),
        key: kez_core::file::ContentKey::generate(),
        wrapped: false,
    };
    let owned_by_mallory =
        manifest::build(&mallory, 1, now(), std::slice::from_ref(&entry), &[]).unwrap();
    let signed_by_mallory = resign(
        &manifest::build(&alice_key, 2, now(), &[entry], &[]).unwrap(),
        &mallory,
    );

    let node = BlobNode::open(&alice.home.join("iroh"), NodeConfig::default())
        .await
        .unwrap();
    let conn = Connection::connect(&url, alice_key.clone()).await.unwrap();
    for (forged, code) in [
        (owned_by_mallory, "wrong_owner"),
        (signed_by_mallory, "bad_signature"),
    ] {
        commit(&conn, &alice_key, &node, forged).await;
        let err = bob.fails(&["browse", "@alice"], 5).await;
        assert!(err.contains(code), "{code}: {err}");
        assert!(!err.contains("innocent.txt"), "{err}");
        let err = bob.fails(&["download", "@alice/innocent.txt"], 5).await;
        assert!(err.contains(code), "{code}: {err}");
    }
    conn.close().await.unwrap();
    node.shutdown().await.unwrap();
}

/// `bytes` with its signature replaced by `signer`'s over the same content.
fn resign(bytes: &[u8], signer: &SecretKey) -> Vec<u8> {
    let mut body: Value = serde_json::from_slice(bytes).unwrap();
    body.as_object_mut().unwrap().remove("sig");
    let unsigned = kez_core::canonical::encode(&body).unwrap();
    body["sig"] = serde_json::json!(signer.sign(kez_core::SignatureDomain::Manifest, &unsigned));
    kez_core::canonical::encode(&body).unwrap()
}

/// Imports `manifest` into `node` and commits it in alice's chain, served by `node`.
async fn commit(conn: &Connection, key: &Arc<SecretKey>, node: &BlobNode, manifest: Vec<u8>) {
    let (hash, _) = node
        .import_stream(
            futures::stream::iter([Ok(bytes::Bytes::from(manifest))]),
            "test/forged",
        )
        .await
        .unwrap();
    let chain = conn.chain(&key.public_key()).await.unwrap();
    let link = chain
        .next_link(
            now(),
            Op::SetSharedFiles(SharedFiles {
                manifest: hash.to_string(),
                providers: vec![node.provider()],
            }),
        )
        .sign(key)
        .unwrap();
    conn.append(link.bytes()).await.unwrap();
}
