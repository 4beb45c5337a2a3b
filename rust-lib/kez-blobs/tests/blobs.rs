//! Real iroh endpoints on loopback (127.0.0.1, no relays, no discovery) in temporary
//! directories: transfer, resume, failure modes, key handling and garbage collection.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kez_blobs::{BlobNode, BlobState, Error, Hash, NodeConfig, Progress, parse_provider};
use tokio::io::AsyncReadExt;

const MIB: usize = 1024 * 1024;

fn config() -> NodeConfig {
    NodeConfig {
        connect_timeout: Duration::from_secs(3),
        stall_timeout: Duration::from_secs(5),
        ..NodeConfig::default()
    }
}

async fn node(dir: &Path) -> BlobNode {
    BlobNode::open(dir, config()).await.expect("open node")
}

/// `len` deterministic, incompressible-looking bytes (xorshift); distinct odd seeds give
/// distinct data (`seed | 1` seeds the generator).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn import(node: &BlobNode, bytes: &[u8], tag: &str) -> (Hash, u64) {
    let chunks: Vec<io::Result<Bytes>> = bytes
        .chunks(MIB)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    node.import_stream(futures::stream::iter(chunks), tag)
        .await
        .expect("import")
}

async fn read_all(node: &BlobNode, hash: Hash) -> Vec<u8> {
    let mut reader = node.reader(hash).await.expect("reader");
    let mut out = Vec::new();
    reader.read_to_end(&mut out).await.expect("read");
    out
}

