//! The nats-server side of the deployment: the server's NATS keys and the config that uses them.
//!
//! Four nkeys make a kez-chat broker (`keygen` writes them, each seed in its own 0600 file):
//! - the **callout issuer** (an account key, `A...`): signs every authorization the callout
//!   grants; nats-server is told its public key and trusts nothing else from the callout;
//! - the **auth user** (`U...`, account `AUTH`): the connection that answers `$SYS.REQ.USER.AUTH`;
//! - the **server user** (`U...`, account `SERVER`): the connection that serves `kez.*` and owns
//!   the JetStream state. The callout places clients in `APP`, which imports those services;
//! - the **system user** (`U...`, nats-server's system account `SYS`): the connection that ends
//!   a revoked device's live connections (`$SYS.REQ.SERVER.PING.CONNZ`, then
//!   `$SYS.REQ.SERVER.<id>.KICK`, [`crate::kick`]) and counts the connections the brokers hold
//!   (`$SYS.REQ.SERVER.PING.STATSZ`, [`crate::reconnect_window`]).
//!
//! The server users are listed in `auth_users`, so they bypass the callout. Their being nkey
//! users also makes nats-server send every client a nonce to sign (it only does so when some nkey
//! user is configured), which is what lets the callout check a client's key at all.
//!
//! Upgrading a deployment made before the system user existed (three seed files, a config
//! without a `SYS` user): `keygen` on the same directory adds the missing `server-sys.nk` and
//! touches nothing else, and a start does the same when it may write there. Until nats-server's
//! config lists the system user (re-render it with `nats-conf`, or copy the generated part of
//! `deploy/nats/nats-server.conf`, then reload nats-server; deploy/DEPLOY.md, Upgrades) the
//! server logs one warning at start and serves as before, except that a revoked device's open
//! connections last until their authorization expires (at most an hour) instead of ending at
//! once; the callout refuses its new connections and the services its requests either way.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kez_proto::directory::DIRECT_GET_SUBJECTS;
use kez_proto::endpoint::USER_SERVICES;
use kez_proto::subjects::NEW_MAIL_SUBJECTS;
use nkeys::KeyPair;
use zeroize::Zeroizing;

/// Seed file of the callout issuer (account key).
pub const ISSUER_SEED_FILE: &str = "callout-issuer.nk";
/// Seed file of the server's `AUTH` account user.
pub const AUTH_USER_SEED_FILE: &str = "server-auth.nk";
/// Seed file of the server's `SERVER` account user.
pub const SERVER_USER_SEED_FILE: &str = "server.nk";
/// Seed file of the server's user in the system account `SYS`.
pub const SYSTEM_USER_SEED_FILE: &str = "server-sys.nk";
/// Account that holds the callout connection.
pub const AUTH_ACCOUNT: &str = "AUTH";
/// Account of the kez services and all JetStream state.
pub const SERVER_ACCOUNT: &str = "SERVER";
/// Account where the callout places users; no JetStream, only imports from `SERVER`.
pub const APP_ACCOUNT: &str = "APP";
/// nats-server's system account.
pub const SYSTEM_ACCOUNT: &str = "SYS";

/// The seed files of a deployment made before the system user existed.
const FIRST_SEED_FILES: [&str; 3] = [ISSUER_SEED_FILE, AUTH_USER_SEED_FILE, SERVER_USER_SEED_FILE];

/// The public halves of the four keys: what goes into the nats-server config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeys {
    /// Callout issuer, `A...`.
    pub issuer: String,
    /// The server's `AUTH` user, `U...`.
    pub auth_user: String,
    /// The server's `SERVER` user, `U...`.
    pub server_user: String,
    /// The server's `SYS` user, `U...`.
    pub system_user: String,
}

/// What [`keygen`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generated {
    /// All four keys: the directory held none.
    All,
    /// Only the system user's: the directory held the other three (a deployment made before
    /// it existed), which stay as they were.
    SystemUser,
}

/// Creates the seed files missing in `dir` (mode 0600, never overwriting) and returns every
/// public key and what was written. An empty directory gets all four; one holding the first
/// three (an older deployment) gets only the system user's. Anything else is refused: a
/// directory with all four has nothing to add, and new keys beside some old ones would not
/// match the broker's config.
pub fn keygen(dir: &Path) -> Result<(PublicKeys, Generated), String> {
    std::fs::create_dir_all(dir)
        .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let present: Vec<&str> = FIRST_SEED_FILES
        .into_iter()
        .chain([SYSTEM_USER_SEED_FILE])
        .filter(|file| dir.join(file).exists())
        .collect();
    if present == FIRST_SEED_FILES {
        add_system_user(dir)?;
        return Ok((public_keys(dir)?, Generated::SystemUser));
    }
    if let Some(file) = present.first() {
        return Err(format!(
            "{} already exists; keygen never overwrites keys and adds only the system user's ({SYSTEM_USER_SEED_FILE}) beside the other three (remove the directory's key files deliberately, or use another directory)",
            dir.join(file).display()
        ));
    }
    for (file, key) in [
        (ISSUER_SEED_FILE, KeyPair::new_account()),
        (AUTH_USER_SEED_FILE, KeyPair::new_user()),
        (SERVER_USER_SEED_FILE, KeyPair::new_user()),
        (SYSTEM_USER_SEED_FILE, KeyPair::new_user()),
    ] {
        write_seed(&dir.join(file), &key)?;
    }
    Ok((public_keys(dir)?, Generated::All))
}

