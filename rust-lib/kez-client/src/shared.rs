//! The shared-files manifest (PROTOCOL.md §11): publish the own manifest from the files kept in
//! the [`Store`], and browse someone's — fetched over iroh from the providers their verified
//! sigchain names, checked against the hash and key it commits to, then read with the own key.
//!
//! A private entry's key is forward secret (PROTOCOL.md §11.5): for each recipient with a
//! device that has an Olm key, the publisher draws a wrap, sends it in a forward-secret
//! `kez.file-key` message before the manifest that needs it is committed, and seals to those
//! devices the entry with its key XOR the wrap. A device key stolen later opens the box, but
//! not the file: the wrap is in the recipient's store, not in any box.

use std::collections::BTreeMap;

use kez_blobs::{BlobNode, Hash};
use kez_core::file::{BlobHash, ContentKey, FileOffer};
use kez_core::manifest::{
    self, FILE_KEY_CONTENT_TYPE, FileKey, MAX_MANIFEST_BYTES, Manifest, ManifestError,
    PrivateEntry, VisibleEntry,
};
use kez_core::sigchain::{Op, SharedFiles};
use kez_core::{PublicKey, SecretKey};

use kez_proto::answer::PinInfo;
use tokio::io::AsyncReadExt;

use crate::connection::{ClientError, Connection, now};
use crate::files::{self, FileError};
use crate::store::{PublishedManifest, SentWrap, Store, StoreError};
use kez_core::trust::VerifiedChain;

/// Why publishing or browsing a manifest failed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The manifest is refused (or could not be built); the code says why.
    #[error("the shared-files manifest is refused ({code}: {0})", code = .0.code())]
    Manifest(#[from] ManifestError),
    /// Fetching or importing it failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The server refused a call or was unreachable.
    #[error(transparent)]
    Client(Box<ClientError>),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The fetched manifest could not be read back from the own file node.
    #[error("cannot read the fetched manifest from the file node: {0}")]
    Read(std::io::Error),
    /// A private file's recipient is no longer in the contacts.
    #[error(
        "{0}, a recipient of a published file, is not in your contacts: `kez-chat add` them again, or unpublish what you shared with them"
    )]
    UnknownRecipient(String),
    /// A private entry's key is wrapped, and the `kez.file-key` message with its wrap has not
    /// been received yet (PROTOCOL.md §11.5).
    #[error(
        "the key for {name} from {owner} has not arrived yet: run `kez-chat inbox` and try again"
    )]
    KeyNotArrived {
        /// The file's name.
        name: String,
        /// Whose manifest it is in.
        owner: String,
    },
}

impl From<ClientError> for SharedError {
    fn from(err: ClientError) -> SharedError {
        SharedError::Client(Box::new(err))
    }
}

/// What a reader sees of someone's manifest.
#[derive(Debug, Clone)]
pub struct Browsed {
    /// Its BLAKE3 hash (the one the sigchain commits to).
    pub hash: BlobHash,
    /// The verified manifest.
    pub manifest: Manifest,
    /// Where it and its files are fetched from (the `set_shared_files` link's providers).
    pub providers: Vec<String>,
    /// The public entries and those sealed to the reader, unwrapped where the wrap has
    /// arrived: an entry still `wrapped` waits for its `kez.file-key` message.
    pub visible: Vec<VisibleEntry>,
}

impl Browsed {
    /// `visible` as a file offer to download, `owner` (a handle) naming whose it is in the
    /// error: [`SharedError::KeyNotArrived`] when its key is still wrapped, which never
    /// decrypts the file.
    pub fn offer(&self, visible: &VisibleEntry, owner: &str) -> Result<FileOffer, SharedError> {
        if visible.entry.wrapped {
            return Err(SharedError::KeyNotArrived {
                name: visible.entry.name.clone(),
                owner: owner.to_owned(),
            });
        }
        Ok(visible.entry.offer(self.providers.clone()))
    }
}

