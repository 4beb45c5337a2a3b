//! Measurement 2, registry lookups: `kez.registry.lookup` answered by the real
//! `kez-chat-server` binary, against a trivial echo service (another process: `kez-bench
//! serve-echo`) that answers requests of the same size with answers of the same size. Both are
//! driven by 1, 16 and 64 concurrent requesters sharing one connection, for a fixed time each.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use kez_core::SecretKey;
use kez_tests::NatsServer;
use kez_tests::process::KezServerProcess;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::measure::{Budget, Latencies, cpu_of, nats_pid, per_sec};
use crate::report::{Goal, Row};

const SECTION: &str = "registry";
const LOOKUP: &str = "kez.registry.lookup";
const ECHO: &str = "bench.echo";
/// A direct get from the handles bucket, the read a lookup makes twice (handle record, then
/// chain head): JetStream's own request form, the subject named in the body.
const KV_READ: &str = "$JS.API.DIRECT.GET.KV_kez_handles";
/// Registered handles the lookups cycle through.
const USERS: usize = 100;
/// What `serve-echo` prints once it is subscribed.
pub const ECHO_READY: &str = "echo ready";

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
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        names
            .iter()
            .map(|name| {
                Bytes::from(serde_json::json!({ "handle": format!("@{name}") }).to_string())
            })
            .collect(),
    );
    let answer = client
        .request(LOOKUP, bodies[0].clone())
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
    let reads: Arc<Vec<Bytes>> = Arc::new(
        names
            .iter()
            .map(|name| {
                Bytes::from(
                    serde_json::json!({ "last_by_subj": format!("$KV.kez_handles.{name}") })
                        .to_string(),
                )
            })
            .collect(),
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
        let before = cpu_of(&pids)?;
        let (echo_rate, mut echo_latency) =
            drive(&client, ECHO, &bodies, concurrency, duration).await?;
        let echo_cpu = per_request(cpu_of(&pids)? - before, &echo_latency);
        let before = cpu_of(&pids)?;
        let (rate, mut latency) = drive(&client, LOOKUP, &bodies, concurrency, duration).await?;
        let lookup_cpu = per_request(cpu_of(&pids)? - before, &latency);
        let (read_rate, mut read_latency) =
            drive(&client, KV_READ, &reads, concurrency, duration).await?;
        rows.push(Row::versus(
            SECTION,
            format!("lookups/s, {concurrency} concurrent"),
            "req/s",
            rate,
            echo_rate,
            "echo service",
            Goal::RatioAtLeast(0.7),
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
        // What a lookup is made of: the broker answers a KV read about as fast as the echo,
        // and a lookup is one request plus two reads, one after the other.
        rows.push(Row::versus(
            SECTION,
            format!("KV direct gets/s, {concurrency} concurrent (a lookup makes 2)"),
            "req/s",
            read_rate,
            echo_rate,
            "echo service",
            Goal::None,
        ));
        rows.push(Row::versus(
            SECTION,
            format!("KV direct get latency p50, {concurrency} concurrent"),
            "ms",
            read_latency.percentile_ms(50.0),
            echo_latency.percentile_ms(50.0),
            "echo service",
            Goal::None,
        ));
    }
    Ok(rows)
}

/// `concurrency` tasks sending requests to `subject` one after another for `duration`;
/// answers requests per second and every request's latency.
async fn drive(
    client: &Client,
    subject: &'static str,
    bodies: &Arc<Vec<Bytes>>,
    concurrency: usize,
    duration: Duration,
) -> Result<(f64, Latencies), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let client = client.clone();
        let bodies = bodies.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::default();
            let mut next = task;
            while !stop.load(Ordering::Relaxed) {
                let body = bodies[next % bodies.len()].clone();
                next += 1;
                let sent = Instant::now();
                let answer = client
                    .request(subject, body)
                    .await
                    .map_err(|e| format!("{subject}: {e}"))?;
                if answer.payload.is_empty() {
                    return Err(format!("{subject} answered nothing"));
                }
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
