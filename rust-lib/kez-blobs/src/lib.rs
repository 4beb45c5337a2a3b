//! The iroh side of kez-chat: one iroh endpoint plus an iroh-blobs file store that serves
//! blobs to peers and fetches blobs from them.
//!
//! The `kez-chat` client runs a [`BlobNode`] to share and download files (it serves while
//! `listen` runs); `kez-chat-server` may run one as an opt-in pin node with garbage collection
//! ([`NodeConfig::gc_interval`]). This crate knows nothing about encryption: callers hand it
//! ciphertext and decrypt what [`BlobNode::reader`] returns. Every blob is addressed by its
//! BLAKE3 [`Hash`], and iroh verifies every downloaded chunk against it.
//!
//! # Directory layout
//!
//! [`BlobNode::open`] uses a directory it creates with mode `0700` if missing:
//!
//! - `iroh.key`: the endpoint's secret key, 32 raw bytes, mode `0600`. It is created atomically
//!   on first use and refused when the group or others can access it. It fixes the node's
//!   [`EndpointId`], so a provider string stays valid across restarts (as long as the ports do).
//! - `blobs/`: the iroh-blobs file store (`blobs.db`, a redb database, and data files).
//!
//! # Provider strings
//!
//! A node's address travels as a provider string, whose grammar is kez-core's
//! ([`kez_core::provider`]): [`BlobNode::provider`] writes one (IP addresses in ascending order,
//! then relay URLs, so one address always has one text) and [`parse_provider`] reads one into
//! the address iroh dials. Example:
//! `iroh:ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6;ip=127.0.0.1:41771`.
//!
//! # Network
//!
//! The endpoint uses iroh's `Minimal` preset: no n0 DNS or pkarr address lookup, no port
//! mapping (UPnP/NAT-PMP), no HTTPS or captive-portal probes, and no relays unless
//! [`NodeConfig::relay`] names one. Peers are reached only at the addresses in their provider
//! strings. Tests bind `127.0.0.1:0` and never leave the machine.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use iroh::endpoint::{PortmapperConfig, presets};
use iroh::protocol::Router;
use iroh::{Endpoint, NetReportConfig, RelayMode};
use iroh_blobs::api::blobs::{AddPathOptions, ImportMode};
use iroh_blobs::api::proto::BlobStatus;
use iroh_blobs::api::remote::GetProgressItem;
use iroh_blobs::provider::events::{
    ConnectMode, EventMask, EventSender, ProviderMessage, RequestMode, RequestUpdate,
};
use iroh_blobs::store::GcConfig;
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::store::fs::options::Options;
use iroh_blobs::{BlobFormat, BlobsProtocol, HashAndFormat};

mod follow;
mod keyfile;
mod provider;
mod serving;

pub use follow::{FollowReader, Following};
pub use iroh::{EndpointAddr, EndpointId, RelayUrl};
pub use iroh_blobs::Hash;
pub use iroh_blobs::api::blobs::BlobReader;
pub use provider::{dialable, is_public_unicast, parse_provider};
pub use serving::{ServeEvent, Served};

/// Name of the endpoint key file inside the node directory.
pub const KEY_FILE_NAME: &str = "iroh.key";

/// Name of the blob store directory inside the node directory.
pub const STORE_DIR_NAME: &str = "blobs";

/// Longest tag name accepted, in bytes.
pub const MAX_TAG_LEN: usize = 256;

