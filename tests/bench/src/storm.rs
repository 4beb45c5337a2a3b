//! Measurement 11, a reconnect storm (issue 26): N registered users connected through the auth
//! callout answered by the real `kez-chat-server` binary, each with kez-client's own connect
//! options (which reconnect by themselves); then the broker is restarted (graceful stop, a new
//! nats-server on the same port with the same store) and every client reconnects through the
//! callout at once. Timed from the stop until the last client's `Connected` event.
//!
//! Counted: the connects that failed on the way (what the clients saw: refusals, handshake
//! timeouts) and the lines of the new nats-server's log reporting an authorization timeout
//! (the callout did not answer within the broker's 2 s) or an authorization violation. And
//! the CPU each process spent per reconnect: where the storm's time goes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::{Client, Event};
use kez_core::SecretKey;
use kez_tests::callout::CalloutProcessStack;
use kez_tests::process::LIMITS_OFF;

use crate::measure::{Budget, cpu_of, nats_pid, per_sec};
use crate::report::{Goal, Row};

const SECTION: &str = "storm";
/// Registrations and first connects in flight at once.
const CONCURRENCY: usize = 64;
/// How often a client's first connect is tried before the section fails.
const FIRST_CONNECT_ATTEMPTS: usize = 5;
/// The user count the goal is set for, to which the measured rate is extrapolated.
const GOAL_USERS: usize = 100_000;
/// The goal: a broker restart under [`GOAL_USERS`] absorbed within this time, seconds.
const GOAL_SECS: f64 = 60.0;
/// How long the storm may take before the section gives up.
const STORM_LIMIT: Duration = Duration::from_secs(600);
/// nats-server's authorization timeout in the callout config (`nats_conf::render_auth`).
const AUTHORIZATION_TIMEOUT_SECS: f64 = 2.0;
/// Open files the harness needs besides one per client (the stack's connections, logs, ...).
const SPARE_FILES: usize = 512;

/// What the clients' event callbacks saw.
#[derive(Default)]
struct Tally {
    /// When the broker was stopped: connects from then on are reconnects.
    stopped_at: OnceLock<Instant>,
    /// When each client was connected again, after the stop.
    back: Mutex<Vec<Duration>>,
    /// Connect attempts that failed after the stop, other than while the broker was down.
    failed: AtomicUsize,
}

/// Runs measurement 11.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    let clients = budget.clients.unwrap_or(budget.pick(1_000, 10_000)).max(1);
    check_open_files(clients)?;
    let mut stack = CalloutProcessStack::start_with_args(&LIMITS_OFF).await;
    let admin = stack.server_client().await;
    let keys: Arc<[Arc<SecretKey>]> = (0..clients)
        .map(|_| Arc::new(SecretKey::generate()))
        .collect();
    let began = Instant::now();
    in_parallel(keys.len(), {
        let (admin, keys) = (admin.clone(), keys.clone());
        move |index| {
            let (admin, key) = (admin.clone(), keys[index].clone());
            async move {
                kez_tests::callout::register(&admin, &key, &format!("st{index}"))
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("registering st{index}: {e:?}"))
            }
        }
    })
    .await?;
    eprintln!(
        "storm: {clients} users registered in {:.1?}",
        began.elapsed()
    );

    let baseline = storm(&mut stack, &keys, Backoff::AsyncNats).await?;
    let ours = storm(&mut stack, &keys, Backoff::Kez).await?;
    drop(stack);

    let per_reconnect = |cpu: Duration| cpu.as_secs_f64() * 1e6 / clients as f64;
    // Linear in the clients: the broker's restart as measured (at 100,000 registered users it
    // is 0.15 s, the footprint section), then every reconnect at the storm's rate.
    let extrapolated =
        |storm: &Storm| storm.broker_back.as_secs_f64() + GOAL_USERS as f64 / storm.rate(clients);
    const BASELINE: &str = "async-nats' default reconnect delays";
    Ok(vec![
        Row::info(
            SECTION,
            "clients connected through the callout",
            "clients",
            clients as f64,
        ),
        Row::versus(
            SECTION,
            format!("broker restart (stop, start until ready), {clients} clients"),
            "s",
            ours.broker_back.as_secs_f64(),
            baseline.broker_back.as_secs_f64(),
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("time to all {clients} reconnected, from the stop"),
            "s",
            ours.all_back.as_secs_f64(),
            baseline.all_back.as_secs_f64(),
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("time to half of {clients} reconnected, from the stop"),
            "s",
            ours.half_back.as_secs_f64(),
            baseline.half_back.as_secs_f64(),
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("reconnects/s in the storm (after the broker is ready), {clients} clients"),
            "conn/s",
            ours.rate(clients),
            baseline.rate(clients),
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            "first connects/s, 64 at a time (no storm)",
            "conn/s",
            per_sec(clients, ours.first_connects),
            per_sec(clients, baseline.first_connects),
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("time to all {GOAL_USERS} reconnected, extrapolated from {clients}"),
            "s",
            extrapolated(&ours),
            extrapolated(&baseline),
            BASELINE,
            Goal::None,
        )
        .goal(Goal::AtMost(GOAL_SECS)),
        Row::versus(
            SECTION,
            "authorization timeouts (nats-server waited 2 s), the storm",
            "conn",
            ours.timeouts as f64,
            baseline.timeouts as f64,
            BASELINE,
            Goal::AtMost(0.0),
        ),
        Row::versus(
            SECTION,
            "connects refused by nats-server (its log), the storm",
            "conn",
            ours.refusals as f64,
            baseline.refusals as f64,
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            "connect attempts failed (the clients), the storm",
            "conn",
            ours.failed as f64,
            baseline.failed as f64,
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            "CPU per reconnect: nats-server (with its restart)",
            "µs",
            per_reconnect(ours.nats_cpu),
            per_reconnect(baseline.nats_cpu),
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            "CPU per reconnect: kez-chat-server (the callout)",
            "µs",
            per_reconnect(ours.server_cpu),
            per_reconnect(baseline.server_cpu),
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            "CPU per reconnect: the clients (harness)",
            "µs",
            per_reconnect(ours.own_cpu),
            per_reconnect(baseline.own_cpu),
            BASELINE,
            Goal::None,
        ),
    ])
}

