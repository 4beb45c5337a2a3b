//! Measurement 4, file transfer over loopback iroh.
//!
//! Ours: the `kez-chat` binary, as separate processes with their own homes, on a stack with the
//! auth callout: `share` (encrypt while streaming the ciphertext into the sender's blob store,
//! send the offer), then, with the sender's `listen` serving, `download` (fetch over iroh,
//! BLAKE3-verified, decrypt into a temporary file, fsync, rename into place). The peak RSS of
//! each process is its `VmHWM`, polled from /proc while it runs (a high-water mark: polling late
//! loses nothing but the last interval). The same three steps are also timed one by one on two
//! kez-blobs nodes in this process, through the kez-client functions the binary calls: share,
//! fetch alone, decrypt and write alone.
//!
//! Baselines, from the same run:
//! - raw iroh-blobs: the same bytes, unencrypted, through two bare iroh-blobs `FsStore` nodes in
//!   this process, the fastest path iroh-blobs offers for a file: import it (a copy into the
//!   store), fetch it store to store, export it (a copy out of the store) and fsync the copy;
//! - the disk: the same size written and fsynced, and the two-writes limit derived from it. A
//!   download writes the file twice (the ciphertext into the blob store, the plaintext out), so
//!   it cannot beat half the disk's speed.
//!
//! Also the AEAD alone: `kez_core::file` encrypting and decrypting in memory against the bare
//! ChaCha20-Poly1305 primitive over the same 64 KiB segments.

use std::io::{Cursor, Read, Write};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use iroh::endpoint::{PortmapperConfig, presets};
use iroh::protocol::Router;
use iroh::{Endpoint, NetReportConfig, RelayMode};
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::{BlobsProtocol, HashAndFormat};
use kez_blobs::{BlobNode, NodeConfig};
use kez_client::files as kez_files;
use kez_core::file::{self, ContentKey, SEGMENT_LEN};
use kez_tests::callout::CalloutStack;
use kez_tests::person::{Person, alice_and_bob, kez_chat};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::measure::{Budget, mib, mib_per_sec, proc_status_kib};
use crate::report::{Goal, Row};

const SECTION: &str = "files";
/// The flat-memory goal for sender and receiver, MiB.
pub const RSS_GOAL_MIB: f64 = 100.0;
/// The download goal of issue 26 at 1 GiB, MiB/s (0.8 of the two-writes limit on the
/// project's machine).
pub const DOWNLOAD_GOAL_MIB_S: f64 = 150.0;
/// How often the processes' memory is polled.
const POLL: Duration = Duration::from_millis(20);
const MIB: u64 = 1024 * 1024;