/// What went wrong. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a file operation.
    #[error("could not {action} {path}: {error}")]
    Io {
        /// What was being done, e.g. "create".
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        error: io::Error,
    },
    /// The endpoint key file exists but is not acceptable; it was not used.
    #[error("refusing the iroh key file {path}: {reason}")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// A provider string does not follow the format in the crate docs.
    #[error("invalid provider string: {reason}")]
    BadProvider {
        /// What is wrong.
        reason: String,
    },
    /// A tag name is empty or longer than [`MAX_TAG_LEN`].
    #[error("invalid tag name: must be 1 to {MAX_TAG_LEN} bytes")]
    BadTag,
    /// The iroh endpoint could not be set up.
    #[error("could not start the iroh endpoint: {0}")]
    Endpoint(String),
    /// The blob store failed.
    #[error("blob store: could not {action}: {detail}")]
    Store {
        /// What was being done.
        action: &'static str,
        /// The store's error.
        detail: String,
    },
    /// The blob is not (completely) in the local store.
    #[error("blob {0} is not complete in the local store")]
    NotComplete(Hash),
    /// `download` was given no provider to try.
    #[error("no provider to download blob {0} from")]
    NoProviders(Hash),
    /// No provider delivered the complete blob. Each attempt is listed in order.
    #[error("could not download blob {hash}: {}", attempts_text(.attempts))]
    DownloadFailed {
        /// The blob.
        hash: Hash,
        /// Every provider tried, with what went wrong there.
        attempts: Vec<Attempt>,
    },
    /// The blob is larger than the caller expected: its transfer stopped at the first sign of
    /// it, and what arrived is not kept (a blob's size is its hash's: no provider has another).
    #[error("blob {hash} is larger than the {max} bytes expected; it was not downloaded")]
    TooLarge {
        /// The blob.
        hash: Hash,
        /// The most the caller accepted.
        max: u64,
    },
}

/// One failed attempt to download from one provider.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The provider tried.
    pub provider: EndpointId,
    /// What went wrong.
    pub error: String,
}

fn attempts_text(attempts: &[Attempt]) -> String {
    attempts
        .iter()
        .map(|a| format!("{}: {}", a.provider, a.error))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn store_err<E: std::fmt::Display>(action: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Store {
        action,
        detail: e.to_string(),
    }
}

/// How a [`BlobNode`] runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Local UDP address to bind. Default `127.0.0.1:0` (loopback, any port). A node others
    /// should reach binds a routable address or `0.0.0.0:<port>`; the addresses it advertises
    /// are those of the bound sockets.
    pub bind: SocketAddr,
    /// Relay server to use, or `None` for no relays at all (the default: peers must reach each
    /// other directly). Production deployments may set a self-hosted iroh relay here; this
    /// crate never uses n0's public relays.
    pub relay: Option<RelayUrl>,
    /// How long one connection attempt to a provider may take. Default 10 s.
    pub connect_timeout: Duration,
    /// How long a download from one provider may go without receiving anything before that
    /// provider is given up. Default 30 s.
    pub stall_timeout: Duration,
    /// Run iroh-blobs garbage collection at this interval, deleting every blob that no tag
    /// (named or temporary) protects. `None` (the default): only when the node opens and when
    /// [`BlobNode::collect_garbage`] asks, what the client uses. A pin node sets it so that
    /// data whose tag was deleted is reclaimed while it runs.
    pub gc_interval: Option<Duration>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            relay: None,
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            gc_interval: None,
        }
    }
}

/// How much of a blob the local store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobState {
    /// Nothing.
    Missing,
    /// Part of it, e.g. after an interrupted download.
    Partial {
        /// The blob's size if already known.
        size: Option<u64>,
    },
    /// All of it, verified.
    Complete {
        /// The blob's size in bytes.
        size: u64,
    },
}

/// Progress of a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the blob held locally: received so far plus what was already there.
    pub done: u64,
    /// The blob's size, once known.
    pub total: Option<u64>,
}

/// Outcome of a successful download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadStats {
    /// Payload bytes received over the network by this call (from all providers tried). Less
    /// than `total` when part of the blob was already stored, e.g. by an interrupted download.
    pub bytes_transferred: u64,
    /// The blob's size in bytes.
    pub total: u64,
    /// The provider that completed the blob, or `None` if it was already complete locally.
    pub provider: Option<EndpointId>,
}

/// A named tag and the blob it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagEntry {
    /// The tag's name (lossily decoded if it is not UTF-8).
    pub name: String,
    /// The blob.
    pub hash: Hash,
}

