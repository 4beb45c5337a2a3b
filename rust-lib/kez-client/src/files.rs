//! Files over iroh (PROTOCOL.md §9): encrypt a file into the own blob node, describe it in a
//! [`FileOffer`], fetch an offered blob from its providers and decrypt it into place.
//!
//! A file is encrypted while it is read, and the ciphertext streams into the blob store: no
//! plaintext copy and no temporary ciphertext file, and memory stays at a few segments whatever
//! the file's size. A download is decrypted into a temporary file beside the destination, which
//! is renamed into place only when every segment authenticated: a failed check never leaves a
//! file behind, and an interrupted fetch resumes (the blob store keeps what arrived).

use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kez_blobs::{BlobNode, DownloadStats, Hash, Progress, parse_provider};
use kez_core::file::{
    self, BlobHash, ContentKey, Encryptor, FileCryptError, FileOffer, FileOfferError,
};

/// The blob node's directory inside a client home.
pub const NODE_DIR: &str = "iroh";

/// How many encrypted segments may wait between the encrypting thread and the blob store.
const PIPELINE_SEGMENTS: usize = 4;

/// Why sharing or downloading a file failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading or writing a local file failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file changed (its size or modification time) while it was being shared.
    #[error("{} changed while it was being shared; share it again", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// Encryption failed, or the downloaded ciphertext did not decrypt: wrong key, tampered
    /// or truncated data. Nothing was written.
    #[error("the file does not decrypt ({code}: {0}); nothing was written", code = .0.code())]
    Crypt(#[from] FileCryptError),
    /// The blob node failed (import, fetch, read).
    #[error(transparent)]
    Blobs(#[from] kez_blobs::Error),
    /// The offer is not valid.
    #[error("the file offer is not valid ({code}: {0})", code = .0.code())]
    Offer(#[from] FileOfferError),
    /// None of the offer's providers could be parsed.
    #[error("the offer names no provider this client can reach: {0}")]
    NoProviders(String),
}

/// Encrypts the file at `path` with a fresh content key into `node`, tagged `tag` so it stays
/// (see [`new_tag`]), and returns the offer for it, listing `providers` (at least the own
/// node's provider string). `progress` is called with the plaintext bytes read so far.
pub async fn share_file(
    node: &BlobNode,
    path: &Path,
    tag: &str,
    providers: Vec<String>,
    progress: impl FnMut(u64),
) -> Result<FileOffer, FileError> {
    let io_error = |action: &'static str| {
        let path = path.to_path_buf();
        move |source| FileError::Io {
            action,
            path,
            source,
        }
    };
    let source = File::open(path).map_err(io_error("open"))?;
    let at_open = source.metadata().map_err(io_error("read the size of"))?;
    let size = at_open.len();
    // The same file (inode) is checked after reading: a file replaced or written meanwhile is
    // refused, whatever its path points at by then.
    let watched = source.try_clone().map_err(io_error("open"))?;
    let name = file::safe_name(
        &path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let key = ContentKey::generate();
    let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(PIPELINE_SEGMENTS);
    let (read_tx, read_rx) = tokio::sync::watch::channel(0u64);
    let encrypt_key = key.clone();
    let encrypting = tokio::task::spawn_blocking(move || {
        // Exactly the size announced: a file that keeps growing is not read on past it.
        let counted = Counting::new(BufReader::new(io::Read::take(source, size)), read_tx);
        let mut encryptor = Encryptor::new(&encrypt_key, counted);
        loop {
            let mut chunk = Vec::new();
            match encryptor.next_chunk_into(&mut chunk) {
                Ok(more) => {
                    if !chunk.is_empty() && chunks_tx.blocking_send(Ok(chunk.into())).is_err() {
                        return Ok(());
                    }
                    if !more {
                        return Ok(());
                    }
                }
                Err(err) => {
                    let _ = chunks_tx.blocking_send(Err(io::Error::other(err.to_string())));
                    return Err(err);
                }
            }
        }
    });
    let stream = futures::stream::unfold(chunks_rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let imported = with_progress(node.import_stream(stream, tag), read_rx, progress).await;
    let encrypted = encrypting
        .await
        .map_err(|err| io_error("encrypt")(io::Error::other(err)))
        .and_then(|encrypted| encrypted.map_err(FileError::from));
    let checked = match (encrypted, imported) {
        (Err(err), _) => Err(err),
        (Ok(()), Err(err)) => Err(err.into()),
        (Ok(()), Ok((hash, cipher_size))) => {
            let unchanged = watched.metadata().is_ok_and(|now| {
                now.len() == size && now.modified().ok() == at_open.modified().ok()
            });
            if unchanged && file::ciphertext_len(size) == Some(cipher_size) {
                Ok((hash, cipher_size))
            } else {
                Err(FileError::Changed {
                    path: path.to_path_buf(),
                })
            }
        }
    };
    let (hash, cipher_size) = match checked {
        Ok(imported) => imported,
        Err(err) => {
            // Nothing of a failed share stays: not its tag, not its (partial) blob.
            node.delete_tag(tag).await?;
            node.collect_garbage().await?;
            return Err(err);
        }
    };
    let offer = FileOffer {
        name,
        size,
        blob: BlobHash::from_bytes(*hash.as_bytes()),
        cipher_size,
        providers,
        key,
        pinned: false,
    };
    offer.validate()?;
    Ok(offer)
}

/// `providers` with the home server's pin node at the address it has now: a provider naming
/// the pin node's endpoint (a pinned blob) is replaced by `pin_node`, the pin node's provider
/// string as `kez.server.info` gives it today (PROTOCOL.md §9.5). The node keeps its endpoint
/// id, but may listen elsewhere than when an offer or a manifest named it.
pub fn with_current_pin_node(providers: &[String], pin_node: Option<&str>) -> Vec<String> {
    let current = pin_node.and_then(|provider| {
        kez_blobs::parse_provider(provider)
            .ok()
            .map(|addr| (addr.id, provider))
    });
    providers
        .iter()
        .map(
            |provider| match (&current, kez_blobs::parse_provider(provider)) {
                (Some((id, now)), Ok(addr)) if addr.id == *id => (*now).to_owned(),
                _ => provider.clone(),
            },
        )
        .collect()
}

/// Fetches the offer's blob into `node`, trying its providers in order; only what is missing
/// is transferred (an interrupted download resumes). iroh verifies every chunk; a blob larger
/// than the offer's `cipher_size` stops at once.
pub async fn fetch(
    node: &BlobNode,
    offer: &FileOffer,
    progress: impl FnMut(Progress),
) -> Result<DownloadStats, FileError> {
    fetch_blob(
        node,
        blob_hash(offer),
        &offer.providers,
        offer.cipher_size,
        progress,
    )
    .await
}

/// Fetches blob `hash`, at most `max_size` bytes, into `node` from the first of `providers`
/// (provider strings, §9.5) that has it, tagged so it stays; only what is missing is
/// transferred.
pub async fn fetch_blob(
    node: &BlobNode,
    hash: Hash,
    providers: &[String],
    max_size: u64,
    progress: impl FnMut(Progress),
) -> Result<DownloadStats, FileError> {
    let mut reachable = Vec::new();
    let mut unusable = Vec::new();
    for text in providers {
        match parse_provider(text) {
            Ok(addr) => reachable.push(addr),
            Err(err) => unusable.push(format!("{text}: {err}")),
        }
    }
    if reachable.is_empty() {
        return Err(FileError::NoProviders(unusable.join("; ")));
    }
    let tag = format!("kez/download/{hash}");
    Ok(node
        .download(hash, &reachable, &tag, max_size, progress)
        .await?)
}

/// Fetches the offer's blob into `node` (as [`fetch`]) and decrypts it to `dest` while it
/// arrives (as [`decrypt_to`]): every segment as soon as iroh verified and stored it, so the
/// whole takes about as long as the slower of the two, not their sum. The file reaches `dest`
/// only when the whole blob arrived and every segment authenticated. Answers the fetch's
/// figures and the plaintext size.
///
/// A failed fetch answers its error ([`FileError::Blobs`], [`FileError::NoProviders`]) and
/// leaves no file: what arrived stays in the store for a resume. Otherwise a decryption
/// failure is answered as [`decrypt_to`] would. `fetched` is called as bytes arrive, last with
/// the whole blob; `decrypted` with the plaintext bytes written.
pub async fn download_to(
    node: &BlobNode,
    offer: &FileOffer,
    dest: &Path,
    fetched: impl FnMut(Progress),
    decrypted: impl FnMut(u64),
) -> Result<(DownloadStats, u64), FileError> {
    let Some((following, reader)) = node.follow(blob_hash(offer), offer.cipher_size).await? else {
        // A small blob, kept inline by the store: there is nothing to overlap.
        let stats = fetch_reporting_all(node, offer, fetched).await?;
        return Ok((stats, decrypt_to(node, offer, dest, decrypted).await?));
    };
    let fetching = async {
        let outcome = fetch_reporting_all(node, offer, fetched).await;
        if let Err(err) = &outcome {
            // The reader then fails instead of waiting for bytes that do not come.
            following.stop(&err.to_string());
        }
        outcome
    };
    let (stats, size) = tokio::join!(fetching, decrypt_from(reader, offer, dest, decrypted));
    Ok((stats?, size?))
}

/// [`fetch`], reporting the whole blob last, also when it was complete here already.
async fn fetch_reporting_all(
    node: &BlobNode,
    offer: &FileOffer,
    mut fetched: impl FnMut(Progress),
) -> Result<DownloadStats, FileError> {
    let stats = fetch(node, offer, &mut fetched).await?;
    fetched(Progress {
        done: stats.total,
        total: Some(stats.total),
    });
    Ok(stats)
}

/// Decrypts the offer's blob (complete in `node`) to `dest`: into a temporary file beside it,
/// renamed into place only when the whole file authenticated. Returns the plaintext size.
/// `progress` is called with the plaintext bytes written so far.
pub async fn decrypt_to(
    node: &BlobNode,
    offer: &FileOffer,
    dest: &Path,
    progress: impl FnMut(u64),
) -> Result<u64, FileError> {
    let (reader, _) = node.blocking_reader(blob_hash(offer)).await?;
    decrypt_from(reader, offer, dest, progress).await
}

/// Decrypts the offer's ciphertext from `reader` to `dest`, as [`decrypt_to`] describes.
async fn decrypt_from(
    reader: impl io::Read + Send + 'static,
    offer: &FileOffer,
    dest: &Path,
    progress: impl FnMut(u64),
) -> Result<u64, FileError> {
    let temp = attempt_path(dest);
    let target = dest.to_path_buf();
    let dest = dest.to_path_buf();
    let key = offer.key.clone();
    let cipher_size = offer.cipher_size;
    let (written_tx, written_rx) = tokio::sync::watch::channel(0u64);
    let decrypting = tokio::task::spawn_blocking(move || {
        remove_abandoned_partials(&dest, std::time::SystemTime::now());
        let result = write_decrypted(&key, reader, &temp, cipher_size, written_tx);
        match result {
            Ok(size) => {
                std::fs::rename(&temp, &dest).map_err(|source| FileError::Io {
                    action: "move the decrypted file into place at",
                    path: dest.clone(),
                    source,
                })?;
                if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
                    // The rename is durable once the directory is.
                    let _ = File::open(dir).and_then(|d| d.sync_all());
                }
                Ok(size)
            }
            Err(err) => {
                let _ = std::fs::remove_file(&temp);
                Err(err)
            }
        }
    });
    with_progress(decrypting, written_rx, progress)
        .await
        .map_err(|err| FileError::Io {
            action: "decrypt into",
            path: target,
            source: io::Error::other(err),
        })?
}

fn write_decrypted(
    key: &ContentKey,
    ciphertext: impl io::Read,
    temp: &Path,
    cipher_size: u64,
    written: tokio::sync::watch::Sender<u64>,
) -> Result<u64, FileError> {
    let io_error = |action: &'static str| {
        let path = temp.to_path_buf();
        move |source| FileError::Io {
            action,
            path,
            source,
        }
    };
    // A name of this attempt's own, made here: an earlier attempt's decryption (a download
    // cancelled in the service, whose blocking thread runs until its reader fails) can never
    // write into, or remove, this one's file.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(io_error("create"))?;
    let syncing = file.try_clone().map_err(io_error("open"))?;
    std::thread::scope(|scope| {
        // The disk writes while the file is decrypted, not only once it all is: without this,
        // the kernel holds the whole file in its cache until the final fsync, which then waits
        // for all of it (about as long again as decrypting it).
        let (due, due_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let syncer = scope.spawn(move || {
            for () in due_rx {
                syncing.sync_data()?;
            }
            Ok::<(), io::Error>(())
        });
        let early = EarlySync {
            inner: Counting::new(file, written),
            unsynced: 0,
            due,
        };
        let mut out = BufWriter::new(early);
        let decrypted = file::decrypt_exact(key, ciphertext, &mut out, cipher_size);
        let file = out
            .into_inner()
            .map_err(|err| io_error("write")(err.into_error()))
            .map(|early| early.inner.inner);
        // The syncer ends when `due` is dropped, with `out`. Its first error is this file's
        // (a failed background sync consumes the error the final one would have reported).
        let synced = syncer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the syncing thread panicked")));
        let size = decrypted?;
        let file = file?;
        synced.map_err(io_error("write"))?;
        file.sync_all().map_err(io_error("write"))?;
        Ok(size)
    })
}

/// Bytes written before the syncing thread is asked to flush them to the disk.
const SYNC_EVERY: u64 = 16 * 1024 * 1024;

/// A writer that asks a syncing thread to flush the file every [`SYNC_EVERY`] bytes, without
/// waiting for it: one request may wait while a flush runs, and it covers any made meanwhile.
struct EarlySync<W> {
    inner: W,
    unsynced: u64,
    due: std::sync::mpsc::SyncSender<()>,
}

impl<W: io::Write> io::Write for EarlySync<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.unsynced += written as u64;
        if self.unsynced >= SYNC_EVERY {
            self.unsynced = 0;
            let _ = self.due.try_send(());
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The prefix of the names a download of `dest` is decrypted under before it is renamed into
/// place: hidden files in the same directory (a rename across file systems would not be
/// atomic), `.<name>.kez-partial.<attempt>`, one per attempt.
fn partial_prefix(dest: &Path) -> String {
    let name = dest
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.kez-partial.")
}

/// A new attempt's file for `dest` ([`partial_prefix`] and 16 random hex digits).
fn attempt_path(dest: &Path) -> PathBuf {
    use rand_core::RngCore as _;
    let attempt = rand_core::OsRng.next_u64();
    dest.with_file_name(format!("{}{attempt:016x}", partial_prefix(dest)))
}

/// The decryptions of `dest` not finished (or not cleaned up: a process killed while
/// decrypting leaves its file), in the directory `dest` is downloaded to.
pub fn partial_files(dest: &Path) -> Vec<PathBuf> {
    let prefix = partial_prefix(dest);
    let dir = match dest.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        Some(dir) => dir.to_path_buf(),
        None => PathBuf::from("."),
    };
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path())
        .collect()
}

/// How long a partial file may go unwritten before a new download of the same name takes it
/// for one a killed process left (a live decryption writes as its bytes arrive).
const PARTIAL_ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the partial files of `dest` ([`partial_files`]) unwritten for
/// [`PARTIAL_ABANDONED_AFTER`] at `now`: a process killed while decrypting cannot remove its
/// own, and another download of the same name may be writing the recent ones.
fn remove_abandoned_partials(dest: &Path, now: std::time::SystemTime) {
    for partial in partial_files(dest) {
        let abandoned = std::fs::metadata(&partial)
            .and_then(|meta| meta.modified())
            .is_ok_and(|modified| {
                now.duration_since(modified)
                    .is_ok_and(|unwritten| unwritten >= PARTIAL_ABANDONED_AFTER)
            });
        if abandoned {
            let _ = std::fs::remove_file(&partial);
        }
    }
}

/// The offer's blob hash as iroh's type.
pub fn blob_hash(offer: &FileOffer) -> Hash {
    Hash::from_bytes(*offer.blob.as_bytes())
}

/// A fresh tag for a file kept in the own node: `kez/<kind>/<32 random hex digits>` (`share`,
/// `publish`).
pub fn new_tag(kind: &str) -> String {
    let random = kez_core::envelope::MessageId::random();
    format!(
        "kez/{kind}/{}",
        data_encoding::HEXLOWER.encode(random.as_bytes())
    )
}

/// Counts the bytes read from or written to `inner`, for progress.
struct Counting<T> {
    inner: T,
    count: u64,
    report: tokio::sync::watch::Sender<u64>,
}

impl<T> Counting<T> {
    fn new(inner: T, report: tokio::sync::watch::Sender<u64>) -> Counting<T> {
        Counting {
            inner,
            count: 0,
            report,
        }
    }

    fn add(&mut self, bytes: usize) {
        self.count += bytes as u64;
        let _ = self.report.send(self.count);
    }
}

impl<R: io::Read> io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.add(read);
        Ok(read)
    }
}

