//! File encryption and offer tests, and the committed vectors (`vectors/file/*.json`,
//! PROTOCOL.md §9). `make vectors` (KEZ_REGEN_VECTORS=1) rewrites the vectors; otherwise the test
//! fails when regeneration would change a byte.

use proptest::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::*;

fn seed(label: &str, name: &str) -> [u8; 32] {
    Sha256::digest(format!("kez test vector {label}: {name}")).into()
}

fn test_key() -> ContentKey {
    ContentKey::from_bytes(seed("content key", "file"))
}

fn other_key() -> ContentKey {
    ContentKey::from_bytes(seed("content key", "other"))
}

fn test_prefix() -> [u8; NONCE_PREFIX_LEN] {
    seed("nonce prefix", "file")[..NONCE_PREFIX_LEN]
        .try_into()
        .unwrap()
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// The vectors' plaintext pattern: byte i is i mod 251.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn encrypt_fixed(key: &ContentKey, plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encrypt_with(
        Encryptor::with_nonce_prefix(key, test_prefix(), plaintext),
        &mut out,
    )
    .unwrap();
    out
}

fn open(key: &ContentKey, ciphertext: &[u8]) -> Result<Vec<u8>, FileCryptError> {
    let mut out = Vec::new();
    let written = decrypt(key, ciphertext, &mut out)?;
    assert_eq!(written, out.len() as u64);
    Ok(out)
}

fn open_exact(key: &ContentKey, ciphertext: &[u8], len: u64) -> Result<Vec<u8>, FileCryptError> {
    let mut out = Vec::new();
    decrypt_exact(key, ciphertext, &mut out, len)?;
    Ok(out)
}

fn code(result: Result<Vec<u8>, FileCryptError>) -> (&'static str, Option<u64>) {
    match result.unwrap_err() {
        FileCryptError::AuthFailed { segment } => ("auth_failed", Some(segment)),
        err => (err.code(), None),
    }
}

/// Offset of segment `i`'s first byte.
fn segment_start(i: usize) -> usize {
    HEADER_LEN + i * FULL_SEGMENT
}

const SIZES: [usize; 6] = [
    0,
    1,
    SEGMENT_LEN - 1,
    SEGMENT_LEN,
    SEGMENT_LEN + 1,
    3 * SEGMENT_LEN + 5,
];

#[test]
fn round_trips_at_segment_boundaries() {
    let key = ContentKey::generate();
    for size in SIZES {
        let plaintext = pattern(size);
        let mut ciphertext = Vec::new();
        let written = encrypt(&key, plaintext.as_slice(), &mut ciphertext).unwrap();
        assert_eq!(written, ciphertext.len() as u64);
        assert_eq!(ciphertext_len(size as u64), Some(written), "{size}");
        assert_eq!(plaintext_len(written), Some(size as u64), "{size}");
        assert_eq!(&ciphertext[..5], b"KEZF\x01");
        assert_eq!(open(&key, &ciphertext).unwrap(), plaintext, "{size}");
        assert_eq!(open_exact(&key, &ciphertext, written).unwrap(), plaintext);
        // One reader that hands out a byte at a time changes nothing.
        let mut out = Vec::new();
        decrypt(&key, OneByte(&ciphertext), &mut out).unwrap();
        assert_eq!(out, plaintext);
    }
}

#[test]
fn encryptor_chunks_are_the_header_then_one_per_segment() {
    for size in SIZES {
        let plaintext = pattern(size);
        let chunks: Vec<Vec<u8>> =
            Encryptor::with_nonce_prefix(&test_key(), test_prefix(), OneByte(&plaintext))
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(chunks.len(), size / SEGMENT_LEN + 2, "{size}");
        assert_eq!(chunks[0].len(), HEADER_LEN);
        assert!(
            chunks[1..chunks.len() - 1]
                .iter()
                .all(|c| c.len() == FULL_SEGMENT)
        );
        assert!(chunks.last().unwrap().len() < FULL_SEGMENT);
        assert_eq!(chunks.concat(), encrypt_fixed(&test_key(), &plaintext));
    }
    let mut encryptor = Encryptor::new(&test_key(), &b""[..]);
    let header = *encryptor.header();
    let mut chunk = vec![1, 2, 3];
    assert!(encryptor.next_chunk_into(&mut chunk).unwrap());
    assert_eq!(chunk, header);
    assert!(encryptor.next_chunk_into(&mut chunk).unwrap());
    assert_eq!(chunk.len(), TAG_LEN);
    assert!(!encryptor.next_chunk_into(&mut chunk).unwrap());
    assert!(chunk.is_empty());
    assert!(encryptor.next().is_none());
}

