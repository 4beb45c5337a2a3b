//! kez-chat-server: the home server's NATS micro-services over JetStream key-value buckets.
//!
//! [`Server::start`] connects, opens the buckets and subscribes the services; [`Server::serve`]
//! answers requests until told to stop, then finishes what is in flight and drains. All state
//! lives in JetStream, so any number of instances can serve one broker (they share each
//! endpoint's queue group). With `http_listen` set, [`Server::serve`] also runs the HTTP shim
//! ([`http`]: WebFinger, `/healthz`, `/metrics`) until the same shutdown.

pub mod callout;
pub mod config;
pub mod context;
pub mod dev;
pub mod federation;
pub mod handlers;
pub mod http;
pub mod keys;
pub mod kick;
pub mod limits;
pub mod mail;
pub mod metrics;
pub mod migrate;
pub mod nats_conf;
pub mod outbox;
pub mod pin;
pub mod reconnect_window;
pub mod relay;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::service::{self, ServiceExt};
use futures::FutureExt;
use futures::stream::{SelectAll, StreamExt};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::config::{NatsAuth, ServerConfig};
use kez_proto::endpoint::{CALLOUT_SERVICE, PIN_SERVICE, ServiceSpec, USER_SERVICES};
use kez_proto::subjects::{MAIL_STREAM, inbox_subject};
use kez_proto::{Endpoint, ErrorAnswer};

use crate::context::Context;
use crate::store::Store;

