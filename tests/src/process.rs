//! The real `kez-chat-server` binary as a child process, for tests that need what an in-process
//! [`crate::kez_server::KezServer`] cannot show: several instances with their own connections,
//! an instance dying abruptly (SIGKILL) mid-load, the server's log (the auth callout's reasons
//! for refusing a client), and one-shot commands (`admin`, a `run` that must refuse to start).
//!
//! The binary is the one cargo built next to the test binary (`cargo build --bins`; `make test`
//! does it), or `$KEZ_CHAT_SERVER_BIN`. See [`kez_chat_server_binary`]; the CLI tests find `kez-chat`
//! the same way ([`kez_chat_binary`]).

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::kez_server::TEST_DOMAIN;

/// Environment variable naming a `kez-chat-server` binary to use instead of the one in the
/// target directory.
pub const KEZ_CHAT_SERVER_BIN_ENV: &str = "KEZ_CHAT_SERVER_BIN";

/// How long [`KezServerProcess::spawn`] waits for the server to serve.
pub const SERVE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long [`KezServerProcess::terminate`] waits for the server to exit after SIGTERM.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(15);

/// What the server logs once every endpoint is subscribed (after a flush, so the broker knows).
const SERVING_LINE: &str = "kez-chat-server serving";

/// Environment variables that configure `kez-chat-server`: removed from every child, so that a
/// developer's settings cannot leak into a test server.
const SETTINGS_ENV: &[&str] = &[
    "KEZ_CONFIG",
    "KEZ_NATS_URL",
    "KEZ_NATS_USER",
    "KEZ_NATS_PASSWORD",
    "KEZ_NATS_NKEY_SEED_FILE",
    "KEZ_KEYS_DIR",
    "KEZ_CALLOUT_ISSUER",
    "KEZ_DOMAIN",
    "KEZ_KV_REPLICAS",
];

/// A `kez-chat-server` command (no arguments yet) with the developer's `KEZ_*` settings
/// removed from its environment, `RUST_LOG=info` and `NO_COLOR=1`; for one-shot commands such as
/// `admin disable` or a `run` that is expected to fail. Output is left to the caller.
///
/// # Panics
///
/// If the binary is missing (see [`kez_chat_server_binary`]).
pub fn kez_chat_server_command() -> Command {
    let mut command = Command::new(kez_chat_server_binary());
    command
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    for name in SETTINGS_ENV {
        command.env_remove(name);
    }
    command
}

/// `run` arguments that turn every rate limit of PROTOCOL.md §5.5 off: for measurements of what
/// the server can do, not of its limiter.
pub const LIMITS_OFF: [&str; 12] = [
    "--rate-limit-per-sec",
    "0",
    "--register-limit-per-hour",
    "0",
    "--register-limit-global-per-hour",
    "0",
    "--connect-limit-per-sec",
    "0",
    "--send-limit-per-sec",
    "0",
    "--send-bytes-per-hour",
    "0",
];

/// Environment variable naming a `kez-chat` (CLI) binary to use instead of the one in the
/// target directory.
pub const KEZ_CHAT_BIN_ENV: &str = "KEZ_CHAT_BIN";

/// Returns the `kez-chat-server` binary the fixture runs.
///
/// That is `$KEZ_CHAT_SERVER_BIN` if set, otherwise `kez-chat-server` in the directory cargo
/// builds binaries into for this profile: beside the running binary when that is a workspace
/// binary such as `kez-bench` (`<target>/<profile>/`), else two levels up from a test binary,
/// which runs from `<target>/<profile>/deps/`.
///
/// # Panics
///
/// If the file does not exist, saying to run `cargo build --bins`.
pub fn kez_chat_server_binary() -> PathBuf {
    workspace_binary("kez-chat-server", KEZ_CHAT_SERVER_BIN_ENV)
}

/// Returns the `kez-chat` CLI binary: `$KEZ_CHAT_BIN` if set, otherwise `kez-chat` next to
/// `kez-chat-server` (see [`kez_chat_server_binary`]).
///
/// # Panics
///
/// If the file does not exist, saying to run `cargo build --bins`.
pub fn kez_chat_binary() -> PathBuf {
    workspace_binary("kez-chat", KEZ_CHAT_BIN_ENV)
}

/// The binary `name` cargo built for this profile, or the one `$<env>` names.
fn workspace_binary(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env}={} does not exist; point it at a {name} binary or unset it",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot find the running test binary: {e}"));
    // A workspace binary (kez-bench) runs from `<target>/<profile>/` itself, beside `name`.
    if let Some(beside) = exe
        .parent()
        .map(|dir| dir.join(name))
        .filter(|p| p.is_file())
    {
        return beside;
    }
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("test binary {} has no grandparent directory", exe.display()));
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: run `cargo build --bins` (make test does), or set {env} to a \
         {name} binary",
        path.display()
    );
    path
}

/// A `kez-chat-server run` child process serving [`TEST_DOMAIN`] for one NATS URL.
///
/// It logs at `RUST_LOG=info` to a file in its own temporary directory ([`log`](Self::log)).
/// Dropping the fixture (also while unwinding from a panic) kills it with SIGKILL.
#[derive(Debug)]
pub struct KezServerProcess {
    child: Child,
    // Declared last so it is removed only after the process is gone.
    dir: TempDir,
}