#[test]
fn each_encryption_has_a_fresh_nonce_prefix() {
    let key = test_key();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    encrypt(&key, &b"same"[..], &mut a).unwrap();
    encrypt(&key, &b"same"[..], &mut b).unwrap();
    assert_ne!(a[5..HEADER_LEN], b[5..HEADER_LEN]);
    assert_ne!(a, b);
}

#[test]
fn lengths() {
    assert_eq!(ciphertext_len(0), Some(28));
    assert_eq!(ciphertext_len(65535), Some(12 + 65535 + 16));
    assert_eq!(ciphertext_len(65536), Some(12 + 65536 + 32));
    assert_eq!(
        ciphertext_len(MAX_PLAINTEXT_LEN),
        Some(12 + MAX_PLAINTEXT_LEN + 16 * (1 << 32))
    );
    assert_eq!(ciphertext_len(MAX_PLAINTEXT_LEN + 1), None);
    assert_eq!(ciphertext_len(u64::MAX), None);
    for len in 0..28 {
        assert_eq!(plaintext_len(len), None, "{len}");
    }
    // A final segment of 1..15 bytes cannot exist.
    for tail in 0..16 {
        assert_eq!(plaintext_len(12 + FULL_SEGMENT as u64 + tail), None);
    }
    assert_eq!(
        plaintext_len(ciphertext_len(MAX_PLAINTEXT_LEN).unwrap() + 1),
        None
    );
    assert_eq!(plaintext_len(u64::MAX), None);
}

#[test]
fn header_failures() {
    let good = encrypt_fixed(&test_key(), b"hello");
    for len in 0..HEADER_LEN {
        assert_eq!(code(open(&test_key(), &good[..len])), ("truncated", None));
    }
    let mut bad = good.clone();
    bad[0] = b'k';
    assert_eq!(code(open(&test_key(), &bad)), ("bad_magic", None));
    let mut future = good.clone();
    future[4] = 2;
    let err = open(&test_key(), &future).unwrap_err();
    assert!(matches!(err, FileCryptError::UnknownVersion { version: 2 }));
    assert_eq!(err.code(), "unknown_version");
    // The nonce prefix is authenticated (it is in the nonce and in the AAD).
    for i in 5..HEADER_LEN {
        let mut flipped = good.clone();
        flipped[i] ^= 0x80;
        assert_eq!(code(open(&test_key(), &flipped)), ("auth_failed", Some(0)));
    }
}

#[test]
fn a_flipped_byte_fails_its_segment() {
    let plaintext = pattern(3 * SEGMENT_LEN + 5);
    let good = encrypt_fixed(&test_key(), &plaintext);
    for segment in 0..4 {
        let start = segment_start(segment);
        let end = (start + FULL_SEGMENT).min(good.len());
        // First byte, a middle byte, the first and last tag bytes.
        for at in [start, (start + end) / 2, end - TAG_LEN, end - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            let mut out = Vec::new();
            let err = decrypt(&test_key(), bad.as_slice(), &mut out).unwrap_err();
            assert!(
                matches!(err, FileCryptError::AuthFailed { segment: s } if s == segment as u64),
                "byte {at}: {err:?}"
            );
            // Only the authentic segments before it were written.
            assert_eq!(out, plaintext[..segment * SEGMENT_LEN]);
        }
    }
}

#[test]
fn wrong_key_fails_at_segment_zero() {
    for size in SIZES {
        let ciphertext = encrypt_fixed(&test_key(), &pattern(size));
        assert_eq!(
            code(open(&other_key(), &ciphertext)),
            ("auth_failed", Some(0))
        );
    }
}