/// What the store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Number of complete blobs.
    pub complete_blobs: u64,
    /// Total size of the complete blobs in bytes (payload, not counting store overhead).
    pub complete_bytes: u64,
    /// Number of partial blobs.
    pub partial_blobs: u64,
}

/// A complete blob read with blocking reads, from [`BlobNode::blocking_reader`]: for a blocking
/// thread, never the async runtime.
#[derive(Debug)]
pub struct BlockingBlobReader(Source);

#[derive(Debug)]
enum Source {
    /// The store's data file, cut at the blob's size.
    File(io::Take<std::fs::File>),
    /// A small blob kept inline in the store's database.
    Memory(io::Cursor<Bytes>),
}

impl io::Read for BlockingBlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            Source::File(file) => file.read(buf),
            Source::Memory(bytes) => bytes.read(buf),
        }
    }
}

/// An iroh endpoint with a blob store, serving the iroh-blobs protocol until shut down.
#[derive(Debug)]
pub struct BlobNode {
    router: Router,
    store: FsStore,
    /// Where the store keeps a blob's data file, and which blobs it keeps inline instead.
    layout: Options,
    config: NodeConfig,
    collector: std::sync::Arc<Collector>,
    /// The only strong sender of what is served (the handler holds a weak one), so that
    /// taking it at shutdown closes the watchers' channels.
    served: std::sync::Mutex<Option<tokio::sync::broadcast::Sender<Served>>>,
}

/// Asks `collector` for a collection of `store` and waits until it has run.
async fn collect(collector: &Collector, store: &FsStore) -> Result<()> {
    // A collection lists blobs from the last committed state, and the store commits writes in
    // batches: commit first, so that what was written (and untagged) before this call is seen.
    store
        .sync_db()
        .await
        .map_err(store_err("commit the store before collecting garbage"))?;
    let run = collector.request();
    let mut finished = collector.finished.subscribe();
    tokio::time::timeout(
        Duration::from_secs(30),
        finished.wait_for(|&done| done >= run),
    )
    .await
    .map_err(|_| Error::Store {
        action: "collect garbage",
        detail: "no collection ran within 30 s".into(),
    })?
    .map_err(|_| Error::Store {
        action: "collect garbage",
        detail: "the store stopped".into(),
    })?;
    Ok(())
}

/// Removes every file in `dir` (a missing `dir` is empty).
fn remove_files_in(dir: &Path) -> Result<()> {
    let io_error = |error| Error::Io {
        action: "clean up unfinished imports in",
        path: dir.to_path_buf(),
        error,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_error(err)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error)?;
        if entry.file_type().map_err(io_error)?.is_file() {
            std::fs::remove_file(entry.path()).map_err(io_error)?;
        }
    }
    Ok(())
}

/// How often iroh-blobs asks whether to collect garbage; a collection runs only when it is due
/// ([`NodeConfig::gc_interval`]) or asked for ([`BlobNode::collect_garbage`]).
const GC_TICK: Duration = Duration::from_millis(50);

/// How one download attempt failed.
enum Fetch {
    /// The blob is larger than the caller accepts.
    TooLarge,
    /// This provider did not deliver it: why.
    Failed(String),
}

/// When collections are due, asked for, started and finished. iroh-blobs calls
/// [`Collector::decide`] before each possible run and runs one collection at a time, so a call
/// to it also means the run it last allowed has finished.
#[derive(Debug)]
struct Collector {
    /// The periodic interval, if any.
    interval: Option<Duration>,
    state: std::sync::Mutex<CollectorState>,
    /// The number of the last run that finished.
    finished: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug)]
struct CollectorState {
    /// The number of the last run asked for.
    requested: u64,
    /// The number of the last run started.
    started: u64,
    /// When the last periodic run started.
    last_periodic: Instant,
}

