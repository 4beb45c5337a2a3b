//! A broker that authenticates clients through the kez-chat-server auth callout, and clients that
//! connect to it with their KEZ key. [`CalloutStack`] runs the server in-process;
//! [`CalloutProcessStack`] runs the real binary, whose log and one-shot commands tests can use.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{Client, ConnectOptions, ServerError};
use kez_chat_server::config::{CalloutConfig, NatsAuth, ServerConfig};
use kez_chat_server::nats_conf;
use kez_core::{Handle, SecretKey};
use kez_proto::registry::RegistrationRequest;
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::NatsServer;
use crate::kez_server::{KezServer, ServiceError, TEST_DOMAIN, call};
use crate::process::{KezServerProcess, kez_chat_server_command};

/// nats-server with the kez accounts and auth callout, and a kez-chat-server answering it.
pub struct CalloutStack {
    /// The kez-chat-server (in-process).
    pub server: KezServer,
    /// The broker.
    pub nats: NatsServer,
    /// The server's keys; the config references them.
    pub keys_dir: TempDir,
    /// The server's public keys.
    pub keys: nats_conf::PublicKeys,
}

/// Fresh server keys in a temporary directory, and a nats-server configured for them (the
/// kez accounts and the auth callout), not yet answered by any kez-chat-server.
pub fn keys_and_broker() -> (TempDir, nats_conf::PublicKeys, NatsServer) {
    keys_and_broker_with("")
}

/// Like [`keys_and_broker`], with `conf_extra` appended to the broker's config (e.g.
/// [`crate::tls::nats_tls_conf`]).
pub fn keys_and_broker_with(conf_extra: &str) -> (TempDir, nats_conf::PublicKeys, NatsServer) {
    let keys_dir = tempfile::Builder::new()
        .prefix("kez-keys-")
        .tempdir()
        .unwrap();
    let keys = nats_conf::keygen(keys_dir.path()).unwrap().0;
    let nats = NatsServer::start_with(&(nats_conf::render_auth(&keys) + conf_extra));
    (keys_dir, keys, nats)
}

impl CalloutStack {
    /// Generates keys, starts nats-server with the callout config and the server with the keys.
    pub async fn start() -> CalloutStack {
        let (keys_dir, keys, nats) = keys_and_broker();
        let server = KezServer::start_with(&CalloutStack::config(&nats, &keys_dir, &keys)).await;
        CalloutStack {
            server,
            nats,
            keys_dir,
            keys,
        }
    }

    /// Like [`CalloutStack::start`], with the server's config changed by `change` first (e.g.
    /// to turn pinning on).
    pub async fn start_configured(change: impl FnOnce(&mut ServerConfig)) -> CalloutStack {
        let (keys_dir, keys, nats) = keys_and_broker();
        let mut config = CalloutStack::config(&nats, &keys_dir, &keys);
        change(&mut config);
        let server = KezServer::start_with(&config).await;
        CalloutStack {
            server,
            nats,
            keys_dir,
            keys,
        }
    }

    /// Like [`CalloutStack::start`], with pinning on: the pin node keeps its store in
    /// `pin_dir` (which the caller may inspect, e.g. for plaintext).
    pub async fn start_pinning(pin_dir: &std::path::Path) -> CalloutStack {
        CalloutStack::start_configured(|config| {
            // Every node in a test is on loopback.
            config.pin = Some(kez_chat_server::pin::PinConfig {
                dial_private: true,
                ..kez_chat_server::pin::PinConfig::new(pin_dir.to_path_buf())
            });
        })
        .await
    }

    /// The config `run --keys-dir … --callout-issuer …` resolves to for this stack.
    pub fn config(
        nats: &NatsServer,
        keys_dir: &TempDir,
        keys: &nats_conf::PublicKeys,
    ) -> ServerConfig {
        ServerConfig {
            auth: NatsAuth::NkeySeedFile(keys_dir.path().join(nats_conf::SERVER_USER_SEED_FILE)),
            callout: Some(CalloutConfig::new(
                keys_dir.path().to_owned(),
                keys.issuer.clone(),
            )),
            ..ServerConfig::new(&nats.url(), TEST_DOMAIN)
        }
    }