/// A imports 8 MiB, B downloads it through A's provider string: identical bytes, all of them
/// transferred, progress reported up to the total, and the result tagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_delivers_identical_bytes() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (node(dir_a.path()).await, node(dir_b.path()).await);
    let bytes = data(8 * MIB, 1);
    let (hash, size) = import(&a, &bytes, "share/one").await;
    assert_eq!(size, bytes.len() as u64);
    assert_eq!(hash, Hash::new(&bytes));

    let provider = a.provider();
    assert!(provider.starts_with(&format!("iroh:{};ip=127.0.0.1:", a.id())));
    let addr = parse_provider(&provider).unwrap();
    assert_eq!(addr, a.addr());

    let mut seen: Vec<Progress> = Vec::new();
    let stats = b
        .download(hash, &[addr], "dl/one", u64::MAX, |p| seen.push(p))
        .await
        .expect("download");
    assert_eq!(stats.total, size);
    assert_eq!(stats.bytes_transferred, size);
    assert_eq!(stats.provider, Some(a.id()));
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
    assert_eq!(
        seen.last(),
        Some(&Progress {
            done: size,
            total: Some(size)
        })
    );
    assert_eq!(b.has(hash).await.unwrap(), BlobState::Complete { size });
    assert_eq!(read_all(&b, hash).await, bytes);
    let tags = b.tags().await.unwrap();
    assert!(tags.iter().any(|t| t.name == "dl/one" && t.hash == hash));

    // Already complete: nothing is transferred, the tag is still set.
    let again = b
        .download(hash, &[], "dl/two", u64::MAX, |_| {})
        .await
        .unwrap();
    assert_eq!((again.bytes_transferred, again.provider), (0, None));
    assert_eq!(b.tags().await.unwrap().len(), 2);

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A download dropped after some progress leaves partial data that the next download keeps:
/// the second one transfers only the remainder, and the two together about the whole blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_download_resumes_with_the_remainder() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (node(dir_a.path()).await, node(dir_b.path()).await);
    let bytes = data(32 * MIB, 2);
    let (hash, size) = import(&a, &bytes, "share/big").await;
    let providers = [a.addr()];

    let first_done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let (done, notify) = (first_done.clone(), stop.clone());
    let download = b.download(hash, &providers, "dl/big", u64::MAX, move |p| {
        done.store(p.done, Ordering::SeqCst);
        if p.done >= 4 * MIB as u64 {
            notify.notify_one();
        }
    });
    tokio::select! {
        biased;
        _ = stop.notified() => {}
        res = download => panic!("download finished before the interruption: {res:?}"),
    }
    let first = first_done.load(Ordering::SeqCst);
    assert!(
        first > 0 && first < size,
        "first attempt got {first} of {size}"
    );
    let state = b.has(hash).await.unwrap();
    assert!(matches!(state, BlobState::Partial { .. }), "{state:?}");
    // The partial data is tagged from the start: a collection keeps it for the resume.
    let tags = b.tags().await.unwrap();
    assert_eq!(tags.len(), 1);
    b.collect_garbage().await.unwrap();
    assert!(matches!(
        b.has(hash).await.unwrap(),
        BlobState::Partial { .. }
    ));

    let mut watch = a.watch_served();
    let stats = b
        .download(hash, &providers, "dl/big", u64::MAX, |_| {})
        .await
        .expect("resumed download");
    assert_eq!(stats.total, size);
    // The resume is a request that completes, having sent only what B lacked.
    let sent = loop {
        let event = tokio::time::timeout(Duration::from_secs(5), watch.recv())
            .await
            .expect("events within 5 s")
            .expect("no lag");
        if let kez_blobs::ServeEvent::Completed { sent } = event.event {
            assert_eq!((event.hash, event.peer), (hash, Some(b.id())));
            break sent;
        }
    };
    assert!(sent < size, "the resume sent {sent} of {size}");
    assert!(
        stats.bytes_transferred < size,
        "resume transferred {} of {size}",
        stats.bytes_transferred
    );
    eprintln!(
        "interrupted after {first} bytes, resume transferred {} of {size}",
        stats.bytes_transferred
    );
    let sum = first + stats.bytes_transferred;
    let slack = 2 * MIB as u64;
    assert!(
        sum + slack >= size && sum <= size + slack,
        "first {first} + second {} vs total {size}",
        stats.bytes_transferred
    );
    assert_eq!(read_all(&b, hash).await, bytes);

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A hash the provider does not have, and a provider that is gone: both fail quickly, and the
/// error names every provider tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hash_and_offline_provider_fail_fast() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, gone) = (
        node(dirs[0].path()).await,
        node(dirs[1].path()).await,
        node(dirs[2].path()).await,
    );
    let offline = parse_provider(&gone.provider()).unwrap();
    let offline_id = gone.id();
    gone.shutdown().await.unwrap();
    let unknown = Hash::new(b"no one has this");

    let start = Instant::now();
    let err = b
        .download(unknown, &[a.addr()], "dl/x", u64::MAX, |_| {})
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(&err, Error::DownloadFailed { attempts, .. } if attempts.len() == 1));
    assert!(err.to_string().contains(&a.id().to_string()), "{err}");

    let start = Instant::now();
    let err = b
        .download(unknown, &[offline, a.addr()], "dl/x", u64::MAX, |_| {})
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    let text = err.to_string();
    assert!(text.contains(&offline_id.to_string()), "{text}");
    assert!(text.contains(&a.id().to_string()), "{text}");
    assert_eq!(b.has(unknown).await.unwrap(), BlobState::Missing);
    assert!(b.tags().await.unwrap().is_empty());

    let err = b
        .download(unknown, &[], "dl/x", u64::MAX, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoProviders(_)));

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The key file is created 0600 with 32 bytes, reused across restarts (same endpoint id),
/// and refused once others can read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_is_private_reused_and_refused_when_readable() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    let first = node(&home).await;
    let id = first.id();
    first.shutdown().await.unwrap();

    let key = home.join(kez_blobs::KEY_FILE_NAME);
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    assert_eq!(
        std::fs::metadata(&home).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let second = node(&home).await;
    assert_eq!(second.id(), id);
    second.shutdown().await.unwrap();

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = BlobNode::open(&home, config()).await.unwrap_err();
    assert!(matches!(err, Error::KeyFile { .. }), "{err}");
    assert!(err.to_string().contains("0644"), "{err}");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&key, [7u8; 31]).unwrap();
    let err = BlobNode::open(&home, config()).await.unwrap_err();
    assert!(matches!(err, Error::KeyFile { .. }), "{err}");
}

