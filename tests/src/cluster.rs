//! A three-node nats-server cluster on loopback, configured from the committed
//! `nats/cluster/node.conf.template` (so the test runs what operators run), and made fit for a
//! test: TLS blocks and the monitoring port removed, every address on `127.0.0.1` (client ports
//! picked by the OS, route ports picked free just before the start), each node's JetStream store
//! and the shared `kez-accounts.conf` in a temporary directory.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{START_TIMEOUT, conf_string, nats_server_binary};

/// How many nodes [`NatsCluster`] runs.
pub const NODES: usize = 3;

/// The committed template every node's config is made from.
pub fn node_template_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats/cluster/node.conf.template")
}

/// One node's config from the template (`nats/cluster/node.conf.template`) for node `n`
/// (1-based): the client listener on `client_listen`, the route listener on
/// `127.0.0.1:<route_ports[n-1]>`, routes to every node's route port, JetStream in `store_dir`,
/// without the `tls` blocks and the monitoring port. Comment lines are dropped.
///
/// # Panics
///
/// If the template no longer has one of the lines this replaces: the test must follow it.
pub fn node_conf(
    template: &str,
    n: usize,
    client_listen: &str,
    route_ports: &[u16; NODES],
    store_dir: &Path,
) -> String {
    let mut conf = String::new();
    let mut replaced = Vec::new();
    // Depth inside a `tls { ... }` block being dropped.
    let mut skipping = 0usize;
    for line in template.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') {
            continue;
        }
        if skipping > 0 || trimmed == "tls {" {
            skipping += trimmed.matches('{').count();
            skipping -= trimmed.matches('}').count();
            if trimmed == "tls {" {
                replaced.push("tls");
            }
            continue;
        }
        let line = line.replace("NODE_N", &n.to_string());
        let line = match trimmed {
            "listen: \"0.0.0.0:4222\"" => {
                replaced.push("client listen");
                format!("listen: \"{client_listen}\"")
            }
            "listen: \"0.0.0.0:6222\"" => {
                replaced.push("route listen");
                format!("  listen: \"127.0.0.1:{}\"", route_ports[n - 1])
            }
            "http: \"127.0.0.1:8222\"" => {
                replaced.push("http");
                continue;
            }
            "store_dir: \"/var/lib/nats\"" => {
                replaced.push("store_dir");
                format!("  store_dir: {}", conf_string(store_dir))
            }
            _ => match (1..=NODES).find(|k| {
                trimmed.starts_with(&format!("\"nats-route://kez-nats-{k}.internal:6222\""))
            }) {
                Some(k) => {
                    replaced.push("route");
                    format!("    \"nats-route://127.0.0.1:{}\"", route_ports[k - 1])
                }
                None => line,
            },
        };
        conf.push_str(&line);
        conf.push('\n');
    }
    for (what, times) in [
        ("client listen", 1),
        ("route listen", 1),
        ("http", 1),
        ("store_dir", 1),
        ("route", NODES),
        ("tls", 2),
    ] {
        assert_eq!(
            replaced.iter().filter(|r| **r == what).count(),
            times,
            "nats/cluster/node.conf.template changed: expected {times} {what} line(s) to \
             replace; update kez_tests::cluster::node_conf"
        );
    }
    assert!(
        conf.contains("include \"kez-accounts.conf\""),
        "the template no longer includes kez-accounts.conf"
    );
    conf
}

/// One node of a [`NatsCluster`].
#[derive(Debug)]
pub struct ClusterNode {
    /// `kez-nats-<n>`, as in the template.
    pub name: String,
    child: Option<Child>,
    port: u16,
    n: usize,
    log_offset: u64,
    dir: PathBuf,
}

impl ClusterNode {
    /// The client port (fixed for the node's life: a restart reuses it).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("nats-server.log")
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        match std::fs::read(self.log_path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", self.log_path().display()),
        }
    }
}

/// Three nats-servers forming the `kez` cluster on loopback, with JetStream and the given
/// accounts (what `kez-chat-server nats-conf` prints after its JetStream block, i.e.
/// [`kez_chat_server::nats_conf::render_auth`]). Dropping it kills every node and removes the
/// stores.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes, `kez-nats-1` first.
    pub nodes: Vec<ClusterNode>,
    route_ports: [u16; NODES],
    template: String,
    // Declared last: removed after the nodes are killed.
    dir: TempDir,
}

