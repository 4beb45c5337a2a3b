//! Pinning (PROTOCOL.md §10): the server keeps encrypted blobs its users name, in its own
//! kez-blobs node, within a per-user quota.
//!
//! State: one JetStream KV entry per owner in [`PINS_BUCKET`] (key: owner hex) holding every
//! pin of that owner and the bytes they take (`used`). Every change is a compare-and-set on that
//! one entry, so concurrent adds on any number of instances never take an owner past the quota,
//! and `used` is always the sum of the sizes of the entries (pinned and being pinned).
//!
//! An add reserves first (an entry in state `pinning`), then fetches into the node under the
//! tag `pin/<owner hex>/<blob hex>`, then marks the entry `pinned`; any failure releases the
//! reservation and drops the tag. A remove drops the tag and the entry; the node's garbage
//! collection reclaims the data once no tag keeps it. A sweep (at the GC interval) drops tags of
//! this node that no entry names, e.g. after a remove answered by another instance or a crash.
//!
//! Invariant (ARCHITECTURE.md): the pin node only ever receives blobs an owner named in a signed
//! request, fetched by hash from the owner's providers: ciphertext, verified by iroh.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use kez_blobs::{BlobNode, EndpointAddr, Hash, NodeConfig};
use kez_core::file::BlobHash;
use kez_proto::ErrorAnswer;
use kez_proto::answer::{PinList, PinRecord, PinRemoved, PinState, PinStatus};
use kez_proto::pin::{PinOp, PinRequest};
use serde::{Deserialize, Serialize};

use crate::store::{DeviceState, Store};

/// Bucket: owner key hex → [`OwnerPins`].
pub const PINS_BUCKET: &str = "kez_pins";
/// Most pins (pinned or being pinned) one owner may hold.
pub const MAX_PINS_PER_OWNER: usize = 1000;
/// Largest value in the pins bucket: [`MAX_PINS_PER_OWNER`] entries fit with room to spare.
const MAX_PINS_VALUE_BYTES: usize = 512 * 1024;
/// How often a compare-and-set is retried when another request changed the entry meanwhile.
const CAS_ATTEMPTS: usize = 200;
/// Default per-owner quota: 1 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 1 << 30;
/// Default GC interval of the pin node.
pub const DEFAULT_GC_SECS: u64 = 60;
/// Default limit on one add's fetch. nats-server forgets a cross-account reply after its
/// service import's response threshold (2 minutes by default), so the whole add must end before.
pub const DEFAULT_FETCH_SECS: u64 = 90;
/// Largest fetch limit accepted.
pub const MAX_FETCH_SECS: u64 = 100;

/// Pinning settings (`--pin-dir` and friends).
#[derive(Debug, Clone)]
pub struct PinConfig {
    /// The pin node's directory (kez-blobs layout: `iroh.key`, `blobs/`).
    pub dir: PathBuf,
    /// The node's UDP address. Production binds a routable address so owners' nodes and
    /// recipients can reach it.
    pub bind: std::net::SocketAddr,
    /// GC (and tag sweep) interval.
    pub gc_interval: Duration,
    /// Bytes each owner may pin.
    pub quota_bytes: u64,
    /// How long one add may spend fetching.
    pub fetch_timeout: Duration,
    /// Whether the node may dial provider addresses that are not public (loopback, private,
    /// link-local, …) an owner names: off in production, where an owner could otherwise make
    /// the server probe its own network; on for the dev stack and tests on loopback.
    pub dial_private: bool,
}

impl PinConfig {
    /// Defaults for a node in `dir` on loopback.
    pub fn new(dir: PathBuf) -> PinConfig {
        PinConfig {
            dir,
            bind: NodeConfig::default().bind,
            gc_interval: Duration::from_secs(DEFAULT_GC_SECS),
            quota_bytes: DEFAULT_QUOTA_BYTES,
            fetch_timeout: Duration::from_secs(DEFAULT_FETCH_SECS),
            dial_private: false,
        }
    }
}

/// The file in the pin directory that keeps the node's address when the OS picked its port.
pub const BIND_FILE: &str = "bind";

/// The pin node and the pins bucket.
pub struct Pinning {
    node: Arc<BlobNode>,
    bucket: kv::Store,
    quota_bytes: u64,
    fetch_timeout: Duration,
    dial_private: bool,
    node_id: String,
}

