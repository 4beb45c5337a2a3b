//! Reading a blob while it downloads: [`BlobNode::follow`](crate::BlobNode::follow).
//!
//! iroh-blobs writes a downloaded chunk group into the blob's data file only once it verified
//! it against the hash, and then marks it in the blob's bitfield. A [`FollowReader`] watches the
//! bitfield and reads the data file up to the verified prefix, waiting when it catches up with
//! the download: a caller decrypts a file as it arrives, instead of after it all arrived.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use iroh_blobs::api::proto::Bitfield;

/// Bytes per BLAKE3 chunk, the unit of a blob's bitfield.
const CHUNK_LEN: u64 = 1024;

/// What the watching task knows, shared with the reader.
#[derive(Debug, Default)]
struct State {
    /// Bytes from the blob's start that are verified and written.
    verified: u64,
    /// The blob's size, once it is complete.
    complete: Option<u64>,
    /// Why no more will come, when the download stopped before the blob was complete.
    stopped: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Records the bitfield iroh-blobs reports now. Answers whether the blob is complete.
    pub(crate) fn update(&self, bitfield: &Bitfield) -> bool {
        let complete = bitfield.is_complete();
        let mut state = self.lock();
        state.verified = verified_prefix(bitfield);
        if complete {
            state.complete = Some(bitfield.size());
        }
        drop(state);
        self.changed.notify_all();
        complete
    }

    /// The blob is complete, `size` bytes: all of it may be read.
    pub(crate) fn complete(&self, size: u64) {
        let mut state = self.lock();
        state.verified = size;
        state.complete = Some(size);
        drop(state);
        self.changed.notify_all();
    }

    /// No more will come, because of `reason` (ignored once the blob is complete).
    pub(crate) fn stop(&self, reason: String) {
        self.lock().stopped.get_or_insert(reason);
        self.changed.notify_all();
    }
}

/// The bytes from the start of the blob that the bitfield shows verified.
fn verified_prefix(bitfield: &Bitfield) -> u64 {
    let size = bitfield.size();
    match bitfield.ranges.boundaries() {
        [start, rest @ ..] if start.0 == 0 => rest
            .first()
            .map_or(size, |end| end.0.saturating_mul(CHUNK_LEN).min(size)),
        _ => 0,
    }
}

/// Keeps a [`FollowReader`] fed: stopping or dropping it tells the reader that nothing more
/// comes (it then fails rather than wait), and ends the watch on the store.
#[derive(Debug)]
pub struct Following {
    pub(crate) shared: Arc<Shared>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl Following {
    /// Tells the reader that the download stopped, for `reason` (shown in its error).
    pub fn stop(&self, reason: &str) {
        self.task.abort();
        self.shared.stop(reason.to_owned());
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.stop("the download was given up");
    }
}

/// A blocking reader (`std::io::Read`) over a blob being downloaded, for a blocking thread:
/// a read waits until the next bytes are verified, and the reader ends at the blob's end. It
/// fails when its [`Following`] stops before the blob is complete.
#[derive(Debug)]
pub struct FollowReader {
    pub(crate) shared: Arc<Shared>,
    /// The store's data file of the blob, opened once the first bytes are in it.
    pub(crate) path: PathBuf,
    pub(crate) file: Option<File>,
    /// Bytes read so far.
    pub(crate) position: u64,
}

impl FollowReader {
    /// Waits until bytes past the position are verified, the blob ended or the download
    /// stopped; answers how many may be read now (0 at the end).
    fn wait_for_more(&self) -> io::Result<u64> {
        let mut state = self.shared.lock();
        loop {
            if state.verified > self.position {
                return Ok(state.verified - self.position);
            }
            if state.complete.is_some() {
                return Ok(0);
            }
            if let Some(reason) = &state.stopped {
                return Err(io::Error::other(format!(
                    "the download stopped before the blob was complete: {reason}"
                )));
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|poison| poison.into_inner());
        }
    }
}

impl io::Read for FollowReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let ready = self.wait_for_more()?;
        if ready == 0 {
            return Ok(0);
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(File::open(&self.path).map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!(
                        "cannot open the blob's data file {}: {err}",
                        self.path.display()
                    ),
                )
            })?),
        };
        let want = buf.len().min(usize::try_from(ready).unwrap_or(usize::MAX));
        let read = std::os::unix::fs::FileExt::read_at(file, &mut buf[..want], self.position)?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the blob's data file ends before its verified bytes",
            ));
        }
        self.position += read as u64;
        Ok(read)
    }
}
