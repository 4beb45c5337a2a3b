//! Home servers that federate: two (or more) stacks on loopback, `a.localhost` and
//! `b.localhost`, each a nats-server with the kez accounts and the auth callout and an
//! in-process kez-chat-server with its HTTP shim (WebFinger) and federation on, finding each
//! other through WebFinger over plain HTTP on loopback (the dev/test allowance), or, with
//! [`Federation::start_tls`], as in production: WebFinger over HTTPS (a TLS proxy in front of
//! each shim) and brokers that speak TLS, trusted through `federation_ca` (the test CA).

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
use crate::callout::register_on;
use crate::kez_server::{KezServer, call};
use crate::tls::TlsProxy;

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
    /// With TLS ([`Federation::start_tls`]): the HTTPS proxy in front of the HTTP shim.
    pub https: Option<TlsProxy>,
}

impl Home {
    /// The broker's URL for clients (`kez-chat --server`): `tls://` when it speaks TLS.
    pub fn url(&self) -> String {
        match self.https {
            Some(_) => format!("tls://127.0.0.1:{}", self.nats.port()),
            None => self.nats.url(),
        }
    }

    /// WebFinger's base URL: the HTTPS proxy's with TLS, else the shim's.
    pub fn webfinger(&self) -> String {
        match &self.https {
            Some(proxy) => proxy.https_url(),
            None => format!("http://{}", self.http),
        }
    }

    /// The options a kez client connects to this broker with ([`kez_client::Connection::options`]),
    /// trusting the test CA when the broker speaks TLS (kez-chat itself trusts the system's
    /// roots, or `SSL_CERT_FILE`, which a test cannot set for itself alone).
    pub fn client_options(&self, key: &Arc<SecretKey>) -> async_nats::ConnectOptions {
        let options = kez_client::Connection::options(key);
        match self.https {
            Some(_) => options
                .add_root_certificates(crate::tls::ca_file())
                .require_tls(true),
            None => options,
        }
    }

    /// Connects as `key` like a kez client ([`Home::client_options`]), with the errors the
    /// broker reports on the connection.
    pub async fn connect_as(
        &self,
        key: &Arc<SecretKey>,
    ) -> Result<
        (
            async_nats::Client,
            tokio::sync::mpsc::UnboundedReceiver<async_nats::ServerError>,
        ),
        async_nats::ConnectError,
    > {
        self.connect_named(key, None).await
    }

    async fn connect_named(
        &self,
        key: &Arc<SecretKey>,
        name: Option<String>,
    ) -> Result<
        (
            async_nats::Client,
            tokio::sync::mpsc::UnboundedReceiver<async_nats::ServerError>,
        ),
        async_nats::ConnectError,
    > {
        let (errors, received) = tokio::sync::mpsc::unbounded_channel();
        let mut options = self.client_options(key).event_callback(move |event| {
            let errors = errors.clone();
            async move {
                if let async_nats::Event::ServerError(err) = event {
                    let _ = errors.send(err);
                }
            }
        });
        if let Some(name) = name {
            options = options.name(name);
        }
        let client = options.connect(self.url()).await?;
        Ok((client, received))
    }

    /// The server key, read from its file.
    pub fn server_key(&self) -> SecretKey {
        kez_keyfile::load(self.keys_dir.path().join(SERVER_KEY_FILE)).expect("the server key file")
    }

    /// A connection as the server's own `SERVER` user (unrestricted), on loopback as the
    /// server's own (plain also when the broker speaks TLS, see [`crate::tls::nats_tls_conf`]).
    pub async fn server_client(&self) -> async_nats::Client {
        crate::callout::server_client(&self.nats.url(), self.keys_dir.path()).await
    }

    /// Registers `name` here for a fresh key (over the narrow profile) and connects again with
    /// the chat profile: the key and that connection.
    pub async fn registered(&self, name: &str) -> (Arc<SecretKey>, async_nats::Client) {
        let key = Arc::new(SecretKey::generate());
        let (narrow, _) = self.connect_as(&key).await.expect("a new key connects");
        register_on(&narrow, &key, name, &self.domain)
            .await
            .unwrap_or_else(|err| panic!("registering {name}: {err:?}"));
        narrow.drain().await.expect("drained");
        let (client, _) = self
            .connect_as(&key)
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
        self.connect_named(
            key,
            Some(kez_proto::federation::peer_connection_name(domain)),
        )
        .await
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
        Federation::start_over(false, domains, change).await
    }

