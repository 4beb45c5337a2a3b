//! kez-chat-server instances for tests, run in-process on the test's tokio runtime, and a typed
//! way to call their endpoints.

use std::net::SocketAddr;
use std::sync::Arc;

use async_nats::Client;
use bytes::Bytes;
use kez_blobs::BlobNode;
use kez_chat_server::Server;
use kez_chat_server::config::ServerConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The domain test servers serve.
pub const TEST_DOMAIN: &str = "kez.test";

/// `name` (any form of PROTOCOL.md §2, e.g. `@bob`) as a handle on [`TEST_DOMAIN`].
///
/// # Panics
///
/// If `name` is not a valid handle.
pub fn test_handle(name: &str) -> kez_core::Handle {
    kez_core::Handle::parse(name, TEST_DOMAIN).unwrap()
}

/// A kez-chat-server serving a [`crate::NatsServer`] from a task of the current runtime.
pub struct KezServer {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    http_addr: Option<SocketAddr>,
    pin_node: Option<Arc<BlobNode>>,
}

impl KezServer {
    /// Starts a server for `nats_url` serving [`TEST_DOMAIN`], without the auth callout.
    pub async fn start(nats_url: &str) -> KezServer {
        KezServer::start_with(&ServerConfig::new(nats_url, TEST_DOMAIN)).await
    }

    /// Like [`KezServer::start`], with the HTTP shim on an OS-chosen loopback port
    /// ([`KezServer::http_addr`]).
    pub async fn start_with_http(nats_url: &str) -> KezServer {
        KezServer::start_with(&ServerConfig {
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..ServerConfig::new(nats_url, TEST_DOMAIN)
        })
        .await
    }

    /// Starts a server with `config`; returns once every endpoint is subscribed.
    pub async fn start_with(config: &ServerConfig) -> KezServer {
        let server = Server::start(config)
            .await
            .unwrap_or_else(|err| panic!("kez-chat-server did not start: {err}"));
        let http_addr = server.http_addr();
        let pin_node = server.pin_node();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        KezServer {
            stop: Some(stop),
            task,
            http_addr,
            pin_node,
        }
    }

    /// The pin node, when the config turned pinning on.
    pub fn pin_node(&self) -> Option<&Arc<BlobNode>> {
        self.pin_node.as_ref()
    }

    /// Where the HTTP shim listens, when the config turned it on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Graceful shutdown: stops taking requests, finishes those in flight, drains.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("server task");
    }

    /// Abrupt stop: the serving task is aborted mid-whatever.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// An error answer from an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    /// `Nats-Service-Error-Code`.
    pub code: u16,
    /// `Kez-Error`: the stable error name.
    pub name: String,
    /// `Nats-Service-Error`: the message for people.
    pub message: String,
    /// All headers of the answer.
    pub headers: async_nats::HeaderMap,
}

/// Sends `body` to `subject` and splits the answer into success body or [`ServiceError`].
///
/// # Panics
/// If no answer arrives (the request times out): an endpoint must always answer.
pub async fn call(
    client: &Client,
    subject: &str,
    body: impl Into<Bytes>,
) -> Result<Bytes, ServiceError> {
    let answer = client
        .request(subject.to_owned(), body.into())
        .await
        .unwrap_or_else(|err| panic!("no answer on {subject}: {err}"));
    let Some(headers) = answer.headers else {
        return Ok(answer.payload);
    };
    let Some(code) = headers.get("Nats-Service-Error-Code") else {
        return Ok(answer.payload);
    };
    Err(ServiceError {
        code: code.as_str().parse().expect("numeric error code"),
        name: headers
            .get("Kez-Error")
            .map(|value| value.as_str().to_owned())
            .unwrap_or_default(),
        message: headers
            .get("Nats-Service-Error")
            .map(|value| value.as_str().to_owned())
            .unwrap_or_default(),
        headers,
    })
}

/// Like [`call`] with a JSON body, expecting success; returns the answer as JSON.
///
/// # Panics
/// On an error answer, naming it.
pub async fn call_ok(client: &Client, subject: &str, body: serde_json::Value) -> serde_json::Value {
    match call(client, subject, serde_json::to_vec(&body).unwrap()).await {
        Ok(answer) => serde_json::from_slice(&answer).expect("JSON answer"),
        Err(err) => panic!("{subject} {body} failed: {err:?}"),
    }
}

/// Makes the server `js` belongs to lie about `name`: its handle record, and its directory
/// entry (PROTOCOL.md §5.7) where clients look it up, now name the key (and chain head) of
/// `impostor`, another registered handle — the stored data a compromised or broken registry
/// would serve. Answers the impostor's key.
pub async fn swap_key(
    js: &async_nats::jetstream::Context,
    name: &str,
    impostor: &str,
) -> Result<kez_core::PublicKey, String> {
    use kez_proto::answer::HandleRecord;
    use kez_proto::directory::{DIRECTORY_BUCKET, Slot};
    let bucket = |name: &'static str| async move {
        js.get_key_value(name)
            .await
            .map_err(|e| format!("no {name} bucket: {e}"))
    };
    let (handles, directory) = (
        bucket("kez_handles").await?,
        bucket(DIRECTORY_BUCKET).await?,
    );
    let record = |name: String| {
        let handles = handles.clone();
        async move {
            let bytes = handles
                .get(&name)
                .await
                .map_err(|e| format!("cannot read the record of {name}: {e}"))?
                .ok_or_else(|| format!("{name} is not registered"))?;
            serde_json::from_slice::<HandleRecord>(&bytes)
                .map_err(|e| format!("the record of {name} is not one: {e}"))
        }
    };
    let mut lie = record(name.to_owned()).await?;
    let key = record(impostor.to_owned()).await?.key;
    lie.key = key;
    handles
        .put(name, serde_json::to_vec(&lie).expect("JSON").into())
        .await
        .map_err(|e| format!("cannot rewrite the record of {name}: {e}"))?;
    let by_key = Slot::key(&key);
    let entry = directory
        .get(by_key.id())
        .await
        .map_err(|e| format!("cannot read the directory: {e}"))?
        .ok_or_else(|| format!("{impostor} has no directory entry"))?;
    let mut profile = by_key
        .open(&entry)
        .map_err(|e| format!("the directory entry of {impostor}: {e}"))?;
    profile.handle = lie.handle;
    let by_handle = Slot::handle(name);
    directory
        .put(by_handle.id(), by_handle.seal(&profile).into())
        .await
        .map_err(|e| format!("cannot rewrite the directory entry of {name}: {e}"))?;
    Ok(key)
}
