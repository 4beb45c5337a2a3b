//! Measurement 3, authenticated connects: clients connecting with their KEZ key as an nkey
//! (the nonce signed by the key, kez-client's own options) through nats-server's auth callout
//! answered by the real `kez-chat-server` binary, against the same nats-server with the same
//! keys listed as static nkey users (which sign the bare nonce, as nats-server checks it itself).
//! [`CONCURRENCY`] tasks connect, complete the handshake and disconnect, over and over, for a
//! fixed time.
//!
//! Every failed connect is counted, and so is every line of nats-server's log that reports an
//! authorization timeout: the callout must answer every request in time.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kez_core::SecretKey;
use kez_tests::NatsServer;
use kez_tests::callout::CalloutProcessStack;

use crate::measure::{Budget, Latencies, cpu_of, nats_pid, per_sec};
use crate::report::{Goal, Row};

const SECTION: &str = "callout";
/// Registered keys the connects cycle through.
const KEYS: usize = 32;
/// Tasks connecting at once.
pub const CONCURRENCY: usize = 8;

/// What one connect loop saw.
pub struct Outcome {
    /// Connects that completed.
    pub connects: usize,
    /// Why the others failed.
    pub failures: Vec<String>,
    /// How long each completed connect took.
    pub latencies: Latencies,
    /// The whole loop's time.
    pub elapsed: Duration,
}

/// Runs measurement 3.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    // The same ed25519 keys twice: as KEZ keys, and as the nkey users nats-server knows itself.
    let seeds: Vec<[u8; 32]> = (0..KEYS).map(|_| random_seed()).collect();
    let keys: Vec<Arc<SecretKey>> = seeds
        .iter()
        .map(|seed| Arc::new(SecretKey::from_seed(seed)))
        .collect();
    let nkey_users = seeds
        .iter()
        .map(|seed| {
            let user = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, *seed)
                .map_err(|err| format!("an nkey from a seed: {err}"))?;
            let seed = user.seed().map_err(|err| format!("an nkey seed: {err}"))?;
            Ok(async_nats::ConnectOptions::with_nkey(seed))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let kez_users: Vec<async_nats::ConnectOptions> =
        keys.iter().map(kez_client::Connection::options).collect();
    let duration = budget.pick(Duration::from_secs(3), Duration::from_secs(10));

    let mut users = String::from("authorization {\n  users = [\n");
    for key in keys.iter() {
        writeln!(users, "    {{ nkey: \"{}\" }}", key.public_key().to_nkey())
            .expect("writing to a String");
    }
    users.push_str("  ]\n}\n");
    let static_nats = NatsServer::start_with(&users);
    let static_pid = nats_pid(&static_nats)?;
    let cpu_before = cpu_of(&[static_pid, std::process::id()])?;
    let baseline = connect_loop(&static_nats.url(), Arc::new(nkey_users), duration).await;
    let baseline_cpu = cpu_of(&[static_pid, std::process::id()])? - cpu_before;
    drop(static_nats);

    let stack = CalloutProcessStack::start().await;
    let admin = stack.server_client().await;
    for (index, key) in keys.iter().enumerate() {
        kez_tests::callout::register(&admin, key, &format!("conn{index}"))
            .await
            .map_err(|e| format!("registering key {index}: {e:?}"))?;
    }
    let pids = [
        nats_pid(&stack.nats)?,
        stack.server.id(),
        std::process::id(),
    ];
    let cpu_before = cpu_of(&pids)?;
    let mut ours = connect_loop(&stack.nats.url(), Arc::new(kez_users), duration).await;
    let ours_cpu = cpu_of(&pids)? - cpu_before;
    let per_connect =
        |cpu: Duration, connects: usize| cpu.as_secs_f64() * 1e6 / connects.max(1) as f64;
    let log = stack.nats.log();
    let timeouts = log
        .lines()
        .filter(|line| line.to_ascii_lowercase().contains("timeout"))
        .count();
    if !ours.failures.is_empty() || !baseline.failures.is_empty() {
        eprintln!(
            "callout: {} failed connects through the callout (first: {:?}), {} with static users \
             (first: {:?})",
            ours.failures.len(),
            ours.failures.first(),
            baseline.failures.len(),
            baseline.failures.first()
        );
    }
    let mut baseline_latencies = baseline.latencies;
    Ok(vec![
        Row::versus(
            SECTION,
            format!("connects/s, {CONCURRENCY} concurrent"),
            "conn/s",
            per_sec(ours.connects, ours.elapsed),
            per_sec(baseline.connects, baseline.elapsed),
            "static nkey users",
            Goal::RatioAtLeast(0.5),
        ),
        Row::versus(
            SECTION,
            "CPU per connect (nats-server, kez-chat-server, clients)",
            "µs",
            per_connect(ours_cpu, ours.connects),
            per_connect(baseline_cpu, baseline.connects),
            "static nkey users",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("connect latency p50, {CONCURRENCY} concurrent"),
            "ms",
            ours.latencies.percentile_ms(50.0),
            baseline_latencies.percentile_ms(50.0),
            "static nkey users",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("connect latency p99, {CONCURRENCY} concurrent"),
            "ms",
            ours.latencies.percentile_ms(99.0),
            baseline_latencies.percentile_ms(99.0),
            "static nkey users",
            Goal::None,
        ),
        Row::versus(
            SECTION,
            "failed connects",
            "conn",
            ours.failures.len() as f64,
            baseline.failures.len() as f64,
            "static nkey users",
            Goal::AtMost(0.0),
        ),
        Row::info(
            SECTION,
            "authorization timeouts in nats-server's log",
            "lines",
            timeouts as f64,
        )
        .goal(Goal::AtMost(0.0)),
    ])
}

/// 32 random bytes from the OS.
fn random_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
    seed
}

/// [`CONCURRENCY`] tasks connecting with each of `users` in turn to `url` for `duration`.
pub async fn connect_loop(
    url: &str,
    users: Arc<Vec<async_nats::ConnectOptions>>,
    duration: Duration,
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(CONCURRENCY);
    for task in 0..CONCURRENCY {
        let users = users.clone();
        let stop = stop.clone();
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut connects = 0;
            let mut failures = Vec::new();
            let mut latencies = Latencies::default();
            let mut next = task;
            while !stop.load(Ordering::Relaxed) {
                let user = users[next % users.len()].clone();
                next += 1;
                let began = Instant::now();
                // No reconnects, so a refusal is an error here rather than a retry.
                let connected = user.max_reconnects(Some(0)).connect(&url).await;
                match connected {
                    Ok(client) => {
                        latencies.push(began.elapsed());
                        connects += 1;
                        drop(client);
                    }
                    Err(err) => failures.push(err.to_string()),
                }
            }
            (connects, failures, latencies)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcome = Outcome {
        connects: 0,
        failures: Vec::new(),
        latencies: Latencies::default(),
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        match task.await {
            Ok((connects, failures, latencies)) => {
                outcome.connects += connects;
                outcome.failures.extend(failures);
                outcome.latencies.extend(latencies);
            }
            Err(err) => outcome
                .failures
                .push(format!("a connecting task panicked: {err}")),
        }
    }
    outcome.elapsed = started.elapsed();
    outcome
}
