//! Measurement 6, footprint at a measured number of registered users (issue 20: no JetStream
//! consumer per user). One broker with the kez accounts and the auth callout, the real
//! `kez-chat-server` binary answering it, `n` users registered through `kez.registry.register`:
//!
//! - nats-server's resident memory idle and with `n` users, and per registered user against a
//!   broker of the same configuration holding the same key-value entries written raw (the
//!   handle record, the reverse entry and the two directory entries), without kez-chat-server:
//!   what a registered user costs the broker beyond its KV data;
//! - the registration rate over the first and over the last [`RATE_WINDOW`] registrations;
//! - a broker restart (stop, then start on the same store until JetStream is ready) and a
//!   kez-chat-server start (spawn until it answers `kez.server.info`), with `n` users and with
//!   none;
//! - the broker CPU of a user coming online: [`BACKLOG`] messages waiting, one `kez.mail.fetch`
//!   that reads them and one that acknowledges them, on the user's own connection through the
//!   auth callout, at two registered counts; and the same JetStream calls made directly (what
//!   the server makes for the user, without the hop through it);
//! - JetStream disk per user (against the raw KV entries) and per stored message.

use std::collections::VecDeque;
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{Client, HeaderMap, jetstream};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use kez_chat_server::store::{HANDLES_BUCKET, KEYS_BUCKET, KeyRecord, Store};
use kez_core::envelope::MessageId;
use kez_core::{Handle, SecretKey};
use kez_proto::answer::{HandleRecord, Profile};
use kez_proto::directory::{DIRECTORY_BUCKET, Slot};
use kez_proto::endpoint::Endpoint;
use kez_proto::mail::{FetchAnswer, FetchRequest, MAX_FETCH_MESSAGES};
use kez_proto::subjects::inbox_subject;
use kez_tests::NatsServer;
use kez_tests::callout::{CalloutProcessStack, keys_and_broker, server_client};
use kez_tests::kez_server::TEST_DOMAIN;
use kez_tests::process::{LIMITS_OFF, kez_chat_server_command};
use tempfile::TempDir;

use crate::chat::{BODY_BYTES, WINDOW};
use crate::measure::{Budget, cpu_of, disk_usage, median, mib, nats_pid, per_sec, proc_status_kib};
use crate::report::{Goal, Row};

const SECTION: &str = "footprint";
/// Registrations in flight at once.
const CONCURRENCY: usize = 64;
/// How long nats-server gets to write what it buffered (and its memory to settle) before a
/// measurement.
const SETTLE: Duration = Duration::from_secs(2);
/// Registrations timed at the start and at the end of the run, whose rates are compared.
const RATE_WINDOW: usize = 1_000;
/// The smaller registered count at which users come online (or a tenth of the users).
const EARLY_USERS: usize = 10_000;
/// Messages each user coming online finds waiting.
const BACKLOG: usize = 3;
/// How often each start is timed; the median counts.
const STARTS: usize = 3;
/// Users connected at once while coming online.
const ONLINE_BATCH: usize = 1_000;
/// Users connecting, or fetching, at once.
const ONLINE_CONCURRENCY: usize = 16;
/// How long a kez-chat-server may take to answer again (after a start or a broker restart).
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Broker CPU per user coming online with one durable consumer per user on the old work-queue
/// inbox, at 10,000 users online (/work/shared/facts/jetstream-inbox-scale.md): not this run.
const CONSUMER_ONLINE_MS: f64 = 10.4;
/// How far a time that must not depend on the user count may grow: "about the same", with room
/// for this machine's noise and the fixture's 20 ms readiness poll.
const FLAT: f64 = 1.5;
/// The goal for a registered user's memory in nats-server beyond its KV data, KiB.
const BEYOND_KV_KIB: f64 = 2.0;