impl Collector {
    fn new(interval: Option<Duration>) -> Collector {
        Collector {
            interval,
            state: std::sync::Mutex::new(CollectorState {
                requested: 0,
                started: 0,
                last_periodic: Instant::now(),
            }),
            finished: tokio::sync::watch::channel(0).0,
        }
    }

    /// Whether the run iroh-blobs is about to make should happen.
    fn decide(&self) -> bool {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        self.finished.send_replace(state.started);
        let periodic = self
            .interval
            .is_some_and(|interval| state.last_periodic.elapsed() >= interval);
        if periodic {
            state.last_periodic = Instant::now();
        }
        if periodic || state.requested > state.started {
            state.started = state.requested.max(state.started + 1);
            true
        } else {
            false
        }
    }

    /// Asks for a run; answers its number.
    fn request(&self) -> u64 {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        state.requested = state.requested.max(state.started) + 1;
        state.requested
    }
}

fn check_tag(tag: &str) -> Result<()> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(Error::BadTag);
    }
    Ok(())
}

impl BlobNode {
    /// Opens the node in `dir` (see the crate docs for its layout), creating what is missing,
    /// binds the endpoint and starts serving blobs.
    pub async fn open(dir: &Path, config: NodeConfig) -> Result<BlobNode> {
        keyfile::ensure_dir(dir)?;
        let secret = keyfile::load_or_create(&dir.join(KEY_FILE_NAME))?;

        let store_dir = dir.join(STORE_DIR_NAME);
        keyfile::ensure_dir(&store_dir)?;
        let mut options = Options::new(&store_dir);
        let temp_dir = options.path.temp_path.clone();
        let collector = std::sync::Arc::new(Collector::new(config.gc_interval));
        let decides = collector.clone();
        options.gc = Some(GcConfig {
            interval: GC_TICK,
            add_protected: Some(std::sync::Arc::new(move |_live| {
                let outcome = match decides.decide() {
                    true => iroh_blobs::store::ProtectOutcome::Continue,
                    false => iroh_blobs::store::ProtectOutcome::Abort,
                };
                Box::pin(async move { outcome })
            })),
        });
        let layout = Options {
            gc: None,
            ..options.clone()
        };
        let store = FsStore::load_with_opts(store_dir.join("blobs.db"), options)
            .await
            .map_err(store_err("open the store"))?;
        // What an earlier run left (the temp file of an import it did not finish, a blob whose
        // tag it deleted) goes now, before this node imports or serves anything: nothing else
        // uses the store (it is locked), and a collection never runs beside the caller's first
        // import.
        let cleaned = match remove_files_in(&temp_dir) {
            Ok(()) => collect(&collector, &store).await,
            Err(err) => Err(err),
        };
        if let Err(err) = cleaned {
            store.shutdown().await.ok();
            return Err(err);
        }

        let relay_mode = match &config.relay {
            None => RelayMode::Disabled,
            Some(url) => RelayMode::custom([url.clone()]),
        };
        let mut builder = Endpoint::builder(presets::Minimal)
            .secret_key(secret)
            .relay_mode(relay_mode)
            .clear_ip_transports()
            .bind_addr(config.bind)
            .map_err(|e| Error::Endpoint(e.to_string()))?
            .portmapper_config(PortmapperConfig::Disabled);
        if config.relay.is_none() {
            // With a relay, net report must keep its probes or no home relay is ever picked.
            builder = builder.net_report_config(NetReportConfig::minimal());
        }
        let bound = builder.bind().await;
        let endpoint = match bound {
            Ok(endpoint) => endpoint,
            Err(e) => {
                store.shutdown().await.ok();
                return Err(Error::Endpoint(e.to_string()));
            }
        };
        let served = tokio::sync::broadcast::channel(serving::CAPACITY).0;
        let router = Router::builder(endpoint)
            .accept(
                iroh_blobs::ALPN,
                BlobsProtocol::new(&store, Some(serving::events(served.downgrade()))),
            )
            .spawn();
        Ok(BlobNode {
            router,
            store,
            layout,
            config,
            collector,
            served: std::sync::Mutex::new(Some(served)),
        })
    }

