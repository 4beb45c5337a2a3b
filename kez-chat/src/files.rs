//! `share`, `files` and `download`: files over iroh, encrypted before they leave the sender
//! (PROTOCOL.md §9), served by the home's blob node while the service runs; `share` waits
//! until the recipient has the file (the node's [`BlobNode::watch_served`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use kez_blobs::{BlobNode, DownloadStats, NodeConfig, RelayUrl, ServeEvent, Served};
use kez_client::files::{self, FileError};
use kez_client::{Connection, Direction, Offer, now};
use kez_core::SecretKey;
use kez_core::file::{FILE_OFFER_CONTENT_TYPE, FileOffer};
use kez_core::sigchain::Endpoint;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::display;
use crate::failure::{self, Failure, NOT_FOUND, REFUSED, RUNTIME, USAGE};
use crate::term::{self, Meter, say, tell};
use crate::{App, clock, deliver, print_json, recipient};

/// The sigchain endpoint that names the own blob node (its kind; and its name, for the
/// identity's own key: [`node_endpoint_name`]).
pub const IROH_ENDPOINT: &str = "iroh";

/// The name of the endpoint naming the blob node of `device`, a device of `chain`: `iroh` for
/// the identity's own key (as before devices), `iroh.<device name>` for another device (or
/// `iroh.<first 16 hex digits of its key>` when the name is too long for an endpoint name), so
/// that devices do not take turns overwriting one endpoint.
fn node_endpoint_name(chain: &kez_core::Sigchain, device: &kez_core::PublicKey) -> String {
    if *device == chain.chain_id() {
        return IROH_ENDPOINT.to_owned();
    }
    let name = chain
        .active_devices()
        .find(|known| known.key == *device)
        .map(|known| format!("{IROH_ENDPOINT}.{}", known.name))
        .filter(|name| name.len() <= kez_core::sigchain::MAX_NAME_LEN);
    name.unwrap_or_else(|| format!("{IROH_ENDPOINT}.{}", &device.to_hex()[..16]))
}

impl App {
    /// The home's blob node: the service's, or one opened for this command.
    pub(crate) async fn open_node(&self) -> Result<Arc<BlobNode>, Failure> {
        self.held.node(async || self.start_node().await).await
    }

    /// Starts the home's blob node, binding the address kept in the config (or, the first
    /// time, `127.0.0.1` on a port the OS picks, which is then kept).
    async fn start_node(&self) -> Result<BlobNode, Failure> {
        let bind = self
            .config
            .iroh_bind
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let relay = match &self.config.iroh_relay {
            Some(url) => Some(url.parse::<RelayUrl>().map_err(|err| {
                Failure::new(
                    USAGE,
                    format!(
                        "iroh_relay {url:?} in {} is not a relay URL ({err}): fix or remove it",
                        self.home.config_path().display()
                    ),
                )
            })?),
            None => None,
        };
        let node = BlobNode::open(
            &self.home.node_dir(),
            NodeConfig {
                bind,
                relay,
                ..NodeConfig::default()
            },
        )
        .await
        .map_err(|err| Failure::new(RUNTIME, format!("cannot start the file node ({err})")))?;
        if self.config.iroh_bind.is_none()
            && let Some(bound) = node.addr().ip_addrs().next().copied()
        {
            let mut config = self.config.clone();
            config.iroh_bind = Some(bound);
            self.home.save_config(&config).map_err(Failure::home)?;
        }
        Ok(node)
    }

    /// The home server's pin node as `kez.server.info` names it now, if it pins; `None` also
    /// when the server cannot be asked (the recorded providers are tried as they are).
    pub(crate) async fn current_pin_node(&self) -> Option<String> {
        let conn = self.connect().await.ok()?;
        let info = conn.server_info().await.ok();
        info?.pin.map(|pin| pin.provider)
    }

