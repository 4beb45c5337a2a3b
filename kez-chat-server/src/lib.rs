//! kez-chat-server: the home server's NATS micro-services over JetStream key-value buckets.
//!
//! [`Server::start`] connects, opens the buckets and subscribes the services; [`Server::serve`]
//! answers requests until told to stop, then finishes what is in flight and drains. All state
//! lives in JetStream, so any number of instances can serve one broker (they share each
//! endpoint's queue group).

pub mod config;
pub mod error;
pub mod handlers;
pub mod store;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::service::{self, ServiceExt};
use futures::FutureExt;
use futures::stream::{SelectAll, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::{NatsAuth, ServerConfig};
use crate::error::{ApiError, ERROR_NAME_HEADER};
use crate::handlers::{Context, Route};
use crate::store::Store;

/// Requests handled at once per instance; more wait in the subscription.
const MAX_IN_FLIGHT: usize = 256;
/// A handler that takes longer than this is answered with 503.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts to open the buckets while JetStream is not reachable.
const STORE_RETRY: Duration = Duration::from_secs(1);

type RequestStream = Pin<Box<dyn futures::Stream<Item = (Route, service::Request)> + Send>>;

/// A started server: connected, buckets open, services subscribed.
pub struct Server {
    client: async_nats::Client,
    services: Vec<service::Service>,
    requests: SelectAll<RequestStream>,
    context: Arc<Context>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The NATS credentials could not be read.
    #[error("{0}")]
    Credentials(String),
    /// Connecting or subscribing failed.
    #[error("NATS: {0}")]
    Nats(#[from] async_nats::Error),
}

impl Server {
    /// Connects to NATS, creates or opens the buckets and subscribes every endpoint.
    pub async fn start(config: &ServerConfig) -> Result<Server, StartError> {
        let client = connect(config).await?;
        let js = async_nats::jetstream::new(client.clone());
        let store = loop {
            match Store::open(&js, config.kv_replicas).await {
                Ok(store) => break store,
                Err(err) => {
                    tracing::warn!(error = %err, "JetStream not ready; retrying");
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        };

        let mut services = Vec::new();
        let mut requests = SelectAll::new();
        for spec in handlers::SERVICES {
            let service = client
                .service_builder()
                .description(spec.description)
                .start(spec.name, env!("CARGO_PKG_VERSION"))
                .await?;
            let group = service.group(spec.prefix);
            for &(endpoint, route) in spec.endpoints {
                let stream = group
                    .endpoint(endpoint)
                    .await?
                    .map(move |request| (route, request));
                requests.push(Box::pin(stream) as RequestStream);
            }
            services.push(service);
        }
        client
            .flush()
            .await
            .map_err(|err| StartError::Nats(err.into()))?;
        tracing::info!(domain = %config.domain, "kez-chat-server serving");
        Ok(Server {
            client,
            services,
            requests,
            context: Arc::new(Context {
                store,
                domain: config.domain.clone(),
            }),
        })
    }

    /// Answers requests until `shutdown` completes, then stops taking new ones, answers those
    /// already delivered to this instance and those in flight, and drains the connection.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) {
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut in_flight = JoinSet::new();
        tokio::pin!(shutdown);
        let mut stopping = false;
        loop {
            tokio::select! {
                () = &mut shutdown, if !stopping => {
                    tracing::info!(in_flight = in_flight.len(), "shutting down: no new requests");
                    stopping = true;
                    // Once our own echo comes back, every request the broker routed here before
                    // it is in the request streams: the broker sends them to us in order.
                    if let Err(err) = round_trip(&self.client).await {
                        tracing::warn!(error = %err, "no round trip to the broker before unsubscribing");
                    }
                    // Unsubscribes every endpoint. Each request stream still yields what was
                    // delivered before the unsubscribe, then ends: those are answered too.
                    for service in self.services.drain(..) {
                        if let Err(err) = service.stop().await {
                            tracing::warn!(error = %err, "stopping a service");
                        }
                    }
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
        while in_flight.join_next().await.is_some() {}
        // The answers are queued in the client; make sure they are on the wire before it goes.
        if let Err(err) = self.client.flush().await {
            tracing::warn!(error = %err, "flushing the last answers");
        }
        if let Err(err) = self.client.drain().await {
            tracing::warn!(error = %err, "draining the NATS connection");
        }
        tracing::info!("stopped");
    }
}

/// Waits until a message published now comes back: everything the broker sent this connection
/// before it has then been received (`Client::flush` only writes the socket, it does not wait
/// for the broker).
async fn round_trip(client: &async_nats::Client) -> Result<(), async_nats::Error> {
    let subject = client.new_inbox();
    let mut echo = client.subscribe(subject.clone()).await?;
    client.publish(subject, bytes::Bytes::new()).await?;
    tokio::time::timeout(Duration::from_secs(5), echo.next())
        .await?
        .ok_or("the echo subscription closed")?;
    Ok(())
}

async fn respond(context: &Context, route: Route, request: service::Request) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let work = AssertUnwindSafe(handlers::handle(
        context,
        route,
        &request.message.payload,
        now,
    ));
    let result = match tokio::time::timeout(HANDLER_TIMEOUT, work.catch_unwind()).await {
        Ok(Ok(result)) => result,
        Ok(Err(_panic)) => Err(ApiError::internal("handler panicked")),
        Err(_elapsed) => Err(ApiError::new(
            503,
            "timeout",
            "the request took too long; retry",
        )),
    };
    let mut headers = async_nats::HeaderMap::new();
    let response = match result {
        Ok(body) => Ok(body),
        Err(err) => {
            if err.code >= 500 {
                tracing::error!(?route, code = err.code, error = %err.message, "request failed");
            } else {
                tracing::debug!(?route, code = err.code, error = %err.message, "request refused");
            }
            headers.insert(ERROR_NAME_HEADER, err.name);
            for (name, value) in &err.headers {
                headers.insert(*name, value.as_str());
            }
            let status = match err.code {
                500 => "internal error; the server log has the details".to_owned(),
                // Header values must not hold control characters (CR/LF would break the
                // header block, and async-nats refuses them).
                _ => err.message.replace(|c: char| c.is_control(), " "),
            };
            Err(service::error::Error {
                status,
                code: usize::from(err.code),
            })
        }
    };
    if request.message.reply.is_none() {
        tracing::debug!(?route, "request without a reply subject ignored");
        return;
    }
    if let Err(err) = request.respond_with_headers(response, headers).await {
        tracing::warn!(?route, error = %err, "could not send the answer");
    }
}

async fn connect(config: &ServerConfig) -> Result<async_nats::Client, StartError> {
    let options = async_nats::ConnectOptions::new()
        .name("kez-chat-server")
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS; reconnecting")
                }
                other => tracing::info!(event = %other, "NATS"),
            }
        });
    let options = match &config.auth {
        NatsAuth::None => options,
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.to_string())
        }
        NatsAuth::NkeySeedFile(path) => options.nkey(
            config::read_nkey_seed(path)
                .map_err(StartError::Credentials)?
                .to_string(),
        ),
    };
    options
        .connect(&config.nats_url)
        .await
        .map_err(|err| StartError::Nats(err.into()))
}
