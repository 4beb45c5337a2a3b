//! Measurement 11, a reconnect storm (issue 26): N registered users connected through the auth
//! callout answered by the real `kez-chat-server` binary, each with kez-client's own connect
//! options (which reconnect by themselves); then the broker is restarted (graceful stop, a new
//! nats-server on the same port with the same store) and every client reconnects through the
//! callout at once. Timed from the stop until the last client's `Connected` event.
//!
//! Counted: the connects that failed on the way (what the clients saw: refusals, handshake
//! timeouts) and the refusals in the new nats-server's log, by cause: an authorization
//! timeout (the callout did not answer in time), a connection closed while the callout
//! decided (the broker's authorization timer runs from the TCP connect, or the client hung up),
//! or the callout's own refusal. And
//! the CPU each process spent per reconnect: where the storm's time goes.
//!
//! The clients live in processes of their own ([`crate::storm_clients`]), as many as their
//! open files need.

use std::time::{Duration, Instant};

use kez_tests::callout::CalloutProcessStack;
use kez_tests::process::LIMITS_OFF;
use rand_core::RngCore as _;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::measure::{Budget, Latencies, cpu_of, nats_pid, per_sec};
use crate::report::{Goal, Row};
use crate::storm_clients::{Backoff, ClientProcesses, Returned, client_key};

const SECTION: &str = "storm";
/// Registrations and first connects in flight at once.
const CONCURRENCY: usize = 64;
/// The user count the goal is set for, to which the measured rate is extrapolated.
const GOAL_USERS: usize = 100_000;
/// The goal: a broker restart under [`GOAL_USERS`] absorbed within this time, seconds.
const GOAL_SECS: f64 = 60.0;
/// How long the storm may take before the section gives up.
const STORM_LIMIT: Duration = Duration::from_secs(600);
/// nats-server's authorization timeout in the callout config (`nats_conf::render_auth`).
const AUTHORIZATION_TIMEOUT_SECS: f64 = 5.0;
/// How long the server may take to advertise the reconnect window for the clients connected:
/// it counts connections every 5 s.
const WINDOW_WITHIN: Duration = Duration::from_secs(30);
/// Open files the harness needs besides two per client (the stack's connections, logs, ...).
const SPARE_FILES: usize = 512;

