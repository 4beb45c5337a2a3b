//! Measurement 8, service: what the per-home kez-chat service costs and saves.
//!
//! - A `kez-chat send` through the home's running service, timed as a person sees it (the
//!   process starts, hands the command to the service, which verifies the contact and sends,
//!   and the process exits), against what every command did before the service (a client
//!   that connects through the auth callout, verifies the contact's chain, sends and closes;
//!   measured in this process, so it leaves out the start of a process, which favours it).
//! - The service idle: its resident memory (RSS) and its CPU over [`IDLE`] with nothing to do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kez_client::{Connection, Store};
use kez_tests::callout::CalloutStack;
use kez_tests::kez_server::test_handle;
use kez_tests::person::{Person, alice_and_bob, key_of, kez_chat};

use crate::measure::{Budget, Latencies, cpu_time, mib, proc_status_kib};
use crate::report::{Goal, Row};

const SECTION: &str = "service";
/// The pause after each send (see [`run`]).
const PACE: Duration = Duration::from_millis(300);
/// How long the service is watched doing nothing.
const IDLE: Duration = Duration::from_secs(10);

/// Runs measurement 8.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    let n = budget.pick(10, 40);
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, _bob) = alice_and_bob(&url).await;
    let scratch = tempfile::tempdir().map_err(|err| err.to_string())?;
    let store = Store::open(scratch.path().join("store.redb")).map_err(|err| err.to_string())?;
    let key = key_of(&alice);
    let mut through = Latencies::default();
    let mut direct = Latencies::default();
    // Interleaved, and at a person's pace: a send makes about five registry and sigchain
    // requests, and the server lets one key make 20/s (PROTOCOL.md §5.5); faster, both paths
    // would measure the server's "slow down" waits instead.
    for i in 0..n {
        let started = Instant::now();
        send_cli(&alice, &format!("through the service {i}")).await?;
        through.push(started.elapsed());
        tokio::time::sleep(PACE).await;
        let started = Instant::now();
        send_direct(&url, key.clone(), &store, &format!("direct {i}")).await?;
        direct.push(started.elapsed());
        tokio::time::sleep(PACE).await;
    }
    let mut rows = Vec::new();
    for (p, label) in [(50.0, "p50"), (99.0, "p99")] {
        let ours = through.percentile_ms(p);
        let before = direct.percentile_ms(p);
        rows.push(Row::versus(
            SECTION,
            format!("`kez-chat send` through the service, {label} of {n}"),
            "ms",
            ours,
            before,
            "connect, verify, send, close (in-process)",
            Goal::None,
        ));
    }
    let (rss, cpu) = idle(&alice).await?;
    rows.push(Row::info(SECTION, "service RSS, idle", "MiB", mib(rss)).goal(Goal::AtMost(30.0)));
    rows.push(
        Row::info(
            SECTION,
            format!("service CPU, idle over {} s", IDLE.as_secs()),
            "%",
            cpu.as_secs_f64() / IDLE.as_secs_f64() * 100.0,
        )
        .goal(Goal::AtMost(1.0)),
    );
    Ok(rows)
}

/// `kez-chat send @bob TEXT` as a process, which must succeed.
async fn send_cli(person: &Person, text: &str) -> Result<(), String> {
    let output = tokio::process::Command::from(kez_chat(&person.home, &["send", "@bob", text]))
        .output()
        .await
        .map_err(|err| format!("cannot run kez-chat: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "kez-chat send failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// What a command did before the service: connect, verify bob, send, close.
async fn send_direct(
    url: &str,
    key: Arc<kez_core::SecretKey>,
    store: &Store,
    text: &str,
) -> Result<(), String> {
    let conn = Connection::connect(url, key)
        .await
        .map_err(|err| err.to_string())?;
    let bob = conn
        .verify_contact(store, &test_handle("@bob"))
        .await
        .map_err(|err| err.to_string())?
        .contact;
    conn.send(&bob, "text", text.as_bytes())
        .await
        .map_err(|err| err.to_string())?;
    conn.close().await.map_err(|err| err.to_string())
}

/// The service's RSS (KiB) after it settled, and its CPU time over [`IDLE`].
async fn idle(person: &Person) -> Result<(u64, Duration), String> {
    let output =
        tokio::process::Command::from(kez_chat(&person.home, &["service", "status", "--json"]))
            .output()
            .await
            .map_err(|err| format!("cannot run kez-chat: {err}"))?;
    let status: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|err| format!("service status: {err}"))?;
    let pid = status["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .ok_or("service status names no pid")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cpu_time(pid).ok_or("cannot read the service's CPU time")?;
    tokio::time::sleep(IDLE).await;
    let after = cpu_time(pid).ok_or("cannot read the service's CPU time")?;
    let rss = proc_status_kib(pid, "VmRSS").ok_or("cannot read the service's RSS")?;
    Ok((rss, after.saturating_sub(before)))
}