impl<W: io::Write> io::Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.add(written);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Runs `work` to its end, calling `progress` with every count `counts` reports meanwhile.
async fn with_progress<T>(
    work: impl std::future::Future<Output = T>,
    mut counts: tokio::sync::watch::Receiver<u64>,
    mut progress: impl FnMut(u64),
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            changed = counts.changed() => match changed {
                Ok(()) => progress(*counts.borrow()),
                // The counting side is done: nothing more to report.
                Err(_) => return work.await,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_pin_node_is_found_at_its_address_now() {
        let pin = "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";
        let owner = "6c189c7295667995fb2374d35df7acf47324296c8ca04c1814206fa70dddcd4f";
        let recorded = vec![
            format!("iroh:{pin};ip=127.0.0.1:40001"),
            format!("iroh:{owner};ip=127.0.0.1:40002"),
            "not a provider".to_owned(),
        ];
        let now = format!("iroh:{pin};ip=127.0.0.1:50001");
        assert_eq!(
            with_current_pin_node(&recorded, Some(&now)),
            [now.clone(), recorded[1].clone(), recorded[2].clone()]
        );
        assert_eq!(with_current_pin_node(&recorded, None), recorded);
        let elsewhere = format!("iroh:{owner}a;ip=127.0.0.1:1");
        assert_eq!(with_current_pin_node(&recorded, Some(&elsewhere)), recorded);
    }

    #[test]
    fn partial_files_left_unwritten_for_an_hour_are_removed_and_recent_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("report.pdf");
        let now = std::time::SystemTime::now();
        let made = |suffix: &str, age: std::time::Duration| {
            let path = dir
                .path()
                .join(format!("{}{suffix}", partial_prefix(&dest)));
            File::create(&path)
                .unwrap()
                .set_modified(now - age)
                .unwrap();
            path
        };
        let abandoned = made("00000000000000a1", PARTIAL_ABANDONED_AFTER);
        let writing = made(
            "00000000000000b2",
            PARTIAL_ABANDONED_AFTER - std::time::Duration::from_secs(60),
        );
        let other_name = dir.path().join(".other.pdf.kez-partial.00000000000000c3");
        File::create(&other_name)
            .unwrap()
            .set_modified(now - PARTIAL_ABANDONED_AFTER * 2)
            .unwrap();

        remove_abandoned_partials(&dest, now);

        assert!(!abandoned.exists());
        assert!(writing.exists());
        assert!(other_name.exists());
        assert_eq!(partial_files(&dest), [writing]);
    }
}
