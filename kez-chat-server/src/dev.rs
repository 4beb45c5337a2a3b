//! `kez-chat-server dev`: the embedded default. One command runs a complete local stack: a
//! `nats-server` child with a generated config and keys, and every service plus the auth callout
//! in-process, as `run` would with `--keys-dir`. Everything lives in one data directory (keys,
//! config, JetStream store, the broker's log), so a restart on the same directory keeps every
//! registered user and every undelivered message.
//!
//! This module is the broker half: finding the binary, preparing the directory, starting the
//! child and waiting until it accepts connections, reading its log, stopping it. `main.rs` ties
//! it to [`crate::Server`].

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::config::{CalloutConfig, NatsAuth, ServerConfig};
use crate::nats_conf;

/// Environment variable naming the `nats-server` binary to run (as for `nats/install.sh` and the
/// test fixtures).
pub const NATS_SERVER_ENV: &str = "KEZ_NATS_SERVER";
/// Where `make tools` (`nats/install.sh`) installs the pinned nats-server, from the repository root.
pub const TOOLS_NATS_SERVER: &str = ".tools/venv/bin/nats-server";
/// Default client port of the dev broker: not 4222, which another NATS server may hold.
pub const DEFAULT_PORT: u16 = 14222;
/// Default port of the dev HTTP shim (WebFinger, `/healthz`, `/metrics`).
pub const DEFAULT_HTTP_PORT: u16 = 14280;
/// Default domain of the dev server: `.localhost` names never leave the machine (RFC 6761).
pub const DEFAULT_DOMAIN: &str = "kez.localhost";
/// How long to wait for nats-server to accept connections.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long nats-server may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the broker's log shown when it fails.
const LOG_TAIL_LINES: usize = 25;

/// Files in the data directory.
pub const KEYS_DIR: &str = "keys";
/// The pin node's directory, with `--pin`.
pub const PIN_DIR: &str = "pin";
/// The file in the data directory keeping the client port the broker got with `--port 0`.
pub const PORT_FILE: &str = "port";

/// The port kept in `data_dir` by an earlier start with `--port 0`.
pub fn kept_port(data_dir: &Path) -> Option<u16> {
    std::fs::read_to_string(data_dir.join(PORT_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&port| port != 0)
}

/// Keeps `port` in `data_dir` for the next start with `--port 0`.
pub fn keep_port(data_dir: &Path, port: u16) -> Result<(), String> {
    let path = data_dir.join(PORT_FILE);
    std::fs::write(&path, format!("{port}\n"))
        .map_err(|err| format!("cannot write {}: {err}", path.display()))
}

/// The generated nats-server config (rewritten on every start).
pub const CONF_FILE: &str = "nats-server.conf";
/// What the dev stack's inbox stream may hold: enough for development, small enough to fit any
/// machine's free disk (JetStream reserves it at start).
pub const DEV_INBOX_MAX_BYTES: u64 = 256 << 20;
/// nats-server's stdout and stderr, appended to across runs.
pub const LOG_FILE: &str = "nats-server.log";
/// The JetStream store directory.
pub const JETSTREAM_DIR: &str = "jetstream";
/// The running child's process id, removed when it has stopped.
pub const PID_FILE: &str = "nats-server.pid";

/// nats-server's log line once the client listener is bound; the address follows.
const LISTENING_PREFIX: &str = "Listening for client connections on ";
/// nats-server's log line once it (JetStream included) accepts clients.
const READY_LINE: &str = "Server is ready";

/// The default data directory: `$XDG_DATA_HOME/kez-chat-server/dev`, else
/// `~/.local/share/kez-chat-server/dev`.
pub fn default_data_dir() -> Result<PathBuf, String> {
    let base = match std::env::var_os("XDG_DATA_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|dir| !dir.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local/share"),
            None => return Err("neither XDG_DATA_HOME nor HOME is set; pass --data-dir".into()),
        },
    };
    Ok(base.join("kez-chat-server").join("dev"))
}