    /// Deletes every blob no tag protects now, and returns once that is done (within a few
    /// hundred milliseconds on a small store): what a failed import left behind, for one.
    pub async fn collect_garbage(&self) -> Result<()> {
        collect(&self.collector, &self.store).await
    }

    /// What this node serves from now on: an event when a peer's request for a blob starts,
    /// as it progresses, and when it completes or is aborted (see [`Served`]). Watching never
    /// slows or changes serving: a receiver that falls more than a few hundred events behind
    /// misses the oldest (`RecvError::Lagged`), and the channel closes when the node shuts down.
    pub fn watch_served(&self) -> tokio::sync::broadcast::Receiver<Served> {
        let served = self
            .served
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        match &*served {
            Some(sender) => sender.subscribe(),
            // Shut down: a channel that is closed already.
            None => tokio::sync::broadcast::channel(1).1,
        }
    }

    /// This node's endpoint id (its public key).
    pub fn id(&self) -> EndpointId {
        self.router.endpoint().id()
    }

    /// This node's current address: its id, the bound sockets and its relay, if any.
    pub fn addr(&self) -> EndpointAddr {
        self.router.endpoint().addr()
    }

    /// This node's address as a provider string (format in the crate docs).
    pub fn provider(&self) -> String {
        provider::format_provider(&self.addr())
    }

    /// Imports the bytes of `chunks` as one blob, without an intermediate copy, and tags it
    /// `tag` (replacing whatever that tag held). Returns the blob's hash and size. If the stream
    /// yields an error, the import is abandoned and that error returned.
    pub async fn import_stream<S>(&self, chunks: S, tag: &str) -> Result<(Hash, u64)>
    where
        S: Stream<Item = io::Result<Bytes>> + Send + Sync + 'static,
    {
        check_tag(tag)?;
        let haf = self
            .store
            .blobs()
            .add_stream(chunks)
            .await
            .with_named_tag(tag)
            .await
            .map_err(store_err("import"))?;
        self.complete_size(haf.hash)
            .await
            .map(|size| (haf.hash, size))
    }

    /// Imports the file at `path` as one blob (copied into the store, so later changes to
    /// the file do not matter) and tags it `tag`. Returns the blob's hash and size.
    pub async fn import_path(&self, path: &Path, tag: &str) -> Result<(Hash, u64)> {
        check_tag(tag)?;
        let path = std::path::absolute(path).map_err(|error| Error::Io {
            action: "resolve",
            path: path.to_path_buf(),
            error,
        })?;
        let haf = self
            .store
            .blobs()
            .add_path_with_opts(AddPathOptions {
                path,
                mode: ImportMode::Copy,
                format: BlobFormat::Raw,
            })
            .with_named_tag(tag)
            .await
            .map_err(store_err("import"))?;
        self.complete_size(haf.hash)
            .await
            .map(|size| (haf.hash, size))
    }

    async fn complete_size(&self, hash: Hash) -> Result<u64> {
        match self.has(hash).await? {
            BlobState::Complete { size } => Ok(size),
            _ => Err(Error::NotComplete(hash)),
        }
    }

    /// How much of the blob `hash` the local store holds.
    pub async fn has(&self, hash: Hash) -> Result<BlobState> {
        let status = self
            .store
            .blobs()
            .status(hash)
            .await
            .map_err(store_err("query a blob"))?;
        Ok(match status {
            BlobStatus::NotFound => BlobState::Missing,
            BlobStatus::Partial { size } => BlobState::Partial { size },
            BlobStatus::Complete { size } => BlobState::Complete { size },
        })
    }

    /// A reader (`tokio::io::AsyncRead + AsyncSeek`) over the complete blob `hash`.
    pub async fn reader(&self, hash: Hash) -> Result<BlobReader> {
        self.complete_size(hash).await?;
        Ok(self.store.blobs().reader(hash))
    }

