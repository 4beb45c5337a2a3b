//! `publish`, `unpublish`, `shared`, `browse` and `download @name/FILE`: the shared-files
//! manifest (PROTOCOL.md §11), Keybase-style, without showing anyone whom a private file is for.

use std::path::{Path, PathBuf};

use kez_blobs::BlobNode;
use kez_client::files;
use kez_client::shared::{self, Browsed, SharedError};
use kez_client::{Connection, PinChange, PinInfo, Published, Store, now};
use kez_core::file::{self as core_file};
use kez_core::manifest::{Audience, ManifestEntry};
use kez_core::{Handle, SecretKey};
use serde_json::{Value, json};

use crate::display;
use crate::failure::{CONFLICT, Failure, NOT_FOUND, REFUSED, RUNTIME, USAGE};
use crate::files::{bytes, file_failure, report_download};
use crate::term::{Meter, say, tell};
use crate::{App, clock, print_json, recipient, rotation_note};

/// Who a publish is for.
pub(crate) enum Audiences {
    /// Everyone.
    Public,
    /// These handles, as typed.
    To(Vec<String>),
}

impl App {
    /// `publish FILE (--public | --to @a ...) [--name NAME] [--pin]`.
    pub(crate) async fn publish(
        &self,
        path: &Path,
        audience: Audiences,
        name: Option<String>,
        pin: bool,
        json: bool,
    ) -> Result<(), Failure> {
        let metadata = std::fs::metadata(path)
            .map_err(|err| Failure::new(USAGE, format!("cannot read {}: {err}", path.display())))?;
        if !metadata.is_file() {
            return Err(Failure::new(
                USAGE,
                format!(
                    "{} is not a file: publish one file at a time",
                    path.display()
                ),
            ));
        }
        let name = match name {
            Some(name) => {
                core_file::check_name(&name).map_err(|err| {
                    Failure::new(USAGE, format!("--name {name:?} is not a file name: {err}"))
                })?;
                name
            }
            None => core_file::safe_name(
                &path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        };
        let key = self.key()?;
        let store = self.store()?;
        if store
            .published()
            .map_err(Failure::store)?
            .iter()
            .any(|p| p.entry.name == name)
        {
            return Err(Failure::new(
                CONFLICT,
                format!(
                    "you already publish a file named {name:?}: `kez-chat unpublish {name}` first, or publish this one under another name with --name"
                ),
            ));
        }
        let conn = self.connect().await?;
        let mut recipients = Vec::new();
        if let Audiences::To(handles) = &audience {
            for handle in handles {
                let full = self.full_handle(handle)?;
                let contact = recipient(&conn, &store, self.handle()?, &full).await?;
                if !recipients.contains(&contact.handle) {
                    recipients.push(contact.handle);
                }
            }
        }
        let pin_info = self.pin_info(&conn, &store, pin).await?;
        let node = self.open_node().await?;
        let result = self
            .publish_with(
                &conn, &store, &key, &node, path, &name, recipients, pin, pin_info,
            )
            .await;
        let (published, entry_pinned) = result?;
        node.sync()
            .await
            .map_err(|err| file_failure(files::FileError::Blobs(err)))?;
        let audience_text = match &audience {
            Audiences::Public => "everyone".to_owned(),
            Audiences::To(_) => published.recipients.join(", "),
        };
        tell!(
            "published {} ({}) for {audience_text}: manifest {} committed to your sigchain",
            published.entry.name,
            bytes(published.entry.size),
            manifest_label(&store)?,
        );
        if !entry_pinned {
            tell!(
                "it can be downloaded while you run `kez-chat listen` (your node serves it then); publish with --pin to have your server keep it"
            );
        }
        if json {
            print_json(&json!({
                "name": published.entry.name,
                "size": published.entry.size,
                "blob": published.entry.blob.to_string(),
                "public": published.recipients.is_empty(),
                "recipients": published.recipients,
                "pinned": entry_pinned,
                "manifest": manifest_json(&store)?,
            }));
        } else {
            say!("{}", published.entry.name);
        }
        Ok(())
    }

    /// The pin node to use for this publish: asked for with `--pin`, or because an earlier
    /// manifest was pinned (pinning is opt-in once). `--pin` on a server without pinning is
    /// refused; a server that stopped pinning is noted and skipped.
    async fn pin_info(
        &self,
        conn: &Connection,
        store: &Store,
        pin: bool,
    ) -> Result<Option<PinInfo>, Failure> {
        let sticky = store
            .last_manifest()
            .map_err(Failure::store)?
            .is_some_and(|m| m.pinned);
        if !pin && !sticky {
            return Ok(None);
        }
        let info = conn.server_info().await.map_err(Failure::client)?;
        match info.pin {
            Some(pin_info) => Ok(Some(pin_info)),
            None if pin => Err(Failure::new(
                REFUSED,
                format!(
                    "{} does not pin files (its operator has not turned pinning on): publish without --pin, and keep `kez-chat listen` running so people can fetch it",
                    info.domain
                ),
            )),
            None => {
                tell!(
                    "note: your manifest was pinned, but {} no longer pins files; this one is not",
                    info.domain
                );
                Ok(None)
            }
        }
    }

    /// Encrypts the file into `node`, records it, and publishes the new manifest; on failure
    /// after the file was recorded, takes it out again so nothing half-done stays.
    #[allow(clippy::too_many_arguments)]
    async fn publish_with(
        &self,
        conn: &Connection,
        store: &Store,
        key: &SecretKey,
        node: &BlobNode,
        path: &Path,
        name: &str,
        recipients: Vec<String>,
        pin_file: bool,
        pin_info: Option<PinInfo>,
    ) -> Result<(Published, bool), Failure> {
        self.advertise_node(conn, key, node).await?;
        let tag = files::new_tag("publish");
        let meter = Meter::new("encrypting", std::fs::metadata(path).map_or(0, |m| m.len()));
        let offer = files::share_file(node, path, &tag, vec![node.provider()], |read| {
            meter.set(read)
        })
        .await
        .map_err(file_failure)?;
        meter.finish();
        let mut file_pinned = false;
        if pin_file && let Some(pin) = &pin_info {
            tell!(
                "asking your server to pin it ({} of your {} quota)...",
                bytes(offer.cipher_size),
                bytes(pin.quota_bytes)
            );
            conn.pin_add(&offer.blob, offer.cipher_size, &offer.providers)
                .await
                .map_err(Failure::client)?;
            file_pinned = true;
        }
        let published = Published {
            entry: ManifestEntry {
                name: name.to_owned(),
                size: offer.size,
                time: now(),
                blob: offer.blob,
                cipher_size: offer.cipher_size,
                key: offer.key.clone(),
                wrapped: false,
            },
            recipients,
            pinned: file_pinned,
            tag,
            wraps: Default::default(),
        };
        if !store.add_published(&published).map_err(Failure::store)? {
            return Err(Failure::new(
                CONFLICT,
                format!("another kez-chat published {name:?} meanwhile: nothing changed"),
            ));
        }
        tell!("publishing your manifest...");
        if let Err(err) = shared::publish_manifest(conn, store, key, node, pin_info.as_ref()).await
        {
            let _ = store.remove_published(name);
            self.forget_blob(conn, store, node, &published).await;
            return Err(shared_failure(err));
        }
        Ok((published, file_pinned))
    }

    /// `unpublish NAME`.
    pub(crate) async fn unpublish(&self, name: &str, json: bool) -> Result<(), Failure> {
        let key = self.key()?;
        let store = self.store()?;
        let Some(removed) = store.remove_published(name).map_err(Failure::store)? else {
            let names: Vec<String> = store
                .published()
                .map_err(Failure::store)?
                .into_iter()
                .map(|p| p.entry.name)
                .collect();
            return Err(Failure::new(
                NOT_FOUND,
                if names.is_empty() {
                    format!("you publish no file named {name:?}; you publish nothing yet")
                } else {
                    format!(
                        "you publish no file named {name:?}; you publish: {}",
                        names.join(", ")
                    )
                },
            ));
        };
        let conn = self.connect().await?;
        let pin_info = match self.pin_info(&conn, &store, false).await {
            Ok(info) => info,
            Err(err) => {
                let _ = store.add_published(&removed);
                return Err(err);
            }
        };
        let node = match self.open_node().await {
            Ok(node) => node,
            Err(err) => {
                let _ = store.add_published(&removed);
                return Err(err);
            }
        };
        let result = async {
            self.advertise_node(&conn, &key, &node).await?;
            shared::publish_manifest(&conn, &store, &key, &node, pin_info.as_ref())
                .await
                .map_err(shared_failure)
        }
        .await;
        if result.is_ok() {
            self.forget_blob(&conn, &store, &node, &removed).await;
        } else {
            let _ = store.add_published(&removed);
        }
        result?;
        tell!(
            "unpublished {name}: manifest {} without it is committed to your sigchain. Whoever downloaded it already keeps their copy.",
            manifest_label(&store)?
        );
        if json {
            print_json(&json!({ "name": name, "manifest": manifest_json(&store)? }));
        }
        Ok(())
    }

    /// Drops the own node's tag for a file no longer published (unless another published
    /// entry has the same blob), and its pin.
    async fn forget_blob(
        &self,
        conn: &Connection,
        store: &Store,
        node: &BlobNode,
        published: &Published,
    ) {
        if let Err(err) = node.delete_tag(&published.tag).await {
            tell!(
                "note: cannot drop the local copy of {}: {err}",
                published.entry.name
            );
        }
        let still_named = store.published().is_ok_and(|all| {
            all.iter()
                .any(|p| p.entry.blob == published.entry.blob && p.pinned)
        });
        if published.pinned
            && !still_named
            && let Err(err) = conn.pin_remove(&published.entry.blob).await
        {
            tell!(
                "note: your server still pins {} ({err}); it is unpinned when you run `kez-chat unpublish` again or ask its operator",
                published.entry.name
            );
        }
    }

    /// `shared`: the files I publish.
    pub(crate) fn shared(&self, json: bool) -> Result<(), Failure> {
        self.handle()?;
        let store = self.store()?;
        let published = store.published().map_err(Failure::store)?;
        let manifest = store.last_manifest().map_err(Failure::store)?;
        if json {
            let files: Vec<Value> = published
                .iter()
                .map(|p| {
                    json!({
                        "name": p.entry.name,
                        "size": p.entry.size,
                        "time": p.entry.time,
                        "blob": p.entry.blob.to_string(),
                        "public": p.recipients.is_empty(),
                        "recipients": p.recipients,
                        "pinned": p.pinned,
                    })
                })
                .collect();
            print_json(&json!({
                "manifest": manifest_json(&store)?,
                "files": files,
            }));
            return Ok(());
        }
        if published.is_empty() {
            tell!("you publish no files: `kez-chat publish FILE --public` or `--to @name`");
            return Ok(());
        }
        let rows: Vec<[String; 4]> = published
            .iter()
            .map(|p| {
                let audience = if p.recipients.is_empty() {
                    "public".to_owned()
                } else {
                    format!("to {}", p.recipients.join(", "))
                };
                [
                    display::inline(&p.entry.name),
                    bytes(p.entry.size),
                    clock(p.entry.time),
                    format!("{audience}{}", if p.pinned { ", pinned" } else { "" }),
                ]
            })
            .collect();
        for line in display::columns(&rows) {
            say!("{line}");
        }
        if let Some(m) = manifest {
            tell!(
                "manifest {} of {}{}: others see only the public files and those for them",
                m.version,
                clock(m.time),
                if m.pinned { ", pinned" } else { "" }
            );
        }
        Ok(())
    }

    /// Verifies `full`'s sigchain (pinning a new contact, as `send` does) and fetches and reads
    /// their manifest. `None` when they share nothing.
    async fn fetch_manifest(&self, full: &Handle) -> Result<Option<Browsed>, Failure> {
        let key = self.key()?;
        let store = self.store()?;
        let conn = self.connect().await?;
        let verified = conn
            .verify_contact(&store, full)
            .await
            .map_err(|err| Failure::contact(err, full))?;
        let pin_node = conn
            .server_info()
            .await
            .ok()
            .and_then(|info| info.pin)
            .map(|pin| pin.provider);
        match &verified.change {
            PinChange::New => tell!(
                "{full} was not in your contacts: sigchain verified (seq {}), key {} pinned",
                verified.chain.seq(),
                verified.contact.key
            ),
            PinChange::Same => {}
            PinChange::Rotated { from } => {
                tell!("{}", rotation_note(&verified.contact, from))
            }
        }
        if verified.chain.shared_files().is_none() {
            return Ok(None);
        }
        let node = self.open_node().await?;
        tell!("fetching {full}'s manifest...");
        let browsed = shared::browse(
            &node,
            &verified.chain,
            &key,
            pin_node.as_deref(),
            Some(&store),
        )
        .await;
        browsed.map_err(|err| match err {
            SharedError::File(_) => Failure::new(
                RUNTIME,
                format!(
                    "cannot fetch {full}'s manifest: {err}. Their node must be online (they run `kez-chat listen`), or their manifest pinned on their server; try again later."
                ),
            ),
            other => shared_failure(other),
        })
    }

    /// `browse @name`.
    pub(crate) async fn browse(&self, handle: &str, json: bool) -> Result<(), Failure> {
        let full = self.full_handle(handle)?;
        let browsed = self.fetch_manifest(&full).await?;
        if json {
            print_json(&match &browsed {
                None => json!({ "handle": full, "manifest": null, "files": [] }),
                Some(b) => json!({
                    "handle": full,
                    "manifest": {
                        "hash": b.hash.to_string(),
                        "version": b.manifest.version(),
                        "time": b.manifest.time(),
                    },
                    "files": b.visible.iter().map(|v| json!({
                        "name": v.entry.name,
                        "size": v.entry.size,
                        "time": v.entry.time,
                        "blob": v.entry.blob.to_string(),
                        "audience": v.audience,
                    })).collect::<Vec<_>>(),
                }),
            });
            return Ok(());
        }
        let Some(browsed) = browsed else {
            tell!("{full} shares no files");
            return Ok(());
        };
        tell!(
            "{full} shares {} with you (manifest {} of {}, verified)",
            display::plural(browsed.visible.len(), "file"),
            browsed.manifest.version(),
            clock(browsed.manifest.time())
        );
        let rows: Vec<[String; 4]> = browsed
            .visible
            .iter()
            .map(|visible| {
                [
                    display::inline(&visible.entry.name),
                    bytes(visible.entry.size),
                    clock(visible.entry.time),
                    match (visible.audience, visible.entry.wrapped) {
                        (Audience::Public, _) => "public",
                        (Audience::Private, false) => "shared with you",
                        (Audience::Private, true) => "shared with you (key not arrived yet)",
                    }
                    .to_owned(),
                ]
            })
            .collect();
        for line in display::columns(&rows) {
            say!("{line}");
        }
        if let Some(first) = browsed.visible.first() {
            tell!(
                "download one with `kez-chat download {full}/NAME`, e.g. `kez-chat download {}`",
                display::shell_word(&format!("{full}/{}", first.entry.name))
            );
        }
        Ok(())
    }

    /// `download @name/FILE [-o PATH]`.
    pub(crate) async fn download_published(
        &self,
        handle: &str,
        name: &str,
        output: Option<PathBuf>,
        json: bool,
    ) -> Result<(), Failure> {
        let full = self.full_handle(handle)?;
        let Some(browsed) = self.fetch_manifest(&full).await? else {
            return Err(Failure::new(NOT_FOUND, format!("{full} shares no files")));
        };
        let Some(visible) = browsed.visible.iter().find(|v| v.entry.name == name) else {
            let names: Vec<&str> = browsed
                .visible
                .iter()
                .map(|v| v.entry.name.as_str())
                .collect();
            return Err(Failure::new(
                NOT_FOUND,
                if names.is_empty() {
                    format!(
                        "{full} shares no file named {name:?} with you; they share nothing you can see"
                    )
                } else {
                    format!(
                        "{full} shares no file named {name:?} with you; you can see: {}",
                        display::inline(&names.join(", "))
                    )
                },
            ));
        };
        let offer = browsed
            .offer(visible, &full.to_string())
            .map_err(shared_failure)?;
        let (path, size, stats) = self.transfer(&offer, &full.to_string(), output).await?;
        let about = json!({ "from": full, "name": visible.entry.name });
        report_download(json, about, &path, size, &stats);
        Ok(())
    }

    /// `profile`'s line about shared files: how many I may see, and the manifest's date.
    /// Failing to fetch is a note, not an error.
    pub(crate) async fn visible_files(&self, chain: &kez_client::VerifiedChain) -> Value {
        let Ok(key) = self.key() else {
            return json!({ "error": "not registered" });
        };
        let pin_node = self.current_pin_node().await;
        let node = match self.open_node().await {
            Ok(node) => node,
            Err(err) => return json!({ "error": err.message }),
        };
        let browsed = shared::browse(&node, chain, &key, pin_node.as_deref(), None).await;
        match browsed {
            Ok(Some(b)) => json!({
                "visible": b.visible.len(),
                "version": b.manifest.version(),
                "time": b.manifest.time(),
            }),
            Ok(None) => json!({ "visible": 0 }),
            Err(err) => json!({ "error": err.to_string() }),
        }
    }
}

/// The own last committed manifest for `--json`: version, hash, time and whether pinned, or
/// `null`.
fn manifest_json(store: &Store) -> Result<Value, Failure> {
    Ok(match store.last_manifest().map_err(Failure::store)? {
        Some(m) => json!({
            "version": m.version,
            "hash": m.hash.to_string(),
            "time": m.time,
            "pinned": m.pinned,
        }),
        None => Value::Null,
    })
}

/// "manifest 4 (hash)" for status lines.
fn manifest_label(store: &Store) -> Result<String, Failure> {
    Ok(match store.last_manifest().map_err(Failure::store)? {
        Some(m) => format!("{} ({})", m.version, m.hash),
        None => "(none)".to_owned(),
    })
}

/// A publish or browse failure for people.
fn shared_failure(err: SharedError) -> Failure {
    match err {
        SharedError::Client(err) => Failure::client(*err),
        SharedError::Store(err) => Failure::store(err),
        SharedError::File(err) => file_failure(err),
        SharedError::Manifest(_) => Failure::new(
            REFUSED,
            format!("{err}; nothing from it is shown or downloaded"),
        ),
        SharedError::UnknownRecipient(_) => Failure::new(USAGE, err.to_string()),
        SharedError::Read(_) | SharedError::KeyNotArrived { .. } => {
            Failure::new(RUNTIME, err.to_string())
        }
    }
}
