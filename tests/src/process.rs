//! The real `kez-chat-server` binary as a child process, for tests that need what an in-process
//! [`crate::kez_server::KezServer`] cannot show: several instances with their own connections,
//! and an instance dying abruptly (SIGKILL) mid-load.
//!
//! The binary is the one cargo built next to the test binary (`cargo build --bins`; `make test`
//! does it), or `$KEZ_CHAT_SERVER_BIN`. See [`kez_chat_server_binary`].

use std::fs::File;
use std::path::PathBuf;
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

/// Returns the `kez-chat-server` binary the fixture runs.
///
/// That is `$KEZ_CHAT_SERVER_BIN` if set, otherwise `kez-chat-server` in the directory cargo
/// builds binaries into for this profile: the test binary runs from `<target>/<profile>/deps/`, so
/// two levels up from it.
///
/// # Panics
///
/// If the file does not exist, saying to run `cargo build --bins`.
pub fn kez_chat_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(KEZ_CHAT_SERVER_BIN_ENV) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{KEZ_CHAT_SERVER_BIN_ENV}={} does not exist; point it at a kez-chat-server binary or \
             unset it",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot find the running test binary: {e}"));
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("test binary {} has no grandparent directory", exe.display()));
    let path = profile_dir.join("kez-chat-server");
    assert!(
        path.is_file(),
        "kez-chat-server not found at {}: run `cargo build --bins` (make test does), or set \
         {KEZ_CHAT_SERVER_BIN_ENV} to a kez-chat-server binary",
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
        let binary = kez_chat_server_binary();
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
        let mut command = Command::new(&binary);
        command
            .arg("run")
            .arg("--nats-url")
            .arg(nats_url)
            .arg("--domain")
            .arg(TEST_DOMAIN)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_clone))
            .stderr(Stdio::from(log));
        // Settings the developer's environment may carry must not leak into the test server.
        for name in [
            "KEZ_CONFIG",
            "KEZ_NATS_USER",
            "KEZ_NATS_PASSWORD",
            "KEZ_NATS_NKEY_SEED_FILE",
            "KEZ_KV_REPLICAS",
        ] {
            command.env_remove(name);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        // From here on a panic drops `server`, which kills the child.
        let mut server = KezServerProcess { child, dir };
        server.wait_serving(nats_url).await;
        server
    }

    async fn wait_serving(&mut self, nats_url: &str) {
        let deadline = Instant::now() + SERVE_TIMEOUT;
        let client = async_nats::ConnectOptions::new()
            .request_timeout(Some(Duration::from_secs(1)))
            .connect(nats_url)
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
