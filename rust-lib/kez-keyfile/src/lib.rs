//! The one place KEZ secret key files touch the disk (Unix only).
//!
//! A key file holds one line, `ed25519-secret:<64 hex>\n` (see [`SecretKey::to_key_file`]). That
//! key is the user's identity and their NATS credential, so this crate is strict:
//!
//! - [`write_new`] creates the file with mode `0600` from the first instant (there is no moment
//!   where another user could open it), creates missing parent directories with mode `0700`,
//!   fsyncs the file and its directory, and never replaces an existing file.
//! - [`load`] refuses a file that the group or others could read or write (`mode & 0o077 != 0`),
//!   as OpenSSH does, and says to `chmod 600` it. It refuses anything that is not a regular
//!   file or is larger than [`MAX_KEY_FILE_LEN`], before reading it.
//! - Symbolic links are followed when loading: people keep keys in other places (an encrypted
//!   volume, a dotfiles checkout) and link them in. What protects the secret is the mode of the
//!   file the link leads to, and that is the file whose mode, type and size are checked, on the
//!   open handle itself, so the file checked is the file read. When writing, a symbolic link at
//!   `path` (even a dangling one) counts as an existing file and is not followed.
//! - Errors never contain key material or file contents.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kez_core::key::{KeyError, SecretKey};
use zeroize::Zeroizing;

/// Largest key file [`load`] will read. A real one is 80 bytes; the margin is for nothing but
/// telling a key file from some other file quickly.
pub const MAX_KEY_FILE_LEN: u64 = 1024;

/// Mode of a key file written by [`write_new`]: read and write for the owner only.
pub const KEY_FILE_MODE: u32 = 0o600;

/// Mode of directories [`write_new`] creates to hold a key file.
pub const KEY_DIR_MODE: u32 = 0o700;

/// Why a key file could not be written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// There is no file at the path.
    #[error("no key file at {path}: create one first")]
    NotFound {
        /// Where the key was looked for.
        path: PathBuf,
    },
    /// [`write_new`] found something already at the path and left it untouched.
    #[error(
        "{path} already exists and was left untouched: an existing key file is a KEZ identity, and replacing it would lose that identity; move it away yourself if you really mean to"
    )]
    AlreadyExists {
        /// The path that is taken.
        path: PathBuf,
    },
    /// The group or others may read or write the file, so the key may already be exposed.
    #[error(
        "{path} has mode {mode:04o}, so other users can access this secret key; make it private with `chmod 600 {}`",
        shell_word(.path)
    )]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// The permission bits found (`mode & 0o7777`).
        mode: u32,
    },
    /// The path is a directory, device, socket or FIFO, not a regular file.
    #[error("{path} is not a regular file, so it is not a KEZ key file")]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// The file is larger than [`MAX_KEY_FILE_LEN`]; it was not read.
    #[error(
        "{path} is {len} bytes long, a KEZ key file is under 1 KiB: check the path points at your key file"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        len: u64,
    },
    /// The file is not UTF-8 text.
    #[error(
        "{path} is not a KEZ key file (it is not text; a key file is one line `ed25519-secret:<64 hex>`)"
    )]
    NotText {
        /// The file.
        path: PathBuf,
    },
    /// The file is text but not a valid key file line.
    #[error(
        "{path} is not a valid KEZ key file ({reason}); a key file is one line `ed25519-secret:<64 hex>`"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong; never contains the file's contents.
        reason: KeyError,
    },
    /// The operating system refused an operation.
    #[error("could not {action} {path}: {error}")]
    Io {
        /// What was being done, e.g. "create the directory".
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        error: io::Error,
    },
}