/// Runs measurement 4.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    let size = budget.pick(64 * MIB, 1024 * MIB);
    let label = format!("{} MiB", size / MIB);
    let work = tempfile::Builder::new()
        .prefix("kez-bench-files-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let original = work.path().join("payload.bin");
    write_payload(&original, size)?;

    let disk = mib_per_sec(size, disk_write(work.path(), size)?);
    // Two writes of the whole file, one after the other, each at the disk's speed.
    let limit = disk / 2.0;
    let raw = raw_transfer(work.path(), &original).await?;
    let steps = kez_steps(work.path(), &original).await?;
    let ours = kez_transfer(work.path(), &original).await?;
    let download = mib_per_sec(size, ours.download);
    let mut rows = vec![
        Row::info(
            SECTION,
            format!("disk: write {label}, fsync"),
            "MiB/s",
            disk,
        ),
        Row::info(
            SECTION,
            format!("two-writes limit {label} (half the disk's speed)"),
            "MiB/s",
            limit,
        ),
        Row::versus(
            SECTION,
            format!("share + download {label}"),
            "MiB/s",
            mib_per_sec(size, ours.share + ours.download),
            mib_per_sec(size, raw.import + raw.fetch + raw.export),
            "raw iroh-blobs",
            Goal::RatioAtLeast(0.6),
        ),
        Row::versus(
            SECTION,
            format!("share {label} (encrypt into the store)"),
            "MiB/s",
            mib_per_sec(size, ours.share),
            mib_per_sec(size, raw.import),
            "iroh-blobs import",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("download {label} (fetch, verify, decrypt, write)"),
            "MiB/s",
            download,
            mib_per_sec(size, raw.fetch + raw.export),
            "iroh-blobs fetch, export",
            Goal::RatioAtLeast(0.6),
        ),
        Row::versus(
            SECTION,
            format!("download {label} (fetch, verify, decrypt, write)"),
            "MiB/s",
            download,
            limit,
            "two-writes limit",
            // The goal is for 1 GiB: at 64 MiB, starting the process and the node weighs.
            budget.pick(Goal::None, Goal::AtLeast(DOWNLOAD_GOAL_MIB_S)),
        ),
        Row::versus(
            SECTION,
            format!("in one process: share {label}"),
            "MiB/s",
            mib_per_sec(size, steps.share),
            mib_per_sec(size, raw.import),
            "iroh-blobs import",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("in one process: fetch {label} store to store"),
            "MiB/s",
            mib_per_sec(size, steps.fetch),
            mib_per_sec(size, raw.fetch),
            "iroh-blobs fetch",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("in one process: decrypt {label} from the store, write, fsync"),
            "MiB/s",
            mib_per_sec(size, steps.decrypt),
            mib_per_sec(size, raw.export),
            "iroh-blobs export, fsync",
            Goal::None,
        ),
    ];
    for (name, kib) in [
        ("sender peak RSS, share", ours.share_peak_kib),
        ("sender peak RSS, listen (serving)", ours.listen_peak_kib),
        ("receiver peak RSS, download", ours.download_peak_kib),
    ] {
        rows.push(
            Row::info(SECTION, format!("{name} {label}"), "MiB", mib(kib))
                .goal(Goal::AtMost(RSS_GOAL_MIB)),
        );
    }
    rows.extend(aead(budget)?);
    Ok(rows)
}

/// Writes `size` bytes to a new file in `work` in 1 MiB blocks and fsyncs it: the disk's own
/// speed, the bound of every step that writes a file. Answers the time, fsync included.
fn disk_write(work: &Path, size: u64) -> Result<Duration, String> {
    let path = work.join("disk.bin");
    let failed = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    // Not zeros: no layer below may take a shortcut for them.
    let block: Vec<u8> = (0..MIB).map(|i| (i * 131 % 251) as u8).collect();
    let started = Instant::now();
    let mut out = std::fs::File::create(&path).map_err(failed)?;
    let mut left = size;
    while left > 0 {
        let take = left.min(MIB) as usize;
        out.write_all(&block[..take]).map_err(failed)?;
        left -= take as u64;
    }
    out.sync_all().map_err(failed)?;
    let took = started.elapsed();
    drop(out);
    std::fs::remove_file(&path).map_err(failed)?;
    Ok(took)
}

/// Writes `size` pseudo-random (incompressible) bytes to `path`.
fn write_payload(path: &Path, size: u64) -> Result<(), String> {
    let file = std::fs::File::create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let take = left.min(MIB) as usize;
        out.write_all(&block[..take])
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        left -= take as u64;
    }
    out.flush()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> Result<bool, String> {
    let open = |path: &Path| {
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))
    };
    let (mut a, mut b) = (open(a)?, open(b)?);
    let (mut left, mut right) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    loop {
        let read_a = read_full(&mut a, &mut left)?;
        let read_b = read_full(&mut b, &mut right)?;
        if read_a != read_b || left[..read_a] != right[..read_b] {
            return Ok(false);
        }
        if read_a == 0 {
            return Ok(true);
        }
    }
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, String> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(e) => return Err(format!("cannot read: {e}")),
        }
    }
    Ok(filled)
}