/// Runs measurement 6.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    let users = budget.users.unwrap_or(budget.pick(2_000, 100_000)).max(2);
    let early = (users / 10).clamp(1, EARLY_USERS);
    let online = budget.pick(200, 5_000).min(early);
    let window = RATE_WINDOW.min(users / 2);
    let messages = budget.pick(5_000, 50_000);
    let sealed = sealed_len()?;

    // The baseline first, on a broker of its own that is gone before ours starts.
    let began = Instant::now();
    let raw = RawKv::measure(users).await?;
    eprintln!(
        "footprint: baseline, {users} users' KV entries written raw in {:.1?}: nats-server \
         {:.1} -> {:.1} MiB",
        began.elapsed(),
        mib(raw.idle),
        mib(raw.full)
    );

    let mut stack = CalloutProcessStack::start_with_args(&LIMITS_OFF).await;
    let admin = stack.server_client().await;
    let js = jetstream::new(admin.clone());
    let store = stack.nats.store_dir();
    tokio::time::sleep(SETTLE).await;
    let server_idle = rss(stack.server.id(), "kez-chat-server")?;
    let nats_idle = rss(nats_pid(&stack.nats)?, "nats-server")?;
    let disk_empty = disk_usage(&store);

    // Starts with (almost) nobody registered.
    let mut serving = None;
    let server_start_idle = time_server_starts(&mut stack, &admin, &mut serving).await?;
    let broker_restart_idle = time_broker_restarts(&mut stack.nats, Some(&admin)).await?;
    let serving_pid = |serving: &Option<ServerChild>| serving.as_ref().map_or(0, ServerChild::id);

    let keys: Vec<Arc<SecretKey>> = (0..users)
        .map(|_| Arc::new(SecretKey::generate()))
        .collect();
    let done = Arc::new(AtomicUsize::new(0));
    let progress = tokio::spawn(report_progress(done.clone(), users));
    let (mut finished, clock) =
        register_all(&admin, &keys[..early], 0, Duration::ZERO, &done).await?;
    let online_early =
        come_online(&stack, &js, &keys[..online], serving_pid(&serving), sealed).await?;
    let raw_online_early = come_online_raw(&stack, &js, &keys[..online], sealed).await?;
    let (rest, clock) = register_all(&admin, &keys[early..], early, clock, &done).await?;
    progress.abort();
    finished.extend(rest);
    finished.sort_unstable();
    let registering = clock;
    let rate_first = per_sec(window, finished[window - 1]);
    let rate_last = per_sec(window, finished[users - 1] - finished[users - 1 - window]);

    tokio::time::sleep(SETTLE).await;
    let server_full = rss(serving_pid(&serving), "kez-chat-server")?;
    let nats_full = rss(nats_pid(&stack.nats)?, "nats-server")?;

    let broker_restart_full = time_broker_restarts(&mut stack.nats, Some(&admin)).await?;
    eprintln!(
        "footprint: broker restart (median stop + start; JetStream's own start as logged): \
         no users {:?} + {:?} ({}); {users} users {:?} + {:?} ({}); their KV entries written \
         raw {:?} + {:?} ({})",
        broker_restart_idle.stop,
        broker_restart_idle.start,
        broker_restart_idle.jetstream_logged,
        broker_restart_full.stop,
        broker_restart_full.start,
        broker_restart_full.jetstream_logged,
        raw.restart.stop,
        raw.restart.start,
        raw.restart.jetstream_logged,
    );
    tokio::time::sleep(SETTLE).await;
    let nats_restarted = rss(nats_pid(&stack.nats)?, "nats-server")?;
    // After the graceful stops, as for the baseline (see there).
    let disk_users = disk_usage(&store);
    let server_start_full = time_server_starts(&mut stack, &admin, &mut serving).await?;

    let late = &keys[users - online..];
    let online_full = come_online(&stack, &js, late, serving_pid(&serving), sealed).await?;
    let raw_online_full = come_online_raw(&stack, &js, late, sealed).await?;
    eprintln!(
        "footprint: coming online, broker CPU per user: {:.3} ms at {early} users ({:.3} ms \
         raw), {:.3} ms at {users} ({:.3} ms raw)",
        online_early.broker_ms(),
        raw_online_early.broker_ms(),
        online_full.broker_ms(),
        raw_online_full.broker_ms()
    );

    let disk_before_messages = disk_usage(&store);
    publish_round_robin(&js, &keys, messages, sealed).await?;
    tokio::time::sleep(SETTLE).await;
    let disk_messages = disk_usage(&store);
    drop(serving);

    let per_user_kib = |from: u64, to: u64| to.saturating_sub(from) as f64 / users as f64;
    let disk_per_user = disk_users.saturating_sub(disk_empty) as f64 / users as f64;
    let per_message = disk_messages.saturating_sub(disk_before_messages) as f64 / messages as f64;
    let secs = |time: Duration| time.as_secs_f64();
    Ok(vec![
        Row::info(SECTION, "kez-chat-server RSS idle", "MiB", mib(server_idle)),
        Row::info(
            SECTION,
            format!("kez-chat-server RSS after {users} registrations"),
            "MiB",
            mib(server_full),
        ),
        Row::versus(
            SECTION,
            "nats-server RSS idle",
            "MiB",
            mib(nats_idle),
            mib(raw.idle),
            "same config, no kez-chat-server",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("nats-server RSS with {users} users"),
            "MiB",
            mib(nats_full),
            mib(raw.full),
            "their KV entries written raw",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("nats-server RSS per registered user, {users} users"),
            "KiB",
            per_user_kib(nats_idle, nats_full),
            per_user_kib(raw.idle, raw.full),
            "their KV entries written raw",
            Goal::AddedBelow(BEYOND_KV_KIB),
        ),
        Row::versus(
            SECTION,
            format!("nats-server RSS after a broker restart, {users} users"),
            "MiB",
            mib(nats_restarted),
            mib(raw.restarted),
            "their KV entries written raw",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("nats-server RSS per registered user after a restart, {users} users"),
            "KiB",
            per_user_kib(nats_idle, nats_restarted),
            per_user_kib(raw.idle, raw.restarted),
            "their KV entries written raw",
            Goal::AddedBelow(BEYOND_KV_KIB),
        ),
        Row::versus(
            SECTION,
            format!("registrations/s, the last {window} of {users} ({CONCURRENCY} concurrent)"),
            "req/s",
            rate_last,
            rate_first,
            "as many at the run's start",
            Goal::RatioAtLeast(0.8),
        ),
        Row::info(
            SECTION,
            format!("registrations/s, all {users}"),
            "req/s",
            per_sec(users, registering),
        ),
        Row::versus(
            SECTION,
            format!("broker restart (stop, start until ready), {users} users"),
            "s",
            secs(broker_restart_full.total),
            secs(broker_restart_idle.total),
            "no users",
            Goal::RatioAtMost(FLAT),
        ),
        Row::versus(
            SECTION,
            format!("broker restart, {users} users, against their KV data"),
            "s",
            secs(broker_restart_full.total),
            secs(raw.restart.total),
            "their KV entries written raw",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("kez-chat-server start (spawn until it answers), {users} users"),
            "s",
            secs(server_start_full),
            secs(server_start_idle),
            "no users",
            Goal::RatioAtMost(FLAT),
        ),
        Row::versus(
            SECTION,
            format!(
                "broker CPU per user coming online ({BACKLOG} messages: fetch + ack), {early} users"
            ),
            "ms",
            online_early.broker_ms(),
            CONSUMER_ONLINE_MS,
            "consumer per user, 10k (facts)",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("broker CPU per user coming online, {users} users"),
            "ms",
            online_full.broker_ms(),
            online_early.broker_ms(),
            "the same at the smaller count",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("broker CPU per user coming online, {users} users, against its calls"),
            "ms",
            online_full.broker_ms(),
            raw_online_full.broker_ms(),
            "direct get + purge, no hop",
            Goal::None,
        ),
        Row::info(
            SECTION,
            format!("kez-chat-server CPU per user coming online, {users} users"),
            "ms",
            online_full.server_ms(),
        ),
        Row::versus(
            SECTION,
            format!("JetStream disk per user, {users} users"),
            "B",
            disk_per_user,
            raw.disk_per_user,
            "their KV entries written raw",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("JetStream disk per stored message ({messages})"),
            "B",
            per_message,
            sealed as f64,
            "payload",
            Goal::None,
        ),
    ])
}

