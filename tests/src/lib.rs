//! Fixtures for end-to-end tests against real `nats-server` processes.
//!
//! The main item is [`NatsServer`]: a throw-away `nats-server` with JetStream enabled, listening on a
//! random loopback port, with its config, log and JetStream store in a temporary directory that is
//! removed when the fixture is dropped.
//!
//! The binary comes from the `KEZ_NATS_SERVER` environment variable if set, otherwise from
//! `<workspace root>/.tools/venv/bin/nats-server`, which `make test` (or `nats/install.sh`) installs
//! at the version pinned in `nats/VERSION`. See [`nats_server_binary`].
//!
//! ```no_run
//! let nats = kez_tests::NatsServer::start();
//! println!("connect to {}", nats.url());
//! // the server is killed and its files removed when `nats` goes out of scope
//! ```

pub mod browser;
pub mod callout;
pub mod chat;
pub mod cluster;
pub mod fake_broker;
pub mod federation;
pub mod http;
pub mod kez_server;
pub mod person;
pub mod previous_release;
pub mod process;
pub mod requests;
pub mod tls;

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Environment variable naming a `nats-server` binary to use instead of the one in `.tools/venv`.
pub const NATS_SERVER_ENV: &str = "KEZ_NATS_SERVER";

/// How long [`NatsServer::start`] waits for the server to report that it is ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long [`NatsServer::restart`] waits for the old server to exit after SIGTERM before it
/// kills it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Log line printed once the client listener is bound; the port follows the last `:`.
const LISTENING_PREFIX: &str = "Listening for client connections on ";
/// Log line printed once the server (JetStream included) accepts clients.
const READY_LINE: &str = "Server is ready";

/// Returns the `nats-server` binary the fixtures run.
///
/// That is `$KEZ_NATS_SERVER` if set, otherwise `<workspace root>/.tools/venv/bin/nats-server`.
///
/// # Panics
///
/// If the chosen file does not exist, with a message saying how to install it.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(NATS_SERVER_ENV) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{NATS_SERVER_ENV}={} does not exist; point it at a nats-server binary \
             (2.10+) or unset it and run `make test` or `nats/install.sh`",
            path.display()
        );
        return path;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".tools/venv/bin/nats-server");
    assert!(
        path.is_file(),
        "nats-server not found at {}; run `make test` or `nats/install.sh` from the repository \
         root to install the pinned version, or set {NATS_SERVER_ENV} to a nats-server binary",
        path.display()
    );
    path
}

