//! Envelope seal (sign-then-encrypt) and open (decrypt, verify) for 100 B, 1 KiB and 16 KiB
//! bodies: the per-message cost of end-to-end encryption. `cargo bench -p kez-core --bench
//! envelope`; `make bench` has the same figures in its table.
#![allow(
    missing_docs,
    reason = "criterion_group! defines the undocumented `benches`"
)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kez_core::SecretKey;
use kez_core::envelope::{open, seal};

const SIZES: [(&str, usize); 3] = [("100B", 100), ("1KiB", 1024), ("16KiB", 16 * 1024)];

fn envelope(c: &mut Criterion) {
    let sender = SecretKey::from_seed(&[1; 32]);
    let recipient = SecretKey::from_seed(&[2; 32]);
    let to = recipient.public_key();
    let mut group = c.benchmark_group("envelope");
    for (label, size) in SIZES {
        let body = vec![b'm'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal", label), &body, |b, body| {
            b.iter(|| seal(&sender, &to, "text", black_box(body), 1_700_000_000).expect("seals"));
        });
        let (_, sealed) = seal(&sender, &to, "text", &body, 1_700_000_000).expect("seals");
        group.bench_with_input(BenchmarkId::new("open", label), &sealed, |b, sealed| {
            b.iter(|| open(&recipient, black_box(sealed)).expect("opens"));
        });
    }
    group.finish();
}

criterion_group!(benches, envelope);
criterion_main!(benches);
