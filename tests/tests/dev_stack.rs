//! `kez-chat-server dev`, the one-command local stack, run as the real binary: people register
//! with the real `kez-chat`, the stack stops cleanly on SIGTERM (its nats-server child with it)
//! and a restart on the same data directory keeps users and undelivered messages. Also what
//! `dev` says when there is no nats-server, and when its broker dies under it.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use kez_tests::callout::run_to_completion;
use kez_tests::process::{kez_chat_binary, kez_chat_server_command};
use serde_json::Value;
use tempfile::TempDir;

/// How long `dev` may take to serve (a cold nats-server with JetStream, then the services).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `dev` may take to stop after SIGTERM (services, then its nats-server).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A `kez-chat-server dev` process, its output in files. Dropping it (also when a test panics)
/// stops it, and kills its nats-server if that is still there.
struct Dev {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    url: String,
    port: u16,
    http_port: u16,
    broker_pid: u32,
}

impl Dev {
    /// Starts `dev --data-dir <data> --port <port> --http-port 0` with the fixtures' nats-server
    /// and waits for its banner. Output goes to `<out>/dev-<run>.{out,err}`.
    async fn start(data: &Path, port: u16, out: &Path, run: &str) -> Dev {
        Dev::start_with(data, port, out, run, &[]).await
    }

