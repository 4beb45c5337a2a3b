//! Reading a shared-files manifest of 1,000 entries, all sealed (1,000 boxes, the costly kind to
//! read), 500 of them for the reader: `Manifest::open` (hash, canonical JSON, signature) and
//! `visible_to` (trial-decrypting every box) — what `kez-chat browse` does after the fetch.
//! `cargo bench -p kez-core --bench manifest`; `make bench` has the same figure in its table.
#![allow(
    missing_docs,
    reason = "criterion_group! defines the undocumented `benches`"
)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kez_core::SecretKey;
use kez_core::file::{BlobHash, ContentKey, ciphertext_len};
use kez_core::manifest::{Manifest, ManifestEntry, PrivateEntry, build, manifest_hash};

fn manifest(c: &mut Criterion) {
    let owner = SecretKey::from_seed(&[1; 32]);
    let reader = SecretKey::from_seed(&[2; 32]);
    let other = SecretKey::from_seed(&[3; 32]).public_key();
    let private: Vec<PrivateEntry> = (0..1000u64)
        .map(|i| PrivateEntry {
            entry: ManifestEntry {
                name: format!("file-{i:04}.bin"),
                size: i * 1000,
                time: 1_700_000_000,
                blob: BlobHash::from_bytes([i as u8; 32]),
                cipher_size: ciphertext_len(i * 1000).expect("a small size"),
                key: ContentKey::from_bytes([i as u8; 32]),
                wrapped: false,
            },
            recipients: vec![if i % 2 == 0 {
                reader.public_key()
            } else {
                other
            }],
        })
        .collect();
    let bytes = build(&owner, 1, 1_700_000_000, &[], &private).expect("builds");
    let hash = manifest_hash(&bytes);
    let mut group = c.benchmark_group("manifest");
    group.sample_size(10);
    group.bench_function("browse 1000 sealed entries", |b| {
        b.iter(|| {
            let opened =
                Manifest::open(black_box(&bytes), &hash, &[owner.public_key()]).expect("opens");
            let visible = opened.visible_to(&reader).expect("reads");
            assert_eq!(visible.len(), 500);
        });
    });
    group.bench_function("build 1000 sealed entries", |b| {
        b.iter(|| build(&owner, 1, 1_700_000_000, &[], black_box(&private)).expect("builds"));
    });
    group.finish();
}

criterion_group!(benches, manifest);
criterion_main!(benches);