#[test]
fn truncation() {
    let good = encrypt_fixed(&test_key(), &pattern(3 * SEGMENT_LEN + 5));
    // At every segment boundary, including right after the header.
    for segment in 0..4 {
        let cut = &good[..segment_start(segment)];
        assert_eq!(code(open(&test_key(), cut)), ("truncated", None));
        assert_eq!(
            code(open_exact(&test_key(), cut, good.len() as u64)),
            ("truncated", None)
        );
    }
    // Fewer than a tag's worth of the next segment.
    for extra in [1, TAG_LEN - 1] {
        let cut = &good[..segment_start(2) + extra];
        assert_eq!(code(open(&test_key(), cut)), ("truncated", None));
    }
    // Inside a segment: it is taken for the final one and does not authenticate.
    for extra in [TAG_LEN, 100, FULL_SEGMENT - 1] {
        let cut = &good[..segment_start(1) + extra];
        assert_eq!(code(open(&test_key(), cut)), ("auth_failed", Some(1)));
        assert_eq!(
            code(open_exact(&test_key(), cut, good.len() as u64)),
            ("truncated", None)
        );
    }
    // The final segment alone missing, for a size that is a multiple of the segment size: the
    // empty final segment is what tells the end from a cut.
    let even = encrypt_fixed(&test_key(), &pattern(2 * SEGMENT_LEN));
    assert_eq!(even.len(), segment_start(2) + TAG_LEN);
    assert_eq!(
        code(open(&test_key(), &even[..segment_start(2)])),
        ("truncated", None)
    );
}

#[test]
fn trailing_data() {
    for size in [0, 5, SEGMENT_LEN, SEGMENT_LEN + 5] {
        let good = encrypt_fixed(&test_key(), &pattern(size));
        let last = (size / SEGMENT_LEN) as u64;
        for extra in [1, TAG_LEN, FULL_SEGMENT] {
            let mut long = good.clone();
            long.extend(std::iter::repeat_n(0xaa, extra));
            // Without the length, the extra bytes become part of the last segment(s).
            assert_eq!(code(open(&test_key(), &long)).0, "auth_failed");
            assert_eq!(
                code(open_exact(&test_key(), &long, good.len() as u64)),
                ("trailing_data", None)
            );
        }
        // The announced length larger than the real one.
        assert_eq!(
            code(open_exact(&test_key(), &good, good.len() as u64 + 1)),
            ("truncated", None)
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(
            code(open(&test_key(), &long)),
            ("auth_failed", Some(last)),
            "{size}"
        );
    }
}

#[test]
fn reordered_or_duplicated_segments_fail() {
    let good = encrypt_fixed(&test_key(), &pattern(3 * SEGMENT_LEN + 5));
    let segment = |i: usize| good[segment_start(i)..segment_start(i + 1)].to_vec();
    let header = good[..HEADER_LEN].to_vec();
    let tail = good[segment_start(3)..].to_vec();
    let swapped = [
        header.clone(),
        segment(1),
        segment(0),
        segment(2),
        tail.clone(),
    ]
    .concat();
    assert_eq!(code(open(&test_key(), &swapped)), ("auth_failed", Some(0)));
    let repeated = [
        header.clone(),
        segment(0),
        segment(0),
        segment(2),
        tail.clone(),
    ]
    .concat();
    assert_eq!(code(open(&test_key(), &repeated)), ("auth_failed", Some(1)));
    let dropped = [header.clone(), segment(0), segment(2), tail].concat();
    assert_eq!(code(open(&test_key(), &dropped)), ("auth_failed", Some(1)));
    // A segment from another file under the same key (and so another nonce prefix) fails.
    let other = encrypt_fixed(&other_key(), &pattern(SEGMENT_LEN + 1));
    let mut mixed = encrypt_fixed(&test_key(), &pattern(SEGMENT_LEN + 1));
    mixed.splice(
        segment_start(1)..,
        other[segment_start(1)..].iter().copied(),
    );
    assert_eq!(code(open(&test_key(), &mixed)), ("auth_failed", Some(1)));
}

/// Ciphertext made segment by segment with chosen last flags (what an encryptor with other
/// segmentation rules, or an attacker holding the key, could produce).
fn craft(segments: &[(&[u8], bool)]) -> Vec<u8> {
    let mut stream = Stream::new(&test_key(), &test_prefix());
    let mut out = stream.header.to_vec();
    for (plaintext, last) in segments {
        let mut buffer = plaintext.to_vec();
        stream.seal(&mut buffer, *last).unwrap();
        out.extend_from_slice(&buffer);
    }
    out
}

#[test]
fn last_flag_must_match_the_segment_length() {
    let full = pattern(SEGMENT_LEN);
    // The honest form decrypts.
    assert_eq!(
        open(&test_key(), &craft(&[(&full, false), (b"ab", true)])).unwrap(),
        [full.as_slice(), b"ab"].concat()
    );
    // A full segment marked last (a final segment may not be full).
    assert_eq!(
        code(open(&test_key(), &craft(&[(&full, true)]))),
        ("auth_failed", Some(0))
    );
    assert_eq!(
        code(open(&test_key(), &craft(&[(&full, true), (b"", true)]))),
        ("auth_failed", Some(0))
    );
    // A short final segment not marked last.
    assert_eq!(
        code(open(&test_key(), &craft(&[(&full, false), (b"ab", false)]))),
        ("auth_failed", Some(1))
    );
    // A non-final segment cut short and re-sealed as last, with more following: it is taken
    // as the final segment because of its length, which leaves the rest as its bytes.
    assert_eq!(
        code(open(
            &test_key(),
            &craft(&[(&full[..100], true), (b"more", true)])
        )),
        ("auth_failed", Some(0))
    );
}

#[test]
fn the_segment_counter_does_not_wrap() {
    let mut encryptor = Encryptor::with_nonce_prefix(&test_key(), test_prefix(), io::repeat(7));
    encryptor.stream.counter = u64::from(u32::MAX);
    assert_eq!(encryptor.next().unwrap().unwrap().len(), HEADER_LEN);
    assert_eq!(encryptor.next().unwrap().unwrap().len(), FULL_SEGMENT);
    let err = encryptor.next().unwrap().unwrap_err();
    assert_eq!(err.code(), "too_large");
    assert!(encryptor.next().is_none());
    let mut stream = Stream::new(&test_key(), &test_prefix());
    stream.counter = 1 << 32;
    let mut buffer = Vec::new();
    assert_eq!(
        stream.open(&mut buffer, true).unwrap_err().code(),
        "too_large"
    );
}

#[test]
fn io_errors_are_io() {
    let err = encrypt(&test_key(), Failing, Vec::new()).unwrap_err();
    assert_eq!(err.code(), "io");
    let err = encrypt(&test_key(), &b"abc"[..], Failing).unwrap_err();
    assert_eq!(err.code(), "io");
    let good = encrypt_fixed(&test_key(), b"abc");
    assert_eq!(
        decrypt(&test_key(), good.as_slice(), Failing)
            .unwrap_err()
            .code(),
        "io"
    );
    assert_eq!(
        decrypt(&test_key(), Failing, Vec::new())
            .unwrap_err()
            .code(),
        "io"
    );
}

/// Reads one byte at a time, with an `Interrupted` error before each.
struct OneByte<'a> {
    data: &'a [u8],
    interrupt: bool,
}

