//! Server configuration: command-line flags, each also settable from the environment, over an
//! optional TOML file, over defaults. Precedence: flag > environment > file > default.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

/// Domain served when none is configured.
pub const DEFAULT_DOMAIN: &str = "kez.lat";
/// NATS URL used when none is configured.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// How the server authenticates its own NATS connection.
#[derive(Debug, Clone)]
pub enum NatsAuth {
    /// No credentials (a broker without authentication, e.g. in tests).
    None,
    /// User and password (an `authorization { users = [...] }` entry or a callout auth user).
    UserPassword {
        /// The user.
        user: String,
        /// The password, zeroized on drop.
        password: Zeroizing<String>,
    },
    /// An nkey seed (`SU...`) read from a file that only its owner can read.
    NkeySeedFile(PathBuf),
}

/// The auth callout's keys (see [`crate::nats_conf`]).
#[derive(Debug, Clone)]
pub struct CalloutConfig {
    /// Directory with the seed files `keygen` wrote.
    pub keys_dir: PathBuf,
    /// The issuer public key nats-server is configured with; must match the issuer seed.
    pub issuer: String,
}

/// Everything `kez-chat-server run` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The broker to connect to.
    pub nats_url: String,
    /// The server's own NATS credentials (its `APP` connection).
    pub auth: NatsAuth,
    /// When set, the server answers nats-server's auth callout (and connects with its keys).
    pub callout: Option<CalloutConfig>,
    /// The domain this server serves (normalised).
    pub domain: String,
    /// Replicas of each key-value bucket: 1 on a single node, 3 in a cluster.
    pub kv_replicas: usize,
}

/// Settings as they may appear in the TOML file, on the command line or in the environment;
/// every field optional so the sources can be layered.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// NATS URL of the broker [default: nats://127.0.0.1:4222]
    #[arg(long, env = "KEZ_NATS_URL")]
    pub nats_url: Option<String>,
    /// NATS user for the server's own connection (with --nats-password)
    #[arg(long, env = "KEZ_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password for the server's own connection
    #[arg(long, env = "KEZ_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// File holding the server's NATS nkey seed (SU...), mode 0600
    #[arg(long, env = "KEZ_NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// Directory of the keys `kez-chat-server keygen` wrote: turns on the auth callout and
    /// authenticates both of the server's connections with those keys
    #[arg(long, env = "KEZ_KEYS_DIR")]
    pub keys_dir: Option<PathBuf>,
    /// The callout issuer public key (A...) in nats-server's config; checked against the key in
    /// --keys-dir
    #[arg(long, env = "KEZ_CALLOUT_ISSUER")]
    pub callout_issuer: Option<String>,
    /// Domain this server serves: handles are @name@<domain> [default: kez.lat]
    #[arg(long, env = "KEZ_DOMAIN")]
    pub domain: Option<String>,
    /// Replicas of each JetStream key-value bucket (1 single node, 3 in a cluster) [default: 1]
    #[arg(long, env = "KEZ_KV_REPLICAS")]
    pub kv_replicas: Option<usize>,
}