/// The size of a sealed chat body (see the chat section).
fn sealed_len() -> Result<usize, String> {
    let sender = SecretKey::generate();
    Ok(kez_core::envelope::seal(
        &sender,
        &sender.public_key(),
        "text",
        &[0; BODY_BYTES],
        kez_client::now(),
    )
    .map_err(|e| format!("seal: {e}"))?
    .1
    .len())
}

/// The resident memory of `pid`, KiB.
fn rss(pid: u32, what: &str) -> Result<u64, String> {
    proc_status_kib(pid, "VmRSS").ok_or(format!("{what} is gone: cannot read its memory"))
}

/// The baseline: a broker with the same configuration and the same buckets (made by the
/// server's own `Store::open`), into which the entries a registration writes (the key's
/// reverse entry and the handle record) are written directly for `n` users.
struct RawKv {
    /// nats-server's RSS before, KiB.
    idle: u64,
    /// After the entries, KiB.
    full: u64,
    /// After a restart on the same store, KiB.
    restarted: u64,
    /// JetStream disk per user, bytes.
    disk_per_user: f64,
    /// A broker restart with the entries.
    restart: Restart,
}

impl RawKv {
    async fn measure(users: usize) -> Result<RawKv, String> {
        let (keys_dir, _keys, mut nats) = keys_and_broker();
        let client = server_client(&nats.url(), keys_dir.path()).await;
        let js = jetstream::new(client.clone());
        Store::open(&js, Default::default())
            .await
            .map_err(|e| format!("creating the buckets: {e}"))?;
        let open = |bucket: &'static str| {
            let js = js.clone();
            async move {
                js.get_key_value(bucket)
                    .await
                    .map_err(|e| format!("bucket {bucket}: {e}"))
            }
        };
        let (handles, reverse) = (open(HANDLES_BUCKET).await?, open(KEYS_BUCKET).await?);
        let directory = open(DIRECTORY_BUCKET).await?;
        tokio::time::sleep(SETTLE).await;
        let idle = rss(nats_pid(&nats)?, "nats-server")?;
        let disk_empty = disk_usage(&nats.store_dir());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::with_capacity(CONCURRENCY);
        for _ in 0..CONCURRENCY {
            let (next, handles, reverse) = (next.clone(), handles.clone(), reverse.clone());
            let directory = directory.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= users {
                        return Ok::<(), String>(());
                    }
                    let key = SecretKey::generate().public_key();
                    let handle = Handle::parse(&format!("fp{index}"), TEST_DOMAIN)
                        .map_err(|e| format!("a handle: {e}"))?;
                    let record = KeyRecord {
                        name: handle.name().to_owned(),
                    };
                    reverse
                        .create(key.to_hex(), json(&record).into())
                        .await
                        .map_err(|e| format!("a reverse entry: {e}"))?;
                    let name = handle.name().to_owned();
                    let record = HandleRecord {
                        handle,
                        key,
                        registered_at: now,
                    };
                    handles
                        .create(name.clone(), json(&record).into())
                        .await
                        .map_err(|e| format!("a handle record: {e}"))?;
                    // The directory's two entries (PROTOCOL.md §5.7), as registration writes them.
                    let profile = Profile::new(record, None);
                    for slot in [Slot::handle(&name), Slot::key(&key)] {
                        directory
                            .create(slot.id(), slot.seal(&profile).into())
                            .await
                            .map_err(|e| format!("a directory entry: {e}"))?;
                    }
                }
            }));
        }
        for task in tasks {
            task.await
                .map_err(|e| format!("a writing task panicked: {e}"))??;
        }
        tokio::time::sleep(SETTLE).await;
        let full = rss(nats_pid(&nats)?, "nats-server")?;
        let restart = time_broker_restarts(&mut nats, None).await?;
        tokio::time::sleep(SETTLE).await;
        let restarted = rss(nats_pid(&nats)?, "nats-server")?;
        // After a graceful stop, which writes every stream's index (`index.db`) as a start
        // reads it: otherwise whether a periodic write had happened yet would count.
        let disk_full = disk_usage(&nats.store_dir());
        Ok(RawKv {
            idle,
            full,
            restarted,
            restart,
            disk_per_user: disk_full.saturating_sub(disk_empty) as f64 / users as f64,
        })
    }
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialise")
}