#[allow(non_snake_case)]
fn OneByte(data: &[u8]) -> OneByte<'_> {
    OneByte {
        data,
        interrupt: true,
    }
}

impl Read for OneByte<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if !self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        match (self.data.split_first(), buf.first_mut()) {
            (Some((&byte, rest)), Some(slot)) => {
                *slot = byte;
                self.data = rest;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

struct Failing;

impl Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::other("disk on fire"))
    }
}

impl Write for Failing {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("disk full"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn content_key_text_form_and_redaction() {
    let key = test_key();
    let text = key.to_hex();
    assert_eq!(text.len(), 64);
    assert_eq!(text.parse::<ContentKey>().unwrap(), key);
    assert_eq!(format!("{key:?}"), "ContentKey(<redacted>)");
    assert!(!format!("{key:?}").contains(&text[..8]));
    let json = serde_json::to_string(&key).unwrap();
    assert_eq!(json, format!("\"{}\"", *text));
    assert_eq!(serde_json::from_str::<ContentKey>(&json).unwrap(), key);
    assert!(text.to_uppercase().parse::<ContentKey>().is_err());
    assert!(text[..62].parse::<ContentKey>().is_err());
    assert_ne!(ContentKey::generate(), ContentKey::generate());
    assert_ne!(key, other_key());
}

fn sample_offer() -> FileOffer {
    let ciphertext = encrypt_fixed(&test_key(), b"hello, kez files\n");
    FileOffer {
        name: "notes.txt".into(),
        size: 17,
        blob: BlobHash::from_bytes(seed("blob", "notes.txt")),
        cipher_size: ciphertext.len() as u64,
        providers: vec!["iroh:example-endpoint-address".into()],
        key: test_key(),
        pinned: true,
    }
}

/// The example in PROTOCOL.md §9.3, byte for byte.
const SAMPLE_OFFER_JSON: &str = concat!(
    r#"{"blob":"f3f93ee2f224d8944a8b4dad7e1be292b03f4df49f3f133a49acb11a46819e26","#,
    r#""cipher_size":45,"#,
    r#""key":"75bdcaa8f739eefb7608c99b9dac37266c0ffab9a340262568c5798cbb84506b","#,
    r#""name":"notes.txt","pinned":true,"providers":["iroh:example-endpoint-address"],"size":17}"#,
);

#[test]
fn offer_round_trip_and_canonical_form() {
    let offer = sample_offer();
    let json = offer.to_json().unwrap();
    assert_eq!(std::str::from_utf8(&json).unwrap(), SAMPLE_OFFER_JSON);
    assert_eq!(FileOffer::from_json(&json).unwrap(), offer);
    // Receivers accept any member order and whitespace.
    let pretty = serde_json::to_vec_pretty(&offer).unwrap();
    assert_eq!(FileOffer::from_json(&pretty).unwrap(), offer);
    assert!(!format!("{offer:?}").contains(&test_key().to_hex()[..]));
    assert_eq!(FILE_OFFER_CONTENT_TYPE, "file-offer");
}

fn offer_error(value: Value) -> &'static str {
    let bytes = serde_json::to_vec(&value).unwrap();
    FileOffer::from_json(&bytes).unwrap_err().code()
}

#[test]
fn offer_refusals() {
    let good = serde_json::to_value(sample_offer()).unwrap();
    let with = |member: &str, value: Value| {
        let mut offer = good.clone();
        offer[member] = value;
        offer
    };
    let big = vec![b' '; MAX_OFFER_BYTES + 1];
    assert_eq!(FileOffer::from_json(&big).unwrap_err().code(), "too_large");
    assert_eq!(FileOffer::from_json(b"{").unwrap_err().code(), "malformed");
    assert_eq!(offer_error(with("extra", json!(1))), "malformed");
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("pinned");
    assert_eq!(offer_error(missing), "malformed");
    assert_eq!(offer_error(with("size", json!(-1))), "malformed");
    assert_eq!(offer_error(with("size", json!(1.5))), "malformed");
    assert_eq!(offer_error(with("key", json!("00"))), "malformed");
    let upper = good["blob"].as_str().unwrap().to_uppercase();
    assert_eq!(offer_error(with("blob", json!(upper))), "malformed");
    assert_eq!(offer_error(with("pinned", json!("yes"))), "malformed");
    let duplicate = br#"{"name":"a","name":"b"}"#;
    assert_eq!(
        FileOffer::from_json(duplicate).unwrap_err().code(),
        "malformed"
    );
    for name in [
        "",
        ".",
        "..",
        "a/b",
        "a\\b",
        "nul\0",
        "tab\t",
        "del\u{7f}",
        "c1\u{85}",
        &"x".repeat(256),
        &"é".repeat(128),
    ] {
        assert_eq!(
            offer_error(with("name", json!(name))),
            "bad_name",
            "{name:?}"
        );
    }
    for name in ["...", ".hidden", "a b", "日本語.txt", &"x".repeat(255)] {
        let bytes = serde_json::to_vec(&with("name", json!(name))).unwrap();
        assert!(FileOffer::from_json(&bytes).is_ok(), "{name:?}");
    }
    let many: Vec<String> = (0..17).map(|i| format!("p{i}")).collect();
    for providers in [
        json!([]),
        json!([""]),
        json!(["a\nb"]),
        json!(["x".repeat(1025)]),
        json!(["a", "a"]),
        json!(many),
    ] {
        assert_eq!(offer_error(with("providers", providers)), "bad_providers");
    }
    assert_eq!(offer_error(with("cipher_size", json!(44))), "size_mismatch");
    assert_eq!(
        offer_error(with("size", json!(MAX_PLAINTEXT_LEN + 1))),
        "size_mismatch"
    );
    let mut invalid = sample_offer();
    invalid.name = "../x".into();
    assert_eq!(invalid.to_json().unwrap_err().code(), "bad_name");
}

#[test]
fn safe_names() {
    for (raw, safe) in [
        ("notes.txt", "notes.txt"),
        ("", "file"),
        (".", "file"),
        ("..", "file"),
        ("../../etc/passwd", ".._.._etc_passwd"),
        ("C:\\Users\\x", "C:_Users_x"),
        ("a\0b\nc", "a_b_c"),
    ] {
        assert_eq!(safe_name(raw), safe, "{raw:?}");
    }
    let long = "é".repeat(200);
    let cut = safe_name(&long);
    assert_eq!(cut.len(), 254);
    assert!(check_name(&cut).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_any_size(size in 0usize..3 * SEGMENT_LEN + 100, salt: u8) {
        let plaintext: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31) ^ salt).collect();
        let ciphertext = encrypt_fixed(&test_key(), &plaintext);
        prop_assert_eq!(Some(ciphertext.len() as u64), ciphertext_len(size as u64));
        prop_assert_eq!(open(&test_key(), &ciphertext).unwrap(), plaintext);
    }