/// Finds the nats-server to run: `$KEZ_NATS_SERVER`; else `.tools/venv/bin/nats-server` in the
/// current directory or one above it, or above the running executable (a workspace's
/// `target/debug/`); else `nats-server` on `PATH`.
pub fn find_nats_server() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(NATS_SERVER_ENV).filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        if !is_executable(&path) {
            return Err(format!(
                "{NATS_SERVER_ENV}={} is not an executable file; point it at a nats-server 2.10+ \
                 binary, or unset it and run `make tools` in the kez-chat checkout",
                path.display()
            ));
        }
        return Ok(path);
    }
    let mut starts = Vec::new();
    if let Ok(dir) = std::env::current_dir() {
        starts.push(dir);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        starts.push(dir);
    }
    for start in &starts {
        for dir in start.ancestors() {
            let candidate = dir.join(TOOLS_NATS_SERVER);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "nats-server not found (not in {NATS_SERVER_ENV}, not at {TOOLS_NATS_SERVER} above the \
         current directory or this executable, not on PATH). Run `make tools` in the kez-chat \
         checkout to install the pinned version, or set {NATS_SERVER_ENV} to a nats-server 2.10+ \
         binary"
    ))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// What `dev` was asked for.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Data directory (created if missing).
    pub data_dir: PathBuf,
    /// Client port on 127.0.0.1; 0: the OS picks one (read back from the log).
    pub port: u16,
    /// HTTP shim port on 127.0.0.1; 0: the OS picks one.
    pub http_port: u16,
    /// The domain served.
    pub domain: String,
    /// Whether to pin (a pin node in `<data>/pin` on loopback).
    pub pin: bool,
}

/// A prepared data directory: keys present, config written.
#[derive(Debug)]
pub struct Prepared {
    /// The data directory, absolute.
    pub data_dir: PathBuf,
    /// The server's NATS keys (public halves).
    pub keys: nats_conf::PublicKeys,
    /// Whether this start generated them (a fresh data directory).
    pub new_keys: bool,
}

/// Creates the data directory (mode 0700), generates the keys unless the first three are there
/// (then adds the system user's if missing), and
/// writes the nats-server config: listen on `127.0.0.1:<port>` (`-1`, nats-server's "any free
/// port", for 0), JetStream in `<data>/jetstream`.
pub fn prepare(options: &DevOptions) -> Result<Prepared, String> {
    let data_dir = &options.data_dir;
    std::fs::create_dir_all(data_dir)
        .map_err(|err| format!("cannot create {}: {err}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .map_err(|err| format!("cannot resolve {}: {err}", data_dir.display()))?;
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|err| format!("cannot restrict {}: {err}", data_dir.display()))?;
    let keys_dir = data_dir.join(KEYS_DIR);
    let seeds = [
        nats_conf::ISSUER_SEED_FILE,
        nats_conf::AUTH_USER_SEED_FILE,
        nats_conf::SERVER_USER_SEED_FILE,
    ];
    let present = seeds
        .iter()
        .filter(|file| keys_dir.join(file).exists())
        .count();
    let (keys, new_keys) = match present {
        0 => (nats_conf::keygen(&keys_dir)?.0, true),
        // A data directory from before the system user existed gets it; the config below,
        // written on every start, lists it.
        3 => {
            nats_conf::add_system_user(&keys_dir)?;
            (nats_conf::public_keys(&keys_dir)?, false)
        }
        _ => {
            return Err(format!(
                "{} holds only some of the server's keys ({}); restore the missing ones, or \
                 remove the data directory to start over (every user registered there is lost)",
                keys_dir.display(),
                seeds.join(", ")
            ));
        }
    };
    // With --port 0 the port the broker got the first time is kept and asked for again:
    // registered users' sigchains and their homes name the URL.
    let port = match options.port {
        0 => kept_port(&data_dir).unwrap_or(0),
        port => port,
    };
    let listen = match port {
        0 => "127.0.0.1:-1".to_owned(),
        port => format!("127.0.0.1:{port}"),
    };
    let conf = nats_conf::render(
        &keys,
        &nats_conf::ConfParams {
            listen,
            store_dir: data_dir.join(JETSTREAM_DIR),
        },
    );
    // A fixed name: JetStream's metadata should not depend on a per-start generated one.
    let conf = format!(
        "# Written by `kez-chat-server dev` on every start; edits are overwritten.\n\
         server_name: \"kez-dev\"\n{conf}"
    );
    let conf_path = data_dir.join(CONF_FILE);
    std::fs::write(&conf_path, conf)
        .map_err(|err| format!("cannot write {}: {err}", conf_path.display()))?;
    Ok(Prepared {
        data_dir,
        keys,
        new_keys,
    })
}

impl Prepared {
    /// The config `run` would resolve for this stack: the callout on with these keys, the HTTP
    /// shim on `127.0.0.1:<http_port>`.
    pub fn server_config(
        &self,
        nats_url: &str,
        domain: &str,
        http_port: u16,
        pin: bool,
    ) -> ServerConfig {
        let keys_dir = self.data_dir.join(KEYS_DIR);
        ServerConfig {
            auth: NatsAuth::NkeySeedFile(keys_dir.join(nats_conf::SERVER_USER_SEED_FILE)),
            callout: Some(CalloutConfig::new(keys_dir, self.keys.issuer.clone())),
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], http_port))),
            // The dev stack is on loopback: its users' nodes are too.
            pin: pin.then(|| crate::pin::PinConfig {
                dial_private: true,
                ..crate::pin::PinConfig::new(self.data_dir.join(PIN_DIR))
            }),
            inbox_max_bytes: Some(DEV_INBOX_MAX_BYTES),
            ..ServerConfig::new(nats_url, domain)
        }
    }
}