/// Prints how far the registrations are, every 30 s, for long runs.
async fn report_progress(done: Arc<AtomicUsize>, total: usize) {
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let done = done.load(Ordering::Relaxed);
        eprintln!(
            "footprint: {done} of {total} registered ({:.0}/s on average, pauses included)",
            per_sec(done, started.elapsed())
        );
    }
}

/// Registers `keys` as `fp<first + index>`, [`CONCURRENCY`] at a time. Answers when each
/// registration was answered on a clock of registration time only (starting at `clock`, so
/// that pauses between calls do not count), and that clock at the end.
async fn register_all(
    client: &Client,
    keys: &[Arc<SecretKey>],
    first: usize,
    clock: Duration,
    done: &Arc<AtomicUsize>,
) -> Result<(Vec<Duration>, Duration), String> {
    let keys: Arc<[Arc<SecretKey>]> = keys.into();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(CONCURRENCY);
    for _ in 0..CONCURRENCY {
        let (client, keys, next, done) = (client.clone(), keys.clone(), next.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut finished = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(key) = keys.get(index) else {
                    return Ok::<_, String>(finished);
                };
                let name = format!("fp{}", first + index);
                kez_tests::callout::register(&client, key, &name)
                    .await
                    .map_err(|e| format!("registering {name}: {e:?}"))?;
                finished.push(clock + started.elapsed());
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut finished = Vec::with_capacity(keys.len());
    for task in tasks {
        finished.extend(
            task.await
                .map_err(|e| format!("a registering task panicked: {e}"))??,
        );
    }
    Ok((finished, clock + started.elapsed()))
}

/// A `kez-chat-server run` of the bench's own, so that its start can be timed to the
/// millisecond (the fixture's readiness check polls every 50 ms); killed when dropped.
struct ServerChild {
    child: Child,
    dir: TempDir,
}

impl ServerChild {
    fn spawn(stack: &CalloutProcessStack) -> Result<ServerChild, String> {
        let dir = tempfile::Builder::new()
            .prefix("kez-bench-server-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let log = File::create(dir.path().join("kez-chat-server.log"))
            .map_err(|e| format!("the server's log: {e}"))?;
        let log_too = log
            .try_clone()
            .map_err(|e| format!("the server's log: {e}"))?;
        let mut command = kez_chat_server_command();
        command
            .arg("run")
            .arg("--nats-url")
            .arg(stack.nats.url())
            .arg("--domain")
            .arg(TEST_DOMAIN)
            .arg("--keys-dir")
            .arg(stack.keys_dir.path())
            .arg("--callout-issuer")
            .arg(&stack.keys.issuer)
            .args(LIMITS_OFF)
            .stdout(Stdio::from(log_too))
            .stderr(Stdio::from(log));
        let child = command
            .spawn()
            .map_err(|e| format!("starting kez-chat-server: {e}"))?;
        Ok(ServerChild { child, dir })
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kez-chat-server.log")).unwrap_or_default()
    }

    /// SIGTERM (through `kill`: no `unsafe` here), then waits for it to exit.
    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stdin(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stops the kez-chat-server serving now, then [`STARTS`] times starts one and waits until it
/// answers `kez.server.info` (stopping it again but the last); answers the median. The last one
/// keeps serving in `serving`.
async fn time_server_starts(
    stack: &mut CalloutProcessStack,
    admin: &Client,
    serving: &mut Option<ServerChild>,
) -> Result<Duration, String> {
    let mut times = Vec::with_capacity(STARTS);
    for _ in 0..STARTS {
        match serving.take() {
            Some(mut server) => tokio::task::block_in_place(|| server.terminate()),
            None => {
                tokio::task::block_in_place(|| stack.server.terminate());
            }
        }
        let began = Instant::now();
        let mut server = ServerChild::spawn(stack)?;
        loop {
            if answers(admin).await {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "kez-chat-server exited ({status}); log:\n{}",
                    server.log()
                ));
            }
            if began.elapsed() > SERVE_TIMEOUT {
                return Err(format!(
                    "kez-chat-server did not answer within {SERVE_TIMEOUT:?}; log:\n{}",
                    server.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        times.push(began.elapsed());
        *serving = Some(server);
    }
    Ok(median(times))
}

/// Whether a kez-chat-server answers `kez.server.info` now.
async fn answers(admin: &Client) -> bool {
    let request = admin.request(Endpoint::Info.subject(), Bytes::new());
    matches!(
        tokio::time::timeout(Duration::from_millis(500), request).await,
        Ok(Ok(_))
    )
}

/// How long broker restarts took (medians).
#[derive(Debug)]
struct Restart {
    /// Graceful stop: SIGTERM until the process has exited.
    stop: Duration,
    /// Start on the same store until nats-server logs that it is ready, JetStream included.
    start: Duration,
    /// The two together, restart by restart.
    total: Duration,
    /// What nats-server itself logged the last time ("Took … to start JetStream").
    jetstream_logged: String,
}

/// [`STARTS`] broker restarts: a graceful stop, then a start on the same store until nats-server
/// logs that it is ready (JetStream included; the fixture polls its log every 20 ms); answers
/// the medians. With `admin`, waits after each until kez-chat-server has reconnected and
/// answers again.
async fn time_broker_restarts(
    nats: &mut NatsServer,
    admin: Option<&Client>,
) -> Result<Restart, String> {
    let (mut stops, mut starts, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..STARTS {
        let began = Instant::now();
        tokio::task::block_in_place(|| nats.stop());
        let stopped = Instant::now();
        tokio::task::block_in_place(|| nats.resume());
        stops.push(stopped - began);
        starts.push(stopped.elapsed());
        totals.push(began.elapsed());
        let deadline = Instant::now() + SERVE_TIMEOUT;
        while let Some(admin) = admin
            && !answers(admin).await
        {
            if Instant::now() > deadline {
                return Err("kez-chat-server did not answer after a broker restart".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let log = nats.log();
    let jetstream_logged = log
        .lines()
        .rev()
        .find_map(|line| {
            let took = line.split_once("Took ")?.1;
            took.strip_suffix(" to start JetStream").map(str::to_owned)
        })
        .unwrap_or_else(|| "?".to_owned());
    Ok(Restart {
        stop: median(stops),
        start: median(starts),
        total: median(totals),
        jetstream_logged,
    })
}

/// What a number of users coming online cost.
struct Online {
    users: usize,
    broker: Duration,
    server: Duration,
}

impl Online {
    fn broker_ms(&self) -> f64 {
        self.broker.as_secs_f64() * 1e3 / self.users.max(1) as f64
    }

    fn server_ms(&self) -> f64 {
        self.server.as_secs_f64() * 1e3 / self.users.max(1) as f64
    }
}

/// Publishes [`BACKLOG`] messages of `size` bytes into each of `keys`' inboxes, as
/// `Store::deliver` stores them (with a `Nats-Msg-Id`), pipelined.
async fn fill(js: &jetstream::Context, keys: &[Arc<SecretKey>], size: usize) -> Result<(), String> {
    let subjects: Vec<String> = keys
        .iter()
        .map(|key| {
            let key = key.public_key();
            inbox_subject(&key, &key)
        })
        .collect();
    publish(js, subjects.iter().flat_map(|s| [s; BACKLOG]), size).await
}

/// Publishes a message of `size` bytes to each of `subjects`, with a `Nats-Msg-Id`, up to
/// [`WINDOW`] acknowledgements outstanding.
async fn publish<'a>(
    js: &jetstream::Context,
    subjects: impl Iterator<Item = &'a String>,
    size: usize,
) -> Result<(), String> {
    let payload = Bytes::from(vec![0xa5u8; size]);
    let mut window = VecDeque::with_capacity(WINDOW);
    for subject in subjects {
        if window.len() == WINDOW {
            let ack: jetstream::context::PublishAckFuture =
                window.pop_front().expect("a full window");
            ack.await.map_err(|e| format!("storing a message: {e}"))?;
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", MessageId::random().to_string().as_str());
        window.push_back(
            js.publish_with_headers(subject.clone(), headers, payload.clone())
                .await
                .map_err(|e| format!("publishing a message: {e}"))?,
        );
    }
    for ack in window {
        ack.await.map_err(|e| format!("storing a message: {e}"))?;
    }
    Ok(())
}

/// Publishes `count` messages of `size` bytes round-robin into the users' inboxes.
async fn publish_round_robin(
    js: &jetstream::Context,
    keys: &[Arc<SecretKey>],
    count: usize,
    size: usize,
) -> Result<(), String> {
    let subjects: Vec<String> = keys
        .iter()
        .take(count)
        .map(|key| {
            let key = key.public_key();
            inbox_subject(&key, &key)
        })
        .collect();
    publish(js, subjects.iter().cycle().take(count), size).await
}

/// `keys` come online: each finds [`BACKLOG`] messages waiting, connects as a kez client does
/// (through the auth callout; not measured), then fetches them with `kez.mail.fetch` and
/// acknowledges them with a second one. Measured: nats-server's and kez-chat-server's CPU
/// during the fetches, [`ONLINE_BATCH`] users connected at a time.
async fn come_online(
    stack: &CalloutProcessStack,
    js: &jetstream::Context,
    keys: &[Arc<SecretKey>],
    server_pid: u32,
    size: usize,
) -> Result<Online, String> {
    fill(js, keys, size).await?;
    let url = stack.nats.url();
    let nats = nats_pid(&stack.nats)?;
    let mut online = Online {
        users: keys.len(),
        broker: Duration::ZERO,
        server: Duration::ZERO,
    };
    for batch in keys.chunks(ONLINE_BATCH) {
        let clients: Vec<Client> = futures::stream::iter(batch.iter().cloned())
            .map(|key| {
                let url = url.clone();
                async move {
                    kez_client::Connection::options(&key)
                        .connect(&url)
                        .await
                        .map_err(|e| format!("a user connecting: {e}"))
                }
            })
            .buffered(ONLINE_CONCURRENCY)
            .try_collect()
            .await?;
        let (broker, server) = (cpu_of(&[nats])?, cpu_of(&[server_pid])?);
        futures::stream::iter(clients.iter())
            .map(fetch_backlog)
            .buffer_unordered(ONLINE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        online.broker += cpu_of(&[nats])? - broker;
        online.server += cpu_of(&[server_pid])? - server;
        for client in clients {
            client
                .drain()
                .await
                .map_err(|e| format!("closing a user's connection: {e}"))?;
        }
    }
    Ok(online)
}

/// One user's backlog: a fetch that reads it, one that acknowledges it (and finds nothing new).
async fn fetch_backlog(client: &Client) -> Result<(), String> {
    let first = fetch(
        client,
        FetchRequest {
            after: 0,
            max: MAX_FETCH_MESSAGES,
            time: 0,
            origins: false,
        },
    )
    .await?;
    let read = FetchAnswer::decode(&first, false).map_err(|e| format!("a fetch answer: {e}"))?;
    let last = match read.messages.as_slice() {
        [.., last] if read.messages.len() == BACKLOG => (last.seq, last.time),
        _ => {
            return Err(format!(
                "a user coming online found {} messages, not {BACKLOG}",
                read.messages.len()
            ));
        }
    };
    let second = fetch(
        client,
        FetchRequest {
            after: last.0,
            max: MAX_FETCH_MESSAGES,
            time: last.1,
            origins: false,
        },
    )
    .await?;
    let after = FetchAnswer::decode(&second, false).map_err(|e| format!("a fetch answer: {e}"))?;
    if !after.messages.is_empty() {
        return Err("the acknowledging fetch found more messages".to_owned());
    }
    Ok(())
}

/// `kez.mail.fetch` with `request`; an error answer is an error.
async fn fetch(client: &Client, request: FetchRequest) -> Result<Bytes, String> {
    let body = serde_json::to_vec(&request).expect("a request serialises");
    let answer = client
        .request(Endpoint::MailFetch.subject(), body.into())
        .await
        .map_err(|e| format!("kez.mail.fetch: {e}"))?;
    if let Some(headers) = &answer.headers
        && let Some(code) = headers.get("Nats-Service-Error-Code")
    {
        return Err(format!(
            "kez.mail.fetch answered {code}: {}",
            headers
                .get("Nats-Service-Error")
                .map_or("", |value| value.as_str())
        ));
    }
    Ok(answer.payload)
}

/// The baseline of [`come_online`]: the JetStream calls the server makes for each of `keys`
/// (a batch direct get; then the acknowledgement's direct get by time, the purge and the batch
/// direct get after it), made by the bench itself as the `SERVER` account with the server's own
/// `Store`, [`ONLINE_CONCURRENCY`] at a time. Measured: nats-server's CPU.
async fn come_online_raw(
    stack: &CalloutProcessStack,
    js: &jetstream::Context,
    keys: &[Arc<SecretKey>],
    size: usize,
) -> Result<Online, String> {
    fill(js, keys, size).await?;
    let store = Store::open(js, Default::default())
        .await
        .map_err(|e| format!("opening the store: {e}"))?;
    let nats = nats_pid(&stack.nats)?;
    let before = cpu_of(&[nats])?;
    futures::stream::iter(keys.iter())
        .map(|key| {
            let store = &store;
            async move {
                let key = key.public_key();
                let subject = inbox_subject(&key, &key);
                let read = store
                    .read_inbox(&subject, 0, MAX_FETCH_MESSAGES)
                    .await
                    .map_err(|e| e.message)?;
                let last = match read.messages.as_slice() {
                    [.., last] if read.messages.len() == BACKLOG => last,
                    _ => return Err(format!("read {} messages", read.messages.len())),
                };
                let newer = store
                    .first_stored_since(&subject, last.time + 1)
                    .await
                    .map_err(|e| e.message)?;
                if newer.is_some_and(|seq| seq <= last.seq) {
                    return Err("the inbox looks reset".to_owned());
                }
                store
                    .purge_inbox(&subject, last.seq)
                    .await
                    .map_err(|e| e.message)?;
                let after = store
                    .read_inbox(&subject, last.seq, MAX_FETCH_MESSAGES)
                    .await
                    .map_err(|e| e.message)?;
                match after.messages.is_empty() {
                    true => Ok(()),
                    false => Err("messages after the purge".to_owned()),
                }
            }
        })
        .buffer_unordered(ONLINE_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .map_err(|e| format!("the raw backlog fetch: {e}"))?;
    Ok(Online {
        users: keys.len(),
        broker: cpu_of(&[nats])? - before,
        server: Duration::ZERO,
    })
}
