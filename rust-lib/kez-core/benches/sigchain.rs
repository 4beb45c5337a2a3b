//! Sigchain verification of chains of 10, 1,000 and 10,000 links: what a client pays to check a
//! contact's whole history. `cargo bench -p kez-core --bench sigchain`; `make bench` has the
//! same figures in its table.
#![allow(
    missing_docs,
    reason = "criterion_group! defines the undocumented `benches`"
)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kez_core::sigchain::Endpoint;
use kez_core::{Op, SecretKey, Sigchain, UnsignedLink};

/// A valid chain of `length` links: the endpoint `home` added and removed in turn.
fn chain_of(length: usize) -> Vec<Vec<u8>> {
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
        .expect("signs");
    let mut chain = Sigchain::start(first.bytes()).expect("starts");
    let mut links = vec![first.bytes().to_vec()];
    for seq in 1..length {
        let link = chain
            .next_link(time + seq as u64, op(seq))
            .sign(&key)
            .expect("signs");
        chain.append(link.bytes()).expect("appends");
        links.push(link.bytes().to_vec());
    }
    links
}

fn verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("sigchain_verify");
    group.sample_size(10);
    for length in [10, 1_000, 10_000] {
        let links = chain_of(length);
        group.bench_with_input(BenchmarkId::from_parameter(length), &links, |b, links| {
            b.iter(|| Sigchain::verify(black_box(links)).expect("verifies"));
        });
    }
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
