//! The client's home directory: the secret key, the config and the local store.
//!
//! ```text
//! <home>/key          the KEZ secret key (kez-keyfile: mode 0600, never overwritten)
//! <home>/config.json  the server's NATS URL and, once registered, the own handle
//! <home>/store.redb   contacts, message history, seen message ids (see `Store`)
//! ```

use std::ffi::OsStr;
use std::fs::{self, DirBuilder};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kez_core::SecretKey;
pub use kez_keyfile::KeyFileError;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// The environment variable naming the client's home directory.
pub const HOME_ENV: &str = "KEZ_CHAT_HOME";
/// The home's directory name below the XDG data directory.
pub const HOME_DIR_NAME: &str = "kez-chat";
/// The key file's name in the home.
pub const KEY_FILE: &str = "key";
/// The config file's name in the home.
pub const CONFIG_FILE: &str = "config.json";
/// The store's file name in the home.
pub const STORE_FILE: &str = "store.redb";
/// Mode of the home directory when this library creates it.
pub const HOME_DIR_MODE: u32 = 0o700;

/// Why the home, its key or its config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// Neither `$KEZ_CHAT_HOME`, `$XDG_DATA_HOME` nor `$HOME` says where the home is.
    #[error(
        "cannot tell where the kez-chat home is: set {HOME_ENV} (or HOME) to a directory, or pass the home explicitly"
    )]
    NoHome,
    /// The key file cannot be created or loaded.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The config file is not valid.
    #[error("{path} is not a valid kez-chat config ({reason}); fix or remove it")]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Other users of this machine can read the home directory.
    #[error(
        "{path} can be read by other users of this machine (mode {mode:03o}), and it holds your messages and keys: run `chmod 700 {path}`"
    )]
    Exposed {
        /// The home directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The operating system refused an operation.
    #[error("could not {action} {path}: {error}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        error: io::Error,
    },
}

/// Where the home is, given the values of `$KEZ_CHAT_HOME`, `$XDG_DATA_HOME` and `$HOME`
/// (pass `None` for unset). Empty values count as unset; a relative `$XDG_DATA_HOME` is
/// ignored, as the XDG spec says.
///
/// 1. `$KEZ_CHAT_HOME`, as it is;
/// 2. `$XDG_DATA_HOME/kez-chat`;
/// 3. `$HOME/.local/share/kez-chat`.
pub fn resolve_home(
    kez_chat_home: Option<&OsStr>,
    xdg_data_home: Option<&OsStr>,
    home: Option<&OsStr>,
) -> Result<PathBuf, HomeError> {
    let set = |value: Option<&OsStr>| value.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = set(kez_chat_home) {
        return Ok(path);
    }
    if let Some(data) = set(xdg_data_home).filter(|p| p.is_absolute()) {
        return Ok(data.join(HOME_DIR_NAME));
    }
    if let Some(home) = set(home) {
        return Ok(home.join(".local").join("share").join(HOME_DIR_NAME));
    }
    Err(HomeError::NoHome)
}

/// Where the environment says the home is: [`resolve_home`] over the process environment.
pub fn home_dir_from_env() -> Result<PathBuf, HomeError> {
    let var = std::env::var_os;
    resolve_home(
        var(HOME_ENV).as_deref(),
        var("XDG_DATA_HOME").as_deref(),
        var("HOME").as_deref(),
    )
}