/// Runs measurement 11.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    let clients = budget.clients.unwrap_or(budget.pick(1_000, 10_000)).max(1);
    let processes = client_processes(clients)?;
    let mut stack = CalloutProcessStack::start_with_args(&LIMITS_OFF).await;
    let admin = stack.server_client().await;
    let mut base = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut base);
    let began = Instant::now();
    in_parallel(clients, CONCURRENCY, {
        let admin = admin.clone();
        move |index| {
            let (admin, key) = (admin.clone(), client_key(&base, index));
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

    let mut held = ClientProcesses::start(&base, clients, processes, CONCURRENCY).await?;
    let baseline = storm(&mut stack, &mut held, clients, Backoff::AsyncNats).await?;
    let ours = storm(&mut stack, &mut held, clients, Backoff::Kez).await?;
    drop(held);
    drop(stack);

    let per_reconnect = |cpu: Duration| cpu.as_secs_f64() * 1e6 / clients as f64;
    // The broker's restart as measured (at 100,000 registered users it is 0.15 s, the
    // footprint section), every reconnect at the rate the first 90 % came back at (the
    // callout's and the broker's work, per connect), then the last 10 %'s stragglers as long
    // as they took here: clients still waiting out a backoff window of at most 8 s, which
    // does not grow with the clients. With the window the server advertises, the bulk rate is
    // the window's (the clients over it), so 100,000 at that rate is the whole window the
    // server would advertise for 100,000, and the tail measured here is counted on top.
    let extrapolated = |storm: &Storm| {
        storm.broker_back.as_secs_f64()
            + GOAL_USERS as f64 / storm.bulk_rate(clients)
            + storm.all_back.saturating_sub(storm.most_back).as_secs_f64()
    };
    // The same, linear in the last client: its backoff wait counted as if every client's work.
    let extrapolated_linearly =
        |storm: &Storm| storm.broker_back.as_secs_f64() + GOAL_USERS as f64 / storm.rate(clients);
    // Fewer clients than the advertised rate in one second come back over kez-client's own
    // 1 s window, at most that many per second: 100,000 at that rate says nothing of a storm
    // of 100,000, whose window the server makes 100,000 over the rate.
    let window_bound =
        clients < kez_chat_server::reconnect_window::DEFAULT_RECONNECTS_PER_SEC as usize;
    // The harness's clients share this machine's CPUs; a deployment's are elsewhere.
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let node_alone =
        |storm: &Storm| cores / (per_reconnect(storm.nats_cpu + storm.server_cpu) / 1e6);
    const BASELINE: &str = "async-nats' default reconnect delays";
    Ok(vec![
        Row::info(
            SECTION,
            "clients connected through the callout",
            "clients",
            clients as f64,
        ),
        Row::info(
            SECTION,
            "reconnect window the server advertised (kez clients spread their reconnects over it)",
            "s",
            ours.window.unwrap_or_default().as_secs_f64(),
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
        if window_bound {
            Row::versus(
                SECTION,
                format!(
                    "time to all {GOAL_USERS} reconnected, extrapolated from {clients} (not judged: their window is kez-client's own 1 s, under one second of the advertised rate)"
                ),
                "s",
                extrapolated(&ours),
                extrapolated(&baseline),
                BASELINE,
                Goal::None,
            )
        } else {
            Row::versus(
                SECTION,
                format!("time to all {GOAL_USERS} reconnected, extrapolated from {clients}"),
                "s",
                extrapolated(&ours),
                extrapolated(&baseline),
                BASELINE,
                Goal::None,
            )
            .goal(Goal::AtMost(GOAL_SECS))
        },
        Row::versus(
            SECTION,
            format!("time to all {GOAL_USERS} reconnected, linearly from the last of {clients}"),
            "s",
            extrapolated_linearly(&ours),
            extrapolated_linearly(&baseline),
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!(
                "authorization timeouts (nats-server waited {AUTHORIZATION_TIMEOUT_SECS} s), the storm"
            ),
            "conn",
            ours.timeouts as f64,
            baseline.timeouts as f64,
            BASELINE,
            Goal::AtMost(0.0),
        ),
        Row::versus(
            SECTION,
            "a reconnect's wait (its attempt until let in), p50",
            "ms",
            ours.waits.p50_ms,
            baseline.waits.p50_ms,
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            "a reconnect's wait, p99",
            "ms",
            ours.waits.p99_ms,
            baseline.waits.p99_ms,
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            "a reconnect's wait, p99 of the first fifth back",
            "ms",
            ours.waits.first_fifth_p99_ms,
            baseline.waits.first_fifth_p99_ms,
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            "a reconnect's wait, p99 of the last fifth back (above the first: a growing queue)",
            "ms",
            ours.waits.last_fifth_p99_ms,
            baseline.waits.last_fifth_p99_ms,
            BASELINE,
            Goal::None,
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
            "connects closed while the callout decided (timer or client), the storm",
            "conn",
            ours.closed_meanwhile as f64,
            baseline.closed_meanwhile as f64,
            BASELINE,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            "connects closed by kez-chat-server for a retry (their requests reached no callout), the storm",
            "conn",
            ours.missed as f64,
            baseline.missed as f64,
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
        Row::info(
            SECTION,
            "reconnects/s the node would authorize alone (its CPUs over nats-server's and kez-chat-server's CPU per reconnect)",
            "conn/s",
            node_alone(&ours),
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

/// Waits until the server advertises the reconnect window for `clients` connections (it counts
/// them every few seconds), then has the clients processes learn it, as each kez client does
/// when it connects; answers it.
async fn advertised_window(
    stack: &CalloutProcessStack,
    held: &mut ClientProcesses,
    clients: usize,
) -> Result<Duration, String> {
    let expected = kez_proto::reconnect::window_for(
        clients as u64,
        kez_chat_server::reconnect_window::DEFAULT_RECONNECTS_PER_SEC,
    );
    let admin = stack.server_client().await;
    let deadline = Instant::now() + WINDOW_WITHIN;
    loop {
        let window = kez_client::reconnect::learn_window(&admin).await?;
        if window.is_some_and(|window| window >= expected) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the server advertises {window:?} for {clients} clients, not {expected:?}, after {WINDOW_WITHIN:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let learnt = held
        .learn_window()
        .await?
        .ok_or("the clients processes found no reconnect window")?;
    eprintln!("storm: the clients spread their reconnects over {learnt:.1?}");
    Ok(learnt)
}

/// How long the clients' last connect attempts took, from the end of their reconnect wait until
/// the broker let them in: the broker's greeting and the callout's decision, queued behind the
/// others'. Milliseconds.
struct Waits {
    p50_ms: f64,
    p99_ms: f64,
    /// The 99th percentile among the first fifth of the clients to come back.
    first_fifth_p99_ms: f64,
    /// The same among the last fifth: a wait that grows from the first fifth to the last is a
    /// queue that grows, clients coming faster than they are let in.
    last_fifth_p99_ms: f64,
}

impl Waits {
    /// Of clients `back` in the order they came back.
    fn of(back: &[Returned]) -> Waits {
        let waits = |returned: &[Returned]| {
            let mut waits = Latencies::default();
            for one in returned {
                waits.push(one.wait);
            }
            waits
        };
        let fifth = back.len() / 5;
        Waits {
            p50_ms: waits(back).percentile_ms(50.0),
            p99_ms: waits(back).percentile_ms(99.0),
            first_fifth_p99_ms: waits(&back[..fifth]).percentile_ms(99.0),
            last_fifth_p99_ms: waits(&back[back.len() - fifth..]).percentile_ms(99.0),
        }
    }
}

/// What one storm measured.
struct Storm {
    waits: Waits,
    /// The reconnect window the clients learnt (kez's delays only).
    window: Option<Duration>,
    first_connects: Duration,
    broker_back: Duration,
    all_back: Duration,
    half_back: Duration,
    /// When 90 % were back.
    most_back: Duration,
    /// Connect attempts the clients saw fail after the stop (other than a refused TCP connect
    /// while the broker was down).
    failed: usize,
    /// nats-server's `authentication error` lines.
    refusals: usize,
    /// Refusals after nats-server waited its whole authorization timeout for the callout.
    timeouts: usize,
    /// Refusals of connections closed while the callout decided.
    closed_meanwhile: usize,
    /// Connections kez-chat-server closed because nats-server had sent their requests before
    /// the callout subscribed.
    missed: usize,
    nats_cpu: Duration,
    server_cpu: Duration,
    own_cpu: Duration,
}

impl Storm {
    /// Reconnects per second from the broker being ready until 90 % of the clients are back.
    fn bulk_rate(&self, clients: usize) -> f64 {
        per_sec(
            clients * 9 / 10,
            self.most_back.saturating_sub(self.broker_back),
        )
    }

    /// Reconnects per second from the broker being ready until the last client is back.
    fn rate(&self, clients: usize) -> f64 {
        per_sec(clients, self.all_back.saturating_sub(self.broker_back))
    }
}

/// Connects every client, restarts the broker, waits until every client is back; then
/// closes them.
async fn storm(
    stack: &mut CalloutProcessStack,
    held: &mut ClientProcesses,
    clients: usize,
    backoff: Backoff,
) -> Result<Storm, String> {
    let url = stack.nats.url();
    let began = Instant::now();
    held.connect(&url, backoff).await?;
    let first_connects = began.elapsed();
    eprintln!("storm ({backoff:?}): {clients} clients connected in {first_connects:.1?}");
    let window = match backoff {
        Backoff::Kez => Some(advertised_window(stack, held, clients).await?),
        Backoff::AsyncNats => None,
    };

    let server_pid = stack.server.id();
    let server_log_offset = stack.server.log().len();
    let mut own_pids = held.pids();
    own_pids.push(std::process::id());
    let server_before = cpu_of(&[server_pid])?;
    let own_before = cpu_of(&own_pids)?;
    // The clients time their return from this line's arrival, a fraction of a millisecond
    // after `stopped_at`.
    held.stop().await?;
    let stopped_at = Instant::now();
    // The fixture waits synchronously; the clients are in processes of their own.
    tokio::task::block_in_place(|| stack.nats.restart());
    let broker_back = stopped_at.elapsed();
    let deadline = stopped_at + STORM_LIMIT;
    let (back, failed) = loop {
        if held.back().await? >= clients
            && let Some(confirmed) = held.confirm().await?
        {
            break confirmed;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "only {} of {clients} clients reconnected within {STORM_LIMIT:?}",
                held.back().await?,
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let nats_cpu = cpu_of(&[nats_pid(&stack.nats)?])?;
    let server_cpu = cpu_of(&[server_pid])? - server_before;
    let own_cpu = cpu_of(&own_pids)? - own_before;
    let all_back = back
        .last()
        .map(|returned| returned.back)
        .unwrap_or_default();
    let half_back = back[back.len() / 2].back;
    let most_back = back[back.len() * 9 / 10].back;
    let waits = Waits::of(&back);

    let log = stack.nats.log();
    let this_run = log
        .rsplit_once("--- kez-tests: restart ---")
        .map_or(log.as_str(), |(_, after)| after);
    let server_log = stack.server.log();
    let Refusals {
        refusals,
        timeouts,
        closed_meanwhile,
        missed,
    } = Refusals::of(this_run, server_log.get(server_log_offset..).unwrap_or(""));
    eprintln!(
        "storm ({backoff:?}): {clients} back {all_back:.2?} after the stop (broker ready after \
         {broker_back:.2?}, half back at {half_back:.2?}, 90 % at {most_back:.2?}); CPU nats-server {nats_cpu:.2?}, \
         kez-chat-server {server_cpu:.2?}, clients {own_cpu:.2?}; failed attempts {failed}, \
         nats-server refused {refusals}: {timeouts} after its {AUTHORIZATION_TIMEOUT_SECS} s timeout, \
         {closed_meanwhile} closed while the callout decided, {missed} closed by the server for a \
         retry (their requests reached no callout); a reconnect's wait p50 {:.0} ms, p99 {:.0} ms \
         (the first fifth back {:.0} ms, the last {:.0} ms)",
        waits.p50_ms, waits.p99_ms, waits.first_fifth_p99_ms, waits.last_fifth_p99_ms,
    );
    held.close().await?;
    Ok(Storm {
        window,
        waits,
        first_connects,
        broker_back,
        all_back,
        half_back,
        most_back,
        failed,
        refusals,
        timeouts,
        closed_meanwhile,
        missed,
        nats_cpu,
        server_cpu,
        own_cpu,
    })
}

/// nats-server's `authentication error` lines of one run, by cause: the log says which
/// connection each line is about (`cid:N`), and what else happened to it.
#[derive(Debug, PartialEq, Eq)]
struct Refusals {
    /// Every `authentication error`.
    refusals: usize,
    /// Those whose read loop waited the whole authorization timeout: the callout's answer
    /// never came in time. (A read loop of a connection that was let in can take as long,
    /// on a loaded machine: only refused ones count.)
    timeouts: usize,
    /// Those closed while the callout decided: by nats-server's authorization timer, which
    /// runs from the TCP connect (a connection the broker greeted late has little of it left
    /// for the callout), or by the client hanging up. nats-server then cannot register the
    /// connection with its account.
    closed_meanwhile: usize,
    /// Connections kez-chat-server closed because their requests went out before its
    /// callout had subscribed (its log names them; not refusals: their clients were gone at
    /// once and reconnected, nats-server's read loop alone may still wait out the timeout).
    missed: usize,
}

impl Refusals {
    /// From nats-server's log of one run and kez-chat-server's log of the same time.
    fn of(log: &str, server_log: &str) -> Refusals {
        let connection = |line: &str| {
            line.split_once(" - cid:")
                .and_then(|(_, rest)| rest.split_once(' '))
                .map(|(cid, _)| cid.to_owned())
        };
        let mut refused = std::collections::HashSet::new();
        let mut waited = std::collections::HashSet::new();
        let mut closed = std::collections::HashSet::new();
        let mut refusals = 0;
        for line in log.lines() {
            let Some(cid) = connection(line) else {
                continue;
            };
            if line.contains("authentication error") {
                refusals += 1;
                refused.insert(cid);
            } else if line.contains("Problem registering with account") {
                closed.insert(cid);
            } else if let Some((_, took)) = line.split_once("Readloop processing time: ")
                && waited_out(took)
            {
                waited.insert(cid);
            }
        }
        let swept: std::collections::HashSet<String> = server_log
            .lines()
            .filter(|line| line.contains(SWEPT))
            .filter_map(|line| line.split_once("cids=[")?.1.split_once(']'))
            .flat_map(|(cids, _)| cids.split(',').map(|cid| cid.trim().to_owned()))
            .collect();
        let closed_meanwhile = refused.intersection(&closed).count();
        let missed = swept.len();
        let timeouts = refused
            .iter()
            .filter(|cid| waited.contains(*cid) && !closed.contains(*cid) && !swept.contains(*cid))
            .count();
        Refusals {
            refusals,
            timeouts,
            closed_meanwhile,
            missed,
        }
    }
}

/// What kez-chat-server logs, with their `cids`, of connections it closes because their
/// requests reached no callout.
const SWEPT: &str = "closing connections that wait for an authorization request";

/// Whether nats-server's `Readloop processing time` `took` (a Go duration: `2.0011s`, `1m3s`,
/// `950ms`) is its whole authorization timeout.
fn waited_out(took: &str) -> bool {
    let took = took.trim();
    if took.contains('m') && !took.ends_with("ms") {
        return true;
    }
    took.strip_suffix('s')
        .and_then(|seconds| seconds.parse::<f64>().ok())
        .is_some_and(|seconds| seconds >= AUTHORIZATION_TIMEOUT_SECS)
}

/// Runs `task(0..count)`, `concurrency` at a time (at least one); every task runs, and the
/// answer is the first error among them, if any.
pub(crate) async fn in_parallel<F, T>(
    count: usize,
    concurrency: usize,
    task: F,
) -> Result<(), String>
where
    F: Fn(usize) -> T,
    T: std::future::Future<Output = Result<(), String>>,
{
    use futures::StreamExt as _;
    futures::stream::iter((0..count).map(task))
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// How many clients processes hold `clients`: each client holds two open files in a storm
/// (async-nats keeps a lost connection's socket until its next connect succeeds), nats-server
/// one. Raises this process's open-file limit as far as it may (the stack's nats-server and
/// kez-chat-server and the clients processes, started next, inherit it); refused when
/// nats-server could not hold every client.
fn client_processes(clients: usize) -> Result<usize, String> {
    let needed = open_files_for(clients);
    let limit = getrlimit(Resource::Nofile);
    let raised = match limit.current {
        Some(soft) if soft < needed => {
            // Beyond the hard limit when this process runs as root, else up to it.
            let set = |current: u64, maximum: Option<u64>| {
                setrlimit(
                    Resource::Nofile,
                    Rlimit {
                        current: Some(current),
                        maximum,
                    },
                )
                .is_ok()
            };
            if set(needed, limit.maximum.map(|hard| hard.max(needed))) {
                needed
            } else if let Some(hard) = limit.maximum
                && set(hard.min(needed), Some(hard))
            {
                hard.min(needed)
            } else {
                soft
            }
        }
        _ => needed,
    };
    processes_for(clients, raised).ok_or_else(|| {
        format!(
            "{clients} clients need {} open files in nats-server, one each and {SPARE_FILES} \
             more, but the limit is {raised} and this process may not raise it: raise it \
             (`ulimit -n`) or pass a smaller --clients",
            clients + SPARE_FILES
        )
    })
}

/// The open files `clients` need in one process: two sockets each and [`SPARE_FILES`].
fn open_files_for(clients: usize) -> u64 {
    u64::try_from(clients.saturating_mul(2).saturating_add(SPARE_FILES)).unwrap_or(u64::MAX)
}

/// The fewest processes that hold `clients` within `limit` open files each; `None` if
/// nats-server could not hold them all within it.
fn processes_for(clients: usize, limit: u64) -> Option<usize> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if clients.saturating_add(SPARE_FILES) > limit {
        return None;
    }
    let per_process = (limit - SPARE_FILES) / 2;
    (per_process > 0).then(|| clients.div_ceil(per_process))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_apart_by_what_else_the_log_says_of_their_connection() {
        // Lines as nats-server 2.15 writes them (trimmed keys).
        let log = "\
[1] 2026/12/06 17:37:16.972261 [ERR] 127.0.0.1:60162 - cid:40 - authentication error - Nkey \"UDFG\"
[1] 2026/12/06 17:37:16.972302 [WRN] 127.0.0.1:60162 - cid:40 - Readloop processing time: 5.001804366s
[1] 2026/12/06 17:37:17.861667 [ERR] 127.0.0.1:36694 - cid:2820 - Problem registering with account \"APP\": connection closed
[1] 2026/12/06 17:37:17.861689 [ERR] 127.0.0.1:36694 - cid:2820 - authentication error - Nkey \"UDOT\"
[1] 2026/12/06 17:37:17.862002 [WRN] Could not register auth callout user: connection closed
[1] 2026/12/06 17:37:17.900000 [WRN] 127.0.0.1:36700 - cid:2821 - \"v0.51.0:rust\" - \"APP/user:UDZZ\" - Readloop processing time: 5.096488176s
[1] 2026/12/06 17:37:18.000000 [ERR] 127.0.0.1:36702 - cid:2822 - authentication error - Nkey \"UDQQ\"
[1] 2026/12/06 17:37:18.000100 [WRN] 127.0.0.1:36702 - cid:2822 - Readloop processing time: 950ms
[1] 2026/12/06 17:37:18.100000 [ERR] 127.0.0.1:36704 - cid:7 - authentication error - Nkey \"UDRR\"
[1] 2026/12/06 17:37:18.100100 [WRN] 127.0.0.1:36704 - cid:7 - Readloop processing time: 5.000912s
";
        // As kez-chat-server logs it (tracing's format).
        let server_log = "\
2026-12-06T17:37:13.120000Z  INFO kez_chat_server::kick: closing connections that wait for an authorization request the broker sent before the callout had subscribed server=\"NCKO\" cids=[5, 7]
";
        assert_eq!(
            Refusals::of(log, server_log),
            Refusals {
                refusals: 4,
                // cid 40; not 2821, which took as long but was let in, nor 7, closed earlier.
                timeouts: 1,
                closed_meanwhile: 1,
                missed: 2,
            }
        );
    }

    #[test]
    fn a_read_loop_waited_out_the_timeout_from_five_seconds_on() {
        assert!(waited_out("5.0011s"));
        assert!(waited_out("1m3s"));
        assert!(!waited_out("950ms"));
        assert!(!waited_out("4.999s"));
    }

    #[test]
    fn clients_are_shared_among_the_fewest_processes_the_open_file_limit_allows() {
        // Two open files per client in a process of its own, besides the spare ones.
        assert_eq!(processes_for(1_000, 20_000), Some(1));
        assert_eq!(processes_for(9_744, 20_000), Some(1));
        assert_eq!(processes_for(9_745, 20_000), Some(2));
        assert_eq!(processes_for(16_000, 20_000), Some(2));
        assert_eq!(processes_for(16_000, 1_000_000), Some(1));
        // nats-server holds one per client in one process: no more than the limit allows.
        assert_eq!(processes_for(19_488, 20_000), Some(2));
        assert_eq!(processes_for(19_489, 20_000), None);
        assert_eq!(processes_for(1, 100), None);
    }
}
