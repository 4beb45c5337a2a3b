//! The endpoint's secret key on disk: 32 raw bytes in `<dir>/iroh.key`, mode `0600`.
//!
//! The same discipline as `kez-keyfile` (which stores the KEZ identity in a text format of its
//! own): the file is created with mode `0600` from the first instant and published atomically
//! (a hard link from a private temporary file, so a reader never sees a half-written key and a
//! concurrent creator never overwrites one), a file the group or others can access is refused,
//! and key bytes live in zeroizing buffers.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use iroh::SecretKey;
use zeroize::Zeroizing;

use crate::Error;

/// Length of the key file: the raw 32-byte ed25519 secret.
pub const KEY_FILE_LEN: u64 = 32;

/// Mode of the key file.
const KEY_FILE_MODE: u32 = 0o600;

/// Mode of the node directory when this crate creates it.
const DIR_MODE: u32 = 0o700;

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |error| Error::Io {
        action,
        path: path.to_path_buf(),
        error,
    }
}

/// Creates `dir` (mode `0700`) if it is missing; an existing directory keeps its mode.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_err("create the directory", dir))
}

/// Loads the key at `path`, or creates a new one if there is no file there.
pub(crate) fn load_or_create(path: &Path) -> Result<SecretKey, Error> {
    match load(path) {
        Err(Error::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let key = SecretKey::generate();
    let bytes = Zeroizing::new(key.to_bytes());
    match publish(path, &bytes) {
        Ok(()) => Ok(key),
        // Another process created it first: theirs is the key.
        Err(Error::Io { error, .. }) if error.kind() == io::ErrorKind::AlreadyExists => load(path),
        Err(e) => Err(e),
    }
}

/// Writes a private temporary file next to `path`, then links it to `path` (which fails rather
/// than replace an existing file) and removes the temporary name.
fn publish(path: &Path, bytes: &[u8; 32]) -> Result<(), Error> {
    let tmp = temp_path(path);
    // Left behind by a crashed process that had our pid; the name is ours to reuse.
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(KEY_FILE_MODE)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    let written = fill(&mut file, bytes);
    drop(file);
    let linked = written
        .map_err(io_err("write", &tmp))
        .and_then(|()| fs::hard_link(&tmp, path).map_err(io_err("create", path)));
    let _ = fs::remove_file(&tmp);
    linked?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync the directory of", path))
}

/// The creation mode is masked by the umask; `fchmod` makes it exactly 0600.
fn fill(file: &mut File, bytes: &[u8; 32]) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(KEY_FILE_MODE))?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Loads the key at `path` after checking it is a private regular file of exactly 32 bytes.
pub(crate) fn load(path: &Path) -> Result<SecretKey, Error> {
    let refuse = |reason: String| Error::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    // Refuse non-regular files before opening (opening a FIFO would block); the checks are
    // repeated on the open handle, which is the file actually read.
    let meta = fs::metadata(path).map_err(io_err("read", path))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    let file = File::open(path).map_err(io_err("open", path))?;
    let meta = file.metadata().map_err(io_err("inspect", path))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(refuse(format!(
            "mode {mode:04o} lets other users access this secret key; make it private with `chmod 600`"
        )));
    }
    if meta.len() != KEY_FILE_LEN {
        return Err(refuse(format!(
            "{} bytes long, an iroh key file is exactly {KEY_FILE_LEN} bytes",
            meta.len()
        )));
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    (&file)
        .read_exact(&mut bytes[..])
        .map_err(io_err("read", path))?;
    Ok(SecretKey::from_bytes(&bytes))
}