    /// A connection as the server's own `SERVER` user: unrestricted, for test set-up and checks.
    pub async fn server_client(&self) -> Client {
        server_client(&self.nats.url(), self.keys_dir.path()).await
    }

    /// Connects as `key` the way a kez client does: nkey auth with the nonce signed by the KEZ
    /// key, replies under the key's own prefix. Also returns the errors the broker reports on
    /// this connection (permission violations arrive there, not as call results).
    pub async fn connect_as(
        &self,
        key: &Arc<SecretKey>,
    ) -> Result<(Client, mpsc::UnboundedReceiver<ServerError>), async_nats::ConnectError> {
        connect_as(&self.nats.url(), key).await
    }

    /// Registers `name` for a fresh key over the narrow profile, then connects again with the
    /// chat profile: the key and that connection.
    pub async fn registered(&self, name: &str) -> (Arc<SecretKey>, Client) {
        let key = Arc::new(SecretKey::generate());
        let (narrow, _) = self.connect_as(&key).await.expect("a new key connects");
        register(&narrow, &key, name)
            .await
            .unwrap_or_else(|err| panic!("registering {name}: {err:?}"));
        narrow.drain().await.unwrap();
        let (client, _) = self
            .connect_as(&key)
            .await
            .expect("a registered key connects");
        (key, client)
    }
}

/// Connects to `url` as `key` (see [`CalloutStack::connect_as`]).
pub async fn connect_as(
    url: &str,
    key: &Arc<SecretKey>,
) -> Result<(Client, mpsc::UnboundedReceiver<ServerError>), async_nats::ConnectError> {
    let (errors, received) = mpsc::unbounded_channel();
    // The real client's options, so the tests exercise what kez-chat does.
    let client = kez_client::Connection::options_with_events(key, move |event| {
        let errors = errors.clone();
        async move {
            if let async_nats::Event::ServerError(err) = event {
                let _ = errors.send(err);
            }
        }
    })
    .connect(url)
    .await?;
    Ok((client, received))
}

/// nats-server with the kez accounts and auth callout, and the real `kez-chat-server` binary
/// answering it (`run --keys-dir … --callout-issuer …`), whose log records why the callout
/// refused a client.
pub struct CalloutProcessStack {
    /// The kez-chat-server child process; declared first so it stops before the broker.
    pub server: KezServerProcess,
    /// The broker.
    pub nats: NatsServer,
    /// The server's keys; the config references them.
    pub keys_dir: TempDir,
    /// The server's public keys.
    pub keys: nats_conf::PublicKeys,
}

impl CalloutProcessStack {
    /// Generates keys, starts nats-server with the callout config, then the binary with the
    /// keys; returns once the binary serves.
    pub async fn start() -> CalloutProcessStack {
        CalloutProcessStack::start_with_args(&[]).await
    }

    /// Like [`CalloutProcessStack::start`], with `extra` flags for the binary.
    pub async fn start_with_args(extra: &[&str]) -> CalloutProcessStack {
        let (keys_dir, keys, nats) = keys_and_broker();
        let server = KezServerProcess::spawn_with_callout_args(
            &nats.url(),
            keys_dir.path(),
            &keys.issuer,
            extra,
        )
        .await;
        CalloutProcessStack {
            server,
            nats,
            keys_dir,
            keys,
        }
    }

    /// A connection as the server's own `SERVER` user: unrestricted, for test set-up and checks.
    pub async fn server_client(&self) -> Client {
        server_client(&self.nats.url(), self.keys_dir.path()).await
    }

    /// Connects as `key` like a kez client (see [`CalloutStack::connect_as`]).
    pub async fn connect_as(
        &self,
        key: &Arc<SecretKey>,
    ) -> Result<(Client, mpsc::UnboundedReceiver<ServerError>), async_nats::ConnectError> {
        connect_as(&self.nats.url(), key).await
    }