/// Builds manifest number `version` from the files in `store`: public ones plain, private
/// ones sealed to each device of each recipient as pinned in the contacts — with the key
/// wrapped ([`ManifestEntry::wrap`](kez_core::manifest::ManifestEntry::wrap)) for the devices
/// a wrap was sent to ([`send_wraps`]), plain for the others.
pub fn build_own(
    store: &Store,
    key: &SecretKey,
    version: u64,
    time: u64,
) -> Result<Vec<u8>, SharedError> {
    let mut public = Vec::new();
    let mut private = Vec::new();
    for published in store.published()? {
        if published.recipients.is_empty() {
            public.push(published.entry);
            continue;
        }
        let mut plain = Vec::with_capacity(published.recipients.len());
        let mut wrapped = Vec::new();
        for handle in &published.recipients {
            let contact = store
                .contact(handle)?
                .ok_or_else(|| SharedError::UnknownRecipient(handle.clone()))?;
            let sent = published.wraps.get(&contact.key);
            let (to_wrapped, to_plain): (Vec<_>, Vec<_>) = contact
                .recipient_keys()
                .into_iter()
                .partition(|device| sent.is_some_and(|sent| sent.devices.contains(device)));
            plain.extend(to_plain);
            if let Some(sent) = sent.filter(|_| !to_wrapped.is_empty()) {
                wrapped.push(PrivateEntry {
                    entry: published.entry.wrap(&sent.wrap),
                    recipients: to_wrapped,
                });
            }
        }
        // No device at all is refused by `build`, as before.
        if !plain.is_empty() || wrapped.is_empty() {
            private.push(PrivateEntry {
                entry: published.entry,
                recipients: plain,
            });
        }
        private.extend(wrapped);
    }
    Ok(manifest::build(key, version, time, &public, &private)?)
}

/// Makes sure every recipient of a private file whose devices have Olm keys holds the wrap
/// of its entry (PROTOCOL.md §11.5): draws one (reusing the one of another published entry of
/// the same blob for that recipient, since a recipient keeps one wrap per owner and blob),
/// sends it in a `kez.file-key` message to the recipient (all its devices, and the own
/// others), and keeps it with the published file. A wrap already sent to all those devices is
/// not sent again; when a device gained an Olm key since, the same wrap is sent again. Called
/// before the manifest that carries the wrapped keys is committed, so that a recipient who
/// sees a wrapped entry can always unwrap it once its inbox is read.
pub async fn send_wraps(conn: &Connection, store: &Store) -> Result<(), SharedError> {
    let published = store.published()?;
    let mut known: BTreeMap<(PublicKey, BlobHash), ContentKey> = BTreeMap::new();
    for file in &published {
        for (recipient, sent) in &file.wraps {
            known.insert((*recipient, file.entry.blob), sent.wrap.clone());
        }
    }
    for file in published {
        if file.recipients.is_empty() {
            continue;
        }
        let mut wraps = file.wraps.clone();
        for handle in &file.recipients {
            let contact = store
                .contact(handle)?
                .ok_or_else(|| SharedError::UnknownRecipient(handle.clone()))?;
            let olm: Vec<PublicKey> = contact
                .recipient_keys()
                .into_iter()
                .filter(|device| contact.olm_keys.contains_key(device))
                .collect();
            let sent = wraps.get(&contact.key);
            if olm.is_empty()
                || sent.is_some_and(|sent| olm.iter().all(|d| sent.devices.contains(d)))
            {
                continue;
            }
            let wrap = known
                .entry((contact.key, file.entry.blob))
                .or_insert_with(ContentKey::generate)
                .clone();
            let body = FileKey {
                blob: file.entry.blob,
                wrap: wrap.clone(),
            }
            .encode();
            let delivered = conn.send(&contact, FILE_KEY_CONTENT_TYPE, &body).await?;
            let mut devices = sent.map(|sent| sent.devices.clone()).unwrap_or_default();
            // A device the server did not take it for keeps getting the plain key.
            for device in olm {
                if !devices.contains(&device)
                    && !delivered.missed.iter().any(|(missed, _)| *missed == device)
                {
                    devices.push(device);
                }
            }
            wraps.insert(contact.key, SentWrap { wrap, devices });
            store.set_published_wraps(&file.entry.name, &wraps)?;
        }
    }
    Ok(())
}

