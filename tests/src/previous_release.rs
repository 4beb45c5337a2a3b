//! The store the previous release (0.1) left behind, for upgrade tests: the committed fixture
//! `tests/fixtures/v0.1-store.tar.gz` (made by `tests/fixtures/make-v0.1-store.sh` with 0.1's own
//! binaries), unpacked, and a broker started on its JetStream store the way `kez-chat-server dev`
//! starts one.

use std::path::{Path, PathBuf};
use std::process::Command;

use async_nats::Client;
use kez_chat_server::dev;
use kez_core::PublicKey;
use serde_json::Value;

/// The committed fixture.
pub fn fixture_tarball() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v0.1-store.tar.gz")
}

/// One message 0.1 was asked to send, as `fixture.json` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    /// The id `kez-chat send` printed (the stored message's `Nats-Msg-Id`).
    pub id: String,
    /// The sender's name (`alice`, `bob`).
    pub from: String,
    /// The recipient's name.
    pub to: String,
    /// The text.
    pub text: String,
    /// Whether it was still waiting in `KEZ_INBOX` when the fixture was made.
    pub unread: bool,
}

/// The fixture, unpacked.
#[derive(Debug)]
pub struct Fixture {
    /// `v0.1-store/` in the directory it was unpacked into.
    pub root: PathBuf,
    /// The dev stack's data directory (keys, JetStream store).
    pub data_dir: PathBuf,
    /// alice's, bob's and carol's keys, by name.
    pub keys: Vec<(String, PublicKey)>,
    /// Every message sent, in the order sent.
    pub messages: Vec<SentMessage>,
}

impl Fixture {
    /// Unpacks the fixture into `dir` (with `tar`) and reads its `fixture.json`.
    ///
    /// # Panics
    ///
    /// If it cannot be unpacked or read.
    pub fn unpack(dir: &Path) -> Fixture {
        let tarball = fixture_tarball();
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir)
            .status()
            .unwrap_or_else(|e| panic!("cannot run tar: {e}"));
        assert!(status.success(), "tar -xzf {} failed", tarball.display());
        let root = dir.join("v0.1-store");
        let text = std::fs::read_to_string(root.join("fixture.json")).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        let keys = json["keys"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, hex)| {
                let key = format!("ed25519:{}", hex.as_str().unwrap())
                    .parse()
                    .unwrap();
                (name.clone(), key)
            })
            .collect();
        let messages = json["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|message| SentMessage {
                id: message["id"].as_str().unwrap().to_owned(),
                from: message["from"].as_str().unwrap().to_owned(),
                to: message["to"].as_str().unwrap().to_owned(),
                text: message["text"].as_str().unwrap().to_owned(),
                unread: message["state"] == "unread",
            })
            .collect();
        Fixture {
            data_dir: root.join("data"),
            root,
            keys,
            messages,
        }
    }

    /// The key of `name`.
    ///
    /// # Panics
    ///
    /// If the fixture has no such person.
    pub fn key(&self, name: &str) -> PublicKey {
        self.keys
            .iter()
            .find(|(known, _)| known == name)
            .unwrap_or_else(|| panic!("no {name} in the fixture"))
            .1
    }

    /// A client home of the fixture (`alice`, `bob`, `carol`).
    pub fn home(&self, name: &str) -> PathBuf {
        self.root.join("homes").join(name)
    }
}

/// nats-server started on a `dev` data directory as `kez-chat-server dev` starts it (its
/// config rewritten for this directory, any free loopback port unless the directory keeps one),
/// without the services. Dropping it kills the broker.
#[derive(Debug)]
pub struct DevBroker {
    broker: dev::Broker,
    data_dir: PathBuf,
}

impl DevBroker {
    /// Starts the fixtures' nats-server ([`crate::nats_server_binary`]) on `data_dir`.
    ///
    /// # Panics
    ///
    /// If the directory cannot be prepared or the broker does not start.
    pub async fn start(data_dir: &Path) -> DevBroker {
        let prepared = dev::prepare(&dev::DevOptions {
            data_dir: data_dir.to_owned(),
            port: 0,
            http_port: 0,
            domain: dev::DEFAULT_DOMAIN.to_owned(),
            pin: false,
        })
        .unwrap_or_else(|e| panic!("cannot prepare {}: {e}", data_dir.display()));
        assert!(
            !prepared.new_keys,
            "{} had no keys: not a dev data directory",
            data_dir.display()
        );
        let broker = dev::Broker::start(&crate::nats_server_binary(), &prepared)
            .await
            .unwrap_or_else(|e| panic!("nats-server did not start: {e}"));
        DevBroker {
            broker,
            data_dir: prepared.data_dir,
        }
    }

    /// The client URL.
    pub fn url(&self) -> String {
        self.broker.url()
    }

    /// A connection as the server's `SERVER` user, the owner of every stream.
    pub async fn server_client(&self) -> Client {
        crate::callout::server_client(&self.url(), &self.data_dir.join(dev::KEYS_DIR)).await
    }

    /// Stops the broker gracefully.
    pub async fn stop(mut self) {
        self.broker.stop().await;
    }
}
