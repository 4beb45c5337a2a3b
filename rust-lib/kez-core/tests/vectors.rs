//! Sigchain test vectors: generated here from fixed seeds, committed under `vectors/sigchain/`,
//! and checked both ways: the verifier must agree with every file, and regenerating must
//! reproduce every file byte for byte. `make vectors` rewrites them (KEZ_REGEN_VECTORS=1).
//!
//! The generator builds links from JSON templates and signs them itself, independently of
//! `UnsignedLink`, so the vectors also check the builder against a second construction.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kez_core::canonical;
use kez_core::key::SignatureDomain;
use kez_core::sigchain::{ChainErrorKind, MAX_ACTIVE_DEVICES, MAX_LINK_BYTES};
use kez_core::{Op, PublicKey, SecretKey, Sigchain, UnsignedLink};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// 2026-01-01T00:00:00Z: every vector's first link is made at this time.
const T0: u64 = 1_767_225_600;
const MANIFEST_1: &str = "6f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c";
const MANIFEST_2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/sigchain")
}

/// The seed of a named test key: SHA-256 of `kez test vector key: <name>`.
fn seed(name: &str) -> [u8; 32] {
    Sha256::digest(format!("kez test vector key: {name}")).into()
}

fn secret(name: &str) -> SecretKey {
    SecretKey::from_seed(&seed(name))
}