/// Creates the system user's seed file in `dir` unless it exists (mode 0600, never
/// overwriting); whether it was created. The upgrade step a start takes for a deployment made
/// before that key existed.
pub fn add_system_user(dir: &Path) -> Result<bool, String> {
    let path = dir.join(SYSTEM_USER_SEED_FILE);
    if path.exists() {
        return Ok(false);
    }
    write_seed(&path, &KeyPair::new_user())?;
    Ok(true)
}

fn write_seed(path: &Path, key: &KeyPair) -> Result<(), String> {
    let seed = Zeroizing::new(
        key.seed()
            .map_err(|err| format!("cannot export a new seed: {err}"))?,
    );
    write_secret(path, seed.as_bytes())
}

/// Reads the public keys of the seed files in `dir`.
pub fn public_keys(dir: &Path) -> Result<PublicKeys, String> {
    let public = |file: &str| -> Result<String, String> {
        let seed = read_nkey_seed(&dir.join(file))?;
        KeyPair::from_seed(&seed)
            .map(|key| key.public_key())
            .map_err(|err| format!("{}: not an nkey seed: {err}", dir.join(file).display()))
    };
    Ok(PublicKeys {
        issuer: public(ISSUER_SEED_FILE)?,
        auth_user: public(AUTH_USER_SEED_FILE)?,
        server_user: public(SERVER_USER_SEED_FILE)?,
        system_user: public(SYSTEM_USER_SEED_FILE)?,
    })
}

fn write_secret(path: &Path, contents: &[u8]) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| format!("cannot create {}: {err}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|err| format!("cannot write {}: {err}", path.display()))
}

/// What a full nats-server config needs besides the keys.
#[derive(Debug, Clone)]
pub struct ConfParams {
    /// Client listen address, e.g. `0.0.0.0:4222`.
    pub listen: String,
    /// JetStream store directory.
    pub store_dir: PathBuf,
}

/// A service the `SERVER` account offers the `APP` account.
pub struct ExportedService {
    /// The subject, in both accounts.
    pub subject: String,
    /// Whether the import shares who asks (`share: true`): nats-server then stamps each request
    /// with a `Nats-Request-Info` header naming the user's nkey and address, by which the kez
    /// services know the caller (PROTOCOL.md §5.5, §6.3).
    pub share: bool,
}

/// Every service users can reach: the kez services, and of JetStream only the directory's
/// direct get of one subject (PROTOCOL.md §5.7; `APP` has no JetStream of its own).
pub fn exported_services() -> Vec<ExportedService> {
    USER_SERVICES
        .iter()
        .map(|service| ExportedService {
            subject: service.wildcard(),
            share: true,
        })
        .chain([ExportedService {
            subject: DIRECT_GET_SUBJECTS.to_owned(),
            share: false,
        }])
        .collect()
}

/// The messages `SERVER` streams to `APP`: the new-mail notifications the inbox stream
/// republishes. Each user's subscribe permission admits only the own device's subject.
pub fn exported_streams() -> Vec<String> {
    vec![NEW_MAIL_SUBJECTS.to_owned()]
}