/// The nats-server child.
#[derive(Debug)]
pub struct Broker {
    child: tokio::process::Child,
    pid: u32,
    port: u16,
    data_dir: PathBuf,
    /// Where this run's output starts in the log.
    log_offset: u64,
}

impl Broker {
    /// Starts `nats-server -c <data>/nats-server.conf` in its own process group (a Ctrl-C in the
    /// terminal reaches only `dev`, which stops the services before the broker), output appended
    /// to `<data>/nats-server.log`, and waits until it accepts connections.
    ///
    /// A broker left running by an earlier `dev` on the same directory that was killed outright
    /// (its pid file names a live nats-server with this config) is stopped first.
    pub async fn start(binary: &Path, prepared: &Prepared) -> Result<Broker, String> {
        let data_dir = prepared.data_dir.clone();
        stop_leftover(&data_dir).await;
        let log_path = data_dir.join(LOG_FILE);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|err| format!("cannot open {}: {err}", log_path.display()))?;
        let marker = format!(
            "--- kez-chat-server dev: starting {} ---\n",
            binary.display()
        );
        log.write_all(marker.as_bytes())
            .map_err(|err| format!("cannot write {}: {err}", log_path.display()))?;
        let log_offset = log
            .metadata()
            .map_err(|err| format!("cannot stat {}: {err}", log_path.display()))?
            .len();
        let log_clone = log
            .try_clone()
            .map_err(|err| format!("cannot duplicate the log file handle: {err}"))?;
        let mut command = std::process::Command::new(binary);
        command
            .arg("-c")
            .arg(data_dir.join(CONF_FILE))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_clone))
            .stderr(Stdio::from(log))
            .process_group(0);
        let child = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", binary.display()))?;
        let pid = child.id().unwrap_or_default();
        let _ = std::fs::write(data_dir.join(PID_FILE), format!("{pid}\n"));
        let mut broker = Broker {
            child,
            pid,
            port: 0,
            data_dir,
            log_offset,
        };
        if let Err(err) = broker.wait_ready().await {
            broker.stop().await;
            return Err(format!(
                "{err}\nnats-server: {}; it needs version 2.10 or newer. Last lines of {}:\n{}",
                binary.display(),
                broker.log_path().display(),
                broker.log_tail()
            ));
        }
        Ok(broker)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let log = self.this_run_log();
            if let Some(port) = log.lines().find_map(parse_listen_port) {
                self.port = port;
            }
            let ready = log
                .lines()
                .any(|line| line.trim_end().ends_with(READY_LINE));
            if ready
                && self.port != 0
                && TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], self.port)),
                    Duration::from_secs(1),
                )
                .is_ok()
            {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("nats-server exited before it was ready ({status})"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server did not accept connections within {READY_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The client port it listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The log file.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    fn this_run_log(&self) -> String {
        let bytes = std::fs::read(self.log_path()).unwrap_or_default();
        let this_run = bytes.get(self.log_offset as usize..).unwrap_or_default();
        String::from_utf8_lossy(this_run).into_owned()
    }

    /// The last lines of this run's log, indented.
    pub fn log_tail(&self) -> String {
        let log = self.this_run_log();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(LOG_TAIL_LINES);
        if lines.is_empty() {
            return "  (empty)".into();
        }
        lines[start..]
            .iter()
            .map(|line| format!("  {line}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Completes when the child exits by itself.
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Graceful stop: SIGTERM (nats-server closes its JetStream store), then up to
    /// [`STOP_TIMEOUT`] for it to exit, then SIGKILL. Removes the pid file. Returns how it ended.
    pub async fn stop(&mut self) -> Option<ExitStatus> {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => Some(status),
            _ => {
                signal_term(self.pid);
                match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
                    Ok(Ok(status)) => Some(status),
                    _ => {
                        tracing::warn!(
                            pid = self.pid,
                            "nats-server did not stop within {STOP_TIMEOUT:?}; killing it"
                        );
                        let _ = self.child.kill().await;
                        None
                    }
                }
            }
        };
        let _ = std::fs::remove_file(self.data_dir.join(PID_FILE));
        status
    }
}

/// SIGTERM through the `kill` command: the workspace forbids `unsafe`, so no `libc::kill`.
fn signal_term(pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Stops a nats-server an earlier `dev` left running on this data directory (that `dev` was
/// killed outright, so it could not stop its child): only a live process whose command line
/// names this directory's config.
async fn stop_leftover(data_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(data_dir.join(PID_FILE)) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return;
    };
    let conf = data_dir.join(CONF_FILE);
    let ours = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            cmdline
                .split(|&byte| byte == 0)
                .any(|arg| arg == conf.as_os_str().as_bytes())
        })
    };
    if !ours(pid) {
        return;
    }
    tracing::warn!(
        pid,
        "a nats-server from an earlier dev run on this data directory is still running; stopping it"
    );
    signal_term(pid);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while ours(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Parses the port out of nats-server's `... [INF] Listening for client connections on
/// 127.0.0.1:PORT` log line (`None` for other lines and for port 0). The test fixtures use it too.
pub fn parse_listen_port(line: &str) -> Option<u16> {
    let (_, addr) = line.split_once(LISTENING_PREFIX)?;
    let (_, port) = addr.trim().rsplit_once(':')?;
    port.parse().ok().filter(|&port| port != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listen_line() {
        let line = "[2933] 2026/11/26 13:56:23.085797 [INF] Listening for client connections on \
                    127.0.0.1:36189";
        assert_eq!(parse_listen_port(line), Some(36189));
        assert_eq!(parse_listen_port("[1] [INF] Server is ready"), None);
        assert_eq!(
            parse_listen_port("Listening for client connections on 127.0.0.1:0"),
            None
        );
    }

    #[test]
    fn prepare_makes_keys_once_and_a_loopback_config() {
        let dir = tempfile::tempdir().unwrap();
        let options = DevOptions {
            data_dir: dir.path().join("dev"),
            port: 0,
            http_port: 0,
            domain: DEFAULT_DOMAIN.into(),
            pin: false,
        };
        let first = prepare(&options).unwrap();
        assert!(first.new_keys);
        let conf = std::fs::read_to_string(first.data_dir.join(CONF_FILE)).unwrap();
        assert!(conf.contains(r#"listen: "127.0.0.1:-1""#), "{conf}");
        assert!(conf.contains(&first.keys.issuer), "{conf}");
        assert!(conf.contains(JETSTREAM_DIR), "{conf}");
        let mode = std::fs::metadata(&first.data_dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);

        let again = prepare(&DevOptions {
            port: 14999,
            ..options.clone()
        })
        .unwrap();
        assert!(!again.new_keys, "the keys are reused");
        assert_eq!(again.keys, first.keys);
        let conf = std::fs::read_to_string(again.data_dir.join(CONF_FILE)).unwrap();
        assert!(conf.contains(r#"listen: "127.0.0.1:14999""#), "{conf}");

        std::fs::remove_file(
            again
                .data_dir
                .join(KEYS_DIR)
                .join(nats_conf::SERVER_USER_SEED_FILE),
        )
        .unwrap();
        assert!(prepare(&options).unwrap_err().contains("only some"));
    }
}