/// Which reconnect delays the clients use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backoff {
    /// kez-client's own ([`kez_client::reconnect`]).
    Kez,
    /// async-nats' default, what kez-client used before: the first attempt at once, then
    /// 2 ms doubling up to 4 s, the same for every client.
    AsyncNats,
}

/// What one storm measured.
struct Storm {
    first_connects: Duration,
    broker_back: Duration,
    all_back: Duration,
    half_back: Duration,
    /// Connect attempts the clients saw fail after the stop (other than a refused TCP connect
    /// while the broker was down).
    failed: usize,
    /// nats-server's `authentication error` lines.
    refusals: usize,
    /// Refusals after nats-server waited its whole authorization timeout for the callout.
    timeouts: usize,
    nats_cpu: Duration,
    server_cpu: Duration,
    own_cpu: Duration,
}

impl Storm {
    /// Reconnects per second from the broker being ready until the last client is back.
    fn rate(&self, clients: usize) -> f64 {
        per_sec(clients, self.all_back.saturating_sub(self.broker_back))
    }
}

/// Connects a client per key, restarts the broker, waits until every client is back; then
/// closes them.
async fn storm(
    stack: &mut CalloutProcessStack,
    keys: &Arc<[Arc<SecretKey>]>,
    backoff: Backoff,
) -> Result<Storm, String> {
    let clients = keys.len();
    let tally = Arc::new(Tally::default());
    let url = stack.nats.url();
    let connected: Arc<Mutex<Vec<Client>>> = Arc::new(Mutex::new(Vec::with_capacity(clients)));
    let began = Instant::now();
    in_parallel(clients, {
        let (keys, tally, connected) = (keys.clone(), tally.clone(), connected.clone());
        move |index| {
            let (key, tally, connected, url) = (
                keys[index].clone(),
                tally.clone(),
                connected.clone(),
                url.clone(),
            );
            async move {
                // On a machine busy with other work a first connect can miss nats-server's
                // 2 s too (the previous storm's clients are still being closed): asked again,
                // as `Connection::connect_with` does. Only the storm is measured.
                let mut attempts = 0;
                let client = loop {
                    match connect(&url, &key, tally.clone(), backoff).await {
                        Ok(client) => break client,
                        Err(err) if attempts < FIRST_CONNECT_ATTEMPTS => {
                            attempts += 1;
                            eprintln!("storm: connecting st{index} again: {err}");
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        Err(err) => return Err(format!("connecting st{index}: {err}")),
                    }
                };
                connected.lock().expect("no holder panics").push(client);
                Ok(())
            }
        }
    })
    .await?;
    let first_connects = began.elapsed();
    eprintln!("storm ({backoff:?}): {clients} clients connected in {first_connects:.1?}");

    let server_pid = stack.server.id();
    let own_pid = std::process::id();
    let server_before = cpu_of(&[server_pid])?;
    let own_before = cpu_of(&[own_pid])?;
    let stopped_at = Instant::now();
    tally
        .stopped_at
        .set(stopped_at)
        .map_err(|_| "the storm started twice".to_owned())?;
    // The fixture waits synchronously; the clients' tasks keep running on the other workers.
    tokio::task::block_in_place(|| stack.nats.restart());
    let broker_back = stopped_at.elapsed();
    let deadline = stopped_at + STORM_LIMIT;
    loop {
        let back = tally.back.lock().expect("no holder panics").len();
        if back >= clients {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "only {back} of {clients} clients reconnected within {STORM_LIMIT:?}; \
                 failed attempts {}",
                tally.failed.load(Ordering::Relaxed),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let nats_cpu = cpu_of(&[nats_pid(&stack.nats)?])?;
    let server_cpu = cpu_of(&[server_pid])? - server_before;
    let own_cpu = cpu_of(&[own_pid])? - own_before;
    let mut back = std::mem::take(&mut *tally.back.lock().expect("no holder panics"));
    back.sort_unstable();
    let all_back = back.last().copied().unwrap_or_default();
    let half_back = back[back.len() / 2];

    let log = stack.nats.log();
    let this_run = log
        .rsplit_once("--- kez-tests: restart ---")
        .map_or(log.as_str(), |(_, after)| after);
    let refusals = this_run
        .lines()
        .filter(|line| line.contains("authentication error"))
        .count();
    let timeouts = this_run
        .lines()
        .filter_map(|line| line.split_once("Readloop processing time: "))
        .filter(|(_, took)| waited_out(took))
        .count();
    let failed = tally.failed.load(Ordering::Relaxed);
    eprintln!(
        "storm ({backoff:?}): {clients} back {all_back:.2?} after the stop (broker ready after \
         {broker_back:.2?}, half back at {half_back:.2?}); CPU nats-server {nats_cpu:.2?}, \
         kez-chat-server {server_cpu:.2?}, clients {own_cpu:.2?}; failed attempts {failed}, \
         nats-server refused {refusals}, {timeouts} of them after its 2 s timeout"
    );
    let clients_gone = std::mem::take(&mut *connected.lock().expect("no holder panics"));
    drop(clients_gone);
    Ok(Storm {
        first_connects,
        broker_back,
        all_back,
        half_back,
        failed,
        refusals,
        timeouts,
        nats_cpu,
        server_cpu,
        own_cpu,
    })
}

/// Whether nats-server's `Readloop processing time` `took` (a Go duration: `2.0011s`, `1m3s`,
/// `950ms`) is its whole authorization timeout (2 s; nothing else blocks a client's read loop
/// that long here): the callout's answer never came in time.
fn waited_out(took: &str) -> bool {
    let took = took.trim();
    if took.contains('m') && !took.ends_with("ms") {
        return true;
    }
    took.strip_suffix('s')
        .and_then(|seconds| seconds.parse::<f64>().ok())
        .is_some_and(|seconds| seconds >= AUTHORIZATION_TIMEOUT_SECS)
}

/// Connects as `key` with kez-client's own options, reporting to `tally`.
async fn connect(
    url: &str,
    key: &Arc<SecretKey>,
    tally: Arc<Tally>,
    backoff: Backoff,
) -> Result<Client, String> {
    let counted = Arc::new(AtomicBool::new(false));
    let options = match backoff {
        Backoff::Kez => kez_client::Connection::options(key),
        Backoff::AsyncNats => {
            kez_client::Connection::options(key).reconnect_delay_callback(async_nats_delay)
        }
    };
    options
        .event_callback(move |event| {
            let (tally, counted) = (tally.clone(), counted.clone());
            async move {
                let Some(stopped_at) = tally.stopped_at.get() else {
                    return;
                };
                match event {
                    Event::Connected if !counted.swap(true, Ordering::Relaxed) => tally
                        .back
                        .lock()
                        .expect("no holder panics")
                        .push(stopped_at.elapsed()),
                    // A refused TCP connect (the broker is down: `IO error`) is not counted.
                    Event::ClientError(async_nats::ClientError::Other(why))
                        if why != "IO error" =>
                    {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        })
        .connect(url)
        .await
        .map_err(|e| e.to_string())
}

/// async-nats' default reconnect delay (its `reconnect_delay_callback_default`, not public).
fn async_nats_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        Duration::ZERO
    } else {
        let doublings = u32::try_from(attempts - 1).unwrap_or(u32::MAX);
        Duration::from_millis(2_u64.saturating_pow(doublings)).min(Duration::from_secs(4))
    }
}

/// Runs `task(0..count)`, [`CONCURRENCY`] at a time; the first error ends it.
async fn in_parallel<F, T>(count: usize, task: F) -> Result<(), String>
where
    F: Fn(usize) -> T,
    T: std::future::Future<Output = Result<(), String>>,
{
    use futures::StreamExt as _;
    futures::stream::iter((0..count).map(task))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Whether this process may hold a connection per client: nats-server, started by it, inherits
/// the same limit.
fn check_open_files(clients: usize) -> Result<(), String> {
    let limits = std::fs::read_to_string("/proc/self/limits")
        .map_err(|e| format!("reading /proc/self/limits: {e}"))?;
    let soft = limits
        .lines()
        .find_map(|line| {
            line.strip_prefix("Max open files")?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .ok_or("no \"Max open files\" line in /proc/self/limits")?;
    if clients + SPARE_FILES > soft {
        return Err(format!(
            "{clients} clients need {} open files in this process and in nats-server, but the \
             limit is {soft}: raise it (`ulimit -n`) or pass a smaller --clients",
            clients + SPARE_FILES
        ));
    }
    Ok(())
}