/// The `accounts`, `system_account` and `authorization` blocks: everything that makes a
/// nats-server a kez-chat broker. Tests append this to their own listen/JetStream settings.
///
/// Users live in `APP`, which has no JetStream and reaches the server only through service
/// imports. That is what makes a client's reply subject harmless: an answer (from the kez
/// services or from JetStream) to a reply subject the client chose is delivered in `APP`, where
/// there is no JetStream API or key-value bucket it could write to.
pub fn render_auth(keys: &PublicKeys) -> String {
    let PublicKeys {
        issuer,
        auth_user,
        server_user,
        system_user,
    } = keys;
    let (connz, statsz, kick) = (
        crate::kick::CONNZ_SUBJECT,
        crate::reconnect_window::STATSZ_SUBJECT,
        crate::kick::kick_subject("*"),
    );
    let mut exports = String::new();
    let mut imports = String::new();
    for service in exported_services() {
        let subject = &service.subject;
        exports.push_str(&format!("      {{ service: \"{subject}\" }}\n"));
        let share = if service.share { ", share: true" } else { "" };
        imports.push_str(&format!(
            "      {{ service: {{ account: {SERVER_ACCOUNT}, subject: \"{subject}\" }}{share} }}\n"
        ));
    }
    for subject in exported_streams() {
        exports.push_str(&format!("      {{ stream: \"{subject}\" }}\n"));
        imports.push_str(&format!(
            "      {{ stream: {{ account: {SERVER_ACCOUNT}, subject: \"{subject}\" }} }}\n"
        ));
    }
    format!(
        r#"# Accounts: AUTH holds the callout connection; SERVER the kez services and all JetStream
# state; APP every user (the callout places clients there), reaching SERVER only through the
# imported services below, and hearing of new mail through the imported stream (each user may
# subscribe to its own subject only); SYS is nats-server's own, where kez-chat-server's system
# user asks for a revoked device's connections and ends them. `share: true` makes nats-server
# tell the kez services which user (nkey) and address sent each request: they serve the
# caller's own inbox and rate-limit by it.
accounts {{
  {AUTH_ACCOUNT}: {{
    users: [ {{ nkey: "{auth_user}" }} ]
  }}
  {SERVER_ACCOUNT}: {{
    jetstream: enabled
    users: [ {{ nkey: "{server_user}" }} ]
    exports: [
{exports}    ]
  }}
  {APP_ACCOUNT}: {{
    imports: [
{imports}    ]
  }}
  {SYSTEM_ACCOUNT}: {{
    # kez-chat-server's system user may only list connections, count them and close one,
    # nothing else of the system account (no reload, no account or server changes).
    users: [ {{
      nkey: "{system_user}"
      permissions: {{
        publish: [ "{connz}", "{statsz}", "{kick}" ]
        subscribe: [ "_INBOX.>" ]
      }}
    }} ]
  }}
}}
system_account: {SYSTEM_ACCOUNT}

authorization {{
  # Seconds nats-server gives a client to send its CONNECT, and the callout to answer it,
  # before refusing it: 5, not nats' 2, so that a broker restarted under many clients greets
  # and authorizes them all instead of refusing those it could not reach in time.
  timeout: 5
  auth_callout {{
    # Only authorizations signed by this key are accepted (kez-chat-server's issuer seed).
    issuer: "{issuer}"
    account: {AUTH_ACCOUNT}
    # The server's own users skip the callout.
    auth_users: [ "{auth_user}", "{server_user}", "{system_user}" ]
  }}
}}
"#
    )
}