    /// Makes the own sigchain's `iroh` endpoint name this node's provider string, appending
    /// links only when it is missing or stale.
    pub(crate) async fn advertise_node(
        &self,
        conn: &Connection,
        key: &SecretKey,
        node: &BlobNode,
    ) -> Result<(), Failure> {
        let provider = node.provider();
        let _writing = self.held.chain_writer.lock().await;
        let mut chain = conn
            .chain(&conn.identity())
            .await
            .map_err(Failure::client)?;
        let ops = chain.ops_to_advertise(&Endpoint {
            name: node_endpoint_name(&chain, &key.public_key()),
            kind: IROH_ENDPOINT.into(),
            address: provider.clone(),
        });
        if ops.is_empty() {
            return Ok(());
        }
        for op in ops {
            let link = chain
                .next_link_by(key.public_key(), now(), op)
                .sign(key)
                .map_err(|err| {
                    Failure::new(RUNTIME, format!("cannot sign a sigchain link: {err}"))
                })?;
            conn.append(link.bytes()).await.map_err(Failure::client)?;
            chain = conn
                .chain(&conn.identity())
                .await
                .map_err(Failure::client)?;
        }
        tell!("sigchain: your file node is {provider}");
        Ok(())
    }

    /// `share @name ./file`; with `wait` (no `--no-wait`), waits until the recipient has the
    /// file (or Ctrl-C), unless it was pinned.
    pub(crate) async fn share(
        &self,
        handle: &str,
        path: &Path,
        pin: bool,
        wait: bool,
        json: bool,
    ) -> Result<(), Failure> {
        let full = self.full_handle(handle)?;
        let metadata = std::fs::metadata(path)
            .map_err(|err| Failure::new(USAGE, format!("cannot read {}: {err}", path.display())))?;
        if !metadata.is_file() {
            return Err(Failure::new(
                USAGE,
                format!("{} is not a file: share one file at a time", path.display()),
            ));
        }
        let key = self.key()?;
        let store = self.store()?;
        let conn = self.connect().await?;
        let contact = recipient(&conn, &store, self.handle()?, &full).await?;
        let pin_node = if pin {
            let info = conn.server_info().await.map_err(Failure::client)?;
            let Some(pin_info) = info.pin else {
                return Err(Failure::new(
                    REFUSED,
                    format!(
                        "{} does not pin files (its operator has not turned pinning on): share without --pin, and keep your kez-chat service running until {full} has downloaded it",
                        info.domain
                    ),
                ));
            };
            Some(pin_info)
        } else {
            None
        };
        let node = self.open_node().await?;
        self.advertise_node(&conn, &key, &node).await?;

        let meter = Meter::new("encrypting", metadata.len());
        let mut offer = files::share_file(
            &node,
            path,
            &files::new_tag("share"),
            vec![node.provider()],
            |read| meter.set(read),
        )
        .await
        .map_err(file_failure)?;
        meter.finish();
        // Durable before the offer goes out: a service killed later still serves it.
        node.sync()
            .await
            .map_err(|err| file_failure(FileError::Blobs(err)))?;
        // The pin node fetches the blob too; that is not the recipient's download.
        let mut not_recipient: Vec<String> = Vec::new();
        if let Some(pin_info) = &pin_node
            && let Ok(addr) = kez_blobs::parse_provider(&pin_info.provider)
        {
            not_recipient.push(addr.id.to_string());
        }
        if let Some(pin_info) = pin_node {
            tell!(
                "asking your server to pin it ({} of your {} quota)...",
                bytes(offer.cipher_size),
                bytes(pin_info.quota_bytes)
            );
            // The server fetches the ciphertext from this node, which serves while we wait.
            let record = match conn
                .pin_add(&offer.blob, offer.cipher_size, &offer.providers)
                .await
            {
                Ok(record) => record,
                Err(err) => {
                    return Err(Failure::client(err));
                }
            };
            not_recipient.push(record.node.clone());
            // With several server instances, the one that answered server info may not be
            // the one whose node pinned the blob: offer only the pinning node's address.
            if pin_info
                .provider
                .starts_with(&format!("iroh:{}", record.node))
            {
                // First: it is always online, and recipients try providers in order.
                offer.providers.insert(0, pin_info.provider);
                offer.pinned = true;
                offer.validate().map_err(|err| {
                    Failure::new(RUNTIME, format!("cannot offer the file: {err}"))
                })?;
                tell!("pinned: {full} can download it even while you are offline");
            } else {
                tell!(
                    "pinned on server node {}, but the server named another node; the offer lists only yours",
                    record.node
                );
            }
        }
        let body = offer
            .to_json()
            .map_err(|err| Failure::new(RUNTIME, format!("cannot write the offer: {err}")))?;
        // Watching from before the offer goes out: a quick download is not missed.
        let watch = (wait && !offer.pinned).then(|| node.watch_served());
        let sent = deliver(conn, &store, &contact, FILE_OFFER_CONTENT_TYPE, &body).await?;
        tell!(
            "shared {} ({}) with {}: encrypted blob {}",
            offer.name,
            bytes(offer.size),
            contact.handle,
            offer.blob
        );
        let downloaded = match watch {
            Some(watch) => wait_for_download(watch, &offer, &contact.handle, &not_recipient).await,
            None if offer.pinned => {
                if wait {
                    tell!("not waiting for the download: your server has the file");
                }
                false
            }
            None => {
                tell!(
                    "{} can download it while your kez-chat service runs (it serves the file), or share it again with --pin",
                    contact.handle
                );
                false
            }
        };
        if json {
            print_json(&json!({
                "offer": sent.id.to_string(),
                "to": contact.handle,
                "name": offer.name,
                "size": offer.size,
                "blob": offer.blob.to_string(),
                "cipher_size": offer.cipher_size,
                "pinned": offer.pinned,
                "providers": offer.providers,
                "downloaded": downloaded,
            }));
        } else {
            say!("{}", short_id(&sent.id.to_string()));
        }
        Ok(())
    }