/// The client's config (`config.json`). Unknown members are ignored, so an older client can
/// read a newer client's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// The home server's NATS URL, e.g. `nats://kez.lat:4222`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The own handle once registered, e.g. `@alice@kez.lat`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    /// The own identity (the sigchain id) when this home's key is another device of it: a
    /// device added by pairing or recovery. Unset: the home's key is the identity itself (the
    /// device that registered). Homes of 0.1 have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<kez_core::PublicKey>,
    /// The UDP address the blob node binds, kept after the first start so the provider string
    /// in the sigchain stays valid. Default `127.0.0.1` with a port chosen on first use: others
    /// on this machine only. Set a routable address (or `0.0.0.0:PORT`) to share beyond it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iroh_bind: Option<std::net::SocketAddr>,
    /// The URL of an iroh relay server for the blob node (reaching peers behind NAT), e.g. the
    /// operator's own. Unset: no relays at all, peers are dialled directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iroh_relay: Option<String>,
    /// Whether the user allowed an unencrypted (`nats://`) connection to a server on another
    /// machine (`register --allow-plaintext`); unset: only `tls://` leaves this machine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_plaintext: bool,
    /// Whether the own devices tell a peer when its messages were read (`kez.receipt` of kind
    /// `read`, PROTOCOL.md §8.6). On unless turned off; delivery receipts are always sent.
    #[serde(skip_serializing_if = "is_on")]
    pub read_receipts: bool,
    /// Whether the service shows a desktop notification for each message that arrives (where
    /// the platform has a notifier). Off unless turned on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub notifications: bool,
    /// Whether this home tells contacts when the person is typing (`kez.typing`, live). Off
    /// unless turned on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub typing: bool,
    /// Whether the service tells contacts when this home comes online and goes offline
    /// (`kez.presence`, live). Off unless turned on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub presence: bool,
}

fn is_on(value: &bool) -> bool {
    *value
}

impl Default for Config {
    fn default() -> Config {
        Config {
            server: None,
            handle: None,
            identity: None,
            iroh_bind: None,
            iroh_relay: None,
            allow_plaintext: false,
            read_receipts: true,
            notifications: false,
            typing: false,
            presence: false,
        }
    }
}