/// On a node with GC, a blob whose tag was deleted disappears; tagged blobs (imported or
/// downloaded) stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_reclaims_untagged_blobs_only() {
    let (dir_a, dir_pin) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(dir_a.path()).await;
    let pin = BlobNode::open(
        dir_pin.path(),
        NodeConfig {
            gc_interval: Some(Duration::from_millis(100)),
            ..config()
        },
    )
    .await
    .unwrap();

    let (keep, drop_bytes) = (data(MIB, 3), data(MIB + 5, 4));
    let (keep_hash, _) = import(&pin, &keep, "pin/keep").await;
    let (drop_hash, _) = import(&pin, &drop_bytes, "pin/drop").await;
    let remote = data(3 * MIB, 5);
    let (remote_hash, remote_size) = import(&a, &remote, "share").await;
    pin.download(remote_hash, &[a.addr()], "pin/remote", u64::MAX, |_| {})
        .await
        .unwrap();
    let usage = pin.usage().await.unwrap();
    assert_eq!(usage.complete_blobs, 3);
    assert_eq!(usage.complete_bytes, (2 * MIB + 5) as u64 + remote_size);

    assert!(pin.delete_tag("pin/drop").await.unwrap());
    assert!(!pin.delete_tag("pin/drop").await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while pin.has(drop_hash).await.unwrap() != BlobState::Missing {
        assert!(Instant::now() < deadline, "GC did not reclaim the blob");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several more GC runs: tagged blobs survive them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(matches!(
        pin.has(keep_hash).await.unwrap(),
        BlobState::Complete { .. }
    ));
    assert_eq!(read_all(&pin, remote_hash).await, remote);
    let usage = pin.usage().await.unwrap();
    assert_eq!((usage.complete_blobs, usage.partial_blobs), (2, 0));
    let names: Vec<_> = pin
        .tags()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["pin/keep", "pin/remote"]);

    a.shutdown().await.unwrap();
    pin.shutdown().await.unwrap();
}

/// A node without periodic GC (a client's) deletes untagged blobs when asked and when it opens,
/// and keeps tagged ones; it opens without what unfinished imports left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untagged_blobs_go_when_asked_and_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path()).await;
    let (kept, _) = import(&a, &data(MIB, 7), "kept").await;
    let (now, _) = import(&a, &data(MIB, 11), "now").await;
    let (later, _) = import(&a, &data(MIB, 13), "later").await;
    assert!(a.delete_tag("now").await.unwrap());
    a.collect_garbage().await.unwrap();
    assert_eq!(a.has(now).await.unwrap(), BlobState::Missing);
    assert!(a.delete_tag("later").await.unwrap());
    // Nothing collects it while the node runs without being asked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        a.has(later).await.unwrap(),
        BlobState::Complete { .. }
    ));
    a.shutdown().await.unwrap();
    // The temp file of an import a killed process did not finish.
    let leftover = dir
        .path()
        .join(kez_blobs::STORE_DIR_NAME)
        .join("temp")
        .join("unfinished.temp");
    std::fs::write(&leftover, data(MIB, 15)).unwrap();

    let a = node(dir.path()).await;
    assert!(
        !leftover.exists(),
        "an unfinished import's temp file stayed"
    );
    assert_eq!(a.has(later).await.unwrap(), BlobState::Missing);
    assert!(matches!(
        a.has(kept).await.unwrap(),
        BlobState::Complete { .. }
    ));
    a.shutdown().await.unwrap();
}

/// Whoever names a blob cannot make a node fetch more than it expects: a download of a 16 MiB
/// blob capped at 1 MiB stops, reports nothing past the cap and keeps nothing; a blob of
/// exactly the cap downloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_expected_stops_early_and_is_not_kept() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (node(dir_a.path()).await, node(dir_b.path()).await);
    let bytes = data(16 * MIB, 7);
    let (hash, _) = import(&a, &bytes, "share/big").await;

    let mut most = 0;
    let err = b
        .download(hash, &[a.addr()], "dl/capped", MIB as u64, |p| {
            most = most.max(p.done)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { hash: h, max } if h == hash && max == MIB as u64),
        "{err}"
    );
    assert!(most <= MIB as u64, "reported {most} bytes past the cap");
    b.collect_garbage().await.unwrap();
    assert_eq!(
        b.has(hash).await.unwrap(),
        BlobState::Missing,
        "what arrived is not kept"
    );
    let usage = b.usage().await.unwrap();
    assert_eq!((usage.complete_blobs, usage.partial_blobs), (0, 0));

    let small = data(MIB, 9);
    let (small_hash, small_size) = import(&a, &small, "share/small").await;
    let stats = b
        .download(small_hash, &[a.addr()], "dl/small", small_size, |_| {})
        .await
        .unwrap();
    assert_eq!(stats.total, small_size);
}

