//! Measurement 7, devices: what a person's several devices cost.
//!
//! - Fan-out: alice sends `n` messages, pipelined, to bob, whose verified chain lists 1, 3 or 10
//!   devices; alice seals one envelope per device and hands each to `kez.mail.send`, and every
//!   device fetches, opens and stores all `n` on its own connection. Timed from the first
//!   publish until every device has the last one; the 1-device figure is the baseline (today's
//!   single-key path).
//! - Connects with a device key: [`CONCURRENCY`] tasks connect through the real
//!   `kez-chat-server` binary's auth callout with device keys (each an active device of a
//!   registered identity: the callout reads the device index and the identity's standing)
//!   against the same identities' own keys (one registry read).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kez_client::{Connection, Contact, Store};
use kez_core::SecretKey;
use kez_core::sigchain::DeviceKind;
use kez_tests::callout::{CalloutProcessStack, CalloutStack};
use tempfile::TempDir;

use crate::callout::{CONCURRENCY, connect_loop};
use crate::chat::{BODY_BYTES, User, WINDOW, stamped, write_first_link};
use crate::measure::{Budget, per_sec};
use crate::report::{Goal, Row};

const SECTION: &str = "devices";
/// Identities whose devices (and own keys) the connect loop cycles through.
const IDENTITIES: usize = 16;
/// Messages one fetch asks for.
const FETCH: usize = 256;

/// One of bob's devices: its own key, connection (speaking for bob) and store.
struct Device {
    conn: Connection,
    store: Store,
    _dir: TempDir,
}

/// Runs measurement 7.
pub async fn run(budget: Budget) -> Result<Vec<Row>, String> {
    let n = budget.pick(500, 3_000);
    let mut rates = Vec::new();
    for devices in [1, 3, 10] {
        rates.push((devices, fan_out(devices, n).await?));
    }
    let single = rates[0].1;
    let mut rows: Vec<Row> = rates
        .iter()
        .map(|&(devices, rate)| {
            Row::versus(
                SECTION,
                format!("messages/s to {}, {n} pipelined", recipient(devices)),
                "msg/s",
                rate,
                single,
                "1 device",
                Goal::None,
            )
        })
        .collect();
    rows.extend(rates.iter().map(|&(devices, rate)| {
        Row::info(
            SECTION,
            format!("envelopes/s to {}", recipient(devices)),
            "env/s",
            rate * devices as f64,
        )
    }));
    rows.extend(connects(budget).await?);
    Ok(rows)
}

/// "a recipient with N device(s)".
fn recipient(devices: usize) -> String {
    match devices {
        1 => "a recipient with 1 device".to_owned(),
        n => format!("a recipient with {n} devices"),
    }
}

/// Messages per second from alice to bob with `devices` devices, every device receiving all.
async fn fan_out(devices: usize, n: usize) -> Result<f64, String> {
    // One sender at full speed: the per-identity mail budget would measure itself.
    let stack = CalloutStack::start_configured(|config| {
        config.limits = kez_chat_server::limits::Limits::OFF;
    })
    .await;
    let url = stack.nats.url();
    let alice = User::register(&url, "alice").await?;
    let bob = User::register(&url, "bob").await?;
    let mut others = Vec::with_capacity(devices - 1);
    for index in 1..devices {
        others.push(add_device(&url, &bob, index).await?);
    }
    let contact = alice
        .conn
        .verify_contact(&alice.store, &kez_tests::kez_server::test_handle("@bob"))
        .await
        .map_err(|e| format!("alice adds bob: {e}"))?
        .contact;
    if contact.recipient_keys().len() != devices {
        return Err(format!(
            "bob's chain lists {} devices to seal to, not {devices}",
            contact.recipient_keys().len()
        ));
    }
    let epoch = Instant::now();
    let started = Instant::now();
    let receiving = futures::future::try_join_all(
        std::iter::once((&bob.conn, &bob.store))
            .chain(others.iter().map(|device| (&device.conn, &device.store)))
            .map(|(conn, store)| receive_all(conn, store, n)),
    );
    let sending = send_all(&alice, &contact, n, epoch);
    tokio::try_join!(sending, receiving)?;
    Ok(per_sec(n, started.elapsed()))
}

/// A new device of `bob`: its key counter-signs, bob's key signs the `add_device` link.
async fn add_device(url: &str, bob: &User, index: usize) -> Result<Device, String> {
    let key = Arc::new(SecretKey::generate());
    append_device(&bob.conn, &bob.key, &key, &format!("device{index}")).await?;
    let conn = Connection::connect(url, key)
        .await
        .map_err(|e| e.to_string())?
        .as_device_of(bob.key.public_key());
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = Store::open(dir.path().join("store.redb")).map_err(|e| e.to_string())?;
    Ok(Device {
        conn,
        store,
        _dir: dir,
    })
}