/// Requests handled at once per instance; more wait in the subscription.
const MAX_IN_FLIGHT: usize = 256;
/// A handler that takes longer than this is answered with 503.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts to open the buckets while JetStream is not reachable.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Longest pause between attempts to connect to a broker that is not there (they start at
/// 250 ms and double).
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a shutdown waits for the broker at each step that needs it (the echo that says
/// every routed request arrived, unsubscribing, flushing the last answers): a broker that is
/// down must not keep the process alive.
const SHUTDOWN_BROKER_WAIT: Duration = Duration::from_secs(5);

type RequestStream = Pin<Box<dyn futures::Stream<Item = (Endpoint, service::Request)> + Send>>;

/// A started server: connected, buckets open, services subscribed.
pub struct Server {
    /// The `SERVER` connection (services, JetStream); the `AUTH` one follows when the callout is
    /// on. (The `SYS` one, when nats-server knows the system user, is the kick worker's.)
    clients: Vec<async_nats::Client>,
    services: Vec<service::Service>,
    requests: SelectAll<RequestStream>,
    context: Arc<Context>,
    /// The HTTP shim, when `http_listen` is set: its address and its task, which serves from
    /// the moment the listener is bound (503 while starting).
    http: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    /// Stops the HTTP shim (dropping it does too).
    http_stop: watch::Sender<bool>,
    /// How often the pin node's orphaned tags are swept, when pinning is on.
    pin_gc_interval: Option<Duration>,
    /// The tasks working through the system user, when it is connected: ending revoked
    /// devices' connections (kick::spawn) and those whose authorization request went nowhere
    /// (kick::spawn_missed_sweeper), and advertising the reconnect window (reconnect_window).
    kick_workers: Vec<tokio::task::JoinHandle<()>>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The NATS credentials or callout keys could not be read or do not agree.
    #[error("{0}")]
    Credentials(String),
    /// The previous release's inbox could not be moved into `KEZ_MAIL` (nothing was lost).
    #[error("moving the previous release's inbox: {0}")]
    Inbox(String),
    /// The pin node or the pins bucket could not be opened.
    #[error("pinning: {0}")]
    Pin(String),
    /// The pairing relay's bucket could not be opened.
    #[error("pairing relay: {0}")]
    Relay(String),
    /// The key service's bucket could not be opened.
    #[error("key service: {0}")]
    Keys(String),
    /// Connecting or subscribing failed.
    #[error("NATS: {0}")]
    Nats(#[from] async_nats::Error),
    /// The server key, the peers bucket or the outbox could not be opened.
    #[error("federation: {0}")]
    Federation(String),
    /// The HTTP listen address could not be bound.
    #[error("--http-listen {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why not.
        source: std::io::Error,
    },
}

impl Server {
    /// Binds the HTTP listener (when configured) and answers on it at once (503 while
    /// starting, `/healthz` saying why), connects to NATS (waiting for the broker as long as it
    /// takes), creates or opens the buckets and subscribes every endpoint.
    pub async fn start(config: &ServerConfig) -> Result<Server, StartError> {
        for setting in &config.retired_settings {
            tracing::warn!(
                setting,
                "this setting no longer does anything (the inbox stream needs no sweep since KEZ_MAIL replaced KEZ_INBOX); remove it from the configuration"
            );
        }
        // A wrong issuer key would make nats-server refuse every client: fail before connecting.
        let issuer = config.callout.as_ref().map(load_issuer).transpose()?;
        // Likewise a listen address that is taken.
        let phase = watch::Sender::new(http::Phase::Starting(
            format!("connecting to the broker at {}", config.nats_url).into(),
        ));
        let (http_stop, http_stopped) = watch::channel(false);
        let http = match config.http_listen {
            Some(addr) => {
                let shim = http::HttpShim::bind(addr, config.http_limits.clone())
                    .await
                    .map_err(|source| StartError::Http { addr, source })?;
                let bound = shim.local_addr();
                Some((
                    bound,
                    tokio::spawn(shim.serve(phase.subscribe(), http_stopped)),
                ))
            }
            None => None,
        };
        let client = connect(
            &config.nats_url,
            &config.auth,
            "kez-chat-server",
            &phase,
            None,
        )
        .await?;
        let store = open_store_on(
            &client,
            store::StoreSettings {
                replicas: config.kv_replicas,
                inbox_max_bytes: config.inbox_max_bytes,
            },
            &phase,
        )
        .await;
        // The previous release's inbox, if it is still there, before anyone can fetch.
        phase.send_replace(http::Phase::Starting(
            "moving the previous release's inbox (KEZ_INBOX) into KEZ_MAIL".into(),
        ));
        let moved = migrate::move_legacy_inbox(
            &async_nats::jetstream::new(client.clone()),
            MAIL_STREAM,
            |key| inbox_subject(key, key),
        )
        .await
        .map_err(StartError::Inbox)?;
        if moved != migrate::Moved::default() {
            tracing::info!(?moved, "the previous release's inbox is now in KEZ_MAIL");
        }
        let pinning = match &config.pin {
            Some(pin_config) => {
                let js = async_nats::jetstream::new(client.clone());
                let pinning = pin::Pinning::open(pin_config, &js, config.kv_replicas)
                    .await
                    .map_err(StartError::Pin)?;
                tracing::info!(provider = %pinning.provider(), dir = %pin_config.dir.display(), quota_bytes = pinning.quota_bytes(), "pin node serving");
                Some(pinning)
            }
            None => None,
        };

        let relay = relay::Relay::open(
            &async_nats::jetstream::new(client.clone()),
            config.kv_replicas,
            config.pair_relay_tamper,
        )
        .await
        .map_err(|err| StartError::Relay(err.to_string()))?;
        let keys = keys::Keys::open(
            &async_nats::jetstream::new(client.clone()),
            config.kv_replicas,
        )
        .await
        .map_err(|err| StartError::Keys(err.to_string()))?;
        let federation = match &config.federation {
            Some(federation_config) => Some(Arc::new(
                open_federation(&client, config, federation_config).await?,
            )),
            None => None,
        };
        let mut services = Vec::new();
        let mut requests = SelectAll::new();
        // Pinning only where a pin node serves.
        for spec in USER_SERVICES
            .into_iter()
            .filter(|spec| pinning.is_some() || spec.name != PIN_SERVICE.name)
        {
            add_service(&client, spec, &mut services, &mut requests).await?;
        }
        let mut clients = vec![client];
        let system_user = match &config.callout {
            Some(callout_config) => system_user(&callout_config.keys_dir)?,
            None => None,
        };
        // Notified at each (re)connect of the callout's connection: the sweeper then ends
        // the connections whose requests the broker sent to no one meanwhile (kick.rs).
        let callout_connected = Arc::new(tokio::sync::Notify::new());
        let callout = match (&config.callout, issuer) {
            (Some(callout_config), Some(issuer)) => {
                let callout =
                    callout::Callout::new(issuer, store.clone(), callout_config.legacy_proofs)
                        .with_authorization_lifetime(callout_config.authorization_lifetime)
                        .with_federation(federation.clone())
                        .with_connect_limit(limits::Limiter::new(
                            config.limits.unregistered_connects_per_addr,
                            config.limits.max_buckets,
                        ))
                        .with_server_users(
                            system_user
                                .iter()
                                .map(|(_, public)| public.clone())
                                .collect(),
                        );
                let auth = NatsAuth::NkeySeedFile(
                    callout_config.keys_dir.join(nats_conf::AUTH_USER_SEED_FILE),
                );
                let auth_client = connect(
                    &config.nats_url,
                    &auth,
                    "kez-chat-server auth callout",
                    &phase,
                    Some(callout_connected.clone()),
                )
                .await?;
                add_service(&auth_client, &CALLOUT_SERVICE, &mut services, &mut requests).await?;
                tracing::info!(issuer = %callout.issuer_public_key(), "auth callout serving");
                clients.push(auth_client.clone());
                Some((callout, auth_client))
            }
            _ => None,
        };
        for client in &clients {
            client
                .flush()
                .await
                .map_err(|err| StartError::Nats(err.into()))?;
        }
        // With a config older than the system user nats-server sends its connection to the
        // callout, which refuses the server's own key (or, this instance's own callout not
        // serving before the start ends, does not answer: refused as well).
        let (store, kick_workers) = match system_user {
            Some((seed_file, public)) => {
                match connect_system(&config.nats_url, seed_file, &public, &phase).await? {
                    // Not among `clients`: it may publish only CONNZ, STATSZ and KICK requests, and
                    // has nothing to answer or flush at shutdown.
                    Some(system_client) => {
                        let mut workers = Vec::new();
                        if let (Some(_), Some(settings)) = (&callout, &config.callout) {
                            workers.push(reconnect_window::spawn(
                                system_client.clone(),
                                store.clone(),
                                settings.reconnects_per_sec,
                            ));
                        }
                        let kicker = kick::Kicker::new(system_client);
                        if let Some((_, auth_client)) = &callout {
                            workers.push(kick::spawn_missed_sweeper(
                                kicker.clone(),
                                auth_client.clone(),
                                callout_connected,
                            ));
                        }
                        let (revocations, worker) = kick::spawn(kicker);
                        workers.push(worker);
                        (store.with_revocations(revocations), workers)
                    }
                    None => (store, Vec::new()),
                }
            }
            None => (store, Vec::new()),
        };
        let callout = callout.map(|(callout, _)| callout);
        tracing::info!(domain = %config.domain, "kez-chat-server serving");
        let context = Arc::new(Context {
            client: clients[0].clone(),
            metrics: metrics::Metrics::default(),
            callout,
            store,
            domain: config.domain.clone(),
            public_nats_url: config.public_nats_url.clone(),
            pin: pinning,
            limiters: limits::Limiters::new(&config.limits),
            mail: mail::MailState::default(),
            relay,
            keys,
            federation,
        });
        phase.send_replace(http::Phase::Serving(context.clone()));
        Ok(Server {
            clients,
            services,
            requests,
            context,
            pin_gc_interval: config.pin.as_ref().map(|pin| pin.gc_interval),
            http,
            http_stop,
            kick_workers,
        })
    }

    /// Where the HTTP shim listens (the bound address: with port 0 in the config, the port the
    /// OS chose), if it is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(addr, _)| *addr)
    }

    /// The pin node's provider string, when pinning is on.
    pub fn pin_provider(&self) -> Option<String> {
        self.context.pin.as_ref().map(pin::Pinning::provider)
    }

    /// The pin node, when pinning is on (for operators' tools and tests: its store's usage).
    pub fn pin_node(&self) -> Option<Arc<kez_blobs::BlobNode>> {
        self.context.pin.as_ref().map(|pin| pin.node().clone())
    }

    /// Answers requests until `shutdown` completes, then stops taking new ones, answers those
    /// already delivered to this instance and those in flight, and drains the connection.
    ///
    /// The HTTP shim, if on, stops accepting at the same moment; its open connections finish
    /// their request (within the grace period) before the NATS connection is drained. Each step
    /// that needs the broker waits for it at most [`SHUTDOWN_BROKER_WAIT`]: with the broker down,
    /// the server still stops, within about half a minute.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) {
        let (stop_tasks, tasks_stopped) = watch::channel(false);
        let http_task = self.http.take().map(|(_, task)| task);
        let pin_sweep_task = self.pin_gc_interval.map(|interval| {
            tokio::spawn(sweep_pins(
                self.context.clone(),
                interval,
                tasks_stopped.clone(),
            ))
        });
        let outbox_task = self
            .context
            .federation
            .is_some()
            .then(|| tokio::spawn(outbox::run(self.context.clone(), tasks_stopped.clone())));
        let blocks_task = self.context.federation.as_ref().map(|federation| {
            tokio::spawn(federation::end_blocked_connections(
                federation.pins.clone(),
                self.context.store.clone(),
                tasks_stopped,
            ))
        });
        let backfill_task = tokio::spawn(backfill_directory(self.context.store.clone()));
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut in_flight = JoinSet::new();
        tokio::pin!(shutdown);
        let mut stopping = false;
        // Once stopping: when the request streams must have ended (they end when the broker
        // confirms the unsubscribes, which a broker that is down never does).
        let streams_end = tokio::time::sleep(Duration::MAX);
        tokio::pin!(streams_end);
        loop {
            tokio::select! {
                () = &mut shutdown, if !stopping => {
                    tracing::info!(in_flight = in_flight.len(), "shutting down: no new requests");
                    stopping = true;
                    let _ = stop_tasks.send(true);
                    let _ = self.http_stop.send(true);
                    if !broker_connected(&self.clients) {
                        tracing::warn!("the broker is unreachable; stopping without it (requests it routed here and did not get answered are retried by their clients)");
                        break;
                    }
                    let services = std::mem::take(&mut self.services);
                    let unsubscribed = tokio::time::timeout(
                        SHUTDOWN_BROKER_WAIT,
                        Box::pin(unsubscribe(&self.clients, services)),
                    )
                    .await;
                    if unsubscribed.is_err() {
                        tracing::warn!(wait = ?SHUTDOWN_BROKER_WAIT, "the broker does not answer; stopping without it (requests it routed here meanwhile are retried by their clients)");
                        break;
                    }
                    streams_end
                        .as_mut()
                        .reset(tokio::time::Instant::now() + SHUTDOWN_BROKER_WAIT);
                }
                () = &mut streams_end, if stopping => {
                    tracing::warn!(wait = ?SHUTDOWN_BROKER_WAIT, "the broker did not end the subscriptions; stopping without it");
                    break;
                }
                Some(finished) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(err) = finished {
                        tracing::error!(error = %err, "request task failed");
                    }
                }
                next = self.requests.next() => {
                    let Some((route, request)) = next else { break };
                    let Ok(permit) = permits.clone().acquire_owned().await else { break };
                    let context = self.context.clone();
                    in_flight.spawn(async move {
                        respond(&context, route, request).await;
                        drop(permit);
                    });
                }
            }
        }
        // Handlers are bounded by their timeout; their answers wait for the broker no longer.
        let answered = tokio::time::timeout(
            HANDLER_TIMEOUT + SHUTDOWN_BROKER_WAIT,
            Box::pin(async { while in_flight.join_next().await.is_some() {} }),
        )
        .await;
        if answered.is_err() {
            tracing::warn!(
                left = in_flight.len(),
                "requests still in flight at shutdown; dropped"
            );
            in_flight.shutdown().await;
        }
        let _ = stop_tasks.send(true);
        let _ = self.http_stop.send(true);
        // No request is left to revoke anything; kicks under way end with the process (the
        // connections they were after end with their authorization).
        for worker in self.kick_workers.drain(..) {
            worker.abort();
        }
        if let Some(task) = http_task
            && let Err(err) = task.await
        {
            tracing::error!(error = %err, "HTTP shim task failed");
        }
        if let Some(task) = pin_sweep_task {
            let _ = task.await;
        }
        if let Some(task) = outbox_task {
            let _ = task.await;
        }
        if let Some(task) = blocks_task {
            let _ = task.await;
        }
        // Idempotent: another start (of this or another instance) finishes it.
        backfill_task.abort();
        // The answers are queued in the clients; make sure they are on the wire before they go.
        if broker_connected(&self.clients) {
            let drained =
                tokio::time::timeout(SHUTDOWN_BROKER_WAIT, Box::pin(drain(&self.clients))).await;
            if drained.is_err() {
                tracing::warn!("the broker does not answer; the last answers were not flushed");
            }
        }
        // Every task holding the context has ended: the pin node can be shut down cleanly.
        if let Ok(context) = Arc::try_unwrap(self.context)
            && let Some(pinning) = context.pin
            && let Ok(node) = Arc::try_unwrap(pinning.into_node())
            && let Err(err) = node.shutdown().await
        {
            tracing::warn!(error = %err, "shutting the pin node down");
        }
        tracing::info!("stopped");
    }
}

