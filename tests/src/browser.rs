//! `kez-chat ui` under test: the gateway as a child process ([`Gateway`]), a whole stack with
//! one gateway per person ([`UiStack`]), and the browser scenarios of `tests/browser/` run in
//! Debian's chromium through playwright-core ([`UiStack::run_scenario`]).
//!
//! Nothing here is skipped: a missing chromium or a missing `tests/browser/node_modules` is a
//! panic that names the command which installs it (`make browser-tools` does both checks, and
//! `make test` depends on it).

use std::ffi::OsString;
use std::fs::{DirBuilder, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::callout::{CalloutProcessStack, run_to_completion};
use crate::kez_server::TEST_DOMAIN;
use crate::person::{Person, kez_chat};
use crate::process::kez_chat_binary;

/// Environment variable naming the chromium binary (default [`DEFAULT_CHROMIUM`]).
pub const CHROMIUM_ENV: &str = "KEZ_CHROMIUM";

/// Debian's chromium.
pub const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";

/// The one command that installs chromium where it is missing.
pub const CHROMIUM_INSTALL: &str = "sudo apt-get install -y chromium";

/// The command that installs the pinned playwright-core into `tests/browser/node_modules`.
pub const NODE_MODULES_INSTALL: &str =
    "make browser-tools (or: cd tests/browser && npm ci --no-audit --no-fund)";

/// How long one scenario (`node tests/browser/<name>.mjs`) may run before it is killed.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(240);

/// How long a gateway may take to print its URL.
pub const GATEWAY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a gateway may take to exit after SIGTERM before it is killed.
pub const GATEWAY_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

/// `tests/browser/`: the scenarios, their helpers and their pinned node modules.
pub fn browser_dir() -> PathBuf {
    workspace_root().join("tests").join("browser")
}

/// The chromium binary: `$KEZ_CHROMIUM`, else [`DEFAULT_CHROMIUM`].
///
/// # Panics
///
/// If it does not exist, naming the command that installs it.
pub fn chromium_binary() -> PathBuf {
    let (path, from_env) = match std::env::var_os(CHROMIUM_ENV) {
        Some(path) if !path.is_empty() => (PathBuf::from(path), true),
        _ => (PathBuf::from(DEFAULT_CHROMIUM), false),
    };
    if !path.is_file() {
        if from_env {
            panic!(
                "{CHROMIUM_ENV}={} does not exist: point it at a chromium binary, or unset it \
                 and install Debian's: {CHROMIUM_INSTALL}",
                path.display()
            );
        }
        panic!(
            "chromium is not installed ({} is missing); the browser tests need it: \
             {CHROMIUM_INSTALL}",
            path.display()
        );
    }
    path
}

/// Checks that `tests/browser/node_modules` holds the pinned playwright-core.
///
/// # Panics
///
/// If it does not, naming the command that installs it.
pub fn check_node_modules() {
    let package = browser_dir().join("node_modules/playwright-core/package.json");
    assert!(
        package.is_file(),
        "{} is missing: the browser tests need the pinned playwright-core; run {NODE_MODULES_INSTALL}",
        package.display()
    );
}

/// The script of scenario `name`: `tests/browser/<name>.mjs`.
///
/// # Panics
///
/// If it does not exist: "tests/browser/<name>.mjs is missing".
pub fn scenario_script(name: &str) -> PathBuf {
    let script = browser_dir().join(format!("{name}.mjs"));
    assert!(
        script.is_file(),
        "tests/browser/{name}.mjs is missing ({})",
        script.display()
    );
    script
}

/// Makes `parent/name`, an empty directory of mode 0700 (what a kez-chat home must be), and
/// answers its path.
///
/// # Panics
///
/// If it cannot be made (or exists).
pub fn private_dir(parent: &Path, name: &str) -> PathBuf {
    let path = parent.join(name);
    DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    path
}

/// A running `kez-chat --home H [--server URL] ui --no-open --port 0 --json`.
///
/// Its stdout and stderr go to files in a temporary directory (no pipe can fill up and block
/// it); [`Gateway::start`] returns once stdout holds the one JSON line with the URL. Dropping
/// the fixture (also while unwinding from a panic) stops the gateway: SIGTERM, then SIGKILL
/// after [`GATEWAY_STOP_TIMEOUT`].
#[derive(Debug)]
pub struct Gateway {
    child: Child,
    url: String,
    port: u16,
    token: String,
    // Declared last so it is removed only after the process is gone.
    dir: TempDir,
}

impl Gateway {
    /// Starts a gateway for `home`, with `--server server` when given, and waits for its URL.
    ///
    /// # Panics
    ///
    /// If the binary is missing, the gateway exits, or prints no `{"url":…}` line within
    /// [`GATEWAY_START_TIMEOUT`]; the message includes what it printed.
    pub async fn start(home: &Path, server: Option<&str>) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("kez-ui-gateway-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let stdout_path = dir.path().join("stdout");
        let stderr_path = dir.path().join("stderr");
        let stdout = File::create(&stdout_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", stdout_path.display()));
        let stderr = File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", stderr_path.display()));
        let mut args = Vec::new();
        if let Some(server) = server {
            args.extend(["--server", server]);
        }
        args.extend(["ui", "--no-open", "--port", "0", "--json"]);
        let mut command = kez_chat(home, &args);
        command
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} ui: {e}; run `cargo build --bins`",
                kez_chat_binary().display()
            )
        });
        // From here on a panic drops `gateway`, which stops the child.
        let mut gateway = Gateway {
            child,
            url: String::new(),
            port: 0,
            token: String::new(),
            dir,
        };
        gateway.wait_for_url().await;
        gateway
    }

    async fn wait_for_url(&mut self) {
        let deadline = Instant::now() + GATEWAY_START_TIMEOUT;
        loop {
            let stdout = self.stdout();
            if let Some(line) = stdout.split_inclusive('\n').find(|l| l.ends_with('\n')) {
                let (url, port, token) = parse_url_line(line).unwrap_or_else(|why| {
                    panic!(
                        "`kez-chat ui --json` printed {line:?} first: {why}; stderr:\n{}",
                        self.stderr()
                    )
                });
                self.url = url;
                self.port = port;
                self.token = token;
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "`kez-chat ui` exited ({status}) before printing its URL; stdout:\n{stdout}\n\
                     stderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "`kez-chat ui` printed no URL within {GATEWAY_START_TIMEOUT:?}; stdout:\n{stdout}\n\
                 stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The URL the gateway printed: `http://127.0.0.1:PORT/TOKEN/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The port it listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The per-run token in its URL.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// What it printed on stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.dir.path().join("stdout"))
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join("stderr"))
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops it as Ctrl-C / SIGTERM would: SIGTERM, then SIGKILL after
    /// [`GATEWAY_STOP_TIMEOUT`]. Answers its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        crate::stop_child(&mut self.child, "kez-chat ui", GATEWAY_STOP_TIMEOUT)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Splits the `{"url":"http://127.0.0.1:PORT/TOKEN/"}` line into the URL, the port and the token.
fn parse_url_line(line: &str) -> Result<(String, u16, String), String> {
    let value: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("not JSON: {e}"))?;
    let url = value["url"]
        .as_str()
        .ok_or("no \"url\" string in it")?
        .to_owned();
    let rest = url
        .strip_prefix("http://127.0.0.1:")
        .ok_or("the URL is not http://127.0.0.1:PORT/…")?;
    let (port, path) = rest.split_once('/').ok_or("the URL has no path")?;
    let port: u16 = port.parse().map_err(|e| format!("bad port: {e}"))?;
    let token = path.strip_suffix('/').ok_or("the URL does not end in /")?;
    if token.len() != 43
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "the token {token:?} is not 43 characters of base64url"
        ));
    }
    Ok((url.clone(), port, token.to_owned()))
}

fn read_lossy(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A real stack (nats-server with the auth callout, the `kez-chat-server` binary), two empty
/// homes (mode 0700) for alice and bob, and a `kez-chat ui` gateway on each.
pub struct UiStack {
    /// Alice's gateway. (Gateways are declared first: they stop before the stack.)
    pub alice: Gateway,
    /// Bob's gateway.
    pub bob: Gateway,
    /// The broker and the server.
    pub stack: CalloutProcessStack,
    /// Alice's home.
    pub alice_home: PathBuf,
    /// Bob's home.
    pub bob_home: PathBuf,
    /// The homes [`UiStack::rekey`] registered new keys in.
    impostors: Mutex<Vec<Person>>,
    // Declared last: the homes are removed after everything that uses them stopped (a service
    // still running stops by itself once its home is gone).
    _dir: TempDir,
}

/// What a scenario run did.
#[derive(Debug)]
pub struct ScenarioRun {
    /// Its exit status (`None`: killed after [`SCENARIO_TIMEOUT`]).
    pub status: Option<ExitStatus>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
    /// Where its screenshots are.
    pub screenshots: PathBuf,
}

impl UiStack {
    /// Starts the stack, makes the homes and starts both gateways (with `--server` the broker's
    /// URL).
    ///
    /// # Panics
    ///
    /// If any part does not start.
    pub async fn start() -> UiStack {
        let stack = CalloutProcessStack::start().await;
        let dir = tempfile::Builder::new()
            .prefix("kez-ui-homes-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let alice_home = private_dir(dir.path(), "alice");
        let bob_home = private_dir(dir.path(), "bob");
        let url = stack.nats.url();
        let alice = Gateway::start(&alice_home, Some(&url)).await;
        let bob = Gateway::start(&bob_home, Some(&url)).await;
        UiStack {
            alice,
            bob,
            stack,
            alice_home,
            bob_home,
            impostors: Mutex::new(Vec::new()),
            _dir: dir,
        }
    }

    /// The environment a scenario gets (see `tests/browser/lib.mjs`).
    pub fn scenario_env(&self, screenshots: &Path) -> Vec<(&'static str, OsString)> {
        vec![
            ("KEZ_UI_ALICE", self.alice.url().into()),
            ("KEZ_UI_BOB", self.bob.url().into()),
            ("KEZ_CHAT", kez_chat_binary().into()),
            ("KEZ_HOME_ALICE", self.alice_home.clone().into()),
            ("KEZ_HOME_BOB", self.bob_home.clone().into()),
            ("KEZ_SERVER", self.stack.nats.url().into()),
            ("KEZ_DOMAIN", TEST_DOMAIN.into()),
            ("KEZ_SCREENSHOTS", screenshots.into()),
            ("KEZ_CHROMIUM", chromium_binary().into()),
        ]
    }

    /// Runs `node tests/browser/<name>.mjs` against this stack, with [`SCENARIO_TIMEOUT`];
    /// screenshots go to `<workspace>/target/ui-screenshots/<name>/`, emptied first.
    ///
    /// The script may ask for a key change (`KEZ_REKEY=stdin` tells it that it can): a line
    /// `KEZ-REKEY <name>` on its stdout makes the server name a new key for `@<name>`
    /// ([`UiStack::rekey`]); the harness then answers `KEZ-REKEYED` on its stdin (or
    /// `KEZ-REKEY-FAILED <why>`).
    ///
    /// # Panics
    ///
    /// If the script, chromium or the node modules are missing, or node cannot be started.
    pub async fn run_scenario(&self, name: &str) -> ScenarioRun {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

        let script = scenario_script(name);
        chromium_binary();
        check_node_modules();
        let screenshots = workspace_root()
            .join("target")
            .join("ui-screenshots")
            .join(name);
        if screenshots.exists() {
            std::fs::remove_dir_all(&screenshots)
                .unwrap_or_else(|e| panic!("cannot empty {}: {e}", screenshots.display()));
        }
        std::fs::create_dir_all(&screenshots)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", screenshots.display()));

        let mut command = tokio::process::Command::new("node");
        command
            .arg(&script)
            .current_dir(browser_dir())
            .envs(self.scenario_env(&screenshots))
            .env("KEZ_REKEY", "stdin")
            .env_remove("KEZ_CHAT_HOME")
            .env_remove("KEZ_CHAT_SERVER")
            .env_remove("KEZ_CHAT_ALLOW_PLAINTEXT")
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start node (Node.js 20+ must be on PATH) for {name}.mjs: {e}")
        });
        let mut stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr_task = tokio::spawn(async move {
            let mut bytes = Vec::new();
            let _ = stderr.read_to_end(&mut bytes).await;
            String::from_utf8_lossy(&bytes).into_owned()
        });

        let mut said = String::new();
        let finished = tokio::time::timeout(SCENARIO_TIMEOUT, async {
            let mut line = String::new();
            loop {
                line.clear();
                match stdout.read_line(&mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                said.push_str(&line);
                if let Some(who) = line.trim_end().strip_prefix("KEZ-REKEY ") {
                    let answer = match self.rekey(who.trim()).await {
                        Ok(()) => "KEZ-REKEYED\n".to_owned(),
                        Err(why) => format!("KEZ-REKEY-FAILED {}\n", why.replace('\n', " ")),
                    };
                    said.push_str(&format!("(harness) {answer}"));
                    let _ = stdin.write_all(answer.as_bytes()).await;
                    let _ = stdin.flush().await;
                }
            }
            child.wait().await
        })
        .await;
        let status = match finished {
            Ok(status) => Some(status.unwrap_or_else(|e| panic!("cannot wait for node: {e}"))),
            Err(_) => {
                // SIGTERM first: Playwright closes chromium on it; then SIGKILL.
                if let Some(pid) = child.id() {
                    let _ = std::process::Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .status();
                }
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
                None
            }
        };
        drop(stdin);
        let stderr = tokio::time::timeout(Duration::from_secs(10), stderr_task)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| "(its stderr could not be read)".to_owned());
        ScenarioRun {
            status,
            stdout: said,
            stderr,
            elapsed: started.elapsed(),
            screenshots,
        }
    }

    /// Makes the server name a new key for `@name`, as a lying server (or the same name
    /// registered again by someone else) would: registers `<name>_rekeyed` through the CLI in
    /// a new home, then puts that key into `name`'s handle record. Contacts who pinned the old
    /// key then see "the key changed" on their next `send` or `add`.
    pub async fn rekey(&self, name: &str) -> Result<(), String> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!("{name:?} is not a plain handle name"));
        }
        let impostor = Person::new();
        let registered = impostor
            .run(&[
                "--server",
                &self.stack.nats.url(),
                "register",
                &format!("{name}_rekeyed"),
                "--no-paper-key",
            ])
            .await;
        self.impostors
            .lock()
            .expect("impostors lock")
            .push(impostor);
        if !registered.status.success() {
            return Err(format!(
                "registering {name}_rekeyed failed: {}",
                String::from_utf8_lossy(&registered.stderr)
            ));
        }
        let js = async_nats::jetstream::new(self.stack.server_client().await);
        crate::kez_server::swap_key(&js, name, &format!("{name}_rekeyed")).await?;
        Ok(())
    }

    /// Runs scenario `name` ([`UiStack::run_scenario`]) and asserts it passed; the panic shows
    /// its stdout and stderr, both gateways' stderr and both services' logs.
    pub async fn assert_scenario(&self, name: &str) -> ScenarioRun {
        let run = self.run_scenario(name).await;
        if !run.status.is_some_and(|status| status.success()) {
            panic!(
                "scenario {name}.mjs failed ({}) after {:.1?}\n\
                 --- its stdout ---\n{}\n--- its stderr ---\n{}\n\
                 --- alice's gateway stderr ---\n{}\n--- bob's gateway stderr ---\n{}\n\
                 --- alice's service log ---\n{}\n--- bob's service log ---\n{}\n\
                 screenshots: {}",
                run.status
                    .map_or_else(|| "timed out".to_owned(), |s| s.to_string()),
                run.elapsed,
                run.stdout,
                run.stderr,
                self.alice.stderr(),
                self.bob.stderr(),
                read_lossy(&self.alice_home.join("service.log")),
                read_lossy(&self.bob_home.join("service.log")),
                run.screenshots.display(),
            );
        }
        run
    }

    /// Stops both gateways (SIGTERM), then both homes' services (`kez-chat --home H service
    /// stop`, which must succeed; it does when none runs).
    pub async fn stop(mut self) {
        self.alice.stop();
        self.bob.stop();
        for home in [&self.alice_home, &self.bob_home] {
            stop_service(home).await;
        }
        let impostors = std::mem::take(self.impostors.get_mut().expect("impostors lock"));
        for impostor in impostors {
            stop_service(&impostor.home).await;
        }
    }
}

/// `kez-chat --home <home> service stop`, which must succeed.
pub async fn stop_service(home: &Path) {
    let output = run_to_completion(kez_chat(home, &["service", "stop"])).await;
    assert!(
        output.status.success(),
        "kez-chat --home {} service stop failed ({}): {}",
        home.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_url_line() {
        let token = "A".repeat(42) + "_";
        let line = format!("{{\"url\":\"http://127.0.0.1:4321/{token}/\"}}\n");
        let (url, port, got) = parse_url_line(&line).unwrap();
        assert_eq!(url, format!("http://127.0.0.1:4321/{token}/"));
        assert_eq!(port, 4321);
        assert_eq!(got, token);
        assert!(parse_url_line("{\"url\":\"http://0.0.0.0:1/x/\"}").is_err());
        assert!(parse_url_line("{\"url\":\"http://127.0.0.1:1/short/\"}").is_err());
        assert!(parse_url_line("listening on …").is_err());
    }
}