/// Times of the raw iroh-blobs transfer.
struct RawTimes {
    import: Duration,
    fetch: Duration,
    export: Duration,
}

/// A bare iroh-blobs node: an `FsStore` in `dir` served on a loopback endpoint with kez-blobs'
/// network settings (iroh's `Minimal` preset, no relay, no port mapping, minimal net report).
async fn raw_node(dir: &Path) -> Result<(FsStore, Router), String> {
    let store = FsStore::load(dir)
        .await
        .map_err(|e| format!("cannot open the raw store {}: {e}", dir.display()))?;
    let endpoint = Endpoint::builder(presets::Minimal)
        .relay_mode(RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr(std::net::SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST,
            0,
        )))
        .map_err(|e| format!("raw endpoint: {e}"))?
        .portmapper_config(PortmapperConfig::Disabled)
        .net_report_config(NetReportConfig::minimal())
        .bind()
        .await
        .map_err(|e| format!("raw endpoint: {e}"))?;
    let router = Router::builder(endpoint)
        .accept(iroh_blobs::ALPN, BlobsProtocol::new(&store, None))
        .spawn();
    Ok((store, router))
}

async fn raw_transfer(work: &Path, original: &Path) -> Result<RawTimes, String> {
    let (sender, sender_router) = raw_node(&work.join("raw-sender")).await?;
    let (receiver, receiver_router) = raw_node(&work.join("raw-receiver")).await?;
    let started = Instant::now();
    let imported = sender
        .blobs()
        .add_path(original)
        .await
        .map_err(|e| format!("raw import: {e}"))?;
    let import = started.elapsed();

    let started = Instant::now();
    let conn = receiver_router
        .endpoint()
        .connect(sender_router.endpoint().addr(), iroh_blobs::ALPN)
        .await
        .map_err(|e| format!("raw connect: {e}"))?;
    receiver
        .remote()
        .fetch(conn.clone(), HashAndFormat::raw(imported.hash))
        .await
        .map_err(|e| format!("raw fetch: {e}"))?;
    conn.close(0u32.into(), b"done");
    let fetch = started.elapsed();

    let target = work.join("raw-received.bin");
    let started = Instant::now();
    receiver
        .blobs()
        .export(imported.hash, &target)
        .await
        .map_err(|e| format!("raw export: {e}"))?;
    std::fs::File::open(&target)
        .and_then(|exported| exported.sync_all())
        .map_err(|e| format!("raw export: fsync {}: {e}", target.display()))?;
    let export = started.elapsed();
    if !same_bytes(original, &target)? {
        return Err("the raw transfer changed the bytes".to_owned());
    }
    sender_router.shutdown().await.map_err(|e| e.to_string())?;
    receiver_router
        .shutdown()
        .await
        .map_err(|e| e.to_string())?;
    std::fs::remove_file(&target).map_err(|e| e.to_string())?;
    for dir in ["raw-sender", "raw-receiver"] {
        std::fs::remove_dir_all(work.join(dir)).map_err(|e| e.to_string())?;
    }
    Ok(RawTimes {
        import,
        fetch,
        export,
    })
}

/// Times of the kez-client steps in one process.
struct StepTimes {
    share: Duration,
    fetch: Duration,
    decrypt: Duration,
}