/// The server key (created when missing), the peers bucket and the outbox.
async fn open_federation(
    client: &async_nats::Client,
    config: &ServerConfig,
    federation_config: &config::FederationConfig,
) -> Result<federation::Federation, StartError> {
    let key = federation::load_or_create_key(&federation_config.key_file)
        .map_err(StartError::Federation)?;
    let js = async_nats::jetstream::new(client.clone());
    let pins = federation::Pins::open(&js, config.kv_replicas)
        .await
        .map_err(|err| {
            StartError::Federation(format!("bucket {}: {err}", federation::PEERS_BUCKET))
        })?;
    outbox::open(&js, config.kv_replicas, federation_config)
        .await
        .map_err(|err| {
            StartError::Federation(format!("stream {}: {err}", outbox::OUTBOX_STREAM))
        })?;
    tracing::info!(key = %key.public_key(), url = %federation_config.nats_url, "federating");
    federation::Federation::new(config.domain.clone(), key, federation_config.clone(), pins)
        .map_err(StartError::Federation)
}

/// Connects like `run` does and opens the peers bucket: for `admin peer…`.
pub async fn open_pins(config: &ServerConfig) -> Result<federation::Pins, StartError> {
    let (client, _) = admin_connection(config).await?;
    let js = async_nats::jetstream::new(client);
    federation::Pins::open(&js, None).await.map_err(|err| {
        StartError::Federation(format!("bucket {}: {err}", federation::PEERS_BUCKET))
    })
}