impl NatsCluster {
    /// Starts the three nodes and waits until each is ready (listening, routes configured).
    /// JetStream's meta leader is elected a moment later: see [`wait_for_jetstream`].
    ///
    /// # Panics
    ///
    /// If a node does not become ready within [`START_TIMEOUT`]; the message holds its log.
    pub fn start(accounts: &str) -> NatsCluster {
        let template_path = node_template_path();
        let template = std::fs::read_to_string(&template_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", template_path.display()));
        let dir = tempfile::Builder::new()
            .prefix("kez-cluster-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let route_ports = free_ports();
        let mut nodes = Vec::new();
        for n in 1..=NODES {
            let node_dir = dir.path().join(format!("node{n}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            std::fs::write(node_dir.join("kez-accounts.conf"), accounts).unwrap();
            nodes.push(ClusterNode {
                name: format!("kez-nats-{n}"),
                child: None,
                port: 0,
                n,
                log_offset: 0,
                dir: node_dir,
            });
        }
        let mut cluster = NatsCluster {
            nodes,
            route_ports,
            template,
            dir,
        };
        for i in 0..NODES {
            cluster.spawn(i, "127.0.0.1:-1");
        }
        for i in 0..NODES {
            cluster.wait_ready(i);
        }
        cluster
    }

    /// Every node's client URL, comma-separated (what `--nats-url` and clients get), starting
    /// with node `first` (0-based) so that connections spread over the nodes.
    pub fn urls_from(&self, first: usize) -> String {
        (0..NODES)
            .map(|i| self.nodes[(first + i) % NODES].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// Kills node `i` (0-based) with SIGKILL, as a crash would, and waits for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(child) = self.nodes[i].child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.nodes[i].child = None;
    }

    /// Starts node `i` again with its store, on its old client port, and waits until it is
    /// ready.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let listen = format!("127.0.0.1:{}", self.nodes[i].port);
        self.spawn(i, &listen);
        self.wait_ready(i);
    }

    /// Every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for node in &self.nodes {
            let _ = writeln!(all, "===== {} =====\n{}", node.name, node.log());
        }
        all
    }

    fn spawn(&mut self, i: usize, client_listen: &str) {
        let node = &mut self.nodes[i];
        let conf = node_conf(
            &self.template,
            node.n,
            client_listen,
            &self.route_ports,
            &node.dir.join("js"),
        );
        let conf_path = node.dir.join("nats-server.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log_path())
            .unwrap();
        let mut offset = log.metadata().unwrap().len();
        if offset > 0 {
            let marker = "--- kez-tests: restart ---\n";
            log.write_all(marker.as_bytes()).unwrap();
            offset += marker.len() as u64;
        }
        node.log_offset = offset;
        let child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        node.child = Some(child);
    }

    fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        let node = &mut self.nodes[i];
        loop {
            let log = node.log();
            let this_run = log.get(node.log_offset as usize..).unwrap_or("");
            if let Some(port) = this_run
                .lines()
                .find_map(kez_chat_server::dev::parse_listen_port)
            {
                node.port = port;
            }
            if this_run
                .lines()
                .any(|l| l.trim_end().ends_with("Server is ready"))
                && node.port != 0
            {
                return;
            }
            if let Some(Ok(Some(status))) = node.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "{} exited before it was ready ({status}); log:\n{log}",
                    node.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} was not ready within {START_TIMEOUT:?}; log:\n{log}",
                node.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The directory holding every node's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill(i);
        }
    }
}

/// Three distinct free loopback ports: bound to port 0, read, released. Another process could
/// take one in between; the start then fails loudly rather than silently.
fn free_ports() -> [u16; NODES] {
    let listeners: Vec<std::net::TcpListener> = (0..NODES)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    [ports[0], ports[1], ports[2]]
}

/// Polls, as a JetStream user of `client`, until the cluster's JetStream answers (its meta
/// leader is elected), for at most `within`.
///
/// # Panics
///
/// If it does not answer in time.
pub async fn wait_for_jetstream(client: &async_nats::Client, within: Duration) {
    let js = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + within;
    loop {
        match js.query_account().await {
            Ok(_) => return,
            Err(err) => assert!(
                Instant::now() < deadline,
                "JetStream did not answer within {within:?}: {err}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