/// Shares `original` from one kez-blobs node and downloads it on another, in this process,
/// timing each step the `kez-chat` binary takes.
async fn kez_steps(work: &Path, original: &Path) -> Result<StepTimes, String> {
    let node = |name: &str| {
        let dir = work.join(name);
        async move {
            BlobNode::open(&dir, NodeConfig::default())
                .await
                .map_err(|e| format!("cannot open the node {}: {e}", dir.display()))
        }
    };
    let sender = node("steps-sender").await?;
    let receiver = node("steps-receiver").await?;
    let started = Instant::now();
    let offer = kez_files::share_file(
        &sender,
        original,
        "bench/steps",
        vec![sender.provider()],
        |_| {},
    )
    .await
    .map_err(|e| format!("share: {e}"))?;
    let share = started.elapsed();
    let started = Instant::now();
    kez_files::fetch(&receiver, &offer, |_| {})
        .await
        .map_err(|e| format!("fetch: {e}"))?;
    let fetch = started.elapsed();
    let target = work.join("steps-received.bin");
    let started = Instant::now();
    kez_files::decrypt_to(&receiver, &offer, &target, |_| {})
        .await
        .map_err(|e| format!("decrypt: {e}"))?;
    let decrypt = started.elapsed();
    if !same_bytes(original, &target)? {
        return Err("the kez-client steps changed the bytes".to_owned());
    }
    sender.shutdown().await.map_err(|e| e.to_string())?;
    receiver.shutdown().await.map_err(|e| e.to_string())?;
    std::fs::remove_file(&target).map_err(|e| e.to_string())?;
    for dir in ["steps-sender", "steps-receiver"] {
        std::fs::remove_dir_all(work.join(dir)).map_err(|e| e.to_string())?;
    }
    Ok(StepTimes {
        share,
        fetch,
        decrypt,
    })
}

/// Times and memory of the kez-chat transfer.
struct KezTimes {
    share: Duration,
    download: Duration,
    share_peak_kib: u64,
    listen_peak_kib: u64,
    download_peak_kib: u64,
}

async fn kez_transfer(work: &Path, original: &Path) -> Result<KezTimes, String> {
    let stack = CalloutStack::start().await;
    let (alice, bob) = alice_and_bob(&stack.nats.url()).await;
    let path = original.to_str().ok_or("the work directory is not UTF-8")?;

    let started = Instant::now();
    let (shared, share_peaks) =
        run_watched(&alice, &["share", "--no-wait", "@bob", path], &[]).await?;
    let share = started.elapsed();
    let offer = String::from_utf8_lossy(&shared.stdout).trim().to_owned();
    bob.ok(&["inbox"]).await;

    let mut listening = serving(&alice).await?;
    let listen_pid = listening.id().ok_or("listen exited")?;
    let target = work.join("received.bin");
    let target_text = target.to_str().ok_or("the work directory is not UTF-8")?;
    let started = Instant::now();
    let (_, download_peaks) = run_watched(
        &bob,
        &["download", &offer, "-o", target_text, "--json"],
        &[listen_pid],
    )
    .await?;
    let download = started.elapsed();
    let listen_now = proc_status_kib(listen_pid, "VmHWM").unwrap_or(0);
    let _ = listening.start_kill();
    let _ = listening.wait().await;
    if !same_bytes(original, &target)? {
        return Err("the kez-chat transfer changed the bytes".to_owned());
    }
    std::fs::remove_file(&target).map_err(|e| e.to_string())?;
    Ok(KezTimes {
        share,
        download,
        share_peak_kib: share_peaks[0],
        listen_peak_kib: download_peaks[1].max(listen_now),
        download_peak_kib: download_peaks[0],
    })
}