/// Appends to `owner`'s chain, over `conn`, the `add_device` link of `device` named `name`:
/// `device` counter-signs, `owner` signs.
async fn append_device(
    conn: &Connection,
    owner: &SecretKey,
    device: &SecretKey,
    name: &str,
) -> Result<(), String> {
    let chain = conn
        .chain(&owner.public_key())
        .await
        .map_err(|e| e.to_string())?;
    let link = chain
        .add_device_link(kez_client::now(), owner, device, name, DeviceKind::Cli)
        .map_err(|e| e.to_string())?;
    conn.append(link.bytes())
        .await
        .map_err(|e| format!("adding device {name}: {e}"))?;
    Ok(())
}

/// alice publishes `n` messages with up to [`WINDOW`] outstanding.
async fn send_all(alice: &User, contact: &Contact, n: usize, epoch: Instant) -> Result<(), String> {
    let mut window = VecDeque::with_capacity(WINDOW);
    for _ in 0..n {
        if window.len() == WINDOW {
            let pending: kez_client::Pending = window.pop_front().expect("a full window");
            pending.acked().await.map_err(|e| e.to_string())?;
        }
        let body = stamped(epoch, BODY_BYTES);
        let pending = alice
            .conn
            .publish(contact, "text", &body)
            .await
            .map_err(|e| e.to_string())?;
        window.push_back(pending);
    }
    for pending in window {
        let sent = pending.acked().await.map_err(|e| e.to_string())?;
        if !sent.missed.is_empty() {
            return Err(format!("devices missed a message: {:?}", sent.missed));
        }
    }
    Ok(())
}

/// One device receives until it has `n` messages.
async fn receive_all(conn: &Connection, store: &Store, n: usize) -> Result<(), String> {
    let mut got = 0;
    while got < n {
        got += conn
            .receive(store, FETCH, Duration::from_millis(500))
            .await
            .map_err(|e| format!("a device receives: {e}"))?
            .len();
    }
    Ok(())
}

/// Connects/s and p50 latency with device keys against the identities' own keys.
async fn connects(budget: Budget) -> Result<Vec<Row>, String> {
    let stack = CalloutProcessStack::start().await;
    let url = stack.nats.url();
    let admin = stack.server_client().await;
    let mut identities = Vec::with_capacity(IDENTITIES);
    let mut devices = Vec::with_capacity(IDENTITIES);
    for index in 0..IDENTITIES {
        let key = Arc::new(SecretKey::generate());
        kez_tests::callout::register(&admin, &key, &format!("dev{index}"))
            .await
            .map_err(|e| format!("registering identity {index}: {e:?}"))?;
        let conn = Connection::connect(&url, key.clone())
            .await
            .map_err(|e| e.to_string())?;
        write_first_link(&conn, &key).await?;
        let device = Arc::new(SecretKey::generate());
        append_device(&conn, &key, &device, "laptop").await?;
        conn.close().await.map_err(|e| e.to_string())?;
        identities.push(Connection::options(&key));
        devices.push(Connection::options(&device));
    }
    let duration = budget.pick(Duration::from_secs(3), Duration::from_secs(10));
    let mut single = connect_loop(&url, Arc::new(identities), duration).await;
    let mut device = connect_loop(&url, Arc::new(devices), duration).await;
    let failures = single.failures.len() + device.failures.len();
    if failures > 0 {
        eprintln!(
            "devices: {failures} failed connects (first: {:?})",
            device.failures.first().or(single.failures.first())
        );
    }
    Ok(vec![
        Row::versus(
            SECTION,
            format!("connects/s with a device key, {CONCURRENCY} concurrent"),
            "conn/s",
            per_sec(device.connects, device.elapsed),
            per_sec(single.connects, single.elapsed),
            "the identity's own key",
            Goal::RatioAtLeast(0.5),
        ),
        Row::versus(
            SECTION,
            format!("connect latency p50 with a device key, {CONCURRENCY} concurrent"),
            "ms",
            device.latencies.percentile_ms(50.0),
            single.latencies.percentile_ms(50.0),
            "the identity's own key",
            Goal::None,
        ),
        Row::info(SECTION, "failed connects", "conn", failures as f64).goal(Goal::AtMost(0.0)),
    ])
}
