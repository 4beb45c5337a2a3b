//! Measurement 2, registry lookups. Ours: a lookup as kez-client makes it of a handle on its
//! home server, one JetStream direct get of the handle's directory entry (PROTOCOL.md §5.7),
//! opened and checked against the handle asked. Baseline: a trivial echo service (another
//! process: `kez-bench serve-echo`) that answers requests of the same size with answers of
//! `kez.registry.lookup`'s size. Also shown: `kez.registry.lookup` itself, answered by the
//! real `kez-chat-server` binary (what other domains' lookups and older clients use), and a
//! direct get from the handles bucket, one of the reads that service makes. Each is driven by
//! 1, 16 and 64 concurrent requesters sharing one connection, for a fixed time each.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use kez_client::DirectoryCache;
use kez_core::SecretKey;
use kez_proto::answer::Profile;
use kez_proto::directory::{DIRECT_GET_BODY, Slot};
use kez_tests::NatsServer;
use kez_tests::process::KezServerProcess;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::measure::{Budget, Latencies, cpu_of, nats_pid, per_sec};
use crate::report::{Goal, Row};

const SECTION: &str = "registry";
const LOOKUP: &str = "kez.registry.lookup";
const ECHO: &str = "bench.echo";
/// A direct get from the handles bucket, one of the reads the service makes per lookup:
/// JetStream's own request form, the subject named in the body.
const KV_READ: &str = "$JS.API.DIRECT.GET.KV_kez_handles";
/// Registered handles the lookups cycle through.
const USERS: usize = 100;
/// What `serve-echo` prints once it is subscribed.
pub const ECHO_READY: &str = "echo ready";

/// One kind of request the requesters send: each request's subject and body, and what an
/// answer must be to count.
struct Requests {
    each: Vec<(String, Bytes)>,
    check: fn(usize, &async_nats::Message, &Shared) -> Result<(), String>,
}

/// What the checks need: the handles asked for, their directory slots, and kez-client's
/// cache of opened entries, as a connection keeps it.
struct Shared {
    handles: Vec<kez_core::Handle>,
    slots: Vec<Slot>,
    opened: DirectoryCache,
}

/// An answer counts when it carries something.
fn not_empty(_: usize, answer: &async_nats::Message, _: &Shared) -> Result<(), String> {
    if answer.payload.is_empty() {
        return Err(format!("{} answered nothing", answer.subject));
    }
    Ok(())
}

/// A directory answer counts when it opens under the slot asked and names the handle asked,
/// as kez-client checks it (with its cache of opened entries).
fn opens(index: usize, answer: &async_nats::Message, shared: &Shared) -> Result<(), String> {
    let profile: Profile = shared
        .opened
        .open(&shared.slots[index], &answer.payload)
        .map_err(|e| format!("a directory entry did not open: {e} ({:?})", answer.status))?;
    if profile.handle != shared.handles[index] {
        return Err(format!(
            "asked {}, got {}",
            shared.handles[index], profile.handle
        ));
    }
    Ok(())
}