    /// `files`: the offers received.
    pub(crate) fn files(&self, json: bool) -> Result<(), Failure> {
        let store = self.store()?;
        let offers = received_offers(&store)?;
        let mut list = Vec::new();
        let mut rows = Vec::new();
        for (offer_message, offer) in &offers {
            let sender = &offer_message.message.from;
            let contact = store.contact_by_key(sender).map_err(Failure::store)?;
            if json {
                list.push(json!({
                    "offer": offer_message.message.id.to_string(),
                    "from": sender.to_string(),
                    "from_handle": contact.as_ref().map(|c| c.handle.clone()),
                    "in_contacts": contact.is_some(),
                    "name": offer.name,
                    "size": offer.size,
                    "time": offer_message.message.time,
                    "blob": offer.blob.to_string(),
                    "downloaded": offer_message.downloaded.as_ref().map(|d| d.path.clone()),
                }));
                continue;
            }
            let from = contact
                .map(|c| c.handle)
                .unwrap_or_else(|| format!("(not in contacts) {sender}"));
            rows.push([
                short_id(&offer_message.message.id.to_string()).to_owned(),
                clock(offer_message.message.time),
                from,
                display::inline(&offer.name),
                bytes(offer.size),
                match &offer_message.downloaded {
                    Some(done) => format!("downloaded to {}", display::inline(&done.path)),
                    None => "not downloaded".to_owned(),
                },
            ]);
        }
        if json {
            print_json(&Value::Array(list));
        } else if offers.is_empty() {
            tell!("no files offered to you yet");
        } else {
            for line in display::columns(&rows) {
                say!("{line}");
            }
            tell!("download one with `kez-chat download <offer>` (the first column)");
        }
        Ok(())
    }

    /// `download <offer> [-o path]`.
    pub(crate) async fn download(
        &self,
        wanted: &str,
        output: Option<PathBuf>,
        json: bool,
    ) -> Result<(), Failure> {
        self.handle()?;
        let store = self.store()?;
        let offers = received_offers(&store)?;
        let wanted_lower = wanted.to_ascii_lowercase();
        let matching: Vec<&(Offer, FileOffer)> = offers
            .iter()
            .filter(|(o, _)| o.message.id.to_string().starts_with(&wanted_lower))
            .collect();
        let (offer_message, offer) = match matching.as_slice() {
            [one] => *one,
            [] => {
                return Err(Failure::new(
                    NOT_FOUND,
                    format!("no file offer {wanted:?}: `kez-chat files` lists them"),
                ));
            }
            _ => {
                return Err(Failure::new(
                    USAGE,
                    format!(
                        "{wanted:?} matches {} offers: give more of the offer id",
                        matching.len()
                    ),
                ));
            }
        };
        let sender = offer_message.message.from;
        let Some(contact) = store.contact_by_key(&sender).map_err(Failure::store)? else {
            return Err(Failure::new(
                REFUSED,
                format!(
                    "offer {} is from {sender}, who is not in your contacts: files are downloaded only from people you added. If you trust them, `kez-chat add` their handle first. Nothing was downloaded.",
                    short_id(&offer_message.message.id.to_string())
                ),
            ));
        };
        let (path, size, stats) = self.transfer(offer, &contact.handle, output).await?;
        store
            .mark_downloaded(&offer_message.message.id, &path.to_string_lossy(), now())
            .map_err(Failure::store)?;
        let about = json!({
            "offer": offer_message.message.id.to_string(),
            "from": contact.handle,
            "name": offer.name,
        });
        report_download(json, about, &path, size, &stats);
        Ok(())
    }