    /// Like [`Federation::start_with`], as in production: each broker speaks TLS (the test
    /// PKI's server certificate) and is advertised to peers as `tls://127.0.0.1:<port>`, each
    /// WebFinger is reached over HTTPS through a [`TlsProxy`] in front of the shim, plain HTTP
    /// is not allowed (`allow_http: false`) and `federation_ca` is the test CA.
    pub async fn start_tls(
        domains: &[&str],
        change: impl Fn(&str, &mut ServerConfig),
    ) -> Federation {
        Federation::start_over(true, domains, change).await
    }

    async fn start_over(
        tls: bool,
        domains: &[&str],
        change: impl Fn(&str, &mut ServerConfig),
    ) -> Federation {
        // Every WebFinger address is known before any server starts: each names all the others.
        let ports: Vec<SocketAddr> = domains.iter().map(|_| reserve_port()).collect();
        let mut proxies = Vec::new();
        for port in &ports {
            proxies.push(match tls {
                true => Some(TlsProxy::start(*port).await),
                false => None,
            });
        }
        let bases: Vec<String> = ports
            .iter()
            .zip(&proxies)
            .map(|(addr, proxy)| match proxy {
                Some(proxy) => proxy.https_url(),
                None => format!("http://{addr}"),
            })
            .collect();
        let mut homes = Vec::new();
        for ((i, domain), https) in domains.iter().enumerate().zip(proxies) {
            let (keys_dir, keys, nats) = match tls {
                true => crate::callout::keys_and_broker_with(&crate::tls::nats_tls_conf()),
                false => crate::callout::keys_and_broker(),
            };
            let peers: BTreeMap<String, String> = domains
                .iter()
                .zip(&bases)
                .filter(|(other, _)| *other != domain)
                .map(|(other, base)| ((*other).to_owned(), base.clone()))
                .collect();
            let advertised = match tls {
                true => format!("tls://127.0.0.1:{}", nats.port()),
                false => nats.url(),
            };
            let mut federation =
                FederationConfig::new(keys_dir.path().join(SERVER_KEY_FILE), advertised.clone());
            federation.peer_webfinger = peers;
            federation.allow_http = !tls;
            federation.ca_file = tls.then(crate::tls::ca_file);
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
                // Users are told the URL peers are: TLS when the broker speaks it.
                public_nats_url: advertised,
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
                https,
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

/// A free loopback port for a server that starts later: the servers' WebFinger addresses must
/// be known before any of them starts, since each names the others. Taken below the kernel's
/// ephemeral range, at random: a port from `bind(0)` lies in that range, where any connection
/// made meanwhile (the tests make many) may take it as its source port, and the server's bind
/// then fails with "Address already in use" (CI saw it). Never the same port twice in one
/// process: tests running at once would otherwise both find a port free before either server
/// binds it (CI saw that too).
pub fn reserve_port() -> SocketAddr {
    use rand_core::RngCore as _;
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let below = ephemeral_from.clamp(RESERVED_PORTS_FROM + 1_000, u16::MAX);
    (0..1_000)
        .map(|_| {
            let span = u32::from(below - RESERVED_PORTS_FROM);
            RESERVED_PORTS_FROM + (rand_core::OsRng.next_u32() % span) as u16
        })
        .find_map(|port| {
            let mut handed_out = HANDED_OUT
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if handed_out.contains(&port) {
                return None;
            }
            let listener = std::net::TcpListener::bind(("127.0.0.1", port)).ok()?;
            let address = listener.local_addr().ok()?;
            handed_out.insert(port);
            Some(address)
        })
        .expect("a free loopback port below the ephemeral range")
}

/// The lowest port [`reserve_port`] takes: above the well-known and most registered services.
const RESERVED_PORTS_FROM: u16 = 20_000;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_below_the_ephemeral_range_and_never_handed_out_twice() {
        let ports: Vec<u16> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..50).map(|_| reserve_port().port()).collect::<Vec<_>>()))
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        assert!(ports.iter().all(|&port| port >= RESERVED_PORTS_FROM));
    }
}