/// Builds the next manifest from `store`, keeps it in `node`, pins it when `pin` names the
/// home server's pin node, commits it with a `set_shared_files` link, records it, and then
/// drops (and unpins) the manifest it replaces. The wraps of private entries are sent first
/// ([`send_wraps`]).
pub async fn publish_manifest(
    conn: &Connection,
    store: &Store,
    key: &SecretKey,
    node: &BlobNode,
    pin: Option<&PinInfo>,
) -> Result<PublishedManifest, SharedError> {
    let last = store.last_manifest()?;
    let version = last.as_ref().map_or(1, |m| m.version + 1);
    let time = now();
    send_wraps(conn, store).await?;
    let bytes = build_own(store, key, version, time)?;
    let size = bytes.len() as u64;
    let tag = format!("kez/manifest/{version}");
    let (hash, _) = node
        .import_stream(futures::stream::iter([Ok(bytes::Bytes::from(bytes))]), &tag)
        .await
        .map_err(FileError::from)?;
    let hash = BlobHash::from_bytes(*hash.as_bytes());
    let mut providers = vec![node.provider()];
    if let Some(pin) = pin {
        let record = conn.pin_add(&hash, size, &providers).await?;
        // With several server instances, only the instance that pinned it serves it. It goes
        // first: it is always online, and a reader tries providers in order.
        if pin.provider.starts_with(&format!("iroh:{}", record.node)) {
            providers.insert(0, pin.provider.clone());
        }
    }
    let chain = conn.chain(&conn.identity()).await?;
    let link = chain
        .next_link_by(
            key.public_key(),
            time,
            Op::SetSharedFiles(SharedFiles {
                manifest: hash.to_string(),
                providers,
            }),
        )
        .sign(key)
        .map_err(|err| ManifestError::Malformed(err.to_string()))?;
    conn.append(link.bytes()).await?;
    let published = PublishedManifest {
        version,
        hash,
        time,
        tag,
        pinned: pin.is_some(),
    };
    store.set_last_manifest(&published)?;
    if let Some(old) = last {
        if let Err(err) = node.delete_tag(&old.tag).await {
            tracing::warn!(%err, tag = old.tag, "cannot drop the replaced manifest's tag");
        }
        if old.pinned
            && let Err(err) = conn.pin_remove(&old.hash).await
        {
            tracing::warn!(%err, blob = %old.hash, "cannot unpin the replaced manifest");
        }
    }
    Ok(published)
}

/// Fetches the manifest `chain` commits to into `node`, checks it (PROTOCOL.md §11.3) and reads
/// it with `reader`'s key. `None` when the chain commits to no manifest. `pin_node` is the home
/// server's pin node as it is now ([`files::with_current_pin_node`]), if it pins. Wrapped
/// entries are unwrapped with the wraps in `wraps` (the reader's store) that have arrived;
/// without a store, or before their wrap arrives, they stay wrapped ([`Browsed::offer`]).
pub async fn browse(
    node: &BlobNode,
    chain: &VerifiedChain,
    reader: &SecretKey,
    pin_node: Option<&str>,
    wraps: Option<&Store>,
) -> Result<Option<Browsed>, SharedError> {
    let Some(committed) = chain.shared_files() else {
        return Ok(None);
    };
    let expected: BlobHash = committed.manifest.parse().map_err(|_| {
        ManifestError::Malformed("the sigchain's manifest hash is not 64 hex digits".into())
    })?;
    let hash = Hash::from_bytes(*expected.as_bytes());
    let providers = files::with_current_pin_node(&committed.providers, pin_node);
    // A manifest larger than a reader takes stops as soon as it shows.
    let stats =
        files::fetch_blob(node, hash, &providers, MAX_MANIFEST_BYTES as u64, |_| {}).await?;
    let mut bytes = Vec::with_capacity(stats.total as usize);
    node.reader(hash)
        .await
        .map_err(FileError::from)?
        .take(MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(SharedError::Read)?;
    let owners: Vec<PublicKey> = chain.active_devices().map(|device| device.key).collect();
    let manifest = Manifest::open(&bytes, &expected, &owners)?;
    let mut visible = manifest.visible_to(reader)?;
    if let Some(store) = wraps {
        for seen in visible.iter_mut().filter(|seen| seen.entry.wrapped) {
            if let Some(wrap) = store.file_wrap(&chain.chain_id(), &seen.entry.blob)? {
                seen.entry = seen.entry.unwrap_with(&wrap);
            }
        }
    }
    Ok(Some(Browsed {
        hash: expected,
        manifest,
        providers,
        visible,
    }))
}