impl Settings {
    /// Reads a TOML file whose keys are the flag names with `_` (e.g. `nats_url = "..."`).
    pub fn from_file(path: &Path) -> Result<Settings, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read config file {}: {err}", path.display()))?;
        toml::from_str(&text).map_err(|err| format!("config file {}: {err}", path.display()))
    }

    /// `self` where set, otherwise `fallback`.
    pub fn or(self, fallback: Settings) -> Settings {
        Settings {
            nats_url: self.nats_url.or(fallback.nats_url),
            nats_user: self.nats_user.or(fallback.nats_user),
            nats_password: self.nats_password.or(fallback.nats_password),
            nats_nkey_seed_file: self.nats_nkey_seed_file.or(fallback.nats_nkey_seed_file),
            keys_dir: self.keys_dir.or(fallback.keys_dir),
            callout_issuer: self.callout_issuer.or(fallback.callout_issuer),
            domain: self.domain.or(fallback.domain),
            kv_replicas: self.kv_replicas.or(fallback.kv_replicas),
        }
    }

    /// Applies defaults and checks the combination.
    pub fn resolve(self) -> Result<ServerConfig, String> {
        let callout = match (self.keys_dir, self.callout_issuer) {
            (None, None) => None,
            (Some(keys_dir), Some(issuer)) => Some(CalloutConfig { keys_dir, issuer }),
            (Some(_), None) => {
                return Err("--keys-dir needs --callout-issuer: the issuer public key (A...) you put in nats-server's auth_callout block".into());
            }
            (None, Some(_)) => {
                return Err(
                    "--callout-issuer needs --keys-dir, the directory with the issuer seed".into(),
                );
            }
        };
        let auth = match (self.nats_user, self.nats_password, self.nats_nkey_seed_file) {
            (None, None, None) if callout.is_some() => NatsAuth::NkeySeedFile(
                callout
                    .as_ref()
                    .expect("checked")
                    .keys_dir
                    .join(crate::nats_conf::SERVER_USER_SEED_FILE),
            ),
            _ if callout.is_some() => {
                return Err("with --keys-dir the server authenticates with its own keys; drop --nats-user, --nats-password and --nats-nkey-seed-file".into());
            }
            (None, None, None) => NatsAuth::None,
            (Some(user), Some(password), None) => NatsAuth::UserPassword {
                user,
                password: Zeroizing::new(password),
            },
            (None, None, Some(path)) => NatsAuth::NkeySeedFile(path),
            (Some(_), None, None) | (None, Some(_), None) => {
                return Err("set both --nats-user and --nats-password, or neither".into());
            }
            _ => {
                return Err(
                    "use either --nats-user/--nats-password or --nats-nkey-seed-file, not both"
                        .into(),
                );
            }
        };
        let domain = self.domain.unwrap_or_else(|| DEFAULT_DOMAIN.to_owned());
        let domain = kez_core::handle::parse_domain(&domain)
            .map_err(|err| format!("--domain {domain:?}: {err}"))?;
        let kv_replicas = self.kv_replicas.unwrap_or(1);
        if !(1..=5).contains(&kv_replicas) {
            return Err(format!("--kv-replicas must be 1 to 5, not {kv_replicas}"));
        }
        Ok(ServerConfig {
            nats_url: self.nats_url.unwrap_or_else(|| DEFAULT_NATS_URL.to_owned()),
            auth,
            callout,
            domain,
            kv_replicas,
        })
    }
}

/// Reads an nkey seed file, refusing one that group or others can read.
pub fn read_nkey_seed(path: &Path) -> Result<Zeroizing<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path)
        .map_err(|err| format!("cannot read NATS nkey seed file {}: {err}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "NATS nkey seed file {} has mode {mode:04o}, so other users can read it; run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read NATS nkey seed file {}: {err}", path.display()))?,
    );
    let seed = Zeroizing::new(text.trim().to_owned());
    if !seed.starts_with('S') || seed.len() != 58 {
        return Err(format!(
            "{} does not hold an nkey seed (58 characters starting with S)",
            path.display()
        ));
    }
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let file: Settings = toml::from_str("domain = \"example.org\"\nkv_replicas = 3\n").unwrap();
        let flags = Settings {
            kv_replicas: Some(1),
            ..Settings::default()
        };
        let config = flags.or(file).resolve().unwrap();
        assert_eq!(config.domain, "example.org");
        assert_eq!(config.kv_replicas, 1);
        assert_eq!(config.nats_url, DEFAULT_NATS_URL);
        assert!(matches!(config.auth, NatsAuth::None));
    }

    #[test]
    fn bad_combinations_are_explained() {
        let half = Settings {
            nats_user: Some("u".into()),
            ..Settings::default()
        };
        assert!(half.resolve().unwrap_err().contains("both"));
        let bad_domain = Settings {
            domain: Some("kez.lat:4222".into()),
            ..Settings::default()
        };
        assert!(bad_domain.resolve().unwrap_err().contains("port"));
        assert!(toml::from_str::<Settings>("nats_ulr = \"x\"").is_err());
    }

    #[test]
    fn open_seed_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed");
        std::fs::write(&path, format!("S{}\n", "U".repeat(57))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_nkey_seed(&path).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_nkey_seed(&path).unwrap().len(), 58);
    }
}