/// `path` as one shell word, so the `chmod` the error suggests can be pasted as is.
fn shell_word(path: &Path) -> String {
    let text = path.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Writes `key` to a new file at `path` with mode `0600`, creating missing parent directories
/// with mode `0700`. Refuses to replace anything already at `path`.
pub fn write_new(path: impl AsRef<Path>, key: &SecretKey) -> Result<(), KeyFileError> {
    let path = path.as_ref();
    let io_err = |action, error| KeyFileError::Io {
        action,
        path: path.to_path_buf(),
        error,
    };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        // Directories that already exist keep their mode: they are the user's to manage.
        DirBuilder::new()
            .recursive(true)
            .mode(KEY_DIR_MODE)
            .create(parent)
            .map_err(|e| io_err("create the directory for", e))?;
    }

    // `create_new` is O_CREAT|O_EXCL: atomic against a concurrent writer, and it does not follow a
    // symbolic link at `path`. The mode applies at creation, so the file is never readable by
    // others, not even before the first write.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(KEY_FILE_MODE)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => KeyFileError::AlreadyExists {
                path: path.to_path_buf(),
            },
            _ => io_err("create", e),
        })?;

    if let Err(err) = fill(&mut file, key).map_err(|e| io_err("write", e)) {
        // A half-written file is not an identity, but left in place it would make every later
        // `write_new` refuse with "already exists". We created it, so we remove it.
        drop(file);
        let _ = fs::remove_file(path);
        return Err(err);
    }

    // Make the directory entry durable too, or a crash could leave a key that was reported
    // written but is gone.
    let dir = parent.unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("sync the directory of", e))
}

/// The mode requested at creation is masked by the umask; `fchmod` makes it exactly 0600 (an
/// unusual umask such as 0277 would otherwise leave a key its owner cannot read).
fn fill(file: &mut File, key: &SecretKey) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(KEY_FILE_MODE))?;
    file.write_all(key.to_key_file().as_bytes())?;
    file.sync_all()
}

/// Loads the secret key at `path`, after checking that only its owner can access it, that it
/// is a regular file, and that it is no larger than [`MAX_KEY_FILE_LEN`].
pub fn load(path: impl AsRef<Path>) -> Result<SecretKey, KeyFileError> {
    let path = path.as_ref();
    let owned = || path.to_path_buf();
    let io_err = |action, error| KeyFileError::Io {
        action,
        path: path.to_path_buf(),
        error,
    };

    // Refuse non-regular files before opening: opening a FIFO would block forever. The
    // authoritative checks are repeated on the open file below.
    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => KeyFileError::NotFound { path: owned() },
        _ => io_err("read", e),
    })?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile { path: owned() });
    }

    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => KeyFileError::NotFound { path: owned() },
        _ => io_err("open", e),
    })?;
    let meta = file.metadata().map_err(|e| io_err("inspect", e))?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile { path: owned() });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen {
            path: owned(),
            mode,
        });
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(KeyFileError::TooLarge {
            path: owned(),
            len: meta.len(),
        });
    }

    // A fixed buffer, not a growing Vec: reallocation would leave unzeroized copies of the key.
    let mut buf = Zeroizing::new([0u8; MAX_KEY_FILE_LEN as usize + 1]);
    let len = read_up_to(&file, &mut buf[..]).map_err(|e| io_err("read", e))?;
    if len > MAX_KEY_FILE_LEN as usize {
        // The file grew after the size check.
        return Err(KeyFileError::TooLarge {
            path: owned(),
            len: len as u64,
        });
    }
    let text =
        std::str::from_utf8(&buf[..len]).map_err(|_| KeyFileError::NotText { path: owned() })?;
    SecretKey::from_key_file(text).map_err(|reason| KeyFileError::Malformed {
        path: owned(),
        reason,
    })
}

/// Reads until `buf` is full or the file ends; returns the number of bytes read.
fn read_up_to(mut file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggested_paths_paste_into_a_shell() {
        assert_eq!(
            shell_word(Path::new("/home/a/.kez/key")),
            "/home/a/.kez/key"
        );
        assert_eq!(shell_word(Path::new("/My Keys/key")), "'/My Keys/key'");
        assert_eq!(shell_word(Path::new("/it's/key")), r"'/it'\''s/key'");
        assert_eq!(shell_word(Path::new("~/key")), "'~/key'");
    }
}