    /// Fetches `offer`'s blob (Ctrl-C keeps what arrived), decrypts it and writes it to
    /// `output` (default: its name here), which must not exist. Returns the absolute path,
    /// the plaintext size and the transfer's figures.
    pub(crate) async fn transfer(
        &self,
        offer: &FileOffer,
        from: &str,
        output: Option<PathBuf>,
    ) -> Result<(PathBuf, u64, DownloadStats), Failure> {
        let dest = term::path(&output.unwrap_or_else(|| PathBuf::from(&offer.name)));
        if dest.exists() {
            return Err(Failure::new(
                failure::CONFLICT,
                format!(
                    "{} exists already: choose another path with -o PATH",
                    dest.display()
                ),
            ));
        }

        // A pinned file: the home server's pin node may have moved since the offer named it.
        let offer = &FileOffer {
            providers: files::with_current_pin_node(
                &offer.providers,
                self.current_pin_node().await.as_deref(),
            ),
            ..offer.clone()
        };
        let node = self.open_node().await?;
        tell!(
            "fetching {} ({}) from {}",
            display::inline(&offer.name),
            bytes(offer.size),
            from
        );
        // Progress in the file's own size: the ciphertext is a little larger (PROTOCOL.md §9.1).
        let meter = Meter::new("downloading", offer.size);
        let plaintext_of = |cipher: u64| {
            (u128::from(cipher) * u128::from(offer.size) / u128::from(offer.cipher_size.max(1)))
                as u64
        };
        // The file is decrypted while it arrives; what is left once the fetch is done (the end,
        // the sync to disk, or all of a small file) gets a meter of its own.
        let fetch_done = AtomicBool::new(false);
        let decrypt_meter = OnceLock::new();
        let downloaded = tokio::select! {
            downloaded = files::download_to(
                &node,
                offer,
                &dest,
                |progress| {
                    meter.set(plaintext_of(progress.done));
                    if progress.total == Some(progress.done) {
                        fetch_done.store(true, Ordering::Relaxed);
                    }
                },
                |done| {
                    if fetch_done.load(Ordering::Relaxed) {
                        decrypt_meter
                            .get_or_init(|| Meter::new("verifying and decrypting", offer.size))
                            .set(done);
                    }
                },
            ) => downloaded,
            signal = term::interrupted() => {
                meter.finish();
                // The decryption stopped with the fetch; this process may end before its
                // thread removes what it wrote.
                for partial in files::partial_files(&dest) {
                    let _ = std::fs::remove_file(partial);
                }
                return Err(Failure::new(
                    RUNTIME,
                    format!("download interrupted ({signal}): what arrived is kept; run the same command again to resume"),
                ));
            }
        };
        meter.finish();
        if let Some(meter) = decrypt_meter.get() {
            meter.finish();
        }
        let (stats, size) = match downloaded {
            Ok(done) => done,
            Err(err @ FileError::Blobs(kez_blobs::Error::TooLarge { .. })) => {
                return Err(file_failure(err));
            }
            Err(err @ (FileError::Blobs(_) | FileError::NoProviders(_))) => {
                return Err(Failure::new(
                    RUNTIME,
                    format!(
                        "{err}. The sender's node must be online (their kez-chat service runs), or the file pinned on their server; run the same command again later: what arrived is kept and the download resumes."
                    ),
                ));
            }
            Err(err) => return Err(file_failure(err)),
        };
        let path = std::fs::canonicalize(&dest).unwrap_or(dest);
        let already = stats.total.saturating_sub(stats.bytes_transferred);
        tell!(
            "fetched {} over the network ({} were already here), verified (BLAKE3) and decrypted",
            bytes(stats.bytes_transferred),
            bytes(already)
        );
        Ok((path, size, stats))
    }
}

