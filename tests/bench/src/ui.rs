//! Measurement 9, ui: the web UI's latency as a person sees it — from Enter in alice's composer
//! to the message in bob's open conversation, both pages in a real chromium on their own
//! `kez-chat ui` gateways (`tests/browser/bench_latency.mjs`) — against the CLI path: a
//! `kez-chat send` process started in alice's home until bob's `kez-chat listen --json` prints
//! the message.
//!
//! Both paths end in bob's service, which hears the new-mail notification and fetches; the UI
//! path adds the page's WebSocket to the gateway and the gateway's local-API run (alice), and the
//! `listen --events` run, the `history` re-read and the page's rendering (bob). The CLI path
//! adds the start of a process.

use std::process::Stdio;
use std::time::{Duration, Instant};

use kez_tests::browser::{Gateway, browser_dir, check_node_modules, chromium_binary};
use kez_tests::callout::CalloutStack;
use kez_tests::kez_server::test_handle;
use kez_tests::person::{Person, alice_and_bob, kez_chat};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::measure::Budget;
use crate::measure::Latencies;
use crate::report::{Goal, Row};

const SECTION: &str = "ui";
/// The pause between messages: a person's pace, under the server's per-key request rate.
const PACE: Duration = Duration::from_millis(300);
/// How long one message may take on either path before the section fails.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs measurement 9.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    let n = budget.pick(10, 40);
    let chromium = std::panic::catch_unwind(chromium_binary)
        .map_err(|_| "chromium is missing: `sudo apt-get install -y chromium`".to_owned())?;
    std::panic::catch_unwind(check_node_modules).map_err(|_| {
        "tests/browser/node_modules is missing: `npm ci --prefix tests/browser`".to_owned()
    })?;
    let stack = CalloutStack::start().await;
    let url = stack.nats.url();
    let (alice, bob) = alice_and_bob(&url).await;
    let cli = cli_path(&alice, &bob, n).await?;
    let ui = ui_path(&alice, &bob, n, &chromium).await?;
    let mut rows = Vec::new();
    let (mut ui, mut cli) = (ui, cli);
    for (p, label) in [(50.0, "p50"), (99.0, "p99")] {
        rows.push(Row::versus(
            SECTION,
            format!("browser send → shown in the other browser, {label} of {n}"),
            "ms",
            ui.percentile_ms(p),
            cli.percentile_ms(p),
            "`kez-chat send` → `listen --json` line (CLI)",
            Goal::None,
        ));
    }
    Ok(rows)
}

/// `kez-chat send` processes in alice's home, each timed until bob's `listen --json` prints it.
async fn cli_path(alice: &Person, bob: &Person, n: usize) -> Result<Latencies, String> {
    let mut listen = tokio::process::Command::from(kez_chat(&bob.home, &["listen", "--json"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot run kez-chat listen: {err}"))?;
    let mut lines = BufReader::new(listen.stdout.take().ok_or("listen has no stdout")?).lines();
    // Listening once it shows a first message.
    let bob_handle = test_handle("@bob").to_string();
    send(alice, &bob_handle, "warm-up").await?;
    wait_for_line(&mut lines, "warm-up").await?;
    let mut latencies = Latencies::default();
    for i in 0..n {
        let text = format!("cli-{i}-end");
        let started = Instant::now();
        send(alice, &bob_handle, &text).await?;
        wait_for_line(&mut lines, &text).await?;
        latencies.push(started.elapsed());
        tokio::time::sleep(PACE).await;
    }
    let _ = listen.start_kill();
    Ok(latencies)
}

async fn send(alice: &Person, to: &str, text: &str) -> Result<(), String> {
    let output = tokio::process::Command::from(kez_chat(&alice.home, &["send", to, text]))
        .output()
        .await
        .map_err(|err| format!("cannot run kez-chat send: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "kez-chat send failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

async fn wait_for_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    text: &str,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + MESSAGE_TIMEOUT;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .map_err(|_| format!("{text} did not reach bob's listen in time"))?
            .map_err(|err| err.to_string())?
            .ok_or("bob's listen ended")?;
        if line.contains(text) {
            return Ok(());
        }
    }
}

/// The browser scenario on both gateways.
async fn ui_path(
    alice: &Person,
    bob: &Person,
    n: usize,
    chromium: &std::path::Path,
) -> Result<Latencies, String> {
    let alice_ui = Gateway::start(&alice.home, None).await;
    let bob_ui = Gateway::start(&bob.home, None).await;
    let shots = kez_tests::browser::workspace_root().join("target/bench/ui-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).map_err(|err| err.to_string())?;
    let output = tokio::process::Command::new("node")
        .arg(browser_dir().join("bench_latency.mjs"))
        .current_dir(browser_dir())
        .env("KEZ_UI_ALICE", alice_ui.url())
        .env("KEZ_UI_BOB", bob_ui.url())
        .env("KEZ_ALICE_HANDLE", test_handle("@alice").to_string())
        .env("KEZ_BOB_HANDLE", test_handle("@bob").to_string())
        .env("KEZ_BENCH_N", n.to_string())
        .env("KEZ_BENCH_PACE_MS", PACE.as_millis().to_string())
        .env("KEZ_SCREENSHOTS", &shots)
        .env("KEZ_CHROMIUM", chromium)
        .output()
        .await
        .map_err(|err| format!("cannot run node: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = stdout
        .lines()
        .find_map(|line| line.strip_prefix("KEZ-BENCH "))
        .filter(|_| output.status.success())
        .ok_or_else(|| {
            format!(
                "the browser bench failed ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let report: serde_json::Value = serde_json::from_str(report).map_err(|err| err.to_string())?;
    let mut latencies = Latencies::default();
    for sample in report["samples_ms"].as_array().ok_or("no samples")? {
        let ms = sample.as_f64().ok_or("a sample is not a number")?;
        latencies.push(Duration::from_secs_f64(ms / 1000.0));
    }
    if latencies.len() != n {
        return Err(format!("{} samples, not {n}", latencies.len()));
    }
    Ok(latencies)
}