/// A running `nats-server` child process with JetStream, for one test.
///
/// It listens on `127.0.0.1` on a port picked by the OS (never the default 4222), has no HTTP
/// monitoring port and no authentication, and keeps its config, log and JetStream store in a
/// temporary directory.
///
/// Dropping the fixture (also while unwinding from a panic) kills the server, waits for it to exit,
/// then deletes the directory. A test process killed outright (SIGKILL) cannot do that, and leaves
/// the server running.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    /// Appended to the generated config, kept for restarts.
    conf_extra: String,
    /// `sync_interval: always` in the JetStream block, kept for restarts.
    sync_always: bool,
    /// Where the current run's output starts in the log.
    log_offset: u64,
    // Declared last so it is removed only after `Drop::drop` has killed the server.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server with the default fixture config and waits until it is ready.
    ///
    /// # Panics
    ///
    /// If the binary is missing, cannot be started, exits early, or is not ready within
    /// [`START_TIMEOUT`]; the message includes the server's log.
    pub fn start() -> NatsServer {
        NatsServer::start_with("")
    }

    /// Like [`NatsServer::start`], with `conf_extra` appended verbatim to the generated config.
    ///
    /// Use it for settings a test needs on top of the defaults (accounts, authorization, limits
    /// such as `max_payload: 2MB`). It must not set `listen`/`port`, `http`, or `jetstream`: the
    /// fixture owns those.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`], including when the server rejects the config.
    pub fn start_with(conf_extra: &str) -> NatsServer {
        NatsServer::start_configured(conf_extra, false)
    }

    /// Like [`NatsServer::start_with`], with `sync_interval: always` as in the configs kez-chat
    /// supplies (`kez-chat-server nats-conf`, `nats/cluster/`): JetStream fsyncs every write
    /// before acknowledging it, so what it acknowledged survives [`NatsServer::kill_and_restart`].
    pub fn start_durable(conf_extra: &str) -> NatsServer {
        NatsServer::start_configured(conf_extra, true)
    }

    fn start_configured(conf_extra: &str, sync_always: bool) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("kez-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory for nats-server: {e}"));
        // Port -1: the OS picks a free port.
        let (child, log_offset) =
            spawn_nats_server(dir.path(), "127.0.0.1:-1", conf_extra, sync_always);
        // From here on a panic drops `server`, which kills the child.
        let mut server = NatsServer {
            child,
            port: 0,
            conf_extra: conf_extra.to_owned(),
            sync_always,
            log_offset,
            dir,
        };
        server.wait_ready();
        server
    }

    /// Stops the server and starts a new one on the same port with the same JetStream store, as
    /// an operator restarting the broker would; returns once the new server is ready.
    ///
    /// The stop is graceful: SIGTERM (sent with the `kill` command, so no `unsafe`), after which
    /// nats-server flushes and closes its JetStream store and exits; only if it has not exited
    /// within [`STOP_TIMEOUT`] is it killed with SIGKILL. Clients see their connection drop and
    /// must reconnect by themselves. The new server appends to the same log, after a
    /// `--- kez-tests: restart ---` marker line.
    ///
    /// # Panics
    ///
    /// If the old server cannot be stopped or the new one does not become ready (for example
    /// because something else took the port meanwhile); the message includes the log.
    pub fn restart(&mut self) {
        stop_child(&mut self.child, "nats-server", STOP_TIMEOUT);
        self.start_again();
    }

    /// Stops the server gracefully (as [`NatsServer::restart`] does) and starts none: clients
    /// see a broker that is down until [`NatsServer::resume`].
    pub fn stop(&mut self) {
        stop_child(&mut self.child, "nats-server", STOP_TIMEOUT);
    }

    /// Starts the server stopped by [`NatsServer::stop`] again, on the same port, config and
    /// store; returns once it is ready.
    pub fn resume(&mut self) {
        self.start_again();
    }

    /// Like [`NatsServer::restart`], but the server is killed with SIGKILL, as a crash or an
    /// OOM kill would: no flush, no goodbye to clients. JetStream recovers its store at the
    /// next start.
    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.start_again();
    }

    /// Starts a new server on the same port, config and store; waits until it is ready.
    fn start_again(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let (child, log_offset) =
            spawn_nats_server(self.dir.path(), &listen, &self.conf_extra, self.sync_always);
        self.child = child;
        self.log_offset = log_offset;
        self.wait_ready();
    }

    /// Polls the log until the server is ready, and learns the port from it.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = self.log();
            // Only this run's lines: after a restart the log also holds the previous run's.
            let this_run = log.get(self.log_offset as usize..).unwrap_or("");
            if let Some(port) = this_run
                .lines()
                .find_map(kez_chat_server::dev::parse_listen_port)
            {
                self.port = port;
            }
            if this_run.lines().any(|l| l.trim_end().ends_with(READY_LINE)) {
                assert!(
                    self.port != 0,
                    "nats-server is ready but logged no {LISTENING_PREFIX:?} line; log:\n{log}"
                );
                return;
            }
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    panic!("nats-server exited before it was ready ({status}); log:\n{log}")
                }
                Ok(None) => {}
                Err(e) => panic!("cannot check on the nats-server process: {e}; log:\n{log}"),
            }
            if Instant::now() >= deadline {
                panic!(
                    "nats-server was not ready within {START_TIMEOUT:?} (no {READY_LINE:?} line); \
                     log:\n{log}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port the server listens on (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The configured JetStream `store_dir`; nats-server keeps its data in `jetstream/` below it.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// The path of the server's log (its stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The server's log so far; handy in assertion messages.
    pub fn log(&self) -> String {
        match std::fs::read(self.log_path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", self.log_path().display()),
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // SIGKILL: the store is thrown away with the directory, so no graceful shutdown is needed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `<dir>/nats.conf` listening on `listen` with JetStream in `<dir>/js` (fsyncing every
/// write with `sync_always`), then starts
/// nats-server on it with stdout and stderr appended to `<dir>/nats-server.log`. Returns the child
/// and the log's length before the start (where this run's output begins).
fn spawn_nats_server(
    dir: &Path,
    listen: &str,
    conf_extra: &str,
    sync_always: bool,
) -> (Child, u64) {
    let binary = nats_server_binary();
    let store_dir = dir.join("js");
    let conf_path = dir.join("nats.conf");
    let log_path = dir.join("nats-server.log");

    let mut conf = String::new();
    // No `http` block: no monitoring port.
    writeln!(conf, "listen: \"{listen}\"").unwrap();
    writeln!(conf, "server_name: \"kez-test\"").unwrap();
    writeln!(conf, "jetstream {{").unwrap();
    writeln!(conf, "  store_dir: {}", conf_string(&store_dir)).unwrap();
    // A stated size: the inbox stream reserves its bound at creation, which must not depend
    // on how much disk happens to be free (nats-server's default is 75 % of it).
    writeln!(conf, "  max_file_store: 64GB").unwrap();
    if sync_always {
        writeln!(conf, "  sync_interval: always").unwrap();
    }
    writeln!(conf, "}}").unwrap();
    conf.push_str(conf_extra);
    conf.push('\n');
    std::fs::write(&conf_path, conf)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf_path.display()));

    // nats-server logs to stderr; both streams go to a file so no pipe can fill up and block it.
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
    let mut log_offset = log
        .metadata()
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", log_path.display()))
        .len();
    if log_offset > 0 {
        let marker = "--- kez-tests: restart ---\n";
        log.write_all(marker.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", log_path.display()));
        log_offset += marker.len() as u64;
    }
    let log_clone = log
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot duplicate the log file handle: {e}"));
    let child = Command::new(&binary)
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_clone))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; run `make test` or `nats/install.sh` to (re)install it",
                binary.display()
            )
        });
    (child, log_offset)
}

/// Stops `child` gracefully: SIGTERM through the `kill` command (the crate forbids `unsafe`, so
/// no `libc::kill`), then waits up to `timeout` for it to exit, then SIGKILLs it.
///
/// # Panics
///
/// If the process cannot be waited for.
pub(crate) fn stop_child(child: &mut Child, what: &str, timeout: Duration) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                return child
                    .wait()
                    .unwrap_or_else(|e| panic!("cannot wait for {what}: {e}"));
            }
            Err(e) => panic!("cannot check on {what}: {e}"),
        }
    }
}

/// Quotes a path as a double-quoted nats-server config string.
fn conf_string(path: &Path) -> String {
    let s = path.to_str().unwrap_or_else(|| {
        panic!(
            "temporary path {} is not UTF-8; set TMPDIR to a plain path",
            path.display()
        )
    });
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_config_strings() {
        assert_eq!(conf_string(Path::new("/tmp/a b")), "\"/tmp/a b\"");
        assert_eq!(conf_string(Path::new("/tmp/a\"b")), "\"/tmp/a\\\"b\"");
    }
}