    /// Runs `kez-chat-server admin --nats-url … --keys-dir … --callout-issuer … --domain
    /// kez.test <args>` to completion and returns its output (exit status, stdout, stderr).
    ///
    /// # Panics
    ///
    /// If the binary cannot be run, or does not finish within 30 seconds.
    pub async fn admin(&self, args: &[&str]) -> Output {
        let mut command = kez_chat_server_command();
        command
            .arg("admin")
            .args(args)
            .arg("--nats-url")
            .arg(self.nats.url())
            .arg("--keys-dir")
            .arg(self.keys_dir.path())
            .arg("--callout-issuer")
            .arg(&self.keys.issuer)
            .arg("--domain")
            .arg(TEST_DOMAIN);
        run_to_completion(command).await
    }
}

/// Runs `command` with its output captured, killing it if it has not finished within 30
/// seconds (a server that should have refused to start would otherwise serve forever).
///
/// # Panics
///
/// If the command cannot be started or does not finish in time.
pub async fn run_to_completion(command: std::process::Command) -> Output {
    let mut command = tokio::process::Command::from(command);
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let described = format!("{:?}", command.as_std());
    let output = command.output();
    tokio::time::timeout(std::time::Duration::from_secs(30), output)
        .await
        .unwrap_or_else(|_| panic!("{described} did not finish within 30 s"))
        .unwrap_or_else(|e| panic!("cannot run {described}: {e}"))
}

/// A connection to `nats_url` (one URL or several, comma-separated) as the `SERVER` user whose seed `keygen` wrote into `keys_dir`.
pub async fn server_client(nats_url: &str, keys_dir: &Path) -> Client {
    let seed = std::fs::read_to_string(keys_dir.join(nats_conf::SERVER_USER_SEED_FILE)).unwrap();
    ConnectOptions::with_nkey(seed.trim().to_owned())
        .connect(kez_chat_server::server_list(nats_url))
        .await
        .unwrap()
}

/// Registers `name` (on [`TEST_DOMAIN`]) for `key` over `client`: any connection allowed to
/// call `kez.registry.register`, since the request is signed by `key` itself. Returns the
/// server's answer.
pub async fn register(
    client: &Client,
    key: &SecretKey,
    name: &str,
) -> Result<serde_json::Value, ServiceError> {
    register_on(client, key, name, TEST_DOMAIN).await
}

/// [`register`] on a server for `domain`.
pub async fn register_on(
    client: &Client,
    key: &SecretKey,
    name: &str,
    domain: &str,
) -> Result<serde_json::Value, ServiceError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs();
    let handle = Handle::parse(name, domain).expect("a valid test handle");
    let request = RegistrationRequest::sign(key, &handle, now);
    let answer = call(
        client,
        "kez.registry.register",
        serde_json::to_vec(&request).expect("a request serialises"),
    )
    .await?;
    Ok(serde_json::from_slice(&answer).expect("a JSON answer"))
}

/// What a client tried that the broker may refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A publish (or request): `Permissions Violation for Publish to "<subject>"`.
    Publish,
    /// A subscription: `Permissions Violation for Subscription to "<subject>"`.
    Subscription,
}

/// Waits up to `within` for the broker to report, on the connection whose errors `errors`
/// receives (see [`connect_as`]), a permission violation of `kind` for exactly `subject`.
/// Returns the error text, or what was received instead. Errors about other subjects are
/// skipped (and named in the failure).
pub async fn expect_violation(
    errors: &mut mpsc::UnboundedReceiver<ServerError>,
    kind: Violation,
    subject: &str,
    within: Duration,
) -> Result<String, String> {
    let expected = match kind {
        Violation::Publish => format!("Permissions Violation for Publish to \"{subject}\""),
        Violation::Subscription => {
            format!("Permissions Violation for Subscription to \"{subject}\"")
        }
    };
    let deadline = Instant::now() + within;
    let mut others = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, errors.recv()).await {
            Ok(Some(ServerError::Other(text))) if text.starts_with(&expected) => return Ok(text),
            Ok(Some(other)) => others.push(other.to_string()),
            Ok(None) => return Err(format!("the connection closed; errors before: {others:?}")),
            Err(_) => {
                return Err(format!(
                    "no {expected:?} within {within:?}; other errors: {others:?}"
                ));
            }
        }
    }
}