    /// A blocking reader (`std::io::Read`) over the complete blob `hash`, for reading a large
    /// blob whole on a blocking thread, e.g. to decrypt it; answers it with the blob's size.
    ///
    /// It reads the store's own data file, as iroh-blobs' export does, so a read costs one
    /// system call however large: [`reader`](Self::reader) asks the store for every read and
    /// gets the bytes back in 1 KiB messages, a few times slower than the disk. A small blob
    /// the store keeps inline in its database is read into memory (at most 16 KiB). The data
    /// of a complete blob never changes, and garbage collection removing it meanwhile (once
    /// its tags are deleted) does not cut short a file already open.
    pub async fn blocking_reader(&self, hash: Hash) -> Result<(BlockingBlobReader, u64)> {
        let size = self.complete_size(hash).await?;
        let path = self.layout.path.data_path(&hash);
        let inner = match std::fs::File::open(&path) {
            Ok(file) => {
                let on_disk = file.metadata().map(|meta| meta.len());
                if !on_disk.is_ok_and(|len| len >= size) {
                    return Err(Error::Store {
                        action: "read a blob",
                        detail: format!(
                            "its data file {} is shorter than the blob",
                            path.display()
                        ),
                    });
                }
                Source::File(io::Read::take(file, size))
            }
            Err(err)
                if err.kind() == io::ErrorKind::NotFound && self.layout.is_inlined_data(size) =>
            {
                let bytes = self
                    .store
                    .blobs()
                    .get_bytes(hash)
                    .await
                    .map_err(store_err("read a blob"))?;
                Source::Memory(io::Cursor::new(bytes))
            }
            Err(error) => {
                return Err(Error::Io {
                    action: "open the blob's data file",
                    path,
                    error,
                });
            }
        };
        Ok((BlockingBlobReader(inner), size))
    }

    /// Follows the blob `hash`, `size` bytes, while a [`download`](Self::download) brings it:
    /// the reader reads every byte as soon as iroh verified and stored it, so a caller can
    /// decrypt a file while it arrives. Stop the [`Following`] when the download fails, or the
    /// reader waits for bytes that never come. Answers `None` for a blob the store keeps inline
    /// (16 KiB or less): read those with [`blocking_reader`](Self::blocking_reader) once complete.
    pub async fn follow(&self, hash: Hash, size: u64) -> Result<Option<(Following, FollowReader)>> {
        if self.layout.is_inlined_data(size) {
            return Ok(None);
        }
        let updates = self
            .store
            .blobs()
            .observe(hash)
            .stream()
            .await
            .map_err(store_err("watch a download"))?;
        let shared = std::sync::Arc::new(follow::Shared::default());
        let feeding = shared.clone();
        let store = self.store.clone();
        let task = tokio::spawn(async move {
            let mut updates = std::pin::pin!(updates);
            while let Some(bitfield) = updates.next().await {
                if feeding.update(&bitfield) {
                    return;
                }
            }
            // The store ends the watch when it moves a blob out of memory, which may come
            // right after the update that completed it: ask whether it did.
            match store.blobs().status(hash).await {
                Ok(BlobStatus::Complete { size }) => feeding.complete(size),
                _ => feeding.stop("the blob store stopped reporting the download".to_owned()),
            }
        });
        let reader = FollowReader {
            shared: shared.clone(),
            path: self.layout.path.data_path(&hash),
            file: None,
            position: 0,
        };
        Ok(Some((Following { shared, task }, reader)))
    }

    /// Deletes the tag `tag`. Returns whether it existed. The blob stays until garbage
    /// collection finds no other tag keeping it (never, on a node without GC).
    pub async fn delete_tag(&self, tag: &str) -> Result<bool> {
        check_tag(tag)?;
        let deleted = self
            .store
            .tags()
            .delete(tag)
            .await
            .map_err(store_err("delete a tag"))?;
        Ok(deleted > 0)
    }

