//! Seed inputs for every target, made from the committed vectors
//! (`rust-lib/kez-core/vectors`, the nats-server captures in `rust-lib/kez-nats-jwt/tests/fixtures`)
//! so corpora are never committed: `make soak` writes them with the `kez-fuzz-seeds` binary.

use std::fs;
use std::path::{Path, PathBuf};

use data_encoding::{BASE64URL_NOPAD, HEXLOWER};
use kez_core::file::{BlobHash, ContentKey, FileOffer};
use serde_json::{Value, json};

use crate::keys;

/// The repository's root (this crate is `rust-lib/kez-fuzz`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vectors(kind: &str) -> Vec<Value> {
    let dir = repo_root().join("rust-lib/kez-core/vectors").join(kind);
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    paths.iter().map(|path| read_json(path)).collect()
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn hex(value: &Value) -> Vec<u8> {
    HEXLOWER
        .decode(value.as_str().expect("a hex string").as_bytes())
        .expect("lowercase hex")
}

fn tagged(mode: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(rest);
    out
}

/// The Olm messages (type byte, bytes) the good envelope v2 vectors carry.
fn olm_messages(vectors: &[Value]) -> Vec<Vec<u8>> {
    vectors
        .iter()
        .filter_map(|vector| vector["expect"].get("ok"))
        .map(|ok| {
            let kind = u8::try_from(ok["olm_type"].as_u64().expect("a type")).expect("a byte");
            tagged(kind, &hex(&ok["olm_message_hex"]))
        })
        .collect()
}

fn sigchain_links() -> Vec<Vec<String>> {
    vectors("sigchain")
        .iter()
        .map(|vector| {
            vector["links"]
                .as_array()
                .expect("links")
                .iter()
                .map(|link| link.as_str().expect("a link string").to_owned())
                .collect()
        })
        .collect()
}

fn jwt_fixtures() -> Vec<String> {
    let dir = repo_root().join("rust-lib/kez-nats-jwt/tests/fixtures/nats-server-2.15.1");
    [
        "request-async-nats.jwt",
        "request-nats-py.jwt",
        "request-deny.jwt",
    ]
    .iter()
    .map(|name| {
        fs::read_to_string(dir.join(name))
            .expect("a captured request")
            .trim_end()
            .to_owned()
    })
    .collect()
}

fn sample_offer() -> Vec<u8> {
    FileOffer {
        name: "report.pdf".into(),
        size: 17,
        blob: BlobHash::from_bytes([9; 32]),
        cipher_size: kez_core::file::ciphertext_len(17).expect("small"),
        providers: vec!["ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6".into()],
        key: ContentKey::from_bytes([3; 32]),
        pinned: false,
    }
    .to_json()
    .expect("a valid offer")
    .to_vec()
}