/// A watcher of A sees B's download of a blob: it starts, progresses in order and completes,
/// naming B and the whole size; and a node nobody watches serves as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_served_sees_a_download_start_progress_and_complete() {
    use kez_blobs::{ServeEvent, Served};
    use tokio::sync::broadcast::error::RecvError;

    let dirs = [(); 3].map(|_| tempfile::tempdir().unwrap());
    let (a, b, c) = (
        node(dirs[0].path()).await,
        node(dirs[1].path()).await,
        node(dirs[2].path()).await,
    );
    let bytes = data(4 * MIB, 3);
    let (hash, size) = import(&a, &bytes, "share/watched").await;
    let mut watch = a.watch_served();

    // Nobody watches C: serving is unaffected.
    let (other, _) = import(&c, &data(MIB, 5), "share/unwatched").await;
    b.download(other, &[c.addr()], "dl/unwatched", u64::MAX, |_| {})
        .await
        .expect("download from an unwatched node");

    b.download(hash, &[a.addr()], "dl/watched", u64::MAX, |_| {})
        .await
        .expect("download");
    let mut events: Vec<Served> = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), watch.recv())
            .await
            .expect("events within 5 s");
        match event {
            Ok(event) => {
                let done = matches!(event.event, ServeEvent::Completed { .. });
                events.push(event);
                if done {
                    break;
                }
            }
            Err(RecvError::Lagged(n)) => panic!("lagged by {n}"),
            Err(RecvError::Closed) => panic!("closed"),
        }
    }
    assert!(events.iter().all(|e| e.hash == hash && e.size == size));
    assert!(events.iter().all(|e| e.peer == Some(b.id())));
    assert_eq!(events[0].event, ServeEvent::Started);
    assert_eq!(events[0].offset, 0);
    let progress: Vec<u64> = events
        .iter()
        .filter(|e| e.event == ServeEvent::Progress)
        .map(|e| e.offset)
        .collect();
    assert!(
        !progress.is_empty() && progress.len() <= 101,
        "{progress:?}"
    );
    assert!(progress.windows(2).all(|w| w[0] < w[1]));
    let last = events.last().unwrap();
    assert_eq!(last.event, ServeEvent::Completed { sent: size });
    assert_eq!(last.offset, size);

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
    // The node is gone: the channel closes, and a new watcher's is closed already.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.recv().await {
                Err(RecvError::Closed) => break,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
            }
        }
    })
    .await
    .expect("closed at shutdown");
    assert_eq!(a.watch_served().recv().await, Err(RecvError::Closed));
}

/// Reads all of `reader` on a blocking thread.
async fn read_blocking(mut reader: impl io::Read + Send + 'static) -> io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map(|_| out)
    })
    .await
    .expect("reading thread")
}

/// The blocking reader gives a complete blob's bytes, from its data file (8 MiB) or from the
/// database (a blob the store keeps inline), and refuses a blob that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_reader_reads_large_and_inline_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path()).await;
    for (len, seed) in [(8 * MIB, 11), (1000, 13)] {
        let bytes = data(len, seed);
        let (hash, _) = import(&a, &bytes, &format!("share/{len}")).await;
        let (reader, size) = a.blocking_reader(hash).await.expect("reader");
        assert_eq!(size, len as u64);
        assert_eq!(read_blocking(reader).await.unwrap(), bytes);
    }
    let missing = Hash::new(b"not in this store");
    assert!(matches!(
        a.blocking_reader(missing).await,
        Err(Error::NotComplete(h)) if h == missing
    ));
    a.shutdown().await.unwrap();
}

/// A reader following a download reads the same bytes as the blob, while it arrives; a small
/// blob is not followed (the store keeps it inline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_download_reads_the_blob_as_it_arrives() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (node(dir_a.path()).await, node(dir_b.path()).await);
    let bytes = data(16 * MIB, 17);
    let (hash, size) = import(&a, &bytes, "share/followed").await;

    let (following, reader) = b.follow(hash, size).await.unwrap().expect("followed");
    let reading = tokio::spawn(read_blocking(reader));
    b.download(hash, &[a.addr()], "dl/followed", size, |_| {})
        .await
        .expect("download");
    let read = reading.await.unwrap().expect("read while downloading");
    assert!(read == bytes, "the followed bytes differ from the blob");
    drop(following);

    assert!(b.follow(hash, 1000).await.unwrap().is_none());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A reader whose download stopped fails with the reason, instead of waiting for bytes that
/// never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_follow_fails_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let b = node(dir.path()).await;
    let hash = Hash::new(b"never downloaded");
    let (following, reader) = b
        .follow(hash, 8 * MIB as u64)
        .await
        .unwrap()
        .expect("followed");
    let reading = tokio::spawn(read_blocking(reader));
    following.stop("the provider went away");
    let err = reading.await.unwrap().expect_err("a stopped follow fails");
    assert!(err.to_string().contains("the provider went away"), "{err}");
    b.shutdown().await.unwrap();
}