fn public(name: &str) -> String {
    secret(name).public_key().to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn canonical_bytes(value: &Value) -> Vec<u8> {
    canonical::encode(value).expect("templates hold only safe integers")
}

/// One link as a JSON template; `sign` fills `sig` and returns the canonical text.
struct Draft {
    value: Value,
}

impl Draft {
    fn new(
        chain: &str,
        seq: u64,
        prev: Option<&str>,
        signer: &str,
        op: &str,
        payload: Value,
    ) -> Self {
        Draft {
            value: json!({
                "v": 1,
                "chain": public(chain),
                "seq": seq,
                "prev": prev,
                "time": T0 + (seq - 1) * 60,
                "signer": public(signer),
                "op": op,
                "payload": payload,
            }),
        }
    }

    fn set(mut self, member: &str, value: Value) -> Self {
        self.value[member] = value;
        self
    }

    /// Rotation payload counter-signed by `counter_signer` over the link without `sig` and
    /// without `payload.counter_sig`.
    fn counter_signed(mut self, new_key: &str, counter_signer: &str) -> Self {
        self.value["payload"] = json!({ "new_key": public(new_key) });
        let counter_sig = secret(counter_signer).sign(
            SignatureDomain::SigchainRotate,
            &canonical_bytes(&self.value),
        );
        self.value["payload"]["counter_sig"] = json!(counter_sig.to_string());
        self
    }

    /// `add_device` payload for the key `device`, counter-signed by `counter_signer` in
    /// `domain` (the new key in `SigchainAddDevice` unless a vector says otherwise) over the
    /// link without `sig` and without `payload.counter_sig`.
    fn device_counter_signed(
        mut self,
        device: &str,
        name: &str,
        kind: &str,
        counter_signer: &str,
        domain: SignatureDomain,
    ) -> Self {
        self.value["payload"] = json!({ "key": public(device), "name": name, "kind": kind });
        let counter_sig = secret(counter_signer).sign(domain, &canonical_bytes(&self.value));
        self.value["payload"]["counter_sig"] = json!(counter_sig.to_string());
        self
    }

    fn sign(self, key: &str) -> String {
        let signed = self.value.clone();
        self.sign_over(key, &signed)
    }

    /// Signs `signed` (normally the link itself) and attaches the signature to the link.
    fn sign_over(mut self, key: &str, signed: &Value) -> String {
        let sig = secret(key).sign(SignatureDomain::SigchainLink, &canonical_bytes(signed));
        self.value["sig"] = json!(sig.to_string());
        String::from_utf8(canonical::encode(&self.value).unwrap()).unwrap()
    }
}

fn endpoint(name: &str, kind: &str, address: &str) -> Value {
    json!({ "name": name, "kind": kind, "address": address })
}

fn nats_endpoint() -> Value {
    endpoint("nats", "nats", "nats://chat.kez.lat:4222")
}

fn iroh_endpoint() -> Value {
    endpoint(
        "iroh-laptop",
        "iroh",
        "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6",
    )
}

/// Chains of links; each builder appends to `links` and returns the hash of the last link.
struct Chain {
    links: Vec<String>,
}

impl Chain {
    fn new() -> Self {
        Chain { links: Vec::new() }
    }

    fn prev(&self) -> Option<String> {
        self.links.last().map(|link| sha256_hex(link.as_bytes()))
    }

    fn seq(&self) -> u64 {
        self.links.len() as u64 + 1
    }

    /// A correct next link of `chain`'s chain signed by `signer`.
    fn draft(&self, chain: &str, signer: &str, op: &str, payload: Value) -> Draft {
        Draft::new(
            chain,
            self.seq(),
            self.prev().as_deref(),
            signer,
            op,
            payload,
        )
    }

    /// [`Chain::draft`] as a version 2 link: set before any signature is made over it.
    fn draft_v2(&self, chain: &str, signer: &str, op: &str, payload: Value) -> Draft {
        self.draft(chain, signer, op, payload).set("v", json!(2))
    }

    /// alice's chain: `signer` adds the device `device` named `name` of `kind`, counter-signed
    /// by the new key (version 2).
    fn add_device(&self, signer: &str, device: &str, name: &str, kind: &str) -> String {
        self.draft_v2("alice", signer, "add_device", Value::Null)
            .device_counter_signed(
                device,
                name,
                kind,
                device,
                SignatureDomain::SigchainAddDevice,
            )
            .sign(signer)
    }

    /// alice's chain: `signer` revokes the device `device` (version 2).
    fn revoke_device(&self, signer: &str, device: &str, reason: Option<&str>) -> String {
        let mut payload = json!({ "key": public(device) });
        if let Some(reason) = reason {
            payload["reason"] = json!(reason);
        }
        self.draft_v2("alice", signer, "revoke_device", payload)
            .sign(signer)
    }

    /// alice's chain: `signer` rotates to `new_key`, counter-signed by it, as a link of
    /// `version`.
    fn rotate(&self, version: u64, signer: &str, new_key: &str) -> String {
        self.draft("alice", signer, "rotate", Value::Null)
            .set("v", json!(version))
            .counter_signed(new_key, new_key)
            .sign(signer)
    }

    /// alice's chain: a claim of `identity` on github signed by `signer`, as a link of
    /// `version`.
    fn claim(&self, version: u64, signer: &str, identity: &str) -> String {
        self.draft(
            "alice",
            signer,
            "claim",
            json!({"service": "github", "identity": identity, "proof": "https://gist.github.com/"}),
        )
        .set("v", json!(version))
        .sign(signer)
    }

    /// The chain with `links` appended, each made from the chain so far.
    fn then(self, links: &[&dyn Fn(&Chain) -> String]) -> Self {
        links.iter().fold(self, |chain, link| {
            let next = link(&chain);
            chain.push(next)
        })
    }

    fn push(mut self, link: String) -> Self {
        self.links.push(link);
        self
    }

    /// The two-link start every bad vector shares: alice adds her NATS and iroh endpoints.
    fn alice_base() -> Self {
        let chain = Chain::new();
        let first = chain
            .draft("alice", "alice", "add_endpoint", nats_endpoint())
            .sign("alice");
        let chain = chain.push(first);
        let second = chain
            .draft("alice", "alice", "add_endpoint", iroh_endpoint())
            .sign("alice");
        chain.push(second)
    }
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct VectorKey {
    seed: String,
    public: String,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
#[serde(rename_all = "snake_case")]
enum Expect {
    Ok(Value),
    Error { code: String, position: usize },
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Vector {
    name: String,
    description: String,
    keys: BTreeMap<String, VectorKey>,
    /// Each link's exact bytes, as a UTF-8 string.
    links: Vec<String>,
    /// SHA-256 of each link's bytes (the link hash).
    link_hashes: Vec<String>,
    expect: Expect,
    /// Present exactly when a link has `v` 2: what a verifier of the release before devices
    /// (which knows only version 1) answers, `unknown_version` at the first such link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect_v1: Option<Expect>,
}

/// The 1-based position of the first link whose `v` (its last occurrence) is 2.
fn first_version_2_link(links: &[String]) -> Option<usize> {
    links
        .iter()
        .position(|link| {
            serde_json::from_str::<Value>(link).is_ok_and(|value| value["v"].as_u64() == Some(2))
        })
        .map(|index| index + 1)
}

fn vector(
    name: &str,
    description: &str,
    key_names: &[&str],
    links: Vec<String>,
    expect: Expect,
) -> Vector {
    Vector {
        name: name.into(),
        description: description.into(),
        keys: key_names
            .iter()
            .map(|key| {
                (
                    key.to_string(),
                    VectorKey {
                        seed: hex(&seed(key)),
                        public: public(key),
                    },
                )
            })
            .collect(),
        link_hashes: links
            .iter()
            .map(|link| sha256_hex(link.as_bytes()))
            .collect(),
        expect_v1: first_version_2_link(&links).map(|position| {
            // The previous release reads a link's size and syntax before its version.
            assert!(links[position - 1].len() <= MAX_LINK_BYTES, "{name}");
            error("unknown_version", position)
        }),
        links,
        expect,
    }
}

fn error(code: &str, position: usize) -> Expect {
    Expect::Error {
        code: code.into(),
        position,
    }
}

/// A bad vector: the shared two-link start, then one more link made by `third`.
fn bad(
    name: &str,
    description: &str,
    keys: &[&str],
    third: impl FnOnce(&Chain) -> String,
) -> Vector {
    let chain = Chain::alice_base();
    let link = third(&chain);
    let chain = chain.push(link);
    vector(
        name,
        description,
        keys,
        chain.links,
        error(name.split('-').next().unwrap(), 3),
    )
}

/// Every vector, in a fixed order. Good ones carry the expected derived state, which the
/// generator takes from the verifier: the first generation is reviewed by hand, and every later
/// run must reproduce it exactly.
fn generate() -> Vec<Vector> {
    let mut out = Vec::new();

    let minimal = Chain::new();
    let link = minimal
        .draft("alice", "alice", "add_endpoint", nats_endpoint())
        .sign("alice");
    let minimal = minimal.push(link);
    out.push(good_vector(
        "good-minimal",
        "One link: alice advertises her NATS inbox.",
        &["alice"],
        minimal.links,
    ));

    // Every operation, a rotation in the middle, an unknown operation and revocations.
    let mut full = Chain::alice_base();
    let steps: Vec<(&str, &str, Value)> = vec![
        (
            "alice",
            "claim",
            json!({"service": "github", "identity": "alice-gh", "proof": "https://gist.github.com/alice-gh/0123abcd"}),
        ),
        (
            "alice",
            "set_shared_files",
            json!({"manifest": MANIFEST_1, "providers": ["ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6"]}),
        ),
        (
            "alice",
            "set_avatar",
            json!({"blob": "future operation", "size": 1234}),
        ),
    ];
    for (signer, op, payload) in steps {
        let link = full.draft("alice", signer, op, payload).sign(signer);
        full = full.push(link);
    }
    let rotate = full
        .draft("alice", "alice", "rotate", Value::Null)
        .counter_signed("alice2", "alice2")
        .sign("alice");
    full = full.push(rotate);
    let steps: Vec<(&str, Value)> = vec![
        ("remove_endpoint", json!({"name": "iroh-laptop"})),
        (
            "revoke_claim",
            json!({"service": "github", "identity": "alice-gh"}),
        ),
        (
            "claim",
            json!({"service": "dns", "identity": "alice.example", "proof": "_kez.alice.example TXT"}),
        ),
        (
            "set_shared_files",
            json!({"manifest": MANIFEST_2, "providers": []}),
        ),
        (
            "add_endpoint",
            endpoint(
                "iroh-phone",
                "iroh",
                "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
            ),
        ),
    ];
    for (op, payload) in steps {
        let link = full.draft("alice", "alice2", op, payload).sign("alice2");
        full = full.push(link);
    }
    out.push(good_vector(
        "good-full",
        "Every operation: endpoints, a claim, shared files, an unknown operation (set_avatar, ignored for state), a rotation from alice to alice2, then removals, revocation and new entries signed by alice2.",
        &["alice", "alice2"],
        full.links,
    ));

    out.push(vector("empty", "No links.", &[], vec![], error("empty", 0)));
    out.push(bad(
        "too_large",
        "Link 3 is a validly signed unknown operation whose encoding exceeds 8192 bytes.",
        &["alice"],
        |c| {
            c.draft("alice", "alice", "note", json!({"text": "x".repeat(8200)}))
                .sign("alice")
        },
    ));
    out.push(bad(
        "unknown_version",
        "Link 3 says v=3.",
        &["alice"],
        |c| {
            c.draft(
                "alice",
                "alice",
                "claim",
                json!({"service": "github", "identity": "a", "proof": "p"}),
            )
            .set("v", json!(3))
            .sign("alice")
        },
    ));
    out.push(bad(
        "malformed-not-canonical",
        "Link 3 is validly signed but serialised with spaces after separators: not canonical.",
        &["alice"],
        |c| {
            let canonical_text = c
                .draft("alice", "alice", "remove_endpoint", json!({"name": "nats"}))
                .sign("alice");
            let value: Value = serde_json::from_str(&canonical_text).unwrap();
            let mut spaced = String::from("{");
            for (i, (k, v)) in value.as_object().unwrap().iter().enumerate() {
                if i > 0 {
                    spaced.push_str(", ");
                }
                spaced.push_str(&format!(
                    "{}: {}",
                    json!(k),
                    String::from_utf8(canonical::encode(v).unwrap()).unwrap()
                ));
            }
            spaced.push('}');
            spaced
        },
    ));
    out.push(bad(
        "malformed-missing-member",
        "Link 3 has no time member.",
        &["alice"],
        |c| {
            let mut draft = c.draft("alice", "alice", "remove_endpoint", json!({"name": "nats"}));
            draft.value.as_object_mut().unwrap().remove("time");
            draft.sign("alice")
        },
    ));
    out.push(bad(
        "malformed-bad-payload",
        "Link 3 adds an endpoint whose name has an uppercase letter and a space.",
        &["alice"],
        |c| {
            c.draft(
                "alice",
                "alice",
                "add_endpoint",
                endpoint("My Phone", "iroh", "x"),
            )
            .sign("alice")
        },
    ));
    out.push(bad(
        "malformed-uppercase-hex",
        "Link 3's prev is the right hash in uppercase hex.",
        &["alice"],
        |c| {
            c.draft("alice", "alice", "remove_endpoint", json!({"name": "nats"}))
                .set("prev", json!(c.prev().unwrap().to_uppercase()))
                .sign("alice")
        },
    ));
    out.push(bad(
        "wrong_chain",
        "Link 3 names bob's chain but is otherwise alice's.",
        &["alice", "bob"],
        |c| {
            c.draft("bob", "alice", "remove_endpoint", json!({"name": "nats"}))
                .sign("alice")
        },
    ));
    out.push(bad("wrong_seq", "Link 3 says seq 4.", &["alice"], |c| {
        c.draft("alice", "alice", "remove_endpoint", json!({"name": "nats"}))
            .set("seq", json!(4))
            .sign("alice")
    }));
    out.push(bad(
        "wrong_prev",
        "Link 3's prev is the hash of link 1, not link 2.",
        &["alice"],
        |c| {
            c.draft("alice", "alice", "remove_endpoint", json!({"name": "nats"}))
                .set("prev", json!(sha256_hex(c.links[0].as_bytes())))
                .sign("alice")
        },
    ));
    out.push(bad(
        "wrong_prev-null",
        "Link 3 has prev null, which only a first link may have.",
        &["alice"],
        |c| {
            c.draft("alice", "alice", "remove_endpoint", json!({"name": "nats"}))
                .set("prev", Value::Null)
                .sign("alice")
        },
    ));
    out.push(bad(
        "not_current_key",
        "Link 3 is signed by bob, who names himself as signer.",
        &["alice", "bob"],
        |c| {
            c.draft("alice", "bob", "remove_endpoint", json!({"name": "nats"}))
                .sign("bob")
        },
    ));
    out.push(bad(
        "bad_signature",
        "Link 3's signature is alice's signature over the same link with a different time.",
        &["alice"],
        |c| {
            let draft = c.draft("alice", "alice", "remove_endpoint", json!({"name": "nats"}));
            let mut other = draft.value.clone();
            other["time"] = json!(T0 + 999);
            draft.sign_over("alice", &other)
        },
    ));
    out.push(bad(
        "bad_counter_signature",
        "Link 3 rotates to alice2 but the counter-signature is bob's.",
        &["alice", "alice2", "bob"],
        |c| {
            c.draft("alice", "alice", "rotate", Value::Null)
                .counter_signed("alice2", "bob")
                .sign("alice")
        },
    ));
    out.push(bad(
        "rotate_to_same_key",
        "Link 3 rotates alice to alice.",
        &["alice"],
        |c| {
            c.draft("alice", "alice", "rotate", Value::Null)
                .counter_signed("alice", "alice")
                .sign("alice")
        },
    ));
    out.push(bad(
        "duplicate_endpoint",
        "Link 3 adds a second endpoint named nats.",
        &["alice"],
        |c| {
            c.draft("alice", "alice", "add_endpoint", nats_endpoint())
                .sign("alice")
        },
    ));
    out.push(bad(
        "unknown_endpoint",
        "Link 3 removes an endpoint that was never added.",
        &["alice"],
        |c| {
            c.draft(
                "alice",
                "alice",
                "remove_endpoint",
                json!({"name": "desktop"}),
            )
            .sign("alice")
        },
    ));
    out.push(bad(
        "unknown_claim",
        "Link 3 revokes a claim that was never made.",
        &["alice"],
        |c| {
            c.draft(
                "alice",
                "alice",
                "revoke_claim",
                json!({"service": "github", "identity": "alice-gh"}),
            )
            .sign("alice")
        },
    ));

    // Duplicate members and numbers that are not plain integers (PROTOCOL.md §4.4, steps 2-5):
    // link 3 is alice's valid signature over the canonical link, whose text is then edited, so
    // only the text form is wrong (a verifier that normalised it would accept the signature).
    let edits: [(&str, &str, &str, &str); 9] = [
        (
            "malformed-duplicate-member",
            "Link 3 has its time member twice, with the same value: not canonical (step 5).",
            "\"time\":1767225720,",
            "\"time\":1767225720,\"time\":1767225720,",
        ),
        (
            "malformed-duplicate-v",
            "Link 3 has \"v\":1 twice: the version is 1 (step 3 passes), then not canonical (step 5).",
            "\"v\":1}",
            "\"v\":1,\"v\":1}",
        ),
        (
            "unknown_version-duplicate-v",
            "Link 3 ends \"v\":1,\"v\":3: the last v is the one read, so step 3 fails before the duplicate is seen.",
            "\"v\":1}",
            "\"v\":1,\"v\":3}",
        ),
        (
            "malformed-fractional-v",
            "Link 3 says \"v\":1.0: not an integer without fraction (step 2).",
            "\"v\":1}",
            "\"v\":1.0}",
        ),
        (
            "malformed-exponent-v",
            "Link 3 says \"v\":1e0: not an integer without exponent (step 2).",
            "\"v\":1}",
            "\"v\":1e0}",
        ),
        (
            "malformed-fractional-unknown-v",
            "Link 3 says \"v\":3.0: malformed (step 2), not unknown_version.",
            "\"v\":1}",
            "\"v\":3.0}",
        ),
        (
            "malformed-fractional-seq",
            "Link 3 says \"seq\":3.0 (v is 1): seq is not an integer (step 4).",
            "\"seq\":3,",
            "\"seq\":3.0,",
        ),
        (
            "malformed-exponent-time",
            "Link 3's time is written 1.76722572e9 (v is 1): not an integer (step 4).",
            "\"time\":1767225720,",
            "\"time\":1.76722572e9,",
        ),
        (
            "unknown_version-fractional-seq",
            "Link 3 says \"v\":3 and \"seq\":3.0: unknown_version (step 3); nothing after it is checked.",
            "\"seq\":3,",
            "\"seq\":3.0,",
        ),
    ];
    for (name, description, from, to) in edits {
        out.push(bad(name, description, &["alice"], |c| {
            let link = c
                .draft("alice", "alice", "remove_endpoint", json!({"name": "nats"}))
                .sign("alice");
            let link = if name == "unknown_version-fractional-seq" {
                link.replace("\"v\":1}", "\"v\":3}")
            } else {
                link
            };
            assert_eq!(link.matches(from).count(), 1, "{name}");
            link.replace(from, to)
        }));
    }

    out.push(bad(
        "malformed-too-deep",
        "Link 3 is a validly signed unknown operation whose payload nests arrays so that the link holds 128 levels of arrays and objects (the link object counting as one): past the 127 a verifier reads.",
        &["alice"],
        |c| {
            c.draft("alice", "alice", "note", json!({ "a": nested(MAX_NESTING - 1) }))
                .sign("alice")
        },
    ));

    let zero = Chain::new();
    let link = zero
        .draft("alice", "alice", "add_endpoint", nats_endpoint())
        .set("seq", json!(0))
        .sign("alice");
    out.push(vector(
        "wrong_seq-zero",
        "A first link with seq 0, otherwise valid and validly signed: the first seq is 1.",
        &["alice"],
        vec![link],
        error("wrong_seq", 1),
    ));

    // Failures that need more than three links.
    let mut dup = Chain::alice_base();
    for _ in 0..2 {
        let link = dup
            .draft(
                "alice",
                "alice",
                "claim",
                json!({"service": "github", "identity": "alice-gh", "proof": "p"}),
            )
            .sign("alice");
        dup = dup.push(link);
    }
    out.push(vector(
        "duplicate_claim",
        "Links 3 and 4 both claim github:alice-gh.",
        &["alice"],
        dup.links,
        error("duplicate_claim", 4),
    ));

    let mut stale = Chain::alice_base();
    let rotate = stale
        .draft("alice", "alice", "rotate", Value::Null)
        .counter_signed("alice2", "alice2")
        .sign("alice");
    stale = stale.push(rotate);
    let link = stale
        .draft("alice", "alice", "remove_endpoint", json!({"name": "nats"}))
        .sign("alice");
    stale = stale.push(link);
    out.push(vector(
        "not_current_key-after-rotation",
        "Link 3 rotates alice to alice2; link 4 is still signed by alice.",
        &["alice", "alice2"],
        stale.links,
        error("not_current_key", 4),
    ));

    // The state limits: one link past each (PROTOCOL.md §4.4).
    type NthLink = dyn Fn(usize) -> (&'static str, Value);
    let limits: [(&str, &str, usize, &NthLink); 3] = [
        ("too_many_endpoints", "endpoints", 32 - 2, &|i| {
            (
                "add_endpoint",
                endpoint(&format!("e{i}"), "nats", "nats://chat.kez.lat:4222"),
            )
        }),
        ("too_many_claims", "claims", 64, &|i| {
            (
                "claim",
                json!({"service": "dns", "identity": format!("n{i}.example"), "proof": "dns txt"}),
            )
        }),
        (
            "too_many_unknown_ops",
            "links with unknown operations",
            64,
            &|i| ("set_avatar", json!({ "n": i })),
        ),
    ];
    for (code, what, room, link) in limits {
        let mut chain = Chain::alice_base();
        for i in 0..=room {
            let (op, payload) = link(i);
            let next = chain.draft("alice", "alice", op, payload).sign("alice");
            chain = chain.push(next);
        }
        let position = chain.links.len();
        out.push(vector(
            code,
            &format!(
                "The shared start, then {} more: one past the most {what} a chain may hold.",
                room + 1
            ),
            &["alice"],
            chain.links,
            error(code, position),
        ));
    }

    devices(&mut out);
    olm_keys(&mut out);
    out
}

/// A fixed Olm identity key for the vectors: SHA-256 of `kez test vector olm key: <name>`.
fn olm_key(name: &str) -> String {
    sha256_hex(format!("kez test vector olm key: {name}").as_bytes())
}

/// `set_olm_key` (PROTOCOL.md §4.3): bound to its signer, replaced, dropped on revocation.
fn olm_keys(out: &mut Vec<Vector>) {
    let set = |version: u64, signer: &'static str, key: &'static str| {
        move |c: &Chain| {
            c.draft("alice", signer, "set_olm_key", json!({"key": olm_key(key)}))
                .set("v", json!(version))
                .sign(signer)
        }
    };
    let good = Chain::alice_base().then(&[
        &set(1, "alice", "alice-1"),
        &|c| c.add_device("alice", "alice-laptop", "laptop", "desktop"),
        &set(2, "alice-laptop", "laptop"),
        &set(2, "alice", "alice-2"),
        &|c| c.add_device("alice", "alice-phone", "phone", "mobile"),
        &set(2, "alice-phone", "phone"),
        &|c| c.revoke_device("alice", "alice-phone", None),
    ]);
    out.push(good_vector(
        "good-olm-keys",
        "alice's two version 1 links, then: 3 alice binds an Olm key in a version 1 link; 4 she adds her laptop (version 2 from here); 5 the laptop binds its Olm key; 6 alice binds another, replacing hers; 7 she adds her phone; 8 the phone binds its Olm key; 9 alice revokes the phone, which drops its binding. olm_keys ends with alice's second key and the laptop's.",
        &["alice", "alice-laptop", "alice-phone"],
        good.links,
    ));
    let base = Chain::alice_base();
    let extra = base
        .draft(
            "alice",
            "alice",
            "set_olm_key",
            json!({"key": olm_key("alice-1"), "kind": "curve25519"}),
        )
        .sign("alice");
    out.push(vector(
        "malformed-set_olm_key-extra-member",
        "Link 3 is a set_olm_key whose payload has a member besides key.",
        &["alice"],
        base.push(extra).links,
        error("malformed", 3),
    ));
}

/// The device vectors (PROTOCOL.md §4.3, §4.5): version 2 links after alice's version 1 start.
fn devices(out: &mut Vec<Vector>) {
    let laptop_added = |c: &Chain| c.add_device("alice", "alice-laptop", "laptop", "desktop");
    let alice_revoked_by_laptop = |c: &Chain| c.revoke_device("alice-laptop", "alice", None);
    let rotated_in_v1 = |c: &Chain| c.rotate(1, "alice", "alice2");

    let good = Chain::alice_base().then(&[
        &laptop_added,
        &|c| c.add_device("alice", "alice-paper", "paper", "paper"),
        &|c| c.claim(2, "alice-laptop", "alice-gh"),
        &|c| c.revoke_device("alice-laptop", "alice", Some("phone lost on the train")),
        &|c| c.rotate(2, "alice-laptop", "alice-laptop2"),
        &|c| {
            c.draft_v2(
                "alice",
                "alice-laptop2",
                "set_shared_files",
                json!({"manifest": MANIFEST_1, "providers": []}),
            )
            .sign("alice-laptop2")
        },
    ]);
    out.push(good_vector(
        "good-devices",
        "alice's two version 1 links, then version 2: she adds her laptop (desktop) and a paper key, the laptop signs a claim and revokes alice's own key (the primary device) with a reason, the laptop rotates to a new key (its entry revoked, the new key added with its name and kind), and the new key signs. The current key ends as the paper key, the earliest-added device still active.",
        &["alice", "alice-laptop", "alice-laptop2", "alice-paper"],
        good.links,
    ));

    let first = Chain::new();
    let link = first
        .draft_v2("alice", "alice", "add_device", Value::Null)
        .device_counter_signed(
            "alice-paper",
            "paper",
            "paper",
            "alice-paper",
            SignatureDomain::SigchainAddDevice,
        )
        .sign("alice");
    out.push(good_vector(
        "good-devices-first-link",
        "A chain whose first link is version 2: alice adds a paper key.",
        &["alice", "alice-paper"],
        vec![link],
    ));

    // One chain per failure: the shared start, then the links named.
    type Step<'a> = &'a dyn Fn(&Chain) -> String;
    let cases: Vec<(&str, &str, Vec<&str>, Vec<Step>)> = vec![
        (
            "not_a_device",
            "Link 3 is version 2 and signed by bob, who was never a device of alice's chain.",
            vec!["alice", "bob"],
            vec![&|c| c.claim(2, "bob", "alice-gh")],
        ),
        (
            "revoked_signer",
            "Link 3 adds alice's laptop, link 4 (by the laptop) revokes alice's own key, and link 5 is signed by that revoked key.",
            vec!["alice", "alice-laptop"],
            vec![&laptop_added, &alice_revoked_by_laptop, &|c| {
                c.claim(2, "alice", "alice-gh")
            }],
        ),
        (
            "revoked_signer-add_device",
            "Link 3 adds alice's laptop, link 4 (by the laptop) revokes alice's own key, and in link 5 that revoked key adds a paper key (validly counter-signed).",
            vec!["alice", "alice-laptop", "alice-paper"],
            vec![&laptop_added, &alice_revoked_by_laptop, &|c| {
                c.add_device("alice", "alice-paper", "paper", "paper")
            }],
        ),
        (
            "revoked_signer-rotated-in-v1",
            "Link 3 rotates alice to alice2 (version 1); link 4 is version 2 and signed by alice, whose device the rotation revoked.",
            vec!["alice", "alice2"],
            vec![&rotated_in_v1, &|c| c.claim(2, "alice", "alice-gh")],
        ),
        (
            "malformed-add_device-missing-counter_sig",
            "Link 3 adds alice's laptop without a counter_sig member.",
            vec!["alice", "alice-laptop"],
            vec![&|c| {
                c.draft_v2(
                    "alice",
                    "alice",
                    "add_device",
                    json!({"key": public("alice-laptop"), "name": "laptop", "kind": "desktop"}),
                )
                .sign("alice")
            }],
        ),
        (
            "bad_counter_signature-add_device",
            "Link 3 adds alice's laptop, but the counter-signature is bob's.",
            vec!["alice", "alice-laptop", "bob"],
            vec![&|c| {
                c.draft_v2("alice", "alice", "add_device", Value::Null)
                    .device_counter_signed(
                        "alice-laptop",
                        "laptop",
                        "desktop",
                        "bob",
                        SignatureDomain::SigchainAddDevice,
                    )
                    .sign("alice")
            }],
        ),
        (
            "bad_counter_signature-add_device-rotate-domain",
            "Link 3 adds alice's laptop; the laptop's counter-signature is over the right bytes but in the rotate domain (KEZ-SIGCHAIN-ROTATE-V1).",
            vec!["alice", "alice-laptop"],
            vec![&|c| {
                c.draft_v2("alice", "alice", "add_device", Value::Null)
                    .device_counter_signed(
                        "alice-laptop",
                        "laptop",
                        "desktop",
                        "alice-laptop",
                        SignatureDomain::SigchainRotate,
                    )
                    .sign("alice")
            }],
        ),
        (
            "malformed-device-kind",
            "Link 3 adds a device of kind laptop, which is not a device kind.",
            vec!["alice", "alice-laptop"],
            vec![&|c| c.add_device("alice", "alice-laptop", "laptop", "laptop")],
        ),
        (
            "malformed-add_device-in-v1",
            "Link 3 adds alice's laptop, validly counter-signed, in a version 1 link. The release before devices would accept it as an unknown operation and ignore it; it must not be ignored.",
            vec!["alice", "alice-laptop"],
            vec![&|c| {
                c.draft("alice", "alice", "add_device", Value::Null)
                    .device_counter_signed(
                        "alice-laptop",
                        "laptop",
                        "desktop",
                        "alice-laptop",
                        SignatureDomain::SigchainAddDevice,
                    )
                    .sign("alice")
            }],
        ),
        (
            "malformed-revoke_device-in-v1",
            "Link 3 revokes bob's key in a version 1 link (in version 2 it would be unknown_device, at step 13).",
            vec!["alice", "bob"],
            vec![&|c| {
                c.draft(
                    "alice",
                    "alice",
                    "revoke_device",
                    json!({"key": public("bob")}),
                )
                .sign("alice")
            }],
        ),
        (
            "last_device",
            "Link 3: alice revokes her own key, the chain's only device.",
            vec!["alice"],
            vec![&|c| c.revoke_device("alice", "alice", None)],
        ),
        (
            "duplicate_device",
            "Link 3 adds alice's laptop, link 4 revokes it, link 5 adds the same key again.",
            vec!["alice", "alice-laptop"],
            vec![
                &laptop_added,
                &|c| c.revoke_device("alice", "alice-laptop", None),
                &laptop_added,
            ],
        ),
        (
            "duplicate_device-rotated-in-v1",
            "Link 3 rotates alice to alice2 (version 1); in link 4 alice2 adds alice's key, the chain id, back as a device.",
            vec!["alice", "alice2"],
            vec![&rotated_in_v1, &|c| {
                c.add_device("alice2", "alice", "old", "cli")
            }],
        ),
        (
            "duplicate_device-rotate",
            "Link 3 adds alice's laptop; in link 4 (version 2) alice rotates to the laptop's key.",
            vec!["alice", "alice-laptop"],
            vec![&laptop_added, &|c| c.rotate(2, "alice", "alice-laptop")],
        ),
        (
            "rotate_to_same_key-v2",
            "Link 3 adds alice's laptop; in link 4 (version 2) the laptop rotates to its own key.",
            vec!["alice", "alice-laptop"],
            vec![&laptop_added, &|c| {
                c.rotate(2, "alice-laptop", "alice-laptop")
            }],
        ),
        (
            "duplicate_device_name",
            "Link 3 adds alice's laptop under the name primary, which her own key's device has.",
            vec!["alice", "alice-laptop"],
            vec![&|c| c.add_device("alice", "alice-laptop", "primary", "desktop")],
        ),
        (
            "unknown_device",
            "Link 3 revokes bob's key, never a device of alice's chain.",
            vec!["alice", "bob"],
            vec![&|c| c.revoke_device("alice", "bob", None)],
        ),
        (
            "device_revoked",
            "Link 3 adds alice's laptop, link 4 revokes it, link 5 revokes it again.",
            vec!["alice", "alice-laptop"],
            vec![
                &laptop_added,
                &|c| c.revoke_device("alice", "alice-laptop", None),
                &|c| c.revoke_device("alice", "alice-laptop", Some("again")),
            ],
        ),
        (
            "version_downgrade",
            "Link 3 is version 2 (a claim by alice); link 4 is version 1, otherwise valid.",
            vec!["alice"],
            vec![&|c| c.claim(2, "alice", "alice-gh"), &|c| {
                c.claim(1, "alice", "alice.example")
            }],
        ),
        (
            "version_downgrade-before-shape",
            "Link 3 is version 2; link 4 is version 1 and has no time member: the version is checked first (step 3).",
            vec!["alice"],
            vec![&|c| c.claim(2, "alice", "alice-gh"), &|c| {
                let mut draft =
                    c.draft("alice", "alice", "remove_endpoint", json!({"name": "nats"}));
                draft.value.as_object_mut().unwrap().remove("time");
                draft.sign("alice")
            }],
        ),
    ];
    for (name, description, keys, steps) in cases {
        let chain = Chain::alice_base().then(&steps);
        let position = chain.links.len();
        out.push(vector(
            name,
            description,
            &keys,
            chain.links,
            error(name.split('-').next().unwrap(), position),
        ));
    }

    // One device past the most that may be active: alice and 31 devices, then a 33rd.
    let device_names: Vec<String> = (1..=MAX_ACTIVE_DEVICES)
        .map(|i| format!("device-{i}"))
        .collect();
    let mut chain = Chain::alice_base();
    for name in &device_names {
        let link = chain.add_device("alice", name, name, "cli");
        chain = chain.push(link);
    }
    let position = chain.links.len();
    let mut keys = vec!["alice"];
    keys.extend(device_names.iter().map(String::as_str));
    out.push(vector(
        "too_many_devices",
        &format!(
            "The shared start, then alice adds {MAX_ACTIVE_DEVICES} devices: the last would be the 33rd active one. (The other limit, 256 device entries, has no file: 255 version 2 rotations from alice's start, then an add_device, fail at link 258.)"
        ),
        &keys,
        chain.links,
        error("too_many_devices", position),
    ));
}

/// The deepest nesting of arrays and objects a link may have (PROTOCOL.md §3), the link
/// object itself counting as one.
const MAX_NESTING: usize = 127;

/// `depth` arrays, one inside the other, around `1`.
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!([inner]))
}

/// The bytes of a vector's lowercase hex string.
fn unhex(text: &Value) -> Vec<u8> {
    data_encoding::HEXLOWER
        .decode(text.as_str().unwrap().as_bytes())
        .unwrap()
}

/// The vector committed at `path`, rewritten with `generated` first under KEZ_REGEN_VECTORS (`make
/// vectors`); fails unless `generated` reproduces it byte for byte.
fn committed_vector(path: &std::path::Path, generated: String) -> String {
    if std::env::var_os("KEZ_REGEN_VECTORS").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap();
    assert!(
        committed == generated,
        "{} differs; run `make vectors`",
        path.display()
    );
    committed
}

#[test]
fn a_link_may_nest_127_levels_and_no_more() {
    // The link object and the payload object are two levels; the arrays the rest.
    for (arrays, ok) in [(MAX_NESTING - 2, true), (MAX_NESTING - 1, false)] {
        let chain = Chain::new();
        let link = chain
            .draft("alice", "alice", "note", json!({ "a": nested(arrays) }))
            .sign("alice");
        match Sigchain::verify(&[link]) {
            Ok(_) => assert!(ok, "{arrays}"),
            Err(err) => {
                assert!(!ok, "{arrays}: {err}");
                assert_eq!((err.kind.code(), err.position), ("malformed", 1));
            }
        }
    }
}

fn good_vector(name: &str, description: &str, keys: &[&str], links: Vec<String>) -> Vector {
    let state = Sigchain::verify(&links).unwrap_or_else(|err| panic!("{name} must verify: {err}"));
    vector(
        name,
        description,
        keys,
        links,
        Expect::Ok(serde_json::to_value(state).unwrap()),
    )
}

fn render(vector: &Vector) -> String {
    serde_json::to_string_pretty(vector).unwrap() + "\n"
}

#[test]
fn committed_vectors_are_reproduced_byte_for_byte() {
    let dir = vectors_dir();
    let generated = generate();
    if std::env::var_os("KEZ_REGEN_VECTORS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for old in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(old.unwrap().path()).unwrap();
        }
        for vector in &generated {
            std::fs::write(dir.join(format!("{}.json", vector.name)), render(vector)).unwrap();
        }
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = generated
        .iter()
        .map(|v| format!("{}.json", v.name))
        .collect();
    expected.sort();
    assert_eq!(
        on_disk, expected,
        "vector files differ from the generator's list; run `make vectors`"
    );
    for vector in &generated {
        let path = dir.join(format!("{}.json", vector.name));
        let committed = std::fs::read_to_string(&path).unwrap();
        assert!(
            committed == render(vector),
            "{} differs from what the generator makes",
            path.display()
        );
    }
}

#[test]
fn verifier_agrees_with_every_committed_vector() {
    let mut checked = 0;
    for entry in std::fs::read_dir(vectors_dir()).unwrap() {
        let path = entry.unwrap().path();
        let vector: Vector =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (link, hash) in vector.links.iter().zip(&vector.link_hashes) {
            assert_eq!(&sha256_hex(link.as_bytes()), hash, "{}", vector.name);
        }
        for (name, key) in &vector.keys {
            let seed: [u8; 32] = (0..32)
                .map(|i| u8::from_str_radix(&key.seed[2 * i..2 * i + 2], 16).unwrap())
                .collect::<Vec<_>>()
                .try_into()
                .unwrap();
            assert_eq!(
                SecretKey::from_seed(&seed).public_key().to_string(),
                key.public,
                "{name}"
            );
        }
        let result = Sigchain::verify(&vector.links);
        match (&vector.expect, result) {
            (Expect::Ok(state), Ok(chain)) => assert_eq!(
                &serde_json::to_value(chain).unwrap(),
                state,
                "{}",
                vector.name
            ),
            (Expect::Error { code, position }, Err(err)) => {
                assert_eq!(
                    (err.kind.code(), err.position),
                    (code.as_str(), *position),
                    "{}: {err}",
                    vector.name
                );
            }
            (expect, got) => panic!("{}: expected {expect:?}, got {got:?}", vector.name),
        }
        check_expect_v1(&vector);
        checked += 1;
    }
    assert!(checked >= ChainErrorKind::ALL_CODES.len() + 2);
}

/// `expect_v1` is there exactly when a link has `v` 2, and says what a verifier of version 1
/// only must answer: every link before the first version 2 link verifies (they are version 1
/// links, which that verifier reads as this one does), and that link reaches step 3 (its size
/// and syntax pass) with a version it does not know.
fn check_expect_v1(vector: &Vector) {
    let name = &vector.name;
    let versions: Vec<Option<u64>> = vector
        .links
        .iter()
        .map(|link| {
            serde_json::from_str::<Value>(link)
                .ok()
                .and_then(|value| value["v"].as_u64())
        })
        .collect();
    let Some(first_v2) = versions.iter().position(|v| *v == Some(2)) else {
        assert_eq!(vector.expect_v1, None, "{name}: no link has v 2");
        return;
    };
    assert_eq!(
        vector.expect_v1,
        Some(error("unknown_version", first_v2 + 1)),
        "{name}"
    );
    assert!(vector.links[first_v2].len() <= MAX_LINK_BYTES, "{name}");
    assert!(
        versions[..first_v2].iter().all(|v| *v == Some(1)),
        "{name}: the links before are version 1"
    );
    if first_v2 > 0 {
        Sigchain::verify(&vector.links[..first_v2])
            .unwrap_or_else(|err| panic!("{name}: the links before the first v2 one: {err}"));
    }
}

#[test]
fn every_failure_code_has_a_vector() {
    let generated = generate();
    // A chain one link past the limit would be a 4.6 MB file: `too_many_links` is checked by
    // the unit test that builds one (sigchain.rs).
    for code in ChainErrorKind::ALL_CODES
        .iter()
        .filter(|code| **code != "too_many_links")
    {
        assert!(
            generated
                .iter()
                .any(|v| matches!(&v.expect, Expect::Error { code: c, .. } if c == code)),
            "no vector fails with {code}"
        );
    }
}

/// The library's builder must produce exactly the bytes of the independently built vectors,
/// the version of each link included (version 1 while it can say the link).
#[test]
fn builder_reproduces_the_good_vectors() {
    for name in ["good-full", "good-devices"] {
        let vector = generate().into_iter().find(|v| v.name == name).unwrap();
        let secret_of = |key: &PublicKey| {
            let name = vector
                .keys
                .iter()
                .find(|(_, vector_key)| vector_key.public == key.to_string())
                .map(|(name, _)| name)
                .expect("every key of the vector is listed");
            secret(name)
        };
        let mut chain: Option<Sigchain> = None;
        for (i, text) in vector.links.iter().enumerate() {
            let link = kez_core::SignedLink::parse(text.as_bytes())
                .unwrap()
                .link()
                .clone();
            let signer = secret_of(&link.signer);
            let rebuilt = match (&chain, &link.op) {
                (None, op) => UnsignedLink::first(link.chain, link.time, op.clone())
                    .sign(&signer)
                    .unwrap(),
                (Some(chain), Op::Rotate { new_key, .. }) => chain
                    .next_link_by(link.signer, link.time, link.op.clone())
                    .sign_rotation(&signer, &secret_of(new_key))
                    .unwrap(),
                (
                    Some(chain),
                    Op::AddDevice {
                        key, name, kind, ..
                    },
                ) => chain
                    .add_device_link(link.time, &signer, &secret_of(key), name, *kind)
                    .unwrap(),
                (Some(chain), Op::RevokeDevice { key, reason }) => chain
                    .revoke_device_link(link.time, &signer, *key, reason.as_deref())
                    .unwrap(),
                (Some(chain), op) if link.signer == chain.current_key() => chain
                    .next_link(link.time, op.clone())
                    .sign(&signer)
                    .unwrap(),
                (Some(chain), op) => chain
                    .next_link_by(link.signer, link.time, op.clone())
                    .sign(&signer)
                    .unwrap(),
            };
            assert_eq!(rebuilt.bytes(), text.as_bytes(), "{name}: link {}", i + 1);
            match &mut chain {
                None => chain = Some(Sigchain::start(rebuilt.bytes()).unwrap()),
                Some(chain) => {
                    chain.append(rebuilt.bytes()).unwrap();
                }
            }
        }
    }
}

/// PROTOCOL.md §4.5: the 256-entry device limit, which has no file, is reached as described
/// there: 255 version 2 rotations from alice's start, then an `add_device` at link 258.
#[test]
fn the_device_entry_limit_is_reached_where_protocol_md_says() {
    let key_name = |i: usize| format!("rotation-{i}");
    let mut chain = Chain::alice_base();
    let mut signer = "alice".to_owned();
    for i in 1..=255 {
        let next = key_name(i);
        let link = chain.rotate(2, &signer, &next);
        chain = chain.push(link);
        signer = next;
    }
    let link = chain.add_device(&signer, "alice-laptop", "laptop", "desktop");
    let chain = chain.push(link);
    let err = Sigchain::verify(&chain.links).unwrap_err();
    assert_eq!((err.kind.code(), err.position), ("too_many_devices", 258));
    let verified = Sigchain::verify(&chain.links[..257]).unwrap();
    assert_eq!(verified.devices().len(), 256);
}

/// The group order L, little-endian.
const ORDER_L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// `a + b` for 256-bit little-endian numbers whose sum fits.
fn add_le(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut carry = 0u16;
    for i in 0..32 {
        let sum = u16::from(a[i]) + u16::from(b[i]) + carry;
        out[i] = sum as u8;
        carry = sum >> 8;
    }
    assert_eq!(carry, 0, "the sum fits");
    out
}

/// An ed25519 signature built by hand from the signing scalar `a` of `key` with the nonce point
/// `R` (given as bytes) and nonce scalar `r`: `S = r + H(R || A || M)·a`. Used to build the
/// signatures only a lax verifier accepts.
fn raw_signature(
    key: &str,
    r_bytes: [u8; 32],
    r: curve25519_dalek::Scalar,
    message: &[u8],
) -> [u8; 64] {
    use curve25519_dalek::Scalar;
    use sha2::Sha512;
    let expanded = Sha512::digest(seed(key));
    let mut a_bytes = [0u8; 32];
    a_bytes.copy_from_slice(&expanded[..32]);
    a_bytes[0] &= 248;
    a_bytes[31] &= 127;
    a_bytes[31] |= 64;
    let a = Scalar::from_bytes_mod_order(a_bytes);
    let mut h = Sha512::new();
    h.update(r_bytes);
    h.update(secret(key).public_key().as_bytes());
    h.update(message);
    let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());
    let s = r + k * a;
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&r_bytes);
    sig[32..].copy_from_slice(&s.to_bytes());
    sig
}

/// PROTOCOL.md §1.1: which 32-byte strings are keys, and which signatures verify.
fn keys_vector() -> String {
    use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
    use curve25519_dalek::{EdwardsPoint, Scalar};
    let alice = secret("alice").public_key();
    let alice_point = curve25519_dalek::edwards::CompressedEdwardsY(*alice.as_bytes())
        .decompress()
        .unwrap();
    let mut off_curve = [0u8; 32];
    off_curve[0] = 2;
    let mut aliased = [0xffu8; 32];
    aliased[0] = 0xf0;
    aliased[31] = 0x7f;
    let key_case = |name: &str, bytes: [u8; 32], expect: &str| json!({ "name": name, "key_hex": hex(&bytes), "expect": expect });
    let keys = vec![
        key_case("alice", *alice.as_bytes(), "ok"),
        key_case(
            "identity point (order 1)",
            EdwardsPoint::default().compress().to_bytes(),
            "weak_key",
        ),
        key_case(
            "a point of order 8",
            EIGHT_TORSION[1].compress().to_bytes(),
            "weak_key",
        ),
        key_case(
            "alice's point plus a point of order 8",
            (alice_point + EIGHT_TORSION[1]).compress().to_bytes(),
            "mixed_order",
        ),
        key_case("y = 2: not on the curve", off_curve, "invalid_point"),
        key_case(
            "y = p + 3: a non-canonical encoding of the point with y = 3",
            aliased,
            "invalid_point",
        ),
    ];

    let message = SignatureDomain::Register.message(b"{}");
    let good = secret("alice")
        .sign(SignatureDomain::Register, b"{}")
        .to_bytes();
    let mut non_canonical_s = good;
    let s: [u8; 32] = good[32..].try_into().unwrap();
    non_canonical_s[32..].copy_from_slice(&add_le(&s, &ORDER_L));
    // R the identity (small order), S = H(R || A || M)·a: [S]B = R + [k]A holds.
    let small_order_r = raw_signature(
        "alice",
        EdwardsPoint::default().compress().to_bytes(),
        Scalar::ZERO,
        &message,
    );
    // R' = rB + T (T of order 8): the cofactored equation holds, the cofactorless does not.
    let r = Scalar::from_bytes_mod_order_wide(&sha2::Sha512::digest(b"kez vector nonce").into());
    let torsioned_r = raw_signature(
        "alice",
        (ED25519_BASEPOINT_POINT * r + EIGHT_TORSION[1])
            .compress()
            .to_bytes(),
        r,
        &message,
    );
    let mut other_message = message.clone();
    other_message.push(b' ');
    let signature_case = |name: &str, message: &[u8], sig: [u8; 64], expect: &str| {
        json!({
            "name": name,
            "key": alice.to_string(),
            "message_hex": hex(message),
            "sig": hex(&sig),
            "expect": expect,
        })
    };
    let signatures = vec![
        signature_case(
            "alice signs KEZ-REGISTER-V1 || 0x00 || {}",
            &message,
            good,
            "ok",
        ),
        signature_case(
            "the same signature over another message",
            &other_message,
            good,
            "bad_signature",
        ),
        signature_case(
            "S + L: the same signature with a non-canonical S",
            &message,
            non_canonical_s,
            "bad_signature",
        ),
        signature_case(
            "R of small order (the identity), valid under the equation",
            &message,
            small_order_r,
            "bad_signature",
        ),
        signature_case(
            "R with a small-order component: valid only under the cofactored equation",
            &message,
            torsioned_r,
            "bad_signature",
        ),
    ];
    let vector = json!({
        "description": "PROTOCOL.md §1.1: key bytes a verifier must accept or refuse (with the reason), and signatures by alice that verify or not under the strict, cofactorless rules",
        "keys": keys,
        "signatures": signatures,
    });
    serde_json::to_string_pretty(&vector).unwrap() + "\n"
}

#[test]
fn key_and_signature_vectors_are_reproduced_and_hold() {
    use kez_core::key::KeyError;
    use kez_core::{PublicKey, Signature};
    let committed = committed_vector(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/keys.json"),
        keys_vector(),
    );
    let vector: Value = serde_json::from_str(&committed).unwrap();
    for case in vector["keys"].as_array().unwrap() {
        let bytes: [u8; 32] = unhex(&case["key_hex"]).try_into().unwrap();
        let got = match PublicKey::from_bytes(&bytes) {
            Ok(_) => "ok",
            Err(KeyError::InvalidPoint) => "invalid_point",
            Err(KeyError::WeakKey) => "weak_key",
            Err(KeyError::MixedOrder) => "mixed_order",
            Err(other) => panic!("{other}"),
        };
        assert_eq!(got, case["expect"], "{}", case["name"]);
    }
    for case in vector["signatures"].as_array().unwrap() {
        let key: PublicKey = case["key"].as_str().unwrap().parse().unwrap();
        let message = unhex(&case["message_hex"]);
        let sig = Signature::from_bytes(unhex(&case["sig"]).try_into().unwrap());
        let (tag, body) = message.split_at(message.iter().position(|&b| b == 0).unwrap());
        assert_eq!(tag, SignatureDomain::Register.tag());
        let got = match key.verify(SignatureDomain::Register, &body[1..], &sig) {
            Ok(()) => "ok",
            Err(_) => "bad_signature",
        };
        assert_eq!(got, case["expect"], "{}", case["name"]);
    }
    // The refused cases are ones laxer rules accept, so the vectors tell the rules apart:
    // ed25519-dalek's non-strict `verify` takes the small-order R, and the torsioned R
    // satisfies the cofactored equation 8([S]B - [k]A - R) = 0.
    let signatures = vector["signatures"].as_array().unwrap();
    let lax_key =
        ed25519_dalek::VerifyingKey::from_bytes(secret("alice").public_key().as_bytes()).unwrap();
    let message = unhex(&signatures[3]["message_hex"]);
    let small_order_r =
        ed25519_dalek::Signature::from_bytes(&unhex(&signatures[3]["sig"]).try_into().unwrap());
    assert!(lax_key.verify_strict(&message, &small_order_r).is_err());
    ed25519_dalek::Verifier::verify(&lax_key, &message, &small_order_r)
        .expect("the lax rules accept a small-order R");
    let sig = unhex(&signatures[4]["sig"]);
    let r = curve25519_dalek::edwards::CompressedEdwardsY(sig[..32].try_into().unwrap())
        .decompress()
        .unwrap();
    let s = curve25519_dalek::Scalar::from_canonical_bytes(sig[32..].try_into().unwrap()).unwrap();
    let mut h = sha2::Sha512::new();
    h.update(&sig[..32]);
    h.update(lax_key.as_bytes());
    h.update(&message);
    let k = curve25519_dalek::Scalar::from_bytes_mod_order_wide(&h.finalize().into());
    let a = lax_key.to_edwards();
    let residue = curve25519_dalek::constants::ED25519_BASEPOINT_POINT * s - a * k - r;
    let identity = curve25519_dalek::EdwardsPoint::default();
    assert_ne!(residue, identity, "cofactorless: refused");
    assert_eq!(residue.mul_by_cofactor(), identity, "cofactored: accepted");
}

/// The secret scalar `a` of a named test key (SHA-512 of the seed, clamped, reduced).
fn signing_scalar(key: &str) -> curve25519_dalek::Scalar {
    use sha2::Sha512;
    let expanded = Sha512::digest(seed(key));
    let mut a_bytes = [0u8; 32];
    a_bytes.copy_from_slice(&expanded[..32]);
    a_bytes[0] &= 248;
    a_bytes[31] &= 127;
    a_bytes[31] |= 64;
    curve25519_dalek::Scalar::from_bytes_mod_order(a_bytes)
}

/// `k = SHA-512(R || A || M)` reduced mod L, over the bytes as given.
fn challenge(r_bytes: &[u8], a_bytes: &[u8], message: &[u8]) -> curve25519_dalek::Scalar {
    let mut h = sha2::Sha512::new();
    h.update(r_bytes);
    h.update(a_bytes);
    h.update(message);
    curve25519_dalek::Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

/// `R || S` with `S = r + k·a`, `k` over the given bytes of `R` and `A`.
fn forge(
    a: curve25519_dalek::Scalar,
    a_bytes: [u8; 32],
    r_bytes: [u8; 32],
    r: curve25519_dalek::Scalar,
    message: &[u8],
) -> [u8; 64] {
    let s = r + challenge(&r_bytes, &a_bytes, message) * a;
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&r_bytes);
    sig[32..].copy_from_slice(&s.to_bytes());
    sig
}

/// The first nonce `r` (from a counter) whose `R = [r]B` makes `k ≡ 0 mod 8` with key bytes
/// `a_bytes`: then `[k]T` is the identity for any `T` of order 8 or less.
fn nonce_killing_torsion(a_bytes: [u8; 32], message: &[u8]) -> curve25519_dalek::Scalar {
    use curve25519_dalek::Scalar;
    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
    (0u32..)
        .map(|i| {
            Scalar::from_bytes_mod_order_wide(
                &sha2::Sha512::digest(format!("kez vector torsion nonce {i}")).into(),
            )
        })
        .find(|r| {
            let r_bytes = (ED25519_BASEPOINT_POINT * r).compress().to_bytes();
            challenge(&r_bytes, &a_bytes, message).to_bytes()[0] & 7 == 0
        })
        .unwrap()
}

/// PROTOCOL.md §1.1: signatures a strict verifier refuses although a laxer rule accepts them
/// (`lax_accepts`), each with the code a verifier gives: the key's when the key is refused
/// (checked first), else `bad_signature`.
fn strict_signatures_vector() -> String {
    use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
    use curve25519_dalek::{EdwardsPoint, Scalar};
    let message = SignatureDomain::Register.message(b"{}");
    let alice = secret("alice").public_key();
    let alice_point = curve25519_dalek::edwards::CompressedEdwardsY(*alice.as_bytes())
        .decompress()
        .unwrap();
    let a = signing_scalar("alice");
    // y = p + 1: a non-canonical encoding of the identity (y = 1).
    let mut identity_y_plus_p = [0xffu8; 32];
    identity_y_plus_p[0] = 0xee;
    identity_y_plus_p[31] = 0x7f;
    // y = 1 with the sign bit set: the identity again (x = 0, so "-0").
    let mut identity_negative_zero = [0u8; 32];
    identity_negative_zero[0] = 1;
    identity_negative_zero[31] = 0x80;
    let order_8 = EIGHT_TORSION[1].compress().to_bytes();
    let identity = EdwardsPoint::default().compress().to_bytes();
    let mixed = (alice_point + EIGHT_TORSION[1]).compress().to_bytes();

    let case = |name: &str, key: [u8; 32], sig: [u8; 64], expect: &str, lax: Option<&str>| {
        json!({
            "name": name,
            "key_hex": hex(&key),
            "message_hex": hex(&message),
            "sig": hex(&sig),
            "expect": expect,
            "lax_accepts": lax,
        })
    };
    // Signatures by a key whose discrete log is 0 (a small-order key): S = r, R = [r]B.
    let free = |key: [u8; 32], r: Scalar| {
        forge(
            Scalar::ZERO,
            key,
            (ED25519_BASEPOINT_POINT * r).compress().to_bytes(),
            r,
            &message,
        )
    };
    let any_r =
        Scalar::from_bytes_mod_order_wide(&sha2::Sha512::digest(b"kez vector nonce").into());
    let r_order_8 = nonce_killing_torsion(order_8, &message);
    let r_mixed = nonce_killing_torsion(mixed, &message);
    let cases = vec![
        case(
            "alice signs KEZ-REGISTER-V1 || 0x00 || {}",
            *alice.as_bytes(),
            secret("alice")
                .sign(SignatureDomain::Register, b"{}")
                .to_bytes(),
            "ok",
            None,
        ),
        case(
            "R = the identity encoded with y = p + 1 (not canonical), S = k·a",
            *alice.as_bytes(),
            forge(
                a,
                *alice.as_bytes(),
                identity_y_plus_p,
                Scalar::ZERO,
                &message,
            ),
            "bad_signature",
            Some("cofactorless"),
        ),
        case(
            "R = the identity encoded with the sign bit set (x = -0, not canonical), S = k·a",
            *alice.as_bytes(),
            forge(
                a,
                *alice.as_bytes(),
                identity_negative_zero,
                Scalar::ZERO,
                &message,
            ),
            "bad_signature",
            Some("cofactorless"),
        ),
        case(
            "R = a point of order 8, S = k·a: small-order R, valid under the cofactored equation",
            *alice.as_bytes(),
            forge(a, *alice.as_bytes(), order_8, Scalar::ZERO, &message),
            "bad_signature",
            Some("cofactored"),
        ),
        case(
            "key = the identity: R = [r]B, S = r verifies for every message",
            identity,
            free(identity, any_r),
            "weak_key",
            Some("cofactorless"),
        ),
        case(
            "key = the identity encoded with y = p + 1: R = [r]B, S = r",
            identity_y_plus_p,
            free(identity_y_plus_p, any_r),
            "invalid_point",
            Some("cofactorless"),
        ),
        case(
            "key = a point T of order 8, r chosen so that k = 0 mod 8 ([k]T = identity): S = r",
            order_8,
            free(order_8, r_order_8),
            "weak_key",
            Some("cofactorless"),
        ),
        case(
            "key = alice's point plus a point of order 8 (mixed order), r chosen so that k = 0 mod 8: S = r + k·a satisfies the cofactorless equation (ed25519-dalek's verify_strict accepts it)",
            mixed,
            forge(
                a,
                mixed,
                (ED25519_BASEPOINT_POINT * r_mixed).compress().to_bytes(),
                r_mixed,
                &message,
            ),
            "mixed_order",
            Some("cofactorless"),
        ),
    ];
    let vector = json!({
        "description": "PROTOCOL.md §1.1: signatures refused by the strict rules that a laxer rule accepts. A verifier checks the key first (its code), then the signature (bad_signature). lax_accepts: \"cofactorless\" = [S mod L]B == R + [k]A as points, any decodable encoding of R and A, no other check; \"cofactored\" = 8([S mod L]B - R - [k]A) is the identity, likewise.",
        "cases": cases,
    });
    serde_json::to_string_pretty(&vector).unwrap() + "\n"
}

/// The laxer rules of `strict_signatures_vector`: decode `R` and `A` as curve25519-dalek does
/// (any y below 2^255, reduced mod p; the sign bit of x = 0 ignored), reduce `S` mod L, and
/// check the equation with or without the cofactor, nothing else.
fn lax_accepts(rule: &str, key: &[u8], message: &[u8], sig: &[u8]) -> bool {
    use curve25519_dalek::edwards::CompressedEdwardsY;
    use curve25519_dalek::traits::IsIdentity;
    let decode = |bytes: &[u8]| CompressedEdwardsY(bytes.try_into().unwrap()).decompress();
    let (Some(a), Some(r)) = (decode(key), decode(&sig[..32])) else {
        return false;
    };
    let s = curve25519_dalek::Scalar::from_bytes_mod_order(sig[32..].try_into().unwrap());
    let k = challenge(&sig[..32], key, message);
    let residue = curve25519_dalek::constants::ED25519_BASEPOINT_POINT * s - a * k - r;
    match rule {
        "cofactorless" => residue.is_identity(),
        "cofactored" => residue.mul_by_cofactor().is_identity(),
        other => panic!("unknown rule {other}"),
    }
}

#[test]
fn strict_signature_vectors_are_reproduced_and_hold() {
    use kez_core::key::KeyError;
    use kez_core::{PublicKey, Signature};
    let committed = committed_vector(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors/signatures-strict.json"),
        strict_signatures_vector(),
    );
    let vector: Value = serde_json::from_str(&committed).unwrap();
    let mut refused = 0;
    for case in vector["cases"].as_array().unwrap() {
        let name = &case["name"];
        let key = unhex(&case["key_hex"]);
        let message = unhex(&case["message_hex"]);
        let sig = unhex(&case["sig"]);
        let (tag, body) = message.split_at(message.iter().position(|&b| b == 0).unwrap());
        assert_eq!(tag, SignatureDomain::Register.tag());
        let got = match PublicKey::from_bytes(&key.clone().try_into().unwrap()) {
            Err(KeyError::InvalidPoint) => "invalid_point",
            Err(KeyError::WeakKey) => "weak_key",
            Err(KeyError::MixedOrder) => "mixed_order",
            Err(other) => panic!("{name}: {other}"),
            Ok(key) => {
                let sig = Signature::from_bytes(sig.clone().try_into().unwrap());
                match key.verify(SignatureDomain::Register, &body[1..], &sig) {
                    Ok(()) => "ok",
                    Err(_) => "bad_signature",
                }
            }
        };
        assert_eq!(got, case["expect"], "{name}");
        match case["lax_accepts"].as_str() {
            None => assert_eq!(got, "ok", "{name}: a refused case names the rule it passes"),
            Some(rule) => {
                assert_ne!(got, "ok", "{name}");
                assert!(lax_accepts(rule, &key, &message, &sig), "{name}: {rule}");
                refused += 1;
            }
        }
    }
    assert!(refused >= 7);
    // The mixed-order key passes ed25519-dalek's verify_strict, which checks only that the
    // key is not of small order: the key rules of §1.1 are what refuses it.
    let mixed = &vector["cases"][7];
    let key =
        ed25519_dalek::VerifyingKey::from_bytes(&unhex(&mixed["key_hex"]).try_into().unwrap())
            .unwrap();
    let sig = ed25519_dalek::Signature::from_bytes(&unhex(&mixed["sig"]).try_into().unwrap());
    key.verify_strict(&unhex(&mixed["message_hex"]), &sig)
        .expect("verify_strict alone accepts a mixed-order key");
}

/// The edited sigchain vectors (duplicate members, fractions, exponents) carry alice's valid
/// signature over the canonical form of what they say: only the text form is wrong, so a
/// verifier that normalised numbers or dropped duplicates would accept them.
#[test]
fn edited_sigchain_vectors_are_validly_signed_over_their_canonical_form() {
    for name in [
        "malformed-duplicate-member",
        "malformed-duplicate-v",
        "unknown_version-duplicate-v",
        "malformed-fractional-v",
        "malformed-exponent-v",
        "malformed-fractional-unknown-v",
        "malformed-fractional-seq",
        "malformed-exponent-time",
    ] {
        let path = vectors_dir().join(format!("{name}.json"));
        let vector: Vector =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let text = vector.links.last().unwrap();
        let mut value: Value = serde_json::from_str(text).unwrap();
        let object = value.as_object_mut().unwrap();
        for member in ["seq", "time"] {
            let number = object[member].as_f64().unwrap();
            object.insert(member.into(), json!(number as u64));
        }
        object.insert("v".into(), json!(1));
        let sig: kez_core::Signature = object
            .remove("sig")
            .unwrap()
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let canonical = canonical_bytes(&value);
        assert_ne!(canonical, text.as_bytes(), "{name}");
        secret("alice")
            .public_key()
            .verify(SignatureDomain::SigchainLink, &canonical, &sig)
            .unwrap_or_else(|err| panic!("{name}: {err}"));
    }
}