    #[test]
    fn any_flipped_bit_is_refused(size in 0usize..2 * SEGMENT_LEN + 3, at: prop::sample::Index, bit in 0u8..8) {
        let mut ciphertext = encrypt_fixed(&test_key(), &pattern(size));
        let at = at.index(ciphertext.len());
        ciphertext[at] ^= 1 << bit;
        let expected = match at {
            0..4 => "bad_magic",
            4 => "unknown_version",
            _ => "auth_failed",
        };
        prop_assert_eq!(code(open(&test_key(), &ciphertext)).0, expected);
    }

    #[test]
    fn lengths_are_inverse(len in 0u64..=MAX_PLAINTEXT_LEN) {
        let cipher = ciphertext_len(len).unwrap();
        prop_assert_eq!(plaintext_len(cipher), Some(len));
    }

    #[test]
    fn plaintext_len_only_for_real_lengths(cipher in any::<u64>()) {
        if let Some(len) = plaintext_len(cipher) {
            prop_assert_eq!(ciphertext_len(len), Some(cipher));
        }
    }

    #[test]
    fn safe_name_is_always_valid(raw in any::<String>()) {
        let name = safe_name(&raw);
        prop_assert!(check_name(&name).is_ok(), "{:?}", name);
        if check_name(&raw).is_ok() {
            prop_assert_eq!(name, raw);
        }
    }
}

