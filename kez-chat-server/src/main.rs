//! `kez-chat-server`: the kez-chat home server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kez_chat_server::config::{ServerConfig, Settings};
use kez_chat_server::federation::PeerRecord;
use kez_chat_server::store::DisabledRecord;
use kez_chat_server::{Server, dev, nats_conf};
use kez_core::Handle;

/// The log filter without RUST_LOG: `info`, except the pin node's garbage collector, which says
/// at `info` that it skipped a run every 50 ms (a run happens only when one is due).
const DEFAULT_LOG_FILTER: &str = "info,iroh_blobs::store::gc=warn";

/// The kez-chat home server: handle registry and sigchain services over NATS.
///
/// Clients reach it only through NATS (`kez.registry.*`, `kez.sigchain.*`, `kez.server.*`, and
/// `kez.pin.*` with --pin-dir); all
/// state lives in JetStream key-value buckets, so several instances can share one broker.
#[derive(Parser)]
#[command(version, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the server's NATS keys (callout issuer, AUTH, SERVER and SYS users) in a directory,
    /// each seed in its own 0600 file, and print the values nats-server's config needs. A
    /// directory holding the first three (made before the SYS user existed) gets only the SYS
    /// user's key.
    Keygen {
        /// Where to write the seed files (created if missing; existing keys are never replaced)
        #[arg(long, env = "KEZ_KEYS_DIR")]
        keys_dir: PathBuf,
    },
    /// Print a complete single-node nats-server config for the keys in a directory.
    NatsConf {
        /// Directory of the keys `keygen` wrote
        #[arg(long, env = "KEZ_KEYS_DIR")]
        keys_dir: PathBuf,
        /// Client listen address
        #[arg(long, default_value = "0.0.0.0:4222")]
        listen: String,
        /// JetStream store directory
        #[arg(long, default_value = "/var/lib/nats")]
        store_dir: PathBuf,
    },
    /// Operator actions on the registry (with the same connection settings as `run`).
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Serve the NATS services until SIGINT or SIGTERM. Log level: RUST_LOG (default info, the
    /// pin node's garbage collector at warn).
    ///
    /// With --http-listen it also serves plain HTTP: WebFinger (GET /.well-known/webfinger,
    /// PROTOCOL.md §7) and, for operators, GET /healthz and GET /metrics (Prometheus). Off by
    /// default. Put a TLS reverse proxy in front that forwards only /.well-known/webfinger
    /// (deploy/README.md); keep /healthz and /metrics private.
    Run {
        /// TOML file with any of the settings below (keys as flag names with `_`)
        #[arg(long, env = "KEZ_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
    /// A complete local stack in one command, for development and trying kez-chat out: starts
    /// nats-server as a child with a generated config and keys, then serves like `run` with the
    /// auth callout and the HTTP shim, all on 127.0.0.1, until SIGINT or SIGTERM.
    ///
    /// Keys, config, JetStream store and nats-server's log live in the data directory; start
    /// again on the same directory and every user and undelivered message is still there.
    /// nats-server is $KEZ_NATS_SERVER, else .tools/venv/bin/nats-server (`make tools`) found
    /// above the current directory or this executable, else the one on PATH.
    /// Not for production: see nats/README.md for running the broker yourself.
    Dev {
        /// Data directory [default: $XDG_DATA_HOME/kez-chat-server/dev or
        /// ~/.local/share/kez-chat-server/dev]
        #[arg(long, env = "KEZ_DEV_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// NATS client port on 127.0.0.1 (0: any free port, kept in the data directory and asked
        /// for again at the next start)
        #[arg(long, default_value_t = dev::DEFAULT_PORT)]
        port: u16,
        /// HTTP shim port on 127.0.0.1: WebFinger, /healthz, /metrics (0: any free port)
        #[arg(long, default_value_t = dev::DEFAULT_HTTP_PORT)]
        http_port: u16,
        /// Domain served: handles are @name@<domain>
        #[arg(long, default_value = dev::DEFAULT_DOMAIN)]
        domain: String,
        /// Also pin: a pin node in <data dir>/pin on 127.0.0.1 (kez.pin.*, 1 GiB per user)
        #[arg(long)]
        pin: bool,
        #[command(flatten)]
        federation: DevFederation,
    },
}

/// Federation for `dev`: the flags of `run` (the server key defaults to
/// <data dir>/keys/federation.key; the federation URL to the broker's).
#[derive(clap::Args)]
struct DevFederation {
    /// Federate with other kez home servers (PROTOCOL.md §14)
    #[arg(long)]
    federate: bool,
    /// The server key file (created when missing) [default: <data dir>/keys/federation.key]
    #[arg(long)]
    federation_key: Option<PathBuf>,
    /// The NATS URL peers connect to [default: the dev broker's]
    #[arg(long)]
    federation_url: Option<String>,
    /// Where to ask a peer domain's WebFinger instead of https://<domain> (repeatable)
    #[arg(long = "peer-webfinger", value_name = "DOMAIN=URL")]
    peer_webfinger: Vec<String>,
    /// Accept plain-HTTP WebFinger bases and peer brokers without TLS
    #[arg(long)]
    federation_allow_http: bool,
    /// A PEM file of CA certificates trusted for peers besides the built-in roots
    #[arg(long, value_name = "FILE")]
    federation_ca: Option<PathBuf>,
    /// Talk only to these peer domains (repeatable)
    #[arg(long = "federation-allow", value_name = "DOMAIN")]
    federation_allow: Vec<String>,
    /// Never talk to these peer domains (repeatable)
    #[arg(long = "federation-deny", value_name = "DOMAIN")]
    federation_deny: Vec<String>,
    /// Seconds the outbox keeps trying before a message bounces [default: 259200]
    #[arg(long)]
    bounce_after: Option<u64>,
    /// Longest wait between two attempts of the outbox, in seconds [default: 600]
    #[arg(long)]
    retry_max: Option<u64>,
    /// Messages per second each peer domain may deliver [default: 50]
    #[arg(long)]
    peer_messages_per_sec: Option<f64>,
    /// Messages each peer domain may deliver at once [default: 500]
    #[arg(long)]
    peer_message_burst: Option<u32>,
    /// Most bytes KEZ_OUTBOX may hold [default: 1073741824]
    #[arg(long)]
    outbox_max_bytes: Option<u64>,
}

impl DevFederation {
    /// The same as `run`'s settings.
    fn settings(self) -> Result<Settings, String> {
        let pairs = self
            .peer_webfinger
            .iter()
            .map(|pair| {
                pair.split_once('=')
                    .map(|(domain, url)| (domain.to_owned(), url.to_owned()))
                    .ok_or_else(|| format!("--peer-webfinger {pair:?} is not DOMAIN=URL"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let list = |list: Vec<String>| (!list.is_empty()).then_some(list);
        Ok(Settings {
            federate: self.federate.then_some(true),
            federation_key: self.federation_key,
            federation_url: self.federation_url,
            peer_webfinger: list_pairs(pairs),
            federation_allow_http: self.federation_allow_http.then_some(true),
            federation_ca: self.federation_ca,
            federation_allow: list(self.federation_allow),
            federation_deny: list(self.federation_deny),
            bounce_after: self.bounce_after,
            retry_max: self.retry_max,
            peer_messages_per_sec: self.peer_messages_per_sec,
            peer_message_burst: self.peer_message_burst,
            outbox_max_bytes: self.outbox_max_bytes,
            ..Settings::default()
        })
    }
}

fn list_pairs(pairs: Vec<(String, String)>) -> Option<Vec<(String, String)>> {
    (!pairs.is_empty()).then_some(pairs)
}

/// The handle an admin action is about, and how to reach the registry.
#[derive(clap::Args)]
struct AdminTarget {
    /// The handle, e.g. @mallory
    handle: String,
    /// TOML config file, as for `run`
    #[arg(long, env = "KEZ_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

/// How an admin action reaches the broker.
#[derive(clap::Args)]
struct AdminConnection {
    /// TOML config file, as for `run`
    #[arg(long, env = "KEZ_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

/// The peer domain an admin action is about.
#[derive(clap::Args)]
struct PeerTarget {
    /// The peer server's domain, e.g. b.example (not `domain`: that is --domain, the served one)
    #[arg(value_name = "DOMAIN")]
    peer: String,
    #[command(flatten)]
    connection: AdminConnection,
}

#[derive(Subcommand)]
enum AdminAction {
    /// Refuse the handle's key at the broker: it can no longer connect (existing connections end
    /// when their authorization expires, within an hour).
    Disable(AdminTarget),
    /// Let a disabled handle's key connect again.
    Enable(AdminTarget),
    /// List the peer servers met or blocked: domain, pinned server key, since when, blocked.
    Peers(AdminConnection),
    /// Operator actions on one peer server (federation).
    Peer {
        #[command(subcommand)]
        action: PeerAction,
    },
}

#[derive(Subcommand)]
enum PeerAction {
    /// Refuse the domain both ways: its connections, its deliveries, mail and lookups for it.
    Block(PeerTarget),
    /// Talk to the domain again.
    Unblock(PeerTarget),
    /// Drop the server key pinned for the domain (after its operator said it changed): the
    /// next contact pins the key its WebFinger names then.
    Forget(PeerTarget),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal, and never with NO_COLOR set (no-color.org): logs written
        // to a file, a pipe or the journal stay plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty()),
        )
        .init();
    match Cli::parse().command {
        Command::Run { config, settings } => run(config, settings).await,
        Command::Dev {
            data_dir,
            port,
            http_port,
            domain,
            pin,
            federation,
        } => {
            let data_dir = match data_dir.map_or_else(dev::default_data_dir, Ok) {
                Ok(dir) => dir,
                Err(err) => return fail(&err),
            };
            let federation = match federation.settings() {
                Ok(settings) => settings,
                Err(err) => return fail(&err),
            };
            run_dev(
                dev::DevOptions {
                    data_dir,
                    port,
                    http_port,
                    domain,
                    pin,
                },
                federation,
            )
            .await
        }
        Command::Keygen { keys_dir } => match nats_conf::keygen(&keys_dir) {
            Ok((keys, generated)) => {
                match generated {
                    nats_conf::Generated::All => println!(
                        "Wrote the server's NATS keys to {} (mode 0600):",
                        keys_dir.display()
                    ),
                    nats_conf::Generated::SystemUser => println!(
                        "Added the system user's key to {} (mode 0600); the other three are unchanged:",
                        keys_dir.display()
                    ),
                }
                for (file, role, key) in [
                    (nats_conf::ISSUER_SEED_FILE, "callout issuer", &keys.issuer),
                    (nats_conf::AUTH_USER_SEED_FILE, "AUTH user", &keys.auth_user),
                    (
                        nats_conf::SERVER_USER_SEED_FILE,
                        "SERVER user",
                        &keys.server_user,
                    ),
                    (
                        nats_conf::SYSTEM_USER_SEED_FILE,
                        "SYS user",
                        &keys.system_user,
                    ),
                ] {
                    println!("  {file:<18} {role:<15} {key}");
                }
                println!();
                println!(
                    "nats-server config: kez-chat-server nats-conf --keys-dir {}",
                    keys_dir.display()
                );
                if generated == nats_conf::Generated::SystemUser {
                    println!(
                        "(the SYS user must be in the running broker's config: re-render it, then reload nats-server)"
                    );
                }
                println!(
                    "then run:           kez-chat-server run --keys-dir {} --callout-issuer {}",
                    keys_dir.display(),
                    keys.issuer
                );
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
        Command::NatsConf {
            keys_dir,
            listen,
            store_dir,
        } => match nats_conf::public_keys(&keys_dir) {
            Ok(keys) => {
                print!(
                    "{}",
                    nats_conf::render(&keys, &nats_conf::ConfParams { listen, store_dir })
                );
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
        Command::Admin { action } => report(match action {
            AdminAction::Disable(target) => admin_handle(target, true).await,
            AdminAction::Enable(target) => admin_handle(target, false).await,
            AdminAction::Peers(connection) => admin_peers(connection).await,
            AdminAction::Peer { action } => admin_peer(action).await,
        }),
    }
}

/// `admin disable|enable HANDLE`.
async fn admin_handle(target: AdminTarget, disable: bool) -> Result<String, String> {
    let config = resolve(target.config, target.settings)?;
    admin(&config, &target.handle, disable).await
}

fn resolve(config: Option<PathBuf>, settings: Settings) -> Result<ServerConfig, String> {
    let file = config.as_deref().map(Settings::from_file).transpose()?;
    settings.or(file.unwrap_or_default()).resolve()
}

async fn run(config: Option<PathBuf>, settings: Settings) -> ExitCode {
    let config = match resolve(config, settings) {
        Ok(config) => config,
        Err(err) => return fail(&err),
    };
    tracing::info!(nats = %config.nats_url, domain = %config.domain, http = ?config.http_listen, "starting");
    let server = tokio::select! {
        started = Server::start(&config) => match started {
            Ok(server) => server,
            Err(err) => return fail(&err.to_string()),
        },
        () = shutdown_signal() => return ExitCode::SUCCESS,
    };
    server.serve(shutdown_signal()).await;
    ExitCode::SUCCESS
}

/// `dev`: the broker as a child, the services in-process.
async fn run_dev(options: dev::DevOptions, federation: Settings) -> ExitCode {
    // The same checks `run` makes, before anything is started.
    let domain = match kez_core::handle::parse_domain(&options.domain) {
        Ok(domain) => domain,
        Err(err) => return fail(&format!("--domain {:?}: {err}", options.domain)),
    };
    let keys_dir = options.data_dir.join(dev::KEYS_DIR);
    if let Err(err) = federation.resolve_federation(Some(&keys_dir), "nats://127.0.0.1") {
        return fail(&err);
    }
    let binary = match dev::find_nats_server() {
        Ok(binary) => binary,
        Err(err) => return fail(&err),
    };
    let prepared = match dev::prepare(&options) {
        Ok(prepared) => prepared,
        Err(err) => return fail(&err),
    };
    let data_dir = prepared.data_dir.clone();
    tracing::info!(nats_server = %binary.display(), data = %data_dir.display(), new_keys = prepared.new_keys, "starting nats-server");
    let mut broker = tokio::select! {
        started = dev::Broker::start(&binary, &prepared) => match started {
            Ok(broker) => broker,
            Err(err) => match dev::kept_port(&data_dir) {
                Some(port) if options.port == 0 => {
                    return fail(&format!(
                        "{err}\n(with --port 0 the broker asks for port {port} again, kept in {}: free that port, or delete the file to take another, which changes the URL your users' homes and sigchains name)",
                        data_dir.join(dev::PORT_FILE).display()
                    ));
                }
                _ => return fail(&err),
            },
        },
        () = shutdown_signal() => return ExitCode::SUCCESS,
    };
    if options.port == 0
        && let Err(err) = dev::keep_port(&data_dir, broker.port())
    {
        tracing::warn!(error = %err, "the broker's port is not kept for the next start");
    }
    let url = broker.url();
    let mut config = prepared.server_config(&url, &domain, options.http_port, options.pin);
    config.federation = match federation.resolve_federation(
        Some(&prepared.data_dir.join(dev::KEYS_DIR)),
        &config.public_nats_url,
    ) {
        Ok(federation) => federation,
        Err(err) => {
            broker.stop().await;
            return fail(&err);
        }
    };
    let server = tokio::select! {
        started = Server::start(&config) => match started {
            Ok(server) => server,
            Err(err) => {
                broker.stop().await;
                return fail(&err.to_string());
            }
        },
        exited = broker.exited() => return broker_died(&broker, exited),
        () = shutdown_signal() => {
            broker.stop().await;
            return ExitCode::SUCCESS;
        }
    };
    let http = server
        .http_addr()
        .map_or_else(|| "off".to_owned(), |addr| format!("http://{addr}"));
    print_dev_banner(&broker, &data_dir, &domain, &http, prepared.new_keys);
    if let Some(provider) = server.pin_provider() {
        println!("  pin node  {provider}");
        println!();
    }
    let serving = server.serve(shutdown_signal());
    tokio::pin!(serving);
    tokio::select! {
        () = &mut serving => {}
        exited = broker.exited() => return broker_died(&broker, exited),
    }
    match broker.stop().await {
        Some(status) => tracing::info!(%status, "nats-server stopped"),
        None => tracing::warn!("nats-server was killed"),
    }
    println!(
        "kez-chat-server dev: stopped; the data stays in {}",
        data_dir.display()
    );
    ExitCode::SUCCESS
}

fn broker_died(
    broker: &dev::Broker,
    exited: std::io::Result<std::process::ExitStatus>,
) -> ExitCode {
    let how = match exited {
        Ok(status) => status.to_string(),
        Err(err) => format!("cannot wait for it: {err}"),
    };
    fail(&format!(
        "nats-server (pid {}) exited unexpectedly ({how}); last lines of {}:\n{}",
        broker.pid(),
        broker.log_path().display(),
        broker.log_tail()
    ))
}

fn print_dev_banner(
    broker: &dev::Broker,
    data_dir: &std::path::Path,
    domain: &str,
    http: &str,
    new_keys: bool,
) {
    let url = broker.url();
    let keys = if new_keys { "new keys" } else { "keys reused" };
    println!("kez-chat-server dev: serving {domain} (Ctrl-C to stop)");
    println!("  NATS URL  {url}");
    println!("  HTTP      {http}  (/healthz, /metrics, /.well-known/webfinger)");
    println!(
        "  data      {}  ({keys}; delete it to start over)",
        data_dir.display()
    );
    println!(
        "  broker    nats-server pid {}, log {}",
        broker.pid(),
        broker.log_path().display()
    );
    println!();
    println!("Point kez-chat at it, one --home per person:");
    println!("  kez-chat --home /tmp/kez-alice --server {url} register alice");
    println!("  kez-chat --home /tmp/kez-bob   --server {url} register bob");
    println!("  kez-chat --home /tmp/kez-alice add @bob");
    println!("  kez-chat --home /tmp/kez-alice send @bob \"hello bob\"");
    println!("  kez-chat --home /tmp/kez-bob   inbox");
}

async fn admin(config: &ServerConfig, handle: &str, disable: bool) -> Result<String, String> {
    let handle = Handle::parse(handle, &config.domain).map_err(|err| format!("{handle}: {err}"))?;
    let store = kez_chat_server::open_store(config)
        .await
        .map_err(|err| err.to_string())?;
    let record = store
        .handle(handle.name())
        .await
        .map_err(|err| err.message)?
        .ok_or_else(|| format!("{handle} is not registered on {}", config.domain))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let disabled = disable.then(|| DisabledRecord {
        handle: record.handle.clone(),
        since: now,
    });
    store
        .set_disabled(record.key, disabled.as_ref())
        .await
        .map_err(|err| err.message)?;
    Ok(match disable {
        true => format!(
            "{handle} ({}) is disabled: new connections by its key are refused",
            record.key
        ),
        false => format!("{handle} ({}) is enabled again", record.key),
    })
}

/// Prints what an admin action did, or fails with why not.
fn report(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(err) => fail(&err),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// `admin peers`: one line per peer domain.
async fn admin_peers(connection: AdminConnection) -> Result<String, String> {
    let config = resolve(connection.config, connection.settings)?;
    let pins = kez_chat_server::open_pins(&config)
        .await
        .map_err(|err| err.to_string())?;
    let records = pins.list().await.map_err(|err| err.message)?;
    if records.is_empty() {
        return Ok("no peer server met or blocked yet".into());
    }
    let mut lines = vec![format!(
        "{:<40} {:<73} {:<12} {}",
        "DOMAIN", "KEY", "PINNED_AT", "BLOCKED"
    )];
    for record in records {
        lines.push(format!(
            "{:<40} {:<73} {:<12} {}",
            record.domain,
            record
                .key
                .map_or_else(|| "-".to_owned(), |key| key.to_string()),
            record.pinned_at,
            if record.blocked { "yes" } else { "no" }
        ));
    }
    Ok(lines.join("\n"))
}

/// `admin peer block|unblock|forget DOMAIN`.
async fn admin_peer(action: PeerAction) -> Result<String, String> {
    let (PeerAction::Block(target) | PeerAction::Unblock(target) | PeerAction::Forget(target)) =
        &action;
    let domain = kez_core::handle::parse_domain(&target.peer)
        .map_err(|err| format!("{:?}: {err}", target.peer))?;
    let connection = &target.connection;
    let config = resolve(connection.config.clone(), connection.settings.clone())?;
    let pins = kez_chat_server::open_pins(&config)
        .await
        .map_err(|err| err.to_string())?;
    let now = unix_now();
    Ok(match action {
        PeerAction::Forget(_) => match pins.forget(&domain).await.map_err(|err| err.message)? {
            Some(PeerRecord { key: Some(key), .. }) => format!(
                "{domain}: the pinned key {key} is forgotten; the next contact pins the key its WebFinger names"
            ),
            _ => format!("{domain}: no key was pinned"),
        },
        PeerAction::Block(_) => {
            pins.set_blocked(&domain, true, now)
                .await
                .map_err(|err| err.message)?;
            format!(
                "{domain} is blocked: its connections (open ones end now), deliveries, and mail and lookups for it are refused"
            )
        }
        PeerAction::Unblock(_) => {
            pins.set_blocked(&domain, false, now)
                .await
                .map_err(|err| err.message)?;
            format!("{domain} is unblocked")
        }
    })
}

fn fail(message: &str) -> ExitCode {
    eprintln!("kez-chat-server: error: {message}");
    ExitCode::FAILURE
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
