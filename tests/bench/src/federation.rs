//! Measurement 10, federation: chat messages from a user of one home server to a user of
//! another (`a.localhost` → `b.localhost` on loopback: the sender's server queues each envelope
//! in its outbox, `KEZ_OUTBOX`, and its outbox worker hands it to the peer's broker with
//! `kez.mail.deliver`), against the same messages between two users of one server in the same
//! run. And what the outbox costs per queued message while the peer is down: queueing rate and
//! the stream's bytes per message.

use std::time::{Duration, Instant};

use kez_tests::federation::{Federation, federation_of};

use crate::chat::{BODY_BYTES, User, latency, throughput};
use crate::measure::{Budget, cpu_of, nats_pid, per_sec};
use crate::report::{Goal, Row};

const SECTION: &str = "federation";
const SAME: &str = "same server";

/// Runs measurement 10.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    // Full speed: the per-sender and per-peer budgets would measure themselves.
    let mut federation = Federation::start_with(&["a.localhost", "b.localhost"], |_, config| {
        config.limits = kez_chat_server::limits::Limits::OFF;
        federation_of(config).peer_limits = kez_chat_server::config::PeerLimits {
            messages: kez_chat_server::limits::Rate::OFF,
            bytes: kez_chat_server::limits::Rate::OFF,
        };
    })
    .await;
    let a = federation.home("a.localhost");
    let b = federation.home("b.localhost");
    let alice = User::register(&a.url(), "alice").await?;
    let bob = User::register(&b.url(), "bob").await?;
    let carol = User::register(&a.url(), "carol").await?;
    let handle =
        |text: &str| kez_core::Handle::parse(text, "a.localhost").map_err(|e| e.to_string());
    let remote = alice
        .conn
        .verify_contact(&alice.store, &handle("@bob@b.localhost")?)
        .await
        .map_err(|e| format!("alice adds bob across: {e}"))?
        .contact;
    let local = alice
        .conn
        .verify_contact(&alice.store, &handle("@carol")?)
        .await
        .map_err(|e| format!("alice adds carol: {e}"))?
        .contact;

    let n = budget.pick(1_000, 10_000);
    let single = budget.pick(100, 500);
    let epoch = Instant::now();
    let pids = [nats_pid(&a.nats)?, nats_pid(&b.nats)?, std::process::id()];
    let cpu = || cpu_of(&pids);

    let before = cpu()?;
    let same_rate = throughput(&alice, &carol, &local, n, epoch).await?;
    let same_cpu = cpu()? - before;
    let before = cpu()?;
    let across_rate = throughput(&alice, &bob, &remote, n, epoch).await?;
    let across_cpu = cpu()? - before;
    let mut same_latency = latency(&alice, &carol, &local, single, epoch).await?;
    let mut across_latency = latency(&alice, &bob, &remote, single, epoch).await?;
    let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / n as f64;

    // The outbox while the peer is down: every message is queued and kept.
    let queued = budget.pick(1_000, 5_000);
    let outbox_before = outbox_bytes(a).await?;
    federation.home_mut("b.localhost").nats.stop();
    let started = Instant::now();
    let mut pending = Vec::with_capacity(queued);
    for _ in 0..queued {
        pending.push(
            alice
                .conn
                .publish(&remote, "text", &[b'k'; BODY_BYTES])
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    for answer in pending {
        answer.acked().await.map_err(|e| format!("queueing: {e}"))?;
    }
    let queue_rate = per_sec(queued, started.elapsed());
    let a = federation.home("a.localhost");
    let per_queued = (outbox_bytes(a).await?.saturating_sub(outbox_before)) as f64 / queued as f64;
    federation.home_mut("b.localhost").nats.resume();

    let what = format!("{BODY_BYTES} B body");
    Ok(vec![
        Row::versus(
            SECTION,
            format!("messages/s across servers, {n} pipelined ({what})"),
            "msg/s",
            across_rate,
            same_rate,
            SAME,
            Goal::RatioAtLeast(0.3),
        ),
        Row::versus(
            SECTION,
            format!(
                "CPU per message across, {n} pipelined (both brokers + all clients and servers)"
            ),
            "µs",
            per_message(across_cpu),
            per_message(same_cpu),
            SAME,
            Goal::None,
        ),
        Row::versus(
            SECTION,
            format!("latency p50 across servers, one at a time ({single})"),
            "ms",
            across_latency.percentile_ms(50.0),
            same_latency.percentile_ms(50.0),
            SAME,
            Goal::AddedBelow(20.0),
        ),
        Row::versus(
            SECTION,
            format!("latency p99 across servers, one at a time ({single})"),
            "ms",
            across_latency.percentile_ms(99.0),
            same_latency.percentile_ms(99.0),
            SAME,
            Goal::None,
        ),
        Row::info(
            SECTION,
            format!("outbox: messages/s queued while the peer is down ({queued})"),
            "msg/s",
            queue_rate,
        ),
        Row::info(
            SECTION,
            format!("outbox: stream bytes per queued message ({queued}, {what})"),
            "B",
            per_queued,
        ),
    ])
}

/// The bytes `KEZ_OUTBOX` holds on `home`'s broker.
async fn outbox_bytes(home: &kez_tests::federation::Home) -> Result<u64, String> {
    let js = async_nats::jetstream::new(home.server_client().await);
    let mut stream = js
        .get_stream("KEZ_OUTBOX")
        .await
        .map_err(|e| format!("the outbox stream: {e}"))?;
    let info = stream.info().await.map_err(|e| e.to_string())?;
    Ok(info.state.bytes)
}