/// A complete nats-server config for a single node.
pub fn render(keys: &PublicKeys, params: &ConfParams) -> String {
    let store_dir =
        serde_json::to_string(&params.store_dir.to_string_lossy()).expect("a string serialises");
    format!(
        r#"# nats-server config for a kez-chat broker, generated by `kez-chat-server nats-conf`.
# Needs nats-server 2.10 or newer (auth callout).
listen: "{listen}"

# Chat messages and sigchain links are small; 1 MiB leaves room for sigchain pages.
max_payload: 1MB
max_connections: 100000

jetstream {{
  store_dir: {store_dir}
  # fsync after every write: a message JetStream has acknowledged survives an OS crash or power
  # loss. The default (every 2 minutes) can lose up to two minutes of acknowledged messages.
  # Cost: one fsync per stored message, so JetStream's write rate is bounded by the disk's
  # fsync rate (NATS_SYNC.md in nats/ has figures measured on a 2-core VM).
  sync_interval: always
}}

{auth}"#,
        listen = params.listen,
        auth = render_auth(keys),
    )
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
    fn keygen_writes_private_files_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (keys, generated) = keygen(dir.path()).unwrap();
        assert_eq!(generated, Generated::All);
        assert!(keys.issuer.starts_with('A'));
        assert!(keys.auth_user.starts_with('U') && keys.server_user.starts_with('U'));
        assert!(keys.system_user.starts_with('U'));
        for file in [
            ISSUER_SEED_FILE,
            AUTH_USER_SEED_FILE,
            SERVER_USER_SEED_FILE,
            SYSTEM_USER_SEED_FILE,
        ] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        assert_eq!(public_keys(dir.path()).unwrap(), keys);
        assert!(keygen(dir.path()).unwrap_err().contains("never overwrites"));
    }

    /// A keys directory from before the system user existed: keygen (and a start,
    /// `add_system_user`) adds that key only, leaving the other three as they were.
    #[test]
    fn keygen_adds_only_the_missing_system_user() {
        let dir = tempfile::tempdir().unwrap();
        let (before, _) = keygen(dir.path()).unwrap();
        let kept: Vec<String> = FIRST_SEED_FILES
            .iter()
            .map(|file| std::fs::read_to_string(dir.path().join(file)).unwrap())
            .collect();
        std::fs::remove_file(dir.path().join(SYSTEM_USER_SEED_FILE)).unwrap();
        let (after, generated) = keygen(dir.path()).unwrap();
        assert_eq!(generated, Generated::SystemUser);
        assert_eq!(
            (&after.issuer, &after.auth_user, &after.server_user),
            (&before.issuer, &before.auth_user, &before.server_user)
        );
        assert_ne!(after.system_user, before.system_user);
        for (file, seed) in FIRST_SEED_FILES.iter().zip(&kept) {
            assert_eq!(
                &std::fs::read_to_string(dir.path().join(file)).unwrap(),
                seed
            );
        }
        assert!(!add_system_user(dir.path()).unwrap(), "present: kept");
        std::fs::remove_file(dir.path().join(SYSTEM_USER_SEED_FILE)).unwrap();
        assert!(add_system_user(dir.path()).unwrap());
        assert!(read_nkey_seed(&dir.path().join(SYSTEM_USER_SEED_FILE)).is_ok());
        // Some of the first three missing: refused, nothing written.
        let partial = tempfile::tempdir().unwrap();
        write_seed(
            &partial.path().join(SERVER_USER_SEED_FILE),
            &KeyPair::new_user(),
        )
        .unwrap();
        assert!(
            keygen(partial.path())
                .unwrap_err()
                .contains("never overwrites")
        );
        assert!(!partial.path().join(ISSUER_SEED_FILE).exists());
    }

    /// `nats/nats-server.conf.example` is what `nats-conf` prints, with placeholders for keys.
    #[test]
    fn the_committed_example_is_current() {
        let keys = PublicKeys {
            issuer: "A_CALLOUT_ISSUER_PUBLIC_KEY".into(),
            auth_user: "U_SERVER_AUTH_USER_PUBLIC_KEY".into(),
            server_user: "U_SERVER_USER_PUBLIC_KEY".into(),
            system_user: "U_SERVER_SYSTEM_USER_PUBLIC_KEY".into(),
        };
        let expected = render(
            &keys,
            &ConfParams {
                listen: "0.0.0.0:4222".into(),
                store_dir: "/var/lib/nats".into(),
            },
        );
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../nats/nats-server.conf.example"
        );
        if std::env::var_os("KEZ_REGEN_VECTORS").is_some() {
            std::fs::write(path, &expected).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap();
        assert!(committed == expected, "{path} is stale; run `make vectors`");
    }

    /// `deploy/nats/nats-server.conf` ends with exactly what `render_auth` writes, so a
    /// production broker configured from it grants what the server expects.
    #[test]
    fn the_production_config_carries_the_generated_accounts() {
        const MARKER: &str = "# ---- From here on exactly what `kez-chat-server nats-conf` generates (nats_conf.rs) ----\n\n";
        let keys = PublicKeys {
            issuer: "A_CALLOUT_ISSUER_PUBLIC_KEY".into(),
            auth_user: "U_SERVER_AUTH_USER_PUBLIC_KEY".into(),
            server_user: "U_SERVER_USER_PUBLIC_KEY".into(),
            system_user: "U_SERVER_SYSTEM_USER_PUBLIC_KEY".into(),
        };
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/nats/nats-server.conf"
        );
        let committed = std::fs::read_to_string(path).unwrap();
        let (head, generated) = committed
            .split_once(MARKER)
            .expect("the production config marks where the generated part starts");
        if std::env::var_os("KEZ_REGEN_VECTORS").is_some() {
            std::fs::write(path, format!("{head}{MARKER}{}", render_auth(&keys))).unwrap();
        } else {
            assert!(
                generated == render_auth(&keys),
                "{path} is stale; run `make vectors`"
            );
        }
    }

    #[test]
    fn the_config_names_every_key() {
        let keys = PublicKeys {
            issuer: "AISSUER".into(),
            auth_user: "UAUTH".into(),
            server_user: "USERVER".into(),
            system_user: "USYS".into(),
        };
        let conf = render(
            &keys,
            &ConfParams {
                listen: "127.0.0.1:4222".into(),
                store_dir: "/var/lib/nats".into(),
            },
        );
        assert!(conf.contains(r#"issuer: "AISSUER""#));
        assert!(conf.contains(r#"auth_users: [ "UAUTH", "USERVER", "USYS" ]"#));
        assert!(conf.contains(r#"nkey: "USYS""#));
        assert!(
            conf.contains(r#"publish: [ "$SYS.REQ.SERVER.PING.CONNZ", "$SYS.REQ.SERVER.PING.STATSZ", "$SYS.REQ.SERVER.*.KICK" ]"#)
        );
        assert!(conf.contains("sync_interval: always"));
        assert!(conf.contains(r#"store_dir: "/var/lib/nats""#));
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