/// A pin as stored and answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinEntry {
    /// Size in bytes.
    pub size: u64,
    /// When it was pinned (or, while `pinning`, when the add started), server time.
    pub pinned_at: u64,
    /// `pinned` or `pinning`.
    pub state: PinState,
    /// Endpoint id (hex) of the pin node holding it.
    pub node: String,
}

/// The pins bucket's value: one owner's pins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerPins {
    /// Sum of the sizes of `pins`.
    pub used: u64,
    /// Blob hex → pin.
    pub pins: BTreeMap<String, PinEntry>,
}

impl Pinning {
    /// Opens the node (GC on) and the bucket.
    pub async fn open(
        config: &PinConfig,
        js: &jetstream::Context,
        replicas: Option<usize>,
    ) -> Result<Pinning, String> {
        let mut bucket_config = kv::Config {
            bucket: PINS_BUCKET.to_owned(),
            description: "kez-chat: pinned blobs per owner".to_owned(),
            history: 1,
            max_value_size: MAX_PINS_VALUE_BYTES as i32,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        if let Some(replicas) = replicas {
            bucket_config.num_replicas = replicas;
        }
        let bucket = crate::store::ensure_bucket(js, bucket_config)
            .await
            .map_err(|err| format!("bucket {PINS_BUCKET}: {err}"))?;
        // A port the OS picks (the default) is kept in the pin directory and bound again at the
        // next start: the provider strings in owners' offers and manifests name it.
        let kept = config.dir.join(BIND_FILE);
        let bind = match config.bind.port() {
            0 => std::fs::read_to_string(&kept)
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .filter(|addr: &std::net::SocketAddr| addr.ip() == config.bind.ip())
                .unwrap_or(config.bind),
            _ => config.bind,
        };
        let open = |bind| {
            BlobNode::open(
                &config.dir,
                NodeConfig {
                    bind,
                    gc_interval: Some(config.gc_interval),
                    ..NodeConfig::default()
                },
            )
        };
        let node = match open(bind).await {
            // The kept port is taken now: another one (clients find it in kez.server.info).
            Err(err) if bind != config.bind => {
                tracing::warn!(%bind, error = %err, "the pin node's kept address is taken; binding another");
                open(config.bind).await
            }
            opened => opened,
        }
        .map_err(|err| format!("pin node in {}: {err}", config.dir.display()))?;
        if config.bind.port() == 0
            && let Some(bound) = node.addr().ip_addrs().next()
            && let Err(err) = std::fs::write(&kept, format!("{bound}\n"))
        {
            tracing::warn!(file = %kept.display(), error = %err, "could not keep the pin node's address");
        }
        let node_id = node.id().to_string();
        Ok(Pinning {
            node: Arc::new(node),
            bucket,
            quota_bytes: config.quota_bytes,
            fetch_timeout: config.fetch_timeout,
            dial_private: config.dial_private,
            node_id,
        })
    }

    /// The pin node's provider string.
    pub fn provider(&self) -> String {
        self.node.provider()
    }

    /// Bytes each owner may pin.
    pub fn quota_bytes(&self) -> u64 {
        self.quota_bytes
    }

    /// How long a `kez.pin.add` may take in all: the fetch and the bookkeeping around it.
    pub fn add_timeout(&self) -> Duration {
        self.fetch_timeout + Duration::from_secs(10)
    }

    /// The node.
    pub fn node(&self) -> &Arc<BlobNode> {
        &self.node
    }

    /// The node, for shutting it down.
    pub fn into_node(self) -> Arc<BlobNode> {
        self.node
    }

    /// Drops this node's `pin/…` tags that no entry of this node names. Returns how many.
    pub async fn sweep(&self) -> Result<usize, String> {
        let tags = self.node.tags().await.map_err(|err| err.to_string())?;
        let mut dropped = 0;
        for tag in tags {
            let Some(rest) = tag.name.strip_prefix("pin/") else {
                continue;
            };
            let Some((owner, blob)) = rest.split_once('/') else {
                continue;
            };
            let is_hex = |text: &str| {
                text.len() == 64
                    && text
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            };
            if !is_hex(owner) || !is_hex(blob) {
                continue;
            }
            let keep = match self.bucket.get(owner).await {
                Ok(Some(value)) => serde_json::from_slice::<OwnerPins>(&value)
                    .map(|doc| {
                        doc.pins
                            .get(blob)
                            .is_some_and(|entry| entry.node == self.node_id)
                    })
                    .unwrap_or(true),
                Ok(None) => false,
                Err(err) => return Err(err.to_string()),
            };
            if !keep {
                self.node
                    .delete_tag(&tag.name)
                    .await
                    .map_err(|err| err.to_string())?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    async fn load(&self, owner: &str) -> Result<(OwnerPins, Option<u64>), ErrorAnswer> {
        match self
            .bucket
            .entry(owner)
            .await
            .map_err(ErrorAnswer::unavailable)?
        {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let doc = serde_json::from_slice(&entry.value).map_err(|err| {
                    ErrorAnswer::internal(format!("corrupt pins of {owner}: {err}"))
                })?;
                Ok((doc, Some(entry.revision)))
            }
            Some(entry) => Ok((OwnerPins::default(), Some(entry.revision))),
            None => Ok((OwnerPins::default(), None)),
        }
    }

    /// Writes `doc` if the entry is still at `revision`; `Ok(false)`: someone else wrote first.
    async fn store(
        &self,
        owner: &str,
        doc: &OwnerPins,
        revision: Option<u64>,
    ) -> Result<bool, ErrorAnswer> {
        let value = Bytes::from(serde_json::to_vec(doc).expect("pins serialise"));
        crate::store::compare_and_set(&self.bucket, owner, value, revision).await
    }

    /// Applies `change` to the owner's pins with compare-and-set until it sticks: `change`
    /// edits the pins and returns `Step::Write(out)`, or `Step::Done(out)` to answer without
    /// writing. It runs again on fresh state after each lost race.
    async fn update<T>(
        &self,
        owner: &str,
        mut change: impl FnMut(&mut OwnerPins) -> Result<Step<T>, ErrorAnswer>,
    ) -> Result<T, ErrorAnswer> {
        for attempt in 0..CAS_ATTEMPTS {
            let (mut doc, revision) = self.load(owner).await?;
            match change(&mut doc)? {
                Step::Done(out) => return Ok(out),
                Step::Write(out) => {
                    if self.store(owner, &doc, revision).await? {
                        return Ok(out);
                    }
                }
            }
            // Spread the retries of many racing requests.
            let pause = 1 + (attempt as u64 % 7) * 3;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        Err(ErrorAnswer::new(
            503,
            "unavailable",
            "too many concurrent changes to your pins; retry",
        ))
    }
}

enum Step<T> {
    Write(T),
    Done(T),
}

fn blob_tag(owner: &str, blob: &str) -> String {
    format!("pin/{owner}/{blob}")
}

/// Answers a `kez.pin.*` request that verified (`kez_proto::decode`).
pub async fn handle(
    store: &Store,
    pinning: &Pinning,
    request: &PinRequest,
    now: u64,
) -> Result<Bytes, ErrorAnswer> {
    // The pins and the quota are the identity's, whichever of its devices asks.
    let owner = match store.whois(request.key).await? {
        Some(_) => request.key,
        None => match store.device(request.key).await? {
            Some(device) if device.state == DeviceState::Active => device.identity,
            _ => {
                return Err(ErrorAnswer::new(
                    403,
                    "not_registered",
                    format!(
                        "{} has not registered a handle here and is no active device of an identity that has; only they may pin",
                        request.key
                    ),
                ));
            }
        },
    };
    if let Some(disabled) = store.disabled(owner).await? {
        return Err(ErrorAnswer::new(
            403,
            "disabled",
            format!("{} is disabled by the operator", disabled.handle),
        ));
    }
    let owner_hex = owner.to_hex();
    match request.op {
        PinOp::Add => add(pinning, &owner_hex, request, now).await,
        PinOp::Remove => remove(pinning, &owner_hex, blob_of(request)?).await,
        PinOp::List => {
            let (doc, _) = pinning.load(&owner_hex).await?;
            let pins = doc
                .pins
                .iter()
                .map(|(blob, entry)| {
                    let blob = blob.parse().map_err(|_| {
                        ErrorAnswer::internal(format!("pins of {owner_hex}: bad blob {blob:?}"))
                    })?;
                    Ok(pin_record(blob, entry))
                })
                .collect::<Result<_, ErrorAnswer>>()?;
            answer(&PinList {
                pins,
                used: doc.used,
                quota_bytes: pinning.quota_bytes,
            })
        }
        PinOp::Status => {
            let blob = blob_of(request)?;
            let (doc, _) = pinning.load(&owner_hex).await?;
            let pin = doc.pins.get(&blob.to_string());
            answer(&PinStatus {
                blob,
                pinned: pin.is_some_and(|entry| entry.state == PinState::Pinned),
                pin: pin.map(|entry| pin_record(blob, entry)),
            })
        }
    }
}

fn blob_of(request: &PinRequest) -> Result<BlobHash, ErrorAnswer> {
    request
        .blob
        .ok_or_else(|| ErrorAnswer::malformed("blob is missing"))
}

fn quota_exceeded(used: u64, size: u64, quota: u64) -> ErrorAnswer {
    ErrorAnswer::new(
        413,
        "quota_exceeded",
        format!(
            "pinning {size} bytes would exceed your quota: {used} of {quota} bytes are in use; remove a pin (kez.pin.remove) to make room"
        ),
    )
}

/// The quota rules of `kez.pin.add` (PROTOCOL.md §10.3) on an owner's pins: a blob pinned
/// already is answered as it is (`Done(Err(pin))`); one being pinned by a request younger than
/// `stale_after` seconds is a 409; an older reservation is taken over; otherwise the blob's
/// `size` must fit in `quota` and the owner may hold at most [`MAX_PINS_PER_OWNER`] pins. A
/// reservation is written as `pinning` at `now` on `node` (`Write(Ok(entry))`).
fn reserve(
    doc: &mut OwnerPins,
    blob_hex: &str,
    size: u64,
    quota: u64,
    now: u64,
    stale_after: u64,
    node: &str,
) -> Result<Step<Result<PinEntry, PinEntry>>, ErrorAnswer> {
    let used_without = match doc.pins.get(blob_hex) {
        Some(entry) if entry.state == PinState::Pinned => {
            return Ok(Step::Done(Err(entry.clone())));
        }
        Some(entry) if now.saturating_sub(entry.pinned_at) < stale_after => {
            return Err(ErrorAnswer::new(
                409,
                "conflict",
                "this blob is being pinned by another request; retry in a minute",
            ));
        }
        // A reservation whose add died with its server: take it over.
        Some(entry) => doc.used.saturating_sub(entry.size),
        None if doc.pins.len() >= MAX_PINS_PER_OWNER => {
            return Err(ErrorAnswer::new(
                413,
                "quota_exceeded",
                format!(
                    "you have {MAX_PINS_PER_OWNER} pins, the most allowed; remove a pin (kez.pin.remove) to make room"
                ),
            ));
        }
        None => doc.used,
    };
    if used_without.saturating_add(size) > quota {
        return Err(quota_exceeded(used_without, size, quota));
    }
    let entry = PinEntry {
        size,
        pinned_at: now,
        state: PinState::Pinning,
        node: node.to_owned(),
    };
    doc.used = used_without + size;
    doc.pins.insert(blob_hex.to_owned(), entry.clone());
    Ok(Step::Write(Ok(entry)))
}

async fn add(
    pinning: &Pinning,
    owner: &str,
    request: &PinRequest,
    now: u64,
) -> Result<Bytes, ErrorAnswer> {
    let blob = blob_of(request)?;
    let size = request.size.unwrap_or_default();
    let addrs: Vec<EndpointAddr> = request
        .providers
        .iter()
        .flatten()
        .filter_map(|provider| kez_blobs::parse_provider(provider).ok())
        .filter_map(|addr| kez_blobs::dialable(&addr, pinning.dial_private))
        .collect();
    if addrs.is_empty() {
        return Err(ErrorAnswer::malformed(match pinning.dial_private {
            true => "no provider is an iroh provider string this server can use (iroh:<id>;ip=…)",
            false => {
                "no provider names a public IP address (iroh:<id>;ip=…): this server does not dial private, loopback or relay addresses"
            }
        }));
    }
    let blob_hex = blob.to_string();
    let quota = pinning.quota_bytes;
    let stale_after = 2 * pinning.add_timeout().as_secs();
    let node = pinning.node_id.clone();

    // 1. Reserve (or find it pinned already).
    let reserved = pinning
        .update(owner, |doc| {
            reserve(doc, &blob_hex, size, quota, now, stale_after, &node)
        })
        .await?;
    let reservation = match reserved {
        Err(pinned) => return answer(&pin_record(blob, &pinned)),
        Ok(entry) => entry,
    };

    // 2. Fetch.
    let tag = blob_tag(owner, &blob_hex);
    let fetched = fetch(pinning, blob, size, &addrs, &tag).await;
    if let Err(err) = fetched {
        if let Err(undo) = pinning.node.delete_tag(&tag).await {
            tracing::warn!(%tag, error = %undo, "could not drop the tag of a failed pin; the sweep will");
        }
        release(pinning, owner, &blob_hex, &reservation).await;
        return Err(err);
    }

    // 3. Record it as pinned.
    let finished_at = unix_now().max(now);
    let finished = pinning
        .update(owner, |doc| match doc.pins.get_mut(&blob_hex) {
            Some(entry) if *entry == reservation => {
                entry.state = PinState::Pinned;
                entry.pinned_at = finished_at;
                Ok(Step::Write(Some(entry.clone())))
            }
            _ => Ok(Step::Done(None)),
        })
        .await;
    match finished {
        Ok(Some(entry)) => {
            tracing::info!(owner, blob = %blob_hex, size, "pinned");
            answer(&pin_record(blob, &entry))
        }
        Ok(None) => {
            // Removed (or taken over) while we fetched: the remove wins.
            let _ = pinning.node.delete_tag(&tag).await;
            Err(ErrorAnswer::new(
                409,
                "conflict",
                "the pin was removed while the blob was being fetched",
            ))
        }
        Err(err) => {
            // The entry stays `pinning`: a retry after the stale period takes it over, the
            // sweep keeps the tag meanwhile (the entry names this node).
            Err(err)
        }
    }
}

/// The answer's form of a stored pin.
fn pin_record(blob: BlobHash, entry: &PinEntry) -> PinRecord {
    PinRecord {
        blob,
        size: entry.size,
        pinned_at: entry.pinned_at,
        state: entry.state,
        node: entry.node.clone(),
    }
}

/// Fetches `blob` into the node under `tag`, refusing it as soon as it shows another size.
async fn fetch(
    pinning: &Pinning,
    blob: BlobHash,
    size: u64,
    addrs: &[EndpointAddr],
    tag: &str,
) -> Result<(), ErrorAnswer> {
    let hash = Hash::from_bytes(*blob.as_bytes());
    let mismatch = |actual: &str| {
        ErrorAnswer::new(
            400,
            "size_mismatch",
            format!("blob {blob} is {actual}, not {size} bytes; nothing was pinned"),
        )
    };
    // A larger blob stops as soon as it shows; a smaller one is small.
    let download = pinning.node.download(hash, addrs, tag, size, |_| {});
    match tokio::time::timeout(pinning.fetch_timeout, download).await {
        Err(_) => Err(fetch_failed(format!(
            "fetching blob {blob} took longer than {} s",
            pinning.fetch_timeout.as_secs()
        ))),
        Ok(Err(kez_blobs::Error::TooLarge { .. })) => Err(mismatch("larger")),
        Ok(Err(
            err @ (kez_blobs::Error::DownloadFailed { .. } | kez_blobs::Error::NoProviders(_)),
        )) => Err(fetch_failed(err.to_string())),
        Ok(Err(other)) => Err(ErrorAnswer::internal(format!("pin node: {other}"))),
        Ok(Ok(stats)) if stats.total != size => Err(mismatch(&format!("{} bytes", stats.total))),
        Ok(Ok(_)) => Ok(()),
    }
}

fn fetch_failed(detail: String) -> ErrorAnswer {
    ErrorAnswer::new(
        502,
        "fetch_failed",
        format!(
            "{detail}; the node that shares the blob must be online and reachable while it is pinned: retry then"
        ),
    )
}

/// Gives back the bytes of a reservation that did not become a pin.
async fn release(pinning: &Pinning, owner: &str, blob_hex: &str, reservation: &PinEntry) {
    let released = pinning
        .update(owner, |doc| match doc.pins.get(blob_hex) {
            Some(entry) if entry == reservation => {
                doc.pins.remove(blob_hex);
                doc.used = doc.used.saturating_sub(reservation.size);
                Ok(Step::Write(()))
            }
            _ => Ok(Step::Done(())),
        })
        .await;
    if let Err(err) = released {
        tracing::warn!(owner, blob = blob_hex, error = %err.message, "could not release a reservation; a later add of this blob takes it over");
    }
}

async fn remove(pinning: &Pinning, owner: &str, blob: BlobHash) -> Result<Bytes, ErrorAnswer> {
    let blob_hex = blob.to_string();
    let (doc, _) = pinning.load(owner).await?;
    let Some(entry) = doc.pins.get(&blob_hex) else {
        return Err(ErrorAnswer::not_found(format!(
            "blob {blob_hex} is not pinned"
        )));
    };
    // The tag first: if the entry's removal fails, a retry finds the entry and finishes.
    if entry.node == pinning.node_id {
        pinning
            .node
            .delete_tag(&blob_tag(owner, &blob_hex))
            .await
            .map_err(|err| ErrorAnswer::internal(format!("pin node: {err}")))?;
    }
    let removed = pinning
        .update(owner, |doc| match doc.pins.remove(&blob_hex) {
            Some(entry) => {
                doc.used = doc.used.saturating_sub(entry.size);
                Ok(Step::Write(Some((entry.size, doc.used))))
            }
            None => Ok(Step::Done(None)),
        })
        .await?;
    let Some((size, used)) = removed else {
        return Err(ErrorAnswer::not_found(format!(
            "blob {blob_hex} is not pinned"
        )));
    };
    tracing::info!(owner, blob = %blob_hex, size, "unpinned");
    answer(&PinRemoved {
        blob,
        size,
        used,
        quota_bytes: pinning.quota_bytes,
    })
}
fn answer<T: serde::Serialize>(value: &T) -> Result<Bytes, ErrorAnswer> {
    kez_proto::answer::encode(value).map(Bytes::from)
}

/// Seconds since the Unix epoch by the server's clock.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_767_225_600;
    const QUOTA: u64 = 1000;
    const STALE: u64 = 240;

    fn reserve_at(
        doc: &mut OwnerPins,
        blob: &str,
        size: u64,
        now: u64,
    ) -> Result<PinEntry, String> {
        match reserve(doc, blob, size, QUOTA, now, STALE, "node-a") {
            Ok(Step::Write(Ok(entry))) => Ok(entry),
            Ok(Step::Done(Err(pinned))) => Err(format!("pinned {}", pinned.size)),
            Ok(_) => Err("unexpected step".into()),
            Err(err) => Err(format!("{} {}", err.code, err.name)),
        }
    }

    #[test]
    fn a_reservation_counts_against_the_quota_until_it_fits_no_more() {
        let mut doc = OwnerPins::default();
        let entry = reserve_at(&mut doc, "a", 600, NOW).unwrap();
        assert_eq!((entry.state, entry.pinned_at), (PinState::Pinning, NOW));
        assert_eq!(doc.used, 600);
        assert_eq!(
            reserve_at(&mut doc, "b", 401, NOW),
            Err("413 quota_exceeded".into())
        );
        assert_eq!(doc.used, 600, "a refusal writes nothing");
        reserve_at(&mut doc, "b", 400, NOW).unwrap();
        assert_eq!(doc.used, 1000);
    }

    #[test]
    fn a_pin_in_flight_is_a_conflict_until_it_is_stale_then_it_is_taken_over() {
        let mut doc = OwnerPins::default();
        reserve_at(&mut doc, "a", 600, NOW).unwrap();
        assert_eq!(
            reserve_at(&mut doc, "a", 600, NOW + STALE - 1),
            Err("409 conflict".into())
        );
        let taken = reserve_at(&mut doc, "a", 700, NOW + STALE).unwrap();
        assert_eq!(
            (taken.size, doc.used),
            (700, 700),
            "the old size is given back"
        );
    }

    #[test]
    fn a_pinned_blob_is_answered_as_it_is_and_pins_are_counted() {
        let mut doc = OwnerPins::default();
        let mut entry = reserve_at(&mut doc, "a", 10, NOW).unwrap();
        entry.state = PinState::Pinned;
        doc.pins.insert("a".into(), entry);
        assert_eq!(reserve_at(&mut doc, "a", 10, NOW), Err("pinned 10".into()));

        let mut full = OwnerPins::default();
        for i in 0..MAX_PINS_PER_OWNER {
            reserve_at(&mut full, &i.to_string(), 0, NOW).unwrap();
        }
        assert_eq!(
            reserve_at(&mut full, "one more", 0, NOW),
            Err("413 quota_exceeded".into())
        );
    }
}
