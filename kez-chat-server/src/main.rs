//! `kez-chat-server`: the kez-chat home server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kez_chat_server::Server;
use kez_chat_server::config::Settings;

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
    /// Serve the NATS services until SIGINT or SIGTERM. Log level: RUST_LOG (default info).
    Run {
        /// TOML file with any of the settings below (keys as flag names with `_`)
        #[arg(long, env = "KEZ_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
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
    let Command::Run { config, settings } = Cli::parse().command;
    let file = match config.as_deref().map(Settings::from_file).transpose() {
        Ok(file) => file.unwrap_or_default(),
        Err(err) => return fail(&err),
    };
    let config = match settings.or(file).resolve() {
        Ok(config) => config,
        Err(err) => return fail(&err),
    };
    tracing::info!(nats = %config.nats_url, domain = %config.domain, "starting");
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