/// Waits until a peer not in `not_recipient` (endpoint ids) has fetched all of `offer`'s blob
/// from this node, showing the bytes sent, or until Ctrl-C (or the node stops). Whether the
/// recipient (`who`) got it.
async fn wait_for_download(
    mut watch: broadcast::Receiver<Served>,
    offer: &FileOffer,
    who: &str,
    not_recipient: &[String],
) -> bool {
    let blob = files::blob_hash(offer);
    tell!(
        "waiting for {who} to download it (Ctrl-C to stop waiting; your kez-chat service keeps serving it)"
    );
    let meter = Meter::new(&format!("sending to {who}"), offer.cipher_size);
    let outcome = loop {
        let event = tokio::select! {
            event = watch.recv() => event,
            signal = term::interrupted() => break Err(Some(signal)),
        };
        let served = match event {
            Ok(served) => served,
            // Missed progress only: a completion is the newest event.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => break Err(None),
        };
        let theirs = served
            .peer
            .is_none_or(|peer| !not_recipient.contains(&peer.to_string()));
        if served.hash != blob || !theirs {
            continue;
        }
        match served.event {
            // Everything they asked for: all of it, or the rest of an interrupted download.
            ServeEvent::Completed { .. } => break Ok(()),
            _ => meter.set(served.offset),
        }
    };
    meter.finish();
    match outcome {
        Ok(()) => {
            tell!("{who} has the file");
            true
        }
        Err(Some(signal)) => {
            tell!(
                "stopped waiting ({signal}); your kez-chat service keeps serving the file while it runs, so {who} can still download it"
            );
            false
        }
        Err(None) => {
            tell!(
                "stopped waiting: your kez-chat service is stopping; {who} can download the file while it runs again"
            );
            false
        }
    }
}

/// Prints a finished download: its path, or with `--json` the object `about` (what was
/// downloaded, from whom) completed with the path, size and transfer figures.
pub(crate) fn report_download(
    json: bool,
    mut about: Value,
    path: &Path,
    size: u64,
    stats: &DownloadStats,
) {
    if json {
        about["path"] = json!(path.to_string_lossy());
        about["size"] = json!(size);
        about["transferred"] = json!(stats.bytes_transferred);
        about["total"] = json!(stats.total);
        print_json(&about);
    } else {
        say!("{}", path.display());
    }
}

/// The received offers that parse, in the order they arrived; those that do not are skipped
/// with a note (they cannot be downloaded anyway).
fn received_offers(store: &kez_client::Store) -> Result<Vec<(Offer, FileOffer)>, Failure> {
    let mut out = Vec::new();
    for offer in store.offers().map_err(Failure::store)? {
        if offer.message.direction != Direction::Incoming {
            continue;
        }
        match FileOffer::from_json(&offer.message.body) {
            Ok(parsed) => out.push((offer, parsed)),
            Err(err) => tell!(
                "note: skipping offer {} from {}: {err}",
                short_id(&offer.message.id.to_string()),
                offer.message.from
            ),
        }
    }
    Ok(out)
}

/// A file failure for people.
pub(crate) fn file_failure(err: FileError) -> Failure {
    match err {
        FileError::Crypt(_) | FileError::Offer(_) => Failure::new(REFUSED, err.to_string()),
        FileError::Blobs(kez_blobs::Error::TooLarge { .. }) => Failure::new(
            REFUSED,
            format!(
                "{err}: the offer does not match the file it names; ask the sender to share it again"
            ),
        ),
        other => Failure::new(RUNTIME, other.to_string()),
    }
}

/// The first 12 hex digits of an offer (message) id: enough to name one.
pub fn short_id(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// A byte count for people.
pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if count < 1024 {
        return format!("{count} B");
    }
    let mut value = count as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}