/// Runs `kez-chat args…` in `person`'s home to success, polling the peak RSS of it and of
/// `also`; answers its output and the peaks (KiB), its own first.
async fn run_watched(
    person: &Person,
    args: &[&str],
    also: &[u32],
) -> Result<(Output, Vec<u64>), String> {
    let mut command = tokio::process::Command::from(kez_chat(&person.home, args));
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start kez-chat {args:?}: {e}"))?;
    let pid = child.id().ok_or("kez-chat exited at once")?;
    let mut pids = vec![pid];
    pids.extend_from_slice(also);
    let mut peaks = vec![0u64; pids.len()];
    let output = child.wait_with_output();
    tokio::pin!(output);
    let output = loop {
        for (peak, pid) in peaks.iter_mut().zip(&pids) {
            if let Some(kib) = proc_status_kib(*pid, "VmHWM") {
                *peak = (*peak).max(kib);
            }
        }
        tokio::select! {
            done = &mut output => break done.map_err(|e| format!("kez-chat {args:?}: {e}"))?,
            () = tokio::time::sleep(POLL) => {}
        }
    };
    if !output.status.success() {
        return Err(format!(
            "kez-chat {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok((output, peaks))
}

/// Starts `listen` for `person` and waits until it serves files.
async fn serving(person: &Person) -> Result<Child, String> {
    let mut command = tokio::process::Command::from(kez_chat(&person.home, &["listen"]));
    command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start listen: {e}"))?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let served = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("serving your shared files") {
                return true;
            }
        }
        false
    })
    .await;
    if served != Ok(true) {
        return Err("listen did not start serving within 30 s".to_owned());
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

/// AEAD throughput in memory: kez_core::file against bare ChaCha20-Poly1305 per segment.
fn aead(budget: Budget) -> Result<Vec<Row>, String> {
    let size = budget.pick(64 * MIB, 256 * MIB) as usize;
    let plaintext = vec![0x5au8; size];
    let key = ContentKey::generate();

    // Both outputs are touched before the clock starts, as the baseline's buffer is: otherwise
    // the first write to each page (a page fault, the kernel zeroing it) is timed as if it were
    // the cipher's work.
    let mut ciphertext = prefaulted(size + size / SEGMENT_LEN * 16 + 64);
    let mut decrypted = prefaulted(size);
    let started = Instant::now();
    file::encrypt(&key, Cursor::new(&plaintext), &mut ciphertext)
        .map_err(|e| format!("encrypt: {e}"))?;
    let encrypt = started.elapsed();
    let started = Instant::now();
    file::decrypt(&key, Cursor::new(&ciphertext), &mut decrypted)
        .map_err(|e| format!("decrypt: {e}"))?;
    let decrypt = started.elapsed();
    if decrypted != plaintext {
        return Err("decrypt did not give the plaintext back".to_owned());
    }

    let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_bytes()));
    let mut buffer = plaintext.clone();
    let started = Instant::now();
    let mut tags = Vec::with_capacity(size / SEGMENT_LEN + 1);
    for (index, segment) in buffer.chunks_mut(SEGMENT_LEN).enumerate() {
        let tag = cipher
            .encrypt_in_place_detached(&nonce(index), b"", segment)
            .map_err(|_| "bare encrypt failed".to_owned())?;
        tags.push(tag);
    }
    let bare_encrypt = started.elapsed();
    let started = Instant::now();
    for ((index, segment), tag) in buffer.chunks_mut(SEGMENT_LEN).enumerate().zip(&tags) {
        cipher
            .decrypt_in_place_detached(&nonce(index), b"", segment, tag)
            .map_err(|_| "bare decrypt failed".to_owned())?;
    }
    let bare_decrypt = started.elapsed();
    if buffer != plaintext {
        return Err("bare decrypt did not give the plaintext back".to_owned());
    }
    let bytes = size as u64;
    let label = format!("{} MiB in memory", bytes / MIB);
    Ok(vec![
        Row::versus(
            SECTION,
            format!("AEAD encrypt {label}"),
            "MiB/s",
            mib_per_sec(bytes, encrypt),
            mib_per_sec(bytes, bare_encrypt),
            "bare ChaCha20-Poly1305",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("AEAD decrypt {label}"),
            "MiB/s",
            mib_per_sec(bytes, decrypt),
            mib_per_sec(bytes, bare_decrypt),
            "bare ChaCha20-Poly1305",
            Goal::None,
        ),
    ])
}

/// An empty vector whose `capacity` bytes of memory are already mapped.
fn prefaulted(capacity: usize) -> Vec<u8> {
    let mut buffer = std::hint::black_box(vec![1u8; capacity]);
    buffer.clear();
    buffer
}

/// A distinct 96-bit nonce per segment for the bare baseline.
fn nonce(index: usize) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&(index as u64).to_be_bytes());
    Nonce::clone_from_slice(&bytes)
}