    /// All named tags, in name order.
    pub async fn tags(&self) -> Result<Vec<TagEntry>> {
        let mut list = self
            .store
            .tags()
            .list()
            .await
            .map_err(store_err("list tags"))?;
        let mut out = Vec::new();
        while let Some(item) = list.next().await {
            let info = item.map_err(store_err("list tags"))?;
            out.push(TagEntry {
                name: String::from_utf8_lossy(&info.name.0).into_owned(),
                hash: info.hash,
            });
        }
        Ok(out)
    }

    /// Counts the blobs in the store and the bytes of the complete ones. Asks the store about
    /// every blob, so it takes time proportional to their number.
    pub async fn usage(&self) -> Result<StoreUsage> {
        let hashes = self
            .store
            .blobs()
            .list()
            .hashes()
            .await
            .map_err(store_err("list blobs"))?;
        let mut usage = StoreUsage::default();
        for hash in hashes {
            match self.has(hash).await? {
                BlobState::Complete { size } => {
                    usage.complete_blobs += 1;
                    usage.complete_bytes += size;
                }
                BlobState::Partial { .. } => usage.partial_blobs += 1,
                BlobState::Missing => {}
            }
        }
        Ok(usage)
    }

    /// Downloads the blob `hash`, trying `providers` in order until one delivers it, tagged
    /// `tag` from the start (replacing whatever that tag held), so what arrived is kept for a
    /// resume: delete the tag to give up on it.
    ///
    /// Only what is missing locally is fetched, so a download interrupted by a failure, a
    /// provider going away or the caller dropping the future resumes where it stopped. iroh
    /// verifies every chunk against `hash`. `progress` is called as bytes arrive.
    ///
    /// Each provider gets [`NodeConfig::connect_timeout`] to answer and may go
    /// [`NodeConfig::stall_timeout`] without sending anything; a provider that does not have
    /// the blob fails at once. When none delivers, the error lists every provider and why.
    ///
    /// A blob larger than `max_size` bytes is [`Error::TooLarge`] as soon as its size or the
    /// bytes received show it (within a few hundred milliseconds of transfer), and its tag is
    /// deleted: whoever names a blob cannot make the caller fetch more than it expects.
    pub async fn download(
        &self,
        hash: Hash,
        providers: &[EndpointAddr],
        tag: &str,
        max_size: u64,
        mut progress: impl FnMut(Progress),
    ) -> Result<DownloadStats> {
        check_tag(tag)?;
        let content = HashAndFormat::raw(hash);
        // Tagged before the first byte arrives: a partial download survives a garbage
        // collection, and a crash, for the resume.
        self.store
            .tags()
            .set(tag, content)
            .await
            .map_err(store_err("tag the download"))?;

        let mut transferred = 0;
        let mut completed_by = None;
        let mut attempts = Vec::new();
        if !matches!(self.has(hash).await?, BlobState::Complete { .. }) {
            if providers.is_empty() {
                return Err(Error::NoProviders(hash));
            }
            for provider in providers {
                let (received, outcome) = self
                    .fetch_from(content, provider.clone(), max_size, &mut progress)
                    .await;
                transferred += received;
                if let Err(Fetch::TooLarge) = outcome {
                    self.delete_tag(tag).await?;
                    return Err(Error::TooLarge {
                        hash,
                        max: max_size,
                    });
                }
                if let BlobState::Complete { .. } = self.has(hash).await? {
                    completed_by = Some(provider.id);
                    break;
                }
                attempts.push(Attempt {
                    provider: provider.id,
                    error: match outcome {
                        Err(Fetch::Failed(error)) => error,
                        _ => "ended without delivering the blob".to_string(),
                    },
                });
            }
        }
        let total = match self.has(hash).await? {
            BlobState::Complete { size } if size > max_size => {
                self.delete_tag(tag).await?;
                return Err(Error::TooLarge {
                    hash,
                    max: max_size,
                });
            }
            BlobState::Complete { size } => size,
            // Nothing arrived: nothing to keep for a resume.
            BlobState::Missing => {
                self.delete_tag(tag).await?;
                return Err(Error::DownloadFailed { hash, attempts });
            }
            BlobState::Partial { .. } => return Err(Error::DownloadFailed { hash, attempts }),
        };
        Ok(DownloadStats {
            bytes_transferred: transferred,
            total,
            provider: completed_by,
        })
    }

