//! Home servers that federate: two (or more) stacks on loopback, `a.localhost` and
//! `b.localhost`, each a nats-server with the kez accounts and the auth callout and an
//! in-process kez-chat-server with its HTTP shim (WebFinger) and federation on, finding each
//! other through WebFinger over plain HTTP on loopback (the dev/test allowance).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kez_chat_server::config::{CalloutConfig, FederationConfig, NatsAuth, ServerConfig};
use kez_chat_server::nats_conf;
use kez_core::SecretKey;
use kez_core::envelope::{self, Message};
use kez_proto::mail::{FetchAnswer, FetchRequest};
use tempfile::TempDir;

use crate::NatsServer;
use crate::callout::{connect_as, register_on};
use crate::kez_server::{KezServer, call};

use kez_chat_server::config::FEDERATION_KEY_FILE as SERVER_KEY_FILE;

/// One home server of a federation.
pub struct Home {
    /// The domain it serves, e.g. `a.localhost`.
    pub domain: String,
    /// The kez-chat-server (in-process); `None` while [`Home::stop_server`] has it stopped.
    pub server: Option<KezServer>,
    /// Its broker.
    pub nats: NatsServer,
    /// The server's NATS keys and its server key ([`SERVER_KEY_FILE`]).
    pub keys_dir: TempDir,
    /// The NATS keys' public halves.
    pub keys: nats_conf::PublicKeys,
    /// Where its HTTP shim (WebFinger) listens.
    pub http: SocketAddr,
    /// The config it was started with (for a restart).
    pub config: ServerConfig,
}

impl Home {
    /// The broker's URL, for `kez-chat --server`.
    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// WebFinger's base URL.
    pub fn webfinger(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The server key, read from its file.
    pub fn server_key(&self) -> SecretKey {
        kez_keyfile::load(self.keys_dir.path().join(SERVER_KEY_FILE)).expect("the server key file")
    }

    /// A connection as the server's own `SERVER` user (unrestricted).
    pub async fn server_client(&self) -> async_nats::Client {
        crate::callout::server_client(&self.url(), self.keys_dir.path()).await
    }

    /// Registers `name` here for a fresh key (over the narrow profile) and connects again with
    /// the chat profile: the key and that connection.
    pub async fn registered(&self, name: &str) -> (Arc<SecretKey>, async_nats::Client) {
        let key = Arc::new(SecretKey::generate());
        let (narrow, _) = connect_as(&self.url(), &key)
            .await
            .expect("a new key connects");
        register_on(&narrow, &key, name, &self.domain)
            .await
            .unwrap_or_else(|err| panic!("registering {name}: {err:?}"));
        narrow.drain().await.expect("drained");
        let (client, _) = connect_as(&self.url(), &key)
            .await
            .expect("a registered key connects");
        (key, client)
    }

    /// Connects to this broker as `key`, naming itself the server of `domain` (as a peer
    /// server does, PROTOCOL.md §14.2). Also returns the errors the broker reports on the
    /// connection (permission violations arrive there).
    pub async fn connect_as_peer(
        &self,
        key: &Arc<SecretKey>,
        domain: &str,
    ) -> Result<
        (
            async_nats::Client,
            tokio::sync::mpsc::UnboundedReceiver<async_nats::ServerError>,
        ),
        async_nats::ConnectError,
    > {
        let (errors, received) = tokio::sync::mpsc::unbounded_channel();
        let client = kez_client::Connection::options(key)
            .name(kez_proto::federation::peer_connection_name(domain))
            .event_callback(move |event| {
                let errors = errors.clone();
                async move {
                    if let async_nats::Event::ServerError(err) = event {
                        let _ = errors.send(err);
                    }
                }
            })
            .connect(self.url())
            .await?;
        Ok((client, received))
    }

    /// Stops the kez-chat-server (gracefully); the broker stays.
    pub async fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    /// Starts the kez-chat-server again with the same config.
    pub async fn start_server(&mut self) {
        assert!(self.server.is_none(), "{} already runs", self.domain);
        self.server = Some(KezServer::start_with(&self.config).await);
    }
}

/// Several home servers that know where each other's WebFinger is.
pub struct Federation {
    /// The homes, in the order of the domains given.
    pub homes: Vec<Home>,
}

impl Federation {
    /// `a.localhost` and `b.localhost` with the default federation settings.
    pub async fn start() -> Federation {
        Federation::start_with(&["a.localhost", "b.localhost"], |_, _| {}).await
    }

