//! `kez-chat-server`: the kez-chat home server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kez_chat_server::config::{ServerConfig, Settings};
use kez_chat_server::store::DisabledRecord;
use kez_chat_server::{Server, nats_conf};
use kez_core::Handle;

/// The kez-chat home server: handle registry and sigchain services over NATS.
///
/// Clients reach it only through NATS (`kez.registry.*`, `kez.sigchain.*`, `kez.server.*`); all
/// state lives in JetStream key-value buckets, so several instances can share one broker.
#[derive(Parser)]
#[command(version, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the server's NATS keys (callout issuer, AUTH and SERVER users) in a directory, each
    /// seed in its own 0600 file, and print the values nats-server's config needs.
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
    /// Serve the NATS services until SIGINT or SIGTERM. Log level: RUST_LOG (default info).
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

#[derive(Subcommand)]
enum AdminAction {
    /// Refuse the handle's key at the broker: it can no longer connect (existing connections end
    /// when their authorization expires, within an hour).
    Disable(AdminTarget),
    /// Let a disabled handle's key connect again.
    Enable(AdminTarget),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run { config, settings } => run(config, settings).await,
        Command::Keygen { keys_dir } => match nats_conf::keygen(&keys_dir) {
            Ok(keys) => {
                println!(
                    "Wrote the server's NATS keys to {} (mode 0600):",
                    keys_dir.display()
                );
                println!(
                    "  {}  callout issuer   {}",
                    nats_conf::ISSUER_SEED_FILE,
                    keys.issuer
                );
                println!(
                    "  {}     AUTH user        {}",
                    nats_conf::AUTH_USER_SEED_FILE,
                    keys.auth_user
                );
                println!(
                    "  {}            SERVER user      {}",
                    nats_conf::SERVER_USER_SEED_FILE,
                    keys.server_user
                );
                println!();
                println!(
                    "nats-server config: kez-chat-server nats-conf --keys-dir {}",
                    keys_dir.display()
                );
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
        Command::Admin { action } => {
            let (target, disable) = match action {
                AdminAction::Disable(target) => (target, true),
                AdminAction::Enable(target) => (target, false),
            };
            match resolve(target.config, target.settings) {
                Ok(config) => match admin(&config, &target.handle, disable).await {
                    Ok(message) => {
                        println!("{message}");
                        ExitCode::SUCCESS
                    }
                    Err(err) => fail(&err),
                },
                Err(err) => fail(&err),
            }
        }
    }
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