/// Writes the directory entries a store of an earlier release lacks
/// ([`Store::backfill_directory`]), trying again while JetStream fails.
async fn backfill_directory(store: Store) {
    let mut pause = Duration::from_secs(1);
    loop {
        match store.backfill_directory().await {
            Ok(0) => return,
            Ok(handles) => {
                tracing::info!(
                    handles,
                    "directory: wrote the entries of the handles registered before it"
                );
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err.message, "directory backfill failed; trying again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Drops the pin node's orphaned tags every `interval` until `stopped` turns true.
async fn sweep_pins(context: Arc<Context>, interval: Duration, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        if let Some(pinning) = &context.pin {
            match pinning.sweep().await {
                Ok(0) => {}
                Ok(dropped) => tracing::info!(dropped, "dropped pin tags no pin names"),
                Err(err) => tracing::warn!(error = %err, "sweeping the pin node's tags"),
            }
        }
    }
}

/// Waits until a message published now comes back: everything the broker sent this connection
/// before it has then been received (`Client::flush` only writes the socket, it does not wait
/// for the broker).
/// Makes sure every request the broker routed here before now has arrived, then unsubscribes
/// every endpoint. Each request stream still yields what was delivered before the unsubscribe,
/// then ends: those are answered too.
async fn unsubscribe(clients: &[async_nats::Client], services: Vec<service::Service>) {
    // Once our own echo comes back, every request the broker routed here before it is in the
    // request streams: the broker sends them in order.
    for client in clients {
        if let Err(err) = round_trip(client).await {
            tracing::warn!(error = %err, "no round trip to the broker before unsubscribing");
        }
    }
    for service in services {
        if let Err(err) = service.stop().await {
            tracing::warn!(error = %err, "stopping a service");
        }
    }
}

/// Whether every client is connected to the broker now.
fn broker_connected(clients: &[async_nats::Client]) -> bool {
    clients
        .iter()
        .all(|client| client.connection_state() == async_nats::connection::State::Connected)
}

/// Flushes and drains every client.
async fn drain(clients: &[async_nats::Client]) {
    for client in clients {
        if let Err(err) = client.flush().await {
            tracing::warn!(error = %err, "flushing the last answers");
        }
        if let Err(err) = client.drain().await {
            tracing::warn!(error = %err, "draining the NATS connection");
        }
    }
}

async fn round_trip(client: &async_nats::Client) -> Result<(), async_nats::Error> {
    let subject = client.new_inbox();
    let mut echo = client.subscribe(subject.clone()).await?;
    client.publish(subject, bytes::Bytes::new()).await?;
    tokio::time::timeout(Duration::from_secs(5), echo.next())
        .await?
        .ok_or("the echo subscription closed")?;
    Ok(())
}

/// Whether an answer may go to `reply`. The server's connection may publish anywhere in its
/// account, so an answer to a reply subject the client chose (say `$JS.API.STREAM.DELETE.…` or a
/// `$KV.…` key) would be the client acting with the server's rights. Clients reach the services
/// through an import, whose replies the broker rewrites to `_R_.…`; a client on a trusted broker
/// without accounts uses `_INBOX.…`. nats-server sends callout requests with `$SYS._INBOX.…`.
fn reply_is_safe(route: Endpoint, reply: Option<&str>) -> bool {
    match (route, reply) {
        (_, None) => false,
        (Endpoint::Authorize, Some(reply)) => reply.starts_with("$SYS._INBOX."),
        (_, Some(reply)) => reply.starts_with("_R_.") || reply.starts_with("_INBOX."),
    }
}

async fn respond(context: &Context, route: Endpoint, request: service::Request) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let started = std::time::Instant::now();
    // Only with the callout are users in their own account, where nats-server writes this
    // header itself; on a trusted broker anyone could send one.
    let caller = match (&context.callout, &request.message.headers) {
        (Some(_), Some(headers)) => headers
            .get(limits::REQUEST_INFO_HEADER)
            .map(|info| limits::Caller::from_request_info(info.as_str(), nats_conf::APP_ACCOUNT))
            .unwrap_or_default(),
        _ => limits::Caller::default(),
    };
    let work = AssertUnwindSafe(handlers::handle(
        context,
        route,
        &request.message.payload,
        &caller,
        now,
    ));
    let limit = match (route, &context.pin) {
        (Endpoint::PinAdd, Some(pinning)) => pinning.add_timeout(),
        _ => HANDLER_TIMEOUT,
    };
    let result = match tokio::time::timeout(limit, work.catch_unwind()).await {
        Ok(Ok(result)) => result,
        Ok(Err(_panic)) => Err(ErrorAnswer::internal("handler panicked")),
        Err(_elapsed) => Err(ErrorAnswer::new(
            503,
            "timeout",
            "the request took too long; retry",
        )),
    };
    let mut headers = async_nats::HeaderMap::new();
    context.metrics.record_request(
        route,
        started.elapsed(),
        result.as_ref().err().map(|err| err.code),
    );
    let response = match result {
        Ok(body) => Ok(body),
        Err(err) => {
            if err.code >= 500 {
                tracing::error!(?route, code = err.code, error = %err.message, "request failed");
            } else {
                tracing::debug!(?route, code = err.code, error = %err.message, "request refused");
            }
            for (name, value) in err.kez_headers() {
                headers.insert(name, value.as_str());
            }
            Err(service::error::Error {
                status: err.status(),
                code: usize::from(err.code),
            })
        }
    };
    if !reply_is_safe(route, request.message.reply.as_deref()) {
        tracing::debug!(?route, reply = ?request.message.reply, "request with no usable reply subject ignored");
        return;
    }
    if let Err(err) = request.respond_with_headers(response, headers).await {
        tracing::warn!(?route, error = %err, "could not send the answer");
    }
}

/// Connects like `run` does and opens the buckets, never changing their replicas: for operator
/// commands.
pub async fn open_store(config: &ServerConfig) -> Result<Store, StartError> {
    let (client, phase) = admin_connection(config).await?;
    Ok(open_store_on(&client, store::StoreSettings::default(), &phase).await)
}

/// An operator command's connection, made like `run`'s, and the phase it reports to (nobody
/// asks an operator command's health: what it waits for goes to the log only).
async fn admin_connection(
    config: &ServerConfig,
) -> Result<(async_nats::Client, watch::Sender<http::Phase>), StartError> {
    let phase = watch::Sender::new(http::Phase::Starting("".into()));
    let client = connect(
        &config.nats_url,
        &config.auth,
        "kez-chat-server admin",
        &phase,
        None,
    )
    .await?;
    Ok((client, phase))
}

/// Opens the buckets, waiting for JetStream as long as it takes.
async fn open_store_on(
    client: &async_nats::Client,
    settings: store::StoreSettings,
    phase: &watch::Sender<http::Phase>,
) -> Store {
    let js = async_nats::jetstream::new(client.clone());
    phase.send_replace(http::Phase::Starting(
        "opening the JetStream key-value buckets".into(),
    ));
    loop {
        match Box::pin(Store::open(&js, settings)).await {
            Ok(store) => return store,
            Err(err) => {
                tracing::warn!(error = %err, "JetStream not ready; retrying");
                phase.send_replace(http::Phase::Starting(
                    format!("JetStream not ready: {err}").into(),
                ));
                tokio::time::sleep(STORE_RETRY).await;
            }
        }
    }
}

async fn add_service(
    client: &async_nats::Client,
    spec: &ServiceSpec,
    services: &mut Vec<service::Service>,
    requests: &mut SelectAll<RequestStream>,
) -> Result<(), StartError> {
    let service = client
        .service_builder()
        .description(spec.description)
        .start(spec.name, env!("CARGO_PKG_VERSION"))
        .await?;
    for &route in spec.endpoints {
        let name = spec.endpoint_name(route);
        let endpoint = match spec.prefix {
            "" => service.endpoint(name).await?,
            prefix => service.group(prefix).endpoint(name).await?,
        };
        requests.push(Box::pin(endpoint.map(move |request| (route, request))) as RequestStream);
    }
    services.push(service);
    Ok(())
}

/// The callout issuer key, refused unless it is the one nats-server was configured with.
fn load_issuer(config: &config::CalloutConfig) -> Result<nkeys::KeyPair, StartError> {
    let path = config.keys_dir.join(nats_conf::ISSUER_SEED_FILE);
    let seed = nats_conf::read_nkey_seed(&path).map_err(StartError::Credentials)?;
    let issuer = nkeys::KeyPair::from_seed(&seed).map_err(|err| {
        StartError::Credentials(format!("{}: not an nkey seed: {err}", path.display()))
    })?;
    if !issuer.public_key().starts_with('A') {
        return Err(StartError::Credentials(format!(
            "{} must hold an account seed (SA...); run `kez-chat-server keygen`",
            path.display()
        )));
    }
    if issuer.public_key() != config.issuer {
        return Err(StartError::Credentials(format!(
            "the issuer seed in {} is for {}, but --callout-issuer says {}; nats-server would refuse every authorization. Put the seed's public key in nats-server's auth_callout.issuer and --callout-issuer",
            path.display(),
            issuer.public_key(),
            config.issuer
        )));
    }
    Ok(issuer)
}

/// The system user's seed file in `keys_dir` and its public key, the seed created first if it
/// is missing (a deployment older than the key). `None`, after one warning, when it cannot be
/// created (a read-only keys directory): the server serves without ending revoked devices'
/// connections.
fn system_user(keys_dir: &std::path::Path) -> Result<Option<(PathBuf, String)>, StartError> {
    let seed_file = keys_dir.join(nats_conf::SYSTEM_USER_SEED_FILE);
    match nats_conf::add_system_user(keys_dir) {
        Ok(true) => {
            tracing::info!(seed_file = %seed_file.display(), "created the server's system user key (new in this release)");
        }
        Ok(false) => {}
        Err(err) => {
            tracing::warn!(
                "{err}. Without the system user a revoked device's open connections last until their authorization expires (at most an hour); new connections and requests are refused either way. Run `kez-chat-server keygen --keys-dir {}` (it adds only that key), re-render nats-server's config with `kez-chat-server nats-conf` and reload nats-server (deploy/DEPLOY.md, Upgrades), then restart kez-chat-server",
                keys_dir.display()
            );
            return Ok(None);
        }
    }
    let seed = nats_conf::read_nkey_seed(&seed_file).map_err(StartError::Credentials)?;
    let public = nkeys::KeyPair::from_seed(&seed)
        .map_err(|err| {
            StartError::Credentials(format!("{}: not an nkey seed: {err}", seed_file.display()))
        })?
        .public_key();
    Ok(Some((seed_file, public)))
}

/// Connects as the system user and checks that nats-server answers it CONNZ. `None`, after one
/// warning, when the broker refuses it or does not answer: its config predates the key, and the
/// server serves as before without ending revoked devices' connections.
async fn connect_system(
    url: &str,
    seed_file: PathBuf,
    public: &str,
    phase: &watch::Sender<http::Phase>,
) -> Result<Option<async_nats::Client>, StartError> {
    let auth = NatsAuth::NkeySeedFile(seed_file);
    let refused = match connect(url, &auth, "kez-chat-server revocations", phase, None).await {
        // Connected is not enough: only an answer to CONNZ shows it is in the system account.
        Ok(client) => match kick::Kicker::new(client.clone()).check().await {
            Ok(()) => return Ok(Some(client)),
            Err(err) => err,
        },
        // The seed was read before: a credentials error here is the broker's refusal.
        Err(StartError::Credentials(err)) => err,
        Err(err) => return Err(err),
    };
    tracing::warn!(
        system_user = public,
        "nats-server's config lacks the server's system user ({refused}). Serving without it: a revoked device's open connections last until their authorization expires (at most an hour) instead of ending at once; new connections and requests are refused either way. Re-render the config with `kez-chat-server nats-conf --keys-dir DIR` (or copy the generated part of deploy/nats/nats-server.conf, or nats/cluster/kez-accounts.conf on every node), reload nats-server (`systemctl reload nats-server`), then restart kez-chat-server (deploy/DEPLOY.md, Upgrades)"
    );
    Ok(None)
}

/// The longest wait between two reconnect attempts of the server's own connections.
const SERVER_RECONNECT_MAX_DELAY: Duration = Duration::from_millis(10);

/// How long the server's own connection waits before reconnect attempt `attempts`: at most
/// [`SERVER_RECONNECT_MAX_DELAY`], where async-nats' default doubles up to 4 s. The callout
/// answers every client's connect, so after a broker restart its `AUTH` connection must be
/// back before the clients: one let in while it still waits out a backoff waits nats-server's
/// whole 2 s authorization timeout and is refused, and then backs off itself (BENCHMARKS.md,
/// storm). A few connections per instance asking every 10 ms are no load on a broker.
fn server_reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        Duration::ZERO
    } else {
        SERVER_RECONNECT_MAX_DELAY
    }
}