    /// One attempt: returns the payload bytes received and how it ended.
    async fn fetch_from(
        &self,
        content: HashAndFormat,
        provider: EndpointAddr,
        max_size: u64,
        progress: &mut impl FnMut(Progress),
    ) -> (u64, std::result::Result<(), Fetch>) {
        let failed = |reason: String| Err(Fetch::Failed(reason));
        let endpoint = self.router.endpoint();
        let connect = endpoint.connect(provider, iroh_blobs::ALPN);
        let conn = match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Err(_) => {
                let secs = self.config.connect_timeout.as_secs_f32();
                return (0, failed(format!("no connection within {secs:.1} s")));
            }
            Ok(Err(e)) => return (0, failed(format!("could not connect: {e}"))),
            Ok(Ok(conn)) => conn,
        };
        let (local, mut total) = match self.has(content.hash).await {
            Ok(BlobState::Partial { size }) => {
                let local = match self.store.remote().local(content).await {
                    Ok(info) => info.local_bytes(),
                    Err(e) => return (0, failed(format!("local store: {e}"))),
                };
                (local, size)
            }
            Ok(BlobState::Complete { size }) => (size, Some(size)),
            Ok(BlobState::Missing) => (0, None),
            Err(e) => return (0, failed(e.to_string())),
        };
        let stream = self.store.remote().fetch(conn.clone(), content).stream();
        let mut stream = std::pin::pin!(stream);
        let mut received = 0;
        let mut size_checked = Instant::now();
        let result = loop {
            let item = match tokio::time::timeout(self.config.stall_timeout, stream.next()).await {
                Err(_) => {
                    let secs = self.config.stall_timeout.as_secs_f32();
                    break failed(format!("nothing received for {secs:.1} s"));
                }
                Ok(None) => break failed("the transfer ended without a result".to_string()),
                Ok(Some(item)) => item,
            };
            match item {
                GetProgressItem::Progress(bytes) => {
                    received = bytes;
                    if total.is_none() && size_checked.elapsed() > Duration::from_millis(200) {
                        size_checked = Instant::now();
                        if let Ok(BlobState::Partial { size }) = self.has(content.hash).await {
                            total = size;
                        }
                    }
                    if local + received > max_size || total.is_some_and(|total| total > max_size) {
                        break Err(Fetch::TooLarge);
                    }
                    progress(Progress {
                        done: local + received,
                        total,
                    });
                }
                GetProgressItem::Done(stats) => {
                    received = stats.payload_bytes_read;
                    break Ok(());
                }
                GetProgressItem::Error(e) => break failed(e.to_string()),
            }
        };
        conn.close(0u32.into(), b"done");
        if result.is_ok()
            && let Ok(BlobState::Complete { size }) = self.has(content.hash).await
        {
            progress(Progress {
                done: size,
                total: Some(size),
            });
        }
        (received, result)
    }

    /// Makes what the store holds durable (its database synced): after this, a process killed
    /// without a shutdown still has every blob added before.
    pub async fn sync(&self) -> Result<()> {
        self.store.sync_db().await.map_err(store_err("sync"))
    }

    /// Stops serving, closes the endpoint and shuts the store down (the router's shutdown of
    /// the blobs protocol shuts the store; its database is synced first).
    pub async fn shutdown(&self) -> Result<()> {
        self.served
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        let synced = self.store.sync_db().await.map_err(store_err("sync"));
        self.router
            .shutdown()
            .await
            .map_err(|e| Error::Endpoint(format!("shutting down: {e}")))?;
        synced
    }
}