impl KezServerProcess {
    /// Starts `kez-chat-server run --nats-url <nats_url> --domain kez.test` and returns once it
    /// serves: it has logged that every endpoint is subscribed, and a `kez.server.info` request
    /// is answered. (The log line matters when another instance is already serving the same
    /// broker: that one could answer the request.)
    ///
    /// # Panics
    ///
    /// If the binary is missing (see [`kez_chat_server_binary`]), exits, or does not serve
    /// within [`SERVE_TIMEOUT`]; the message includes its log.
    pub async fn spawn(nats_url: &str) -> KezServerProcess {
        KezServerProcess::spawn_with(nats_url, Vec::new(), async_nats::ConnectOptions::new()).await
    }

    /// Like [`spawn`](Self::spawn), with `extra` arguments for `run` (e.g. [`LIMITS_OFF`]).
    pub async fn spawn_with_args(nats_url: &str, extra: &[&str]) -> KezServerProcess {
        let args = extra.iter().map(OsString::from).collect();
        KezServerProcess::spawn_with(nats_url, args, async_nats::ConnectOptions::new()).await
    }

    /// Like [`spawn`](Self::spawn), with the auth callout on: `--keys-dir <keys_dir>
    /// --callout-issuer <issuer>` (the directory `kez-chat-server keygen` or
    /// [`kez_chat_server::nats_conf::keygen`] wrote). The broker must run with the matching
    /// config ([`kez_chat_server::nats_conf::render_auth`]); the readiness probe connects as the
    /// server's own `SERVER` user, whose seed is in `keys_dir`.
    ///
    /// # Panics
    ///
    /// As [`spawn`](Self::spawn), and if the `SERVER` user seed cannot be read.
    pub async fn spawn_with_callout(
        nats_url: &str,
        keys_dir: &Path,
        issuer: &str,
    ) -> KezServerProcess {
        KezServerProcess::spawn_with_callout_args(nats_url, keys_dir, issuer, &[]).await
    }

    /// Like [`spawn_with_callout`](Self::spawn_with_callout), with `extra` arguments for `run`
    /// (e.g. `--kv-replicas 3`, `--rate-limit-per-sec 0`). `nats_url` may list several
    /// comma-separated URLs (a cluster).
    pub async fn spawn_with_callout_args(
        nats_url: &str,
        keys_dir: &Path,
        issuer: &str,
        extra: &[&str],
    ) -> KezServerProcess {
        let seed_path = keys_dir.join(kez_chat_server::nats_conf::SERVER_USER_SEED_FILE);
        let seed = std::fs::read_to_string(&seed_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", seed_path.display()));
        let mut args = vec![
            OsString::from("--keys-dir"),
            keys_dir.as_os_str().to_owned(),
            OsString::from("--callout-issuer"),
            OsString::from(issuer),
        ];
        args.extend(extra.iter().map(OsString::from));
        let probe = async_nats::ConnectOptions::with_nkey(seed.trim().to_owned());
        KezServerProcess::spawn_with(nats_url, args, probe).await
    }

    /// Starts `run --nats-url <nats_url> --domain kez.test <extra_args>`; `probe` is how the
    /// readiness check connects to the broker.
    async fn spawn_with(
        nats_url: &str,
        extra_args: Vec<OsString>,
        probe: async_nats::ConnectOptions,
    ) -> KezServerProcess {
        let dir = tempfile::Builder::new()
            .prefix("kez-chat-server-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let log_path = dir.path().join("kez-chat-server.log");
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_clone = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate the log file handle: {e}"));
        let mut command = kez_chat_server_command();
        command
            .arg("run")
            .arg("--nats-url")
            .arg(nats_url)
            .arg("--domain")
            .arg(TEST_DOMAIN)
            .args(extra_args)
            .stdout(Stdio::from(log_clone))
            .stderr(Stdio::from(log));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start kez-chat-server: {e}"));
        // From here on a panic drops `server`, which kills the child.
        let mut server = KezServerProcess { child, dir };
        server.wait_serving(nats_url, probe).await;
        server
    }

    async fn wait_serving(&mut self, nats_url: &str, probe: async_nats::ConnectOptions) {
        let deadline = Instant::now() + SERVE_TIMEOUT;
        let client = probe
            .request_timeout(Some(Duration::from_secs(1)))
            .connect(kez_chat_server::server_list(nats_url))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {nats_url}: {e}"));
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "kez-chat-server exited before serving ({status}); log:\n{}",
                    self.log()
                );
            }
            if self.log().contains(SERVING_LINE)
                && client
                    .request("kez.server.info", bytes::Bytes::new())
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kez-chat-server did not serve within {SERVE_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL, as a crash or an OOM kill would, and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Graceful stop: SIGTERM, then waits up to [`TERMINATE_TIMEOUT`] for the server to finish
    /// in-flight requests and exit (SIGKILL after that). Returns its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        crate::stop_child(&mut self.child, "kez-chat-server", TERMINATE_TIMEOUT)
    }

    /// The path of the server's log (its stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("kez-chat-server.log")
    }

    /// The server's log so far; handy in assertion messages.
    pub fn log(&self) -> String {
        match std::fs::read(self.log_path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", self.log_path().display()),
        }
    }
}

impl Drop for KezServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