/// Runs measurement 2.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    let nats = NatsServer::start();
    let url = nats.url();
    let server = KezServerProcess::spawn(&url).await;
    let client = async_nats::connect(&url)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    let mut names = Vec::with_capacity(USERS);
    for index in 0..USERS {
        let name = format!("user{index}");
        let key = SecretKey::generate();
        kez_tests::callout::register(&client, &key, &name)
            .await
            .map_err(|e| format!("registering {name}: {e:?}"))?;
        names.push(name);
    }
    let handles: Vec<kez_core::Handle> = names
        .iter()
        .map(|name| kez_core::Handle::parse(name, kez_tests::kez_server::TEST_DOMAIN))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("a test handle: {e}"))?;
    let shared = Arc::new(Shared {
        slots: names.iter().map(|name| Slot::handle(name)).collect(),
        handles,
        opened: DirectoryCache::default(),
    });
    let lookups = Requests {
        each: names
            .iter()
            .map(|name| {
                let body = serde_json::json!({ "handle": format!("@{name}") }).to_string();
                (LOOKUP.to_owned(), Bytes::from(body))
            })
            .collect(),
        check: not_empty,
    };
    let answer = client
        .request(LOOKUP, lookups.each[0].1.clone())
        .await
        .map_err(|e| format!("a first lookup: {e}"))?;
    if answer
        .headers
        .is_some_and(|h| h.get("Nats-Service-Error-Code").is_some())
    {
        return Err(format!(
            "the lookup failed: {}",
            String::from_utf8_lossy(&answer.payload)
        ));
    }
    let answer_len = answer.payload.len();
    let echoes = Requests {
        each: lookups
            .each
            .iter()
            .map(|(_, body)| (ECHO.to_owned(), body.clone()))
            .collect(),
        check: not_empty,
    };
    let directory = Requests {
        each: shared
            .slots
            .iter()
            .map(|slot| {
                (
                    slot.direct_get_subject(),
                    Bytes::from_static(DIRECT_GET_BODY),
                )
            })
            .collect(),
        check: opens,
    };
    let reads = Requests {
        each: names
            .iter()
            .map(|name| {
                let body = serde_json::json!({ "last_by_subj": format!("$KV.kez_handles.{name}") });
                (KV_READ.to_owned(), Bytes::from(body.to_string()))
            })
            .collect(),
        check: not_empty,
    };
    let (lookups, echoes, directory, reads) = (
        Arc::new(lookups),
        Arc::new(echoes),
        Arc::new(directory),
        Arc::new(reads),
    );
    let echo = spawn_echo(&url, answer_len).await?;
    // Every process that works for a request: what bounds the rates on a machine they share.
    let pids = [
        nats_pid(&nats)?,
        server.id(),
        echo.id().ok_or("the echo service is gone")?,
        std::process::id(),
    ];
    let per_request = |cpu: Duration, latencies: &Latencies| {
        cpu.as_secs_f64() * 1e6 / latencies.len().max(1) as f64
    };

    let duration = budget.pick(Duration::from_secs(2), Duration::from_secs(5));
    let mut rows = Vec::new();
    for concurrency in [1, 16, 64] {
        let drive = |requests: &Arc<Requests>| {
            drive(&client, requests.clone(), &shared, concurrency, duration)
        };
        let before = cpu_of(&pids)?;
        let (echo_rate, mut echo_latency) = drive(&echoes).await?;
        let echo_cpu = per_request(cpu_of(&pids)? - before, &echo_latency);
        let before = cpu_of(&pids)?;
        let (rate, mut latency) = drive(&directory).await?;
        let lookup_cpu = per_request(cpu_of(&pids)? - before, &latency);
        let (service_rate, mut service_latency) = drive(&lookups).await?;
        let (read_rate, _) = drive(&reads).await?;
        rows.push(Row::versus(
            SECTION,
            format!("lookups/s, {concurrency} concurrent (directory direct get)"),
            "req/s",
            rate,
            echo_rate,
            "echo service",
            Goal::RatioAtLeast(1.0),
        ));
        rows.push(Row::versus(
            SECTION,
            format!("CPU per lookup, {concurrency} concurrent (all processes)"),
            "µs",
            lookup_cpu,
            echo_cpu,
            "echo service",
            Goal::None,
        ));
        for p in [50.0, 99.0] {
            rows.push(Row::versus(
                SECTION,
                format!("lookup latency p{p:.0}, {concurrency} concurrent"),
                "ms",
                latency.percentile_ms(p),
                echo_latency.percentile_ms(p),
                "echo service",
                Goal::None,
            ));
        }
        // The service: other domains' lookups and older clients. One request to the server,
        // which reads the handle record and then the chain head (plus a look past the head
        // index), one after the other.
        rows.push(Row::versus(
            SECTION,
            format!("kez.registry.lookup/s, {concurrency} concurrent (service)"),
            "req/s",
            service_rate,
            echo_rate,
            "echo service",
            Goal::None,
        ));
        rows.push(Row::versus(
            SECTION,
            format!("kez.registry.lookup latency p50, {concurrency} concurrent"),
            "ms",
            service_latency.percentile_ms(50.0),
            echo_latency.percentile_ms(50.0),
            "echo service",
            Goal::None,
        ));
        rows.push(Row::versus(
            SECTION,
            format!("KV direct gets/s, {concurrency} concurrent (the service makes 3)"),
            "req/s",
            read_rate,
            echo_rate,
            "echo service",
            Goal::None,
        ));
    }
    Ok(rows)
}

/// `concurrency` tasks sending `requests` one after another for `duration`, each answer
/// checked; answers requests per second and every request's latency.
async fn drive(
    client: &Client,
    requests: Arc<Requests>,
    shared: &Arc<Shared>,
    concurrency: usize,
    duration: Duration,
) -> Result<(f64, Latencies), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let client = client.clone();
        let requests = requests.clone();
        let shared = shared.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::default();
            let mut next = task;
            while !stop.load(Ordering::Relaxed) {
                let index = next % requests.each.len();
                next += 1;
                let (subject, body) = &requests.each[index];
                let sent = Instant::now();
                let answer = client
                    .request(subject.clone(), body.clone())
                    .await
                    .map_err(|e| format!("{subject}: {e}"))?;
                (requests.check)(index, &answer, &shared)?;
                latencies.push(sent.elapsed());
            }
            Ok::<Latencies, String>(latencies)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Latencies::default();
    for task in tasks {
        all.extend(
            task.await
                .map_err(|e| format!("a requester panicked: {e}"))??,
        );
    }
    let elapsed = started.elapsed();
    Ok((per_sec(all.len(), elapsed), all))
}

/// The echo service as a child process of this binary; killed when dropped.
async fn spawn_echo(url: &str, answer_len: usize) -> Result<tokio::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find kez-bench itself: {e}"))?;
    let mut child = tokio::process::Command::new(exe)
        .args(["serve-echo", "--url", url, "--subject", ECHO])
        .arg("--answer-bytes")
        .arg(answer_len.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the echo service: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
    match ready {
        Ok(Ok(Some(line))) if line == ECHO_READY => Ok(child),
        other => Err(format!("the echo service did not start: {other:?}")),
    }
}

/// `kez-bench serve-echo`: answers every request on `subject` with `answer_bytes` bytes, one
/// after another, until killed.
pub async fn serve_echo(url: &str, subject: &str, answer_bytes: usize) -> Result<(), String> {
    let client = async_nats::connect(url)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    let mut requests = client
        .queue_subscribe(subject.to_owned(), "q".to_owned())
        .await
        .map_err(|e| format!("subscribing to {subject}: {e}"))?;
    client.flush().await.map_err(|e| format!("flushing: {e}"))?;
    println!("{ECHO_READY}");
    let answer = Bytes::from(vec![b'e'; answer_bytes]);
    while let Some(request) = requests.next().await {
        if let Some(reply) = request.reply {
            client
                .publish(reply, answer.clone())
                .await
                .map_err(|e| format!("answering: {e}"))?;
        }
    }
    Ok(())
}