/// The client's home directory. Opening one creates the directory (mode 0700) if needed;
/// the key, config and store are created on first use.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// The home at `dir`, created (mode 0700, parents too) if it does not exist. An existing
    /// directory that other users can read is refused ([`HomeError::Exposed`]).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Home, HomeError> {
        use std::os::unix::fs::MetadataExt;
        let dir = dir.into();
        if let Ok(metadata) = fs::metadata(&dir)
            && metadata.mode() & 0o077 != 0
        {
            return Err(HomeError::Exposed {
                path: dir,
                mode: metadata.mode() & 0o777,
            });
        }
        DirBuilder::new()
            .recursive(true)
            .mode(HOME_DIR_MODE)
            .create(&dir)
            .map_err(|error| HomeError::Io {
                action: "create the home directory",
                path: dir.clone(),
                error,
            })?;
        Ok(Home { dir })
    }

    /// The home directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key file's path.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// The config file's path.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// The store's path.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// The blob node's directory (its iroh key and blob store).
    pub fn node_dir(&self) -> PathBuf {
        self.dir.join(crate::files::NODE_DIR)
    }

    /// Whether the home holds a key file yet.
    pub fn has_key(&self) -> bool {
        self.key_path().symlink_metadata().is_ok()
    }

    /// Loads the home's key; an error if there is none (see [`Home::key_or_create`]).
    pub fn key(&self) -> Result<SecretKey, HomeError> {
        Ok(kez_keyfile::load(self.key_path())?)
    }

    /// Loads the home's key, or makes a new one and writes it (mode 0600) if there is none.
    /// The flag says whether the key is new.
    pub fn key_or_create(&self) -> Result<(SecretKey, bool), HomeError> {
        match kez_keyfile::load(self.key_path()) {
            Ok(key) => Ok((key, false)),
            Err(KeyFileError::NotFound { .. }) => {
                let key = SecretKey::generate();
                match kez_keyfile::write_new(self.key_path(), &key) {
                    Ok(()) => Ok((key, true)),
                    // Another process made one just now: that one is the identity.
                    Err(KeyFileError::AlreadyExists { .. }) => Ok((self.key()?, false)),
                    Err(err) => Err(err.into()),
                }
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The config; the default (empty) config when the file does not exist yet.
    pub fn config(&self) -> Result<Config, HomeError> {
        let path = self.config_path();
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(error) => {
                return Err(HomeError::Io {
                    action: "read",
                    path,
                    error,
                });
            }
        };
        serde_json::from_slice(&text).map_err(|err| HomeError::BadConfig {
            path,
            reason: err.to_string(),
        })
    }

    /// Writes the config: to a temporary file first, then renamed over the old one, so a
    /// crash leaves the old config or the new one, never half of one.
    pub fn save_config(&self, config: &Config) -> Result<(), HomeError> {
        let path = self.config_path();
        let temporary = self.dir.join(format!("{CONFIG_FILE}.tmp"));
        let io_err = |action, path: &Path| {
            let path = path.to_path_buf();
            move |error| HomeError::Io {
                action,
                path,
                error,
            }
        };
        let mut text = serde_json::to_vec_pretty(config).expect("a config serialises");
        text.push(b'\n');
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io_err("create", &temporary))?;
        file.write_all(&text)
            .and_then(|()| file.sync_all())
            .map_err(io_err("write", &temporary))?;
        fs::rename(&temporary, &path).map_err(io_err("replace", &path))
    }

    /// Opens (or creates) the home's store.
    pub fn store(&self) -> Result<Store, StoreError> {
        Store::open(self.store_path())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn os(text: &str) -> Option<&OsStr> {
        Some(OsStr::new(text))
    }

    #[test]
    fn home_resolution_order() {
        assert_eq!(
            resolve_home(os("/k"), os("/x"), os("/h")).unwrap(),
            PathBuf::from("/k")
        );
        assert_eq!(
            resolve_home(os(""), os("/x"), os("/h")).unwrap(),
            PathBuf::from("/x/kez-chat")
        );
        assert_eq!(
            resolve_home(None, os("relative"), os("/h")).unwrap(),
            PathBuf::from("/h/.local/share/kez-chat")
        );
        assert_eq!(
            resolve_home(None, None, os("/h")).unwrap(),
            PathBuf::from("/h/.local/share/kez-chat")
        );
        assert!(matches!(
            resolve_home(None, os(""), None),
            Err(HomeError::NoHome)
        ));
    }

    #[test]
    fn key_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path().join("a/b")).unwrap();
        assert!(!home.has_key());
        let (key, created) = home.key_or_create().unwrap();
        assert!(created);
        let mode = fs::metadata(home.key_path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = home.key_or_create().unwrap();
        assert!(!created);
        assert_eq!(again.public_key(), key.public_key());
        assert_eq!(home.key().unwrap().public_key(), key.public_key());
    }

    #[test]
    fn a_home_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("home");
        Home::open(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "created private");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        let err = Home::open(&path).unwrap_err();
        assert!(
            matches!(err, HomeError::Exposed { mode: 0o755, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    #[test]
    fn config_round_trips_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path().join("home")).unwrap();
        assert_eq!(home.config().unwrap(), Config::default());
        let config = Config {
            server: Some("nats://127.0.0.1:4222".into()),
            handle: Some("@alice@kez.test".into()),
            identity: Some(kez_core::SecretKey::from_seed(&[4; 32]).public_key()),
            iroh_bind: Some("127.0.0.1:40001".parse().unwrap()),
            iroh_relay: Some("https://relay.example.org./".into()),
            allow_plaintext: true,
            read_receipts: false,
            notifications: true,
            typing: true,
            presence: true,
        };
        home.save_config(&config).unwrap();
        assert_eq!(home.config().unwrap(), config);
        // A config written before the settings existed has read receipts on.
        fs::write(home.config_path(), br#"{"handle":"@alice@kez.test"}"#).unwrap();
        let old = home.config().unwrap();
        assert!(old.read_receipts && !old.notifications && !old.typing && !old.presence);
        fs::write(home.config_path(), b"{not json").unwrap();
        assert!(matches!(home.config(), Err(HomeError::BadConfig { .. })));
    }
}
