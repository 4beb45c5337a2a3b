//! Measurement 5, crypto per message and per chain, in this process: envelope seal and open
//! (sign-then-encrypt) for 100 B, 1 KiB and 16 KiB bodies, and sigchain verification of chains
//! of 10, 1,000 and 10,000 links, and a manifest browse with 1,000 entries. The criterion benches in `rust-lib/kez-core/benches/` measure
//! the same operations with statistics; these rows put them in the table.

use std::time::{Duration, Instant};

use kez_core::envelope;
use kez_core::file::{BlobHash, ContentKey, ciphertext_len};
use kez_core::manifest::{self, Manifest, ManifestEntry, PrivateEntry};
use kez_core::sigchain::Endpoint;
use kez_core::{Op, SecretKey, Sigchain, UnsignedLink};

use crate::measure::Budget;
use crate::report::Row;

const SECTION: &str = "crypto";

/// One group of rows of this section.
type Case = fn(Budget) -> Result<Vec<Row>, String>;

/// The section's cases, in table order. Each is a function from the run's budget to its rows;
/// a new per-message or per-object cost is one more function in this list.
const CASES: &[Case] = &[envelope_rows, sigchain_rows, manifest_rows];

/// Runs measurement 5.
pub fn run(budget: Budget) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for case in CASES {
        rows.extend(case(budget)?);
    }
    Ok(rows)
}

/// Microseconds per call of `op`, over `iterations` calls.
fn micros_per_op(
    iterations: usize,
    mut op: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    let started = Instant::now();
    for _ in 0..iterations {
        op()?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / iterations as f64)
}

fn envelope_rows(budget: Budget) -> Result<Vec<Row>, String> {
    let sender = SecretKey::generate();
    let recipient = SecretKey::generate();
    let to = recipient.public_key();
    let iterations = budget.pick(1_000, 10_000);
    let mut rows = Vec::new();
    for (label, size) in [("100 B", 100), ("1 KiB", 1024), ("16 KiB", 16 * 1024)] {
        let body = vec![b'm'; size];
        let seal = micros_per_op(iterations, || {
            envelope::seal(&sender, &to, "text", &body, 1_700_000_000)
                .map(drop)
                .map_err(|e| format!("seal: {e}"))
        })?;
        let (_, sealed) = envelope::seal(&sender, &to, "text", &body, 1_700_000_000)
            .map_err(|e| format!("seal: {e}"))?;
        let open = micros_per_op(iterations, || {
            envelope::open(&recipient, &sealed)
                .map(drop)
                .map_err(|e| format!("open: {e}"))
        })?;
        rows.push(Row::info(
            SECTION,
            format!("envelope seal {label}"),
            "µs",
            seal,
        ));
        rows.push(Row::info(
            SECTION,
            format!("envelope open {label}"),
            "µs",
            open,
        ));
    }
    Ok(rows)
}

fn sigchain_rows(budget: Budget) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for length in [10, 1_000, 10_000] {
        let links = chain_of(length)?;
        // At least a quarter of a second of verifying per length, at least once.
        let rounds = match length {
            10 => budget.pick(200, 2_000),
            1_000 => budget.pick(3, 20),
            _ => budget.pick(1, 3),
        };
        let started = Instant::now();
        for _ in 0..rounds {
            let chain = Sigchain::verify(&links).map_err(|e| format!("verify: {e}"))?;
            if chain.seq() != length as u64 {
                return Err(format!("verified {} links of {length}", chain.seq()));
            }
        }
        let per_chain = started.elapsed() / rounds;
        rows.push(Row::info(
            SECTION,
            format!("sigchain verify, {length} links"),
            "ms",
            ms(per_chain),
        ));
    }
    Ok(rows)
}

/// A manifest of 1,000 entries, all private (1,000 boxes, the costly kind to read), 500 of them
/// sealed to the reader. Browsing is what a reader's client does after fetching it:
/// `Manifest::open` (hash, canonical JSON, signature, entries) and `visible_to` (trial-decrypting
/// every box). Building it is what a publish costs.
fn manifest_rows(budget: Budget) -> Result<Vec<Row>, String> {
    let owner = SecretKey::generate();
    let reader = SecretKey::generate();
    let other = SecretKey::generate().public_key();
    let private: Vec<PrivateEntry> = (0..1000u64)
        .map(|i| PrivateEntry {
            entry: ManifestEntry {
                name: format!("file-{i:04}.bin"),
                size: i * 1000,
                time: 1_700_000_000,
                blob: BlobHash::from_bytes([i as u8; 32]),
                cipher_size: ciphertext_len(i * 1000).expect("a small size"),
                key: ContentKey::generate(),
                wrapped: false,
            },
            recipients: vec![if i % 2 == 0 {
                reader.public_key()
            } else {
                other
            }],
        })
        .collect();
    let public = [];
    let rounds = budget.pick(3, 20);
    let started = Instant::now();
    let mut bytes = Vec::new();
    for _ in 0..rounds {
        bytes = manifest::build(&owner, 1, 1_700_000_000, &public, &private)
            .map_err(|e| format!("build: {e}"))?;
    }
    let build = started.elapsed() / rounds;
    let hash = manifest::manifest_hash(&bytes);
    let started = Instant::now();
    for _ in 0..rounds {
        let opened = Manifest::open(&bytes, &hash, &[owner.public_key()])
            .map_err(|e| format!("open: {e}"))?;
        let visible = opened
            .visible_to(&reader)
            .map_err(|e| format!("read: {e}"))?;
        if visible.len() != 500 {
            return Err(format!(
                "the reader sees {} entries, not 500",
                visible.len()
            ));
        }
    }
    let browse = started.elapsed() / rounds;
    Ok(vec![
        Row::info(
            SECTION,
            "manifest browse, 1,000 sealed entries (500 for the reader)",
            "ms",
            ms(browse),
        ),
        Row::info(SECTION, "manifest build, same manifest", "ms", ms(build)),
        Row::info(
            SECTION,
            "manifest size, same manifest",
            "KiB",
            bytes.len() as f64 / 1024.0,
        ),
    ])
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A valid chain of `length` links: the endpoint `home` added and removed in turn.
pub fn chain_of(length: usize) -> Result<Vec<Vec<u8>>, String> {
    let key = SecretKey::from_seed(&[7; 32]);
    let op = |seq: usize| {
        if seq.is_multiple_of(2) {
            Op::AddEndpoint(Endpoint {
                name: "home".into(),
                kind: "nats".into(),
                address: "nats://127.0.0.1:14222".into(),
            })
        } else {
            Op::RemoveEndpoint {
                name: "home".into(),
            }
        }
    };
    let time = 1_700_000_000;
    let first = UnsignedLink::first(key.public_key(), time, op(0))
        .sign(&key)
        .map_err(|e| format!("first link: {e}"))?;
    let mut chain = Sigchain::start(first.bytes()).map_err(|e| format!("first link: {e}"))?;
    let mut links = vec![first.bytes().to_vec()];
    for seq in 1..length {
        let link = chain
            .next_link(time + seq as u64, op(seq))
            .sign(&key)
            .map_err(|e| format!("link {seq}: {e}"))?;
        chain
            .append(link.bytes())
            .map_err(|e| format!("link {seq}: {e}"))?;
        links.push(link.bytes().to_vec());
    }
    Ok(links)
}