struct Vector {
    name: &'static str,
    description: &'static str,
    key: ContentKey,
    /// The plaintext the ciphertext was made from, for good vectors (which must reproduce).
    plaintext: Option<Vec<u8>>,
    ciphertext: Vec<u8>,
    /// Given to the decryptor as the expected length ([`decrypt_exact`]).
    known_len: Option<u64>,
}

/// Plaintexts longer than this are given by pattern and hash, not hex.
const MAX_PLAINTEXT_HEX: usize = 1024;

fn vectors() -> Vec<Vector> {
    let short = b"hello, kez files\n".to_vec();
    let good = encrypt_fixed(&test_key(), &short);
    let two = pattern(SEGMENT_LEN + 5);
    let vector = |name: &'static str, description: &'static str, ciphertext: Vec<u8>| Vector {
        name,
        description,
        key: test_key(),
        plaintext: None,
        ciphertext,
        known_len: None,
    };
    let edit = |at: usize, f: fn(u8) -> u8| {
        let mut ciphertext = good.clone();
        ciphertext[at] = f(ciphertext[at]);
        ciphertext
    };
    let mut appended = good.clone();
    appended.push(0);
    vec![
        Vector {
            plaintext: Some(Vec::new()),
            ..vector(
                "good-empty",
                "the empty file: header and an empty final segment",
                encrypt_fixed(&test_key(), b""),
            )
        },
        Vector {
            plaintext: Some(short.clone()),
            ..vector("good-short", "17 bytes, one final segment", good.clone())
        },
        Vector {
            plaintext: Some(two.clone()),
            ..vector(
                "good-two-segments",
                "65541 bytes (byte i = i mod 251): a full segment and a 5-byte final one",
                encrypt_fixed(&test_key(), &two),
            )
        },
        Vector {
            known_len: Some(good.len() as u64),
            ..vector(
                "good-short-known-length",
                "good-short, decrypted with its length known",
                good.clone(),
            )
        },
        vector(
            "truncated-header",
            "the first 11 bytes of good-short",
            good[..11].to_vec(),
        ),
        vector(
            "truncated-no-final-segment",
            "good-short's header alone",
            good[..HEADER_LEN].to_vec(),
        ),
        vector(
            "truncated-short-segment",
            "good-short's header and 15 bytes: less than a tag",
            good[..HEADER_LEN + 15].to_vec(),
        ),
        Vector {
            known_len: Some(good.len() as u64),
            ..vector(
                "truncated-known-length",
                "good-short without its last byte, its full length known",
                good[..good.len() - 1].to_vec(),
            )
        },
        vector("bad_magic", "good-short with byte 0 'k'", edit(0, |_| b'k')),
        vector(
            "unknown_version",
            "good-short with version byte 2",
            edit(4, |_| 2),
        ),
        vector(
            "auth_failed-nonce-prefix",
            "good-short with the nonce prefix's first byte flipped",
            edit(5, |b| b ^ 1),
        ),
        vector(
            "auth_failed-ciphertext",
            "good-short with its first ciphertext byte flipped",
            edit(HEADER_LEN, |b| b ^ 1),
        ),
        vector(
            "auth_failed-tag",
            "good-short with its last tag byte flipped",
            edit(good.len() - 1, |b| b ^ 1),
        ),
        vector(
            "auth_failed-cut-in-segment",
            "good-short without its last byte: the final segment does not authenticate",
            good[..good.len() - 1].to_vec(),
        ),
        vector(
            "auth_failed-appended",
            "good-short and a zero byte, length unknown: the byte joins the final segment",
            appended.clone(),
        ),
        Vector {
            key: other_key(),
            ..vector(
                "auth_failed-wrong-key",
                "good-short decrypted with another key",
                good.clone(),
            )
        },
        Vector {
            known_len: Some(good.len() as u64),
            ..vector(
                "trailing_data",
                "good-short and a zero byte, decrypted with good-short's length known",
                appended,
            )
        },
    ]
}