/// The seed inputs of the target `name` (empty for an unknown name).
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    let alice = keys::alice().public_key();
    let bob = keys::bob().public_key();
    match name {
        "sigchain" => sigchain_links()
            .into_iter()
            .flat_map(|links| {
                let whole = links.join("\n").into_bytes();
                let first = links.first().cloned().unwrap_or_default().into_bytes();
                [whole, first]
            })
            .collect(),
        "server_append" => sigchain_links()
            .into_iter()
            .flatten()
            .map(String::into_bytes)
            .collect(),
        "envelope" => {
            let mut seeds: Vec<Vec<u8>> = vectors("envelope")
                .iter()
                .map(|vector| tagged(0, &hex(&vector["envelope_hex"])))
                .collect();
            for (content_type, body) in
                [("text", &b"hello bob"[..]), ("file-offer", &sample_offer())]
            {
                let header = json!({
                    "content_type": content_type,
                    "from": alice.to_string(),
                    "id": "26385a833a0f9f2fa045ea6ba851d242",
                    "time": 1_767_225_600u64,
                    "to": bob.to_string(),
                    "v": 1,
                });
                let header = serde_json::to_vec(&header).expect("encodes");
                let mut seed = vec![1];
                seed.extend_from_slice(&(header.len() as u16).to_be_bytes());
                seed.extend_from_slice(&header);
                seed.extend_from_slice(body);
                seeds.push(seed);
            }
            seeds
        }
        "envelope_v2" => {
            let vectors = vectors("envelope-v2");
            let mut seeds: Vec<Vec<u8>> = vectors
                .iter()
                .filter(|vector| vector["opener"] == "bob")
                .map(|vector| tagged(0, &hex(&vector["envelope_hex"])))
                .collect();
            seeds.extend(olm_messages(&vectors).iter().map(|olm| tagged(1, olm)));
            let header = json!({
                "content_type": "text",
                "from": alice.to_string(),
                "id": "24".repeat(16),
                "time": 1_767_225_600u64,
                "to": bob.to_string(),
                "v": 2,
            });
            let header = serde_json::to_vec(&header).expect("encodes");
            let mut seed = vec![2];
            seed.extend_from_slice(&(header.len() as u16).to_be_bytes());
            seed.extend_from_slice(&header);
            seed.extend_from_slice(b"hello bob");
            seeds.push(seed);
            seeds
        }
        "olm_message" => olm_messages(&vectors("envelope-v2")),
        "sigchain_olm_key" => {
            let payload = json!({ "key": "07".repeat(32) }).to_string();
            vec![tagged(0, payload.as_bytes()), tagged(1, payload.as_bytes())]
        }
        "file_decrypt" => {
            let mut seeds = Vec::new();
            for vector in vectors("file") {
                let key = hex(&vector["key"]);
                let ciphertext = hex(&vector["ciphertext_hex"]);
                let claimed = vector["known_ciphertext_len"]
                    .as_u64()
                    .unwrap_or(ciphertext.len() as u64);
                let mut seed = tagged(0, &key);
                seed.extend_from_slice(&claimed.to_be_bytes());
                seed.extend_from_slice(&ciphertext);
                seeds.push(seed);
                if let Some(plaintext) = vector["plaintext"].get("hex") {
                    let mut seed = tagged(1, &key);
                    seed.extend_from_slice(&[1, 0, 0, 0, 77]);
                    seed.extend_from_slice(&hex(plaintext));
                    seeds.push(seed);
                }
            }
            seeds
        }
        "file_offer" => vec![sample_offer(), b"report (1).pdf".to_vec()],
        "file_key" => vec![
            kez_core::manifest::FileKey {
                blob: BlobHash::from_bytes([9; 32]),
                wrap: ContentKey::from_bytes([3; 32]),
            }
            .encode()
            .to_vec(),
        ],
        "pair_request" => {
            let request = kez_core::pair::PairRequest::new(
                crate::keys::alice().public_key(),
                "@alice@kez.lat",
                crate::keys::bob().public_key(),
                "phone",
                kez_core::sigchain::DeviceKind::Mobile,
                crate::PAIR_NOW,
                600,
            )
            .expect("a valid request");
            let bytes = request.to_bytes();
            vec![
                tagged(0, request.to_line().as_bytes()),
                tagged(1, &bytes[..bytes.len() - 4]),
            ]
        }
        "sent_copy" => vec![
            kez_core::copy::SentCopy {
                to: crate::keys::bob().public_key(),
                content_type: "text".into(),
                body: b"see you at eight".to_vec(),
            }
            .encode(),
        ],
        "chat" => vectors("chat")
            .iter()
            .map(|vector| {
                let content_type = vector["content_type"].as_str().expect("a content type");
                let mode = kez_core::chat::CONTENT_TYPES
                    .iter()
                    .position(|known| *known == content_type)
                    .expect("a chat content type");
                tagged(
                    u8::try_from(mode).expect("a few types"),
                    &hex(&vector["body_hex"]),
                )
            })
            .chain([tagged(
                u8::try_from(kez_core::chat::CONTENT_TYPES.len()).expect("a few types"),
                &kez_core::chat::Resend {
                    ids: [kez_core::envelope::MessageId::from_bytes([7; 16])].into(),
                }
                .encode()
                .expect("a valid request"),
            )])
            .collect(),
        "manifest" => vectors("manifest")
            .iter()
            .filter(|vector| vector["expected_owner"] == "alice")
            .flat_map(|vector| {
                let bytes = vector["manifest"].as_str().expect("a manifest").as_bytes();
                [tagged(0, bytes), tagged(1, bytes)]
            })
            .collect(),
        "handle" => [
            "alice\nkez.lat",
            "@alice\nkez.lat",
            "@Bob@Example.COM\nkez.lat",
            "carol@kez.lat",
        ]
        .iter()
        .map(|text| text.as_bytes().to_vec())
        .collect(),
        "public_key" => {
            let link = &sigchain_links()[0];
            let signature = serde_json::from_str::<Value>(&link[0]).expect("a link")["sig"]
                .as_str()
                .expect("a sig")
                .to_owned();
            vec![
                alice.to_string().into_bytes(),
                bob.to_nkey().into_bytes(),
                alice.as_bytes().to_vec(),
                signature.into_bytes(),
                keys::alice().to_key_file().as_bytes().to_vec(),
            ]
        }
        "callout_jwt" => {
            let server = crate::jwt::server_key().public_key();
            let mut seeds = Vec::new();
            for jwt in jwt_fixtures() {
                seeds.push(tagged(0, jwt.as_bytes()));
                let claims = jwt.split('.').nth(1).expect("three parts");
                let mut claims: Value = serde_json::from_slice(
                    &BASE64URL_NOPAD
                        .decode(claims.as_bytes())
                        .expect("base64url"),
                )
                .expect("claims JSON");
                claims["iss"] = server.clone().into();
                claims["nats"]["server_id"]["id"] = server.clone().into();
                seeds.push(tagged(1, &serde_json::to_vec(&claims).expect("encodes")));
            }
            seeds
        }
        "server_register" => {
            let vector =
                read_json(&repo_root().join("rust-lib/kez-core/vectors/registration.json"));
            vec![
                vector["request"]
                    .as_str()
                    .expect("a request")
                    .as_bytes()
                    .to_vec(),
            ]
        }
        "server_lookup" => vec![
            br#"{"handle":"alice"}"#.to_vec(),
            br#"{"handle":"@bob@kez.lat"}"#.to_vec(),
        ],
        "server_whois" | "server_head" => vec![
            json!({ "key": alice }).to_string().into_bytes(),
            json!({ "key": bob, "domain": "b.localhost" })
                .to_string()
                .into_bytes(),
        ],
        "server_get" => vec![
            json!({ "key": alice }).to_string().into_bytes(),
            json!({ "key": bob, "from_seq": 3, "domain": "b.localhost" })
                .to_string()
                .into_bytes(),
        ],
        "server_info" => vec![b"{}".to_vec(), Vec::new()],
        "server_mail_send" => {
            let id = kez_core::envelope::MessageId::from_bytes([7; 16]);
            vec![
                kez_proto::mail::SendRequest::encode(&bob, &id, b"sealed"),
                kez_proto::mail::SendRequest::encode(&bob, &id, &[0; 200]),
            ]
        }
        "server_mail_fetch" => vec![
            br#"{"after":0,"max":64,"time":0}"#.to_vec(),
            br#"{"after":41,"max":256,"time":1764900000123456}"#.to_vec(),
        ],
        "mail_fetch_answer" | "mail_fetch_origins" => {
            use kez_proto::mail::{FetchAnswer, Fetched};
            let origins = name == "mail_fetch_origins";
            vec![
                FetchAnswer::encode(0, &[], origins),
                FetchAnswer::encode(
                    3,
                    &[
                        Fetched {
                            seq: 7,
                            time: 1_764_900_000_123_456,
                            envelope: b"sealed",
                            origin: None,
                        },
                        Fetched {
                            seq: 9,
                            time: 1_764_900_000_123_999,
                            envelope: &[0; 200],
                            origin: origins.then_some("a.localhost"),
                        },
                    ],
                    origins,
                ),
            ]
        }
        "server_mail_relay" => {
            let id = kez_core::envelope::MessageId::from_bytes([7; 16]);
            let frame = kez_proto::mail::SendRequest::encode(&bob, &id, b"sealed");
            vec![
                kez_proto::federation::RelayRequest::encode("b.localhost", &frame),
                kez_proto::federation::RelayRequest::encode("example.org", &frame),
            ]
        }
        "server_mail_deliver" => {
            let id = kez_core::envelope::MessageId::from_bytes([7; 16]);
            vec![kez_proto::mail::SendRequest::encode(&bob, &id, b"sealed")]
        }
        "server_discovery" => vec![
            serde_json::to_vec(
                &kez_proto::federation::ServerDiscovery {
                    domain: "b.localhost".into(),
                    key: bob,
                    nats_url: "nats://127.0.0.1:4333".into(),
                }
                .jrd(),
            )
            .expect("encodes"),
        ],
        "server_pair" => {
            let device = keys::bob().public_key();
            let nonce = "0123456789abcdef0123456789abcdef";
            let put = serde_json::json!({ "device": device, "nonce": nonce, "slot": "offer",
                "expires": crate::server::NOW + 600, "data": "{}" });
            let get = serde_json::json!({ "device": device, "nonce": nonce, "slot": "answer" });
            vec![
                tagged(0, put.to_string().as_bytes()),
                tagged(1, get.to_string().as_bytes()),
            ]
        }
        "server_keys_publish" => {
            use kez_core::prekey::{OlmKey, PrekeyKind, SignedPrekey};
            let device = keys::alice();
            let identity = OlmKey::from_bytes([1; 32]);
            let prekey = |byte, kind| {
                SignedPrekey::sign(&device, &identity, OlmKey::from_bytes([byte; 32]), kind)
            };
            vec![
                json!({ "identity_key": identity,
                    "one_time": [prekey(2, PrekeyKind::OneTime), prekey(3, PrekeyKind::OneTime)],
                    "fallback": prekey(4, PrekeyKind::Fallback) })
                .to_string()
                .into_bytes(),
                json!({ "identity_key": identity }).to_string().into_bytes(),
            ]
        }
        "server_keys_count" => vec![b"{}".to_vec(), b" { } ".to_vec()],
        "server_keys_claim" => vec![
            json!({ "device": alice }).to_string().into_bytes(),
            json!({ "device": bob, "domain": "b.localhost" })
                .to_string()
                .into_bytes(),
        ],
        "server_pin" => {
            let vector = read_json(&repo_root().join("rust-lib/kez-core/vectors/pin.json"));
            let add = vector["request"].as_str().expect("a request").as_bytes();
            let blob = BlobHash::from_bytes([7; 32]);
            let key = keys::alice();
            let (domain, now) = (crate::server::DOMAIN, crate::server::NOW);
            let encoded = |request: &kez_proto::pin::PinRequest| {
                serde_json::to_vec(request).expect("encodes")
            };
            vec![
                tagged(0, add),
                tagged(
                    1,
                    &encoded(&kez_proto::pin::PinRequest::remove(&key, domain, now, blob)),
                ),
                tagged(
                    2,
                    &encoded(&kez_proto::pin::PinRequest::list(&key, domain, now)),
                ),
                tagged(
                    3,
                    &encoded(&kez_proto::pin::PinRequest::status(&key, domain, now, blob)),
                ),
            ]
        }
        "provider" => {
            let id = "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";
            vec![
                format!("iroh:{id}").into_bytes(),
                format!("iroh:{id};ip=192.0.2.7:4433;ip=[2001:db8::7]:4433;relay=https://relay.example.org./")
                    .into_bytes(),
            ]
        }
        "webfinger_query" => vec![
            b"resource=acct%3Aalice%40kez.lat".to_vec(),
            b"resource=acct:Bob@KEZ.lat&rel=https%3A%2F%2Fkez.lat%2Fns%2Frel%2Fnats".to_vec(),
        ],
        _ => Vec::new(),
    }
}