/// Connects to the broker at `url`, waiting as long as it takes: every failed attempt's cause
/// (a refused connection, an unknown certificate authority, ...) is logged at WARN when it
/// changes and is what `/healthz` says meanwhile. Refused credentials end the wait: they are
/// the operator's to fix. Once connected, the client reconnects on its own, notifying
/// `connected` (if given) at every connect and reconnect, before it sends its subscriptions
/// again.
async fn connect(
    url: &str,
    auth: &NatsAuth,
    name: &str,
    phase: &watch::Sender<http::Phase>,
    connected: Option<Arc<tokio::sync::Notify>>,
) -> Result<async_nats::Client, StartError> {
    let mut pause = Duration::from_millis(250);
    let mut last_reason = String::new();
    loop {
        let connected = connected.clone();
        let options = async_nats::ConnectOptions::new()
            .name(name)
            .reconnect_delay_callback(server_reconnect_delay)
            .event_callback(move |event| {
                let connected = connected.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            if let Some(connected) = connected {
                                connected.notify_one();
                            }
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("disconnected from NATS; reconnecting")
                        }
                        other => tracing::info!(event = %other, "NATS"),
                    }
                }
            });
        let options = match auth {
            NatsAuth::None => options,
            NatsAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.to_string())
            }
            NatsAuth::NkeySeedFile(path) => options.nkey(
                nats_conf::read_nkey_seed(path)
                    .map_err(StartError::Credentials)?
                    .to_string(),
            ),
        };
        let err = match options.connect(server_list(url)).await {
            Ok(client) => return Ok(client),
            Err(err) => err,
        };
        if matches!(
            err.kind(),
            async_nats::ConnectErrorKind::AuthorizationViolation
                | async_nats::ConnectErrorKind::Authentication
        ) {
            return Err(StartError::Credentials(format!(
                "the broker at {url} refused the credentials of {name:?} ({}): check them against nats-server's configuration",
                error_chain(&err)
            )));
        }
        let reason = format!(
            "cannot connect to the broker at {url}: {}",
            error_chain(&err)
        );
        if reason != last_reason {
            tracing::warn!("{reason}; retrying");
            last_reason.clone_from(&reason);
        }
        phase.send_replace(http::Phase::Starting(reason.into()));
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(CONNECT_RETRY_MAX);
    }
}

/// `err` and every cause under it that its own text does not already name.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The servers of a `--nats-url`: one URL, or several separated by commas (the nodes of a
/// cluster). async-nats parses a single string as one URL, so the list is split here; the
/// connection then fails over between them (a cluster with `no_advertise` tells a client of no
/// other node).
pub fn server_list(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_nats_url_may_list_several_servers() {
        assert_eq!(
            super::server_list("nats://10.0.0.1:4222, nats://10.0.0.2:4222,"),
            ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
        );
        assert_eq!(
            super::server_list("tls://chat.kez.lat"),
            ["tls://chat.kez.lat"]
        );
    }
}