fn render(vector: &Vector) -> String {
    let mut out = Vec::new();
    let result = match vector.known_len {
        Some(len) => decrypt_exact(&vector.key, vector.ciphertext.as_slice(), &mut out, len),
        None => decrypt(&vector.key, vector.ciphertext.as_slice(), &mut out),
    };
    let expect = match result {
        Ok(len) => {
            if let Some(plaintext) = &vector.plaintext {
                assert_eq!(&out, plaintext, "{}", vector.name);
            }
            json!({"ok": {"plaintext_len": len, "plaintext_sha256": hex(&Sha256::digest(&out))}})
        }
        Err(FileCryptError::AuthFailed { segment }) => {
            json!({"error": {"code": "auth_failed", "segment": segment}})
        }
        Err(err) => json!({"error": {"code": err.code()}}),
    };
    let plaintext = match &vector.plaintext {
        Some(p) if p.len() <= MAX_PLAINTEXT_HEX => json!({"hex": hex(p)}),
        Some(p) => json!({"pattern": "byte i = i mod 251", "len": p.len()}),
        None => Value::Null,
    };
    let value = json!({
        "name": vector.name,
        "description": vector.description,
        "key": *vector.key.to_hex(),
        "nonce_prefix": hex(&test_prefix()),
        "plaintext": plaintext,
        "known_ciphertext_len": vector.known_len,
        "ciphertext_hex": hex(&vector.ciphertext),
        "expect": expect,
    });
    serde_json::to_string_pretty(&value).unwrap() + "\n"
}

#[test]
fn committed_vectors_are_reproduced_and_name_each_failure() {
    let vectors = vectors();
    for vector in &vectors {
        if let Some(plaintext) = &vector.plaintext {
            assert_eq!(
                encrypt_fixed(&vector.key, plaintext),
                vector.ciphertext,
                "{}",
                vector.name
            );
        }
    }
    let rendered: Vec<(String, String)> = vectors
        .iter()
        .map(|vector| (vector.name.to_string(), render(vector)))
        .collect();
    crate::committed_vectors::check("file", &rendered, |error| &error["code"]);
}