    /// [`Dev::start`] with `extra` flags (`--pin`).
    async fn start_with(data: &Path, port: u16, out: &Path, run: &str, extra: &[&str]) -> Dev {
        let stdout = out.join(format!("dev-{run}.out"));
        let stderr = out.join(format!("dev-{run}.err"));
        let child = dev_command(data, port)
            .args(extra)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start kez-chat-server dev: {e}"));
        let mut dev = Dev {
            child,
            stdout,
            stderr,
            url: String::new(),
            port: 0,
            http_port: 0,
            broker_pid: 0,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let banner = dev.stdout();
            let field = |name: &str| {
                banner
                    .lines()
                    .find_map(|line| line.trim().strip_prefix(name))
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(str::to_owned)
            };
            if let (Some(url), Some(http), Some(broker)) = (
                field("NATS URL"),
                field("HTTP"),
                field("broker    nats-server pid"),
            ) {
                dev.port = url.rsplit_once(':').unwrap().1.parse().unwrap();
                dev.http_port = http.rsplit_once(':').unwrap().1.parse().unwrap();
                dev.broker_pid = broker.trim_end_matches(',').parse().unwrap();
                dev.url = url;
                return dev;
            }
            if let Ok(Some(status)) = dev.child.try_wait() {
                panic!("dev exited before serving ({status}):\n{}", dev.output());
            }
            assert!(
                Instant::now() < deadline,
                "dev did not serve within {READY_TIMEOUT:?}:\n{}",
                dev.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn output(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr())
    }

    /// Sends `signal` and waits for `dev` to exit.
    async fn stop_with(&mut self, signal: &str) -> ExitStatus {
        signal_pid(signal, self.child.id());
        self.wait_exit().await
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dev did not exit within {STOP_TIMEOUT:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal_pid("-TERM", self.child.id());
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.broker_pid != 0 && process_exists(self.broker_pid) {
            signal_pid("-KILL", self.broker_pid);
        }
    }
}

/// `kez-chat-server dev` on loopback with any free HTTP port, the developer's settings removed.
fn dev_command(data: &Path, port: u16) -> Command {
    let mut command = kez_chat_server_command();
    command
        .env(kez_tests::NATS_SERVER_ENV, kez_tests::nats_server_binary())
        .env_remove("KEZ_DEV_DATA_DIR")
        .arg("dev")
        .arg("--data-dir")
        .arg(data)
        .arg("--port")
        .arg(port.to_string())
        .arg("--http-port")
        .arg("0");
    command
}

fn signal_pid(signal: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` is a live (not zombie) process.
fn process_exists(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// A client home in a temporary directory.
struct Person {
    home: PathBuf,
    _dir: TempDir,
}

impl Person {
    fn new() -> Person {
        let dir = tempfile::tempdir().unwrap();
        Person {
            home: dir.path().join("home"),
            _dir: dir,
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(kez_chat_binary());
        command
            .env_remove("KEZ_CHAT_HOME")
            .env_remove("KEZ_CHAT_SERVER")
            .arg("--home")
            .arg(&self.home)
            .args(args)
            .stdin(Stdio::null());
        run_to_completion(command).await
    }

    /// Runs `kez-chat --home <home> args…`, which must succeed; answers stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert!(
            output.status.success(),
            "kez-chat {args:?} failed ({:?}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let stdout = self.ok(&args).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    }
}

/// `GET <path>` on the HTTP shim; answers the status line.
fn http_status(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn dev_keeps_users_and_messages_across_a_restart() {
    let data = tempfile::Builder::new()
        .prefix("kez-dev-")
        .tempdir()
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    // Port 0: nats-server picks a free port and dev reports it; the restart asks for that one.
    let mut dev = Dev::start(data.path(), 0, out.path(), "first").await;
    assert_ne!(dev.port, 4222);
    assert!(dev.stdout().contains("new keys"), "{}", dev.output());
    assert!(
        dev.stdout()
            .contains(&format!("--server {} register alice", dev.url)),
        "the banner says how to point kez-chat at it:\n{}",
        dev.output()
    );
    assert!(http_status(dev.http_port, "/healthz").contains("200"));

    let alice = Person::new();
    let bob = Person::new();
    let out_alice = alice
        .ok(&["--server", &dev.url, "register", "alice", "--no-paper-key"])
        .await;
    assert!(
        out_alice.contains("registered as @alice@kez.localhost"),
        "{out_alice}"
    );
    let alice_key = alice.json(&["whoami"]).await["key"].clone();
    bob.ok(&["--server", &dev.url, "register", "bob", "--no-paper-key"])
        .await;
    alice.ok(&["add", "@bob"]).await;
    bob.ok(&["add", "@alice"]).await;
    // bob is not running: the broker keeps it, across the restart.
    alice.ok(&["send", "@bob", "before the restart"]).await;

    let status = dev.stop_with("-TERM").await;
    assert!(
        status.success(),
        "dev after SIGTERM: {status:?}\n{}",
        dev.output()
    );
    assert!(
        !process_exists(dev.broker_pid),
        "the nats-server child (pid {}) is gone",
        dev.broker_pid
    );
    assert!(
        TcpStream::connect(("127.0.0.1", dev.port)).is_err(),
        "nothing listens on the NATS port any more"
    );
    assert!(dev.stdout().contains("dev: stopped"), "{}", dev.output());
    assert!(
        !data.path().join("nats-server.pid").exists(),
        "the pid file is removed"
    );

    // --port 0 again: the port of the first start was kept in the data directory.
    let port = dev.port;
    let mut dev = Dev::start(data.path(), 0, out.path(), "second").await;
    assert_eq!(dev.port, port, "{}", dev.output());
    assert!(dev.stdout().contains("keys reused"), "{}", dev.output());

    let me = alice.json(&["whoami"]).await;
    assert_eq!(me["handle"], "@alice@kez.localhost");
    assert_eq!(me["key"], alice_key);
    let read = bob.ok(&["inbox"]).await;
    assert!(
        read.contains("@alice@kez.localhost: before the restart"),
        "the offline message survived the restart: {read}"
    );
    let carol = Person::new();
    carol
        .ok(&["--server", &dev.url, "register", "carol", "--no-paper-key"])
        .await;
    let added = carol.json(&["add", "@alice"]).await;
    assert_eq!(added["handle"], "@alice@kez.localhost");
    assert_eq!(
        added["key"], alice_key,
        "the registry still has alice's key"
    );

    let status = dev.stop_with("-INT").await;
    assert!(
        status.success(),
        "dev after SIGINT: {status:?}\n{}",
        dev.output()
    );
    assert!(!process_exists(dev.broker_pid));
}

#[tokio::test]
async fn dev_says_how_to_install_a_missing_nats_server() {
    let data = tempfile::tempdir().unwrap();
    let mut command = dev_command(data.path(), 0);
    command.env(
        kez_tests::NATS_SERVER_ENV,
        data.path().join("no-nats-server"),
    );
    let output = run_to_completion(command).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("KEZ_NATS_SERVER="), "{stderr}");
    assert!(stderr.contains("make tools"), "{stderr}");
}

#[tokio::test]
async fn dev_fails_with_the_brokers_log_when_its_nats_server_dies() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut dev = Dev::start(data.path(), 0, out.path(), "dies").await;
    signal_pid("-KILL", dev.broker_pid);
    let status = dev.wait_exit().await;
    assert_eq!(status.code(), Some(1), "{}", dev.output());
    let stderr = dev.stderr();
    assert!(stderr.contains("exited unexpectedly"), "{stderr}");
    assert!(
        stderr.contains("Server is ready"),
        "the error shows the end of nats-server's log: {stderr}"
    );
}

/// The pin node's address is kept across restarts of `dev --pin`, so a pinned file still
/// downloads while its owner is offline; and when the node does move (its kept port taken), a
/// client finds it where the server's info says it is now.
#[tokio::test]
async fn pinned_files_download_after_the_dev_stack_restarts_and_after_its_pin_node_moves() {
    let data = tempfile::Builder::new()
        .prefix("kez-dev-")
        .tempdir()
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    // Printed just after the banner's other lines, which `Dev::start_with` waits for.
    let pin_line = |dev: &Dev| {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(provider) = dev.stdout().lines().find_map(|line| {
                line.trim()
                    .strip_prefix("pin node")
                    .map(|rest| rest.trim().to_owned())
            }) {
                return provider;
            }
            assert!(
                Instant::now() < deadline,
                "the banner names the pin node: {}",
                dev.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut dev = Dev::start_with(data.path(), 0, out.path(), "first", &["--pin"]).await;
    let provider = pin_line(&dev);
    let alice = Person::new();
    let bob = Person::new();
    alice
        .ok(&["--server", &dev.url, "register", "alice", "--no-paper-key"])
        .await;
    bob.ok(&["--server", &dev.url, "register", "bob", "--no-paper-key"])
        .await;
    alice.ok(&["add", "@bob"]).await;
    bob.ok(&["add", "@alice"]).await;
    // Two files: each download below fetches a blob bob does not have yet.
    for (name, text) in [
        ("plans.txt", "the plans, pinned"),
        ("later.txt", "read me later"),
    ] {
        let file = out.path().join(name);
        std::fs::write(&file, text).unwrap();
        alice
            .ok(&["publish", file.to_str().unwrap(), "--to", "@bob", "--pin"])
            .await;
    }
    // alice goes offline: no kez-chat of hers runs from here on.

    assert!(dev.stop_with("-TERM").await.success());
    let mut dev = Dev::start_with(data.path(), 0, out.path(), "second", &["--pin"]).await;
    assert_eq!(pin_line(&dev), provider, "the pin node kept its address");
    let first = out.path().join("first.txt");
    bob.ok(&[
        "download",
        "@alice/plans.txt",
        "-o",
        first.to_str().unwrap(),
    ])
    .await;
    assert_eq!(std::fs::read(&first).unwrap(), b"the plans, pinned");

    // The kept port is taken by someone else: the node moves, and clients follow the server.
    assert!(dev.stop_with("-TERM").await.success());
    let kept: std::net::SocketAddr = std::fs::read_to_string(data.path().join("pin/bind"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _squatter = std::net::UdpSocket::bind(kept).unwrap();
    let dev = Dev::start_with(data.path(), 0, out.path(), "third", &["--pin"]).await;
    assert_ne!(pin_line(&dev), provider, "the pin node had to move");
    let moved = out.path().join("moved.txt");
    bob.ok(&[
        "download",
        "@alice/later.txt",
        "-o",
        moved.to_str().unwrap(),
    ])
    .await;
    assert_eq!(std::fs::read(&moved).unwrap(), b"read me later");
}

/// `make demo`'s script, the README's first command, passes against the binaries this test
/// suite built: a change to what the CLI prints cannot break the demo unnoticed.
#[test]
fn the_demo_script_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin_dir = kez_chat_binary().parent().unwrap().to_owned();
    let output = Command::new("bash")
        .arg(root.join("scripts/demo.sh"))
        .env("KEZ_DEMO_BIN_DIR", &bin_dir)
        .env_remove("KEZ_DEMO_KEEP")
        .current_dir(root)
        .output()
        .expect("bash runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("demo: all 53 steps passed"), "{text}");
}