    /// One home per domain; `change` adjusts each one's config (given its domain; its
    /// `federation` is set, see [`federation_of`]) before it starts.
    pub async fn start_with(
        domains: &[&str],
        change: impl Fn(&str, &mut ServerConfig),
    ) -> Federation {
        // Every WebFinger address is known before any server starts: each names all the others.
        let ports: Vec<SocketAddr> = domains.iter().map(|_| reserve_port()).collect();
        let mut homes = Vec::new();
        for (i, domain) in domains.iter().enumerate() {
            let (keys_dir, keys, nats) = crate::callout::keys_and_broker();
            let peers: BTreeMap<String, String> = domains
                .iter()
                .zip(&ports)
                .filter(|(other, _)| *other != domain)
                .map(|(other, addr)| ((*other).to_owned(), format!("http://{addr}")))
                .collect();
            let mut federation =
                FederationConfig::new(keys_dir.path().join(SERVER_KEY_FILE), nats.url());
            federation.peer_webfinger = peers;
            federation.allow_http = true;
            // Tests wait for retries: a second at most between two attempts.
            federation.retry_max = Duration::from_secs(1);
            let mut config = ServerConfig {
                auth: NatsAuth::NkeySeedFile(
                    keys_dir.path().join(nats_conf::SERVER_USER_SEED_FILE),
                ),
                callout: Some(CalloutConfig::new(
                    keys_dir.path().to_owned(),
                    keys.issuer.clone(),
                )),
                http_listen: Some(ports[i]),
                federation: Some(federation),
                ..ServerConfig::new(&nats.url(), domain)
            };
            change(domain, &mut config);
            let server = KezServer::start_with(&config).await;
            homes.push(Home {
                domain: (*domain).to_owned(),
                server: Some(server),
                nats,
                keys_dir,
                keys,
                http: ports[i],
                config,
            });
        }
        Federation { homes }
    }

    /// The home serving `domain`.
    pub fn home(&self, domain: &str) -> &Home {
        self.homes
            .iter()
            .find(|home| home.domain == domain)
            .unwrap_or_else(|| panic!("no home serves {domain}"))
    }

    /// The home serving `domain`, to stop or restart it.
    pub fn home_mut(&mut self, domain: &str) -> &mut Home {
        self.homes
            .iter_mut()
            .find(|home| home.domain == domain)
            .unwrap_or_else(|| panic!("no home serves {domain}"))
    }
}

/// The first message in `key`'s own inbox (`kez.mail.fetch` over `client`, `key`'s
/// connection), opened with `key`; `None` while it is empty.
pub async fn fetch_one(client: &async_nats::Client, key: &SecretKey) -> Option<Message> {
    let request = FetchRequest {
        after: 0,
        max: 1,
        time: 0,
        origins: false,
    };
    let answer = call(
        client,
        "kez.mail.fetch",
        serde_json::to_vec(&request).expect("encodes"),
    )
    .await
    .expect("a fetch answer");
    let fetched = FetchAnswer::decode(&answer, false).expect("a fetch answer decodes");
    let first = fetched.messages.first()?;
    Some(envelope::open(key, first.envelope).expect("the message opens"))
}

/// The federation settings of a [`Federation`] home's `config`.
pub fn federation_of(config: &mut ServerConfig) -> &mut FederationConfig {
    config
        .federation
        .as_mut()
        .expect("a federation home's config federates")
}

/// A free loopback port, found by binding port 0 and letting it go: the servers' WebFinger
/// addresses must be known before any of them starts, since each names the others.
pub fn reserve_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("its address")
}

/// Waits up to `within` for `check` to answer `Some`, asking every 100 ms.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
